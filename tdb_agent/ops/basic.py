"""Model information, tokenization and next-token prediction."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from tdb_agent.components import GRAMMAR
from tdb_agent.engine import Engine, ModelSpec
from tdb_agent.engine.placement import Placement
from tdb_agent.ops.metrics import MetricName, make_metric
from tdb_agent.tasks import task_examples, task_info, task_names
from tdb_agent.tasks.generators import TaskExample


class TranscoderInfo(BaseModel):
    """One loaded transcoder: its features are components L{layer}.tc.F{i}."""

    layer: int = Field(description="the layer whose MLP input it reads")
    features: int = Field(description="its width (feature count)")
    kind: str = Field(description="activation: topk (with k), jumprelu or relu; '+ skip' with a skip term; "
                                  "'cross-layer' when it writes to later MLP outputs too")
    writes_to: list[int] = Field(description="the layers whose MLP output its features write to")


class ModelInfo(BaseModel):
    name: str
    spec: ModelSpec
    device: str
    dtype: str
    precision: str = Field("", description="what runs in which precision (half-precision models accumulate "
                                           "logits, metrics and attributions in float32)")
    n_params: int
    component_ids: str = Field(description="grammar of component ids")
    n_components: dict[str, int] = Field(description="how many components of each kind")
    hook_sites: int
    saes: list[str] = []
    transcoders: list[TranscoderInfo] = Field([], description="loaded transcoders (features L{l}.tc.F{i})")
    datasets: list[str] = []
    placement: Placement | None = Field(None, description="device map, execution device of each block, parameter "
                                                          "bytes (and CUDA memory) per device")
    notes: list[str] = Field([], description="how the engine runs the model differently from its own code "
                                             "(e.g. a GELU formula as one fused kernel: the same function)")


class TokenInfo(BaseModel):
    position: int
    token: str
    id: int


class TokenizeResult(BaseModel):
    n_tokens: int
    tokens: list[TokenInfo]


class TokenPrediction(BaseModel):
    token: str
    id: int
    prob: float
    logit: float


class MetricValue(BaseModel):
    name: MetricName
    value: float
    target: str
    distractor: str | None = None
    target_prob: float
    target_rank: int = Field(description="0 = the model's top prediction")


class PredictResult(BaseModel):
    prompt: str
    n_tokens: int
    top: list[TokenPrediction]
    metric: MetricValue | None = None


class TaskSummary(BaseModel):
    name: str
    description: str
    metric: MetricName
    examples: list[TaskExample]


class TaskList(BaseModel):
    tasks: list[TaskSummary]


def model_info(engine: Engine, datasets: list[str] | None = None) -> ModelInfo:
    """Describe the loaded model: its spec, device, dtype, size, component ids and attachments.

    Args:
        datasets: names of the activation datasets attached by the caller (the workbench);
            listed as they are, none if omitted.

    Returns:
        ModelInfo: name, spec (layers, heads, widths, ...), device, dtype, parameter count, the
        component-id grammar, the number of components of each kind (head, neuron, attn, mlp,
        emb), the number of hook sites, attached SAEs, transcoders and datasets, the device placement,
        and notes on where the engine runs the model's code differently (the same function).
    """
    s = engine.spec
    return ModelInfo(
        name=engine.name, spec=s, device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."),
        precision=engine.precision(),
        n_params=sum(p.numel() for p in engine.model.parameters()), component_ids=GRAMMAR,
        n_components={"head": s.n_layers * s.n_heads, "neuron": s.n_layers * s.d_mlp,
                      "attn": s.n_layers, "mlp": s.n_layers, "emb": 1},
        hook_sites=len(engine.site_names()), saes=engine.saes.names(), transcoders=transcoder_infos(engine),
        datasets=datasets or [], placement=engine.placement(), notes=engine.notes)


def transcoder_infos(engine: Engine) -> list[TranscoderInfo]:
    tcs = getattr(engine, "transcoders", None)
    out = []
    for l, tc in (tcs.layers.items() if tcs is not None else ()):
        kind = f"topk (k={tc.k})" if tc.k is not None else ("jumprelu" if tc.threshold is not None else "relu")
        kind += " + skip" if tc.W_skip is not None else ""
        kind += ", cross-layer" if tc.n_out > 1 else ""
        out.append(TranscoderInfo(layer=l, features=tc.d_tc, kind=kind, writes_to=list(range(l, l + tc.n_out))))
    return out


def tokenize(engine: Engine, text: str) -> TokenizeResult:
    """Split text into the model's tokens, exactly as every other op tokenizes a prompt.

    Args:
        text: the text to tokenize.

    Returns:
        TokenizeResult: n_tokens and, per position, the token string and its vocabulary id.
    """
    ids = engine.to_tokens(text)[0].tolist()
    toks = engine.str_tokens(ids)
    return TokenizeResult(n_tokens=len(ids), tokens=[TokenInfo(position=i, token=t, id=x)
                                                     for i, (t, x) in enumerate(zip(toks, ids))])


@torch.no_grad()
def predict(engine: Engine, prompt: str, top_k: int = 10, target: str | None = None,
            distractor: str | None = None) -> PredictResult:
    """The model's next-token distribution after the prompt (last position, no intervention).

    Args:
        prompt: the text to run.
        top_k: how many of the most probable next tokens to list.
        target: optional single token; if given, the metric is reported for it.
        distractor: optional single token; with a target the metric is logit_diff
            (logit[target] - logit[distractor] at the last position), without one it is
            logprob (log p(target)).

    Returns:
        PredictResult: n_tokens, the top_k tokens with probability and logit, and, when a target
        is given, the metric's value with the target's probability and rank (0 = top prediction).
    """
    metric = make_metric(engine, target, distractor) if target else None
    ids = engine.to_tokens(prompt)
    logits = engine.forward(ids).logits[0, -1].float()  # [vocab]
    probs = logits.softmax(-1)
    top = probs.topk(min(top_k, probs.shape[0]))
    rows = [TokenPrediction(token=engine.str_tokens([i])[0], id=i, prob=p, logit=logits[i].item())
            for p, i in zip(top.values.tolist(), top.indices.tolist())]
    value = None
    if metric is not None:
        t = metric.target_id
        value = MetricValue(name=metric.name, value=metric.from_logits(logits[None])[0].item(),
                            target=target, distractor=distractor, target_prob=probs[t].item(),
                            target_rank=int((logits > logits[t]).sum().item()))
    return PredictResult(prompt=prompt, n_tokens=ids.shape[1], top=rows, metric=value)


def list_tasks(n_examples: int = 3) -> TaskList:
    """The built-in tasks (prompt families with a target and distractor), with sample prompts.

    Args:
        n_examples: how many seeded example prompt pairs to include per task.

    Returns:
        TaskList: per task its name, description, metric (logit_diff or logprob) and examples.
    """
    return TaskList(tasks=[TaskSummary(**task_info(n).model_dump(), examples=task_examples(n, n_examples))
                           for n in task_names()])
