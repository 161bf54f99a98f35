"""Latency of the YOLOv8n-style detector before and after pruning (ONNX Runtime, CPU).

    python benchmarks/detector.py [--imgsz 320] [--rounds 40] [--threads 1]

Exports ``models.detector.yolo_detector`` (width 0.25, the "n" channel counts,
80 classes) as Ultralytics does (legacy exporter, fixed batch 1, onnxslim,
``imgsz`` metadata), prunes it to -30% and -50% MACs with
``onnxprune.api.prune`` (uniform allocation, L1 criterion, default channel
rounding), and times the three models interleaved (original, -30%, -50%,
original, ...), ``--rounds`` times each after warm-up; reports medians.
Writes ``benchmarks/results/detector.md`` and prints it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from benchmarks.coverage import provenance  # noqa: E402
from benchmarks.provenance import write_atomic  # noqa: E402
from models.detector import export_yolo, init_weights, yolo_detector  # noqa: E402
from onnxprune.api import PruneOptions, prune  # noqa: E402
from onnxprune.flops import count  # noqa: E402


def session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--targets", type=float, nargs="*", default=[0.3, 0.5])
    args = ap.parse_args()
    command = f"python benchmarks/detector.py --imgsz {args.imgsz} --rounds {args.rounds} --threads {args.threads}"
    with tempfile.TemporaryDirectory() as tmp:
        path = export_yolo(init_weights(yolo_detector(width=0.25)).eval(), Path(tmp) / "yolo.onnx", imgsz=args.imgsz,
                           exporter="legacy", simplify=True)
        original = path.read_bytes()
        base = count(__import__("onnx").load(str(path)))
        models = {"original": (original, base.total_macs, base.total_params, "–")}
        for t in args.targets:
            res = prune(path, options=PruneOptions(target_flops=t), write=False)
            r = res.report
            models[f"-{t:.0%} target"] = (res.model.SerializeToString(), r.macs_after, r.params_after, str(r.round_to))
    sessions = {k: session(v[0], args.threads) for k, v in models.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, args.imgsz, args.imgsz)).astype(np.float32)
    name = sessions["original"].get_inputs()[0].name
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, {name: x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {name: x})
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    m0, p0, t0 = models["original"][1], models["original"][2], med["original"]
    rows = ["| model | MACs | MACs cut | params | params cut | round_to | median ms | latency cut | latency cut / MACs cut |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, (_, macs, params, rt) in models.items():
        mc, lc = 1 - macs / m0, 1 - med[k] / t0
        ratio = f"{lc / mc:.2f}" if mc > 0 else "–"
        rows.append(f"| {k} | {macs:,} | {mc:.1%} | {params:,} | {1 - params / p0:.1%} | {rt} | {med[k]:.2f} | {lc:.1%} | {ratio} |")
    text = "\n".join([
        "# YOLOv8n-style detector: MACs, params and ORT CPU latency after pruning",
        "",
        *provenance(command),
        f"- model: `models.detector.yolo_detector(width=0.25)` (80 classes), {args.imgsz}x{args.imgsz}, batch 1, legacy export + onnxslim; "
        f"ONNX Runtime {ort.__version__} CPUExecutionProvider, {args.threads} intra-op thread(s)",
        f"- pruning: `onnxprune.api.prune(..., PruneOptions(target_flops=T))` (uniform allocation without data, L1, default rounding); "
        f"latency: {args.rounds} interleaved rounds (original, pruned..., original, ...) after 3 warm-up runs each, medians",
        "",
        *rows,
        "",
    ])
    out = ROOT / "benchmarks" / "results" / "detector.md"
    write_atomic(out, text)
    print(text)


if __name__ == "__main__":
    main()
