"""One intervention on a transcoder feature: set or scale its activation at some positions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from cltrace.errors import CltraceError

Mode = Literal["iterative", "constrained"]
MODES = ("iterative", "constrained")
#: Largest |value| or |factor| a parsed intervention may have: far past any real activation, and
#: small enough that float32 activations and logits stay finite (1e308 overflowed float32).
MAX_VALUE = 1e6


@dataclass(frozen=True)
class Intervention:
    """Set (``value``) or scale (``factor``) one feature of one layer at some positions.

    Positions: ``start`` None means every position (prompt and generated); otherwise positions
    start..end inclusive, ``end`` None meaning open-ended (the rest of the prompt and every
    generated token).
    """

    layer: int
    feature: int
    value: float | None = None
    """Set the activation to this value (exactly one of value and factor)."""
    factor: float | None = None
    """Multiply the activation by this factor."""
    start: int | None = None
    end: int | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.factor is None):
            raise CltraceError("an intervention needs exactly one of value (set) or factor (scale)")
        number = self.number
        if not math.isfinite(float(number)):
            raise CltraceError(f"intervention on {self.layer}:{self.feature}: {number} is not a finite number")
        if self.start is None and self.end is not None:
            raise CltraceError("an intervention with an end position needs a start position")
        if self.start is not None and self.start < 0:
            raise CltraceError(f"position {self.start} is negative: positions count from 0")
        if self.start is not None and self.end is not None and self.end < self.start:
            raise CltraceError(f"position range {self.start}-{self.end} is empty: write it low-high")

    @classmethod
    def at(
        cls,
        layer: int,
        feature: int,
        pos: int | tuple[int, int | None] | None = None,
        *,
        value: float | None = None,
        factor: float | None = None,
    ) -> Intervention:
        """An intervention at `pos`: an int, (a, b) inclusive, (a, None) open-ended, or None (everywhere)."""
        if pos is None:
            start, end = None, None
        elif isinstance(pos, tuple):
            start, end = pos
        else:
            start, end = int(pos), int(pos)
        return cls(int(layer), int(feature), value, factor, start, end)

    @property
    def number(self) -> float:
        """The value (set) or the factor (scale), whichever it has."""
        number = self.value if self.value is not None else self.factor
        if number is None:
            raise CltraceError("an intervention needs exactly one of value (set) or factor (scale)")
        return number

    @property
    def mode(self) -> Literal["set", "scale"]:
        return "set" if self.value is not None else "scale"

    @property
    def open_ended(self) -> bool:
        """Whether it also covers generated tokens."""
        return self.end is None

    def covers(self, pos: int) -> bool:
        return (self.start is None or pos >= self.start) and (self.end is None or pos <= self.end)

    def apply(self, activation: float) -> float:
        """The new activation of a feature whose activation would be `activation`."""
        return float(self.value) if self.value is not None else activation * float(self.number)

    def positions_text(self) -> str:
        if self.start is None:
            return ""
        if self.end is None:
            return f"@{self.start}-"
        return f"@{self.start}" if self.start == self.end else f"@{self.start}-{self.end}"

    def __str__(self) -> str:
        what = f"{self.value:g}" if self.value is not None else f"x{self.factor:g}"
        return f"{self.layer}:{self.feature}{self.positions_text()}={what}"


__all__ = ["MAX_VALUE", "MODES", "Intervention", "Mode"]
