"""Latency as the pruning target: a latency model measured on the runtime, and the closed loop.

* :class:`LatencyModel` predicts the end-to-end time of the model keeping the
  units of a mask: ``T(mask) + R * A(mask) / A(full)``, where ``T`` sums the
  per-layer tables of :mod:`onnxprune.latency_table` (standalone layers, their
  session overhead subtracted) and ``R = measured(full) - T(full)`` is the
  residual: what the layers alone miss (elementwise ops, pooling, layout
  reorders, the per-run overhead), spread over the nodes in proportion to the
  activation volume they write (``A``: kept output channels x spatial size,
  which is what elementwise work scales with). So the prediction equals the
  measured time of the unpruned model exactly, and the fit is refreshed by
  every end-to-end measurement of the closed loop.
* :func:`useful_levels`: the counts a group may take are those where the
  predicted time really drops (by more than ``eps`` of the model's time)
  compared with the next larger useful count: allocation works on the
  measured staircase and never makes a removal that saves no time.
* :class:`LatencyCost` is the cost function :mod:`onnxprune.allocate` takes.
* :func:`measure_pair` times original and pruned interleaved (A, B, A, B...),
  medians over rounds, and refuses figures whose spread is above a bound.

The closed loop (allocate, measure, correct) is in :mod:`onnxprune.latency_loop`.

Example::

    settings = resolve_settings("cpu", batch=1, threads=2)
    lm = build_latency_model(cg, settings, cache_dir=".onnxprune-cache")
    cost = LatencyCost(lm, MaskBuilder(cg, scores))
    alloc = allocate.uniform(cg, scores, target=0.3, cost=cost)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from .errors import UsageError
from .groups import ChannelGraph
from .latency_table import (
    LatencySettings,
    LayerSpec,
    MeasurementError,
    TableBuild,
    build_tables,
    candidate_counts,
    layer_spec,
    lookup,
    open_session,
    time_runs,
)
from .runtime import data_inputs

log = logging.getLogger(__name__)

USEFUL_EPS = 0.001  # a step must save more than this share of the model's time to be a level
DEFAULT_MAX_SPREAD = 0.2
DEFAULT_TOLERANCE = 0.02
DEFAULT_ITERATIONS = 6
DEFAULT_ROUNDS = 15


# --------------------------------------------------------------------------- inputs
def model_feeds(cg: ChannelGraph, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every data input of ``cg.model`` at ``batch`` (dynamic dims from the analysis)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in data_inputs(cg.model):
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
        known = cg.shapes.get(i.name) or ()
        if dims and dims[0] is not None and dims[0] != batch:
            raise UsageError(
                f"model input '{i.name}' has a fixed batch of {dims[0]}, so latency cannot be measured at batch {batch}",
                fix=f"pass --latency-batch {dims[0]}, or export the model with a dynamic batch axis",
            )
        shape = [batch] + [d if d is not None else (known[k + 1] if len(known) > k + 1 and isinstance(known[k + 1], int) else None) for k, d in enumerate(dims[1:])]
        if any(d is None for d in shape):
            raise UsageError(f"model input '{i.name}' has dynamic dims {dims}", fix="pass --input-shape NAME:1x3x224x224")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else np.float32
        feeds[i.name] = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype)
    return feeds


# --------------------------------------------------------------------------- end-to-end timing
@dataclass(frozen=True)
class PairTiming:
    """Interleaved timing: medians (seconds) of A and B, median of per-round ratios B/A, and the
    spread (interquartile range / median) of the ratios (of A's times when there is no B)."""

    a: float
    b: float | None
    ratio: float | None
    spread: float
    rounds: int
    a_min: float = 0.0  # fastest round of A: the least disturbed figure, comparable with the per-layer tables

    @property
    def cut(self) -> float | None:
        return None if self.ratio is None else 1.0 - self.ratio


def _spread(v: Sequence[float]) -> float:
    q25, q50, q75 = np.percentile(np.asarray(v, dtype=float), [25, 50, 75])
    return float((q75 - q25) / q50) if q50 > 0 else float("inf")


def measure_pair(
    a: onnx.ModelProto | bytes,
    b: onnx.ModelProto | bytes | None,
    settings: LatencySettings,
    feeds: Mapping[str, np.ndarray],
    *,
    rounds: int = DEFAULT_ROUNDS,
    max_spread: float = DEFAULT_MAX_SPREAD,
    round_seconds: float = 0.02,
    check: bool = True,
) -> PairTiming:
    """Time ``a`` (and ``b``) end to end on ``settings``: every round times each model as the
    fastest of ``k`` runs (``k`` so a round lasts ``round_seconds``), alternating which goes first.
    Raises :class:`MeasurementError` when the spread exceeds ``max_spread`` (unless ``check`` is off)."""
    sessions = [open_session(m, settings) for m in (a, b) if m is not None]
    first = time_runs(sessions[0], feeds, min_runs=1, max_runs=3, warmup=2)
    for s in sessions[1:]:
        time_runs(s, feeds, min_runs=1, max_runs=1, warmup=2)
    k = max(1, min(20, math.ceil(round_seconds / max(first, 1e-6))))
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(max(3, int(rounds))):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for j in order:
            times[j].append(time_runs(sessions[j], feeds, min_runs=k, min_seconds=0.0, max_runs=k, warmup=0))
    ta = float(np.median(times[0]))
    if b is None:
        timing = PairTiming(ta, None, None, _spread(times[0]), len(times[0]), float(min(times[0])))
    else:
        ratios = [y / x for x, y in zip(times[0], times[1])]
        timing = PairTiming(ta, float(np.median(times[1])), float(np.median(ratios)), _spread(ratios), len(ratios), float(min(times[0])))
    if check and timing.spread > max_spread:
        raise MeasurementError(
            f"latency measurement too noisy to trust: spread (IQR / median over {timing.rounds} interleaved rounds) "
            f"{timing.spread:.1%} is above the bound {100 * max_spread:.3g}% ({settings.describe()}, median {1e3 * ta:.3f} ms)",
            fix="measure on an idle machine, with --latency-threads below the free cores (e.g. 1), a larger --latency-batch, "
            "or more --latency-repeats; --latency-max-spread sets the bound",
        )
    return timing


# --------------------------------------------------------------------------- the latency model
@dataclass(frozen=True, eq=False)
class _NodeCost:
    kind: str
    spatial: int
    full: float
    f_out: np.ndarray  # seconds at each kept output count 0..C
    f_in: np.ndarray | None  # seconds at each kept input count (None: depthwise / one axis)
    out_atoms: np.ndarray
    in_atoms: np.ndarray | None
    kernel: int = 1  # kernel elements (weights per output and input channel)


def node_specs(cg: ChannelGraph) -> list[tuple[str, LayerSpec]]:
    """``(node name, LayerSpec)`` of every compute node of ``cg``."""
    by_name = {n.name: n for n in cg.model.graph.node}
    consts = {t.name: tuple(t.dims) for t in cg.model.graph.initializer}
    return [(c.node, layer_spec(by_name[c.node], cg.shapes, consts)) for c in cg.compute if c.node in by_name]


def _curve_array(curve: Mapping[int, float], channels: int, step: int, overhead: float) -> np.ndarray:
    v = np.array([lookup(curve, max(c, 1), step) for c in range(channels + 1)], dtype=float)
    v[0] = 0.0
    return np.maximum(v - overhead, 0.0)


@dataclass(eq=False)
class LatencyModel:
    """Predicted end-to-end seconds for a unit mask of ``cg`` (see the module docstring)."""

    cg: ChannelGraph
    settings: LatencySettings
    nodes: list
    measured: float  # the unpruned model, end to end: fastest round (the tables are fastest runs too)
    build: TableBuild
    timing: PairTiming
    residual: float = 0.0
    theta: float = 0.5  # share of the residual that scales with weights (the rest with activations)
    full_parts: tuple = (1.0, 1.0, 1.0)

    def parts(self, mask: np.ndarray | None) -> tuple[float, float, float]:
        """(sum of per-layer times, activation volume, weight count) for ``mask`` (None: the full model)."""
        kept = self.cg.atom_kept(mask if mask is not None else self.cg.full_mask())
        t = act = wts = 0.0
        for n in self.nodes:
            co = int(kept(n.out_atoms).sum())
            act += co * n.spatial
            wts += co * n.kernel * (1 if n.in_atoms is None else int(kept(n.in_atoms).sum()))
            if n.kind == "dw":
                t += n.f_out[co]
            elif n.kind in ("conv", "gemm"):
                ci = len(n.f_in) - 1 if n.in_atoms is None else int(kept(n.in_atoms).sum())
                if n.full > 0:
                    t += n.f_out[co] * n.f_in[ci] / n.full
            else:  # grouped conv, ConvTranspose...: the full-size time scaled by kept MACs
                ci_all = 1 if n.in_atoms is None else len(n.in_atoms)
                ci = 1 if n.in_atoms is None else int(kept(n.in_atoms).sum())
                t += n.full * co * ci / max(len(n.out_atoms) * ci_all, 1)
        return t, act, wts

    def _residual_share(self, act: float, wts: float) -> float:
        _, a_full, w_full = self.full_parts
        return self.theta * wts / max(w_full, 1e-12) + (1 - self.theta) * act / max(a_full, 1e-12)

    def predict(self, mask: np.ndarray | None = None) -> float:
        t, act, wts = self.parts(mask)
        if self.residual < 0:  # the standalone layers are slower than in the model: every node scaled down alike
            return t * self.measured / max(self.full_parts[0], 1e-12)
        return t + self.residual * self._residual_share(act, wts)

    def fit(self) -> None:
        """``R`` from the measured original: the prediction of the unpruned model is exact (the
        anchor of every cut). ``R`` is spread over the nodes by the activations they write and the
        weights they read, half and half until :meth:`refit` has measured pruned models. When the
        standalone layers add up to more than the model (``R < 0``: fused ops, warm caches across
        layers), every node's time is scaled by ``measured / T(full)`` instead, so no prediction
        goes negative."""
        self.full_parts = self.parts(None)
        self.residual = self.measured - self.full_parts[0]

    def refit(self, points: Sequence[tuple[np.ndarray, float]]) -> None:
        """Least-squares ``theta`` (weights vs activations share of the residual, in [0, 1]) from
        measured ``(mask, pruned/original ratio)`` points; the anchor stays exact.
        ``ratio * L - T - R * a = theta * R * (w - a)`` is linear in ``theta``."""
        if not points or self.residual <= 0:  # no residual to split (a negative one scales the tables)
            return
        _, a_full, w_full = self.full_parts
        num = den = 0.0
        for mask, ratio in points:
            t, act, wts = self.parts(mask)
            a, w = act / max(a_full, 1e-12), wts / max(w_full, 1e-12)
            x = self.residual * (w - a)
            num += (ratio * self.measured - t - self.residual * a) * x
            den += x * x
        if den > 0:
            self.theta = float(min(max(num / den, 0.0), 1.0))


def build_latency_model(
    cg: ChannelGraph,
    settings: LatencySettings,
    *,
    cache_dir=None,
    rounds: int = DEFAULT_ROUNDS,
    max_spread: float = DEFAULT_MAX_SPREAD,
    progress: Callable[[int, int], None] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> LatencyModel:
    """Measure the tables of ``cg``'s layers (or read them from ``cache_dir``) and the model end to end."""
    specs = node_specs(cg)
    build = build_tables(specs + [("__overhead__", _OVERHEAD)], settings, cache_dir=cache_dir, progress=progress)
    overhead = build.tables["__overhead__"].full
    feeds = feeds if feeds is not None else model_feeds(cg, settings.batch)
    # the anchor of the fit: its fastest round (consistent with the tables); reported cuts come from the
    # interleaved pairs of the closed loop, whose spread is checked
    timing = measure_pair(cg.model, None, settings, feeds, rounds=rounds, max_spread=max_spread, check=False)
    step = settings.step
    cmaps = {c.node: c for c in cg.compute}
    nodes = []
    for name, spec in specs:
        c, tab = cmaps[name], build.tables.get(name)
        cout = len(c.out_atoms)
        if tab is None or spec.kind == "other" or spec.cout != cout:
            full = max(tab.full - overhead, 0.0) if tab is not None else 0.0
            nodes.append(_NodeCost("other", c.spatial, full, np.zeros(cout + 1), None, c.out_atoms, c.in_atoms, c.kernel))
            continue
        f_out = _curve_array(tab.out_curve, spec.cout, step, overhead)
        f_in = _curve_array(tab.in_curve, spec.cin, step, overhead) if spec.kind != "dw" else None
        kind = spec.kind
        if kind != "dw" and c.in_atoms is not None and len(c.in_atoms) != spec.cin:
            kind = "other"  # the analysis counts inputs differently (e.g. Flatten rows): scale by MACs
        nodes.append(_NodeCost(kind, c.spatial, max(tab.full - overhead, 0.0), f_out, f_in, c.out_atoms, c.in_atoms, c.kernel))
    lm = LatencyModel(cg, settings, nodes, timing.a_min, build, timing)
    lm.fit()
    return lm


_OVERHEAD = LayerSpec("other", 1, 1, 1, (1,), (1,), (0, 0), (1,), (1,), False)  # a 1x1x1 conv: the per-run cost of any standalone model


# --------------------------------------------------------------------------- allocation on the staircase
def useful_levels(lm: LatencyModel, builder, *, eps: float = USEFUL_EPS, round_to: int | None = None) -> dict[str, np.ndarray]:
    """Per prunable group, the candidate kept counts (:func:`~onnxprune.latency_table.candidate_counts`)
    at which the predicted time, with every other group full, is lower than at the next larger
    useful count by more than ``eps`` of the model's time. Ascending, ending at the full count.
    ``round_to`` (an explicit ``--round-to N``): the candidates are the multiples of N and the
    full count instead, e.g. ``[8, 16, 24, 32]`` for 32 channels at N = 8 (before the time filter)."""
    total = lm.predict(None)
    out = {}
    for g in lm.cg.prunable_groups:
        if round_to is None:
            cands = candidate_counts(g.channels, lm.settings.step)
        else:
            cands = sorted(set(range(int(round_to), g.channels, int(round_to))) | {g.channels})
        kept, last = [g.channels], lm.predict(builder.mask({g.id: g.channels}))
        for c in reversed(cands[:-1]):
            t = lm.predict(builder.mask({g.id: c}))
            if t < last - eps * total:
                kept.append(c)
                last = t
        out[g.id] = np.array(sorted(kept))
    return out


class LatencyCost:
    """Predicted latency as an :class:`onnxprune.allocate.CostModel` (reduction = share of the model's time)."""

    what = "predicted latency"
    flag = "--target-latency"

    def __init__(self, lm: LatencyModel, builder, *, levels: Mapping[str, np.ndarray] | None = None, round_to: int | None = None):
        self.lm, self.builder, self.round_to = lm, builder, round_to  # round_to: see useful_levels (None: the table's step)
        self.levels = dict(levels) if levels is not None else useful_levels(lm, builder, round_to=round_to)
        self.total = lm.predict(None)

    def refresh(self) -> None:
        """Levels again after the model was refitted (the total stays: the anchor is exact)."""
        self.levels = useful_levels(self.lm, self.builder, round_to=self.round_to)
        self.total = self.lm.predict(None)

    def of(self, mask: np.ndarray) -> float:
        return self.lm.predict(mask)
