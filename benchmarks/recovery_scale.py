"""Reconstruction at ImageNet scale: time, peak memory and output error vs samples (issue #15).

ResNet-50 at 224x224 (``models.zoo`` resnet50, seeded random weights with
randomized BN statistics, legacy exporter), uniform L1 pruning to -30% MACs
(round_to 8), reconstructed with the default :class:`onnxprune.reconstruct.Reconstructor`
on N = 128 / 512 / 1024 random-normal samples. Each N runs in a fresh
process, so its peak RSS (``ru_maxrss``) is its own; in that process the
original model first runs one ONNX Runtime forward pass over the same N
samples (the reference time, same runtime, batch 32), then the
reconstruction. Output error: relative L2 distance of the logits to the
original's on 64 other samples, after pruning and after reconstruction.

Goal: 512 samples in <= 120 s on 2 cores and <= 20x the forward pass.

    python benchmarks/recovery_scale.py                   # 128 / 512 / 1024
    python benchmarks/recovery_scale.py --samples 128     # one size

Prints markdown and writes ``benchmarks/results/recovery_scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import provenance  # noqa: E402

MODEL = Path("/tmp/onnxprune_bench/resnet50_224.onnx")
TARGET = 0.30
GOAL_S, GOAL_X = 120.0, 20.0


def export() -> Path:
    if not MODEL.is_file():
        from models.export import export_onnx
        from models.zoo import build

        MODEL.parent.mkdir(parents=True, exist_ok=True)
        m, _ = build("resnet50", width=1.0)
        export_onnx(m, MODEL, input_shape=(1, 3, 224, 224), exporter="legacy")
    return MODEL


def one(n: int, rows: int) -> dict:
    """Runs in its own process: forward pass, pruning, reconstruction, output error."""
    import onnx

    from onnxprune import allocate
    from onnxprune.groups import find_groups
    from onnxprune.importance import score_units
    from onnxprune.reconstruct import Reconstructor
    from onnxprune.rewrite import apply_mask
    from onnxprune.runtime import Runner

    cg = find_groups(onnx.load(str(MODEL)))
    scores = score_units(cg, "l1")
    alloc = allocate.uniform(cg, scores, target=TARGET, round_to=8)
    mask = allocate.MaskBuilder(cg, scores).mask(alloc.keep)
    pruned = apply_mask(cg, mask)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3, 224, 224)).astype(np.float32)
    x_eval = rng.normal(size=(64, 3, 224, 224)).astype(np.float32)
    runner = Runner(device="cpu", batch_size=32)
    t = time.perf_counter()
    runner.run(cg.model, x)
    forward = time.perf_counter() - t
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    res = Reconstructor(cg, x, rows=rows, max_samples=n, device="cpu").recover(mask, pruned)
    seconds = time.perf_counter() - t
    load1 = os.getloadavg()[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ref = runner.run(cg.model, x_eval)[0].astype(np.float64)

    def err(m):
        return float(np.linalg.norm(runner.run(m, x_eval)[0] - ref) / np.linalg.norm(ref))

    applied = [f for f in res.layers if f.applied]
    return {
        "n": n, "reduction": alloc.reduction, "forward_s": forward, "recon_s": seconds, "timings": res.timings,
        "peak_rss_mb": peak, "rss_before_recon_mb": rss_before, "cache_peak_mb": res.cache_peak_mb, "spill_peak_mb": res.spill_peak_mb, "layers": len(res.layers),
        "applied": len(applied), "err_pruned": err(pruned), "err_recon": err(res.model), "load": [load0, load1],
        "layer_err": [float(np.median([f.error_before for f in applied])), float(np.median([f.error_after for f in applied]))] if applied else None,
    }


def versions() -> str:
    import onnx
    import onnxruntime

    return f"Python {platform.python_version()}, numpy {np.__version__} ({_blas()}), onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__} (CPU provider, default threads)"


def _blas() -> str:
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{cfg.get('name')} {cfg.get('version')}"
    except Exception:  # noqa: BLE001 - informational only
        return "BLAS unknown"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def render(rows: list[dict], args, started: str, load_start, wall: float) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model_name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except Exception:  # noqa: BLE001
        model_name = cpu
    lines = [
        "# Reconstruction at ImageNet scale (ResNet-50, 224x224)",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/recovery_scale.py', *map(shlex.quote, sys.argv[1:])])}` ({wall / 60:.1f} min in all).  ",
        f"Source: commit {commit()}. Date: {started} (UTC).  ",
        f"Machine: {model_name}, {os.cpu_count()} logical CPUs shared with other engineers' jobs; 1-min load average {load_start[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (per row below: at the start and end of the reconstruction).  ",
        f"Versions: {versions()}.",
        "",
        f"Model: `models.zoo` resnet50 (seeded random weights, randomized BN statistics, legacy exporter), uniform L1 pruning to -{TARGET:.0%} MACs "
        f"(round_to 8, achieved -{rows[0]['reduction']:.1%}). Reconstruction: `Reconstructor(cg, x, rows={args.rows}).recover(mask, pruned)`, "
        "defaults otherwise (mode blockwise, scope consumers, ridge 1e-3, memory_budget_mb 4096: the sampled targets get up to 512 MiB, "
        "the activations kept between layers the rest, float16 and then spill files past it; `spill_peak_mb` in the JSON). Samples: random normal (random weights: only time, memory and output error mean anything).",
        "",
        "| samples | forward pass, original (s) | reconstruction (s) | ratio | picks / targets / activations / normal equations / solves (s) | peak RSS (MB) | activation cache peak (MB) | layers fitted | logits error pruned -> reconstructed | median layer error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = r["timings"]
        le = r["layer_err"]
        lines.append(
            f"| {r['n']} | {r['forward_s']:.1f} | {r['recon_s']:.1f} | {r['recon_s'] / r['forward_s']:.1f}x | "
            + " / ".join(f"{t.get(k, float('nan')):.1f}" for k in ("picks", "targets", "activations", "normals", "fit")) + " | "
            f"{r['peak_rss_mb']:.0f} | {r['cache_peak_mb']:.0f} | {r['applied']}/{r['layers']} | {r['err_pruned']:.3f} -> {r['err_recon']:.3f} | "
            + (f"{le[0]:.3f} -> {le[1]:.3f}" if le else "—") + f" (load {r['load'][0]:.1f} -> {r['load'][1]:.1f}) |"
        )
    lines += [
        "",
        "Forward pass: `Runner(device='cpu', batch_size=32).run(original, x)` on the same N samples, in the same process just before. "
        "Reconstruction time: the whole `recover()` call (one original-model pass for the sampled targets, one pruned-model pass through the "
        "activation stream, normal equations and solves). Peak RSS: `ru_maxrss` of the process (includes the N input samples, "
        "N x 0.6 MB, and the forward-pass reference run). Logits error: relative L2 distance to the original's logits on 64 other samples.",
    ]
    for r in rows:
        if r["n"] == 512:
            ok_s, ok_x = r["recon_s"] <= GOAL_S, r["recon_s"] / r["forward_s"] <= GOAL_X
            lines.append(f"- 512 samples: {r['recon_s']:.1f} s (goal <= {GOAL_S:.0f} s on 2 cores -> **{'MET' if ok_s else 'MISSED'}**, "
                         f"measured with the cores shared, load above), {r['recon_s'] / r['forward_s']:.1f}x the forward pass "
                         f"(goal <= {GOAL_X:.0f}x -> **{'MET' if ok_x else 'MISSED'}**).")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery_scale.md")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rows)))
        return 0
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    export()
    rows = []
    for n in args.samples:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rows", str(args.rows)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    text = render(rows, args, started, load_start, time.perf_counter() - t0)
    print(text)
    provenance.write_atomic(args.out, text)  # a failed run leaves the old results file whole
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
