"""Latency-targeted pruning (``--target-latency``) on ONNX Runtime CPU, and MAC targets measured.

For each model, batch (1, 32) and target (0.3, 0.5):

* ``--target-latency R --strategy uniform`` (no data): the measured latency cut
  of the written model (interleaved original/pruned rounds, medians), its MACs
  cut, the predicted-vs-measured latency error of the kept iteration, the
  closed-loop iterations, and the table build time (cold; later rows read the
  cache). Goal: measured cut within +-3 points of the target, |error| <= 10%.
* ``--target-flops R --measure-latency`` (default rounding): latency cut / MACs
  cut, and whether the summary explains a ratio below 0.9 and suggests
  ``--target-latency``.

Then the table build time: ResNet-50 at 224x224 (full size), batch 1, on a
cold cache and again from the cache, and the three demo models.

Models are random-weight look-alikes from ``models/`` exported with the legacy
exporter; sizes reduced where the full size does not fit the time are stated
in the table (width multiplier, input size).

    python benchmarks/latency_target.py [--threads 2] [--quick] [--models a,b] [--out benchmarks/results/latency_target.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from onnxprune.api import PruneOptions, prune  # noqa: E402
from onnxprune.errors import OnnxPruneError  # noqa: E402
from onnxprune.hardware import cpu_identity, simd_channel_block  # noqa: E402

from benchmarks import provenance  # noqa: E402

# name, label, constructor kwargs, input (C, H, W), what was reduced
MODELS = [
    ("vgg16_bn", "VGG-16 (CIFAR)", {}, (3, 32, 32), "full size"),
    ("vgg16_224", "VGG-16 (ImageNet layout)", {"width": 0.25, "img": 96}, (3, 96, 96), "width 0.25, 96x96 input"),
    ("resnet18", "ResNet-18", {"width": 0.5}, (3, 96, 96), "width 0.5, 96x96 input"),
    ("resnet50", "ResNet-50", {"width": 0.5}, (3, 64, 64), "width 0.5, 64x64 input"),
    ("resnet56", "ResNet-56 (CIFAR)", {}, (3, 32, 32), "full size"),
    ("mobilenetv2_small", "MobileNetV2 (CIFAR)", {}, (3, 32, 32), "full size"),
    ("efficientnet_small", "EfficientNet-B0 (first 5 stages)", {}, (3, 64, 64), "64x64 input"),
    ("yolo_detector", "YOLO-style detector", {}, (3, 128, 128), "width 0.25, 128x128 input"),
]
BATCHES = (1, 32)
TARGETS = (0.3, 0.5)
TOL_POINTS = 0.03
MAX_ERROR = 0.10


def export(name: str, kwargs: dict, chw: tuple, folder: Path) -> Path:
    from models.export import export_onnx
    from models.zoo_extra import build

    model, _ = build(name, randomize=True, **kwargs)
    return export_onnx(model, folder / f"{name}.onnx", input_shape=(1, *chw), exporter="legacy")


def run_latency(path: Path, target: float, batch: int, args, cache: Path) -> dict:
    opts = PruneOptions(target_latency=target, strategy="uniform", device="cpu", latency_batch=batch, latency_threads=args.threads,
                        cache_dir=str(cache), latency_repeats=args.rounds if batch == 1 else max(5, args.rounds // 2),
                        latency_max_spread=args.max_spread)
    t = time.perf_counter()
    try:
        res = prune(path, options=opts, write=False)
    except OnnxPruneError as exc:
        return {"error": exc.one_line(), "seconds": time.perf_counter() - t}
    lat = res.report.detail["latency"]
    return {**lat, "macs_red": res.report.reduction, "seconds": time.perf_counter() - t, "n_iter": len(lat["iterations"])}


def run_macs(path: Path, target: float, batch: int, args, cache: Path) -> dict:
    opts = PruneOptions(target_flops=target, strategy="uniform", device="cpu", measure_latency=True, latency_batch=batch,
                        latency_threads=args.threads, cache_dir=str(cache), latency_repeats=args.rounds if batch == 1 else max(5, args.rounds // 2),
                        latency_max_spread=args.max_spread)
    try:
        res = prune(path, options=opts, write=False)
    except OnnxPruneError as exc:
        return {"error": exc.one_line()}
    lat = res.report.detail.get("latency") or {}
    note = res.report.detail.get("latency_note")
    return {"macs_red": res.report.reduction, "lat_red": lat.get("measured_cut"), "note": note, "round_to": res.report.round_to}


def table_times(args, folder: Path) -> list[tuple[str, float, float, int]]:
    """(model, cold seconds, cached seconds, points) of the latency table alone."""
    from onnxprune.graph import load_model
    from onnxprune.groups import find_groups
    from onnxprune.latency import _OVERHEAD, node_specs
    from onnxprune.latency_table import build_tables, resolve_settings

    settings = resolve_settings("cpu", batch=1, threads=args.threads)
    out = []
    paths = [("ResNet-50 224x224 (full size)", export("resnet50", {}, (3, 224, 224), folder))]
    paths += [(f"demo {p.stem}", p) for p in sorted((ROOT / "models" / "demo").glob("*.onnx"))]
    for label, path in paths:
        cg = find_groups(load_model(path))
        specs = node_specs(cg) + [("__overhead__", _OVERHEAD)]
        with tempfile.TemporaryDirectory() as cache:
            cold = build_tables(specs, settings, cache_dir=cache)
            warm = build_tables(specs, settings, cache_dir=cache)
        out.append((label, cold.seconds, warm.seconds, cold.measured))
    return out


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--max-spread", type=float, default=0.2, help="--latency-max-spread of every run")
    ap.add_argument("--quick", action="store_true", help="batch 1, target 0.3, three models")
    ap.add_argument("--models", help="comma-separated subset of model names")
    ap.add_argument("--no-tables", action="store_true", help="skip the table build time section")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency_target.md"))
    args = ap.parse_args()
    prov = provenance.start()
    models = MODELS[:3] if args.quick else MODELS
    if args.models:
        models = [m for m in MODELS if m[0] in args.models.split(",")]
    batches, targets = ((1,), (0.3,)) if args.quick else (BATCHES, TARGETS)
    rows, mac_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp), Path(tmp) / "cache"
        for name, label, kw, chw, size in models:
            path = export(name, kw, chw, folder)
            for batch in batches:
                for target in targets:
                    r = run_latency(path, target, batch, args, cache)
                    m = run_macs(path, target, batch, args, cache)
                    rows.append((label, size, batch, target, r))
                    mac_rows.append((label, batch, target, m))
                    print(label, batch, target, {k: r.get(k) for k in ("measured_cut", "macs_red", "error", "n_iter", "error")}, m, flush=True)
        tables = [] if args.no_tables else table_times(args, folder)
    write(args, prov, rows, mac_rows, tables)


def write(args, prov, rows, mac_rows, tables) -> None:
    lines = [
        "# Latency-targeted pruning (ONNX Runtime CPU)",
        "",
        *prov.header(),
        f"- Runtime: ONNX Runtime {ort.__version__} CPUExecutionProvider, {args.threads} intra-op threads, no spinning; NCHWc block {simd_channel_block()} ({cpu_identity()})",
        "",
        "Random-weight look-alikes from `models/` (legacy export), uniform L1 allocation, no data. "
        f"Latency: medians of {args.rounds} interleaved original/pruned rounds at batch 1 ({max(5, args.rounds // 2)} at batch 32), each the fastest of runs lasting about 20 ms. "
        "Accuracy at equal measured latency (trained demo models, after fine-tuning, chosen on validation and reported on test) is in "
        "`latency_accuracy.md` (`benchmarks/latency_accuracy.py`).",
        "",
        "## `--target-latency R --strategy uniform`",
        "",
        "Measured cut: 1 - median over rounds of t(pruned)/t(original). Predicted error: predicted vs measured latency of the pruned model "
        "relative to the original, (1 - predicted cut) / (1 - measured cut) - 1, for the kept iteration (the prediction made before "
        "measuring it: the table model, with the bias measured by earlier iterations of the loop). "
        "Iterations: closed-loop allocate-measure rounds (at most 6, tolerance 2 points). "
        f"OK: measured cut within ±{100 * TOL_POINTS:.0f} points of the target.",
        "",
        "| model | size | batch | target | orig ms | pruned ms | measured cut | MACs cut | predicted error | iterations | within ±3 | run s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = err_ok = n = 0
    for label, size, batch, target, r in rows:
        if "error" in r and isinstance(r["error"], str):
            lines.append(f"| {label} | {size} | {batch} | -{target:.0%} | | | | | | | {r['error']} | {r['seconds']:.0f} |")
            continue
        n += 1
        hit = abs(r["measured_cut"] - target) <= TOL_POINTS
        ok += hit
        err_ok += abs(r["error"]) <= MAX_ERROR
        lines.append(
            f"| {label} | {size} | {batch} | -{target:.0%} | {r['original_ms']:.3f} | {r['pruned_ms']:.3f} | {pct(r['measured_cut'])} | {pct(r['macs_red'])} | "
            f"{100 * r['error']:+.1f}% | {r['n_iter']} | {'OK' if hit else 'MISSED'} | {r['seconds']:.0f} |"
        )
    lines += ["", f"Within ±3 points: {ok} of {n} runs that finished; predicted-vs-measured error within 10%: {err_ok} of {n}.", ""]
    lines += [
        "## `--target-flops R --measure-latency` (default rounding)",
        "",
        "| model | batch | target | round-to | MACs cut | latency cut | latency / MACs | ≥ 0.9 or explained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, batch, target, m in mac_rows:
        if m.get("error"):
            lines.append(f"| {label} | {batch} | -{target:.0%} | | | | | {m['error']} |")
            continue
        ratio = (m["lat_red"] / m["macs_red"]) if m["lat_red"] is not None and m["macs_red"] else None
        fine = ratio is not None and ratio >= 0.9
        verdict = "OK" if fine else ("explained: " + m["note"] if m.get("note") else "NOT EXPLAINED")
        lines.append(f"| {label} | {batch} | -{target:.0%} | {m['round_to']} | {pct(m['macs_red'])} | {pct(m['lat_red'])} | {'-' if ratio is None else f'{ratio:.2f}'} | {verdict} |")
    if tables:
        lines += ["", "## Latency table build time (batch 1)", "", "| model | points measured | cold cache s | from cache s |", "|---|---|---|---|"]
        lines += [f"| {label} | {pts} | {cold:.1f} | {warm:.2f} |" for label, cold, warm, pts in tables]
    provenance.write_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
