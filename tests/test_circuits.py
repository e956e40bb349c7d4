"""Circuit graphs, faithfulness, necessity and pruning, checked against independent
computations: the existing `ablate` op (one prompt at a time, unbatched, its own hooks) and
hand-written hooks on the plain `transformers` model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tdb_agent import circuits as C
from tdb_agent.circuits.evaluate import Evaluator
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError, UnknownComponent
from tdb_agent.ops.ablate import ablate
from tdb_agent.ops.runs import RunCache
from tdb_agent.tasks import task_examples
from tests.reference_hooks import capture_plain, plain_hooks

IOI = C.Behaviour(task="ioi", n=4, seed=3)
SAME_LEN = [C.PromptPair(prompt=f"When {a} and {b} went to the store , {b} gave a drink to",
                         corrupted_prompt=f"When {a} and {b} went to the store , {c} gave a drink to",
                         target=a, distractor=b)
            for a, b, c in [("Mary", "John", "Tom"), ("Anna", "Tom", "John"), ("John", "Mary", "Anna")]]


def universe(eng):
    return [f"L{l}.H{h}" for l in range(eng.spec.n_layers) for h in range(eng.spec.n_heads)] + \
        [f"L{l}.MLP" for l in range(eng.spec.n_layers)]


def circuit(nodes, behaviour=IOI, metric=None):
    g = C.new_circuit("t", behaviour=behaviour, metric=metric)
    for n in nodes:
        C.add_node(g, n)
    return g


@pytest.fixture(scope="module")
def cache(gpt2_tiny):
    return RunCache(gpt2_tiny)


# ------------------------------------------------------------------ the graph model
def test_nodes_and_edges_carry_evidence(gpt2_tiny):
    g = C.new_circuit("ioi", behaviour=IOI, metric="logit_diff", model="tiny")
    C.add_node(g, "L1.H2", role="name mover", effect=0.5, evidence=[{"tool": "attribute", "args": {"p": 1},
                                                                     "value": 0.5}], engine=gpt2_tiny)
    rec = C.add_node(g, " L1.H2", explanation="copies the name", evidence=[C.Evidence(tool="ablate", value=-0.3)])
    assert rec.role == "name mover" and rec.explanation == "copies the name" and rec.effect == 0.5
    assert [e.tool for e in rec.evidence] == ["attribute", "ablate"]
    e = C.add_edge(g, "L0.H1@4", "L1.H2", weight=0.2, via="k", evidence=[{"tool": "trace_upstream", "value": 0.2}])
    assert e.via == "k" and "L0.H1@4" in g and g.nodes["L0.H1@4"]["position"] == 4
    C.add_edge(g, "L1.H2", "LOGITS", weight=0.5)
    C.add_edge(g, "L1.H2", "LOGITS", evidence=[{"tool": "attribute", "value": 0.5}])
    assert C.get_edge(g, "L1.H2", "LOGITS").weight == 0.5 and len(g.edges["L1.H2", "LOGITS"]["evidence"]) == 1
    info = C.info(g)
    assert info.metric == "logit_diff" and info.behaviour.task == "ioi" and len(info.nodes) == 3
    assert C.components(g) == ["L1.H2", "L0.H1@4"]
    assert g.nodes["L1.H2"]["kind"] == "head" and g.nodes["L1.H2"]["layer"] == 1


@pytest.mark.parametrize("src,dst,via,fragment", [
    ("L1.H2", "L0.H1", "direct", "against the residual stream"),
    ("L1.MLP", "L1.H0", "direct", "against the residual stream"),
    ("L0.H1", "L0.H2", "direct", "against the residual stream"),
    ("LOGITS", "L1.H0", "direct", "against the residual stream"),
    ("L0.H1@7", "L1.H0@3", "direct", "earlier position"),
    ("L0.H1", "L1.MLP", "q", "is a mlp"),
    ("L0.H1", "L1.H1", "v", None),
])
def test_edge_rules(src, dst, via, fragment):
    g = circuit([])
    if fragment is None:
        C.add_edge(g, src, dst, via=via)
        with pytest.raises(TdbError, match="already exists with via=v"):
            C.add_edge(g, src, dst, via="q")
        return
    with pytest.raises(TdbError, match=fragment):
        C.add_edge(g, src, dst, via=via)
    assert C.components(g) == []  # nothing half-added


def test_ids_are_checked_against_the_model(gpt2_tiny):
    g = circuit([])
    with pytest.raises(UnknownComponent, match="layers are 0..1"):
        C.add_node(g, "L5.H0", engine=gpt2_tiny)
    with pytest.raises(UnknownComponent, match="neurons are 0..127"):
        C.add_edge(g, "L0.N128", "LOGITS", engine=gpt2_tiny)
    with pytest.raises(UnknownComponent, match="unknown component"):
        C.add_node(g, "head 3")
    with pytest.raises(TdbError, match="LOGITS takes no position"):
        C.add_node(g, "LOGITS@3")
    with pytest.raises(TdbError, match="cannot be removed"):
        C.remove_node(g, "LOGITS")
    C.add_node(g, "L9.H9")  # no engine: grammar only, checked later
    with pytest.raises(UnknownComponent, match="layers are 0..1"):
        C.check_ids(g, gpt2_tiny)


def test_behaviour_is_a_task_or_pairs():
    with pytest.raises(ValueError, match="exactly one"):
        C.Behaviour()
    with pytest.raises(ValueError, match="unknown task"):
        C.Behaviour(task="nope")
    pairs = IOI.resolve()
    assert [p.prompt for p in pairs] == [e.prompt for e in task_examples("ioi", 4, seed=3)]


# ------------------------------------------------------------------ faithfulness
@pytest.mark.parametrize("mode", ["mean", "resample"])
def test_full_is_one_and_empty_is_zero(gpt2_tiny, cache, mode):
    full = C.validate(gpt2_tiny, circuit(["L0.ATTN", "L1.ATTN", "L0.MLP", "L1.MLP"]), mode=mode, cache=cache,
                      necessity=False)
    assert full.faithfulness == pytest.approx(1.0, abs=1e-6)
    assert full.metric_circuit == pytest.approx(full.metric_full, abs=1e-6)
    each = C.validate(gpt2_tiny, circuit(universe(gpt2_tiny)), mode=mode, cache=cache, necessity=False)
    assert each.faithfulness == pytest.approx(1.0, abs=1e-6)
    empty = C.validate(gpt2_tiny, circuit(["EMB"]), mode=mode, cache=cache, necessity=False)
    assert empty.faithfulness == pytest.approx(0.0, abs=1e-6)
    assert empty.n_kept == 0 and full.n_kept == full.n_universe == 10
    assert full.mode == mode and "@t" in full.positions and "hook_z" in full.universe


def _complement(eng, keep: list[str], n_tokens: int) -> list[str]:
    """What the `ablate` op must ablate so that only `keep` survives (written independently
    of the circuits module: pinned heads are ablated at every other position, neurons of a
    named layer one by one)."""
    kept_heads = {k.split("@")[0]: int(k.split("@")[1]) for k in keep if "@" in k}
    out = []
    for l in range(eng.spec.n_layers):
        for h in range(eng.spec.n_heads):
            hid = f"L{l}.H{h}"
            if hid in keep:
                continue
            if hid in kept_heads:
                out += [f"{hid}@{t}" for t in range(n_tokens) if t != kept_heads[hid]]
            else:
                out.append(hid)
        neurons = [int(k.split(".N")[1]) for k in keep if k.startswith(f"L{l}.N")]
        if neurons:
            out += [f"L{l}.N{n}" for n in range(eng.spec.d_mlp) if n not in neurons]
        elif f"L{l}.MLP" not in keep:
            out.append(f"L{l}.MLP")
    return out


@pytest.mark.parametrize("mode", ["mean", "resample"])
@pytest.mark.parametrize("keep", [["L0.H1", "L1.H2", "L0.MLP"], ["L0.H0", "L1.N3", "L1.N7"],
                                  ["L1.H2@5", "L0.H3", "L1.MLP"]])
def test_faithfulness_equals_ablate_op_by_hand(gpt2_tiny, cache, mode, keep):
    pairs = IOI.resolve()
    full, empty, kept = [], [], []
    for p in pairs:
        n = gpt2_tiny.to_tokens(p.prompt).shape[1]
        kw = dict(mode=mode, corrupted_prompt=p.corrupted_prompt if mode == "resample" else None, cache=cache)
        r = ablate(gpt2_tiny, p.prompt, _complement(gpt2_tiny, keep, n), p.target, p.distractor, **kw)
        full.append(r.before)
        kept.append(r.after)
        empty.append(ablate(gpt2_tiny, p.prompt, universe(gpt2_tiny), p.target, p.distractor, **kw).after)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    expected = (mean(kept) - mean(empty)) / (mean(full) - mean(empty))
    v = C.validate(gpt2_tiny, circuit(keep), mode=mode, cache=cache, necessity=False)
    assert v.metric_full == pytest.approx(mean(full), abs=1e-5)
    assert v.metric_empty == pytest.approx(mean(empty), abs=1e-5)
    assert v.metric_circuit == pytest.approx(mean(kept), abs=1e-5)
    assert v.faithfulness == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert v.n_pairs == 4 and v.metric_name == "logit_diff"


def test_resample_faithfulness_with_plain_hooks(gpt2_tiny, tiny_dirs, cache):
    """Resample ablation done on the plain HF model: every head but L0.H1 and the L0 MLP get
    their activations from the corrupted prompt; L1.MLP is kept."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"], dtype=torch.float32).eval()
    dh = gpt2_tiny.spec.d_head
    keep_heads = {(0, 1)}
    ms = {"full": [], "empty": [], "kept": []}
    for p in SAME_LEN:
        ids, cids = gpt2_tiny.to_tokens(p.prompt), gpt2_tiny.to_tokens(p.corrupted_prompt)
        t, d = gpt2_tiny.token_id(p.target), gpt2_tiny.token_id(p.distractor)
        kinds = [("head", 0), ("head", 1), ("mlp", 0), ("mlp", 1)]
        with capture_plain(model, kinds) as src, torch.no_grad():
            model(cids)

        def run(keep_h, keep_mlp):
            edits = [("head", l, h, lambda x, l=l, h=h: src[("head", l)][..., h * dh:(h + 1) * dh])
                     for l in range(2) for h in range(4) if (l, h) not in keep_h]
            edits += [("mlp", l, None, lambda x, l=l: src[("mlp", l)]) for l in range(2) if l not in keep_mlp]
            with plain_hooks(model, edits), torch.no_grad():
                logits = model(ids).logits[0, -1]
            return (logits[t] - logits[d]).item()
        ms["full"].append(run({(l, h) for l in range(2) for h in range(4)}, {0, 1}))
        ms["empty"].append(run(set(), set()))
        ms["kept"].append(run(keep_heads, {1}))
    m = {k: sum(v) / len(v) for k, v in ms.items()}
    v = C.validate(gpt2_tiny, circuit(["L0.H1", "L1.MLP"], behaviour=C.Behaviour(pairs=SAME_LEN)), mode="resample",
                   cache=cache, necessity=False)
    assert (v.metric_full, v.metric_empty, v.metric_circuit) == pytest.approx(
        (m["full"], m["empty"], m["kept"]), abs=1e-5)
    assert v.faithfulness == pytest.approx((m["kept"] - m["empty"]) / (m["full"] - m["empty"]), rel=1e-3)


def test_one_forward_pass_per_set_when_pairs_have_equal_length(gpt2_tiny, cache):
    ev = Evaluator(gpt2_tiny, SAME_LEN, mode="mean", cache=cache)
    assert ev.forward_passes == 1  # full and empty, 3 pairs each, in one batch
    keeps = [C.keep_set(["L0.H1"], gpt2_tiny.spec), C.keep_set(["L1.N3", "L0.H2@4"], gpt2_tiny.spec),
             C.keep_set(["L1.MLP"], gpt2_tiny.spec)]
    rows = ev.metric_rows(keeps)
    assert ev.forward_passes == 2  # all three sets x three pairs in one more batch
    one = Evaluator(gpt2_tiny, SAME_LEN, mode="mean", cache=cache, batch_size=1)
    rows1 = one.metric_rows(keeps + keeps[:1])
    assert one.forward_passes == 6 + 9  # unbatched: one per row; a set seen before is not rerun
    for a, b in zip(rows, rows1):
        assert torch.allclose(a, b, atol=1e-5)
    ev_r = Evaluator(gpt2_tiny, IOI.resolve(), mode="resample", cache=cache)
    n_groups = len(ev_r.groups)
    assert n_groups >= 2 and ev_r.forward_passes == 2 * n_groups  # corrupted runs + (full, empty)


def test_bad_validation_inputs_are_clear_errors(gpt2_tiny, cache):
    no_corrupt = C.Behaviour(pairs=[C.PromptPair(prompt=SAME_LEN[0].prompt, target="Mary", distractor="John")])
    with pytest.raises(TdbError, match="corrupted_prompt"):
        C.validate(gpt2_tiny, circuit(["L0.H1"], behaviour=no_corrupt), mode="resample", cache=cache)
    short = C.Behaviour(pairs=[C.PromptPair(prompt=SAME_LEN[0].prompt, corrupted_prompt="Mary", target="Mary",
                                            distractor="John")])
    with pytest.raises(TdbError, match="same length"):
        C.validate(gpt2_tiny, circuit(["L0.H1"], behaviour=short), mode="resample", cache=cache)
    with pytest.raises(TdbError, match="out of range"):
        C.validate(gpt2_tiny, circuit(["L0.H1@40"]), cache=cache)
    with pytest.raises(TdbError, match="SAE latents cannot be validated"):
        C.validate(gpt2_tiny, circuit(["L0.resid.F3"]), cache=cache)
    with pytest.raises(TdbError, match="no behaviour"):
        C.validate(gpt2_tiny, C.new_circuit("x"), cache=cache)
    with pytest.raises(TdbError, match="tokenizes as"):
        C.validate(gpt2_tiny, circuit(["L0.H1"], behaviour=C.Behaviour(pairs=[C.PromptPair(
            prompt="a b", target="Mary Ann", distractor="John")])), cache=cache)


def test_logprob_metric_without_distractors(gpt2_tiny, cache):
    pairs = [C.PromptPair(prompt=p.prompt, target=p.target) for p in SAME_LEN]
    v = C.validate(gpt2_tiny, circuit(["L0.H1"], behaviour=C.Behaviour(pairs=pairs)), cache=cache, necessity=False)
    rs = [ablate(gpt2_tiny, p.prompt, _complement(gpt2_tiny, ["L0.H1"], 15), p.target, mode="mean", cache=cache)
          for p in pairs]
    assert v.metric_name == "logprob" and rs[0].metric_name == "logprob"
    assert v.metric_full == pytest.approx(sum(r.before for r in rs) / 3, abs=1e-5)
    assert v.metric_circuit == pytest.approx(sum(r.after for r in rs) / 3, abs=1e-5)


# ------------------------------------------------------------------ a constructed circuit
LIVE = [(0, 1), (1, 0), (1, 2)]


@pytest.fixture(scope="module")
def sparse(tiny_dirs):
    """A tiny GPT-2 whose only working heads are LIVE (every other head's W_O rows are zero, so
    ablating it changes nothing) and whose L0 MLP writes only its bias."""
    eng = Engine.load(tiny_dirs["gpt2"])
    dh = eng.spec.d_head
    with torch.no_grad():
        for l, block in enumerate(eng.model.transformer.h):
            W = block.attn.c_proj.weight  # Conv1D: rows are the heads' z dimensions
            for h in range(eng.spec.n_heads):
                W[h * dh:(h + 1) * dh] *= 30 if (l, h) in LIVE else 0
        eng.model.transformer.h[0].mlp.c_proj.weight.zero_()
        eng.model.transformer.h[1].mlp.c_proj.weight.mul_(10)
    return eng


@pytest.fixture(scope="module")
def sparse_cache(sparse):
    return RunCache(sparse)


def test_necessity_of_dead_and_live_components(sparse, sparse_cache):
    cache = sparse_cache
    g = circuit(universe(sparse) + ["EMB"])
    v = C.validate(sparse, g, cache=cache)
    dead = {f"L{l}.H{h}" for l in range(2) for h in range(4) if (l, h) not in LIVE} | {"L0.MLP"}
    drops = {n.id: n for n in v.necessity}
    assert "EMB" not in drops and "EMB" in v.nodes  # never ablated, so no necessity
    for n in dead:
        assert drops[n].drop == pytest.approx(0.0, abs=1e-4)
    assert drops["L0.H1"].drop > 0.1
    # necessity = f(C) - f(C without the node), with f(C without it) computed on its own
    for n in ["L0.H1", "L1.H2", "L1.MLP"]:
        alone = C.faithfulness(sparse, [m for m in C.components(g) if m != n], IOI, cache=cache)
        assert drops[n].faithfulness_without == pytest.approx(alone, abs=1e-4)
    assert g.graph["faithfulness"] == v.faithfulness and g.graph["validation"]["mode"] == "mean"
    assert g.nodes["L0.H1"]["necessity"] == pytest.approx(drops["L0.H1"].drop)


def test_pruning_drops_the_dead_and_keeps_a_locally_minimal_circuit(sparse, sparse_cache):
    cache = sparse_cache
    g = circuit(universe(sparse))
    r = C.prune(sparse, g, threshold=0.95, cache=cache)
    assert r.reached and r.faithfulness >= 0.95 and r.start_faithfulness == pytest.approx(1.0, abs=1e-6)
    live = {f"L{l}.H{h}" for l, h in LIVE} | {"L1.MLP"}
    assert r.kept and set(r.kept) <= live  # every dead component is gone
    assert len(r.kept) + len(r.removed) == len(universe(sparse))
    for n in r.kept:  # greedy stops only when every single removal would fall below the threshold
        assert C.faithfulness(sparse, [m for m in r.kept if m != n], IOI, cache=cache) < 0.95
    h = C.pruned_circuit(g, r, name="small")
    assert C.components(h) == r.kept and h.graph["pruned_from"] == "t" and h.graph["faithfulness"] is None
    assert C.validate(sparse, h, cache=cache).faithfulness == pytest.approx(r.faithfulness, abs=1e-5)
    assert r.removed[-1].faithfulness == pytest.approx(r.faithfulness)
    protected = C.prune(sparse, g, threshold=0.95, protect=["L0.H0"], cache=cache)
    assert "L0.H0" in protected.kept


def test_pruning_below_threshold_removes_nothing(sparse, sparse_cache):
    g = circuit(["L1.H3", "L0.H2"])
    r = C.prune(sparse, g, threshold=0.8, cache=sparse_cache)
    assert not r.reached and r.kept == ["L1.H3", "L0.H2"] and r.removed == []
    assert r.start_faithfulness == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(TdbError, match="threshold"):
        C.prune(sparse, g, threshold=0)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "mistral", "gemma2"])
def test_block_at_a_time_evaluation_equals_the_ablate_op(tiny_engines, family):
    """The Evaluator runs a pruning step's candidates a block at a time, rows sharing the blocks
    where their keep-sets agree (batches of 4 states, so each block takes several): every
    candidate's metric equals the `ablate` op's on each pair (one prompt at a time, whole
    passes, its own hooks), under both ablations, on families with rotary, GQA, sliding windows
    and post-norms. Under resample ablation the passes run only the positions after the ones
    each pair shares with its corrupted prompt (the node pinned at 4 lies in them)."""
    eng = tiny_engines[family]
    L = eng.spec.n_layers
    circuit_nodes = ["L0.H1", f"L{L - 1}.H0", "L0.MLP", f"L{L - 1}.N3", f"L{L - 1}.N5", "L1.H2@4"]
    sets = [circuit_nodes] + [[m for m in circuit_nodes if m != n] for n in circuit_nodes] + [[]]
    pairs = [p for p in SAME_LEN
             if eng.to_tokens(p.prompt).shape[1] == eng.to_tokens(p.corrupted_prompt).shape[1]]
    assert len(pairs) >= 2
    cache = RunCache(eng)
    for mode in ("mean", "resample"):
        ev = Evaluator(eng, pairs, mode=mode, cache=cache, batch_size=4)
        assert ev.layerwise
        # resample: the passes continue the positions before the replaced name (0 ablation there)
        assert (mode == "resample") == all(g.prefix is not None and g.prefix.offset > 4 for g in ev.groups)
        rows = ev.metric_rows([C.keep_set(s, eng.spec) for s in sets])
        for s, row in zip(sets, rows):
            for i, p in enumerate(pairs):
                n = eng.to_tokens(p.prompt).shape[1]
                r = ablate(eng, p.prompt, _complement(eng, s, n), p.target, p.distractor, mode=mode, cache=cache,
                           corrupted_prompt=p.corrupted_prompt if mode == "resample" else None)
                assert row[i].item() == pytest.approx(r.after, abs=2e-6), (mode, s, i)
        # the pinned node is kept at its position only: keeping it everywhere is another number
        unpinned = ev.metric_rows([C.keep_set([m.split("@")[0] for m in circuit_nodes], eng.spec)])[0]
        assert (unpinned - rows[0]).abs().max() > 1e-5
