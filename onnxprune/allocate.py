"""Choose how many channels each group keeps to meet a MAC-reduction target.

Whole channels make ``reduction(ratio)`` a staircase, and rounding kept counts
to multiples of ``round_to`` makes it non-monotone. So every strategy works
on *achievable* kept counts (multiples of ``round_to`` plus the full count,
never zero), and ends with a greedy back-off: while some group can keep one
more step of channels and the target still holds, give back the step that
leaves the reduction closest to the target. The report gives achieved vs
target.

* :func:`uniform` (ACRA strategy 1): one ratio ``r`` for every prunable group;
  the smallest ``r`` whose reduction reaches the target (grid scan, then
  bisection inside the first bracket that crosses it).
* :func:`by_threshold` (ACRA strategy 2): each group gets the largest ratio
  whose monotone-envelope drop stays under a threshold ``t`` (linear
  interpolation between grid points); ``t`` is bisected to meet the target.
* :func:`cost_aware`: greedily removes the step with the smallest
  ``drop increase / MACs removed`` until the target is met.

Every strategy takes an optional ``cost`` (:class:`CostModel`): what the target
is a reduction of (MACs by default; :class:`onnxprune.latency.LatencyCost` for
measured latency) and which kept counts each group may take. With a latency
cost those are the counts where the measured time really drops (the
staircase), so no strategy makes a removal that saves no time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import numpy as np

from .errors import TargetError, UsageError
from .groups import ChannelGraph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allocation:
    """Kept channel count per group and what it achieves."""

    keep: Mapping[str, int]
    macs: int
    total_macs: int
    target: float
    strategy: str
    detail: Mapping[str, float] = field(default_factory=dict)

    @property
    def reduction(self) -> float:
        return 1.0 - self.macs / self.total_macs if self.total_macs else 0.0


def narrow_step(round_to: int) -> int:
    """The step of a group narrower than ``round_to`` (a quarter of it, at least 1): :func:`achievable`."""
    return max(round_to // 4, 1)


def achievable(channels: int, round_to: int, *, narrow: bool = True) -> np.ndarray:
    """Kept counts a group may have, ascending: multiples of ``round_to`` and the full count.

    A group narrower than the multiple can never sit on it (its full count is already off the
    block), so a multiple would only freeze it: such a group gets quarter-multiple levels instead.
    On the demo MobileNetV2 (its 8- and 12-channel residual streams feed half the MACs) this took
    the -50% plan at ``--round-to 16`` from 76.1% to 86.0% top-1 on validation images before
    fine-tuning: the frozen streams had forced deep cuts elsewhere (a 96-channel group to 16).

    ``achievable(64, 16) -> [16, 32, 48, 64]``; ``achievable(12, 16) -> [4, 8, 12]``;
    ``achievable(16, 16) -> [16]``; ``narrow=False`` keeps the old rule (``achievable(12, 16,
    narrow=False) -> [12]``), which ``--round-to auto`` uses to choose its multiple (see
    :func:`check_reachable`).
    """
    if round_to < 1:
        raise UsageError(f"--round-to must be >= 1, got {round_to}", fix="use --round-to 1 to disable rounding")
    if round_to == 1:
        return np.arange(1, channels + 1)
    step = round_to if channels >= round_to or not narrow else narrow_step(round_to)
    vals = list(range(step, channels, step)) + [channels]
    return np.array(sorted(set(vals)))


def nearest(counts: np.ndarray, want: float) -> int:
    """The achievable count nearest to ``want`` (ties go to the larger count)."""
    d = np.abs(counts - want)
    best = np.flatnonzero(d == d.min())
    return int(counts[best[-1]])


class MaskBuilder:
    """Turns kept counts into unit masks (best-scored units first) and counts MACs."""

    def __init__(self, cg: ChannelGraph, scores: np.ndarray):
        self.cg = cg
        self.scores = scores
        self.order = {}
        for g in cg.prunable_groups:
            units = np.array(g.units)
            self.order[g.id] = units[np.lexsort((np.arange(len(units)), -scores[units]))]

    def mask(self, keep: Mapping[str, int]) -> np.ndarray:
        """Best-scored units first; a Split output or channel Slice never loses all its channels
        (its best unit is kept back, and the MACs counted here include it)."""
        m = self.cg.full_mask()
        for gid, n in keep.items():
            order = self.order.get(gid)
            if order is not None and n < len(order):
                m[order[max(1, int(n)) :]] = False
        for _, units in self.cg.segments:
            if len(units) and not m[units].any():
                m[units[np.argmax(self.scores[units])]] = True
        return m

    def macs(self, keep: Mapping[str, int]) -> int:
        return self.cg.macs(self.mask(keep))


class CostModel(Protocol):
    """What a target is a reduction of. ``of(mask)`` is the cost of the model keeping the units in
    ``mask`` (``total = of(full mask)``); ``levels[gid]`` are the kept counts group ``gid`` may take,
    ascending, ending at its full count. ``what``/``flag`` name it in messages."""

    what: str
    flag: str
    total: float
    levels: Mapping[str, np.ndarray]

    def of(self, mask: np.ndarray) -> float: ...


def _check_target(target: float, flag: str = "--target-flops", what: str = "MACs") -> None:
    if not (0.0 < target < 1.0):
        raise UsageError(
            f"{flag} must be a fraction of {what} to remove between 0 and 1 (exclusive), got {target}",
            fix=f"e.g. {flag} 0.3 removes 30% of the {what}",
        )


class _Search:
    def __init__(self, cg: ChannelGraph, builder: MaskBuilder, target: float, round_to: int, cost: CostModel | None = None, narrow: bool = True):
        self.cost = cost
        what, flag = (cost.what, cost.flag) if cost is not None else ("MACs", "--target-flops")
        _check_target(target, flag, what)
        self.cg, self.builder, self.target = cg, builder, target
        self.total = cg.total_macs if cost is None else cost.total
        self.groups = list(cg.prunable_groups)
        if not self.groups:
            reasons = sorted({g.blocked_reason for g in cg.groups if g.blocked_reason})
            raise TargetError(
                "no channel group can be pruned" + (f" ({reasons[0]})" if reasons else ""),
                fix="run 'onnxprune analyze MODEL' to see why each group is blocked; check --exclude",
            )
        if cost is None:
            self.ach = {g.id: achievable(g.channels, round_to, narrow=narrow) for g in self.groups}
        else:
            self.ach = {g.id: np.asarray(cost.levels.get(g.id, [g.channels]), dtype=int) for g in self.groups}
        self.channels = {g.id: g.channels for g in self.groups}
        floor = {gid: int(a[0]) for gid, a in self.ach.items()}
        self.max_reduction = self.reduction(floor)
        if self.max_reduction < target:
            stuck = sum(len(a) == 1 for a in self.ach.values())
            why = f"at --round-to {round_to}" if cost is None else "where the measured time drops"
            raise TargetError(
                f"target of removing {target:.1%} of the {what} is unreachable: at most {self.max_reduction:.1%} can be removed "
                f"({stuck} groups cannot shrink {why}, {len(cg.groups) - len(self.groups)} are blocked)",
                fix=f"lower {flag} to at most {np.floor(self.max_reduction * 1000) / 1000:.3f}"
                + (", lower --round-to, or remove --exclude patterns" if cost is None else " or remove --exclude patterns"),
            )

    def cost_of(self, keep: Mapping[str, int]) -> float:
        return float(self.builder.macs(keep)) if self.cost is None else float(self.cost.of(self.builder.mask(keep)))

    def reduction(self, keep: Mapping[str, int]) -> float:
        return 1.0 - self.cost_of(keep) / self.total

    def refine(self, keep: dict[str, int]) -> dict[str, int]:
        """Give channels back while the target still holds (closest-to-target first)."""
        keep = dict(keep)
        while True:
            best = None
            for gid, n in keep.items():
                a = self.ach[gid]
                i = int(np.searchsorted(a, n))
                if i + 1 >= len(a):
                    continue
                trial = {**keep, gid: int(a[i + 1])}
                red = self.reduction(trial)
                if red >= self.target and (best is None or red < best[0]):
                    best = (red, gid, int(a[i + 1]))
            if best is None:
                return keep
            keep[best[1]] = best[2]

    def result(self, keep: dict[str, int], strategy: str, detail: dict, refine: bool) -> Allocation:
        if refine:
            keep = self.refine(keep)
        macs = self.builder.macs(keep)
        if self.cost is not None:
            detail = {**detail, "cost": self.cost.what, "cost_reduction": self.reduction(keep)}
        return Allocation(keep=dict(keep), macs=macs, total_macs=self.total, target=self.target, strategy=strategy, detail=detail)


def check_reachable(cg: ChannelGraph, scores: np.ndarray, *, target: float, round_to: int, cost: CostModel | None = None,
                    narrow: bool = True) -> float:
    """Raise :class:`TargetError` (with the largest reachable target) when no allocation at
    channel multiples of ``round_to`` (or the levels of ``cost``) removes ``target`` of the MACs (of
    the cost). Cheap (one count), so callers run it before any evaluation; returns the largest
    reachable reduction. ``narrow=False``: groups narrower than ``round_to`` count as frozen
    (:func:`achievable`); ``--round-to auto`` chooses its multiple so, or the quarter steps of a few
    narrow groups would make a coarse multiple "reachable" and push it onto every wide group (demo
    ResNet-20 at -30%: multiples of 16 with 4 on its 8-channel groups gave 85.3% validation top-1
    before fine-tuning, multiples of 8 gave 90.2%). Example: ``check_reachable(cg, scores, target=0.3, round_to=8)``."""
    return _Search(cg, MaskBuilder(cg, scores), target, round_to, cost, narrow=narrow).max_reduction


def _bisect(f, lo: float, hi: float, target: float, steps: int = 40) -> float:
    """Smallest x in [lo, hi] with f(x) >= target, given f(hi) >= target (staircase-safe)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def uniform(cg: ChannelGraph, scores: np.ndarray, *, target: float, round_to: int = 8, refine: bool = True, cost: CostModel | None = None) -> Allocation:
    """One ratio for every prunable group (ACRA strategy 1); ``cost``: see :class:`CostModel`."""
    s = _Search(cg, MaskBuilder(cg, scores), target, round_to, cost)

    def keep_at(r: float) -> dict[str, int]:
        return {gid: nearest(a, s.channels[gid] * (1 - r)) for gid, a in s.ach.items()}

    def red(r: float) -> float:
        return s.reduction(keep_at(r))

    grid = np.linspace(0.0, 1.0, 201)
    prev = 0.0
    hi = 1.0
    for r in grid:
        if red(float(r)) >= target:
            hi = float(r)
            break
        prev = float(r)
    r = _bisect(red, prev, hi, target)
    log.info("uniform ratio %.4f", r)
    return s.result(keep_at(r), "uniform", {"ratio": r}, refine)


@dataclass(frozen=True)
class SensitivityCurves:
    """Measured metric drop per group at each ratio of ``ratios`` (same order)."""

    metric: str
    baseline: float
    ratios: tuple[float, ...]
    drops: Mapping[str, tuple[float, ...]]

    def envelope(self, gid: str) -> tuple[np.ndarray, np.ndarray]:
        """(ratios, monotone envelope of drops), starting at (0, 0)."""
        r = np.concatenate([[0.0], np.asarray(self.ratios, dtype=float)])
        d = np.concatenate([[0.0], np.asarray(self.drops[gid], dtype=float)])
        return r, np.maximum.accumulate(np.maximum(d, 0.0))

    def drop_at(self, gid: str, ratio: float) -> float:
        r, env = self.envelope(gid)
        if ratio >= r[-1]:
            # beyond the grid: extrapolate linearly to ratio 1 with the last slope, at least flat
            slope = max((env[-1] - env[-2]) / max(r[-1] - r[-2], 1e-9), 0.0)
            return float(env[-1] + slope * (ratio - r[-1]))
        return float(np.interp(ratio, r, env))

    def ratio_under(self, gid: str, t: float) -> float:
        """Largest ratio whose envelope drop stays <= t (1.0 beyond the measured grid)."""
        r, env = self.envelope(gid)
        if env[-1] <= t:
            return 1.0 if t > env[-1] else float(r[-1])
        under = np.flatnonzero(env <= t)
        if not len(under):  # t below every drop (e.g. t < 0 during bisection): prune nothing
            return 0.0
        i = int(under[-1])
        if env[i + 1] == env[i]:
            return float(r[i])
        return float(r[i] + (t - env[i]) / (env[i + 1] - env[i]) * (r[i + 1] - r[i]))


def _curves_for(curves: SensitivityCurves, s: _Search) -> None:
    missing = [gid for gid in s.ach if gid not in curves.drops]
    if missing:
        raise UsageError(
            f"sensitivity data has no curve for groups {', '.join(missing[:5])}",
            fix="re-run the sensitivity analysis for this model (the cache may be for another model or --exclude)",
        )


def by_threshold(
    cg: ChannelGraph, scores: np.ndarray, curves: SensitivityCurves, *, target: float, round_to: int = 8, refine: bool = True,
    cost: CostModel | None = None,
) -> Allocation:
    """Largest per-group ratio under a common drop threshold, bisected on the threshold."""
    s = _Search(cg, MaskBuilder(cg, scores), target, round_to, cost)
    _curves_for(curves, s)

    def keep_at(t: float) -> dict[str, int]:
        return {gid: nearest(a, s.channels[gid] * (1 - curves.ratio_under(gid, t))) for gid, a in s.ach.items()}

    def red(t: float) -> float:
        return s.reduction(keep_at(t))

    top = max(float(max(v)) if len(v) else 0.0 for v in curves.drops.values())
    hi = max(top, 0.0) + 1.0
    if red(hi) < target:  # everything at its floor is the max reduction, checked above
        hi = 1e9
    lo = -1e-12
    grid = np.linspace(0.0, hi, 101)
    prev = lo
    for t in grid:
        if red(float(t)) >= target:
            hi = float(t)
            break
        prev = float(t)
    t = _bisect(red, prev, hi, target)
    return s.result(keep_at(t), "sensitivity", {"threshold": t}, refine)


def cost_aware(
    cg: ChannelGraph, scores: np.ndarray, curves: SensitivityCurves, *, target: float, round_to: int = 8, refine: bool = True, max_levels: int = 32,
    cost: CostModel | None = None,
) -> Allocation:
    """Greedy: remove the step with the least measured drop per removed unit of cost (a MAC, or a
    second of predicted latency) until the target holds."""
    s = _Search(cg, MaskBuilder(cg, scores), target, round_to, cost)
    _curves_for(curves, s)
    levels = {}
    for gid, a in s.ach.items():
        if len(a) > max_levels:  # coarser steps keep the greedy fast at --round-to 1
            idx = np.unique(np.linspace(0, len(a) - 1, max_levels).round().astype(int))
            a = a[idx]
        levels[gid] = a
    keep = {gid: int(a[-1]) for gid, a in levels.items()}
    pos = {gid: len(a) - 1 for gid, a in levels.items()}
    macs = s.cost_of(keep)
    goal = s.total * (1 - target)
    while macs > goal:
        best = None
        for gid, i in pos.items():
            if i == 0:
                continue
            n_new = int(levels[gid][i - 1])
            trial = {**keep, gid: n_new}
            m = s.cost_of(trial)
            saved = macs - m
            if saved <= 0:
                continue
            c = s.channels[gid]
            cost = curves.drop_at(gid, 1 - n_new / c) - curves.drop_at(gid, 1 - keep[gid] / c)
            key = (max(cost, 0.0) / saved, -saved)
            if best is None or key < best[0]:
                best = (key, gid, n_new, m)
        if best is None:
            break
        _, gid, n_new, macs = best
        keep[gid] = n_new
        pos[gid] -= 1
    return s.result(keep, "cost-aware", {}, refine)
