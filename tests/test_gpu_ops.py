"""Edge attribution, exact edge patching, faithfulness curves and attribution graphs on CUDA
give the CPU's numbers (tiny GPT-2 and Llama with GQA). Skipped where no GPU is present; the
session that has one runs `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from tdb_agent.engine import Engine
from tdb_agent.ops.edges.capture import group_pairs, run_senders
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.faithfulness import faithfulness_curve
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.patch import patched_metrics
from tdb_agent.ops.graph import GraphTarget, build_graph
from tests.test_edges import _pairs
from tests.test_graph import PROMPT, attached, random_transcoders

pytestmark = pytest.mark.gpu
FAMILIES = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def pair_of_engines(tiny_dirs):
    return {fam: (Engine.load(tiny_dirs[fam], device="cpu"), Engine.load(tiny_dirs[fam], device="cuda"))
            for fam in FAMILIES}


def _same(gpu: torch.Tensor, cpu: torch.Tensor, rel: float = 1e-4):
    scale = max(float(cpu.abs().max()), 1e-6)
    assert (gpu.float().cpu() - cpu.float()).abs().max() <= rel * scale


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("method,ig", [("eap", None), ("eap-ig", "inputs"), ("eap-ig", "activations")])
def test_edge_scores_on_cuda_equal_cpu(pair_of_engines, fam, method, ig):
    cpu, gpu = pair_of_engines[fam]
    pairs = _pairs(3)
    kw = dict(method=method, steps=3) | ({"ig": ig} if ig else {})
    a, b = edge_scores(cpu, pairs, **kw), edge_scores(gpu, pairs, **kw)
    assert b.scores.device.type == "cuda"
    _same(b.scores, a.scores)


@pytest.mark.parametrize("fam", FAMILIES)
def test_edge_patching_and_curve_on_cuda_equal_cpu(pair_of_engines, fam):
    cpu, gpu = pair_of_engines[fam]
    pairs = _pairs(3)
    keeps = torch.rand(4, *EdgeGraph(cpu.spec).valid.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    out = []
    for eng in (cpu, gpu):
        graph = EdgeGraph(eng.spec)
        (g,), _ = group_pairs(eng, pairs, True)
        m, _ = patched_metrics(eng, graph, g, run_senders(eng, g.corrupted), keeps.to(eng.device))
        out.append(m)
    _same(out[1], out[0])
    scores = edge_scores(cpu, pairs).scores
    c_cpu = faithfulness_curve(cpu, pairs, scores)
    c_gpu = faithfulness_curve(gpu, pairs, scores.to(gpu.device))
    assert c_gpu.cpr == pytest.approx(c_cpu.cpr, abs=1e-4) and c_gpu.cmd == pytest.approx(c_cpu.cmd, abs=1e-4)


@pytest.mark.parametrize("fam", FAMILIES)
def test_attribution_graph_on_cuda_equals_cpu(pair_of_engines, fam):
    cpu, gpu = pair_of_engines[fam]
    target = GraphTarget(kind="logit_diff", token="dog", distractor="cat")
    tcs = random_transcoders(cpu, seed=2)
    with attached(cpu, tcs), attached(gpu, tcs.to(gpu.device)):
        a, b = build_graph(cpu, PROMPT, target), build_graph(gpu, PROMPT, target)
    assert torch.equal(a.rows.cpu(), b.rows.cpu())
    _same(b.value, a.value)
