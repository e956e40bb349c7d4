"""The scripted planner: circuit discovery with no LLM, over the same MCP tools.

A fixed, systematic procedure that an LLM agent is compared with:

1. behaviour: predict on the first prompt pair (is there anything to explain?);
2. candidates: heads and MLP blocks ranked by direct effect, by act x grad against the
   corrupted prompt (attribution patching), and by single-component resample ablation;
3. redundancy: ablate the top act x grad heads, and each layer's heads, *together*; when a
   group's effect is much larger than the sum of its single ablations (backup heads), find
   the members that each restore it when left alone, keep them and protect them from pruning;
4. structure: trace upstream from the strongest heads through q, k and v, adding the
   upstream heads with strong edges;
5. the graph: every node and edge with the measurement that put it there;
6. check: validate faithfulness over several prompt pairs, grow the circuit by rank while
   it is below the threshold, then prune to the smallest set that stays above it; report the
   faithfulness under the other ablation mode beside it. With `modes=("mean", "resample")`
   the threshold must hold under both ablations while growing and pruning (a circuit chosen
   under one can fall apart under the other);
7. edges: score every edge of the model's edge graph with EAP-IG (corrupted reference, over
   the task's pairs), keep the fewest that reach the threshold as an edge circuit, measure
   its faithfulness curve (CPR, CMD), and state the edges between the circuit's components
   with those measurements (`edge_step`); a family the edge methods refuse gets a note;
8. explain: attach each kept head's or neuron's explanation (with its detection, fuzzing and
   simulation scores, and its note when they are at chance);
9. features (with `graph=True`): an attribution graph of the analysed prompt, its top
   features checked by intervention before the feature circuit is claimed (`graph_step`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from tdb_agent.agent.edge_step import EdgeFindings, edge_step
from tdb_agent.agent.graph_step import GraphFindings, graph_step
from tdb_agent.agent.toolbox import Toolbox, ToolCallFailed
from tdb_agent.circuits.evaluate import AblationMode


class DiscoveryResult(BaseModel):
    circuit: str
    nodes: list[str]
    faithfulness: float | None
    faithfulness_other: dict[str, float] = {}  # under the other ablation mode, reported beside the claim
    faithfulness_heldout: float | None = None  # on pairs of the task that pruning never saw
    faithfulness_heldout_other: dict[str, float] = {}  # held out, under the other required modes
    modes: list[str] = ["mean"]  # the ablations the threshold had to hold under; the first is the claim's
    edges: EdgeFindings | None = None  # the edge-level measurement (None: the edge tools refused or are absent)
    features: GraphFindings | None = None  # the feature-level circuit and its check (graph=True)
    tool_calls: int
    rejected: list[str]
    notes: list[str]


async def _explain(tb: Toolbox, circuit: str, nodes: list[str], notes: list[str]) -> None:
    """Attach an explanation (with its scores, and its note when they are at chance or a
    fallback was taken) to every kept head or neuron that the
    server's activation dataset covers; MLP blocks have none."""
    if not await tb.has("explain_component"):
        notes.append("no explain_component tool on this server: nodes left unexplained")
        return
    for node in nodes:
        if ".H" not in node and ".N" not in node and ".F" not in node:
            continue
        try:
            ex = await tb("explain_component", component=node, method="auto")
        except ToolCallFailed as e:
            notes.append(f"no explanation for {node}: {e}")
            continue
        scores = [f"{s['name']} {s['value']:.2f}" for s in ex.get("scores", []) if s.get("value") is not None]
        text = f"{ex['explanation']} ({', '.join(scores) if scores else 'simulation score %.2f' % ex['score']})"
        if ex.get("note"):  # at chance, or a fallback: the node says so
            text += f" [{ex['note']}]"
        await tb("circuit_add", name=circuit, nodes=[{"id": node, "explanation": text, "evidence": [
            {"tool": "explain_component", "args": {"method": ex.get("method", "auto")}, "value": ex["score"]}]}])


def _score_table(*rankings: list[tuple[str, float]]) -> dict[str, float]:
    """Combine rankings: each component's best |effect| relative to the top of each ranking."""
    scores: dict[str, float] = {}
    for rows in rankings:
        top = max((abs(v) for _, v in rows), default=0.0) or 1.0
        for cid, v in rows:
            scores[cid] = max(scores.get(cid, 0.0), abs(v) / top)
    return scores


#: a group is redundant when its joint ablation moves the metric by more than this many times
#: the sum of its members' single ablations, and by at least GROUP_MATTERS of the clean metric
SUPERADDITIVE = 1.5
GROUP_MATTERS = 0.2
#: the task pairs (seed) the final claim is also checked on; the circuit is built on seed 0
HELDOUT_SEED = 1
#: a member "carries" a redundant group when, left alone in it, it restores this much of it
CARRIES = 0.3


async def _redundant_groups(tb: Toolbox, ex: dict, total: dict[str, float], single: dict[str, float],
                            clean: float, n_layers: int, n_heads: int,
                            notes: list[str]) -> dict[str, list[dict]]:
    """Backup heads: single ablations miss a job that several heads each do alone.

    Candidate groups are the top act x grad heads and every layer's heads. A group is
    redundant when ablating it together matters (GROUP_MATTERS) and far more than its
    single ablations add up to (SUPERADDITIVE). Its carriers are found by leaving one member
    in (the rest ablated): a member that restores CARRIES of the group's effect does the job
    alone. Returns the carriers to keep, each with its evidence."""
    P, C, T, D = ex["prompt"], ex["corrupted_prompt"], ex["target"], ex["distractor"]
    top = [cid for cid, _ in sorted(total.items(), key=lambda kv: -abs(kv[1])) if ".H" in cid][:6]
    candidates = [("top act x grad heads", top)] + [
        (f"layer {layer} heads", [f"L{layer}.H{h}" for h in range(n_heads)]) for layer in range(n_layers)]
    found: dict[str, list[dict]] = {}
    for label, members in candidates:
        if len(members) < 2:
            continue
        group = await tb("ablate", prompt=P, components=members, target=T, distractor=D, mode="resample",
                         corrupted_prompt=C)
        singles = sum(abs(single.get(h, 0.0)) for h in members)
        joint = group["delta"]
        if joint == 0 or abs(joint) <= SUPERADDITIVE * singles or abs(joint) < GROUP_MATTERS * abs(clean):
            continue
        ev = [{"tool": "ablate", "args": {"components": members, "mode": "resample"}, "value": round(joint, 4)}]
        restored: dict[str, float] = {}
        for h in members:
            rest = [m for m in members if m != h]
            r = await tb("ablate", prompt=P, components=rest, target=T, distractor=D, mode="resample",
                         corrupted_prompt=C)
            restored[h] = 1.0 - r["delta"] / joint
        carriers = [h for h in members if restored[h] >= CARRIES]
        if not carriers and label.startswith("top"):
            carriers = list(members)  # no member does it alone: the top heads are kept together
        notes.append(f"redundancy ({label}): ablating {members} together changes the metric by {joint:.3f}, "
                     f"their single ablations by {singles:.3f} in total; left alone in the group, each restores "
                     + ", ".join(f"{h} {restored[h]:.2f}" for h in members)
                     + (f": kept {carriers} (protected from pruning)" if carriers else ": no single member restores it"))
        for h in carriers:
            found.setdefault(h, []).extend(ev + [{"tool": "ablate", "args": {
                "components": [m for m in members if m != h], "mode": "resample", "left_in": h},
                "value": round(restored[h], 4)}])
    return found


async def discover(tb: Toolbox, task: str | None, pairs: list[dict], circuit: str, *,
                   threshold: float = 0.8, max_nodes: int = 15, n_validate: int = 32,
                   mode: AblationMode = "mean", modes: Sequence[AblationMode] | None = None,
                   graph: bool = False) -> DiscoveryResult:
    """Run the procedure; `pairs` are prompt pairs (dicts with prompt, corrupted_prompt, target,
    distractor), the first of which the analysis runs on; validation uses the task's
    `n_validate` pairs (or `pairs` when there is no task). `modes` (default: just `mode`) are
    the ablations the circuit must reach the threshold under, growing and pruning; the first
    is the primary one its recorded validation uses. `graph`: also step 9 (the feature circuit)."""
    run = _Discovery(tb, task, pairs, circuit, threshold, max_nodes, n_validate, list(dict.fromkeys(modes or [mode])))
    await run.behaviour()
    await run.candidates()
    await run.redundancy()
    await run.structure()
    faithfulness = await run.grow()
    pruned_by_mode = await run.prune(faithfulness)
    faithfulness_other = await run.other_modes(pruned_by_mode)
    heldout, heldout_other = await run.heldout()
    result = await run.finish(faithfulness_other, heldout, heldout_other)
    if graph:
        result.features = await graph_step(tb, run.ex, circuit, result.notes)
        result.tool_calls = tb.calls
    return result


class _Discovery:
    """One run of the procedure, step by step (the numbered steps of the module docstring);
    each step reads what the earlier ones measured. Every order it produces is deterministic
    (no set order): ranks break ties in the order the tools reported the rows, and each
    `circuit_add`'s edges are sorted, so a resumed run (`--resume`) asks the same questions in
    the same order as the run it continues, whatever the process's hash seed."""

    def __init__(self, tb: Toolbox, task: str | None, pairs: list[dict], circuit: str, threshold: float,
                 max_nodes: int, n_validate: int, modes: list[AblationMode]):
        self.tb, self.task, self.pairs, self.circuit = tb, task, pairs, circuit
        self.threshold, self.max_nodes, self.n_validate = threshold, max_nodes, n_validate
        self.modes, self.mode = modes, modes[0]
        self.notes: list[str] = []
        self.rejected: list[str] = []
        self.ex = pairs[0]
        self.direct: dict[str, float] = {}  # direct effect into the logits
        self.total: dict[str, float] = {}  # act x grad against the corrupted prompt
        self.single: dict[str, float] = {}  # single-component resample ablation
        self.scores: dict[str, float] = {}
        self.group_evidence: dict[str, list[dict]] = {}
        self.protected: list[str] = []
        self.edges: list[dict] = []  # traced upstream edges, one per pair of nodes
        self.kept: list[str] = []
        self.added: set[tuple[str, str]] = set()  # (source, target) of the edges added (membership only)

    def _ask(self) -> dict:
        """The analysed pair's prompt arguments."""
        ex = self.ex
        return {"prompt": ex["prompt"], "target": ex["target"], "distractor": ex["distractor"]}

    # 1. behaviour
    async def behaviour(self) -> None:
        self.pred = await self.tb("predict", **self._ask(), top_k=5)
        m = self.pred["metric"]
        self.notes.append(f"clean metric {m['name']} = {m['value']:.3f}, p(target) = {m['target_prob']:.3f}")

    # 2. candidates
    async def candidates(self) -> None:
        tb, C = self.tb, self.ex["corrupted_prompt"]
        de = await tb("attribute", **self._ask(), kinds=["head", "mlp"], top_k=16)
        axg = await tb("attribute", **self._ask(), method="act_times_grad", corrupted_prompt=C,
                       kinds=["head", "mlp"], top_k=16)
        sweep_h = await tb("ablation_sweep", prompt=self.ex["prompt"], kind="head", target=self.ex["target"],
                           distractor=self.ex["distractor"], mode="resample", corrupted_prompt=C, top_k=16)
        sweep_m = await tb("ablation_sweep", prompt=self.ex["prompt"], kind="mlp", target=self.ex["target"],
                           distractor=self.ex["distractor"], mode="resample", corrupted_prompt=C, top_k=16)
        self.direct = {r["id"]: r["effect"] for r in de["rows"]}
        self.total = {r["id"]: r["effect"] for r in axg["rows"]}
        self.single = {r["id"]: r["delta"] for r in sweep_h["rows"] + sweep_m["rows"]}
        self.scores = _score_table(list(self.direct.items()), list(self.total.items()), list(self.single.items()))

    # 3. redundancy: groups that matter far more together than their single ablations add up to
    async def redundancy(self) -> None:
        info = await self.tb("model_info")
        self.group_evidence = await _redundant_groups(self.tb, self.ex, self.total, self.single,
                                                      self.pred["metric"]["value"], info["spec"]["n_layers"],
                                                      info["spec"]["n_heads"], self.notes)
        self.protected = list(self.group_evidence)  # backups: kept, and never pruned away
        for h in self.protected:
            self.scores[h] = max(self.scores.get(h, 0.0), 0.5)

    # 4. structure: trace the strongest heads' attention and values upstream; one edge per pair
    # of nodes (the strongest of its q/k/v traces), the others kept as evidence
    async def structure(self) -> None:
        traced: dict[tuple[str, str], dict] = {}
        for head in [cid for cid in self._ranked() if ".H" in cid][:3]:
            for via in ("q", "k", "v"):
                tr = await self.tb("trace_upstream", prompt=self.ex["prompt"], component=head, via=via,
                                   target=self.ex["target"] if via == "v" else None,
                                   distractor=self.ex["distractor"] if via == "v" else None, top_k=8)
                self._keep_traced(traced, head, via, tr["edges"])
        self.edges = list(traced.values())

    def _keep_traced(self, traced: dict[tuple[str, str], dict], head: str, via: str, found: list[dict]) -> None:
        """Fold one trace's strong upstream head edges into `traced` (strongest weight wins)."""
        top_w = max((abs(e["weight"]) for e in found), default=0.0) or 1.0
        for e in found:
            src = e["source"].split("@")[0]
            if ".H" not in src or abs(e["weight"]) < 0.3 * top_w:
                continue
            ev = {"tool": "trace_upstream", "args": {"component": head, "via": via, "source": e["source"]},
                  "value": round(e["weight"], 4)}
            key = (src, head)
            if key not in traced or abs(e["weight"]) > abs(traced[key]["weight"]):
                traced[key] = {"source": src, "target": head, "weight": e["weight"], "via": via,
                               "evidence": (traced.get(key, {}).get("evidence", [])) + [ev]}
            else:
                traced[key]["evidence"].append(ev)
            self.scores[src] = max(self.scores.get(src, 0.0), 0.3)

    def _ranked(self) -> list[str]:
        """Candidates by score, best first (ties: in the order they were scored)."""
        return [cid for cid, _ in sorted(self.scores.items(), key=lambda kv: -kv[1])]

    # 5. the graph: create it, add the first candidates with their evidence, then grow
    def _node(self, cid: str) -> dict:
        direct, total, single = self.direct, self.total, self.single
        ev = []
        if cid in direct:
            ev.append({"tool": "attribute", "args": {"method": "direct_effect"}, "value": round(direct[cid], 4)})
        if cid in total:
            ev.append({"tool": "attribute", "args": {"method": "act_times_grad", "reference": "corrupted"},
                       "value": round(total[cid], 4)})
        if cid in single:
            ev.append({"tool": "ablation_sweep", "args": {"mode": "resample"}, "value": round(single[cid], 4)})
        ev += self.group_evidence.get(cid, [])
        role = "writes to the logits" if abs(direct.get(cid, 0.0)) >= 0.3 * max(
            (abs(v) for v in direct.values()), default=1.0) else "upstream"
        effect = total.get(cid, direct.get(cid, single.get(cid)))
        return {"id": cid, "role": role, "effect": effect, "evidence": ev}

    def _new_edges(self) -> list[dict]:
        """Edges among the kept nodes not added yet: direct effects into LOGITS and traced
        edges, sorted by (source, target)."""
        kept = set(self.kept)
        out = [{"source": cid, "target": "LOGITS", "weight": self.direct[cid], "via": "direct",
                "evidence": [{"tool": "attribute", "args": {"method": "direct_effect"}, "value": self.direct[cid]}]}
               for cid in self.kept if cid in self.direct]
        out += [e for e in self.edges if e["source"] in kept and e["target"] in kept]
        out = sorted((e for e in out if (e["source"], e["target"]) not in self.added),
                     key=lambda e: (e["source"], e["target"]))
        self.added.update((e["source"], e["target"]) for e in out)
        return out

    async def _validate(self, among: Sequence[str] | None = None, **kw) -> dict[str, float]:
        """Faithfulness under each of `among` (default: the required modes)."""
        return {m: (await self.tb("circuit_validate", name=self.circuit, mode=m, necessity=False, **kw))["faithfulness"]
                for m in (self.modes if among is None else among)}

    async def grow(self) -> float | None:
        """Grow in two steps (the top max_nodes + 1 candidates, then every candidate),
        validating once per step: validation is the expensive call. Returns the faithfulness
        (the minimum over the required modes) of the last step."""
        task, pairs = self.task, self.pairs
        await self.tb("circuit_create", name=self.circuit, task=task, n_pairs=self.n_validate if task else None,
                      pairs=None if task else pairs, overwrite=True,
                      description=f"scripted planner; behaviour: {task or 'given prompt pairs'}")
        ranked = self._ranked()
        faithfulness = None
        for size in dict.fromkeys((min(self.max_nodes + 1, len(ranked)), len(ranked))):
            batch = ranked[len(self.kept):size]
            self.kept += batch
            await self.tb("circuit_add", name=self.circuit, nodes=[self._node(c) for c in batch],
                          edges=self._new_edges())
            fs = await self._validate()
            faithfulness = min(fs.values())
            self.notes.append(f"{len(self.kept)} nodes: faithfulness {_show(fs)}")
            if faithfulness >= self.threshold:
                break
        return faithfulness

    # 6. check: prune to the smallest set above the threshold, then the other modes, held-out pairs
    async def prune(self, faithfulness: float | None) -> dict[str, float]:
        """Prune when the threshold was reached; returns pruning's faithfulness by mode."""
        modes, threshold, kept = self.modes, self.threshold, self.kept
        if faithfulness is None or faithfulness < threshold:
            self.notes.append(f"faithfulness stayed below {threshold} with every candidate ({len(kept)} nodes"
                              + (f"; under each of {modes}" if len(modes) > 1 else "") + ")")
            return {}
        both = {"modes": modes} if len(modes) > 1 else {}  # single mode: the call as before
        pr = await self.tb("circuit_prune", name=self.circuit, threshold=threshold, mode=self.mode, into=self.circuit,
                           protect=[h for h in self.protected if h in kept], **both)
        removed = [n for n in kept if n not in pr.get("kept", kept)]
        self.rejected += removed
        if removed:
            self.notes.append(f"pruning removed {removed}" + (f" (faithfulness >= {threshold} under each of {modes})"
                                                              if both else ""))
        return pr.get("faithfulness_by_mode") or {}

    async def other_modes(self, pruned_by_mode: dict[str, float]) -> dict[str, float]:
        """The other ablation, reported beside the claim: a circuit pruned under one ablation
        can fall apart under the other (evals/RESULTS.md shows it on the bundled tasks)."""
        modes, mode, threshold = self.modes, self.mode, self.threshold
        if len(modes) > 1:  # pruning measured every required mode on the kept nodes already
            other = ({m: pruned_by_mode[m] for m in modes[1:]} if set(modes) <= set(pruned_by_mode)
                     else await self._validate(modes[1:]))
            self.notes.append("the circuit under the other required ablation: faithfulness " + _show(other))
            return other
        other_mode = "resample" if mode == "mean" else "mean"
        try:
            f_other = (await self.tb("circuit_validate", name=self.circuit, mode=other_mode,
                                     necessity=False))["faithfulness"]
        except ToolCallFailed as e:
            self.notes.append(f"no {other_mode}-ablation check: {e}")
            return {}
        self.notes.append(f"the same circuit under {other_mode} ablation: faithfulness {f_other:.3f}"
                          + ("" if f_other >= threshold else
                             f" (below {threshold}: the claim holds under {mode} ablation only)"))
        return {other_mode: f_other}

    async def heldout(self) -> tuple[float | None, dict[str, float]]:
        """Pruning chose nodes on the task's pairs: the claim is also checked on pairs it never saw."""
        if not self.task:
            return None, {}
        held = await self._validate(heldout_seed=HELDOUT_SEED)
        self.notes.append(f"held-out pairs (seed {HELDOUT_SEED}, {self.n_validate} pairs): faithfulness {_show(held)}")
        return held[self.mode], {m: f for m, f in held.items() if m != self.mode}

    # 7. edges, 8. explain, and the result
    async def finish(self, faithfulness_other: dict[str, float], heldout: float | None,
                     heldout_other: dict[str, float]) -> DiscoveryResult:
        final = await self.tb("circuit_validate", name=self.circuit, mode=self.mode, necessity=True)
        nodes = list(final["nodes"])
        edges = await edge_step(self.tb, self.task, self.pairs, self.circuit, nodes, self.threshold, self.notes)
        await _explain(self.tb, self.circuit, nodes, self.notes)
        return DiscoveryResult(circuit=self.circuit, nodes=nodes, faithfulness=final["faithfulness"],
                               faithfulness_other=faithfulness_other, faithfulness_heldout=heldout,
                               faithfulness_heldout_other=heldout_other, modes=self.modes, edges=edges,
                               tool_calls=self.tb.calls, rejected=self.rejected, notes=self.notes)


def _show(fs: dict[str, float]) -> str:
    return ", ".join(f"{f:.3f} ({m} ablation)" for m, f in fs.items())
