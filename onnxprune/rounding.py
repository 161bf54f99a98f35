"""``--round-to measured`` with a MAC target: round a group's kept count only where it buys measured speed.

A global multiple (the SIMD block, 16 with AVX-512) is right for layers that
ONNX Runtime runs blocked (NCHWc), where a count just below a multiple is
padded up or falls back to a slower kernel, so time is a staircase in the
channel count. It is wrong for layers whose time falls smoothly with channels
(small maps, Gemm heads, kernels ORT does not block): there rounding only
makes the plan coarser, which costs accuracy and overshoots the MAC target.

**Why it is not the default** (``--round-to auto`` keeps the global multiple).
Standalone layers miss what a layer off the block costs its neighbours in the
full graph (ORT inserts NCHWc reorders around it). Measured in
``benchmarks/results/latency.md`` at batch 1 on CIFAR ResNet-56 at -30% MACs:
the global multiple cut latency 23.6% (0.78x the MAC cut); this per-group
rounding, which let some groups off the block, only 6.9% (0.23x). On VGG-16:
0.78x vs 0.65x at -30%, 0.85x vs 0.71x at -50% (regenerated at 7061110). Timing the full model with one group
changed does not rescue it: tried on ResNet-56 at batch 1 (30 groups, each about 3% of
the time), four sessions of the *same* model differed by up to 5% in their fastest runs,
so one group's step is lost in session-to-session noise. What can be measured reliably is
a whole plan: ``--round-to auto --measure-latency`` times the unrounded plan against the
rounded one and keeps the multiple only when it buys measured speed (see
:func:`onnxprune.api.rounding_verdict`).

**How a group is classified.** Each compute node that a group slices (its
producers on the output axis, its consumers on the input axis, also where the
axis holds other channels: Concat, zero-padded shortcuts) is timed as a
standalone one-node model, the same way and in the same on-disk cache file as
:mod:`onnxprune.latency_table` (same settings key; points under a ``probe:``
signature so the latency tables never read them). For a few references ``m``
(multiples of the step and the full count) it is timed at ``m``, at the level
``l`` a step below, and at counts between (``m - 1`` and the midpoint), the
counts of one node timed in turn over a few rounds so that load from other
processes hits them alike. With ``T`` the group's summed times less the
per-run session overhead, smooth scaling predicts the linear interpolation
between ``T(l)`` and ``T(m)``. A probe votes *staircase* when ``T(c)`` is above
the midpoint of that prediction and ``T(m)`` (most of the promised saving is
not there) and the time wasted is material (more than 0.2% of the summed
layer times, which come from the cache: the same cache, the same decisions). A majority of votes makes a staircase. A flat curve (no count faster:
overhead-bound layers) votes *any count*: a multiple buys no speed there
either. Why these counts: the latency tables are measured at multiples only,
so they cannot tell whether a count between multiples is slower than the next
multiple up; one count just below ``m`` (padding) and one half a step below
(a fallback kernel) is the cheapest evidence. The probed points also correct
the latency model between multiples (linear on smooth groups), so the
predicted latency of the unrounded plan is not the staircase's guess.

**Levels.** Staircase groups keep
:func:`~onnxprune.latency_table.candidate_counts` (multiples of the step, the
full count, half/quarter steps for groups of at most two steps); smooth groups
keep any count. :class:`RoundedMacs` carries them as a MAC
:class:`~onnxprune.allocate.CostModel`, so every allocator uses them unchanged
and its final give-back (``_Search.refine``) guarantees that the reduction
exceeds the target by less than the finest step a group could still give back.
When the target is unreachable, staircase groups take half the step, then a
quarter..., down to 1.

**Cost and fallback.** Probes are bounded by ``time_budget`` seconds (groups
not probed in time stay on the step) and cached, so a second run measures
nothing. When nothing can be measured (no provider, a fixed batch, dynamic
dims), and for models with more than ``MAX_MEASURED_MIB`` of weights (their
tables take minutes, and their wide layers lose little to a global multiple),
:func:`rounding_setup` raises and the caller falls back to the global
multiple, saying why.

Example::

    rnd = rounding_setup(cg, resolve_settings("cpu"), cache_dir=".onnxprune-cache")
    alloc = allocate.uniform(cg, scores, target=0.3, cost=rnd.cost)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import numpy as np

from . import allocate
from .groups import ChannelGraph
from .latency_table import LatencySettings, LayerSpec, TableCache, candidate_counts, open_session, standalone, time_runs

log = logging.getLogger(__name__)

DEFAULT_TIME_BUDGET = 10.0  # seconds of probing per model (cached points cost nothing)
MAX_PROBED_MULTIPLES = 3  # multiples probed per node axis: the smallest, a middle one, the largest
PROBE_PREFIX = "probe:"
PROBE_ROUNDS = 5  # interleaved rounds per set of probed counts
MATERIAL_SHARE = 0.002  # a staircase must waste more than this share of the summed layer times to be worth a multiple
MAX_MEASURED_MIB = 64  # larger models keep the global multiple: their tables take minutes and standalone copies of wide layers cost GBs


@dataclass(frozen=True)
class GroupRounding:
    """How one group may be rounded: ``step`` 1 (smooth) or the multiple (staircase), and the votes."""

    step: int
    staircase_votes: int
    probes: int
    measured: bool  # False: not probed (no timable node, or out of time budget): kept on the step


@dataclass(frozen=True)
class Probe:
    """Per-group decisions plus what the measurement cost."""

    step: int
    groups: Mapping[str, GroupRounding]
    measured_points: int
    cached_points: int
    seconds: float
    cache_path: str | None
    out_of_time: bool = False

    def levels(self, cg: ChannelGraph, stair_step: int | None = None) -> dict[str, np.ndarray]:
        """Kept counts per prunable group: staircase groups at ``stair_step`` (default the step),
        smooth groups at any count. Ascending, ending at the full count."""
        s = self.step if stair_step is None else stair_step
        out = {}
        for g in cg.prunable_groups:
            r = self.groups.get(g.id)
            if s == 1 or (r is not None and r.step == 1):
                out[g.id] = np.arange(1, g.channels + 1)
            else:
                out[g.id] = np.asarray(candidate_counts(g.channels, s), dtype=int)
        return out


class RoundedMacs:
    """MACs as a :class:`~onnxprune.allocate.CostModel` whose ``levels`` are per-group rounded counts."""

    what = "MACs"
    flag = "--target-flops"

    def __init__(self, cg: ChannelGraph, levels: Mapping[str, np.ndarray]):
        self.cg = cg
        self.levels = dict(levels)
        self.total = float(cg.total_macs)

    def of(self, mask: np.ndarray) -> float:
        return float(self.cg.macs(mask))


# --------------------------------------------------------------------------- which nodes a group slices
def _group_axes(cg: ChannelGraph, specs: Mapping[str, LayerSpec]) -> dict[str, list[tuple[str, LayerSpec, str, int]]]:
    """Per prunable group, ``(node, spec, axis, offset)`` of each timable node whose ``axis``
    ("out"/"in") holds all of this group's channels once; ``offset`` is the number of other channels
    on that axis (a Concat, a zero-padded shortcut), which stay when the group shrinks."""
    gid_of_unit = np.full(cg.n_units, -1)
    groups = list(cg.prunable_groups)
    for k, g in enumerate(groups):
        gid_of_unit[list(g.units)] = k
    out: dict[str, list[tuple[str, LayerSpec, str, int]]] = {g.id: [] for g in groups}
    for c in cg.compute:
        spec = specs.get(c.node)
        if spec is None or spec.kind not in ("conv", "dw", "gemm"):
            continue
        for axis, atoms, dim in (("out", c.out_atoms, spec.cout), ("in", c.in_atoms, spec.cin)):
            if atoms is None or len(atoms) != dim or (axis == "in" and spec.kind == "dw"):
                continue
            owners, n_atoms = np.unique(gid_of_unit[cg.unit_of_atom[np.asarray(atoms, dtype=np.int64)]], return_counts=True)
            for k, n in zip(owners, n_atoms):
                if k >= 0 and n == groups[k].channels:
                    out[groups[k].id].append((c.node, spec, axis, dim - int(n)))
    return out


def probe_counts(channels: int, step: int, max_multiples: int = MAX_PROBED_MULTIPLES) -> list[tuple[int, int, list[int]]]:
    """``[(reference m, lower level l, [counts between])]`` to time for an axis of ``channels``.
    References are multiples of ``step`` and the full count; ``l`` is the level a step below (a
    quarter of ``m`` at the first one); the counts between are ``m - 1`` and the midpoint:
    ``probe_counts(64, 16) -> [(16, 4, [15, 10]), (48, 32, [47, 40]), (64, 48, [63, 56])]``,
    ``probe_counts(8, 16) -> [(8, 2, [7, 5])]``."""
    mults = list(range(step, channels + 1, step))
    if channels % step:  # the full count is a level too (and the only reference of a group below one step)
        mults.append(channels)
    if len(mults) > max_multiples:
        idx = np.unique(np.linspace(0, len(mults) - 1, max_multiples).round().astype(int))
        mults = [mults[i] for i in idx]
    out = []
    for m in mults:
        low = m - step if m - step >= 1 and m % step == 0 else max(1, m // 4)
        between = sorted({c for c in (m - 1, (low + m) // 2) if low < c < m}, reverse=True)
        if between:
            out.append((m, low, between))
    return out


def _point(spec: LayerSpec, axis: str, count: int) -> str:
    return f"{spec.cin}x{count}" if axis == "out" else f"{count}x{spec.cout}"


def _measure_interleaved(spec: LayerSpec, axis: str, counts: list[int], settings: LatencySettings, rounds: int) -> dict[int, float]:
    """Fastest time at each count, the counts timed in turn for ``rounds`` rounds (alternating order),
    so load from other processes hits them alike."""
    sessions = {}
    for n in counts:
        ci, co = (spec.cin, n) if axis == "out" else (n, spec.cout)
        model, feeds = standalone(spec.with_channels(n if spec.kind == "dw" else ci, co), settings.batch)
        sessions[n] = (open_session(model, settings), feeds)
    best = {n: float("inf") for n in counts}
    for r in range(rounds):
        for n in counts if r % 2 == 0 else counts[::-1]:
            sess, feeds = sessions[n]
            best[n] = min(best[n], time_runs(sess, feeds, min_runs=3, min_seconds=0.01, max_runs=200, warmup=1 if r else 2))
    return best


@dataclass(frozen=True)
class ProbeTimes:
    """Seconds (overhead not subtracted) per ``(node spec key, axis)`` and count."""

    times: Mapping[tuple[str, str], Mapping[int, float]]


def probe_groups(
    cg: ChannelGraph,
    specs: Mapping[str, LayerSpec],
    settings: LatencySettings,
    *,
    cache_dir=None,
    overhead: float = 0.0,
    model_seconds: float = 0.0,
    eps: float = MATERIAL_SHARE,
    rounds: int = PROBE_ROUNDS,
    time_budget: float = DEFAULT_TIME_BUDGET,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Probe, ProbeTimes]:
    """Time each group's nodes at levels and between them (cached) and classify the group.

    For a reference ``m`` with lower level ``l`` and a count ``c`` between, with ``T`` the group's
    summed node times less overhead: smooth scaling predicts ``T(c) = T(l) + (c-l)/(m-l) (T(m)-T(l))``.
    The probe votes *staircase* when ``T(c)`` is above the midpoint of that and ``T(m)`` (most of the
    saving a count below ``m`` promises is not there) and the time so wasted is material (more than
    ``eps`` of ``model_seconds``). Otherwise rounding buys nothing there: a flat curve (no count
    faster) and a smooth one both vote *any count*."""
    t0 = time.perf_counter()
    step = settings.step
    cache = TableCache(cache_dir, settings)
    axes = _group_axes(cg, specs)
    measured = cached = 0
    out_of_time = False
    times: dict[tuple[str, str], dict[int, float]] = {}

    def axis_times(spec: LayerSpec, axis: str, counts: list[int]) -> dict[int, float] | None:
        nonlocal measured, cached, out_of_time
        key = PROBE_PREFIX + spec.key()
        have = {n: cache.get(key, _point(spec, axis, n)) for n in counts}
        missing = [n for n, v in have.items() if v is None]
        cached += len(counts) - len(missing)
        if missing:
            if time.perf_counter() - t0 > time_budget:
                out_of_time = True
                return None
            for n, v in _measure_interleaved(spec, axis, missing, settings, rounds).items():
                cache.put(key, _point(spec, axis, n), v)
                have[n] = v
            measured += len(missing)
        times.setdefault((spec.key(), axis), {}).update(have)
        return have

    groups: dict[str, GroupRounding] = {}
    prunable = list(cg.prunable_groups)
    try:
        for k, g in enumerate(prunable):
            if progress:
                progress(k, len(prunable))
            pairs = axes.get(g.id) or []
            votes = probes = 0
            complete = bool(pairs)
            for m, low, between in probe_counts(g.channels, step) if pairs else ():
                got = [(off, axis_times(spec, axis, [off + n for n in (low, *between, m)])) for _, spec, axis, off in pairs]
                if any(v is None for _, v in got):
                    complete = False
                    break

                def total(n: int) -> float:
                    return sum(max(t[off + n] - overhead, 0.0) for off, t in got)

                for c in between:
                    smooth = total(low) + (c - low) / (m - low) * (total(m) - total(low))
                    probes += 1
                    votes += total(c) > (smooth + total(m)) / 2 and total(c) - smooth > eps * model_seconds
            measured_ok = complete and probes > 0
            staircase = 2 * votes > probes if measured_ok else True
            groups[g.id] = GroupRounding(step if staircase else 1, votes, probes, measured_ok)
            log.debug("group %s: %d/%d probes say staircase -> step %d", g.id, votes, probes, groups[g.id].step)
        if progress:
            progress(len(prunable), len(prunable))
    finally:
        cache.flush()
    probe = Probe(step, groups, measured, cached, time.perf_counter() - t0, str(cache.path) if cache.path else None, out_of_time)
    return probe, ProbeTimes(times)


# --------------------------------------------------------------------------- predictions between multiples
def corrected_model(lm, cg: ChannelGraph, specs: Mapping[str, LayerSpec], probe: Probe, times: ProbeTimes, overhead: float):
    """A copy of the latency model whose per-node curves include the probed counts; on axes of
    smooth groups, time between measured counts is interpolated linearly instead of costing the
    next count up (the tables assume a staircase everywhere). Refitted, so the full model stays exact."""
    import copy

    from .latency_table import lookup

    axis_group = {(node, axis): gid for gid, lst in _group_axes(cg, specs).items() for node, _, axis, off in lst if off == 0}
    from .latency import node_specs

    nodes = []
    for (name, spec), n in zip(node_specs(cg), lm.nodes):
        if n.kind not in ("conv", "dw", "gemm") or spec.kind not in ("conv", "dw", "gemm"):
            nodes.append(n)
            continue
        tab = lm.build.tables.get(name)
        arrays = {}
        for axis, arr, base in (("out", n.f_out, tab.out_curve if tab else {}), ("in", n.f_in, tab.in_curve if tab else {})):
            gid = axis_group.get((name, axis))
            extra = times.times.get((spec.key(), axis))
            if arr is None or gid is None or not extra or tab is None:
                continue
            curve = {**base, **extra}
            channels = len(arr) - 1
            if probe.groups[gid].step == 1:
                pts = sorted(curve)
                v = np.interp(np.arange(channels + 1), [0, *pts], [0.0, *[curve[p] for p in pts]])
            else:
                v = np.array([lookup(curve, max(c, 1), probe.step) for c in range(channels + 1)], dtype=float)
            v[0] = 0.0
            arrays["f_out" if axis == "out" else "f_in"] = np.maximum(v - overhead, 0.0)
        nodes.append(replace(n, **arrays) if arrays else n)
    out = copy.copy(lm)
    out.nodes = nodes
    out.fit()
    return out


# --------------------------------------------------------------------------- the whole setup
@dataclass(eq=False)
class AutoRounding:
    """What ``--round-to measured`` decided for a MAC target: the probe, the latency model (for
    predicted latency of rounded and unrounded plans), and the cost the allocators take."""

    probe: Probe
    lm: object  # onnxprune.latency.LatencyModel, with the probed counts
    cost: RoundedMacs
    stair_step: int
    notes: list = field(default_factory=list)

    def predicted_ms(self, mask: np.ndarray | None) -> float:
        return 1e3 * float(self.lm.predict(mask))


def rounding_setup(
    cg: ChannelGraph,
    settings: LatencySettings,
    *,
    cache_dir=None,
    rounds: int = 5,
    time_budget: float = DEFAULT_TIME_BUDGET,
    max_mib: float = MAX_MEASURED_MIB,
    progress: Callable[[str, int, int], None] | None = None,
) -> AutoRounding:
    """Latency tables (cached), per-group probes and the rounded MAC cost for ``cg``.

    Raises an :class:`~onnxprune.errors.OnnxPruneError` when latency cannot be measured, or the
    model's weights exceed ``max_mib`` MiB; the caller falls back to the global multiple."""
    from .errors import UsageError
    from .latency import build_latency_model, node_specs
    from .tensors import tensor_nbytes

    mib = sum(tensor_nbytes(t) for t in cg.model.graph.initializer) / 2**20
    if mib > max_mib:
        # Measured on a loaded 2-core machine: ResNet-50 (97 MiB) took 83 s of tables + probes; a 2.1 GB VGG
        # reached 16.6 GB RSS. Wide layers lose little to a global multiple, so they are not worth measuring.
        raise UsageError(
            f"the model holds {mib:.0f} MiB of weights (above {max_mib} MiB): measuring its layers would take minutes",
            fix="pass --round-to 16 (or 8, or 1) to choose the multiple yourself, or --target-latency to prune for measured time",
        )
    prog = progress or (lambda s, d, t: None)
    lm = build_latency_model(cg, settings, cache_dir=cache_dir, rounds=rounds, progress=lambda d, t: prog("latency table", d, t))
    overhead = lm.build.tables["__overhead__"].full if "__overhead__" in lm.build.tables else 0.0
    specs = dict(node_specs(cg))
    # materiality against the summed layer times (from the cache): the same cache gives the same decisions
    probe, times = probe_groups(cg, specs, settings, cache_dir=cache_dir, overhead=overhead, model_seconds=lm.full_parts[0],
                                time_budget=time_budget, progress=lambda d, t: prog("rounding probe", d, t))
    notes = []
    if probe.out_of_time:
        notes.append(f"probing stopped after its {time_budget:g} s budget: unprobed groups keep multiples of {probe.step}")
    lm = corrected_model(lm, cg, specs, probe, times, overhead)
    return AutoRounding(probe, lm, RoundedMacs(cg, probe.levels(cg)), probe.step, notes)


def allocate_rounded(rnd: AutoRounding, cg: ChannelGraph, run: Callable[[allocate.CostModel], allocate.Allocation]) -> allocate.Allocation:
    """``run(cost)`` with staircase groups on the step; on :class:`~onnxprune.errors.TargetError`
    they take half the step, a quarter..., down to 1 (smooth groups always take any count)."""
    from .errors import TargetError

    s = rnd.probe.step
    while True:
        cost = rnd.cost if s == rnd.probe.step else RoundedMacs(cg, rnd.probe.levels(cg, s))
        try:
            alloc = run(cost)
        except TargetError:
            if s <= 1:
                raise
            log.info("target unreachable with staircase groups on multiples of %d; trying %d", s, max(s // 2, 1))
            s = max(s // 2, 1)
            continue
        rnd.stair_step = s
        return alloc


def global_rounding_detail(cg: ChannelGraph, rounded: np.ndarray, unrounded: np.ndarray, round_to: int) -> dict:
    """Report detail for ``--round-to auto`` (every group on one multiple, the groups narrower than
    it on a quarter of it: :func:`onnxprune.allocate.achievable`): MAC reductions of the rounded
    and the unrounded (round-to 1) plan from the same data; the caller adds accuracy (with data)
    and measured latency (with ``--measure-latency``)."""
    return {
        "mode": "global",
        "round_to": int(round_to),
        "narrow_groups": sum(1 for g in cg.prunable_groups if g.channels < round_to),
        "narrow_step": allocate.narrow_step(int(round_to)),
        "reduction": 1 - cg.macs(rounded) / cg.total_macs,
        "unrounded_reduction": 1 - cg.macs(unrounded) / cg.total_macs,
        "unrounded_keep": {g.id: int(unrounded[list(g.units)].sum()) for g in cg.prunable_groups},
    }


def rounding_detail(rnd: AutoRounding, cg: ChannelGraph, rounded: np.ndarray, unrounded: np.ndarray) -> dict:
    """Report detail: groups per decision, reductions and predicted latency of both plans."""
    n_stair = sum(1 for r in rnd.probe.groups.values() if r.step > 1)
    full = rnd.predicted_ms(None)
    return {
        "mode": "auto",
        "step": rnd.probe.step,
        "staircase_step": rnd.stair_step,
        "staircase_groups": n_stair,
        "smooth_groups": len(rnd.probe.groups) - n_stair,
        "groups": {gid: {"step": r.step, "staircase_votes": r.staircase_votes, "probes": r.probes, "measured": r.measured}
                   for gid, r in rnd.probe.groups.items()},
        "reduction": 1 - cg.macs(rounded) / cg.total_macs,
        "unrounded_reduction": 1 - cg.macs(unrounded) / cg.total_macs,
        "unrounded_keep": {g.id: int(unrounded[list(g.units)].sum()) for g in cg.prunable_groups},
        "original_predicted_ms": full,
        "predicted_ms": rnd.predicted_ms(rounded),
        "unrounded_predicted_ms": rnd.predicted_ms(unrounded),
        "settings": rnd.lm.settings.describe(),
        "probe": {"measured_points": rnd.probe.measured_points, "cached_points": rnd.probe.cached_points,
                  "seconds": rnd.probe.seconds, "cache": rnd.probe.cache_path},
        "notes": list(rnd.notes),
    }
