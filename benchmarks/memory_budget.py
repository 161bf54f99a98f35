"""Peak RSS of ``onnxprune sensitivity`` against ``--memory-budget``.

Each command runs in a fresh subprocess with a fresh ``--cache-dir`` (no resumed results); its
peak resident set size comes from ``os.wait4`` (``ru_maxrss``, the kernel's VmHWM of that child).
The import baseline is a process that only imports onnxprune's CLI, onnx, onnxruntime and numpy.
The budget bounds the activations cached for suffix runs; the rest of the peak is a fixed overhead
(libraries, model, data, reference outputs, ORT sessions), shown by the import baseline and by
``--memory-budget 0`` (no cache: every measurement runs the full model) when ``--with-zero``.

    python benchmarks/memory_budget.py [--with-zero] [--out benchmarks/results/memory_budget.md]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "models/demo/fmnist_resnet20.onnx"
DATA = "models/demo/fmnist_val.npz"
BUDGETS = ("128", "256", "1024", None)  # None: the default (min(4096, 25% of MemAvailable))


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``cmd`` run to completion in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def _rev() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return rev + ("+dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with-zero", action="store_true", help="also measure --memory-budget 0 (slow: full-model evaluations)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_budget.md"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import numpy
    import onnx
    import onnxruntime

    from onnxprune.sensitivity import default_memory_budget_mb

    exe = str(Path(sys.executable).parent / "onnxprune")
    rows = []
    mib, sec = peak_rss([sys.executable, "-c", "import numpy, onnx, onnxruntime, onnxprune.cli"])
    rows.append(("import baseline", "-", mib, sec))
    budgets = (*BUDGETS, "0") if args.with_zero else BUDGETS
    for b in budgets:
        with tempfile.TemporaryDirectory() as cache:
            cmd = [exe, "sensitivity", MODEL, "--data", DATA, "--calibrate", "0", "--cache-dir", cache, "--quiet"]
            cmd += ["--memory-budget", b] if b is not None else []
            mib, sec = peak_rss(cmd)
        label = b if b is not None else f"default ({default_memory_budget_mb():.0f})"
        rows.append((" ".join(c if c != cache else "TMP" for c in cmd[1:]).replace(str(ROOT) + "/", ""), label, mib, sec))
        print(rows[-1], flush=True)
    lines = [
        "# Peak RSS of `onnxprune sensitivity` vs `--memory-budget`",
        "",
        f"Written by `python {' '.join(['benchmarks/memory_budget.py', *sys.argv[1:]])}` on {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"commit {_rev()}; {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {numpy.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}.",
        "",
        f"Model `{MODEL}` (ResNet-20, 288 KB), data `{DATA}` (2500 images, 10 MB float32), fresh process and cache dir per row; "
        "peak RSS = `ru_maxrss` of the child (`os.wait4`).",
        "",
        "| command | budget (MiB) | peak RSS (MiB) | peak - budget (MiB) | wall (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for cmd, label, mib, sec in rows:
        try:
            budget = float(label.split()[-1].strip("()"))
            over = f"{mib - budget:.0f}" if mib >= budget else "(cache < budget)"
        except ValueError:
            over = "-"
        lines.append(f"| `{'python -c import …' if label == '-' else 'onnxprune ' + cmd}` | {label} | {mib:.0f} | {over} | {sec:.1f} |")
    lines += [
        "",
        "The budget bounds the cached activations (filled chunk by chunk into preallocated arrays); "
        "`peak - budget` is the fixed overhead: libraries, model, data, reference outputs, ORT sessions and one chunk.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
