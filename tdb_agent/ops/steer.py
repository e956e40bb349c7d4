"""Steering: add a component's direction to the residual stream and generate."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from tdb_agent.components import parse_component
from tdb_agent.engine import Engine
from tdb_agent.engine.interventions import intervention
from tdb_agent.engine.sites import kind_site
from tdb_agent.errors import TdbError
from tdb_agent.ops.runs import RunCache, get_mean
from tdb_agent.ops import sae_ops


class SteerResult(BaseModel):
    prompt: str
    component: str
    scale: float
    site: str = Field(description="where the direction is added (at every position)")
    direction_norm: float
    baseline: str = Field(description="greedy continuation without the intervention")
    steered: str = Field(description="greedy continuation with the direction added")


def steering_vector(engine: Engine, component: str, cache: RunCache | None = None) -> tuple[str, torch.Tensor]:
    """(site, direction [d_model]): a neuron's output weights, or a head's mean write."""
    c = parse_component(component, engine.spec, sae_sizes=engine.saes.sizes())
    if c.kind == "sae":  # a latent's decoder row at its SAE's site
        return sae_ops.steering_vector(engine, c)
    if c.kind == "neuron":
        return kind_site("mlp", c.layer), engine.adapter.W_out(c.layer)[c.index]
    if c.kind == "head":
        z_mean = get_mean(engine, kind_site("head", c.layer), cache)[c.index]  # [d_head]
        return kind_site("attn", c.layer), z_mean @ engine.adapter.W_O(c.layer)[c.index]
    raise TdbError(f"steer takes a neuron (L{{l}}.N{{n}}) or a head (L{{l}}.H{{h}}), not {c.id}")


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

    The direction is a neuron's output weights (added to that layer's MLP output), a head's
    mean write (mean z over the reference set times W_O, added to the attention output) or an
    SAE latent's decoder row; it is scaled and added at every position.

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
