"""Number cells of the harness's text and HTML tables."""
from __future__ import annotations

from typing import Any


def number(x: Any, scale: float = 1.0, nd: int = 2, width: int = 0) -> str:
    """`x * scale` with `nd` decimals, right-aligned in `width` (0: no padding); "-" when `x` is
    no number (None, missing)."""
    if isinstance(x, (int, float)):
        return f"{x * scale:{width}.{nd}f}" if width else f"{x * scale:.{nd}f}"
    return f"{'-':>{width}}" if width else "-"
