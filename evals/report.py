"""RESULTS.md (a table per tier) and results.json from one eval run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel

from evals import explanation_scores
from evals.explanations import ExplanationEval
from evals.methods import THRESHOLD, MethodResult

TRACR_NOTE = ("`evals/tracr_compile.py` (run once where `tracr-pypi` is installed: it needs jax, which the "
              "project does not) compiles `make_hist` and `make_reverse(tokens)` causally and stores the weights in "
              "`evals/tracr/`; `evals/tracr_models.py` turns them into GPT-2 folders (LayerNorms made the identity "
              "with zero-mean writes, eps 1e6 and weight 1e3; heads padded; ReLU MLPs), exact on every test pair.")

TIERS = [("constructed", "Tier 1: constructed models (hand-set weights, exact ground truth)"),
         ("trained toy", "Tier 2: trained toy with redundant induction heads (ground truth by exhaustive ablation)"),
         ("tracr", "Tier 3: Tracr-compiled RASP programs (exact weights)"),
         ("bundled", "Tier 4: the bundled model's tasks (reference circuits by node patching)")]


class Results(BaseModel):
    command: str
    finished: str = ""  # when the run finished (UTC)
    revision: str = ""  # git commit of the tree that ran (with '+ uncommitted changes' when dirty)
    quick: bool
    seconds: float
    threads: int
    machine: str
    results: list[MethodResult]
    toy_truth: list[dict]
    tracr_truth: list[dict] = []
    references: dict[str, dict]
    explanations: ExplanationEval
    tracr: str
    literature: dict


def _f(x, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _modes(d: dict[str, float]) -> str:
    if not d:
        return "–"
    return " / ".join(f"{d[m]:.2f}" if m in d else "–" for m in ("mean", "resample"))


def _row(r: MethodResult) -> str:
    if r.method == "(truth)":
        label = "*reference*" if r.tier == "bundled" else "*ground truth*"
        return (f"| {r.case} | {label} | {len(r.found)} nodes | | | | {', '.join(r.found)} | "
                f"{_modes(r.faithfulness)} | | | |")
    if r.status != "ok":
        return f"| {r.case} | {r.method} | **{r.status}** | | | | | | | | |"
    n = r.nodes
    prf = f"{_f(n.precision)} / {_f(n.recall)} / **{_f(n.f1)}**" if n else "–"
    edge = _f(r.edges.f1) if r.edges else "–"
    auc = _f(r.auc) + (f" (neurons {_f(r.neuron_auc)})" if r.neuron_auc is not None else "")
    k = str(r.k) + ("" if r.detail.get("threshold_reached", True) else " (max f)")
    cost = f"{r.cost.forward_passes} / {r.cost.forward_rows} / {r.cost.backward_passes} / {r.cost.seconds:.1f}"
    own = r.detail.get("planner_faithfulness", r.detail.get("agent_faithfulness"))
    other = r.detail.get("planner_faithfulness_other") or {}
    own_s = f"{own:.2f}" + "".join(f", {m} {f:.2f}" for m, f in other.items()) if own is not None else ""
    faith = _modes(r.faithfulness) + (f" (own report: {own_s})" if own is not None else "")
    return (f"| {r.case} | {r.method} | {prf} | {edge} | {auc} | {k} | {', '.join(r.found) or '∅'} | "
            f"{faith} | {_modes(r.cpr)} | {_modes(r.cmd)} | {cost} |")


HEADER = ("| case | method | node P / R / F1 | edge F1 | ROC AUC | k | circuit | faithfulness (mean / resample) | "
          "CPR (mean / resample) | CMD (mean / resample) | cost: fwd passes / rows / bwd / s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def summary(res: Results) -> list[str]:
    """Per tier and method: mean node F1 and faithfulness over the cases that ran."""
    L = ["## Summary", "", "Means over the tier's cases (runs that failed count as F1 0; 'not run' rows are left out "
         "and counted).", "", "| tier | method | cases run | mean node F1 | mean ROC AUC | mean faithfulness "
         "(mean / resample) | failed | not run |", "|---|---|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(r.method for r in res.results if r.method != "(truth)"))
    for tier, _ in TIERS:
        for m in methods:
            rows = [r for r in res.results if r.tier == tier and r.method == m]
            if not rows:
                continue
            ran = [r for r in rows if not r.status.startswith("not run")]
            ok = [r for r in ran if r.status == "ok"]
            failed = len(ran) - len(ok)
            f1 = [r.nodes.f1 if r.nodes else 0.0 for r in ok] + [0.0] * failed
            aucs = [r.auc for r in ok if r.auc is not None]
            faith = {mode: [r.faithfulness[mode] for r in ok if mode in r.faithfulness]
                     for mode in ("mean", "resample")}
            mean = {k: sum(v) / len(v) for k, v in faith.items() if v}
            L.append(f"| {tier} | {m} | {len(ran)} | {_f(sum(f1) / len(f1) if f1 else None)} | "
                     f"{_f(sum(aucs) / len(aucs) if aucs else None)} | {_modes(mean)} | {failed} | "
                     f"{len(rows) - len(ran)} |")
    return L + [""]


def edge_axis_table(rows: list[MethodResult]) -> list[str]:
    """Every method's CPR / CMD on one axis: the fraction of the edge graph's edges kept."""
    rows = [r for r in rows if r.status == "ok" and "edge_axis" in r.detail]
    if not rows:
        return []
    L = ["CPR / CMD on one axis for every method, computed as the MIB circuit track does (docs/DESIGN.md §4 "
         "\"edges\"): at each MIB budget p (0.1 % … 100 % of the edge graph's edges) the top ⌊p · n⌋ edges, cleaned to "
         "the part connected to the embeddings and the logits, f by exact edge patching against the same reference "
         "(corpus means / corrupted prompts), not clipped; CPR = trapezoids of f over x = p on the edges ranked by "
         "signed support for the behaviour (harmful edges last), CMD = trapezoids of |1 − f| on the edges ranked by "
         "|score|. Edge methods: their scores against that reference (EAP-IG over activations for the mean, over "
         "inputs for the corrupted prompts). Node rankings: the same procedure on their edge order (an edge enters "
         "with the later of its two nodes, so each node boundary keeps the edges among the top k nodes, node "
         "patching of the rest), CPR's order from the signed mean effect, CMD's from its magnitude (the ranking "
         "above: act×grad / sweep against the corrupted prompt). The resample columns are MIB's own setting: its "
         "circuit track patches in each example's counterfactual prompt unless told otherwise (`--ablation "
         "patching`, the default of its run_evaluation.py; mean ablation is an option for a few methods).", "",
         "| case | method | CPR mean | CMD mean | CPR resample | CMD resample |", "|---|---|---|---|---|---|"]
    for r in rows:
        e = r.detail["edge_axis"]
        cells = [f"{e[m][i]:.3f}" if m in e else "–" for m in ("mean", "resample") for i in (0, 1)]
        L.append(f"| {r.case} | {r.method} | " + " | ".join(cells) + " |")
    return L + [""]


def markdown(res: Results) -> str:
    L = ["# Evals: circuit discovery and explanations against ground truth", "",
         f"Generated by `{res.command}` on {res.finished or time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
         f"in "
         f"{res.seconds:.0f} s ({res.threads} torch threads; {res.machine}) at revision {res.revision or '?'}.",
         "", "How to read the tables:", "",
         "* Universe: every attention head and every MLP block; faithfulness f(C) = (m(C) − m(∅)) / (m(full) − "
         "m(∅)) with everything outside C mean-ablated (reference corpus) or resample-ablated (each pair's "
         "corrupted prompt), at every position, over the case's 16 prompt pairs (logit difference).",
         f"* Ranking methods (direct effect, act×grad against the corrupted prompt, resample ablation sweep) "
         f"rank the universe by |mean effect| over the first 4 pairs; their circuit is the smallest top-k "
         f"with faithfulness ≥ {THRESHOLD} (mean ablation), or the k of highest "
         f"faithfulness, marked '(max f)', when none reaches it. CPR / CMD: area under f and under |1 − f| "
         f"over k/N for k = 0..N of their |mean effect| ranking (node axis, |1 − f| split where it crosses 1; CPR higher "
         f"and CMD lower are better; the MIB-rule figures are in the edge-axis table). Choosing k costs the "
         f"faithfulness curve's passes, which are not in the method's cost.",
         "* Edge methods (`eap`, `eap_ig` with 5 steps; tdb_agent.ops.edges) score every edge of the ACDC/MIB "
         "edge graph (each head's q, k and v input a receiver of its own) against the corrupted prompts, on all "
         "16 pairs; their circuit is the fewest top edges whose exact edge-patched faithfulness reaches "
         f"{THRESHOLD} (corrupted reference), then pruned of jointly unneeded edges (removal one at a time and all "
         "together moves f by < 0.05, the references' edge threshold; backups that matter together stay). k counts edges; 'circuit' lists the nodes they imply; edge F1 "
         "collapses edges to (sender, receiving component) pairs without EMB; the node faithfulness is that of "
         "the implied nodes. Their CPR / CMD are MIB's areas over the MIB edge budgets (0.1 % … 100 % of edges; "
         "CPR on the signed ranking, CMD on |score|; mean and corrupted references, each curve from the scores against that reference: EAP-IG over activations "
         "for the mean, over inputs for the corrupted prompts), not over k/N of the node universe: the table "
         "below each tier's puts every method on the edge axis.",
         "* The scripted planner (`tdb_agent.agent.planner` through `tdb_agent.agent.discover`: `discover.run` "
         "for bundled tasks, an in-process MCP session with the case's first 8 pairs otherwise) returns a "
         "circuit; it is re-validated here on the case's 16 pairs ('own report': the faithfulness the planner itself "
         "reported, on its validation pairs, under mean ablation, then under the other mode). "
         "`scripted_planner_both` is the same planner required to reach 0.8 under mean and resample ablation "
         "while it grows and prunes (`tdb-agent discover --ablation both`). Its cost is everything it ran, "
         "including its own validations and pruning. A neuron it keeps counts as its MLP block. It gives no ranking, "
         "so no AUC / CPR / CMD.",
         "* Cost is counted, not estimated: every `Engine.forward` call (a batched pass counts once; rows "
         "= sequences in it) and every autograd call (direct effect's is a backward through the final norm "
         "only).",
         "* A failed run stays in the table with its error.", ""]
    L += summary(res)
    for tier, title in TIERS:
        rows = [r for r in res.results if r.tier == tier]
        L += [f"## {title}", ""]
        if not rows:
            L += ["Not run in this mode (`--quick` skips the toy: training it takes tens of seconds).", ""]
            continue
        if tier == "constructed":
            L += ["Cases (`evals/constructed.py`): `induction` = previous-token head L0.H0 → induction head L1.H1; "
                  "`names` = duplicate-token head L0.H2 → S-inhibition L1.H1 → name mover L2.H3; `class_neuron` = "
                  "neuron L0.N5 (names → 'said' over 'the'; AUC over neurons in brackets). Every model also has "
                  "random distractor heads and a confounder head that attends to BOS and writes a large constant "
                  "into the logits (large direct effect, no ablation effect).", ""]
        if tier == "trained toy":
            for t in res.toy_truth:
                single = ", ".join(f"{k} {v:.2f}" for k, v in t["single_ablation"].items() if k.startswith("L1.H"))
                L += [f"* {t['case']}: trained in {t['train_seconds']:.0f} s; truth (max marginal gain ≥ 0.1 over "
                      f"all {t['n_subsets']} subsets, resample ablation) {t['nodes']}; faithfulness with one "
                      f"layer-1 head ablated: "
                      f"{single}; with all four ablated: {t['all_layer1_heads_ablated']:.2f}; a smallest subset "
                      f"with f ≥ 0.8: {t['smallest_reaching_08']}."]
            L.append("")
        if tier == "tracr":
            L += [res.tracr, ""]
            for t in res.tracr_truth:
                L.append(f"* `{t['case']}`: truth = the compiled blocks {t['compiled_blocks']}. Blocks that "
                         f"matter at the read-out position on these pairs (exhaustive over all subsets, max marginal "
                         f"faithfulness gain ≥ 0.1): mean ablation {t['needed']['mean']}, resample ablation "
                         f"{t['needed']['resample']}.")
            L += ["", "In `reverse` the corrupted prompt changes the first token and keeps the length, so the "
                  "length sub-circuit (L0.H0, L0.MLP, and the MLPs computing the opposite index) does not vary "
                  "between the two prompts: no corruption-based method can see it, and at the last position the "
                  "opposite index is always 0, so mean-ablating those MLPs changes nothing either. Recall below 1 "
                  "there is the limit of the pairs, not only of the methods.", ""]
            L.append("")
        if tier == "bundled":
            for task, ref in res.references.items():
                edges = ", ".join(f"{a}→{b}" for a, b in ref.get("edges", []))
                L.append(f"* `{task}` reference ({ref['n_pairs']} pairs, seed {ref['seed']}, `{ref['command']}`): "
                         f"nodes (|noising| or denoising ≥ {ref['threshold']} of the gap) {ref['nodes']}; edges "
                         f"(path patching ≥ {ref.get('edge_threshold')} of the gap) {edges or 'none'}")
            L.append("")
        L += [HEADER] + [_row(r) for r in rows] + [""]
        L += edge_axis_table(rows)
    L += ["## Tier 5: literature circuits", "",
          "`evals/literature.json`: IOI head classes in GPT-2 small (26 heads), greater-than heads and MLPs, ACDC "
          "edge ROC AUCs; data for users with GPT-2 weights, not scored here.", "",
          "## Explanations", "", res.explanations.llm + ".", "",
          "| kind | source | n | median | quartiles | fraction ≥ 0.5 | max |recomputed − shipped| |",
          "|---|---|---|---|---|---|---|"]
    for d in res.explanations.distributions:
        L.append(f"| {d.kind} | {d.source} | {d.n} | {d.median:.2f} | {d.q1:.2f} – {d.q3:.2f} | {d.frac_ge_05:.2f} | "
                 f"{_f(d.max_abs_diff_vs_shipped, 5)} |")
    L += ["", "Planted features: does the heuristic explanation name the feature?", "",
          "| feature | component | how it was found | selectivity | explanation | score | names it |",
          "|---|---|---|---|---|---|---|"]
    for p in res.explanations.planted:
        L.append(f"| {p.feature} | {p.component} | {p.how_found} | {_f(p.selectivity)} | {p.explanation} | "
                 f"{p.score:.2f} | {'yes' if p.names_feature else '**no**'} |")
    L += ["", "Planted features: the three scores (95% bootstrap interval, examples).", "",
          "| component | detection | fuzzing | simulation |", "|---|---|---|---|"]
    for p in res.explanations.planted:
        cells = [f"{s.value:.2f} [{s.low:.2f}, {s.high:.2f}] n={s.n}" if s.value is not None else "–"
                 for s in p.scores]
        L.append(f"| {p.component} | " + " | ".join(cells or ["–"] * 3) + " |")
    if res.explanations.scores is not None:
        L += [""] + explanation_scores.markdown(res.explanations.scores)
    c = res.explanations.cost
    L += ["", f"Explanations cost: {c.short()}.", ""]
    return "\n".join(L)


def write(res: Results, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(res.model_dump(mode="json"), indent=1, default=str) + "\n")
    (out / "RESULTS.md").write_text(markdown(res))


if __name__ == "__main__":  # python -m evals.report: RESULTS.md again from results.json (a change of wording only)
    _here = Path(__file__).parent
    _res = Results.model_validate_json((_here / "results.json").read_text())
    (_here / "RESULTS.md").write_text(markdown(_res))
    print(f"wrote {_here / 'RESULTS.md'} from {_here / 'results.json'}")
