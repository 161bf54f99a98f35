"""The closed loop of latency-targeted pruning, and honest notes for MAC targets.

* :func:`closed_loop`: allocate for a predicted cut, measure original and pruned
  interleaved (:func:`onnxprune.latency.measure_pair`), refit the latency model
  and correct the request by what it still misses, a bounded number of times;
  every iteration is kept for the report (:func:`loop_detail`).
* :func:`mac_cut_warning` / :func:`measured_mac_note`: ``--target-flops`` runs
  say when the MAC cut will not (or did not) make the model as much faster,
  and suggest ``--target-latency``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnx

from .errors import TargetError
from .groups import ChannelGraph
from .latency import (
    DEFAULT_ITERATIONS,
    DEFAULT_MAX_SPREAD,
    DEFAULT_ROUNDS,
    DEFAULT_TOLERANCE,
    LatencyCost,
    LatencyModel,
    measure_pair,
    model_feeds,
)

log = logging.getLogger(__name__)

MAX_BIAS = 0.2  # the correction never trusts one measured point for more than this share of the latency


# --------------------------------------------------------------------------- closed loop
@dataclass(frozen=True)
class Iteration:
    index: int
    predicted_target: float  # the cut of predicted latency asked of the allocation
    predicted_cut: float
    predicted_ms: float
    measured_ms: float
    original_ms: float
    measured_cut: float
    macs_cut: float
    spread: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured latency of the pruned model, both relative to the original
        measured with it (``(1 - predicted cut) / (1 - measured cut) - 1``: drift between rounds cancels)."""
        return (1 - self.predicted_cut) / (1 - self.measured_cut) - 1 if self.measured_cut < 1 else 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "error": self.error}


@dataclass(frozen=True, eq=False)
class LoopResult:
    allocation: object
    mask: np.ndarray
    pruned: onnx.ModelProto
    iterations: tuple[Iteration, ...]
    chosen: int  # index into iterations
    reached: bool


def closed_loop(
    *,
    target: float,
    lm: LatencyModel,
    allocate_fn: Callable[[float], object],
    to_mask: Callable[[Mapping[str, int]], np.ndarray],
    apply: Callable[[np.ndarray], onnx.ModelProto],
    max_reduction: float,
    cost: LatencyCost | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    iterations: int = DEFAULT_ITERATIONS,
    rounds: int = DEFAULT_ROUNDS,
    max_spread: float = DEFAULT_MAX_SPREAD,
    feeds: Mapping[str, np.ndarray] | None = None,
    on_iteration: Callable[[Iteration], None] | None = None,
) -> LoopResult:
    """Allocate for a predicted cut, measure original vs pruned interleaved, and correct until the
    measured cut is within ``tolerance`` of ``target`` or ``iterations`` are spent.

    Correction: every measured ``(mask, ratio)`` refits the residual split of the model
    (:meth:`LatencyModel.refit`; ``cost``'s levels are recomputed), and the next allocation asks
    for ``target - e``, where ``e`` is what the refitted model still gets wrong at the last point
    (measured cut - predicted cut); once one iteration fell short and another overshot, the
    request is interpolated between the two closest (regula falsi: the staircase is monotone
    in the request, the model error need not be; after two misses on one side the other end counts half, the Illinois variant). A request that gives channels already measured ends the loop. Each iteration's prediction is the one made before its
    measurement, with that bias added (what earlier iterations measured). Returns the iteration
    closest to the target."""
    feeds = feeds if feeds is not None else model_feeds(lm.cg, lm.settings.batch)
    total_macs = lm.cg.total_macs or 1
    points: list[tuple[np.ndarray, float]] = []
    done: list[tuple[Iteration, object, np.ndarray, onnx.ModelProto]] = []
    asked: list[float] = []
    limit = max_reduction
    # bias: measured cut - model cut at the last point (what the refit model still misses); a target
    # just past the predicted limit (within the tolerance) starts at the limit and lets the measurement decide
    ask, bias = min(target, limit - 1e-6), 0.0
    at_limit = target >= limit - 1e-6  # asked for the largest reachable cut
    floor_measured = False  # and measured it
    for i in range(max(1, iterations)):
        try:
            alloc = allocate_fn(ask)
        except TargetError:
            if not done:
                raise
            break  # the correction asks for more than the refitted model can reach: keep the best so far
        if any(dict(alloc.keep) == dict(d[1].keep) for d in done):
            floor_measured = floor_measured or at_limit
            break  # the staircase gives the same channels again: nothing new to measure
        floor_measured = floor_measured or at_limit
        asked.append(ask)
        mask = to_mask(alloc.keep)
        pruned = apply(mask)
        pred = lm.predict(mask) / lm.measured - bias  # predicted ratio pruned / original, before this measurement
        m = measure_pair(lm.cg.model, pruned, lm.settings, feeds, rounds=rounds, max_spread=max_spread)
        it = Iteration(i + 1, ask, 1 - pred, 1e3 * pred * m.a, 1e3 * m.b, 1e3 * m.a,
                       m.cut, 1 - lm.cg.macs(mask) / total_macs, m.spread)
        done.append((it, alloc, mask, pruned))
        if on_iteration:
            on_iteration(it)
        log.info("latency loop %d: asked %.3f predicted, measured cut %.3f", i + 1, ask, m.cut)
        if abs(m.cut - target) <= tolerance:
            break
        points.append((mask, m.ratio))
        lm.refit(points)
        if cost is not None:
            cost.refresh()
            floor = {gid: int(lv[0]) for gid, lv in cost.levels.items()}
            limit = 1 - cost.of(cost.builder.mask(floor)) / cost.total  # the refit moves the reachable cut
        bias = min(max(m.cut - (1 - lm.predict(mask) / lm.measured), -MAX_BIAS), MAX_BIAS)
        tried = [(d[0].predicted_target, d[0].measured_cut) for d in done]
        under = max((t for t in tried if t[1] < target), key=lambda t: t[1], default=None)
        over = min((t for t in tried if t[1] > target), key=lambda t: t[1], default=None)
        if under and over and over[0] != under[0]:  # bracketed: interpolate the request between the closest misses
            w_under, w_over = target - under[1], over[1] - target
            sides = [d[0].measured_cut > target for d in done]
            if len(sides) >= 2 and sides[-1] == sides[-2]:
                # Illinois step: two misses on one side in a row, so the kept end of the bracket counts
                # half; plain regula falsi creeps along a flat side when the staircase jumps at the other
                w_under, w_over = (w_under / 2, w_over) if sides[-1] else (w_under, w_over / 2)
            ask = under[0] + w_under * (over[0] - under[0]) / (w_under + w_over)
        else:
            ask = target - bias
        at_limit = ask >= limit - 1e-6
        ask = min(max(ask, 1e-3), limit - 1e-6)
        if any(abs(ask - a) < 1e-4 for a in asked):
            floor_measured = floor_measured or at_limit
            break  # the same request again: the staircase cannot land closer
    best = min(range(len(done)), key=lambda k: (abs(done[k][0].measured_cut - target) > tolerance, abs(done[k][0].measured_cut - target)))
    it, alloc, mask, pruned = done[best]
    most = max(d[0].measured_cut for d in done)
    if floor_measured and most < target - tolerance:
        raise TargetError(
            f"target of removing {target:.1%} of the measured latency is unreachable ({lm.settings.describe()}): the largest cut measured "
            f"was {most:.1%}, with every group at its smallest count where the time still drops ({len(done)} iterations); nothing was written",
            fix=f"lower --target-latency to at most {np.floor(most * 1000) / 1000:.3f}, or measure at a larger --latency-batch",
        )
    return LoopResult(alloc, mask, pruned, tuple(d[0] for d in done), best, abs(it.measured_cut - target) <= tolerance)


# --------------------------------------------------------------------------- MAC mode, honestly
def mac_cut_warning(cg: ChannelGraph, mask: np.ndarray, step: int, *, share: float = 0.5) -> str | None:
    """A note when much of a MAC cut sits where ONNX Runtime's time does not follow MACs: depthwise
    convs, layers left with fewer than two ``step``s of input or output channels or counts that are
    not multiples of it (narrow convs are slower per MAC, odd counts get reorders), and small
    spatial maps (at most 4x4). None when under ``share`` of the removed MACs are there."""
    kept = cg.atom_kept(mask)
    removed = weak = 0
    reasons = set()
    for c in cg.compute:
        co_all = len(c.out_atoms)
        ci_all = c.in_fixed if c.in_atoms is None else len(c.in_atoms)
        co = int(kept(c.out_atoms).sum())
        ci = c.in_fixed if c.in_atoms is None else int(kept(c.in_atoms).sum())
        r = c.spatial * c.kernel * (co_all * ci_all - co * ci)
        if r <= 0:
            continue
        removed += r
        why = ("depthwise convs" if c.in_atoms is None else
               "thin layers" if min(co, ci) < 2 * step or co % step or ci % step else
               "small spatial maps" if 1 < c.spatial <= 16 else None)
        if why:
            weak += r
            reasons.add(why)
    if not removed or weak / removed < share:
        return None
    return (f"{weak / removed:.0%} of the removed MACs are in {', '.join(sorted(reasons))}, where ONNX Runtime's time does not "
            "fall with MACs: the latency cut may be well below the MAC cut. Check with --measure-latency, or prune for time with --target-latency")


def measured_mac_note(latency_cut: float, macs_cut: float, *, ratio: float = 0.9) -> str | None:
    """A note when the measured latency cut is below ``ratio`` x the MAC cut."""
    if macs_cut <= 0 or latency_cut >= ratio * macs_cut:
        return None
    moved = f"fell {latency_cut:.1%}" if latency_cut >= 0 else f"rose {-latency_cut:.1%}"
    return (f"the measured latency {moved} for {macs_cut:.1%} fewer MACs ({latency_cut / macs_cut:.2f} x): on this runtime "
            f"the removed channels are not where the time is. Use --target-latency {macs_cut:.2f} to prune for time")


def loop_detail(lm: LatencyModel, loop: LoopResult, *, target: float, tolerance: float, max_reduction: float) -> dict:
    """What the report keeps of a latency-targeted run (JSON-ready; times in ms, cuts as fractions)."""
    it = loop.iterations[loop.chosen]
    b = lm.build
    return {
        "target": target, "tolerance": tolerance, "reached": loop.reached, "settings": lm.settings.describe(),
        "provider": lm.settings.provider, "batch": lm.settings.batch, "threads": lm.settings.threads,
        "original_ms": it.original_ms, "pruned_ms": it.measured_ms, "measured_cut": it.measured_cut,
        "predicted_ms": it.predicted_ms, "predicted_cut": it.predicted_cut, "error": it.error, "spread": it.spread,
        "macs_cut": it.macs_cut, "max_predicted_cut": max_reduction, "chosen_iteration": it.index,
        "iterations": [i.to_dict() for i in loop.iterations],
        "table": {"measured_points": b.measured, "cached_points": b.cached, "seconds": b.seconds, "cache": b.cache_path},
        "original_spread": lm.timing.spread,
    }
