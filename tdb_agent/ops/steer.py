"""Steering: add a component's direction to the residual stream and generate."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from tdb_agent.components import parse_component
from tdb_agent.engine import Engine
from tdb_agent.engine.interventions import intervention
from tdb_agent.engine.component_sites import kind_site
from tdb_agent.errors import TdbError
from tdb_agent.ops.decompose import post_norm_factor
from tdb_agent.ops.runs import RunCache, get_mean, reference_documents
from tdb_agent.ops import sae_ops, transcoder_ops


class SteerResult(BaseModel):
    prompt: str
    component: str
    scale: float
    site: str = Field(description="where the direction is added (at every position)")
    direction_norm: float
    baseline: str = Field(description="greedy continuation without the intervention")
    steered: str = Field(description="greedy continuation with the direction added")


def steering_vector(engine: Engine, component: str, cache: RunCache | None = None) -> tuple[str, torch.Tensor]:
    """(site, direction [d_model]): what the component writes into the residual stream.

    A neuron: its output weights (the write of activation 1); a head: its mean write over
    the reference set (mean z times W_O). Where a post-norm sits between the block and the
    residual stream (Gemma-2/3, OLMo-2), hook_attn_out / hook_mlp_out are after it, so the
    direction is the write as it reaches the residual stream: through the post-norm's gain
    and 1/rms, frozen per reference token as in direct effects, averaged over the reference
    set (`post_norm_mean_write`)."""
    c = parse_component(component, engine.spec, sae_sizes=sae_ops.sae_sizes(engine))
    if c.kind == "sae":  # a latent's decoder row at its SAE's site
        return sae_ops.steering_vector(engine, c)
    if c.kind == "transcoder":  # a feature's decoder row into its layer's MLP output
        return transcoder_ops.steering_vector(engine, c)
    if c.kind not in ("neuron", "head"):
        raise TdbError(f"steer takes a neuron (L{{l}}.N{{n}}) or a head (L{{l}}.H{{h}}), not {c.id}")
    head = c.kind == "head"
    site = kind_site("attn", c.layer) if head else kind_site("mlp", c.layer)
    a = engine.adapter
    if (a.post_attn_norm(c.layer) if head else a.post_mlp_norm(c.layer)) is not None:
        return site, post_norm_mean_write(engine, c.layer, c.index, head).to(engine.dtype)
    if not head:
        return site, a.W_out(c.layer)[c.index]
    z_mean = get_mean(engine, kind_site("head", c.layer), cache)[c.index]  # [d_head]
    return site, z_mean @ a.W_O(c.layer)[c.index]


@torch.no_grad()
def post_norm_mean_write(engine: Engine, layer: int, index: int, head: bool) -> torch.Tensor:
    """Mean over every reference token of what head/neuron `index` of `layer` writes into
    the residual stream through the post-norm frozen at that token (float32 [d_model]): a
    head's z_h W_O[h] times the factor, a neuron's W_out[n] (activation 1) times it."""
    kind, site = ("attn", kind_site("head", layer)) if head else ("mlp", kind_site("neuron", layer))
    unit = engine.adapter.W_O(layer)[index].float() if head else engine.adapter.W_out(layer)[index].float()
    total, count = None, 0
    for text in reference_documents(engine):
        ids = engine.to_tokens(text, truncate=True)
        _, acts = engine.run_with_cache(ids, [site], logit_positions=[-1], logit_ids=[0])
        x = acts[site][0]
        f = post_norm_factor(engine, kind, layer, x)  # [P, d_model]
        write = (x[:, index].float() @ unit if head else unit) * f
        total = write.sum(0) if total is None else total + write.sum(0)
        count += ids.shape[1]
    return total / count


@torch.no_grad()
def greedy(engine: Engine, ids: torch.Tensor, max_new_tokens: int, hooks=None) -> list[int]:
    out: list[int] = []
    eos = engine.tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        if ids.shape[1] >= engine.spec.n_ctx:
            break
        nxt = int(engine.forward(ids, hooks=hooks).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    return out


def steer(engine: Engine, prompt: str, component: str, scale: float = 5.0, max_new_tokens: int = 12,
          cache: RunCache | None = None) -> SteerResult:
    """Greedy continuation of a prompt with and without a component's direction added.

    The direction is what the component writes into the residual stream: a neuron's output
    weights (added to that layer's MLP output), a head's mean write (mean z over the
    reference set times W_O, added to the attention output) or an SAE latent's decoder row;
    it is scaled and added at every position. In families with a norm after attention and
    MLP (Gemma-2/3, OLMo-2) the write is taken after that norm, as it reaches the residual
    stream (its gain and scale per reference token, averaged).

    Args:
        prompt: the text to continue.
        component: a neuron (L1.N7), a head (L2.H5) or an SAE latent.
        scale: multiplier of the direction (negative values subtract it).
        max_new_tokens: how many tokens to generate greedily (stops early at end-of-text).

    Returns:
        SteerResult: the hook site, the direction's norm, the baseline continuation and the
        steered continuation.
    """
    with engine.lock:
        site, vec = steering_vector(engine, component, cache)
        ids = engine.to_tokens(prompt)
        hook = intervention("add", site, value=scale * vec)
        base = greedy(engine, ids, max_new_tokens)
        steered = greedy(engine, ids, max_new_tokens, hooks={site: hook})
    text = lambda toks: engine.tokenizer.decode(toks)  # noqa: E731
    return SteerResult(prompt=prompt, component=component, scale=scale, site=site,
                       direction_norm=vec.norm().item(), baseline=text(base), steered=text(steered))
