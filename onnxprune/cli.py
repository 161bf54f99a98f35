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
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import OnnxPruneError, UsageError
from .finetune import LR_HELP, NORMALIZATION_HELP, NORMALIZATIONS
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


PROGRESS_EVERY_S = 5.0  # piped runs: one progress line per stage at most this often (and at start and end)


def line_progress(write=None, every_s: float = PROGRESS_EVERY_S):
    """``callback(stage, done, total)`` printing plain lines (``sensitivity: 27/81 (33%), 4s``) for pipes and
    logs, where a live bar would print nothing until the end: at a stage's start, its end, and every ``every_s``."""
    write = write or (lambda text: err_console.print(text, markup=False, soft_wrap=True, highlight=False))
    t0 = time.monotonic()
    last: dict[str, float] = {}

    def callback(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        finished = total and done >= total
        if stage in last and not finished and now - last[stage] < every_s:
            return
        if finished and last.get(stage) == -1.0:
            return  # end already printed
        last[stage] = -1.0 if finished else now
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        write(f"{stage}: {done}/{total}{pct}, {now - t0:.0f}s")

    return callback


@contextlib.contextmanager
def progress_bar(enabled: bool = True):
    """Progress for the terminal (a live rich display on stderr) or, when stderr is a pipe or a log, plain
    lines (:func:`line_progress`); yields ``callback(stage, done, total)``."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    if not err_console.is_terminal:  # no live display (nor its stray newline) in pipes and logs: lines instead
        yield line_progress()
        return
    columns = (TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def callback(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield callback


NAME_MIN = 12  # node names are never shortened below this many characters
TEXT_WANT = 16  # room a wrapping text column (a blocked reason) gets before node names stay whole

MACS_TOUCHED_CAPTION = (
    "MACs touched: share of the model's MACs in the layers that write or read the group's channels; "
    "a layer counts for its output group and for its input group, so the column sums to more than 100%."
)
MORE_PRODUCERS_CAPTION = " +N: N more layers write the same channels (e.g. joined by a residual Add)."


def _distinct_width(names: list[str]) -> int:
    """Smallest width at which :func:`~onnxprune.report.short_name` keeps different names different."""
    from .report import short_name

    uniq = set(names)
    longest = max(map(len, uniq), default=0)
    for w in range(NAME_MIN, longest + 1):
        if len({short_name(n, w) for n in uniq}) == len(uniq):
            return w
    return longest


def print_table(title: str, columns, rows, *, caption: str | None = None, console: Console | None = None) -> None:
    """Print a table that stays readable at any width and in pipes.

    ``columns``: ``(header, kind)`` with kind ``num`` (right-aligned, never cut or wrapped), ``id``
    (left-aligned, never cut), ``name`` (a node name: one line; when the table is too wide, a tail
    all names share such as ``/Conv`` moves into the header and names are shortened in the middle
    by :func:`~onnxprune.report.short_name`, down to ``NAME_MIN``) or ``text`` (wrapped at spaces).
    A table that still does not fit is printed wider than the terminal rather than cutting a number.
    """
    from .report import short_name

    console = console or out_console
    columns, rows = list(columns), [[str(c) for c in r] for r in rows]
    names = [i for i, (_, kind) in enumerate(columns) if kind == "name"]

    text_want = TEXT_WANT  # text columns ask for this much room (names shrink for it), or at least their longest word

    def widths(name_width: int) -> list[int]:
        out = []
        for i, (header, kind) in enumerate(columns):
            cells = [short_name(r[i], name_width) if kind == "name" else r[i] for r in rows] + [header]
            word = max(len(w) for c in cells for w in (c.split() or [""]))
            out.append(max(word, min(text_want, max(map(len, cells)))) if kind == "text" else max(map(len, cells)))
        return out

    def need(w: list[int]) -> int:  # SIMPLE_HEAD without edges: one separator and one padding space between columns
        return sum(w) + 2 * (len(w) - 1)

    name_width = max([len(r[i]) for r in rows for i in names] + [NAME_MIN])
    if names and need(widths(name_width)) > console.width:
        for i in names:  # '/layers/layers.3/conv1/Conv' -> '/layers/layers.3/conv1' under 'producer …/Conv'
            tail = os.path.commonprefix([r[i][::-1] for r in rows])[::-1]
            tail = tail[tail.rfind("/") :] if "/" in tail else ""
            if tail and len(rows) > 1 and all(len(r[i]) > len(tail) for r in rows):
                columns[i] = (f"{columns[i][0]} …{tail}", "name")
                for r in rows:
                    r[i] = r[i][: -len(tail)]
        name_width = max([len(r[i]) for r in rows for i in names] + [NAME_MIN])
    # never shorten names so far that two different ones look alike: the text columns wrap first
    floor = max([NAME_MIN] + [_distinct_width([r[i] for r in rows]) for i in names])
    floor = min(floor, name_width)
    while names and need(widths(name_width)) > console.width and name_width > floor:
        name_width = max(floor, name_width - math.ceil((need(widths(name_width)) - console.width) / len(names)))
    if need(widths(name_width)) > console.width:
        text_want = 0  # no room: text wraps down to its longest word
        while names and need(widths(name_width)) > console.width and name_width > floor:
            name_width -= 1
    w = widths(name_width)
    texts = [i for i, (_, kind) in enumerate(columns) if kind == "text"]
    slack = max(0, console.width - need(w))
    for i in texts:  # text columns take the room left (rich would squeeze them below their longest word)
        w[i] = min(max([len(r[i]) for r in rows] + [w[i]]), w[i] + slack // len(texts))
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for i, (header, kind) in enumerate(columns):
        t.add_column(header, justify="right" if kind == "num" else "left", no_wrap=kind != "text", overflow="fold", width=w[i])
    for r in rows:
        t.add_row(*(short_name(c, name_width) if i in names else c for i, c in enumerate(r)))
    wide = console
    if need(w) > console.width:  # too many number columns for the terminal: wider lines, whole numbers
        wide = Console(file=console.file, width=need(w), highlight=False, force_terminal=console.is_terminal, no_color=console.no_color)
    # title and caption as lines of their own, wrapped at words at the terminal's width (not the table's)
    console.print(title, markup=False, highlight=False, soft_wrap=False)
    wide.print(t, soft_wrap=False)
    if caption:
        console.print(caption, markup=False, highlight=False, soft_wrap=False)


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
    "reconstruct: re-fit each layer that lost inputs by least squares on the samples (best); "
    "the calibration family: both = bias compensation + per-channel mean/std matching; affine: mean/std only; bias: mean only. "
    "--calibrate-method is the old name."
)


def latency_options(fn):
    """Options of latency-targeted pruning (passed to the command as ``**latency``)."""
    opts = [
        click.option("--target-latency", type=float, help="Fraction of the measured latency to remove, 0 < R < 1 (on the evaluation device, at --latency-batch). Instead of --target-flops."),
        click.option("--latency-batch", type=int, default=1, show_default=True, help="Batch size latency is measured at."),
        click.option("--latency-threads", type=int, help="ONNX Runtime intra-op threads for latency [default: every core this process may use]."),
        click.option("--latency-device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), help="Provider latency is measured on [default: --device]."),
        click.option("--latency-tolerance", type=float, default=0.02, show_default=True, help="Closed loop: re-allocate while the measured cut misses the target by more than this. --round-to auto --measure-latency: the multiple must be faster than the unrounded plan by more than this."),
        click.option("--latency-iterations", type=int, default=6, show_default=True, help="Closed loop: at most N allocate-measure rounds."),
        click.option("--latency-repeats", type=int, default=15, show_default=True, help="Interleaved rounds per end-to-end latency measurement."),
        click.option("--latency-max-spread", type=float, default=0.2, show_default=True, help="Refuse latency measurements whose IQR/median is above this."),
        click.option("--measure-latency", is_flag=True, help="With --target-flops: also measure latency before and after; with --round-to auto, time the unrounded plan against the rounded one and keep it when the multiple buys no measured speed."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


normalization_option = click.option(
    "--normalization", type=click.Choice(NORMALIZATIONS), default="auto", show_default=True, help=NORMALIZATION_HELP
)  # one definition for `onnxprune prune` and `onnxprune finetune`

MEMORY_BUDGET_HELP = "MiB of activations kept for all samples (sensitivity cache, reconstruction targets and activations; the rest spills to temporary files): peak memory is about this plus a fixed overhead. [default: min(4096, 25% of available memory)]"


@main.command("prune", help=MAIN_HELP)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target-flops", type=float, help="Fraction of MACs to remove, 0 < R < 1 (0.3 = 30% fewer MACs). Required unless --plan decides.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model [default: MODEL.pruned.onnx].")
@click.option("--strategy", type=click.Choice(["auto", "uniform", "sensitivity", "cost-aware"]), default="auto", show_default=True, help="auto = uniform without --data; with --data, sensitivity for --target-flops and cost-aware for --target-latency.")
@click.option("--criterion", type=click.Choice(["l1", "l2", "fpgm", "bn", "random", "recon"]), default="l1", show_default=True, help="Channel importance. recon: keep the channels the next layers' outputs are best rebuilt from (needs --data or --calib-data).")
@click.option("--round-to", default="auto", show_default=True, help="Kept channel counts are multiples of N; auto = the CPU's SIMD block (16 with AVX-512, else 8), halved where the target needs it; measured (experimental) = the block only for groups whose standalone layer times step at it, any count elsewhere, with the rounding cost in the summary. 1 = no rounding.")
@click.option("--exclude", multiple=True, help="Node name or glob whose channels stay (repeatable).")
@click.option("--input-shape", multiple=True, help="NAME:1x3x224x224 for inputs with dynamic spatial dims (repeatable).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--plan", type=click.Path(path_type=Path), help="Apply this saved plan instead of searching (it decides the kept channels; no --target-flops needed).")
@click.option("--save-plan", type=click.Path(path_type=Path), help="Write the pruning plan (kept channels) as JSON.")
@click.option("--grid", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", show_default=True, help="Sensitivity ratios.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path(".onnxprune-cache"), show_default=True, help="Sensitivity cache folder (resumes interrupted runs); a folder other than the default also keeps the layer times --round-to measured takes [default for those: ~/.cache/onnxprune].")
@click.option("--memory-budget", type=float, default=None, help=MEMORY_BUDGET_HELP)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--recover", "--calibrate", "calibrate_n", type=int, default=512, show_default=True, help="Unlabeled samples used to recover accuracy after pruning (needs --data or --calib-data; 0 = off; --calibrate is the old name). reconstruct costs about two forward passes over N samples plus the layer fits.")
@click.option("--recovery-method", "--calibrate-method", "calibrate_method", type=click.Choice(CALIBRATE_METHODS), default=CALIBRATE_METHODS[0], show_default=True, help=CALIBRATE_HELP)
@click.option("--calib-data", help="Unlabeled data for --recover [default: the first samples of --data].")
@click.option("--calibrated-sensitivity", is_flag=True, help="Measure sensitivity after calibration (slower; closer to the final model).")
@click.option("--finetune-epochs", type=int, default=0, show_default=True, help="Fine-tune the pruned model for N epochs with torch (needs --train-data).")
@click.option("--train-data", help="Training data for --finetune-epochs (.npz with x, y; folder; module:function).")
@click.option("--lr", type=float, default=None, help=LR_HELP)
@normalization_option
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--distill/--no-distill", default=True, show_default=True, help="Distill from the original model while fine-tuning.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG: channels per group and MACs per layer before/after, and for sensitivity runs the curves with the chosen ratios (needs matplotlib).")
@click.option("--quiet", is_flag=True, help="No progress (bars on a terminal, lines in pipes).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (no progress).")
@latency_options
@data_options
@run_safely
def prune_cmd(model, target_flops, output, strategy, criterion, round_to, exclude, input_shape, report_path, plan, save_plan, grid, cache_dir, memory_budget, force, calibrate_n, calibrate_method, calib_data, calibrated_sensitivity, finetune_epochs, train_data, lr, normalization, optimizer, distill, plot_path, quiet, as_json, data, limit, batch_size, device, image_size, crop, mean, std, channel_order, scale, grayscale, **latency):
    from .api import PruneOptions, prune
    from .graph import check_model_path, check_output_path

    if target_flops is not None and latency["target_latency"] is not None:
        raise UsageError("--target-flops and --target-latency were both given; exactly one target is allowed",
                         fix="pass either --target-flops R (share of MACs) or --target-latency R (share of measured latency)")
    if latency["target_latency"] is not None and plan is not None:
        raise UsageError("--target-latency and --plan were both given: the plan decides the channels", fix="drop --plan to search for the latency target, or drop --target-latency")
    if target_flops is None and plan is None and latency["target_latency"] is None:
        raise UsageError("Missing option '--target-flops' or '--target-latency' (the fraction of MACs or of measured latency to remove)",
                         fix="pass e.g. --target-flops 0.3 or --target-latency 0.3, or --plan PLAN to apply a saved plan")
    ignored = plan is not None and target_flops is not None
    if ignored:  # said after the run (an error before it stays one line)
        ignored, target_flops = f"note: --target-flops {target_flops} is ignored: the plan {plan} decides which channels are kept", None
    if plot_path is not None:  # before any work: a missing extra or a bad path must not cost a whole run
        from .plots import require_matplotlib

        require_matplotlib("--plot")
        check_output_path(plot_path, input_path=check_model_path(model), force=True, flag="--plot")
    if round_to not in ("auto", "measured"):
        try:
            round_to = int(round_to)
        except ValueError:
            raise UsageError(f"--round-to must be 'auto', 'measured' or an integer, got '{round_to}'", fix="e.g. --round-to 8") from None
    ft = None
    if finetune_epochs:
        from .finetune import FinetuneOptions

        ft = FinetuneOptions(epochs=finetune_epochs, lr=lr, normalization=normalization, optimizer=optimizer, batch_size=batch_size, device=device)
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
        **latency,
    )
    with progress_bar(not quiet and not as_json) as cb:
        result = prune(model, options=options, data=data, output=output, force=force, plan=plan, save_plan=save_plan, report_path=report_path, train_data=train_data, calib_data=calib_data, finetune_options=ft, distill=distill, progress=cb)
    if plot_path is not None:
        _prune_plot(result, plot_path)
    if ignored:
        err_console.print(ignored, markup=False, soft_wrap=True)
    if as_json:
        click.echo(json.dumps(result.report.to_dict(), default=str, indent=1))
        return
    _print_groups(result.report)
    for line in result.report.summary_lines():
        out_console.print(line, markup=False, soft_wrap=False)  # long notes wrap at words, at the terminal's width
    out_console.print(f"Wrote {result.output}" + (f" and {plot_path}" if plot_path else ""), markup=False)


def _prune_plot(result, path: Path) -> None:
    from .flops import count
    from .graph import load_model
    from .plots import prune_png

    shapes = ((result.report.detail or {}).get("input_shapes") or {}).get("shapes")
    shapes = {k: tuple(v) for k, v in shapes.items()} if shapes else None
    before = count(load_model(result.report.input), input_shapes=shapes).layers
    after = {l.name: l.macs for l in count(result.model, input_shapes=shapes).layers}
    prune_png(result.report, before, after, path, curves=result.curves)


def _print_groups(report) -> None:
    rows = []
    for g in report.groups:
        more = f" +{len(g.producers) - 1}" if len(g.producers) > 1 else ""
        rows.append((g.id, g.producers[0], more.strip(), g.channels_before, g.channels_after, f"{g.ratio:.0%}", f"{g.macs_share:.1%}", g.blocked_reason or ""))
    cols = [("group", "id"), ("producer", "name"), ("+N", "text"), ("channels", "num"), ("kept", "num"), ("removed", "num"), ("MACs touched", "num"), ("note", "text")]
    caption = MACS_TOUCHED_CAPTION + MORE_PRODUCERS_CAPTION
    if not any(r[2] for r in rows):  # no group with several producers: no "+N" column
        cols, rows, caption = cols[:2] + cols[3:], [r[:2] + r[3:] for r in rows], MACS_TOUCHED_CAPTION
    print_table("Channel groups", cols, rows, caption=caption)


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
            "prunable_macs_share": cg.prunable_macs_share, "output_prunable_share": cg.output_prunable_share,
            "normalizations": [c.describe() for c in cg.normalizations], "layers": layers, "groups": describe(cg),
        }, indent=1))
        return
    print_table(
        f"Layers of {model}",
        [("node", "name"), ("op", "id"), ("output", "id"), ("MACs", "num"), ("params", "num"), ("MACs share", "num")],
        [(l["name"], l["op"], "x".join(map(str, l["output_shape"])), f"{l['macs']:,}", f"{l['params']:,}", f"{l['share']:.1%}") for l in layers],
    )
    print_table(
        "Channel groups",
        [("group", "id"), ("producer", "name"), ("+N", "text"), ("channels", "num"), ("MACs touched", "num"), ("status", "text")],
        [
            (grp.id, grp.producers[0], f"+{len(grp.producers) - 1}" if len(grp.producers) > 1 else "", grp.channels, f"{grp.macs_share:.1%}",
             "prunable" if grp.prunable else f"blocked: {grp.blocked_reason}")
            for grp in cg.groups
        ],
        caption=MACS_TOUCHED_CAPTION + (MORE_PRODUCERS_CAPTION if any(len(g.producers) > 1 for g in cg.groups) else ""),
    )
    out_console.print(
        f"Total: {costs.total_macs:,} MACs ({human(costs.total_macs)}; conv {costs.conv_macs:,}, FC {costs.fc_macs:,}), "
        f"FLOPs = 2 x MACs = {human(2 * costs.total_macs)}, params {costs.total_params:,}",
        markup=False,
    )
    out_console.print(
        f"Prunable: {len(cg.prunable_groups)} of {len(cg.groups)} groups; {cg.output_prunable_share:.1%} of MACs are in layers whose "
        f"filters can be removed ({cg.prunable_macs_share:.1%} touched by a prunable group)",
        markup=False,
    )
    if cg.normalizations:
        from .normalize import summarize

        out_console.print(f"Normalized before analysis (same function): {summarize(cg.normalizations)} on constants", markup=False)
    out_console.print(f"Convention: {CONVENTION}", markup=False)


@main.command("sensitivity")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--criterion", type=click.Choice(["l1", "l2", "fpgm", "bn", "random", "recon"]), default="l1", show_default=True)
@click.option("--grid", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", show_default=True, help="Ratios to measure.")
@click.option("--exclude", multiple=True, help="Node name or glob whose channels stay (repeatable).")
@click.option("--input-shape", multiple=True)
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write the drops as CSV: group, producer, channels, ratio, drop_points.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the drops as JSON to this file (what --json prints).")
@click.option("--json", "as_json", is_flag=True, help="Print the drops as JSON on stdout instead of the table (no progress).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG: curves, or a heatmap for 12+ groups (needs matplotlib).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path(".onnxprune-cache"), show_default=True)
@click.option("--memory-budget", type=float, default=None, help=MEMORY_BUDGET_HELP)
@click.option("--no-suffix", is_flag=True, help="Evaluate the full model for every measurement (slower; for comparison).")
@click.option("--calibrate", "calibrate_n", type=int, default=512, show_default=True, help="Measure each drop after calibrating the pruned model on N samples, as the main command does by default (0 = off, about 5x faster).")
@click.option("--calibrate-method", type=click.Choice(CALIBRATE_METHODS), default=CALIBRATE_METHODS[0], show_default=True, help=CALIBRATE_HELP)
@click.option("--calib-data", help="Unlabeled data for --calibrate [default: the first samples of --data].")
@click.option("--quiet", is_flag=True, help="No progress (bars on a terminal, lines in pipes).")
@data_options
@run_safely
def sensitivity_cmd(model, criterion, grid, exclude, input_shape, csv_path, report_path, as_json, plot_path, cache_dir, memory_budget, no_suffix, calibrate_n, calibrate_method, calib_data, quiet, data, limit, batch_size, device, image_size, crop, mean, std, channel_order, scale, grayscale):
    """Measure each channel group's accuracy drop (in points) when pruned alone at each ratio."""
    from .api import PruneOptions, build_evaluator, cache_file, check_model_input, criterion_fallback_note, make_calibrator, sensitivity_variant
    from .data import load_dataset
    from .graph import check_model_path, check_output_path, load_model, write_text_atomic
    from .groups import find_groups
    from .importance import score_units
    from .sensitivity import analyze, curves_to_rows, plot

    if not data:
        raise UsageError("sensitivity analysis measures accuracy and needs data", fix="pass --data DATA")
    options = PruneOptions(criterion=criterion, exclude=tuple(exclude), input_shapes=_input_shapes(input_shape), device=device, batch_size=batch_size, limit=limit, grid=_floats(grid, "--grid"), calibrate=calibrate_n, calibrate_method=calibrate_method, image_options=_image_options(image_size, crop, mean, std, channel_order, scale, grayscale))
    # everything that can be refused without running the model, first
    model = check_model_path(model)
    if plot_path is not None:
        from .plots import require_matplotlib

        require_matplotlib("--plot")
    for path, flag in ((csv_path, "--csv"), (report_path, "--report"), (plot_path, "--plot")):
        if path is not None:
            check_output_path(path, input_path=model, force=True, flag=flag)
    cache_file(str(cache_dir), model)  # a bad --cache-dir fails now
    m = load_model(model)
    from .api import resolve_input_shapes
    from .normalize import normalize_constants

    m, _ = normalize_constants(m, copy=False)  # our own loaded copy: find_groups then has nothing to copy
    cg = find_groups(m, exclude=options.exclude, input_shapes=resolve_input_shapes(m, options, data).shapes)
    x_cal = None
    if calibrate_n and calib_data:
        x_cal = check_model_input(cg.model, load_dataset(calib_data, limit=calibrate_n, image_options=options.image_options, flag="--calib-data"), flag="--calib-data").x
    note = criterion_fallback_note(cg, criterion)
    if note:
        logging.getLogger("onnxprune").warning(note)
    with progress_bar(not quiet and not as_json) as cb:
        ev = build_evaluator(cg.model, data, options, cb, shapes=cg.shapes)
        transform, extra, n_cal = None, "", 0
        if calibrate_n:
            x_cal = ev.dataset.x if x_cal is None else x_cal
            cal = make_calibrator(cg, x_cal[:calibrate_n], calibrate_method, batch_size=batch_size, device=device, progress=lambda d, t: cb("calibration", d, t), memory_budget_mb=memory_budget)
            n_cal = len(cal.x)
            transform, extra = cal.transform(method=calibrate_method), f"calibrate={calibrate_method}:{n_cal}"
        cache = cache_file(str(cache_dir), model, sensitivity_variant(criterion, n_cal, calibrate_method))
        run = analyze(cg, score_units(cg, criterion, data=x_cal if x_cal is not None else ev.dataset.x[:512], device=device), ev, grid=options.grid, criterion=criterion, cache_file=cache, cache_extra=extra, memory_budget_mb=memory_budget, suffix=not no_suffix, transform=transform, progress=lambda d, t: cb("sensitivity", d, t))
    rows = curves_to_rows(cg, run.curves)
    how = f"after calibration ({calibrate_method}, {n_cal} samples)" if n_cal else "without calibration"
    doc = {
        "metric": run.curves.metric, "baseline_percent": 100 * run.curves.baseline, "ratios": list(run.curves.ratios),
        "calibration": {"method": calibrate_method, "samples": n_cal} if n_cal else None, "rows": rows,
    }  # fmt: skip
    if csv_path:
        lines = ["group,producer,channels,ratio,drop_points"] + [f"{r['group']},{_csv_field(r['producer'])},{r['channels']},{r['ratio']},{r['drop_points']:.4f}" for r in rows]
        write_text_atomic(csv_path, "\n".join(lines) + "\n")
    if report_path:
        write_text_atomic(report_path, json.dumps(doc, indent=1))
    if plot_path:
        plot(cg, run.curves, plot_path, calibration=how)
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    print_table(
        f"{run.curves.metric} drop in points, each group pruned alone (baseline {100 * run.curves.baseline:.2f}%)",
        [("group", "id"), ("producer", "name"), ("ch", "num"), *[(f"{r:.0%}", "num") for r in run.curves.ratios]],
        [(g.id, g.producers[0], g.channels, *[f"{100 * d:.1f}" for d in run.curves.drops[g.id]]) for g in cg.prunable_groups],
    )
    out_console.print(f"{len(rows)} measurements {how} in {run.seconds:.1f}s ({run.cached} groups from cache)", markup=False)
    written = [str(p) for p in (csv_path, report_path, plot_path) if p]
    if written:
        out_console.print("Wrote " + ", ".join(written), markup=False)


def _csv_field(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


@main.command("finetune")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data", required=True, help="Training data: .npz with x (and y), image folder, or module:function.")
@click.option("--val", help="Validation data; the best epoch on it is kept.")
@click.option("--teacher", type=click.Path(path_type=Path), help="Original model to distill from (needed when the data has no labels).")
@click.option("--epochs", type=int, required=True, help="Number of epochs.")
@click.option("--lr", type=float, default=None, help=LR_HELP)
@normalization_option
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
def finetune_cmd(model, data, val, teacher, epochs, lr, normalization, batch_size, optimizer, weight_decay, temperature, distill_weight, augment, seed, limit, device, output, force, quiet):
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
    opts = FinetuneOptions(epochs=epochs, lr=lr, normalization=normalization, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay, temperature=temperature, distill_weight=distill_weight, augment=augment, seed=seed, device=device)
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
        fmt = (lambda v: f"{v:.4g}") if res.metric == "teacher_mse" else (lambda v: f"{100 * v:.2f}%")  # noqa: E731 - accuracies in percent, as in the table
        out_console.print(f"validation {res.metric}: {fmt(res.initial_val)} before, {fmt(res.best_val)} best (epoch {res.best_epoch})", markup=False)
    if res.lr_pilot:
        tried = ", ".join(f"{lr:g} -> {'diverged' if v is None else format(v, '.4g')}" for lr, v in res.lr_pilot)
        out_console.print(f"learning rate {res.lr:g}, chosen by a pilot on validation {res.metric} ({tried})", markup=False)
    else:
        out_console.print(f"learning rate {res.lr:g}" + (" (no validation data for a pilot: pass --val)" if lr is None else ""), markup=False)
    if res.normalization_pilot:
        tried = ", ".join(f"{k} -> {'diverged' if v is None else format(v, '.4g')}" for k, v in res.normalization_pilot)
        out_console.print(f"normalization chosen by a pilot on validation {res.metric} ({tried})", markup=False)
    out_console.print(f"normalization: {res.normalization}" + (f" ({res.renormalized} convs, folded back on write)" if res.renormalized else "")
                      + (f"; validation data: {res.val_source}" if res.val_source and res.val_source != "given" else ""), markup=False)
    if res.note:
        out_console.print(f"note: {res.note}", markup=False)
    if res.stopped_reason:
        out_console.print(f"stopped early: {res.stopped_reason}", markup=False)
    save_model(res.model, out)
    out_console.print(f"Wrote {out}", markup=False)


if __name__ == "__main__":  # pragma: no cover
    main()
