"""Faithfulness of feature circuits: circuits whose nodes are transcoder features
(`L{l}.tc.F{i}[@t]`, e.g. from graph_to_circuit), ablated feature by feature in the model
with its transcoders spliced.

The universe of a feature circuit is the attribution graph's node set: every transcoder
feature and every MLP error term (the MLP output minus the transcoder's reconstruction
f·W_dec + b_dec + skip(x)), per position. In a feature circuit `L{l}.MLP[@t]` names that
error term (graph_to_circuit's "transcoder error" nodes). Attention, the transcoders' skip
terms and output biases, and MLPs without a transcoder are the graph's linear paths, not its
nodes: they run live, never ablated. Ablating a feature sets it to its reference mean (over
the reference corpus's tokens) or to its value on the pair's corrupted prompt (resample),
and its decoder rows carry the change to every MLP output it writes; ablating an error term
sets it likewise. With every unit ablated each MLP output is its mean (resample: its
corrupted value) plus the skip term's response, and with none ablated the model is
unchanged (the splice keeps the error). Faithfulness is §4's ratio over these.

Units of a keep-set: ("tcf", l, i) a feature (i None: all of layer l), ("tcerr", l) an error
term; each kept at a set of positions (None: all), as in circuits/universe.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tdb_agent.circuits.evaluate import Evaluator, _Group
from tdb_agent.circuits.universe import KeepSet, _merge, _positions_index
from tdb_agent.components import parse_component
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.ops.runs import RunCache, reference_documents

UNIVERSE = ("every transcoder feature and every MLP error term (output minus the transcoder's reconstruction), "
            "per position; attention, skip terms, biases and MLPs without a transcoder run live")


def is_feature_circuit(nodes: Iterable[str]) -> bool:
    return any(parse_component(n).kind == "transcoder" for n in nodes)


def _tcs(engine: Engine):
    if getattr(engine, "transcoders", None) is None:
        raise TdbError("a circuit of transcoder features needs the transcoders loaded (tdb-agent serve "
                       "--transcoders PATH)")
    return engine.transcoders


def feature_keep_set(nodes: Iterable[str], engine: Engine) -> KeepSet:
    """The units a feature circuit keeps (EMB and LOGITS keep nothing: never ablated)."""
    tcs = _tcs(engine)
    sizes = {(l, "tc"): n for l, n in tcs.sizes().items()}
    keep: KeepSet = {}
    for node in nodes:
        c = parse_component(node, engine.spec, sae_sizes=sizes)
        if c.kind == "transcoder":
            _merge(keep, ("tcf", c.layer, c.index), c.position)
        elif c.kind == "mlp":
            if c.layer not in tcs.layers:
                raise TdbError(f"{c.id}: in a feature circuit an MLP node is its transcoder's error term, and no "
                               f"transcoder reads layer {c.layer}")
            _merge(keep, ("tcerr", c.layer), c.position)
        elif c.kind not in ("emb", "logits"):
            raise TdbError(f"{c.id}: a circuit of transcoder features is validated over features and MLP error "
                           "terms (attention runs live); it cannot also hold heads, neurons, attention blocks or "
                           "SAE latents: keep them in a separate circuit")
    return keep


def universe_units(engine: Engine) -> int:
    tcs = _tcs(engine)
    return sum(tc.d_tc for tc in tcs.layers.values()) + len(tcs.layers)


class FeatureEvaluator(Evaluator):
    """Evaluator (circuits/evaluate.py) over the feature universe; same pairs, metric,
    batching and faithfulness. Whole passes: a cross-layer transcoder reads one block and
    writes later ones, so its splice spans the blocks."""

    layerwise = False

    def __init__(self, engine: Engine, *args, **kwargs):
        self.tcs = _tcs(engine)
        super().__init__(engine, *args, **kwargs)

    def full_set(self) -> KeepSet:
        return {u: None for l in self.tcs.layers for u in (("tcf", l, None), ("tcerr", l))}

    @torch.no_grad()
    def _run(self, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Features {l: [b, s, d_tc]} and error terms {o: [b, s, d_model]} of a clean run."""
        feats, errs = {}, {}
        self.engine.forward(ids, hooks=self._splice(None, feats, errs), logit_positions=[-1], logit_ids=[0])
        return feats, errs

    def _reference_values(self, cache: RunCache | None) -> dict:
        total_f: dict[int, torch.Tensor] = {}
        total_e: dict[int, torch.Tensor] = {}
        count = 0
        for text in reference_documents(self.engine):
            ids = self.engine.to_tokens(text, truncate=True)
            f, e = self._run(ids)
            for d, src in ((total_f, f), (total_e, e)):
                for l, v in src.items():
                    d[l] = d[l] + v[0].double().sum(0) if l in d else v[0].double().sum(0)
            count += ids.shape[1]
        return {"f": {l: (v / count).float() for l, v in total_f.items()},
                "e": {l: (v / count).float() for l, v in total_e.items()}}

    def _source(self, cids: torch.Tensor, shared: int = 0) -> tuple[dict, None]:
        f, e = self._run(cids)  # whole passes (not layerwise): shared is 0
        return {"f": f, "e": e}, None

    def _hooks(self, g: _Group, ks: list[KeepSet], js: torch.Tensor, s: int, post_layers: set[int],
               layers: list[int] | None = None) -> dict:
        dev = self.engine.device
        b = len(ks)
        fkeep = {l: torch.zeros(b, s, tc.d_tc, dtype=torch.bool) for l, tc in self.tcs.layers.items()}
        ekeep = {l: torch.zeros(b, s, dtype=torch.bool) for l in self.tcs.layers}
        for r, keep in enumerate(ks):
            for unit, pos in keep.items():
                p = _positions_index(pos)
                if unit[0] == "tcerr":
                    ekeep[unit[1]][r, p] = True
                elif unit[2] is None:
                    fkeep[unit[1]][r, p] = True
                else:
                    fkeep[unit[1]][r, p, unit[2]] = True
        if self.mode == "mean":
            ref = {k: {l: v[None, None] for l, v in self._means[k].items()} for k in ("f", "e")}
        else:
            jd = js.to(dev)
            ref = {k: {l: v[jd] for l, v in g.source[k].items()} for k in ("f", "e")}
        plan = {"fkeep": {l: m.to(dev) for l, m in fkeep.items()}, "ekeep": {l: m.to(dev) for l, m in ekeep.items()},
                "ref": ref}
        return self._splice(plan)

    def _splice(self, plan: dict | None, feats: dict | None = None, errs: dict | None = None) -> dict:
        """Hooks that encode each transcoder's input, set the features outside plan's keep
        masks to their reference values, and rewrite each MLP output as the spliced
        reconstruction plus its error term (the reference error outside the keep mask).
        Without a plan, they only record the features and errors (into feats / errs)."""
        tcs = self.tcs
        state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        hooks: dict[str, list] = {}
        for l, tc in tcs.layers.items():
            def read(x, _site, l=l, tc=tc):
                f = tc.encode(x)
                new = f if plan is None else torch.where(plan["fkeep"][l], f, plan["ref"]["f"][l].to(f.dtype))
                state[l] = (x, f, new)
                if feats is not None:
                    feats[l] = f
                return None
            hooks.setdefault(tcs.read_hook(l), []).append(read)
        for o in sorted({o for l, tc in tcs.layers.items() for o in range(l, l + tc.n_out)}):
            def write(out, _site, o=o):
                recon = torch.zeros((), dtype=torch.float32, device=out.device)
                new_recon = recon
                for tc in tcs.writers(o):
                    _, f, new = state[tc.layer]
                    recon = recon + f.float() @ tc.W_dec[:, o - tc.layer].float()
                    new_recon = new_recon + new.float() @ tc.W_dec[:, o - tc.layer].float()
                if o in tcs.layers:  # this layer's own output bias and skip term
                    x, _, _ = state[o]
                    rest = tcs.layers[o].b_dec.float()
                    sk = tcs.layers[o].skip(x)
                    rest = rest + (sk.float() if sk is not None else 0)
                    recon, new_recon = recon + rest, new_recon + rest
                err = out.float() - recon
                if errs is not None:
                    errs[o] = err
                if plan is None:
                    return None
                delta = new_recon - recon  # exactly 0 where every feature is kept
                keep = plan["ekeep"].get(o)
                if keep is not None:
                    delta = delta + torch.where(keep[..., None], torch.zeros((), device=out.device),
                                                plan["ref"]["e"][o] - err)
                return out + delta.to(out.dtype)
            hooks.setdefault(f"blocks.{o}.hook_mlp_out", []).append(write)
        return hooks
