"""The tanh approximation of GELU as one fused kernel.

GPT-2, GPT-J, GPT-Neo, CodeGen, Phi and the bundled model run GELU's tanh approximation
("gelu_new", "gelu_fast") as transformers' Python formula: eight elementwise operations over
[b, s, d_mlp], several saving their operands for the backward. torch's
`gelu(x, approximate="tanh")` is the same function in one kernel forward and one backward
(both within 1.2e-7 · max(|x|, 1) of the float64 function on |x| ≤ 30, gradients within 2e-6:
tests/test_engine_activations.py),
so the engine swaps it in once, at load, in float32 models; the hook sites on the module
(mlp.hook_pre / mlp.hook_post) are unchanged. Half-precision models keep their own formula:
there the two differ at bf16's rounding, not float32's (the fused kernel is the closer to the
exact function, but EAP on the sharpened tiny GPT-J of tests/test_edges.py's half-precision
check moved from 1.3 % to 6.1 % of float32's largest score, past its 5 % bound). Speed at
GPT-2 small's shape: README "Edge circuits".
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import activations

# transformers' tanh-approximation GELUs written as Python formulas (GELUTanh itself already
# calls the fused kernel unless built with use_gelu_tanh_python)
_FORMULAS = (activations.NewGELUActivation, activations.FastGELUActivation)


def _is_formula(m: nn.Module) -> bool:
    return isinstance(m, _FORMULAS) or (isinstance(m, activations.GELUTanh)
                                        and getattr(m.act, "__name__", "") == "_gelu_tanh_python")


def fuse_gelu(model: nn.Module) -> list[str]:
    """Replace every tanh-approximation GELU formula module in `model` by nn.GELU("tanh"), in
    place. Returns a note for model_info (empty when there was none)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return []  # half precision: the two differ at its rounding (1e-2), so the model's own code runs
    swapped: dict[str, int] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_formula(child):
                swapped[type(child).__name__] = swapped.get(type(child).__name__, 0) + 1
                setattr(parent, name, nn.GELU(approximate="tanh"))
    return [f"{n} x {k} run as torch's fused gelu(approximate='tanh'): the same function, to float32 rounding"
            for k, n in swapped.items()]
