"""The scripted planner: circuit discovery with no LLM, over the same MCP tools.

A fixed, systematic procedure that an LLM agent is compared with:

1. behaviour: predict on the first prompt pair (is there anything to explain?);
2. candidates: heads and MLP blocks ranked by direct effect, by act x grad against the
   corrupted prompt (attribution patching), and by single-component resample ablation;
3. redundancy: ablate the top act x grad heads *together*; when the group's effect is much
   larger than the sum of its single ablations (backup heads), keep the whole group;
4. structure: trace upstream from the strongest heads through q, k and v, adding the
   upstream heads with strong edges;
5. the graph: every node and edge with the measurement that put it there;
6. check: validate faithfulness over several prompt pairs, grow the circuit by rank while
   it is below the threshold, then prune to the smallest set that stays above it;
7. explain: attach each kept head's or neuron's explanation (with its simulation score).
"""

from __future__ import annotations

from pydantic import BaseModel

from tdb_agent.agent.toolbox import ToolCallFailed, Toolbox


class DiscoveryResult(BaseModel):
    circuit: str
    nodes: list[str]
    faithfulness: float | None
    tool_calls: int
    rejected: list[str]
    notes: list[str]


async def _explain(tb: Toolbox, circuit: str, nodes: list[str], notes: list[str]) -> None:
    """Attach an explanation (with its simulation score) to every kept head or neuron that the
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
        text = f"{ex['explanation']} (simulation score {ex['score']:.2f})"
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


async def discover(tb: Toolbox, task: str | None, pairs: list[dict], circuit: str, *,
                   threshold: float = 0.8, max_nodes: int = 15, n_validate: int = 8,
                   mode: str = "mean") -> DiscoveryResult:
    """Run the procedure; `pairs` are prompt pairs (dicts with prompt, corrupted_prompt, target,
    distractor), the first of which the analysis runs on; validation uses the task's
    `n_validate` pairs (or `pairs` when there is no task)."""
    notes: list[str] = []
    rejected: list[str] = []
    ex = pairs[0]
    P, C, T, D = ex["prompt"], ex["corrupted_prompt"], ex["target"], ex["distractor"]
    pred = await tb("predict", prompt=P, target=T, distractor=D, top_k=5)
    notes.append(f"clean metric {pred['metric']['name']} = {pred['metric']['value']:.3f}, "
                 f"p(target) = {pred['metric']['target_prob']:.3f}")

    de = await tb("attribute", prompt=P, target=T, distractor=D, kinds=["head", "mlp"], top_k=16)
    axg = await tb("attribute", prompt=P, target=T, distractor=D, method="act_times_grad", corrupted_prompt=C,
                   kinds=["head", "mlp"], top_k=16)
    sweep_h = await tb("ablation_sweep", prompt=P, kind="head", target=T, distractor=D, mode="resample",
                       corrupted_prompt=C, top_k=16)
    sweep_m = await tb("ablation_sweep", prompt=P, kind="mlp", target=T, distractor=D, mode="resample",
                       corrupted_prompt=C, top_k=16)
    direct = {r["id"]: r["effect"] for r in de["rows"]}
    total = {r["id"]: r["effect"] for r in axg["rows"]}
    single = {r["id"]: r["delta"] for r in sweep_h["rows"] + sweep_m["rows"]}
    scores = _score_table(list(direct.items()), list(total.items()), list(single.items()))

    # redundancy: do the top heads matter more together than alone?
    top_heads = [cid for cid, _ in sorted(total.items(), key=lambda kv: -abs(kv[1])) if ".H" in cid][:6]
    group = await tb("ablate", prompt=P, components=top_heads, target=T, distractor=D, mode="resample",
                     corrupted_prompt=C)
    singles = sum(abs(single.get(h, 0.0)) for h in top_heads)
    if abs(group["delta"]) > 1.5 * singles:
        notes.append(f"redundancy: ablating {top_heads} together changes the metric by {group['delta']:.3f}, "
                     f"the single ablations by {singles:.3f} in total: kept as a group")
        for h in top_heads:
            scores[h] = max(scores.get(h, 0.0), 0.5)

    # structure: trace the strongest heads' attention and values upstream; one edge per pair
    # of nodes (the strongest of its q/k/v traces), the others kept as evidence
    traced: dict[tuple[str, str], dict] = {}
    strongest = [cid for cid, _ in sorted(scores.items(), key=lambda kv: -kv[1]) if ".H" in cid][:3]
    for head in strongest:
        for via in ("q", "k", "v"):
            tr = await tb("trace_upstream", prompt=P, component=head, via=via, target=T if via == "v" else None,
                          distractor=D if via == "v" else None, top_k=8)
            top_w = max((abs(e["weight"]) for e in tr["edges"]), default=0.0) or 1.0
            for e in tr["edges"]:
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
                scores[src] = max(scores.get(src, 0.0), 0.3)
    edges = list(traced.values())

    ranked = [cid for cid, _ in sorted(scores.items(), key=lambda kv: -kv[1])]

    # the graph: create it, add the first candidates with their evidence, then grow and prune
    await tb("circuit_create", name=circuit, task=task, n_pairs=n_validate if task else None,
             pairs=None if task else pairs, overwrite=True,
             description=f"scripted planner; behaviour: {task or 'given prompt pairs'}")

    def node_in(cid: str) -> dict:
        ev = []
        if cid in direct:
            ev.append({"tool": "attribute", "args": {"method": "direct_effect"}, "value": round(direct[cid], 4)})
        if cid in total:
            ev.append({"tool": "attribute", "args": {"method": "act_times_grad", "reference": "corrupted"},
                       "value": round(total[cid], 4)})
        if cid in single:
            ev.append({"tool": "ablation_sweep", "args": {"mode": "resample"}, "value": round(single[cid], 4)})
        role = "writes to the logits" if abs(direct.get(cid, 0.0)) >= 0.3 * max(
            (abs(v) for v in direct.values()), default=1.0) else "upstream"
        effect = total.get(cid, direct.get(cid, single.get(cid)))
        return {"id": cid, "role": role, "effect": effect, "evidence": ev}

    added: set[tuple[str, str]] = set()

    def edges_for(nodes: set[str]) -> list[dict]:
        """Edges among `nodes` not added yet: direct effects into LOGITS and traced edges."""
        out = [{"source": cid, "target": "LOGITS", "weight": direct[cid], "via": "direct",
                "evidence": [{"tool": "attribute", "args": {"method": "direct_effect"}, "value": direct[cid]}]}
               for cid in nodes if cid in direct]
        out += [e for e in edges if e["source"] in nodes and e["target"] in nodes]
        out = [e for e in out if (e["source"], e["target"]) not in added]
        added.update((e["source"], e["target"]) for e in out)
        return out

    # grow in two steps (the top max_nodes + 1 candidates, then every candidate), validating
    # once per step: validation is the expensive call
    kept: list[str] = []
    faithfulness = None
    for size in dict.fromkeys((min(max_nodes + 1, len(ranked)), len(ranked))):
        batch = ranked[len(kept):size]
        kept += batch
        await tb("circuit_add", name=circuit, nodes=[node_in(c) for c in batch], edges=edges_for(set(kept)))
        v = await tb("circuit_validate", name=circuit, mode=mode, necessity=False)
        faithfulness = v["faithfulness"]
        notes.append(f"{len(kept)} nodes: faithfulness {faithfulness:.3f} ({mode} ablation)")
        if faithfulness >= threshold:
            break
    if faithfulness is not None and faithfulness >= threshold:
        pr = await tb("circuit_prune", name=circuit, threshold=threshold, mode=mode, into=circuit)
        removed = [n for n in kept if n not in pr.get("kept", kept)]
        rejected += removed
        if removed:
            notes.append(f"pruning removed {removed}")
    else:
        notes.append(f"faithfulness stayed below {threshold} with every candidate ({len(kept)} nodes)")
    final = await tb("circuit_validate", name=circuit, mode=mode, necessity=True)
    nodes = list(final["nodes"])
    await _explain(tb, circuit, nodes, notes)
    return DiscoveryResult(circuit=circuit, nodes=nodes, faithfulness=final["faithfulness"], tool_calls=tb.calls,
                           rejected=rejected, notes=notes)
