"""The server under bad input, limits, out-of-memory and cancellation: every failure is a
tool error with a message, and nothing leaks (hooks, locks, cache state)."""

import asyncio
import threading

import anyio
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from tdb_agent import ops
from tdb_agent.errors import Cancelled
from tdb_agent.server import build_server
from tdb_agent.service.running import INTERNAL
from tdb_agent.workbench import Limits, Workbench
from tests.test_server_tools import CALLS, C, P

REFERENCE = [
    ("predict", {"prompt": P, "target": "Mary", "distractor": "John", "top_k": 5}),
    ("attribute", {"prompt": P, "target": "Mary", "distractor": "John", "method": "act_times_grad",
                   "corrupted_prompt": C, "top_k": 8}),
    ("ablate", {"prompt": P, "components": ["L0.H1", "L1.N3@4"], "target": "Mary", "distractor": "John",
                "mode": "mean"}),
    ("ablation_sweep", {"prompt": P, "kind": "head", "target": "Mary", "distractor": "John"}),
    ("trace_upstream", {"prompt": P, "component": "L1.H2@14", "via": "all"}),
]


class SyncClient:
    """One real in-process client session, driven from synchronous code (hypothesis) through
    an event loop in a background thread; the session lives in one task from start to end."""

    def __init__(self, server):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ready = threading.Event()
        self.main = asyncio.run_coroutine_threadsafe(self._session(server), self.loop)
        if not self.ready.wait(60):
            self.main.result(0)  # raises what went wrong
        self.tools = {t.name: t for t in self._run(self.client.list_tools()).tools}

    async def _session(self, server):
        self.closing = asyncio.Event()
        async with Client(server) as c:
            self.client = c
            self.ready.set()
            await self.closing.wait()

    def _run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, name, args):
        return self._run(self.client.call_tool(name, args))

    def close(self):
        self.loop.call_soon_threadsafe(self.closing.set)
        self.main.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _error_text(r) -> str:
    assert r.is_error
    text = r.content[0].text
    assert text and len(text) > 20, text
    return text


# ------------------------------------------------------------------ limits
@pytest.fixture(scope="module")
def small(gpt2_tiny):
    limits = Limits(max_prompt_tokens=16, max_prompt_chars=200, max_top_k=7, max_components=2, max_new_tokens=4)
    return build_server(Workbench(gpt2_tiny, limits))


@pytest.mark.parametrize("name,args,limit", [
    ("predict", {"prompt": "the " * 16}, "max_prompt_tokens=16"),
    ("tokenize", {"text": "x" * 201}, "max_prompt_chars=200"),
    ("predict", {"prompt": "The cat", "top_k": 8}, "max_top_k=7"),
    ("attribute", {"prompt": "The cat", "target": "Mary", "top_k": 8}, "max_top_k=7"),
    ("trace_upstream", {"prompt": "The cat", "component": "L1.H0", "top_k": 8}, "max_top_k=7"),
    ("ablation_sweep", {"prompt": "The cat", "kind": "head", "target": "Mary", "top_k": 8}, "max_top_k=7"),
    ("ablate", {"prompt": "The cat", "components": ["L0.H0", "L0.H1", "L0.H2"], "target": "Mary"},
     "max_components=2"),
    ("patch", {"clean_prompt": "The cat", "corrupted_prompt": "The dog", "components": ["L0.H0", "L0.H1", "L0.H2"],
               "target": "Mary"}, "max_components=2"),
    ("steer", {"prompt": "The cat", "component": "L0.N1", "max_new_tokens": 5}, "max_new_tokens=4"),
    ("ablate", {"prompt": "The cat", "components": ["L0.H0"], "target": "Mary", "corrupted_prompt": "a " * 16,
                "mode": "resample"}, "max_prompt_tokens=16"),
])
def test_limits_are_named(small, name, args, limit):
    async def go():
        async with Client(small) as c:
            return await c.call_tool(name, args)
    text = _error_text(asyncio.run(go()))
    assert limit in text and "tdb-agent serve --" in text, text


def test_defaults_respect_the_limits(small):
    async def go():
        async with Client(small) as c:
            return (await c.call_tool("predict", {"prompt": "The cat"}),
                    await c.call_tool("steer", {"prompt": "The cat", "component": "L0.N1"}))
    pred, steer = asyncio.run(go())
    assert not pred.is_error and len(pred.structured_content["top"]) == 7
    assert not steer.is_error


def test_limits_appear_in_the_schemas(small):
    async def go():
        async with Client(small) as c:
            return {t.name: t for t in (await c.list_tools()).tools}
    tools = asyncio.run(go())
    assert "max_top_k=7" in tools["predict"].input_schema["properties"]["top_k"]["description"]
    assert "max_components=2" in tools["ablate"].input_schema["properties"]["components"]["description"]


def test_unknown_argument_is_refused_with_a_hint(gpt2_tiny):
    async def go():
        async with Client(build_server(Workbench(gpt2_tiny))) as c:
            return await c.call_tool("predict", {"prompt": P, "topk": 3})
    text = _error_text(asyncio.run(go()))
    assert "'topk'" in text and "did you mean 'top_k'" in text


def test_undefined_numbers_are_a_tool_error_not_a_broken_result(gpt2_tiny):
    """Patching a prompt into itself: the fraction restored is 0/0. JSON cannot carry NaN
    (it arrives as null and breaks the output schema), so the client must get a clear error
    (or, should the operation define the value, a result that validates)."""
    async def go():
        async with Client(build_server(Workbench(gpt2_tiny))) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            r = await c.call_tool("patch", {"clean_prompt": P, "corrupted_prompt": P, "components": ["L1.H2"],
                                            "target": "Mary", "distractor": "John"})
            return r, tools["patch"].output_schema
    r, schema = asyncio.run(go())
    if r.is_error:
        assert "fraction_restored" in _error_text(r) and "NaN" in r.content[0].text
    else:
        jsonschema.validate(r.structured_content, schema)


# ------------------------------------------------------------------ out of memory
def test_out_of_memory_is_a_tool_error_and_frees_the_cache(gpt2_tiny, monkeypatch):
    bench = Workbench(gpt2_tiny)
    server = build_server(bench)

    def oom(*a, **k):
        raise MemoryError("cannot allocate 64 GiB")

    async def go():
        async with Client(server) as c:
            before = await c.call_tool(*REFERENCE[1])
            assert not before.is_error
            misses = bench.cache.misses
            with monkeypatch.context() as m:
                m.setattr(ops, "ablate", oom)
                r = await c.call_tool(*REFERENCE[2])
            text = _error_text(r)
            assert "out of memory in ablate" in text and "server keeps serving" in text
            # the cache was freed: the same prompt is computed again
            after = await c.call_tool(*REFERENCE[1])
            assert bench.cache.misses > misses
            assert after.structured_content == before.structured_content
            assert not (await c.call_tool(*REFERENCE[2])).is_error
    asyncio.run(go())
    assert gpt2_tiny.active_hook_count() == 0


def test_unexpected_exception_is_reported_not_hidden(gpt2_tiny, monkeypatch):
    monkeypatch.setattr(ops, "predict", lambda *a, **k: {}["boom"])

    async def go():
        async with Client(build_server(Workbench(gpt2_tiny))) as c:
            return await c.call_tool("predict", {"prompt": P})
    text = _error_text(asyncio.run(go()))
    assert INTERNAL in text and "KeyError" in text


# ------------------------------------------------------------------ cancellation
def test_cancelled_sweep_leaves_the_server_consistent(gpt2_tiny, monkeypatch):
    bench = Workbench(gpt2_tiny, Limits(batch_size=1))  # one forward per neuron: a long sweep
    server = build_server(bench)
    outcome = []
    real_sweep = ops.ablation_sweep

    def observed_sweep(*a, **k):  # the real sweep; records how it ended
        try:
            result = real_sweep(*a, **k)
        except Cancelled:
            outcome.append("cancelled")
            raise
        outcome.append("completed")
        return result
    monkeypatch.setattr(ops, "ablation_sweep", observed_sweep)

    sweep = {"prompt": P, "kind": "neuron", "target": "Mary", "distractor": "John", "positions": "all"}

    async def go():
        async with Client(server) as c:
            ref = [(await c.call_tool(n, a)).structured_content for n, a in REFERENCE]
            outcome.clear()
            seen = []
            started = anyio.Event()

            async def on_progress(progress, total, message):
                seen.append((progress, total))
                started.set()

            async with anyio.create_task_group() as tg:
                async def call():
                    await c.call_tool("ablation_sweep", sweep, progress_callback=on_progress)
                    outcome.append("returned")  # must not happen: the call was cancelled
                tg.start_soon(call)
                await started.wait()
                tg.cancel_scope.cancel()
            assert seen[-1][0] < seen[-1][1]
            # the abandoned worker stops at its next batch and releases the engine lock
            for _ in range(200):
                if outcome:
                    break
                await anyio.sleep(0.05)
            assert outcome == ["cancelled"]
            assert gpt2_tiny.active_hook_count() == 0
            again = [(await c.call_tool(n, a)).structured_content for n, a in REFERENCE]
            assert again == ref
    asyncio.run(go())


# ------------------------------------------------------------------ fuzzing
COMPONENTS = st.sampled_from(["L0.H0", "L1.H3", "L0.N5", "L1.N127", "L0.MLP", "L1.ATTN", "EMB", "LOGITS", "L2.H0",
                              "L0.H4", "L0.N128", "L1.H2@14", "L1.H2@99", "L0.N5@0", "L-1.H0", "L0.H", "l0.h0",
                              "L1.resid.F3", "L0.mlp.F0", "EMB@3", "L99999999999999999999.H0", "L0.H0@-1",
                              "L0.H0@", " L0.H0 ", "L0.H0@1@2", "LOGITS@2"])
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
PROMPTS = st.one_of(TEXT, st.just(""), st.just(P), st.just(C), st.sampled_from(["the " * 70, "Mary " * 3000,
                    "x" * 25000, "🙂 naïve Zürich 東京 \u200b\t\n", "\x00\x01", "Mary", " John"]))
NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), PROMPTS, COMPONENTS, st.lists(COMPONENTS, max_size=6),
    st.lists(st.integers(-5, 10**12), max_size=4), st.lists(st.integers(0, 20), min_size=300, max_size=300),
    st.dictionaries(TEXT, st.integers(), max_size=2), st.sampled_from(["zero", "mean", "resample", "head", "neuron",
                                                                       "q", "k", "v", "all", "last", "x" * 300]),
    st.lists(COMPONENTS, min_size=257, max_size=257),
)


INTS = st.one_of(st.integers(-3, 80), st.integers(min_value=-10**30, max_value=10**30))
TOKENS = st.one_of(st.sampled_from(["Mary", "John", "Tom", "the", " Mary", "Mary John", "zzqxv", "<|endoftext|>",
                                    "🙂", "", " "]), TEXT)
FIELDS = {  # plausible-but-wrong values per argument name: these reach the operations' own checks
    "prompt": PROMPTS, "clean_prompt": PROMPTS, "corrupted_prompt": PROMPTS, "text": PROMPTS,
    "target": TOKENS, "distractor": st.one_of(st.none(), TOKENS),
    "component": COMPONENTS, "components": st.one_of(st.lists(COMPONENTS, max_size=5), st.just([]),
                                                     st.lists(COMPONENTS, min_size=257, max_size=257)),
    "top_k": INTS, "key_position": st.one_of(st.none(), INTS), "max_new_tokens": INTS,
    "scale": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6)),
    "positions": st.one_of(st.sampled_from(["all", "last", "first"]), st.lists(INTS, max_size=5)),
    "kinds": st.one_of(st.none(), st.lists(st.sampled_from(["head", "neuron", "attn", "mlp", "emb", "sae", "x"]),
                                           max_size=6)),
    "kind": st.sampled_from(["head", "neuron", "attn", "mlp", "sae", "emb", "HEAD"]),
    "method": st.sampled_from(["direct_effect", "act_times_grad", "magic"]),
    "mode": st.sampled_from(["zero", "mean", "resample", "random"]),
    "reference": st.sampled_from([None, "zero", "mean", "corrupted", "other"]),
    "via": st.sampled_from(["q", "k", "v", "all", "qk"]),
    "direction": st.sampled_from(["denoise", "noise", "both"]),
    "per_position": st.one_of(st.booleans(), st.just("yes")),
    # circuit tools
    "name": st.sampled_from(["conformance", "conformance-pruned", "nope", "../etc", "a/b", "", "x" * 65, "ok-1"]),
    "into": st.sampled_from([None, "conformance", "other", "../x", "a b"]),
    "task": st.sampled_from([None, "ioi", "induction", "facts", "nope"]),
    "n_pairs": INTS, "seed": INTS, "threshold": st.floats(allow_nan=True, allow_infinity=True),
    "nodes": st.lists(st.one_of(COMPONENTS, st.fixed_dictionaries({"id": COMPONENTS}),
                                st.fixed_dictionaries({"id": COMPONENTS, "effect": st.floats()})), max_size=4),
    "edges": st.lists(st.fixed_dictionaries({"source": COMPONENTS, "target": COMPONENTS,
                                             "via": st.sampled_from(["q", "k", "v", "direct", "x"])}), max_size=3),
    "protect": st.lists(COMPONENTS, max_size=3),
    "modes": st.one_of(st.none(), st.lists(st.sampled_from(["mean", "resample", "zero"]), max_size=3)),
    "format": st.sampled_from(["json", "graphml", "dot", "circuit_tracer", "svg", "html", "pdf"]),
    "metric": st.sampled_from([None, "logit_diff", "logprob", "accuracy"]),
    "pairs": st.one_of(st.none(), st.lists(st.fixed_dictionaries({"prompt": PROMPTS, "target": TOKENS}), max_size=2)),
}


@st.composite
def bad_calls(draw, properties):
    """A tool call derived from a valid one: some arguments replaced by plausible-but-wrong
    values, some by values of the wrong type, some removed, optional ones added, and now
    and then an argument the tool does not have."""
    name = draw(st.sampled_from(sorted(properties)))
    args = dict(CALLS[name])
    for key in properties[name]:
        roll = draw(st.integers(0, 99))
        if roll < 30:
            args[key] = draw(FIELDS.get(key, NASTY))
        elif roll < 35:
            args[key] = draw(NASTY)
        elif roll < 38:
            args.pop(key, None)
    if draw(st.integers(0, 99)) < 8:
        args[draw(st.sampled_from(["extra", "topk", "layer", "path"]))] = draw(NASTY)
    return name, args


EXAMPLES = 520


def test_fuzzing_never_crashes_the_server(gpt2_tiny, tmp_path):
    bench = Workbench(gpt2_tiny, Limits(max_prompt_tokens=48), workspace=tmp_path)
    client = SyncClient(build_server(bench))
    try:
        ref = [client.call(n, a).structured_content for n, a in REFERENCE]
        for name in ("circuit_create", "circuit_add"):  # a circuit for the circuit tools to work on
            assert not client.call(name, CALLS[name]).is_error
        calls, errors = [], []
        layer = {}  # tool -> the layers its calls reached: "schema" (rejected by validation), "op", "ok"

        properties = {n: list(t.input_schema["properties"]) for n, t in client.tools.items()}

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(call=bad_calls(properties))
        def one(call):
            name, args = call
            r = client.call(name, args)
            calls.append(name)
            if r.is_error:
                text = _error_text(r)
                assert text.startswith(f"Error executing tool {name}: ") and INTERNAL not in text, text
                errors.append(text)
                schema = "validation error" in text or "unknown argument" in text
                layer.setdefault(name, set()).add("schema" if schema else "op")
            else:
                jsonschema.validate(r.structured_content, client.tools[name].output_schema)
                layer.setdefault(name, set()).add("ok")
            assert gpt2_tiny.active_hook_count() == 0

        one()
        assert len(calls) >= 0.9 * EXAMPLES and set(calls) == set(client.tools)
        deep = [e for e in errors if "validation error" not in e and "unknown argument" not in e]
        # the calls reached every layer: schema validation, the operations' own checks, and success,
        # each for a share of the calls (fractions, not counts: they do not move with the number of draws)
        n = len(calls)
        assert len(deep) / n > 0.1 and (len(errors) - len(deep)) / n > 0.15 and (n - len(errors)) / n > 0.1
        # and per tool: most tools got a fuzzed call past schema validation into the op (a share of
        # the tools, since which tool's few draws are all schema-invalid depends on the draws)
        reached = [t for t in client.tools if layer.get(t, set()) & {"op", "ok"}]
        assert len(reached) / len(client.tools) >= 0.75, sorted(set(client.tools) - set(reached))
        again = [client.call(n, a).structured_content for n, a in REFERENCE]
        assert again == ref
    finally:
        client.close()
