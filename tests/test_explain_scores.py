"""Detection, fuzzing and simulation scores: their arithmetic against hand-computed values,
known-perfect and known-useless explanations, the scoring contexts drawn on a tiny model's
dataset (checked against the dataset's own activations), and the LLM reader over real HTTP
against the fake OpenAI-compatible server (including malformed replies)."""

import json
import re

import numpy as np
import pytest

from tdb_agent.explain import scorers
from tdb_agent.explain.contexts import Context, ScoringSet, activation_of, draw_contexts, surface_tokens
from tdb_agent.explain.heuristic import correlation
from tdb_agent.explain.llm import ExplainerLLM, LLMClient, parse_labels
from tdb_agent.explain.readers import LLMReader, OfflineReader
from tdb_agent.explain.scoring import (
    balanced_accuracy,
    classification_score,
    correlation_rows,
    resample,
    simulation_score,
)
from tdb_agent.tasks import vocab as V
from tests.fake_openai import FakeOpenAI, text_response
from tests.test_explain import fake_llm, setup  # noqa: F401  (fixtures: the fake endpoint, the tiny model's dataset)


def test_balanced_accuracy_by_hand():
    # truth: 1 positive, 3 negatives; predictions: positive right, 2 of 3 negatives right
    assert balanced_accuracy([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert balanced_accuracy([0, 0, 0, 0], [1, 1, 0, 0]) == 0.5  # always "no": chance whatever the balance
    assert balanced_accuracy([1] * 10, [1] + [0] * 9) == 0.5  # always "yes" on an imbalanced set: still chance
    assert balanced_accuracy([1, 0], [1, 0]) == 1.0 and balanced_accuracy([0, 1], [1, 0]) == 0.0
    assert balanced_accuracy([1, 0, 1], [1, 1, 1]) == pytest.approx(2 / 3)  # one class only: its accuracy
    with pytest.raises(ValueError):
        balanced_accuracy([1], [1, 0])


def test_bootstrap_interval_matches_the_normal_approximation():
    # 50 positives of which 25 are right, 50 negatives all right: BA = (0.5 + 1) / 2 = 0.75; the
    # stratified bootstrap varies only the positives' rate, sd sqrt(.25 / 50) = 0.0707, so the
    # BA's sd is 0.0354 and its 95% interval about 0.75 -+ 1.96 * 0.0354 = [0.681, 0.819]
    pred, truth = [1] * 25 + [0] * 25 + [0] * 50, [1] * 50 + [0] * 50
    s = classification_score("detection", pred, truth, "offline")
    assert s.value == 0.75 and s.n == 100 and s.n_positive == 50 and s.n_negative == 50
    assert s.low == pytest.approx(0.681, abs=0.015) and s.high == pytest.approx(0.819, abs=0.015)
    again = classification_score("detection", pred, truth, "offline")
    assert (again.low, again.high) == (s.low, s.high)  # fixed seed: the same interval
    # one class alone has no balanced accuracy (its accuracy would pass for one, chance unknown)
    lone = classification_score("detection", [0, 0, 1], [0, 0, 0], "offline")
    assert lone.value is None and "only negative" in lone.note and lone.n_negative == 3 and lone.n_positive == 0
    perfect = classification_score("detection", truth, truth, "offline")
    assert (perfect.value, perfect.low, perfect.high) == (1.0, 1.0, 1.0)
    assert perfect.above_chance and not classification_score("fuzzing", [0] * 100, truth, "offline").above_chance
    # stratified: every resample keeps the class sizes
    idx = resample([1, 1, 1, 0, 0], rounds=50, seed=3)
    assert idx.shape == (50, 5) and (np.isin(idx[:, :2], [3, 4])).all() and (np.isin(idx[:, 2:], [0, 1, 2])).all()


def test_vectorised_bootstrap_correlation_equals_the_plain_one():
    rng = np.random.default_rng(5)
    sim = [rng.random(int(n)) for n in rng.integers(3, 9, 12)]
    true = [s + rng.random(len(s)) for s in sim]
    stats = np.array([[len(t), s.sum(), t.sum(), s @ s, t @ t, s @ t] for s, t in zip(sim, true)])
    idx = resample([0] * 12, rounds=20, seed=2)
    want = [correlation(np.concatenate([sim[i] for i in row]), np.concatenate([true[i] for i in row])) for row in idx]
    assert correlation_rows(stats, idx) == pytest.approx(want, abs=1e-9)
    s = simulation_score(sim, true, "offline")
    assert s.value == pytest.approx(correlation(np.concatenate(sim), np.concatenate(true)))
    assert s.low < s.value < s.high and s.n == 12 and s.chance == 0.0
    flat = simulation_score([[0.0, 0.0]] * 3, [[1.0, 2.0]] * 3, "offline")  # a constant simulation scores 0
    assert flat.value == 0.0 and flat.low == 0.0 and flat.high == 0.0


def _names_world(seed=0, n=24):
    """Contexts where a component fires (1.0) exactly on names: half of them hold a name."""
    rng = np.random.default_rng(seed)
    names, others = sorted(V.NAMES)[:20], ["the", "store", "went", "to", "a", "red", "ball"]
    contexts = []
    for i in range(n):
        toks = [str(rng.choice(others)) for _ in range(8)]
        if i % 2 == 0:
            toks[int(rng.integers(1, 8))] = str(rng.choice(names))
        acts = [1.0 if t in names else 0.0 for t in toks]
        contexts.append(Context(tokens=toks, activations=acts, source="top" if i % 2 == 0 else "random",
                                fires=max(acts) >= 0.5))
    return ScoringSet(threshold=0.5, contexts=contexts, forward_passes=0)


def test_known_perfect_and_known_useless_explanations():
    world = _names_world()
    reader = OfflineReader()
    good = "fires on names (e.g. 'Mary')"
    det, fuz = scorers.detection(reader, good, world), scorers.fuzzing(reader, good, world)
    assert det.value == 1.0 and fuz.value == 1.0 and det.n == 24 and fuz.n == 24  # 12 right + 12 random marks
    sim, _ = scorers.simulation(reader, good, world.contexts)
    assert sim.value == pytest.approx(1.0)
    zebra = "fires on the token 'zebra'"  # names nothing in the contexts: says 'no' to everything
    assert scorers.detection(reader, zebra, world).value == 0.5 and scorers.fuzzing(reader, zebra, world).value == 0.5
    # a reading unrelated to the firing ('red' occurs as often in firing as in silent contexts):
    # detection at chance, inside its interval. (Fuzzing would rank it below chance: the random
    # marks sometimes land on 'red', the right ones never do.)
    big = _names_world(seed=1, n=400)
    det = scorers.detection(reader, "fires on colors (e.g. 'red')", big)
    assert det.low <= 0.5 <= det.high and det.value == pytest.approx(0.5, abs=0.05) and det.n == 400
    # items: the right marks are the firing tokens; the random ones, as many non-firing tokens
    items = scorers.fuzz_items(world.contexts, 0.5)
    for right, wrong in zip(items[0::2], items[1::2]):
        hot = [i for i, a in enumerate(_acts(world, right.tokens)) if a >= 0.5]
        assert right.correct and right.marked == hot
        assert not wrong.correct and len(wrong.marked) == len(hot) and not set(wrong.marked) & set(hot)


def _acts(world, tokens):
    return next(c.activations for c in world.contexts if c.tokens == tokens)


def test_surface_tokens():
    assert {"store"} <= surface_tokens("fires on the token 'store' after 'the'")
    names = surface_tokens("fires on names (e.g. 'Mary'); attends to 'to'")
    assert V.NAMES[0] in names and "to" not in names
    assert "Paris" in surface_tokens("fires on Paris and other cities")


@pytest.mark.parametrize("cid", ["L0.N5", "L1.H2", "sae"])
def test_contexts_are_labelled_by_the_components_own_activations(setup, cid):  # noqa: F811
    e, ds, _, _ = setup
    if cid == "sae":  # the random SAE's most active latent
        cid = max((f"L1.resid.F{i}" for i in range(16)), key=lambda c: ds.stats(c).frac_active)
    top = ds.examples(cid, "top")
    # activation_of (one component) reproduces the dataset's stored activations (int8 x scale)
    ex = top[0]
    st = int(ds.a["top.start"][ds.column(cid)][0])
    doc = int(np.searchsorted(ds.doc_starts, st, side="right") - 1)
    ids = ds.a["tokens"][ds.doc_starts[doc]: st + len(ex.tokens)]
    got = activation_of(e, cid, __import__("torch").tensor(ids[None].astype(np.int64)))[0, -len(ex.tokens):]
    scale = float(ds.a["scale"][ds.column(cid)])
    assert got.tolist() == pytest.approx(ex.activations, abs=scale * 0.6 + 1e-6)
    text = f"fires on the token '{ex.tokens[ex.position].strip()}'"
    sset = draw_contexts(e, ds, cid, text, top[1::2], n_hard=4, n_negative=4)
    stats = ds.stats(cid)
    assert sset.threshold == pytest.approx(stats.mean + 0.4 * (stats.max - stats.mean))
    for c in sset.contexts:
        assert c.fires == (max(c.activations) >= sset.threshold) and len(c.tokens) == len(c.activations)
    fresh = [c for c in sset.contexts if c.source in ("hard_negative", "same_document", "similar_document")]
    assert fresh and not any(c.fires for c in fresh) and sset.forward_passes >= len(fresh)
    # negatives come from the activating windows' own documents, else from other documents
    firing_docs = {c.document for c in sset.contexts if c.fires}
    assert all(c.fires for c in sset.contexts if c.source in ("top", "quantile", "random"))
    for c in sset.contexts:
        if c.source == "same_document":
            assert c.document in firing_docs
        elif c.source == "similar_document":
            assert c.document not in firing_docs
    assert sum(c.source in ("same_document", "similar_document") for c in sset.contexts) == 4
    for c in (c for c in fresh if c.source == "hard_negative"):
        assert ex.tokens[ex.position].strip() in [t.strip() for t in c.tokens]
    plain = draw_contexts(e, ds, cid, text, top[1::2], n_hard=0, n_negative=2)  # no hard negatives asked
    assert not any(c.source == "hard_negative" for c in plain.contexts)


def _labels_for(body):
    """A reader that knows the truth: 'fires' when a context holds a name; marks fit when
    every marked token is a name."""
    prompt = body["messages"][-1]["content"]
    blocks = re.split(r"^Context \d+:\n", prompt, flags=re.M)[1:]
    if "Predict its activation" in prompt:
        toks = re.findall(r"^\d+\t(.*)$", prompt, flags=re.M)
        return text_response(json.dumps([10 if t in V.NAMES else 0 for t in toks]))
    out = []
    for b in blocks:
        lines = b.split("\n\n")[0].splitlines()
        if "<<" in prompt:
            marked = [t[2:-2] for t in lines if t.startswith("<<")]
            out.append(int(bool(marked) and all(t in V.NAMES for t in marked)))
        else:
            out.append(int(any(t in V.NAMES for t in lines)))
    return text_response(f"Here you go: {json.dumps(out)}")


def test_llm_reader_over_http_and_malformed_replies():
    world = _names_world(n=24)  # 24 contexts: 3 detection requests of 10, 10, 4
    with FakeOpenAI([_labels_for] * 200) as fake:
        model = LLMClient(ExplainerLLM(base_url=fake.url, model="fake-reader", api_key="k", max_retries=0))
        reader = LLMReader(model)
        det = scorers.detection(reader, "fires on names", world)
        assert det.value == 1.0 and det.calls == 3 and det.reader == "llm:fake-reader"
        assert "fires on names" in fake.requests[0]["messages"][-1]["content"]
        fuz = scorers.fuzzing(reader, "fires on names", world)
        assert fuz.value == 1.0 and fuz.calls == 3 and fuz.n == 24
        sim, sims = scorers.simulation(reader, "fires on names", world.contexts[:4])
        assert sim.value == pytest.approx(1.0) and sim.calls == 4 and sims[0] == [10.0 * a for a in
                                                                                   world.contexts[0].activations]
    with FakeOpenAI([text_response("I cannot tell."), text_response("[1, 0]")] * 5) as fake:
        reader = LLMReader(LLMClient(ExplainerLLM(base_url=fake.url, model="m", api_key="k", max_retries=0)))
        bad = scorers.detection(reader, "fires on names", world)
        assert bad.value is None and "malformed" in bad.note and bad.calls == 1  # stops at the first bad reply
    assert parse_labels("[1, 0, 1]", 3) == [True, False, True]
    assert parse_labels("[1, 0]", 3) is None and parse_labels("[1, 2, 0]", 3) is None
    assert parse_labels("no list here", 1) is None


def test_random_label_controls_pair_explanations_that_name_different_tokens():
    from evals.explanation_scores import control_pairs

    texts = ["fires on names (e.g. 'Mary')", "fires on names (e.g. 'John')", "fires on the token 'red'",
             "fires on the token 'blue'"]
    pairs = dict(control_pairs(texts))
    assert pairs == {0: 2, 1: 2, 2: 3, 3: 0}  # never a twin naming the same tokens (0 and 1: names)


def test_llm_rows_in_evals_score_all_three_with_counted_calls(setup, fake_llm):  # noqa: F811
    """The evals' LLM rows: explanations written and read by an OpenAI-compatible endpoint (a
    local fake server, the real `openai` client), detection, fuzzing and simulation with
    intervals, and reader calls per scorer that add up to the requests the server saw."""
    from evals.explanation_scores import ScoresEval, llm_rows, llm_sample, markdown
    from tests.test_explain import FakeLLM

    e, ds, _, _ = setup
    settings = ExplainerLLM(base_url=fake_llm, model="fake-model", api_key="k")
    done, failed = llm_sample(e, ds, 2, settings)
    results = [r for rs in done.values() for r in rs]
    assert len(results) == 6 and sum(failed.values()) == 0  # two heads, neurons and SAE latents
    assert all(r.writer == "llm:fake-model" and [s.reader for s in r.scores] == ["llm:fake-model"] * 3 for r in results)
    rows, costs = llm_rows(done, failed, "fake-model")
    summaries = {m.score: m for m in rows[0].summaries}
    assert list(summaries) == ["detection", "fuzzing", "simulation"]
    for m in summaries.values():
        assert m.n_components > 0 and m.median_low <= m.median <= m.median_high and m.median_examples > 0
    # the calls counted per scorer are the requests made: one explanation each, plus the readers'
    per = {c.scorer: c.reader_calls_per_explanation for c in costs}
    assert len(FakeLLM.prompts) == len(results) * (1 + sum(per.values()))
    sims = sum("Predict its activation" in p for p in FakeLLM.prompts)
    assert per["simulation"] * len(results) == sims == sum(r.scored_on["top"] + r.scored_on["random"] for r in results)
    assert all(c.reader == "llm:fake-model" for c in costs) and per["detection"] >= 1 and per["fuzzing"] >= 1
    md = "\n".join(markdown(ScoresEval(rows=rows, costs=costs, refused=0, at_chance_flagged=0)))
    assert "LLM (fake-model)" in md and "| llm:fake-model | detection |" in md
