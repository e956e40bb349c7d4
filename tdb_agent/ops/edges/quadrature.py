"""EAP-IG's quadrature: the nodes α ∈ (0, 1] and weights of the rule that integrates the
gradient along the path from the reference (α = 0) to the clean run (α = 1).

* "riemann": MIB's right Riemann sum, α = k/m, weights 1/m (k = 1..m). Exact for constant
  integrands only; its error falls as 1/m.
* "radau": right Gauss–Radau, m nodes with one fixed at α = 1 (the clean run, whose pass EAP-IG
  shares with the sender outputs, as the Riemann sum's last node): exact for polynomials of
  degree 2m − 2, the error of a smooth integrand falling geometrically in m. Same passes.

Both rules end at α = 1, so the last node is always the clean run; m = 1 is EAP for both.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.polynomial import legendre

from tdb_agent.errors import TdbError

Quadrature = Literal["riemann", "radau"]
QUADRATURES: tuple[str, ...] = ("riemann", "radau")


def nodes(rule: Quadrature, m: int) -> tuple[list[float], list[float]]:
    """(α ascending, weights) of `rule` with m nodes on [0, 1]; the last α is 1, the weights sum to 1."""
    if rule not in QUADRATURES:
        raise TdbError(f"quadrature must be one of {QUADRATURES}, not {rule!r}")
    if m < 1:
        raise TdbError(f"a quadrature needs at least one node, not {m}")
    if rule == "riemann":
        return [k / m for k in range(1, m + 1)], [1.0 / m] * m
    if m == 1:
        return [1.0], [1.0]
    # left Radau on [-1, 1]: the roots of P_{m-1} + P_m (x = -1 among them), weights
    # 2/m² at -1 and (1 − x)/(m² P_{m-1}(x)²) elsewhere; mirrored to fix the right end
    c = np.zeros(m + 1)
    c[m - 1] = c[m] = 1.0
    x = np.sort(legendre.legroots(c).real)
    x[0] = -1.0
    p = legendre.legval(x[1:], np.eye(m)[m - 1])
    w = np.concatenate([[2.0 / m ** 2], (1 - x[1:]) / (m ** 2 * p ** 2)])
    alpha, weight = (1 - x[::-1]) / 2, w[::-1] / 2  # x -> -x, then [-1, 1] -> [0, 1]
    alpha[-1] = 1.0
    return alpha.tolist(), weight.tolist()
