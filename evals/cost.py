"""Honest cost accounting: count the model passes a method really runs.

`count_passes()` wraps `Engine.forward` (every operation's forward pass goes through it,
including `run_with_cache`, sweeps that start at a later layer, and the forwards of an
in-process MCP server's worker threads) and `torch.autograd.grad` / `Tensor.backward`
(every backward pass), for the duration of a `with` block. A batched pass of b rows
counts once in `forward_passes` and b times in `forward_rows`; a pass run a block at a time
(the circuit Evaluator's) counts once, at its last block, and `forward_tokens` counts rows ×
positions × the share of the blocks each call runs.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch
from pydantic import BaseModel

from tdb_agent.engine import Engine


class Cost(BaseModel):
    forward_passes: int = 0
    forward_rows: int = 0  # sequences run (a batch of b counts b)
    forward_tokens: int = 0  # rows x positions actually run (x the share of the blocks run)
    backward_passes: int = 0
    seconds: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(**{k: getattr(self, k) + getattr(other, k) for k in Cost.model_fields})

    def short(self) -> str:
        return (f"{self.forward_passes} fwd ({self.forward_rows} rows), {self.backward_passes} bwd, "
                f"{self.seconds:.1f} s")


_lock = threading.Lock()
_active: list[Cost] = []


@contextmanager
def count_passes():
    """Yields a Cost that fills in while the block runs (nestable: every open counter counts)."""
    cost = Cost()
    with _lock:
        _active.append(cost)
        if len(_active) == 1:
            _install()
    t0 = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - t0
        with _lock:
            _active.remove(cost)
            if not _active:
                _uninstall()


_orig: dict = {}


def _bump(**kw) -> None:
    with _lock:
        for c in _active:
            for k, v in kw.items():
                setattr(c, k, getattr(c, k) + v)


def _install() -> None:
    fwd, grad, backward = Engine.forward, torch.autograd.grad, torch.Tensor.backward
    _orig.update(forward=fwd, grad=grad, backward=backward)

    def forward(self, ids, *args, **kwargs):
        # a pass is a call that reaches the logits or runs blocks from the embeddings; the calls
        # of a pass run a block at a time (circuits/evaluate.py) add only their tokens, and
        # tokens count by the share of the blocks a call runs
        start, stop, L = kwargs.get("start_layer", 0), kwargs.get("stop_layer"), self.spec.n_layers
        blocks = (L if stop is None else stop) - start
        whole = stop is None or (start == 0 and blocks > 0)
        _bump(forward_passes=int(whole), forward_rows=int(ids.shape[0]) * whole,
              forward_tokens=round(int(ids.numel()) * blocks / L))
        return fwd(self, ids, *args, **kwargs)

    def counted_grad(*args, **kwargs):
        _bump(backward_passes=1)
        return grad(*args, **kwargs)

    def counted_backward(self, *args, **kwargs):
        _bump(backward_passes=1)
        return backward(self, *args, **kwargs)

    Engine.forward = forward
    torch.autograd.grad = counted_grad
    torch.Tensor.backward = counted_backward


def _uninstall() -> None:
    Engine.forward = _orig["forward"]
    torch.autograd.grad = _orig["grad"]
    torch.Tensor.backward = _orig["backward"]
