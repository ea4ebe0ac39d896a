"""What the throughput and serving benchmarks share: request lengths drawn from a seeded distribution,
and the percentile summaries they report.

Pure Python (no torch, no event loop), so the numbers can be checked directly and `kiln bench serve`
stays light. Percentiles interpolate linearly between the two nearest samples, as numpy's default does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kiln.errors import KilnError

DISTRIBUTIONS = ("fixed", "uniform", "normal")
QUANTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of values, interpolating linearly between the nearest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Mean and p50/p90/p99 of one measured quantity, in its own unit (seconds for the times)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats | None:
        """The summary of values, or None when there are none (e.g. time per token with one output token)."""
        if not values:
            return None
        return cls(len(values), sum(values) / len(values), *(percentile(values, q) for q in QUANTILES))

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "p50": self.p50, "p90": self.p90, "p99": self.p99}


def ms_line(label: str, stats: Stats | None) -> str:
    """One report line of a time summary, in milliseconds: `label  mean .. p50 .. p90 .. p99 .. ms`."""
    if stats is None:
        return f"{label:<22} n/a"
    return (f"{label:<22} mean {stats.mean * 1e3:9.3f}  p50 {stats.p50 * 1e3:9.3f}  "
            f"p90 {stats.p90 * 1e3:9.3f}  p99 {stats.p99 * 1e3:9.3f} ms")


def stats_json(stats: Stats | None) -> dict[str, Any] | None:
    return None if stats is None else stats.to_dict()


def draw_lengths(n: int, mean: int, dist: str = "fixed", spread: float = 0.2, seed: int = 0,
                 flag: str = "--input_len") -> list[int]:
    """n request lengths around `mean`, each at least 1, reproducible from `seed`.

    fixed: all `mean`; uniform: integers in [mean*(1-spread), mean*(1+spread)] (rounded, inclusive);
    normal: mean `mean`, standard deviation mean*spread, rounded and clipped to >= 1.
    """
    if dist not in DISTRIBUTIONS:
        raise KilnError(f"{flag}_dist {dist!r} is unknown: choose one of {', '.join(DISTRIBUTIONS)}")
    if mean < 1:
        raise KilnError(f"{flag} {mean} is invalid: it must be 1 or more")
    if not spread >= 0:  # also refuses NaN
        raise KilnError(f"--len_range {spread} is invalid: it must be 0 or more (0.2 is +-20%)")
    rng = random.Random(f"{seed}:{flag}")  # one stream per flag: input lengths do not shift output lengths
    if dist == "fixed" or spread == 0:
        return [mean] * n
    if dist == "uniform":
        lo = max(1, round(mean * (1 - spread)))
        hi = max(lo, round(mean * (1 + spread)))
        return [rng.randint(lo, hi) for _ in range(n)]
    return [max(1, round(rng.gauss(mean, mean * spread))) for _ in range(n)]


def describe_lengths(mean: int, dist: str, spread: float) -> str:
    """How lengths were drawn, for the report: `128 (fixed)`, `128 (uniform +-20%)`, `128 (normal, sd 20%)`.
    """
    if dist == "fixed" or spread == 0:
        return f"{mean} (fixed)"
    if dist == "uniform":
        return f"{mean} (uniform +-{spread * 100:g}%)"
    return f"{mean} (normal, sd {spread * 100:g}%)"
