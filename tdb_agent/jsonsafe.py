"""Strict JSON: NaN and infinity have no JSON form. Python's `json` writes them as the
non-standard `NaN`/`Infinity` (which other readers reject) and reads them back; these helpers
find them, drop them, and write files without them."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel


def non_finite(value: Any, path: str = "") -> list[str]:
    """Paths (`a.b[2]`) of the NaN/inf floats inside a JSON-like value or pydantic model."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path or "value"]
    if isinstance(value, BaseModel):
        return non_finite(value.model_dump(), path)
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{path}[{i}]")]
    return []


def shown(paths: list[str], n: int = 5) -> str:
    """A short list of paths for a message."""
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def drop_non_finite(value: Any) -> Any:
    """The value with every NaN/inf float replaced by None (lists and dicts copied)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: drop_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [drop_non_finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that refuses NaN/inf (ValueError naming where they are)."""
    bad = non_finite(value)
    if bad:
        raise ValueError(f"not finite, so not JSON: {shown(bad)}")
    return json.dumps(value, allow_nan=False, **kwargs)
