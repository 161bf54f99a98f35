"""Time the read-only analysis path on ResNet-50 (legacy export, 1x3x224x224).

Prints load, shape-inference and cost-counting times (best of ``--repeat``)
and peak memory. Target: ``count`` on a loaded model (shape inference
included) under 0.5 s. Prints a markdown report that starts with the
provenance header (command, commit, machine, load) and writes it to
``benchmarks/results/analyze_speed.md`` (``--out``; ``--out -``: print only).

    python benchmarks/analyze_speed.py [--repeat 3] [--exporter legacy] [--out PATH]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnxprune.flops import count, shapes_needed  # noqa: E402
from onnxprune.graph import GraphIndex, infer_shapes, load_model  # noqa: E402

from benchmarks import provenance  # noqa: E402

TARGET_S = 0.5


def _best(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _peak_traced(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--exporter", default="legacy", choices=("legacy", "dynamo"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analyze_speed.md"), help="markdown output ('-': print only)")
    args = ap.parse_args(argv)
    prov = provenance.start(script="benchmarks/analyze_speed.py", argv=list(sys.argv[1:] if argv is None else argv))

    from models.export import export_onnx
    from models.zoo import build

    with tempfile.TemporaryDirectory() as tmp:
        model_t, shape = build("resnet50")
        t = time.perf_counter()
        path = export_onnx(model_t, Path(tmp) / "resnet50.onnx", input_shape=shape, exporter=args.exporter)
        export_s = time.perf_counter() - t
        del model_t
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        load_s, model = _best(lambda: load_model(path), args.repeat)
        need = shapes_needed(model, GraphIndex(model))
        infer_s, shapes = _best(lambda: infer_shapes(model, need=need), args.repeat)
        count_shapes_s, _ = _best(lambda: count(model, shapes=shapes), args.repeat)
        count_s, report = _best(lambda: count(model), args.repeat)
        peak_count = _peak_traced(lambda: count(model))
        peak_load = _peak_traced(lambda: load_model(path))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size_mb = path.stat().st_size / 2**20

    rows = [
        ("export (torch, once)", f"{export_s:8.3f} s"),
        ("load_model (checker incl.)", f"{load_s:8.3f} s"),
        ("infer_shapes", f"{infer_s:8.3f} s"),
        ("count, shapes given", f"{count_shapes_s:8.3f} s"),
        ("count after load (total)", f"{count_s:8.3f} s   target < {TARGET_S} s: {'OK' if count_s < TARGET_S else 'MISSED'}"),
        ("peak traced, load_model", f"{peak_load / 2**20:8.1f} MiB (Python heap only)"),
        ("peak traced, count", f"{peak_count / 2**20:8.1f} MiB (Python heap only)"),
        ("max RSS, process", f"{rss / 1024:8.1f} MiB (torch + export before: {rss_before / 1024:.0f} MiB)"),
    ]
    w = max(len(r[0]) for r in rows)
    text = "\n".join([
        "# Read-only analysis of ResNet-50: load and count times", "", *prov.header(), "",
        f"ResNet-50 ({args.exporter} export, {size_mb:.1f} MiB, {len(report.layers)} layers, {report.total_macs:,} MACs), "
        f"best of {args.repeat}; wall times on the shared machine above (they vary with its load):", "",
        "```", *(f"{k:<{w}}  {v}" for k, v in rows), "```", "",
    ])
    print(text)
    if args.out != "-":
        provenance.write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
