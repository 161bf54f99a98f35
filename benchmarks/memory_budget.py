"""Peak RSS of onnxprune's commands against ``--memory-budget`` (issue #14).

Each command runs in a fresh subprocess (``nice -n 5``) with a fresh ``--cache-dir`` (no resumed
results), started by GNU ``/usr/bin/time -f %M``, whose report is the command's peak resident set size
(``ru_maxrss``). Not ``os.wait4`` from this script: Linux keeps the high-water mark of the memory a
child had before ``exec``, and a child forked from this process (which builds the ResNet-50 with torch)
would report this process's size. The ResNet-50 is built in a subprocess too. ``--jobs`` rows run at
once (memory is per process; only the wall times change). The *import floor* is a process that only imports onnxprune's CLI, onnx, onnxruntime
and numpy. ``peak - budget`` is what the budget does not cover: libraries, the model (twice while
pruning), the data and reference outputs, ONNX Runtime sessions and one chunk of activations.

Rows (``--rows``, default all):

* ``sens20``: ``onnxprune sensitivity`` on the demo ResNet-20 (2,500 images) at 128 / 256 / 1024 MiB
  and the default (``--with-zero``: also 0, no cache at all, slow);
* ``main20``: the README's main command with data (sensitivity + reconstruction on 512 samples +
  evaluation) on the demo ResNet-20 at 256 MiB and the default;
* ``sensmbv2``: ``sensitivity --calibrate 0`` on the demo MobileNetV2 at 256 MiB and the default
  (the default ``--calibrate 512`` reconstructs every variant: too slow for this benchmark);
* ``sens50``: ``sensitivity --calibrate 0`` on ResNet-50 at 224 (``models.zoo``, seeded random
  weights, legacy exporter, built into a temporary folder) with 64 random images, grid 0.5
  (one ratio: the memory does not depend on the grid, the time does), at 512 MiB
  (``--with-default50``: also the default budget; ~10 min on 2 loaded cores);
* ``rec50``: the pruning command on that ResNet-50 with ``--strategy uniform --round-to 1 --calib-data``
  of 512 random samples (one reconstruction on 512 samples at 224; with rounding the report also
  reconstructs the unrounded mask, a second identical run) at 1024 MiB.

    python benchmarks/memory_budget.py [--rows sens20,main20,...] [--with-zero] [--out benchmarks/results/memory_budget.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import provenance  # noqa: E402
R20 = "models/demo/fmnist_resnet20.onnx"
MBV2 = "models/demo/fmnist_mobilenetv2.onnx"
VAL = "models/demo/fmnist_val.npz"
CALIB = "models/demo/fmnist_calib.npz"
ROWS = ("sens20", "main20", "sensmbv2", "sens50", "rec50")


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``cmd`` run to completion in a fresh process (see the module docstring)."""
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as rep:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rep.name, "nice", "-n", "5", *cmd], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
        kib = int(rep.read().split()[-1])
    return kib / 1024, time.perf_counter() - t0


def _rev() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return rev + ("+dirty" if dirty else "")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _build_resnet50(folder: str) -> None:
    """ResNet-50 at 224 (random weights), 64 random images and 512 random calibration samples (run in a subprocess)."""
    sys.path.insert(0, str(ROOT))
    from models.export import export_onnx
    from models.zoo import build

    m, _ = build("resnet50", width=1.0)
    export_onnx(m, Path(folder) / "resnet50_224.onnx", input_shape=(1, 3, 224, 224), exporter="legacy")
    rng = np.random.default_rng(0)
    np.savez(Path(folder) / "images64.npz", x=rng.normal(size=(64, 3, 224, 224)).astype(np.float32))
    np.savez(Path(folder) / "calib512.npz", x=rng.normal(size=(512, 3, 224, 224)).astype(np.float32))


def _resnet50(folder: Path) -> tuple[str, str, str]:
    subprocess.run([sys.executable, __file__, "--build-resnet50", str(folder)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return str(folder / "resnet50_224.onnx"), str(folder / "images64.npz"), str(folder / "calib512.npz")


def plan(rows: list[str], with_zero: bool, tmp: Path, with_default50: bool = False) -> list[tuple[str, str | None, list[str]]]:
    """``(row, budget, arguments after 'onnxprune')`` in run order; TMP stands for a fresh folder."""
    out = []
    sens = ["--calibrate", "0", "--cache-dir", "TMP", "--quiet"]
    if "sens20" in rows:
        for b in ("128", "256", "1024", None, *(("0",) if with_zero else ())):
            out.append(("sens20", b, ["sensitivity", R20, "--data", VAL, *sens]))
    if "main20" in rows:
        for b in ("256", None):
            out.append(("main20", b, [R20, "--target-flops", "0.3", "--data", VAL, "--calib-data", CALIB, "-o", "TMP/out.onnx", "--cache-dir", "TMP", "--quiet"]))
    if "sensmbv2" in rows:
        for b in ("256", None):
            out.append(("sensmbv2", b, ["sensitivity", MBV2, "--data", VAL, *sens]))
    if "sens50" in rows or "rec50" in rows:
        model, data, calib = _resnet50(tmp)
        if "sens50" in rows:
            for b in ("512", *((None,) if with_default50 else ())):
                out.append(("sens50", b, ["sensitivity", model, "--data", data, "--grid", "0.5", *sens]))
        if "rec50" in rows:
            out.append(("rec50", "1024", [model, "--target-flops", "0.3", "--strategy", "uniform", "--round-to", "1", "--data", data, "--calib-data", calib,
                                          "-o", "TMP/out.onnx", "--cache-dir", "TMP", "--quiet"]))  # fmt: skip
    return out


def _load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--with-zero", action="store_true", help="also measure --memory-budget 0 on ResNet-20 sensitivity (slow: full-model evaluations)")
    ap.add_argument("--with-default50", action="store_true", help="also measure ResNet-50 sensitivity at the default budget (slow: ~10 min on 2 loaded cores)")
    ap.add_argument("--jobs", type=int, default=1, help="rows run at once (peak RSS is per process; wall times grow)")
    ap.add_argument("--build-resnet50", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_budget.md"))
    args = ap.parse_args()
    if args.build_resnet50:
        return _build_resnet50(args.build_resnet50)
    rows = [r for r in args.rows.split(",") if r]
    if any(r not in ROWS for r in rows):
        raise SystemExit(f"--rows: choose among {','.join(ROWS)}")
    sys.path.insert(0, str(ROOT))
    import onnx
    import onnxruntime

    from onnxprune.sensitivity import default_memory_budget_mb

    started = datetime.datetime.now(datetime.timezone.utc)
    load0, t_all = _load(), time.perf_counter()
    exe = str(Path(sys.executable).parent / "onnxprune")
    floor, sec = peak_rss([sys.executable, "-c", "import numpy, onnx, onnxruntime, onnxprune.cli"])
    results = [("floor", "-", "python -c 'import numpy, onnx, onnxruntime, onnxprune.cli'", floor, sec)]
    with tempfile.TemporaryDirectory(prefix="membench-") as work:

        def measure(item):
            row, b, argv = item
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                cmd = [exe, *(tmp if a == "TMP" else a.replace("TMP/", tmp + "/") for a in argv)]
                cmd += ["--memory-budget", b] if b is not None else []
                mib, sec = peak_rss(cmd)
            shown = " ".join(["onnxprune", *argv, *(["--memory-budget", b] if b is not None else [])]).replace(work + "/", "TMP/")
            label = b if b is not None else f"default ({default_memory_budget_mb():.0f})"
            print((row, label, shown, mib, sec), flush=True)
            return row, label, shown, mib, sec

        todo = plan(rows, args.with_zero, Path(work), args.with_default50)
        order = sorted(range(len(todo)), key=lambda k: ROWS.index(todo[k][0]), reverse=True)  # the longest (ResNet-50) rows first
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            done = dict(zip(order, pool.map(measure, [todo[k] for k in order])))
        results += [done[k] for k in range(len(todo))]
    load1, total = _load(), time.perf_counter() - t_all
    lines = [
        "# Peak RSS of onnxprune's commands vs `--memory-budget`",
        "",
        f"Command: `python {' '.join(['benchmarks/memory_budget.py', *sys.argv[1:]])}` ({total / 60:.1f} min in all; each row under `nice -n 5`, {args.jobs} at a time).  ",
        f"Source: commit {_rev()}. Date: {started:%Y-%m-%d %H:%M} (UTC).  ",
        f"Machine: {_cpu()}, {os.cpu_count()} logical CPUs shared with other engineers' jobs; 1-min load average {load0:.1f} at the start, {load1:.1f} at the end; "
        f"{platform.platform()}.  ",
        f"Versions: Python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}.",
        "",
        f"Models: `{R20}` (ResNet-20, 288 KB) and `{MBV2}` with `{VAL}` (2,500 images) and `{CALIB}` (512); "
        "ResNet-50 at 224 from `models.zoo` (seeded random weights, legacy exporter) with random-normal images (TMP/images64.npz: 64, TMP/calib512.npz: 512). "
        "Fresh process and cache dir per row; peak RSS = `ru_maxrss` of the command as GNU `/usr/bin/time -f %M` reports it; import floor = peak RSS of a process that only imports the libraries. "
        "Wall times are under load and only say what the row cost.",
        "",
        "| row | command | budget (MiB) | peak RSS (MiB) | peak - budget (MiB) | import floor (MiB) | wall (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row, label, shown, mib, sec in results:
        try:
            over = f"{mib - float(label.split()[-1].strip('()')):.0f}"
        except ValueError:
            over = "-"
        lines.append(f"| {row} | `{shown}` | {label} | {mib:.0f} | {over} | {floor:.0f} | {sec:.1f} |")
    lines += [
        "",
        "The budget bounds what is kept for all samples: the sensitivity cache of frontier activations (filled chunk by chunk into preallocated arrays; "
        "a group whose frontier does not fit runs the full model), and in reconstruction the sampled targets (a quarter) and the activations kept "
        "between layers (the rest), float16 past their share and then spilled to temporary files read back batch by batch. "
        "`peak - budget` is the overhead the budget does not cover: libraries (the import floor), the model and its pruned copy, the data and reference outputs, "
        "ONNX Runtime sessions and one chunk (chunks whose largest activation would pass 64 MiB get fewer samples and no ORT arena). "
        "A negative `peak - budget` means the run needed less than its budget.",
    ]
    provenance.write_atomic(args.out, "\n".join(lines) + "\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
