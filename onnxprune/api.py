"""The main job as a Python API, mirroring ``onnxprune MODEL --target-flops R``.

Example::

    from onnxprune import prune, PruneOptions
    result = prune("model.onnx", options=PruneOptions(target_flops=0.3), data="val.npz")
    print("\\n".join(result.report.summary_lines()))

Stages report progress through ``progress(stage, done, total)``; the library
never prints.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from . import allocate
from .data import ImageOptions, load_dataset
from .errors import OutputError, TargetError, UsageError
from .evaluate import Evaluator, compute_metrics, make_session
from .flops import count
from .hardware import round_to_candidates
from .graph import check_model_path, check_output_path, has_external_data, load_model, save_model
from .groups import ChannelGraph, find_groups
from .input_shapes import InputShapes, dynamic_inputs
from .input_shapes import resolve as resolve_shapes
from .normalize import normalize_constants
from .importance import CRITERIA, score_units
from .plan import PruningPlan
from .report import GroupRow, PruneReport, primary_pair
from .rewrite import apply_mask
from .runtime import largest_activation, lean_batch
from .sensitivity import DEFAULT_GRID, analyze

log = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]
STRATEGIES = ("auto", "uniform", "sensitivity", "cost-aware")
ROUND_MODES = ("auto", "measured")  # --round-to values besides an integer


class _DefaultTarget(float):
    """The default ``target_flops`` (0.3), told apart from an explicit 0.3: with ``target_latency`` it is dropped."""


DEFAULT_TARGET_FLOPS = _DefaultTarget(0.3)


@dataclass(frozen=True)
class PruneOptions:
    """Options of the main job (the CLI flags of the same names).

    Exactly one target: ``target_flops`` (share of MACs to remove) or ``target_latency`` (share of the
    measured latency to remove, on ``device`` at ``latency_batch`` with ``latency_threads``); setting
    ``target_latency`` drops the default ``target_flops``.
    """

    target_flops: float | None = DEFAULT_TARGET_FLOPS  # None: only with a saved plan (prune(plan=...)), which decides the channels
    strategy: str = "auto"  # auto: uniform without data; with data sensitivity (MAC target) or cost-aware (latency target)
    criterion: str = "l1"
    round_to: int | str = "auto"  # "auto": the CPU's SIMD block, halved if the target needs it; "measured": per group (onnxprune.rounding)
    exclude: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    device: str = "auto"
    batch_size: int = 64
    limit: int | None = None
    grid: tuple[float, ...] = DEFAULT_GRID
    cache_dir: str | None = None
    memory_budget_mb: float | None = None  # MiB of cached activations; None: sensitivity.default_memory_budget_mb()
    seed: int = 0
    image_options: ImageOptions | None = None
    calibrate: int = 512  # samples used to calibrate activation statistics when data is given; 0 = off
    calibrate_method: str = "reconstruct"  # reconstruct (least-squares re-fit of the consumers) | bias | affine | both
    calibrated_sensitivity: bool = False  # measure sensitivity after calibration (slower, closer to the final model)
    target_latency: float | None = None  # share of measured latency to remove (instead of target_flops)
    latency_batch: int = 1
    latency_threads: int | None = None  # None: every core this process may use (stated in the report)
    latency_tolerance: float = 0.02  # closed loop: measured cut within this of the target
    latency_iterations: int = 6  # closed loop: at most this many allocate-measure rounds
    latency_repeats: int = 15  # interleaved rounds per end-to-end measurement
    latency_max_spread: float = 0.2  # refuse measurements whose IQR/median is above this
    measure_latency: bool = False  # MAC targets: also measure latency before/after
    latency_device: str | None = None  # auto | cpu | cuda | tensorrt; None: the evaluation device

    def __post_init__(self) -> None:
        if self.target_latency is not None:
            if isinstance(self.target_flops, _DefaultTarget):
                object.__setattr__(self, "target_flops", None)
            if self.target_flops is not None:
                raise UsageError("--target-flops and --target-latency were both given; exactly one target is allowed",
                                 fix="pass either --target-flops R (share of MACs) or --target-latency R (share of measured latency)")
            if isinstance(self.target_latency, bool) or not (0.0 < float(self.target_latency) < 1.0):
                raise UsageError(f"--target-latency must be the fraction of latency to remove, strictly between 0 and 1; got {self.target_latency}",
                                 fix="e.g. --target-latency 0.3 removes 30% of the measured latency")
        for flag, ok, want in (
            ("--latency-tolerance", 0.0 <= float(self.latency_tolerance) < 1.0, "a fraction in [0, 1), e.g. 0.02"),
            ("--latency-iterations", int(self.latency_iterations) >= 1, "1 or more"),
            ("--latency-repeats", int(self.latency_repeats) >= 3, "3 or more"),
            ("--latency-max-spread", float(self.latency_max_spread) > 0, "a fraction above 0, e.g. 0.2"),
        ):
            if not ok:
                raise UsageError(f"{flag} is out of range", fix=f"pass {flag} {want}")
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy '{self.strategy}'", fix=f"use --strategy {' | '.join(STRATEGIES)}")
        if self.criterion not in CRITERIA:
            raise UsageError(f"unknown criterion '{self.criterion}'", fix=f"use --criterion {' | '.join(CRITERIA)}")
        if self.target_flops is not None and (isinstance(self.target_flops, bool) or not (0.0 < float(self.target_flops) < 1.0)):
            raise UsageError(
                f"--target-flops must be the fraction of MACs to remove, strictly between 0 and 1; got {self.target_flops}",
                fix="e.g. --target-flops 0.3 removes 30% of the MACs",
            )
        if self.round_to not in ROUND_MODES and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1):
            raise UsageError(f"--round-to must be 'auto' or an integer >= 1, got {self.round_to!r}", fix="use --round-to 1 to disable rounding")
        if isinstance(self.calibrate, bool) or int(self.calibrate) < 0:
            raise UsageError(f"--calibrate must be a number of samples >= 0, got {self.calibrate}", fix="e.g. --calibrate 512, or --calibrate 0 to disable")
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise UsageError(f"unknown calibration method '{self.calibrate_method}'", fix="use --calibrate-method " + ", ".join(CALIBRATE_METHODS))
        if any(not (0 < r < 1) for r in self.grid):
            raise UsageError(f"sensitivity ratios must be in (0, 1), got {self.grid}", fix="e.g. --grid 0.1,0.3,0.5,0.7")


@dataclass(frozen=True, eq=False)
class PruneResult:
    model: onnx.ModelProto
    report: PruneReport
    plan: PruningPlan
    output: Path | None
    curves: object | None = None  # the SensitivityCurves the allocation used (sensitivity/cost-aware), for plots


def default_output(path: str | Path) -> Path:
    """``model.onnx -> model.pruned.onnx`` in the same folder."""
    p = Path(path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(f"{stem}.pruned.onnx")


CALIBRATE_METHODS = ("reconstruct", "both", "affine", "bias")


def criterion_samples(cg: ChannelGraph, options: PruneOptions, data, calib_data) -> np.ndarray | None:
    """Unlabeled samples for a criterion that needs them (``recon``): the first ``--calibrate`` (or 512)
    of ``--calib-data``, else of ``--data``; None for the other criteria or without data."""
    from .importance import DATA_CRITERIA

    source = calib_data if calib_data is not None else data
    if options.criterion not in DATA_CRITERIA or source is None:
        return None
    flag = "--calib-data" if calib_data is not None else "--data"
    ds = load_dataset(source, limit=options.calibrate or 512, image_options=options.image_options, flag=flag)
    return check_model_input(cg.model, ds, flag=flag).x


def make_calibrator(cg: ChannelGraph, x: np.ndarray, method: str, *, batch_size: int = 64, device: str = "cpu", progress=None, memory_budget_mb: float | None = None):
    """The recovery for ``method`` (:func:`onnxprune.recovery.make_recovery`; this older name stays).

    Both kinds implement ``recover(mask, pruned)`` and ``transform()``, and still accept
    ``calibrate(mask, pruned, method=...)`` / ``transform(method=...)``."""
    from .recovery import make_recovery

    return make_recovery(cg, x, method, batch_size=batch_size, device=device, progress=progress, memory_budget_mb=resolved_memory_budget(memory_budget_mb))


def resolved_memory_budget(memory_budget_mb: float | None) -> float:
    """``--memory-budget`` in MiB; None: :func:`onnxprune.sensitivity.default_memory_budget_mb`."""
    from .sensitivity import default_memory_budget_mb

    return default_memory_budget_mb() if memory_budget_mb is None else float(memory_budget_mb)


def _noop(stage: str, done: int, total: int) -> None:
    return None


def cache_file(cache_dir: str | None, model_path: Path, variant: str = "") -> Path | None:
    """The sensitivity cache for ``model_path`` in ``cache_dir``; ``variant`` (criterion,
    calibration) goes into the name so switching settings does not overwrite other results.
    The content is keyed by model, data, criterion and grid anyway, so a stale file is ignored."""
    if cache_dir is None:
        return None
    d = Path(cache_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a read-only parent...
        raise OutputError(f"cannot create the cache folder '{d}' ({exc.strerror or exc})", fix="pass --cache-dir a writable folder") from None
    tag = f".{variant}" if variant else ""
    return d / f"{model_path.stem}{tag}.sensitivity.json"


def sensitivity_variant(criterion: str, calibrate: int = 0, method: str = CALIBRATE_METHODS[0]) -> str:
    """Cache-name tag for a sensitivity run, e.g. ``l1`` or ``l1-cal512-reconstruct``."""
    return f"{criterion}-cal{calibrate}-{method}" if calibrate else criterion


def criterion_fallback_note(cg: ChannelGraph, criterion: str) -> str | None:
    """A warning when ``bn`` cannot work as asked: exporters usually fold BatchNormalization into the convs."""
    if criterion != "bn" or any(n.op_type == "BatchNormalization" for n in cg.model.graph.node):
        return None
    return (
        "criterion 'bn' found no BatchNormalization nodes (the exporter folded them into the convs), "
        "so every group was scored with 'l1'; export with BN kept (torch.onnx.export(..., training=TrainingMode.PRESERVE)) to use it"
    )


def resolve_input_shapes(model: onnx.ModelProto, options: PruneOptions, data: str | None) -> InputShapes:
    """Sizes for dynamic input dims: ``--input-shape``, else the file's metadata, else the first sample of ``data``."""
    if options.input_shapes or not dynamic_inputs(model):
        return resolve_shapes(model, explicit=options.input_shapes)
    sample = load_dataset(data, limit=1, image_options=options.image_options).x.shape if data is not None else None
    return resolve_shapes(model, data_shape=sample)


def check_model_input(model: onnx.ModelProto, ds, *, flag: str = "--data"):
    """``ds`` checked against the model's single input (shape after the batch axis, dtype), errors naming ``flag``;
    models with several inputs are left to the stage that uses the data."""
    from .data import check_against_model

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        return ds
    t = inputs[0].type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else np.dtype(np.float32)
    return check_against_model(ds, shape, dtype, input_name=inputs[0].name, num_classes=None, flag=flag)


def build_evaluator(model: onnx.ModelProto, data: str, options: PruneOptions, progress: StageProgress, *, shapes=None) -> Evaluator:
    """``shapes`` (``cg.shapes``): chunks whose largest activation would pass 64 MiB get fewer samples (runtime.lean_batch)."""
    ds = load_dataset(data, limit=options.limit, image_options=options.image_options)
    batch = lean_batch(largest_activation(shapes), options.batch_size)[0] if shapes else options.batch_size
    return Evaluator.from_original(
        ds, model, device=options.device, batch_size=batch, progress=lambda d, t: progress("reference", d, t)
    )


def allocate_plan(
    cg: ChannelGraph,
    scores: np.ndarray,
    options: PruneOptions,
    *,
    evaluator: Evaluator | None,
    cache: Path | None,
    progress: StageProgress,
    calibrator=None,
    cost: allocate.CostModel | None = None,
    latency_limit: float = 1.0,
    rounding=None,
) -> tuple[allocate.Allocation, dict]:
    """Run the chosen strategy; returns the allocation and extra report details.

    With ``cost`` (a latency cost) the target is ``options.target_latency`` as a cut of the cost,
    the counts are the cost's levels (no ``round_to`` candidates), and ``detail["sensitivity_curves"]``
    lets :func:`strategy_fn` re-run the allocation for other targets (the closed loop); a target just
    past ``latency_limit`` (the largest predicted cut, :func:`latency_setup`) asks for that limit. With
    ``rounding`` (``--round-to measured``, MAC target) the counts are its measured per-group levels."""
    strategy = resolved_strategy(options, evaluator is not None)
    candidates = round_to_candidates(options.round_to)
    first_ask = None if cost is None else min(options.target_latency, latency_limit - 1e-6)
    if strategy == "uniform":
        if cost is not None:
            return strategy_fn(cg, scores, strategy, None, cost)(first_ask), {"sensitivity_curves": None}
        return _mac_allocation(cg, scores, candidates, options.target_flops, rounding, lambda r, c: allocate.uniform(cg, scores, target=options.target_flops, round_to=r, cost=c))
    if evaluator is None:
        raise UsageError(f"--strategy {strategy} measures accuracy and needs data", fix="pass --data DATA or use --strategy uniform")
    run = analyze(
        cg,
        scores,
        evaluator,
        grid=options.grid,
        criterion=options.criterion,
        cache_file=cache,
        memory_budget_mb=options.memory_budget_mb,
        transform=calibrator.transform(method=options.calibrate_method) if calibrator is not None else None,
        cache_extra=f"calibrate={options.calibrate_method}:{len(calibrator.x)}" if calibrator is not None else "",
        progress=lambda d, t: progress("sensitivity", d, t),
    )
    fn = allocate.by_threshold if strategy == "sensitivity" else allocate.cost_aware
    extra: dict = {}
    if cost is not None:
        alloc = strategy_fn(cg, scores, strategy, run.curves, cost)(first_ask)
    else:
        alloc, extra = _mac_allocation(cg, scores, candidates, options.target_flops, rounding, lambda r, c: fn(cg, scores, run.curves, target=options.target_flops, round_to=r, cost=c))
    detail = {
        **extra,
        "sensitivity_seconds": run.seconds,
        "sensitivity_metric": run.curves.metric,
        "sensitivity_cached_groups": run.cached,
        "sensitivity_calibrated": calibrator is not None,
        "sensitivity_curves": run.curves,  # prune() moves it to PruneResult.curves (not into the report)
    }
    return alloc, detail


def resolved_strategy(options: PruneOptions, has_data: bool) -> str:
    """``auto`` -> uniform without data; with data, sensitivity for a MAC target and cost-aware
    (accuracy drop per saved millisecond) for a latency target. Why cost-aware there: at equal
    measured latency on the demo ResNet-20 (-30% latency, batch 1, mean of 3 fine-tuning seeds,
    ``benchmarks/results/latency_accuracy_cost_aware.md``), sensitivity allocation cut 69% of the
    MACs and ended at 84.0% top-1, cost-aware cut 45% and ended at 89.2%."""
    if options.strategy == "auto":
        if not has_data:
            return "uniform"
        return "cost-aware" if options.target_latency is not None else "sensitivity"
    return options.strategy


def strategy_fn(cg: ChannelGraph, scores: np.ndarray, strategy: str, curves, cost: allocate.CostModel):
    """``target -> Allocation`` for ``strategy`` on ``cost`` (sensitivity curves for the data-driven ones)."""
    if strategy == "uniform":
        return lambda t: allocate.uniform(cg, scores, target=t, cost=cost)
    fn = allocate.by_threshold if strategy == "sensitivity" else allocate.cost_aware
    return lambda t: fn(cg, scores, curves, target=t, cost=cost)


def latency_settings(options: PruneOptions):
    """The :class:`~onnxprune.latency_table.LatencySettings` of ``--latency-device`` (else ``--device``),
    ``--latency-batch`` and ``--latency-threads``."""
    from .latency_table import resolve_settings

    return resolve_settings(options.latency_device or options.device, batch=options.latency_batch, threads=options.latency_threads)


def latency_setup(cg: ChannelGraph, scores: np.ndarray, options: PruneOptions, progress: StageProgress):
    """(latency model, cost, largest reachable predicted cut) for ``options.target_latency``; TargetError when unreachable."""
    from .latency import LatencyCost, build_latency_model

    settings = latency_settings(options)
    lm = build_latency_model(cg, settings, cache_dir=options.cache_dir, rounds=options.latency_repeats, max_spread=options.latency_max_spread,
                             progress=lambda d, t: progress("latency table", d, t))
    # an explicit --round-to N restricts the levels to multiples of N; auto keeps the table's own step
    cost = LatencyCost(lm, allocate.MaskBuilder(cg, scores), round_to=None if options.round_to in ROUND_MODES else int(options.round_to))
    try:
        return lm, cost, allocate.check_reachable(cg, scores, target=options.target_latency, round_to=1, cost=cost)
    except TargetError as exc:
        # the table predicts, the loop measures: a target within the tolerance of the predicted
        # limit goes to the loop (which starts at that limit and refuses if the measurement agrees)
        try:
            reach = allocate.check_reachable(cg, scores, target=max(options.target_latency - options.latency_tolerance, 1e-6), round_to=1, cost=cost)
        except TargetError:
            raise exc from None
        log.info("latency target %.3f is above the predicted limit %.3f but within the tolerance: measuring", options.target_latency, reach)
        return lm, cost, reach


def latency_loop(cg, scores, options: PruneOptions, lat, curves, has_data: bool, progress: StageProgress):
    """The closed loop (allocate, measure, correct) for a latency target; returns (allocation, report detail)."""
    from .latency_loop import closed_loop, loop_detail

    lm, cost, max_red = lat
    builder = allocate.MaskBuilder(cg, scores)
    loop = closed_loop(
        target=options.target_latency, lm=lm, allocate_fn=strategy_fn(cg, scores, resolved_strategy(options, has_data), curves, cost),
        to_mask=builder.mask, apply=lambda m: apply_mask(cg, m), max_reduction=max_red, cost=cost, tolerance=options.latency_tolerance,
        iterations=options.latency_iterations, rounds=options.latency_repeats, max_spread=options.latency_max_spread,
        on_iteration=lambda it: progress("latency loop", it.index, options.latency_iterations),
    )
    return loop.allocation, loop_detail(lm, loop, target=options.target_latency, tolerance=options.latency_tolerance, max_reduction=max_red)


def mac_latency_detail(cg: ChannelGraph, mask: np.ndarray, pruned: onnx.ModelProto, options: PruneOptions, macs_cut: float) -> dict:
    """MAC targets, honestly: measured latency before/after with ``measure_latency``, and a note
    (suggesting --target-latency) when the cut will not, or did not, make the model as much faster."""
    from .latency import measure_pair, model_feeds
    from .latency_loop import mac_cut_warning, measured_mac_note

    out: dict = {}
    if options.measure_latency:
        settings = latency_settings(options)
        m = measure_pair(cg.model, pruned, settings, model_feeds(cg, settings.batch), rounds=options.latency_repeats, max_spread=options.latency_max_spread)
        out["latency"] = {"target": None, "settings": settings.describe(), "original_ms": 1e3 * m.a, "pruned_ms": 1e3 * m.b,
                          "measured_cut": m.cut, "spread": m.spread, "rounds": m.rounds, "macs_cut": macs_cut}
        note = measured_mac_note(m.cut, macs_cut)
    else:
        from .latency_table import CPU, channel_step

        note = mac_cut_warning(cg, mask, channel_step(CPU if options.device == "cpu" else "auto"))
    if note:
        out["latency_note"] = note
    return out


def unrounded_latency(cg: ChannelGraph, mask: np.ndarray, unrounded: np.ndarray, pruned: onnx.ModelProto, measured: Mapping,
                      options: PruneOptions) -> dict:
    """``--measure-latency``: the unrounded plan timed against the rounded one (interleaved rounds,
    same settings), so their ratio is measured directly rather than from two separate cuts; the
    unrounded plan's cut of the original is the rounded cut scaled by that ratio."""
    from .latency import measure_pair, model_feeds

    if np.array_equal(mask, unrounded):
        return {"rounded_cut": measured["measured_cut"], "unrounded_cut": measured["measured_cut"], "same_plan": True}
    from .latency_table import MeasurementError

    settings = latency_settings(options)
    try:
        m = measure_pair(pruned, apply_mask(cg, unrounded), settings, model_feeds(cg, settings.batch), rounds=options.latency_repeats,
                         max_spread=options.latency_max_spread)
    except MeasurementError as exc:  # the rounded plan's own measurement passed: keep it, and say why there is no comparison
        log.warning("the unrounded plan's latency was not compared: %s", exc)
        return {"rounded_cut": measured["measured_cut"], "same_plan": False, "error": str(exc).split(". To fix")[0]}
    rounded_ms = measured["pruned_ms"]
    return {"rounded_cut": measured["measured_cut"], "unrounded_cut": 1 - (1 - measured["measured_cut"]) * m.ratio,
            "unrounded_vs_rounded": m.ratio - 1, "spread": m.spread, "rounds": m.rounds, "rounded_ms": rounded_ms, "unrounded_ms": rounded_ms * m.ratio,
            "original_ms": measured["original_ms"], "same_plan": False}


def rounding_verdict(r: Mapping, tolerance: float) -> tuple[bool, str] | None:
    """``--round-to auto --measure-latency``: ``(keep_unrounded, why)``, or None when the unrounded
    plan was not timed against the rounded one. The multiple stays unless the unrounded plan is no
    more than ``tolerance`` slower than the rounded one, with one standard error of the measured
    median added (so a noisy comparison keeps the multiple), and, when both were evaluated, it is at
    least as accurate: a multiple that buys no measured speed only costs accuracy and MAC precision."""
    lat = r.get("latency") or {}
    if r.get("mode") != "global" or not lat or lat.get("same_plan"):
        return None
    m = r["round_to"]
    if "error" in lat:
        return False, f"kept multiples of {m}: the unrounded plan could not be compared ({lat['error']})"
    slower = lat["unrounded_vs_rounded"]
    # standard error of a median: 1.2533 sigma / sqrt(n), sigma from the interquartile range (IQR / 1.349)
    se = 1.2533 * lat.get("spread", 0.0) * (1 + slower) / 1.349 / max(lat.get("rounds", 1), 1) ** 0.5
    tol = f"--latency-tolerance {100 * tolerance:g}%"
    speed = (f"the unrounded plan measured {abs(slower):.1%} {'slower' if slower > 0 else 'faster'} than multiples of {m} "
             f"(standard error {se:.1%})")
    if slower + se > tolerance:
        return False, f"kept multiples of {m}: {speed}, not within {tol}"
    pair = primary_pair(r.get("accuracy") or {})
    if pair is not None and pair[2] < pair[1]:
        return False, f"kept multiples of {m}: {speed}, within {tol}, but its {pair[0]} is lower ({100 * pair[2]:.2f}% vs {100 * pair[1]:.2f}%)"
    tail = f", and its {pair[0]} is not lower ({100 * pair[2]:.2f}% vs {100 * pair[1]:.2f}%)" if pair else ""
    return True, f"rounding bought no measured speed, so the unrounded plan is kept: {speed}, within {tol}{tail}"


def rounding_setup(cg: ChannelGraph, options: PruneOptions, progress: StageProgress):
    """``--round-to measured`` with a MAC target: (:class:`~onnxprune.rounding.AutoRounding`, None), or
    (None, note) when latency cannot be measured here (then the global multiple, as before)."""
    from .errors import OnnxPruneError
    from .rounding import rounding_setup as setup

    try:
        settings = latency_settings(options)
        return setup(cg, settings, cache_dir=rounding_cache_dir(options.cache_dir), progress=progress), None
    except OnnxPruneError as exc:
        note = (f"--round-to measured could not measure latency here ({exc}); every group was rounded to multiples of "
                f"{round_to_candidates('auto')[0]} (halved where the target needs it)")
        log.warning(note)
        return None, note


def rounding_cache_dir(cache_dir) -> str | None:
    """Where ``--round-to measured`` keeps its measured layer times. They are facts about this machine,
    not about one model, so by default (no ``--cache-dir``, or the CLI's ``.onnxprune-cache``) they go
    to the user's cache, ``~/.cache/onnxprune`` (``$XDG_CACHE_HOME/onnxprune``), shared by every model
    and project here, and a plain run leaves nothing in the working folder. Another ``--cache-dir`` is
    used as given. None (measure, keep nothing) when the folder cannot be created."""
    if cache_dir is not None and Path(cache_dir) != Path(".onnxprune-cache"):
        return str(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(base) / "onnxprune"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("no latency cache for --round-to measured (%s): measuring without keeping the times", exc)
        return None
    return str(folder)


def _mac_allocation(cg: ChannelGraph, scores: np.ndarray, candidates: list[int], target: float, rounding, run) -> tuple[allocate.Allocation, dict]:
    """``run(round_to, cost)`` at today's global multiples, or on the measured per-group levels of
    ``rounding`` plus the unrounded (round-to 1) plan from the same data, in ``detail["unrounded_allocation"]``."""
    if rounding is None:
        alloc = _with_rounding(candidates, lambda r: run(r, None), cg, scores, target)
        if len(candidates) > 1 and alloc.detail.get("round_to", 1) > 1:
            # --round-to auto: what the global multiple costs, from the unrounded plan of the same data
            return alloc, {"unrounded_allocation": run(1, None)}
        return alloc, {}
    from .rounding import allocate_rounded

    alloc = allocate_rounded(rounding, cg, lambda cost: run(1, cost))
    kept = {k: v for k, v in alloc.detail.items() if k not in ("cost", "cost_reduction")}
    return replace(alloc, detail={**kept, "round_to": rounding.stair_step}), {"unrounded_allocation": run(1, None)}


def _with_rounding(candidates: list[int], run, cg: ChannelGraph, scores: np.ndarray, target: float):
    """Run an allocation with the largest channel multiple that reaches the target. Among several
    candidates (``--round-to auto``) a multiple counts as reaching it only with the groups narrower
    than it frozen (:func:`allocate.check_reachable` ``narrow=False``); the allocation then still
    gives those groups quarter steps."""
    for k, r in enumerate(candidates):
        try:
            if k + 1 < len(candidates):
                allocate.check_reachable(cg, scores, target=target, round_to=r, narrow=False)
            alloc = run(r)
        except TargetError:
            if k + 1 == len(candidates):
                raise
            log.info("target unreachable with channel multiples of %d; trying %d", r, candidates[k + 1])
            continue
        return replace(alloc, detail={**alloc.detail, "round_to": r})
    raise AssertionError("no rounding candidates")


def prune(
    model_path: str | Path,
    *,
    options: PruneOptions = PruneOptions(),
    data: str | None = None,
    output: str | Path | None = None,
    force: bool = False,
    plan: str | Path | None = None,
    save_plan: str | Path | None = None,
    report_path: str | Path | None = None,
    write: bool = True,
    train_data: str | None = None,
    calib_data: str | None = None,
    finetune_options=None,
    distill: bool = True,
    progress: StageProgress | None = None,
) -> PruneResult:
    """Prune ``model_path`` to remove ``options.target_flops`` of its MACs.

    With ``data``, accuracy before/after is measured with ONNX Runtime (top-1
    with labels, agreement with the original otherwise) and the default
    strategy is sensitivity-based. ``plan`` re-applies a saved plan instead
    of searching. With ``finetune_options`` (a
    :class:`~onnxprune.finetune.FinetuneOptions`) and ``train_data`` the
    pruned model is fine-tuned with torch (distilling from the original when
    ``distill``) and evaluated again; the learning rate (unless given) and the
    epoch kept are chosen on a held-out part of ``train_data``, never on
    ``data``, and the starting weights are kept when no epoch beats them
    (``detail["finetune"]["note"]`` says so). Outputs are written atomically; the
    input is never touched.
    """
    progress = progress or _noop
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model_path = check_model_path(model_path)  # input errors first, before output checks (and '.' has no name)
    out = None
    if write:
        out = check_output_path(output or default_output(model_path), input_path=model_path, force=force)
        for extra, flag in ((report_path, "--report"), (save_plan, "--save-plan")):
            if extra is not None:
                check_output_path(extra, input_path=model_path, force=True, flag=flag)
    model = load_model(model_path)
    train = None
    if finetune_options is not None:
        if train_data is None:
            raise UsageError("fine-tuning needs training data", fix="pass --train-data TRAIN (an .npz with x and y, or a folder/hook)")
        from .finetune import _require_torch

        _require_torch()  # fail before the long work when torch is missing
        train = load_dataset(train_data, image_options=options.image_options)
    external = has_external_data(model_path)  # keep the input's layout: external data in, external data out
    model, normalized = normalize_constants(model, copy=False)  # our own loaded copy: no second set of weights
    inputs = resolve_input_shapes(model, options, data)
    cg = find_groups(model, exclude=options.exclude, input_shapes=inputs.shapes)
    del model  # only cg.model from here on (find_groups may return a copy): one set of weights alive (matters for >2 GB models)
    before = count(cg.model, shapes=cg.shapes)
    timings["analyze"] = time.perf_counter() - t0

    # everything that can be refused without running the model is checked here, before any evaluation
    the_plan = PruningPlan.load(plan) if plan is not None else None
    mask = the_plan.to_mask(cg) if the_plan is not None else None
    scores = score_units(cg, options.criterion, seed=options.seed, data=criterion_samples(cg, options, data, calib_data), device=options.device)
    lat = rounding = mask_unrounded = None
    detail: dict = {}
    if the_plan is None:
        if options.target_flops is None and options.target_latency is None:
            raise UsageError("no --target-flops and no --plan: nothing says how much to prune", fix="pass e.g. --target-flops 0.3, or apply a saved plan with --plan PLAN")
        if options.target_latency is not None:  # measures the tables and the model: an unreachable target fails here, before evaluation
            t = time.perf_counter()
            lat = latency_setup(cg, scores, options, progress)
            timings["latency_model"] = time.perf_counter() - t
        else:
            allocate.check_reachable(cg, scores, target=options.target_flops, round_to=round_to_candidates(options.round_to)[-1])
        if data is not None and options.strategy != "uniform":
            cache_file(options.cache_dir, model_path)  # a bad --cache-dir fails now, not after the reference run
    calib_source = None
    if options.calibrate and calib_data is not None:
        calib_source = load_dataset(calib_data, limit=options.calibrate, image_options=options.image_options, flag="--calib-data")
        calib_source = check_model_input(cg.model, calib_source, flag="--calib-data")

    evaluator = provider = None
    metrics: dict[str, dict] = {}
    if data is not None:
        t = time.perf_counter()
        evaluator = build_evaluator(cg.model, data, options, progress, shapes=cg.shapes)
        provider = make_session(cg.model, device=options.device).provider
        ref = evaluator.reference_outputs
        metrics["original"] = compute_metrics(list(ref), labels=evaluator.dataset.y, reference=ref).to_dict()
        timings["reference"] = time.perf_counter() - t
    if the_plan is None and options.target_latency is None and options.round_to == "measured":
        # which groups rounding speeds up: measured (cached) after every input and data check
        t = time.perf_counter()
        rounding, note = rounding_setup(cg, options, progress)
        timings["rounding"] = time.perf_counter() - t
        if note:
            detail["rounding"] = {"mode": "fallback", "note": note}

    calibrator = None
    if options.calibrate and (calib_data is not None or evaluator is not None):
        t = time.perf_counter()
        source = calib_source if calib_source is not None else evaluator.dataset
        calibrator = make_calibrator(cg, source.x[: options.calibrate], options.calibrate_method, batch_size=options.batch_size, device=options.device, memory_budget_mb=options.memory_budget_mb,
                                     progress=lambda d, tt: progress("calibration", d, tt))
        timings["calibration_stats"] = time.perf_counter() - t

    t = time.perf_counter()
    note = criterion_fallback_note(cg, options.criterion)
    if note:
        log.warning(note)
    curves = None
    if the_plan is not None:
        strategy = "plan"
        detail["plan_file"] = str(plan)
    else:
        # only runs that measure sensitivity use (and create) the cache folder
        cal = calibrator is not None and options.calibrated_sensitivity
        variant = sensitivity_variant(options.criterion, len(calibrator.x) if cal else 0, options.calibrate_method)
        cache = cache_file(options.cache_dir, model_path, variant) if evaluator is not None and options.strategy != "uniform" else None
        alloc, found = allocate_plan(
            cg, scores, options, evaluator=evaluator, cache=cache, progress=progress,
            calibrator=calibrator if options.calibrated_sensitivity else None, cost=lat[1] if lat else None,
            latency_limit=lat[2] if lat else 1.0, rounding=rounding,
        )
        detail.update(found)
        curves = detail.pop("sensitivity_curves", None)
        unrounded = detail.pop("unrounded_allocation", None)
        if lat is not None:
            alloc, detail["latency"] = latency_loop(cg, scores, options, lat, curves, evaluator is not None, progress)
        builder = allocate.MaskBuilder(cg, scores)
        mask = builder.mask(alloc.keep)
        if unrounded is not None:
            from .rounding import global_rounding_detail, rounding_detail

            mask_unrounded = builder.mask(unrounded.keep)
            fallback = detail.get("rounding") or {}  # --round-to measured that fell back keeps its note
            detail["rounding"] = (rounding_detail(rounding, cg, mask, mask_unrounded) if rounding is not None
                                  else {**global_rounding_detail(cg, mask, mask_unrounded, alloc.detail.get("round_to", 1)), **fallback})
        strategy = alloc.strategy
        detail.update(alloc.detail)
        the_plan = PruningPlan.from_mask(cg, mask)
    if note:
        detail["criterion_note"] = note
    if inputs.shapes is not None:
        detail["input_shapes"] = {"shapes": {k: list(v) for k, v in inputs.shapes.items()}, "source": inputs.source}
    timings["allocate"] = time.perf_counter() - t

    t = time.perf_counter()
    pruned = apply_mask(cg, mask)
    after = count(pruned, input_shapes=inputs.shapes)  # dynamic spatial dims need them again
    timings["rewrite"] = time.perf_counter() - t
    if lat is None and (strategy != "plan" or options.measure_latency):
        t = time.perf_counter()
        detail.update(mac_latency_detail(cg, mask, pruned, options, 1 - after.total_macs / max(before.total_macs, 1)))
        if options.measure_latency and mask_unrounded is not None and "latency" in detail:
            detail["rounding"]["latency"] = unrounded_latency(cg, mask, mask_unrounded, pruned, detail["latency"], options)
        timings["latency"] = time.perf_counter() - t
    if evaluator is not None:
        t = time.perf_counter()
        metrics["pruned"] = evaluator.evaluate(pruned, progress=lambda d, tt: progress("evaluate", d, tt)).to_dict()
        timings["evaluate"] = time.perf_counter() - t
    if calibrator is not None:
        t = time.perf_counter()
        res = calibrator.calibrate(mask, pruned, method=options.calibrate_method, progress=lambda d, tt: progress("calibrate", d, tt))
        pruned = res.model
        detail["calibration"] = {"summary": res.summary(), "samples": res.samples, "method": res.method, "seconds": res.seconds,
                                 "source": calib_data or "--data"}
        timings["calibrate"] = time.perf_counter() - t
        if evaluator is not None:
            metrics["calibrated"] = evaluator.evaluate(pruned).to_dict()
    unrounded_recovery = None
    if mask_unrounded is not None and evaluator is not None:  # what rounding cost in accuracy: one more evaluation
        t = time.perf_counter()
        detail["rounding"]["accuracy"], unrounded_recovery = unrounded_metrics(cg, mask, mask_unrounded, metrics, evaluator, calibrator, options)
        timings["rounding_evaluate"] = time.perf_counter() - t
    verdict = rounding_verdict(detail["rounding"], options.latency_tolerance) if mask_unrounded is not None and options.round_to == "auto" else None
    if verdict:
        detail["rounding"]["chosen"], detail["rounding"]["verdict"] = ("unrounded" if verdict[0] else "rounded"), verdict[1]
    if verdict and verdict[0]:
        # the multiple bought no measured speed: the unrounded plan from the same data is written instead
        log.info("--round-to auto: %s", verdict[1])
        t = time.perf_counter()
        mask, unpruned = mask_unrounded, apply_mask(cg, mask_unrounded)
        after = count(unpruned, input_shapes=inputs.shapes)
        the_plan = PruningPlan.from_mask(cg, mask)
        r = detail["rounding"]
        detail["round_to"] = 1
        detail.update({k: v for k, v in unrounded.detail.items() if k != "round_to"})
        # the latency line: the original timed against the plan written (its own rounds and spread)
        from .latency_table import MeasurementError

        timed, macs_cut = dict(r["latency"]), 1 - after.total_macs / max(before.total_macs, 1)
        detail.pop("latency_note", None)
        try:
            detail.update(mac_latency_detail(cg, mask, unpruned, options, macs_cut))
        except MeasurementError as exc:  # too noisy this time: the figures of the comparison that decided, said so
            detail["latency"].update(pruned_ms=timed["unrounded_ms"], measured_cut=timed["unrounded_cut"], macs_cut=macs_cut,
                                     derived=f"original vs rounded x rounded vs unrounded ({str(exc).split('. To fix')[0]})")
        pruned = unpruned
        if evaluator is not None:
            acc = r["accuracy"]
            metrics["pruned"] = acc["unrounded"] if acc["stage"] == "pruned" else evaluator.evaluate(unpruned).to_dict()
        if unrounded_recovery is not None:
            pruned = unrounded_recovery.model
            detail["calibration"].update(summary=unrounded_recovery.summary(), samples=unrounded_recovery.samples, seconds=unrounded_recovery.seconds)
            metrics["calibrated"] = r["accuracy"]["unrounded"]
        elif calibrator is not None:  # recovery without data to compare on: recover the unrounded plan now
            res = calibrator.calibrate(mask, unpruned, method=options.calibrate_method)
            pruned = res.model
            detail["calibration"].update(summary=res.summary(), samples=res.samples, seconds=res.seconds)
        timings["rounding_switch"] = time.perf_counter() - t
    if train is not None:
        t = time.perf_counter()
        pruned, detail["finetune"] = _finetune_stage(pruned, cg.model if distill else None, train, finetune_options, progress)
        timings["finetune"] = time.perf_counter() - t
        if evaluator is not None:
            metrics["finetuned"] = evaluator.evaluate(pruned).to_dict()

    report = PruneReport(
        input=str(model_path),
        output=str(out) if out else None,
        target=None if plan is not None or options.target_flops is None else float(options.target_flops),
        strategy=strategy,
        criterion=options.criterion,
        round_to=None if plan is not None else (lat[1].round_to or lat[0].settings.step) if lat else int(detail.get("round_to", options.round_to if options.round_to not in ROUND_MODES else round_to_candidates("auto")[0])),
        macs_before=before.total_macs,
        macs_after=after.total_macs,
        params_before=before.total_params,
        params_after=after.total_params,
        groups=_group_rows(cg, mask),
        metrics=metrics,
        provider=provider,
        timings=timings,
        detail=detail,
        plan=the_plan.to_dict(),
        normalizations=tuple(c.describe() for c in (*normalized, *cg.normalizations)),
    )
    if write:
        t = time.perf_counter()
        save_model(pruned, out, external_data=True if external else None)
        if save_plan is not None:
            the_plan.save(save_plan)
        timings["save"] = time.perf_counter() - t
        if report_path is not None:
            report = replace(report, timings=dict(timings))
            report.save(report_path)
    return PruneResult(pruned, report, the_plan, out, curves)


def unrounded_metrics(cg: ChannelGraph, mask: np.ndarray, unrounded: np.ndarray, metrics: Mapping[str, dict], evaluator: Evaluator, calibrator,
                      options: PruneOptions) -> tuple[dict, object]:
    """Metrics of the unrounded plan at the last stage before fine-tuning (after recovery when there
    is one), beside the rounded plan's: ``({"stage", "rounded", "unrounded"}, recovery)`` where
    ``recovery`` is the unrounded plan's calibration result (None without recovery or when the plans are one)."""
    stage = "calibrated" if calibrator is not None and "calibrated" in metrics else "pruned"
    if np.array_equal(mask, unrounded):
        return {"stage": stage, "rounded": dict(metrics[stage]), "unrounded": dict(metrics[stage]), "same_plan": True}, None
    model, res = apply_mask(cg, unrounded), None
    if stage == "calibrated":
        res = calibrator.calibrate(unrounded, model, method=options.calibrate_method)
        model = res.model
    return {"stage": stage, "rounded": dict(metrics[stage]), "unrounded": evaluator.evaluate(model).to_dict(), "same_plan": False}, res


def _finetune_stage(pruned, teacher, train, options, progress: StageProgress):
    from .finetune import finetune

    def on_event(ev: dict) -> None:
        if ev.get("kind") == "step" and ev.get("steps"):
            progress(f"finetune {ev.get('epoch', 1)}", int(ev.get("step", 0)), int(ev["steps"]))

    res = finetune(pruned, train.x, train.y, teacher=teacher, options=options, progress=on_event)
    info = {
        "epochs": len(res.history),
        "device": res.device,
        "seconds": res.seconds,
        "stopped_reason": res.stopped_reason,
        "history": list(res.history),
        "distilled": teacher is not None,
        "lr": res.lr,
        "lr_pilot": [list(p) for p in res.lr_pilot],
        "normalization": res.normalization,
        "normalization_pilot": [list(p) for p in res.normalization_pilot],
        "renormalized_convs": res.renormalized,
        "validation": res.val_source,
        "metric": res.metric,
        "initial_val": res.initial_val,
        "best_val": res.best_val,
        "best_epoch": res.best_epoch,
        "note": res.note,
    }
    return res.model, info


def _group_rows(cg: ChannelGraph, mask: np.ndarray) -> tuple[GroupRow, ...]:
    rows = []
    for g in cg.groups:
        kept = int(mask[list(g.units)].sum())
        rows.append(GroupRow(g.id, g.producers, g.channels, kept, g.macs_share, g.blocked_reason))
    return tuple(rows)


def analyze_model(model_path: str | Path, *, exclude: Sequence[str] = (), input_shapes=None) -> tuple[ChannelGraph, object]:
    """Load, find groups and count costs: what ``onnxprune analyze`` shows."""
    model = load_model(model_path)
    cg = find_groups(model, exclude=exclude, input_shapes=input_shapes)
    return cg, count(cg.model, shapes=cg.shapes)


__all__ = ["PruneOptions", "PruneResult", "prune", "default_output", "analyze_model"]
