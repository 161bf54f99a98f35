"""Evaluate onnx-ir for load / constant normalization / save against onnxprune's own code.

Issue #12 asks whether onnx-ir (pulled in by onnxscript) should replace the
hand-written load/save code in ``onnxprune/tensors.py``. This script measures
both on the same file, each in a fresh subprocess so its peak resident memory
(``VmHWM``) is its own:

* ``onnxprune``: ``graph.load_model`` -> ``normalize.normalize_constants`` (in place)
  -> ``graph.save_model``;
* ``onnx-ir``: ``onnx_ir.load`` -> ``IdentityEliminationPass``,
  ``LiftConstantsToInitializersPass``, ``DeduplicateInitializersPass`` -> ``onnx_ir.save``;
* ``onnx-ir + to_proto``: the same, but the IR model converted back to an
  ``onnx.ModelProto`` (what the analysis, ORT sessions and rewrite consume today).

The model is ImageNet ResNet-50 from ``models.zoo`` with BatchNorm at default
statistics, legacy export (its all-zero folded biases are deduplicated
through ``Identity`` nodes, the exporter habit normalization removes).
Writes ``benchmarks/results/onnx_ir_eval.md``.

    python benchmarks/onnx_ir_eval.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import provenance  # noqa: E402

WORKER = r"""
import json, sys, time
mode, src, dst = sys.argv[1:4]
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
if mode == 'onnxprune':
    from onnxprune.graph import load_model, save_model
    from onnxprune.normalize import normalize_constants
    base = rss(); t = time.perf_counter()
    m = load_model(src)
    m, changes = normalize_constants(m, copy=False)
    save_model(m, dst)
    n = len(changes)
else:
    import onnx_ir as ir
    from onnx_ir.passes.common import DeduplicateInitializersPass, IdentityEliminationPass, LiftConstantsToInitializersPass
    base = rss(); t = time.perf_counter()
    model = ir.load(src)
    before = len(list(model.graph))
    for p in (IdentityEliminationPass(), LiftConstantsToInitializersPass(), DeduplicateInitializersPass()):
        model = p(model).model
    n = before - len(list(model.graph))
    if mode == 'onnx-ir + to_proto':
        proto = ir.serde.serialize_model(model)
        import onnx
        onnx.save(proto, dst)
    else:
        ir.save(model, dst)
print(json.dumps({'seconds': time.perf_counter() - t, 'peak': hwm(), 'base': base, 'changes': n}))
"""


def _export(out: Path) -> Path:
    import torch

    sys.path.insert(0, str(ROOT))
    from models.export import export_onnx
    from models.zoo import ZOO

    torch.manual_seed(0)
    model = ZOO["resnet50"][0]().eval()
    return export_onnx(model, out / "resnet50_default_bn.onnx", input_shape=(1, 3, 224, 224), exporter="legacy")


def _commit() -> str:
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = args.out or Path(tempfile.mkdtemp(prefix="irdemo"))
    tmp.mkdir(parents=True, exist_ok=True)
    src = _export(tmp)
    size = src.stat().st_size / 2**20
    rows = []
    for mode in ("onnxprune", "onnx-ir", "onnx-ir + to_proto"):
        dst = tmp / f"out_{mode.replace(' ', '').replace('+', '_')}.onnx"
        r = subprocess.run([sys.executable, "-c", WORKER, mode, str(src), str(dst)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode:
            rows.append((mode, None, r.stderr.strip().splitlines()[-1]))
            continue
        rows.append((mode, json.loads(r.stdout.strip().splitlines()[-1]), ""))
    import onnx
    import onnx_ir

    lines = [
        "# onnx-ir vs onnxprune's own load / normalize / save",
        "",
        f"Command: `python benchmarks/onnx_ir_eval.py`; source commit {_commit()}; {time.strftime('%Y-%m-%d')}; "
        f"machine: {_cpu()}, {os.cpu_count()} cores; onnx {onnx.__version__}, onnx-ir {onnx_ir.__version__}, Python {platform.python_version()}.",
        "",
        f"Model: ImageNet ResNet-50, BatchNorm at default statistics, legacy torch export, {size:.0f} MiB. Peak = VmHWM of a fresh process;",
        "'above import' subtracts the process's resident memory after its imports.",
        "",
        "| pipeline | nodes removed | seconds | peak MiB | peak above import MiB | (peak above import) / size |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, res, err in rows:
        if res is None:
            lines.append(f"| {mode} | failed: {err[:80]} | | | | |")
            continue
        above = res["peak"] - res["base"]
        lines.append(f"| {mode} | {res['changes']} | {res['seconds']:.2f} | {res['peak']:.0f} | {above:.0f} | {above / size:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "onnx_ir_eval.md"
    provenance.write_atomic(out, text)


if __name__ == "__main__":
    main()
