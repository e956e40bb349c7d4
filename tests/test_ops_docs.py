"""Every public operation in tdb_agent.ops documents what it computes, its arguments and its result."""

import inspect

import pytest

import tdb_agent.ops as ops

# plumbing every op shares, documented once in the ops package rather than per function
PLUMBING = {"engine", "cache"}


def _public_functions():
    names = getattr(ops, "__all__", None) or [n for n in dir(ops) if not n.startswith("_")]
    fns = [(n, getattr(ops, n)) for n in names]
    return [(n, f) for n, f in fns if inspect.isfunction(inspect.unwrap(f))]


PUBLIC = _public_functions()


def test_the_public_functions_are_found():
    names = {n for n, _ in PUBLIC}
    assert {"attribute", "ablate", "ablation_sweep", "patch", "trace_upstream", "steer", "predict", "tokenize",
            "model_info", "list_tasks", "attention_pattern", "make_metric"} <= names


@pytest.mark.parametrize("name,fn", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_docstring_is_complete(name, fn):
    doc = inspect.getdoc(fn)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0].strip()
    assert summary and summary != name, f"{name}: the docstring starts with a summary line"
    params = [p for p in inspect.signature(fn).parameters if p not in PLUMBING]
    if params:
        assert "\nArgs:\n" in doc, f"{name}: no Args: section"
        args = doc.split("\nArgs:\n", 1)[1].split("\nReturns:", 1)[0]
        missing = [p for p in params if f"{p}:" not in args]
        assert not missing, f"{name}: Args: does not describe {missing}"
    assert "\nReturns:\n" in doc and doc.split("\nReturns:\n", 1)[1].strip(), f"{name}: no Returns: section"
