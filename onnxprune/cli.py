"""Command line: rendering only; the work is in the library.

    onnxprune MODEL --target-flops 0.3 [--data val.npz] [-o OUT]
    onnxprune analyze MODEL [--json]
    onnxprune sensitivity MODEL --data val.npz [--plot sens.png]
    onnxprune finetune MODEL --data train.npz --epochs 3
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import OnnxPruneError, UsageError
from .flops import CONVENTION

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False, soft_wrap=True)

MAIN_HELP = """Prune whole channels of an ONNX CNN to remove a fraction of its MACs.

\b
MACs are multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul per sample
(no bias, BN or activations); FLOPs = 2 x MACs.

\b
Examples:
  onnxprune model.onnx --target-flops 0.3                 # uniform, 30% fewer MACs
  onnxprune model.onnx --target-flops 0.5 --data val.npz  # sensitivity-based, shows accuracy
  onnxprune analyze model.onnx                            # per-layer MACs and channel groups
  onnxprune sensitivity model.onnx --data val.npz --plot sens.png
  onnxprune finetune model.pruned.onnx --data train.npz --teacher model.onnx --epochs 3
"""


class _DefaultGroup(click.Group):
    """``onnxprune MODEL ...`` runs ``prune``; known sub-commands run as usual."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's usage errors as one line like ours (``error: ... To fix: ...``), exit code 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare 'onnxprune': show the help as click does
                exc.show()
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" To fix: see '{ctx.command_path} --help'." if ctx is not None else ""
            err_console.print(f"error: {exc.format_message().strip().rstrip('.')}.{hint}", markup=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            err_console.print("interrupted", markup=False)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def _terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: temp files are removed
    raise KeyboardInterrupt


def run_safely(fn):
    """Map library errors to one-line messages and exit codes (2 input, 1 internal, 130 interrupted)."""

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except OnnxPruneError as exc:
            if debug:
                traceback.print_exc()
            err_console.print(f"error: {exc.one_line()}", markup=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted: no output was written (partial files were removed)", markup=False, soft_wrap=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback with --debug
            if debug:
                traceback.print_exc()
            err_console.print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details and report it)", markup=False, soft_wrap=True)
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show debug logs and tracebacks.")(wrapper)


@contextlib.contextmanager
def progress_bar(enabled: bool = True):
    """A rich progress display; yields ``callback(stage, done, total)``."""
    if not enabled or not err_console.is_terminal:  # no live display (nor its stray newline) in pipes and logs
        yield lambda stage, done, total: None
        return
    columns = (TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def callback(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield callback


def _input_shapes(specs):
    from .graph import parse_input_shape

    return dict(parse_input_shape(s) for s in specs) or None


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated numbers, got '{text}'", fix=f"e.g. {flag} 0.1,0.3,0.5") from None


def _image_options(size, crop, mean, std, order, scale, grayscale):
    if not any((size, crop, mean, std, order, scale, grayscale)):
        return None
    from .data import ImageOptions

    kw = {}
    if size:
        kw["size"] = size
    if crop:
        kw["crop"] = crop
    if mean:
        kw["mean"] = _floats(mean, "--mean")
    if std:
        kw["std"] = _floats(std, "--std")
    if order:
        kw["channel_order"] = order
    if scale:
        kw["scale"] = scale
    if grayscale:
        kw["grayscale"] = True
    return ImageOptions(**kw)


def data_options(fn):
    opts = [
        click.option("--data", "data", help="Evaluation data: .npz with x (and y), an image folder (class subfolders), or module:function."),
        click.option("--limit", type=int, help="Use only the first N samples of --data."),
        click.option("--batch-size", type=int, default=64, show_default=True, help="ONNX Runtime batch size."),
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True, help="ONNX Runtime device."),
        click.option("--image-size", type=int, help="Images: resize the shorter side to this size."),
        click.option("--crop", type=int, help="Images: center crop to this size."),
        click.option("--mean", help="Images: per-channel mean, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Images: per-channel std, e.g. 0.229,0.224,0.225."),
        click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), help="Images: channel order."),
        click.option("--scale", type=float, help="Images: pixel scale before mean/std (default 1/255)."),
        click.option("--grayscale", is_flag=True, help="Images: convert to one channel."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@click.group(cls=_DefaultGroup, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnxprune")
def main() -> None:
    pass


CALIBRATE_METHODS = ("reconstruct", "both", "affine", "bias")  # = api.CALIBRATE_METHODS (not imported: keeps start-up light)
CALIBRATE_HELP = (
    "reconstruct: re-fit each layer that lost inputs by least squares on the samples (best, a few seconds); "
    "both: bias compensation + per-channel mean/std matching; affine: mean/std only; bias: mean only."
)


@main.command("prune", help=MAIN_HELP)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target-flops", type=float, required=True, help="Fraction of MACs to remove, 0 < R < 1 (0.3 = 30% fewer MACs).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model [default: MODEL.pruned.onnx].")
@click.option("--strategy", type=click.Choice(["auto", "uniform", "sensitivity", "cost-aware"]), default="auto", show_default=True, help="auto = sensitivity with --data, uniform without.")
@click.option("--criterion", type=click.Choice(["l1", "l2", "fpgm", "bn", "random"]), default="l1", show_default=True, help="Channel importance.")
@click.option("--round-to", default="auto", show_default=True, help="Kept channel counts are multiples of N; auto = the CPU's SIMD block (16 with AVX-512, else 8), halved where the target needs it. 1 = no rounding.")
@click.option("--exclude", multiple=True, help="Node name or glob whose channels stay (repeatable).")
@click.option("--input-shape", multiple=True, help="NAME:1x3x224x224 for inputs with dynamic spatial dims (repeatable).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--plan", type=click.Path(path_type=Path), help="Apply this saved plan instead of searching.")
@click.option("--save-plan", type=click.Path(path_type=Path), help="Write the pruning plan (kept channels) as JSON.")
@click.option("--grid", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", show_default=True, help="Sensitivity ratios.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path(".onnxprune-cache"), show_default=True, help="Sensitivity cache folder (resumes interrupted runs).")
@click.option("--memory-budget", type=float, default=1024, show_default=True, help="MiB of cached activations for fast sensitivity runs.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--calibrate", "calibrate_n", type=int, default=512, show_default=True, help="Unlabeled samples used to recover accuracy after pruning (needs --data or --calib-data; 0 = off). With reconstruct the time grows with N x pruned layers: lower N for large models.")
@click.option("--calibrate-method", type=click.Choice(CALIBRATE_METHODS), default=CALIBRATE_METHODS[0], show_default=True, help=CALIBRATE_HELP)
@click.option("--calib-data", help="Unlabeled data for --calibrate [default: the first samples of --data].")
@click.option("--calibrated-sensitivity", is_flag=True, help="Measure sensitivity after calibration (slower; closer to the final model).")
@click.option("--finetune-epochs", type=int, default=0, show_default=True, help="Fine-tune the pruned model for N epochs with torch (needs --train-data).")
@click.option("--train-data", help="Training data for --finetune-epochs (.npz with x, y; folder; module:function).")
@click.option("--lr", type=float, default=0.01, show_default=True, help="Fine-tuning learning rate.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--distill/--no-distill", default=True, show_default=True, help="Distill from the original model while fine-tuning.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@data_options
@run_safely
def prune_cmd(model, target_flops, output, strategy, criterion, round_to, exclude, input_shape, report_path, plan, save_plan, grid, cache_dir, memory_budget, force, calibrate_n, calibrate_method, calib_data, calibrated_sensitivity, finetune_epochs, train_data, lr, optimizer, distill, quiet, as_json, data, limit, batch_size, device, image_size, crop, mean, std, channel_order, scale, grayscale):
    from .api import PruneOptions, prune

    if round_to != "auto":
        try:
            round_to = int(round_to)
        except ValueError:
            raise UsageError(f"--round-to must be 'auto' or an integer, got '{round_to}'", fix="e.g. --round-to 8") from None
    ft = None
    if finetune_epochs:
        from .finetune import FinetuneOptions

        ft = FinetuneOptions(epochs=finetune_epochs, lr=lr, optimizer=optimizer, batch_size=batch_size, device=device)
    elif train_data:
        raise UsageError("--train-data is only used for fine-tuning", fix="add --finetune-epochs N, or drop --train-data")

    options = PruneOptions(
        target_flops=target_flops,
        strategy=strategy,
        criterion=criterion,
        round_to=round_to,
        exclude=tuple(exclude),
        input_shapes=_input_shapes(input_shape),
        device=device,
        batch_size=batch_size,
        limit=limit,
        grid=_floats(grid, "--grid"),
        cache_dir=str(cache_dir) if cache_dir else None,
        memory_budget_mb=memory_budget,
        image_options=_image_options(image_size, crop, mean, std, channel_order, scale, grayscale),
        calibrate=calibrate_n,
        calibrate_method=calibrate_method,
        calibrated_sensitivity=calibrated_sensitivity,
    )
    with progress_bar(not quiet and not as_json) as cb:
        result = prune(model, options=options, data=data, output=output, force=force, plan=plan, save_plan=save_plan, report_path=report_path, train_data=train_data, calib_data=calib_data, finetune_options=ft, distill=distill, progress=cb)
    if as_json:
        click.echo(json.dumps(result.report.to_dict(), default=str, indent=1))
        return
    out_console.print(_groups_table(result.report))
    for line in result.report.summary_lines():
        out_console.print(line, markup=False)
    out_console.print(f"Wrote {result.output}", markup=False)


def _groups_table(report) -> Table:
    t = Table(title="Channel groups", title_justify="left", show_lines=False)
    for col in ("group", "producer", "channels", "kept", "ratio", "MACs share", "note"):
        t.add_column(col, justify="right" if col in ("channels", "kept", "ratio", "MACs share") else "left", overflow="fold")
    for g in report.groups:
        more = f" +{len(g.producers) - 1}" if len(g.producers) > 1 else ""
        t.add_row(g.id, g.producers[0] + more, str(g.channels_before), str(g.channels_after), f"{g.ratio:.0%}", f"{g.macs_share:.1%}", g.blocked_reason or "")
    return t


@main.command("analyze")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--input-shape", multiple=True, help="NAME:1x3x224x224 for inputs with dynamic spatial dims (repeatable).")
@click.option("--exclude", multiple=True, help="Node name or glob whose channels stay (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print layers and groups as JSON.")
@run_safely
def analyze_cmd(model, input_shape, exclude, as_json):
    """Per-layer MACs and params, and the channel groups with what blocks them."""
    from .api import analyze_model
    from .groups import describe
    from .report import human

    cg, costs = analyze_model(model, exclude=tuple(exclude), input_shapes=_input_shapes(input_shape))
    total = costs.total_macs or 1
    layers = [
        {"name": l.name, "op": l.op_type, "output_shape": ["N" if d is None else d for d in l.output_shape], "macs": l.macs, "params": l.params, "share": l.macs / total}
        for l in costs.layers
    ]
    if as_json:
        click.echo(json.dumps({
            "convention": CONVENTION,
            "total_macs": costs.total_macs, "conv_macs": costs.conv_macs, "fc_macs": costs.fc_macs,
            "total_flops": 2 * costs.total_macs, "total_params": costs.total_params,
            "prunable_macs_share": cg.prunable_macs_share, "layers": layers, "groups": describe(cg),
        }, indent=1))
        return
    t = Table(title=f"Layers of {model}", title_justify="left")
    for col in ("node", "op", "output", "MACs", "params", "share"):
        t.add_column(col, justify="right" if col in ("MACs", "params", "share") else "left", overflow="fold")
    for l in layers:
        t.add_row(l["name"], l["op"], "x".join(map(str, l["output_shape"])), f"{l['macs']:,}", f"{l['params']:,}", f"{l['share']:.1%}")
    out_console.print(t)
    g = Table(title="Channel groups", title_justify="left")
    for col in ("group", "producers", "channels", "MACs share", "status"):
        g.add_column(col, justify="right" if col in ("channels", "MACs share") else "left", overflow="fold")
    for grp in cg.groups:
        g.add_row(grp.id, ", ".join(grp.producers[:3]) + (" ..." if len(grp.producers) > 3 else ""), str(grp.channels), f"{grp.macs_share:.1%}", "prunable" if grp.prunable else f"blocked: {grp.blocked_reason}")
    out_console.print(g)
    out_console.print(
        f"Total: {costs.total_macs:,} MACs ({human(costs.total_macs)}; conv {costs.conv_macs:,}, FC {costs.fc_macs:,}), "
        f"FLOPs = 2 x MACs = {human(2 * costs.total_macs)}, params {costs.total_params:,}",
        markup=False,
    )
    out_console.print(f"Prunable: {cg.prunable_macs_share:.1%} of MACs in {len(cg.prunable_groups)} of {len(cg.groups)} groups", markup=False)
    out_console.print(f"Convention: {CONVENTION}", markup=False)


@main.command("sensitivity")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--criterion", type=click.Choice(["l1", "l2", "fpgm", "bn", "random"]), default="l1", show_default=True)
@click.option("--grid", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", show_default=True, help="Ratios to measure.")
@click.option("--exclude", multiple=True, help="Node name or glob whose channels stay (repeatable).")
@click.option("--input-shape", multiple=True)
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write drops as CSV (group, producer, channels, ratio, drop).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write drops as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG plot (needs matplotlib).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path(".onnxprune-cache"), show_default=True)
@click.option("--memory-budget", type=float, default=1024, show_default=True)
@click.option("--no-suffix", is_flag=True, help="Evaluate the full model for every measurement (slower; for comparison).")
@click.option("--calibrate", "calibrate_n", type=int, default=512, show_default=True, help="Measure each drop after calibrating the pruned model on N samples, as the main command does by default (0 = off, about 5x faster).")
@click.option("--calibrate-method", type=click.Choice(CALIBRATE_METHODS), default=CALIBRATE_METHODS[0], show_default=True, help=CALIBRATE_HELP)
@click.option("--calib-data", help="Unlabeled data for --calibrate [default: the first samples of --data].")
@click.option("--quiet", is_flag=True)
@data_options
@run_safely
def sensitivity_cmd(model, criterion, grid, exclude, input_shape, csv_path, json_path, plot_path, cache_dir, memory_budget, no_suffix, calibrate_n, calibrate_method, calib_data, quiet, data, limit, batch_size, device, image_size, crop, mean, std, channel_order, scale, grayscale):
    """Measure each channel group's accuracy drop when pruned alone at each ratio."""
    from .api import PruneOptions, build_evaluator, cache_file, criterion_fallback_note, make_calibrator, sensitivity_variant
    from .data import load_dataset
    from .graph import load_model, write_text_atomic
    from .groups import find_groups
    from .importance import score_units
    from .sensitivity import analyze, curves_to_rows, plot

    if not data:
        raise UsageError("sensitivity analysis measures accuracy and needs data", fix="pass --data DATA")
    options = PruneOptions(criterion=criterion, exclude=tuple(exclude), input_shapes=_input_shapes(input_shape), device=device, batch_size=batch_size, limit=limit, grid=_floats(grid, "--grid"), calibrate=calibrate_n, image_options=_image_options(image_size, crop, mean, std, channel_order, scale, grayscale))
    m = load_model(model)
    cg = find_groups(m, exclude=options.exclude, input_shapes=options.input_shapes)
    note = criterion_fallback_note(cg, criterion)
    if note:
        logging.getLogger("onnxprune").warning(note)
    with progress_bar(not quiet) as cb:
        ev = build_evaluator(cg.model, data, options, cb)
        transform, extra, n_cal = None, "", 0
        if calibrate_n:
            x_cal = load_dataset(calib_data, limit=calibrate_n, image_options=options.image_options).x if calib_data else ev.dataset.x
            cal = make_calibrator(cg, x_cal[:calibrate_n], calibrate_method, batch_size=batch_size, device=device, progress=lambda d, t: cb("calibration", d, t))
            n_cal = len(cal.x)
            transform, extra = cal.transform(method=calibrate_method), f"calibrate={calibrate_method}:{n_cal}"
        cache = cache_file(str(cache_dir), Path(model), sensitivity_variant(criterion, n_cal, calibrate_method))
        run = analyze(cg, score_units(cg, criterion), ev, grid=options.grid, criterion=criterion, cache_file=cache, cache_extra=extra, memory_budget_mb=memory_budget, suffix=not no_suffix, transform=transform, progress=lambda d, t: cb("sensitivity", d, t))
    rows = curves_to_rows(cg, run.curves)
    t = Table(title=f"{run.curves.metric} drop (points) per group; baseline {100 * run.curves.baseline:.2f}%", title_justify="left")
    t.add_column("group")
    t.add_column("producer", overflow="fold")
    t.add_column("ch", justify="right")
    for r in run.curves.ratios:
        t.add_column(f"{r:.0%}", justify="right")
    for g in cg.prunable_groups:
        t.add_row(g.id, g.producers[0], str(g.channels), *[f"{100 * d:.1f}" for d in run.curves.drops[g.id]])
    out_console.print(t)
    how = f"after calibration on {n_cal} samples" if n_cal else "without calibration"
    out_console.print(f"{len(rows)} measurements {how} in {run.seconds:.1f}s ({run.cached} groups from cache)", markup=False)
    if csv_path:
        lines = ["group,producer,channels,ratio,drop"] + [f"{r['group']},{r['producer']},{r['channels']},{r['ratio']},{r['drop']:.6f}" for r in rows]
        write_text_atomic(csv_path, "\n".join(lines) + "\n")
    if json_path:
        write_text_atomic(json_path, json.dumps({"metric": run.curves.metric, "baseline": run.curves.baseline, "ratios": run.curves.ratios, "rows": rows}, indent=1))
    if plot_path:
        plot(cg, run.curves, plot_path)


@main.command("finetune")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data", required=True, help="Training data: .npz with x (and y), image folder, or module:function.")
@click.option("--val", help="Validation data; the best epoch on it is kept.")
@click.option("--teacher", type=click.Path(path_type=Path), help="Original model to distill from (needed when the data has no labels).")
@click.option("--epochs", type=int, required=True, help="Number of epochs.")
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--temperature", type=float, default=4.0, show_default=True, help="Distillation temperature.")
@click.option("--distill-weight", type=float, default=0.5, show_default=True, help="Weight of the distillation loss (with labels).")
@click.option("--augment/--no-augment", default=True, show_default=True, help="Random crop + flip for image tensors.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=int, help="Use only the first N training samples.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model [default: MODEL.finetuned.onnx].")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--quiet", is_flag=True)
@run_safely
def finetune_cmd(model, data, val, teacher, epochs, lr, batch_size, optimizer, weight_decay, temperature, distill_weight, augment, seed, limit, device, output, force, quiet):
    """Fine-tune MODEL with torch and write the trained weights back into the ONNX graph.

    \b
    Example:
      onnxprune finetune model.pruned.onnx --data train.npz --val val.npz --teacher model.onnx --epochs 3

    Several GPUs: see the module docstring of onnxprune.finetune (torchrun + finetune_ddp_entry).
    """
    from .data import load_dataset
    from .finetune import FinetuneOptions, finetune
    from .graph import check_model_path, check_output_path, load_model, save_model

    model = check_model_path(model)
    stem = model.name[:-5] if model.name.endswith(".onnx") else model.name
    out = check_output_path(output or model.with_name(f"{stem}.finetuned.onnx"), input_path=model, force=force)
    opts = FinetuneOptions(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay, temperature=temperature, distill_weight=distill_weight, augment=augment, seed=seed, device=device)
    student = load_model(model)
    teacher_model = load_model(teacher) if teacher else None
    train = load_dataset(data, limit=limit)
    valid = load_dataset(val) if val else None
    with progress_bar(not quiet) as cb:
        def on_event(ev):
            if ev.get("kind") == "step" and ev.get("steps"):
                cb(f"epoch {ev.get('epoch', 1)}", int(ev.get("step", 0)), int(ev["steps"]))

        res = finetune(student, train.x, train.y, val_x=valid.x if valid else None, val_y=valid.y if valid else None, teacher=teacher_model, options=opts, progress=on_event)
    t = Table(title=f"Fine-tuning on {res.device}", title_justify="left")
    for col in ("epoch", "train loss", "train acc", f"val {res.metric or ''}", "seconds"):
        t.add_column(col, justify="right")
    for h in res.history:
        fmt = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        t.add_row(str(h["epoch"]), f"{h['train_loss']:.4f}", fmt(h.get("train_acc")), fmt(h.get("val")) if res.metric != "teacher_mse" else f"{h.get('val')}", f"{h['seconds']:.1f}")
    out_console.print(t)
    if res.initial_val is not None:
        out_console.print(f"validation {res.metric}: {res.initial_val:.4f} before, {res.best_val:.4f} best (epoch {res.best_epoch})", markup=False)
    if res.stopped_reason:
        out_console.print(f"stopped early: {res.stopped_reason}", markup=False)
    save_model(res.model, out)
    out_console.print(f"Wrote {out}", markup=False)


if __name__ == "__main__":  # pragma: no cover
    main()
