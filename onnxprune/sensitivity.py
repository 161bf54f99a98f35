"""Sensitivity analysis (ACRA strategy 2, first half).

For each prunable group and each ratio of a grid, prune that group alone
(best-scored channels kept, no rounding) and measure the drop of the primary
metric (top-1 with labels, else agreement or cosine with the original).

Speed: pruning one group changes only the nodes downstream of it, and up to
the first nodes that *read* the removed channels (its consumers) tensors only
lose channels. So the suffix starts at the consumers: the activations entering
it (the *frontier*) are computed once with the original model, restricted to
the kept channels where they carry the group's channels, and only the suffix
runs for each ratio (constant-only inputs such as computed Pad amounts are
computed inside the suffix). Frontiers of several
consecutive groups are computed in one pass while they fit the memory budget;
a group whose frontier does not fit is evaluated on the full model.

Results are cached in a JSON file keyed by model, data, criterion, grid and
calibration, written atomically after every group, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from .allocate import MaskBuilder, SensitivityCurves, nearest
from .evaluate import Evaluator, compute_metrics
from .extract import suffix as suffix_model
from .graph import proto_size, write_text_atomic
from .groups import ChannelGraph
from .rewrite import apply_mask
from .runtime import Runner, data_inputs, fixed_batch, largest_activation, release_memory

log = logging.getLogger(__name__)

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SensitivityRun:
    curves: SensitivityCurves
    seconds: float
    evaluations: int
    suffix_evaluations: int
    cached: int
    cache_peak_bytes: int = 0  # most bytes of cached activations held at once (bounded by the memory budget)


def default_memory_budget_mb() -> float:
    """The default ``memory_budget_mb``: min(4096, 25% of MemAvailable) MiB, 1024 where /proc/meminfo is unreadable."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 1024.0
    return float(min(4096, kib / 1024 * 0.25))


def cache_key(model: onnx.ModelProto, evaluator: Evaluator, *, criterion: str, grid: Sequence[float], extra: str = "") -> str:
    h = hashlib.sha256()
    h.update(model.SerializeToString(deterministic=True) if proto_size(model) < 2**31 - 2**20 else model.graph.name.encode())
    h.update(np.ascontiguousarray(evaluator.dataset.x).tobytes())
    if evaluator.dataset.y is not None:
        h.update(np.ascontiguousarray(evaluator.dataset.y).tobytes())
    h.update(f"{criterion}|{tuple(float(r) for r in grid)}|{extra}".encode())
    return h.hexdigest()[:24]


def _downstream(model: onnx.ModelProto, members: Sequence[str]) -> list[onnx.NodeProto]:
    start = set(members)
    tainted: set[str] = set()
    out = []
    for node in model.graph.node:
        if node.name in start or any(i in tainted for i in node.input):
            out.append(node)
            tainted.update(o for o in node.output if o)
    return out


def _frontier(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[str]:
    produced = {o for n in nodes for o in n.output}
    consts = {t.name for t in model.graph.initializer}
    consts |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    seen, out = set(), []
    for n in nodes:
        for i in n.input:
            if i and i not in produced and i not in consts and i not in seen:
                seen.add(i)
                out.append(i)
    return out


def _changed_part(cg: ChannelGraph, producers: Sequence[str], nodes: list[onnx.NodeProto]):
    """Split ``nodes`` (downstream of a group) into the nodes whose outputs change in *value*
    when the group loses channels, and the tensors that only *lose channels*.

    Between a group's producers and its consumers every op passes channels
    through one by one (ops that mix channels are compute nodes or block the
    group), so there the pruned tensor is the original one restricted to the
    kept positions: ``pruned_t = take(t, nonzero(kept(atoms)), axis)`` with
    ``(axis, atoms) = cg.tensor_maps[t]``. Values change only from the first
    compute node that reads the removed channels (or a Shape/Size of a tensor
    that lost channels) on. Returns ``(changed nodes, {tensor: (axis, atoms)})``;
    the suffix then starts at the consumers instead of the producers.
    """
    compute = {c.node: c for c in cg.compute}
    producers = set(producers)
    changed_t: set[str] = set()
    sel: dict[str, tuple[int, np.ndarray]] = {}
    part = []
    for n in nodes:
        ins = [i for i in n.input if i]
        if any(i in changed_t for i in ins) or n.op_type in ("Shape", "Size"):
            selects = False
        elif not any(i in sel for i in ins):  # nothing upstream lost channels: only a producer qualifies
            selects = n.name in producers and n.name in compute
        else:  # inputs lost channels: a compute node reading them (not depthwise) mixes them
            c = compute.get(n.name)
            selects = c is None or c.in_atoms is None
        outs = [o for o in n.output if o]
        if selects and all(o in cg.tensor_maps and _map_fits(cg, o) for o in outs):
            sel.update({o: cg.tensor_maps[o] for o in outs})
        else:
            changed_t.update(outs)
            part.append(n)
    return part, sel


def _map_fits(cg: ChannelGraph, name: str) -> bool:
    axis, atoms = cg.tensor_maps[name]
    shape = cg.shapes.get(name)
    return shape is not None and 0 < axis < len(shape) and shape[axis] == len(atoms)


def _dynamic_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors that depend on the model's data inputs (the rest is arithmetic on constants)."""
    inits = {t.name for t in model.graph.initializer}
    dyn = {i.name for i in model.graph.input if i.name not in inits}
    for n in model.graph.node:
        if any(i in dyn for i in n.input if i):
            dyn.update(o for o in n.output if o)
    return dyn


def _with_static_producers(model: onnx.ModelProto, part: list[onnx.NodeProto], dynamic: set[str]) -> list[onnx.NodeProto]:
    """``part`` plus the nodes that compute its constant-only inputs (e.g. the pads of a channel
    ``Pad`` built from ``ConstantOfShape``/``Concat``/``Cast``), so such tensors are computed in
    the suffix instead of being frontier inputs without a batch axis."""
    produced_by = {o: n for n in model.graph.node for o in n.output if o}
    names = {n.name for n in part}
    need = [i for n in part for i in n.input if i and i not in dynamic and i in produced_by]
    while need:
        n = produced_by[need.pop()]
        if n.name not in names:
            names.add(n.name)
            need.extend(i for i in n.input if i and i in produced_by)
    return [n for n in model.graph.node if n.name in names]


class _Selected:
    """``np.take(value, idx, axis)``, taken one batch at a time when the runner slices it
    (the batch stays in cache for ORT; no full-size copy per evaluation)."""

    def __init__(self, value: np.ndarray, idx: np.ndarray, axis: int):
        self.value, self.idx, self.axis = value, idx, axis

    def __len__(self) -> int:
        return len(self.value)

    def __getitem__(self, batch: slice) -> np.ndarray:
        return np.take(self.value[batch], self.idx, axis=self.axis)


def _select_feeds(cg: ChannelGraph, mask: np.ndarray, frontier: list[str], sel: dict, cache: dict):
    """Suffix inputs for ``mask``: cached original tensors, restricted to the kept channels where they lost some."""
    kept = cg.atom_kept(mask)
    feeds, shapes = {}, {}
    for f in frontier:
        value, shape = cache[f], cg.shapes[f]
        if f in sel:
            axis, atoms = sel[f]
            keep = kept(atoms)
            if not keep.all():
                idx = np.flatnonzero(keep)
                value = _Selected(value, idx, axis)
                shape = (*shape[:axis], len(idx), *shape[axis + 1 :])
        feeds[f], shapes[f] = value, shape
    return feeds, shapes


def _tensor_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.graph.input, *inferred.graph.value_info]}


def analyze(
    cg: ChannelGraph,
    scores: np.ndarray,
    evaluator: Evaluator,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    criterion: str = "l1",
    cache_file: str | Path | None = None,
    cache_extra: str = "",
    memory_budget_mb: float | None = None,
    suffix: bool = True,
    transform: Callable[[onnx.ModelProto, np.ndarray], onnx.ModelProto] | None = None,
    progress: Progress | None = None,
) -> SensitivityRun:
    """Measure each prunable group's metric drop at each ratio of ``grid``.

    ``transform(pruned_model, mask)`` (e.g. calibration) is applied to each
    pruned model before it is measured; it forces full-model evaluation.
    ``memory_budget_mb`` (None: :func:`default_memory_budget_mb`) bounds the activations cached for
    suffix runs: they are written chunk by chunk into arrays of at most that many MiB in all, so the
    peak is the budget plus one chunk plus a fixed overhead (libraries, model, data, reference outputs).
    """
    t0 = time.perf_counter()
    grid = tuple(float(r) for r in grid)
    ref = evaluator.reference_outputs
    base_metrics = compute_metrics(list(ref), labels=evaluator.dataset.y, reference=ref)
    metric, baseline = base_metrics.primary()
    groups = list(cg.prunable_groups)
    builder = MaskBuilder(cg, scores)
    key = cache_key(cg.model, evaluator, criterion=criterion, grid=grid, extra=cache_extra)
    results: dict[str, list[float]] = {}
    if cache_file and Path(cache_file).is_file():
        try:
            stored = json.loads(Path(cache_file).read_text())
            if stored.get("key") == key:
                results = {k: list(v) for k, v in stored.get("drops", {}).items()}
                log.info("resuming sensitivity analysis: %d of %d groups cached", len(results), len(groups))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable sensitivity cache %s: %s", cache_file, exc)
    cached = sum(1 for g in groups if g.id in results)
    # large activations: smaller chunks without ORT's arena, memory handed back after each run (runtime.lean_batch)
    runner = Runner(device=evaluator.device, batch_size=evaluator.batch_size, threads=evaluator.threads).lean(largest_activation(cg.shapes))
    x = evaluator.dataset.x
    input_name = data_inputs(cg.model)[0].name
    batch = fixed_batch(cg.model)  # suffix inputs keep a fixed batch: the runtime pads the last chunk
    outputs = [o.name for o in cg.model.graph.output]
    use_suffix = suffix and transform is None
    dtypes = _tensor_dtypes(cg.model) if use_suffix else {}
    budget = (default_memory_budget_mb() if memory_budget_mb is None else memory_budget_mb) * 2**20
    todo = [g for g in groups if g.id not in results]
    plans, selects = {}, {}
    dynamic = _dynamic_tensors(cg.model) if use_suffix else set()
    for g in todo:
        nodes = _downstream(cg.model, g.members)
        if use_suffix:  # start at the consumers: up to them, tensors only lose channels
            nodes, selects[g.id] = _changed_part(cg, g.producers, nodes)
            nodes = _with_static_producers(cg.model, nodes, dynamic)
        front = _frontier(cg.model, nodes)
        ok = use_suffix and all(o in {t for n in nodes for t in n.output} for o in outputs)
        ok = ok and all(
            f in cg.shapes and len(cg.shapes[f]) >= 2 and cg.shapes[f][0] in (None, batch) and all(d is not None for d in cg.shapes[f][1:])
            for f in front
        )
        size = sum(len(x) * int(np.prod(cg.shapes[f][1:])) * 4 for f in front) if ok else 0
        plans[g.id] = (nodes, front, ok and size <= budget, size)
    cache: dict[str, np.ndarray] = {}
    evals = suffix_evals = cache_peak = 0
    done = cached * len(grid)
    total = len(groups) * len(grid)
    if progress:
        progress(done, total)
    for k, g in enumerate(todo):
        nodes, front, ok, size = plans[g.id]
        if ok and any(f not in cache for f in front):
            # one pass of the original model fills this and the next groups' frontiers
            want, used = [], 0
            for h in todo[k:]:
                hn, hf, hok, hs = plans[h.id]
                if not hok:
                    continue
                new = [f for f in hf if f not in want]
                extra = sum(len(x) * int(np.prod(cg.shapes[f][1:])) * 4 for f in new)
                if used + extra > budget and want:
                    break
                want += new
                used += extra
            cache = feeds = {}  # free the last window (feeds reference it too) before filling the next
            cache = _fill_cache(runner, cg.model, x, input_name, [f for f in want if f != input_name])
            cache_peak = max(cache_peak, sum(v.nbytes for v in cache.values()))
            cache[input_name] = x
            evals += 1
        drops = []
        for r in grid:
            n_keep = nearest(np.arange(1, g.channels + 1), g.channels * (1 - r))
            if n_keep >= g.channels:
                drops.append(0.0)
                continue
            mask = builder.mask({g.id: n_keep})
            pruned = apply_mask(cg, mask, reinfer=False, verify=False)
            if transform is not None:
                pruned = transform(pruned, mask)
            if ok:
                feeds, shapes = _select_feeds(cg, mask, front, selects[g.id], cache)
                sm = suffix_model(pruned, {n.name for n in nodes}, front, shapes, dtypes, batch=batch)
                pruned = None  # the suffix holds what it needs: one copy of the weights less while it runs
                outs = runner.run(sm, feeds)
                suffix_evals += 1
            else:
                outs = runner.run(pruned, {input_name: x})
                evals += 1
            value = getattr(compute_metrics(outs, labels=evaluator.dataset.y, reference=ref), metric)
            if not runner.arena:
                release_memory()
            drops.append(float(baseline - value))
            done += 1
            if progress:
                progress(done, total)
        results[g.id] = drops
        if cache_file:
            write_text_atomic(cache_file, json.dumps({"key": key, "metric": metric, "baseline": baseline, "grid": grid, "drops": results}))
    curves = SensitivityCurves(metric, float(baseline), grid, {g.id: tuple(results[g.id]) for g in groups})
    return SensitivityRun(curves, time.perf_counter() - t0, evals, suffix_evals, cached, cache_peak)


def _fill_cache(runner: Runner, model: onnx.ModelProto, x: np.ndarray, input_name: str, names: list[str]) -> dict[str, np.ndarray]:
    """Tensors ``names`` for all of ``x``, written chunk by chunk into preallocated arrays (no list of
    chunks and no concatenated copy: the cache never needs twice its size)."""
    cache: dict[str, np.ndarray] = {}
    if not names:
        return cache
    for done, outs in runner.batches(model, {input_name: x}, names):
        for name, out in zip(names, outs):
            if name not in cache:
                cache[name] = np.empty((len(x), *out.shape[1:]), dtype=out.dtype)
            cache[name][done - len(out) : done] = out
    return cache


def curves_to_rows(cg: ChannelGraph, curves: SensitivityCurves) -> list[dict]:
    """One row per group and ratio for CSV/JSON output; the drop in points (percentage points of the
    metric, as in the table and plot): ``{"group", "producer", "channels", "ratio", "drop_points"}``."""
    rows = []
    for g in cg.prunable_groups:
        for r, d in zip(curves.ratios, curves.drops.get(g.id, ())):
            rows.append({"group": g.id, "producer": g.producers[0], "channels": g.channels, "ratio": r, "drop_points": round(100 * d, 6)})
    return rows


def plot(cg: ChannelGraph, curves: SensitivityCurves, path: str | Path, *, calibration: str = "without calibration", chosen=None) -> None:
    """PNG: metric drop (points) vs ratio per prunable group, curves or (many groups) a heatmap; see
    :func:`onnxprune.plots.sensitivity_png` (needs matplotlib). ``calibration`` goes into the title."""
    from .plots import sensitivity_png

    sensitivity_png(cg.prunable_groups, curves, path, calibration=calibration, chosen=chosen)
