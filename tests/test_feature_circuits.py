"""circuit_validate on circuits of transcoder features (circuits/features.py), checked
against an independent computation: the plain transformers model with hand-written forward
hooks on each block's MLP module that encode its input, swap the features and the error
term outside the circuit for their reference values and rebuild the MLP output."""

from __future__ import annotations

import re

import pytest
import torch

from tdb_agent import circuits as C
from tdb_agent.circuits.pairs import PromptPair
from tdb_agent.errors import TdbError
from tdb_agent.ops.runs import reference_documents
from tdb_agent.service.circuit_tools import circuit_store
from tdb_agent.service.graph_circuit import ToCircuitArgs, graph_to_circuit
from tdb_agent.service.graph_tools import GraphArgs, attribution_graph
from tdb_agent.service.tool import Job
from tdb_agent.workbench import Workbench
from tests.test_datasets import hand_encode
from tests.test_graph import attached, random_transcoders
from tests.test_server_tools import P

CORRUPTED = "When Mary and John went to the store , Mary gave a drink to"


def mlps(e):
    m = e.model
    return [b.mlp for b in (m.transformer.h if hasattr(m, "transformer") else m.model.layers)]


def parse_nodes(nodes):
    """{("f", l, i) or ("e", l): set of positions or None}, read from the ids' text."""
    keep = {}
    for n in nodes:
        m = re.fullmatch(r"L(\d+)\.tc\.F(\d+)(?:@(\d+))?", n) or re.fullmatch(r"L(\d+)\.MLP(?:@(\d+))?", n)
        if m is None:
            continue
        g = m.groups()
        unit, pos = (("f", int(g[0]), int(g[1])), g[2]) if ".tc." in n else (("e", int(g[0])), g[1])
        if pos is None or keep.get(unit, set()) is None:
            keep[unit] = None
        else:
            keep.setdefault(unit, set()).add(int(pos))
    return keep


class HandSplice:
    """The transcoders spliced by forward hooks on the HF MLP modules: out -> sum of (kept or
    reference) feature writes + b_dec + x W_skip + (kept or reference) error."""

    def __init__(self, e, tcs):
        self.e, self.tcs = e, tcs

    @torch.no_grad()
    def run(self, ids, keep=None, ref=None):
        """(logits [s, V], features {l: [s, d_tc]}, errors {l: [s, d]}); keep=None: nothing ablated."""
        feats, new_feats, errs = {}, {}, {}
        s = ids.shape[1]

        def hook(l):
            def fn(mod, args, out):
                x = args[0][0].float()
                tc = self.tcs.layers[l]
                f = hand_encode(x, tc.W_enc, tc.b_enc, tc.k)
                feats[l] = f
                nf = f
                if keep is not None:
                    km = torch.zeros_like(f, dtype=torch.bool)
                    for (kind, *rest), pos in keep.items():
                        if kind == "f" and rest[0] == l:
                            km[sorted(pos) if pos is not None else slice(None), rest[1]] = True
                    nf = torch.where(km, f, ref["f"][l])
                new_feats[l] = nf
                old = sum(feats[w] @ self.tcs.layers[w].W_dec[:, l - w] for w in feats if w + self.tcs.layers[w].n_out > l)
                new = sum(new_feats[w] @ self.tcs.layers[w].W_dec[:, l - w] for w in new_feats
                          if w + self.tcs.layers[w].n_out > l)
                rest_ = tc.b_dec + (x @ tc.W_skip if tc.W_skip is not None else 0)
                err = out[0].float() - (old + rest_)
                errs[l] = err
                if keep is None:
                    return None
                ke = torch.zeros(s, dtype=torch.bool)
                pos = keep.get(("e", l), set())
                ke[sorted(pos) if pos is not None else slice(None)] = True
                return (new + rest_ + torch.where(ke[:, None], err, ref["e"][l]))[None].to(out.dtype)
            return fn

        handles = [m.register_forward_hook(hook(l)) for l, m in enumerate(mlps(self.e))]
        try:
            logits = self.e.model(ids).logits[0].float()
        finally:
            for h in handles:
                h.remove()
        return logits, feats, errs

    def means(self):
        tf, te, n = {}, {}, 0
        for text in reference_documents(self.e):
            ids = self.e.to_tokens(text, truncate=True)
            _, f, er = self.run(ids)
            for d, src in ((tf, f), (te, er)):
                for l, v in src.items():
                    d[l] = d.get(l, 0) + v.double().sum(0)
            n += ids.shape[1]
        return {"f": {l: (v / n).float() for l, v in tf.items()}, "e": {l: (v / n).float() for l, v in te.items()}}


def metric(e, logits, pair):
    return float(logits[-1, e.token_id(pair.target)] - logits[-1, e.token_id(pair.distractor)])


def hand_faithfulness(e, tcs, nodes, pairs, mode):
    """(m(full), m(empty), m(circuit), faithfulness), each m averaged over the pairs."""
    hs = HandSplice(e, tcs)
    ref = hs.means() if mode == "mean" else None
    keep = parse_nodes(nodes)
    ms = []
    for which in ({("f", l, i): None for l, tc in tcs.layers.items() for i in range(tc.d_tc)} |
                  {("e", l): None for l in tcs.layers}, {}, keep):
        vals = []
        for p in pairs:
            r = ref
            if mode == "resample":
                _, f, er = hs.run(e.to_tokens(p.corrupted_prompt))
                r = {"f": f, "e": er}
            vals.append(metric(e, hs.run(e.to_tokens(p.prompt), which, r)[0], p))
        ms.append(sum(vals) / len(vals))
    full, empty, circ = ms
    return full, empty, circ, (circ - empty) / (full - empty)


@pytest.mark.parametrize("family,kind", [("gpt2", "plt"), ("llama", "clt")])
def test_graph_circuit_validates_like_the_hand_splice(tiny_engines, tmp_path, family, kind):
    e = tiny_engines[family]
    tcs = random_transcoders(e, n=12, cross_layer=kind == "clt", seed=2)
    tcs.layers[1].k = 5  # TopK in one layer
    bench = Workbench(e, workspace=tmp_path)
    with attached(e, tcs):
        attribution_graph(bench, GraphArgs(prompt=P, target="Mary", distractor="John", name="g",
                                           node_threshold=0.7), Job())
        graph_to_circuit(bench, ToCircuitArgs(name="g", circuit="c"), Job())
        circ = circuit_store(bench).get("c")
        nodes = C.components(circ)
        assert any(".tc.F" in n for n in nodes) and any(".MLP@" in n for n in nodes), nodes
        v = C.validate(e, circ, mode="mean", necessity=True, record=False)
        pairs = C.behaviour(circ).resolve()
        full, empty, got, f = hand_faithfulness(e, tcs, nodes, pairs, "mean")
        plain = metric(e, e.model(e.to_tokens(P)).logits[0].float(), pairs[0])
        # the one removed node of the largest necessity, by hand too
        top = v.necessity[0]
        *_, f_without = hand_faithfulness(e, tcs, [n for n in nodes if n != top.id], pairs, "mean")
    assert v.metric_full == pytest.approx(plain, abs=1e-4)  # nothing ablated: the model itself
    assert v.metric_full == pytest.approx(full, abs=1e-4)
    assert v.metric_empty == pytest.approx(empty, abs=1e-4) and abs(full - empty) > 1e-3
    assert v.metric_circuit == pytest.approx(got, abs=1e-4)
    assert v.faithfulness == pytest.approx(f, abs=1e-4)
    assert top.faithfulness_without == pytest.approx(f_without, abs=1e-4)
    assert "transcoder feature" in v.universe and v.n_universe == 12 * e.spec.n_layers + e.spec.n_layers


def test_resample_validation_of_a_pinned_feature_circuit(tiny_engines):
    e = tiny_engines["gpt2"]
    tcs = random_transcoders(e, n=12, seed=7)
    pairs = [PromptPair(prompt=P, corrupted_prompt=CORRUPTED, target="Mary", distractor="John")]
    circ = C.new_circuit("r", behaviour=C.Behaviour(pairs=pairs), metric="logit_diff")
    n = e.to_tokens(P).shape[1]
    nodes = ["EMB", "L0.tc.F3", f"L0.tc.F5@{n - 1}", f"L1.tc.F2@{n - 3}", f"L1.MLP@{n - 1}", "L0.MLP@4"]
    with attached(e, tcs):
        for node in nodes:
            C.add_node(circ, node, engine=e)
        v = C.validate(e, circ, mode="resample", necessity=False, record=False)
    full, empty, got, f = hand_faithfulness(e, tcs, nodes, pairs, "resample")
    assert v.metric_full == pytest.approx(full, abs=1e-4) and v.metric_empty == pytest.approx(empty, abs=1e-4)
    assert v.metric_circuit == pytest.approx(got, abs=1e-4) and v.faithfulness == pytest.approx(f, abs=1e-4)
    assert v.n_kept == 5  # 3 features and 2 error terms


def test_feature_circuits_refuse_what_they_cannot_ablate(tiny_engines):
    e = tiny_engines["gpt2"]
    pairs = [PromptPair(prompt=P, target="Mary", distractor="John")]
    with attached(e, random_transcoders(e, n=12, seed=1)):
        for extra, msg in (("L1.H2", "cannot also hold heads"), ("L0.tc.F99", "out of range|0..11")):
            circ = C.new_circuit("x", behaviour=C.Behaviour(pairs=pairs), metric="logit_diff")
            circ.add_node("L0.tc.F1")
            circ.add_node(extra)
            with pytest.raises(TdbError, match=msg):
                C.validate(e, circ, necessity=False, record=False)
    circ = C.new_circuit("y", behaviour=C.Behaviour(pairs=pairs), metric="logit_diff")
    circ.add_node("L0.tc.F1")
    with attached(e, None), pytest.raises(TdbError, match="transcoders loaded"):
        C.validate(e, circ, necessity=False, record=False)
