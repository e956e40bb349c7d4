"""The rule of the rooms (docs/DESIGN.md §2), read from the source with `ast`: which package
may import which, and no import cycle between modules (imports inside functions count:
a lazy import hides a cycle, it does not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent / "tdb_agent"

#: package -> packages it must not import
FORBIDDEN = {
    "engine": {"ops", "circuits", "server", "agent", "viewer", "cli", "session", "workbench"},
    "ops": {"circuits", "server", "agent", "viewer", "cli", "session"},
    "server": {"viewer", "agent", "cli", "ops"},  # the tools are service/'s; server only wires them
    "viewer": {"server", "cli"},
    "agent": {"engine", "ops", "server", "viewer", "cli"},
}
#: the one module where the server's HTTP app mounts the viewer's routes
MOUNTING = {"tdb_agent.server.http": {"viewer"}}
#: composition roots: they may import anything, and the agent may be handed what they build
ROOTS = {"tdb_agent.session"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The tdb_agent modules a file imports (`from pkg import sub` counts as importing sub)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tdb_agent"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("tdb_agent"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known}


def graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        for target in imports(path, set(mods)):
            if name == target or name.startswith(target + "."):
                continue  # a module and its own package's __init__ are one room
            g.add_edge(name, target)
    return g


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in sorted(cycles)[:20])


def test_layering():
    bad = []
    for src, dst in graph().edges:
        if dst in ROOTS and room(src) != "agent":
            continue
        rule = FORBIDDEN.get(room(src), set()) - MOUNTING.get(src, set())
        if room(dst) in rule:
            bad.append(f"{src} imports {dst} ({room(src)} must not import {room(dst)})")
        if room(dst) == "cli":
            bad.append(f"{src} imports {dst} (nothing imports cli)")
    assert not bad, "\n".join(sorted(bad))


def test_agent_reaches_the_engine_only_through_a_session():
    """agent/ may ask the composition root for a session (`tdb_agent.session`), lazily, but
    never imports the engine, the ops or the server itself."""
    g = graph()
    for src in [m for m in g if room(m) == "agent"]:
        for dst in g.successors(src):
            assert room(dst) not in FORBIDDEN["agent"], (src, dst)


def test_the_checker_sees_imports():
    """The graph is not empty by mistake: known edges are found."""
    g = graph()
    assert g.has_edge("tdb_agent.service.model_tools", "tdb_agent.ops")
    assert g.has_edge("tdb_agent.cli", "tdb_agent.session")
    assert g.has_edge("tdb_agent.ops.trace", "tdb_agent.ops.attribute")
