"""Adaptive poll schedules: pure arithmetic on a learned duration distribution, no I/O.

A job is checked at fixed times measured from its POST (not chained waits, so a late check does not
push every later one back): first at ``first``, then every ``gap`` seconds. ``gap`` bounds the
detection latency of every job that finishes after the first check; ``first`` is learned per class of
job (kind, and model and size when known) so that only a small fraction ``skip`` of jobs finish more
than ``gap`` seconds before it::

    first = Q(skip) + gap          (Q: the learned quantile function)

Jobs finishing between ``Q(skip)`` and ``first`` are still detected within ``gap``, so the time saved is
the skipped low quantile plus one gap, and at most ``skip`` of jobs wait longer than ``gap``. Past the
first check the schedule is the same fixed ``gap`` everywhere, so a job slower than anything learned
(an upstream slowing down) is still found within ``gap``: the learned p99 needs no special case. With
nothing learned yet, ``first = gap``: a fixed ``gap`` loop, never worse than the 5 s loop it replaces.

Durations are learned from what polling sees: a job first seen done at the check at ``hi`` seconds
after its POST, and still working at the check before (``lo``; 0 when the first check found it done),
finished somewhere in ``(lo, hi]``. Each such interval adds weight to a histogram of log-spaced bins:
uniformly over ``(lo, hi]``, except the jobs found done at the first check (``lo = 0``), whose finish
times the schedule cannot see, which are spread as a density rising linearly from 0 (nothing finishes
at once). That shape errs towards earlier durations for the thin left tails generation times have
(a log-normal's falls faster), which makes ``first`` earlier: more checks, never later detection. After
an upstream slowdown ends, the jobs now found at the first check pull ``first`` back down within a few
dozen observations. Older observations weigh less: each new one weighs ``2 ** (1 / half_life)`` times
the previous, so the histogram follows the last ``half_life`` or so jobs of its class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BIN_FIRST = 0.25
"""Upper edge of the first bin (seconds): shorter durations are not told apart."""
BIN_RATIO = 1.08
"""Each further bin is this much wider than the one before (about ±4 % resolution)."""
BIN_LAST = 4 * 86400.0
"""Durations beyond this land in the last bin."""
RESCALE_AT = 1e9
"""When the newest observation's weight passes this, every weight is divided by it (see ``Histogram``)."""


def _make_edges() -> tuple[float, ...]:
    out = [0.0, BIN_FIRST]
    while out[-1] < BIN_LAST:
        out.append(out[-1] * BIN_RATIO)
    return tuple(out)


EDGES = _make_edges()
"""Bin ``i`` holds durations in ``(EDGES[i], EDGES[i + 1]]``."""
BINS = len(EDGES) - 1


def bin_of(seconds: float) -> int:
    """The bin a duration falls in."""
    if seconds <= BIN_FIRST:
        return 0
    i = min(BINS - 1, 1 + int(math.log(seconds / BIN_FIRST) / math.log(BIN_RATIO)))
    # Guard float rounding at the edges.
    while i > 1 and seconds <= EDGES[i]:
        i -= 1
    while i < BINS - 1 and seconds > EDGES[i + 1]:
        i += 1
    return min(i, BINS - 1)


def spread(lo: float, hi: float) -> dict[int, float]:
    """Weights (summing to 1) of one job known to have finished within ``(lo, hi]`` seconds.

    >>> spread(0.0, 0.2)
    {0: 1.0}
    >>> w = spread(0.0, 4.0)  # found at the first check: a ramp, more weight on later bins
    >>> round(sum(w.values()), 3), w[bin_of(3.9)] > w[bin_of(1.0)]
    (1.0, True)
    """
    lo = max(0.0, lo)
    hi = max(hi, lo)
    first, last = bin_of(lo) if lo > 0 else 0, bin_of(hi)
    if hi <= 0 or first == last:
        return {last: 1.0}
    out: dict[int, float] = {}
    for i in range(first, last + 1):
        a, b = max(lo, EDGES[i]), min(hi, EDGES[i + 1])
        if b <= a:
            continue
        # lo == 0: density proportional to t on (0, hi]; else uniform on (lo, hi].
        w = (b * b - a * a) / (hi * hi) if lo == 0 else (b - a) / (hi - lo)
        out[i] = round(w, 4)
    return {i: w for i, w in out.items() if w > 0}


@dataclass(frozen=True)
class Learned:
    """A class's learned duration distribution: the mass of each bin (summing to 1) and how many
    recent observations it amounts to (the decayed weights, in units of the newest one)."""

    masses: tuple[float, ...]
    samples: float

    def cdf(self, seconds: float) -> float:
        """P(duration <= seconds), linear within a bin."""
        if seconds <= 0:
            return 0.0
        i = bin_of(seconds)
        below = sum(self.masses[:i])
        a, b = EDGES[i], EDGES[i + 1]
        return min(1.0, below + self.masses[i] * min(1.0, (seconds - a) / (b - a)))

    def quantile(self, p: float) -> float:
        """The smallest duration with cdf >= p (0 < p < 1), linear within a bin."""
        acc = 0.0
        for i, m in enumerate(self.masses):
            if m > 0 and acc + m >= p:
                a, b = EDGES[i], EDGES[i + 1]
                return a + (b - a) * max(0.0, p - acc) / m
            acc += m
        return EDGES[-1]

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> Learned | None:
        """From a histogram hash as Redis returns it (``b<i>`` weights, ``n`` total, ``s`` next weight)."""
        fields = {_text(k): float(_text(v)) for k, v in raw.items()}
        total, scale = fields.get("n", 0.0), fields.get("s", 1.0)
        if total <= 0 or scale <= 0:
            return None
        masses = [0.0] * BINS
        for name, value in fields.items():
            if name.startswith("b") and name[1:].isdigit() and int(name[1:]) < BINS:
                masses[int(name[1:])] = max(0.0, value) / total
        return cls(tuple(masses), total / scale)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Histogram:
    """The histogram as genq.durations keeps it in Redis, in memory (tests, offline replays).

    Weights grow instead of decaying: the newest observation weighs ``s``, and ``s`` grows by
    ``2 ** (1 / half_life)`` per observation, so each observation is one write and older ones weigh
    relatively less. When ``s`` passes :data:`RESCALE_AT` everything is divided by it."""

    half_life: float
    weights: dict[int, float] = field(default_factory=dict)
    total: float = 0.0
    scale: float = 1.0

    def observe(self, lo: float, hi: float) -> None:
        for i, w in spread(lo, hi).items():
            self.weights[i] = self.weights.get(i, 0.0) + w * self.scale
        self.total += self.scale
        self.scale *= growth(self.half_life)
        if self.scale > RESCALE_AT:
            self.weights = {i: w / self.scale for i, w in self.weights.items()}
            self.total /= self.scale
            self.scale = 1.0

    def as_hash(self) -> dict[str, float]:
        return {**{f"b{i}": w for i, w in self.weights.items()}, "n": self.total, "s": self.scale}

    def learned(self) -> Learned | None:
        return Learned.from_hash(self.as_hash())


def growth(half_life: float) -> float:
    """Weight of each observation relative to the one before."""
    return float(2 ** (1.0 / half_life))


def first_poll(learned: Learned | None, gap: float, skip: float, min_samples: float) -> float:
    """Seconds after the POST of the first check: ``Q(skip) + gap``, or ``gap`` while too little is
    known (fewer than ``min_samples`` recent observations).

    >>> first_poll(None, 4.5, 0.02, 20)
    4.5
    """
    if learned is None or learned.samples < min_samples:
        return gap
    return learned.quantile(skip) + gap


def next_poll(previous_at: float, now: float, gap: float, min_wait: float) -> float:
    """When (absolute) the check after the one scheduled at ``previous_at`` is due: ``gap`` later, on
    the job's fixed grid, skipping slots that are already (nearly) past when this check ran late.

    >>> next_poll(100.0, 100.3, 4.5, 1.0)
    104.5
    >>> next_poll(100.0, 104.0, 4.5, 1.0)
    109.0
    """
    at = previous_at + gap
    if at < now + min_wait:
        at += gap * math.ceil((now + min_wait - at) / gap)
    return at


def job_classes(kind: str, request: Mapping[str, Any]) -> list[str]:
    """The classes a job's duration is learned under, most specific first: kind, model and size; then
    the kind alone (used while the specific class has too few observations).

    >>> job_classes("image", {"width": 512, "height": 512, "num_images": 2})
    ['image:-:512x512x2', 'image']
    >>> job_classes("video", {"duration": 5, "model_id": "m1"})
    ['video:m1:5s', 'video']
    """
    model = str(request.get("model_id") or "-")
    if kind == "image":
        size = f"{request.get('width', 1024)}x{request.get('height', 1024)}x{request.get('num_images', 1)}"
    elif kind == "upscale":
        size = f"x{request.get('factor', 2)}"
    elif kind == "video":
        size = f"{float(request.get('duration', 5.0)):g}s"
    else:
        return [kind]
    return [f"{kind}:{model}:{size}", kind]
