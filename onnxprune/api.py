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
from .importance import CRITERIA, score_units
from .plan import PruningPlan
from .report import GroupRow, PruneReport
from .rewrite import apply_mask
from .sensitivity import DEFAULT_GRID, analyze

log = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]
STRATEGIES = ("auto", "uniform", "sensitivity", "cost-aware")


@dataclass(frozen=True)
class PruneOptions:
    """Options of the main job (the CLI flags of the same names)."""

    target_flops: float = 0.3
    strategy: str = "auto"  # auto: sensitivity with data, uniform without
    criterion: str = "l1"
    round_to: int | str = "auto"  # "auto": the CPU's SIMD channel block (16 with AVX-512, else 8), halved if the target needs it
    exclude: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    device: str = "auto"
    batch_size: int = 64
    limit: int | None = None
    grid: tuple[float, ...] = DEFAULT_GRID
    cache_dir: str | None = None
    memory_budget_mb: float = 1024
    seed: int = 0
    image_options: ImageOptions | None = None
    calibrate: int = 512  # samples used to calibrate activation statistics when data is given; 0 = off
    calibrate_method: str = "reconstruct"  # reconstruct (least-squares re-fit of the consumers) | bias | affine | both
    calibrated_sensitivity: bool = False  # measure sensitivity after calibration (slower, closer to the final model)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy '{self.strategy}'", fix=f"use --strategy {' | '.join(STRATEGIES)}")
        if self.criterion not in CRITERIA:
            raise UsageError(f"unknown criterion '{self.criterion}'", fix=f"use --criterion {' | '.join(CRITERIA)}")
        if isinstance(self.target_flops, bool) or not (0.0 < float(self.target_flops) < 1.0):
            raise UsageError(
                f"--target-flops must be the fraction of MACs to remove, strictly between 0 and 1; got {self.target_flops}",
                fix="e.g. --target-flops 0.3 removes 30% of the MACs",
            )
        if self.round_to != "auto" and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1):
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


def default_output(path: str | Path) -> Path:
    """``model.onnx -> model.pruned.onnx`` in the same folder."""
    p = Path(path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(f"{stem}.pruned.onnx")


CALIBRATE_METHODS = ("reconstruct", "both", "affine", "bias")


def make_calibrator(cg: ChannelGraph, x: np.ndarray, method: str, *, batch_size: int = 64, device: str = "cpu", progress=None):
    """A calibrator for ``method``: :class:`~onnxprune.reconstruct.Reconstructor` for
    ``reconstruct``, else :class:`~onnxprune.calibrate.Calibrator` (both have
    ``calibrate(mask, pruned, method=...)`` and ``transform(method=...)``)."""
    if method == "reconstruct":
        from .reconstruct import Reconstructor

        return Reconstructor(cg, x, batch_size=batch_size, device=device)
    from .calibrate import Calibrator

    return Calibrator(cg, x, batch_size=batch_size, device=device, progress=progress)


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


def build_evaluator(model: onnx.ModelProto, data: str, options: PruneOptions, progress: StageProgress) -> Evaluator:
    ds = load_dataset(data, limit=options.limit, image_options=options.image_options)
    return Evaluator.from_original(
        ds, model, device=options.device, batch_size=options.batch_size, progress=lambda d, t: progress("reference", d, t)
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
) -> tuple[allocate.Allocation, dict]:
    """Run the chosen strategy; returns the allocation and extra report details."""
    strategy = options.strategy
    if strategy == "auto":
        strategy = "sensitivity" if evaluator is not None else "uniform"
    candidates = round_to_candidates(options.round_to)
    if strategy == "uniform":
        return _with_rounding(candidates, lambda r: allocate.uniform(cg, scores, target=options.target_flops, round_to=r)), {}
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
    alloc = _with_rounding(candidates, lambda r: fn(cg, scores, run.curves, target=options.target_flops, round_to=r))
    detail = {
        "sensitivity_seconds": run.seconds,
        "sensitivity_metric": run.curves.metric,
        "sensitivity_cached_groups": run.cached,
        "sensitivity_calibrated": calibrator is not None,
    }
    return alloc, detail


def _with_rounding(candidates: list[int], run):
    """Run an allocation with the largest channel multiple that reaches the target."""
    for k, r in enumerate(candidates):
        try:
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
    ``distill``) and evaluated again; the final weights are kept (no
    selection on the evaluation data). Outputs are written atomically; the
    input is never touched.
    """
    progress = progress or _noop
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model_path = check_model_path(model_path)  # input errors first, before output checks (and '.' has no name)
    out = None
    if write:
        out = check_output_path(output or default_output(model_path), input_path=model_path, force=force)
        for extra in (report_path, save_plan):
            if extra is not None:
                check_output_path(extra, input_path=model_path, force=True)
    model = load_model(model_path)
    train = None
    if finetune_options is not None:
        if train_data is None:
            raise UsageError("fine-tuning needs training data", fix="pass --train-data TRAIN (an .npz with x and y, or a folder/hook)")
        from .finetune import _require_torch

        _require_torch()  # fail before the long work when torch is missing
        train = load_dataset(train_data, image_options=options.image_options)
    external = has_external_data(model_path)  # keep the input's layout: external data in, external data out
    cg = find_groups(model, exclude=options.exclude, input_shapes=options.input_shapes)
    del model  # only cg.model from here on (find_groups may return a copy): one set of weights alive (matters for >2 GB models)
    before = count(cg.model, shapes=cg.shapes)
    timings["analyze"] = time.perf_counter() - t0

    evaluator = provider = None
    metrics: dict[str, dict] = {}
    if data is not None:
        t = time.perf_counter()
        evaluator = build_evaluator(cg.model, data, options, progress)
        provider = make_session(cg.model, device=options.device).provider
        ref = evaluator.reference_outputs
        metrics["original"] = compute_metrics(list(ref), labels=evaluator.dataset.y, reference=ref).to_dict()
        timings["reference"] = time.perf_counter() - t

    calibrator = None
    if options.calibrate and (calib_data is not None or evaluator is not None):
        t = time.perf_counter()
        source = load_dataset(calib_data, limit=options.calibrate, image_options=options.image_options) if calib_data else evaluator.dataset
        calibrator = make_calibrator(cg, source.x[: options.calibrate], options.calibrate_method, batch_size=options.batch_size, device=options.device,
                                     progress=lambda d, tt: progress("calibration", d, tt))
        timings["calibration_stats"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = score_units(cg, options.criterion, seed=options.seed)
    detail: dict = {}
    note = criterion_fallback_note(cg, options.criterion)
    if note:
        log.warning(note)
    if plan is not None:
        the_plan = PruningPlan.load(plan)
        mask = the_plan.to_mask(cg)
        strategy = "plan"
    else:
        # only runs that measure sensitivity use (and create) the cache folder
        cal = calibrator is not None and options.calibrated_sensitivity
        variant = sensitivity_variant(options.criterion, len(calibrator.x) if cal else 0, options.calibrate_method)
        cache = cache_file(options.cache_dir, model_path, variant) if evaluator is not None and options.strategy != "uniform" else None
        alloc, detail = allocate_plan(
            cg, scores, options, evaluator=evaluator, cache=cache, progress=progress,
            calibrator=calibrator if options.calibrated_sensitivity else None,
        )
        mask = allocate.MaskBuilder(cg, scores).mask(alloc.keep)
        strategy = alloc.strategy
        detail.update(alloc.detail)
        the_plan = PruningPlan.from_mask(cg, mask)
    if note:
        detail["criterion_note"] = note
    timings["allocate"] = time.perf_counter() - t

    t = time.perf_counter()
    pruned = apply_mask(cg, mask)
    after = count(pruned, input_shapes=options.input_shapes)  # dynamic spatial dims need them again
    timings["rewrite"] = time.perf_counter() - t
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
    if train is not None:
        t = time.perf_counter()
        pruned, detail["finetune"] = _finetune_stage(pruned, cg.model if distill else None, train, finetune_options, progress)
        timings["finetune"] = time.perf_counter() - t
        if evaluator is not None:
            metrics["finetuned"] = evaluator.evaluate(pruned).to_dict()

    report = PruneReport(
        input=str(model_path),
        output=str(out) if out else None,
        target=float(options.target_flops),
        strategy=strategy,
        criterion=options.criterion,
        round_to=int(detail.get("round_to", options.round_to if options.round_to != "auto" else round_to_candidates("auto")[0])),
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
    return PruneResult(pruned, report, the_plan, out)


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
