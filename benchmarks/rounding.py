"""What channel rounding costs and buys on the demo models, with measured latency.

For each shipped demo model and MAC target (-30%, -50%), sensitivity allocation (L1) on ``--data``
with reconstruction on ``--calib-data``, and ``--measure-latency`` (batch 1, ONNX Runtime CPU):

* **auto**: the default ``--round-to auto``: every group on multiples of the SIMD block (16 with
  AVX-512), halved only where the target needs it. With ``--measure-latency`` it also times the
  unrounded plan against the rounded one and keeps the unrounded plan when the multiple bought no
  measured speed (within ``--latency-tolerance``) and did not cost accuracy: the "chose" column;
* **round-to 1**: the unrounded plan from the same sensitivity data, as the auto run reports it
  (MACs, top-1 after recovery, latency timed against the rounded plan in interleaved rounds);
* **measured**: ``--round-to measured`` (per group, standalone-layer probes; experimental).

Columns: achieved MACs cut, top-1 after recovery (no fine-tuning) on ``--data``, and the measured
latency cut of the original (median of interleaved rounds; negative = slower than the original).
Top-1 here is on the images the allocation was chosen on, so it compares plans, it is not a test score.

    python benchmarks/rounding.py [--models vgg11,resnet20,mobilenetv2] [--targets 0.3,0.5] [--out benchmarks/results/rounding.md]
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

from benchmarks import provenance  # noqa: E402
from onnxprune.api import PruneOptions, prune  # noqa: E402

DEMO = ROOT / "models" / "demo"
VAL, CALIB = DEMO / "fmnist_val.npz", DEMO / "fmnist_calib.npz"


def top1(report, stage: str = "calibrated") -> float:
    return report.metrics[stage]["top1"]


def run_model(name: str, targets, cache: Path, tmp: Path, *, threads: int | None) -> list[dict]:
    path = DEMO / f"fmnist_{name}.onnx"
    common = dict(cache_dir=str(cache), measure_latency=True, latency_threads=threads, latency_max_spread=1.0, latency_repeats=21)
    rows = []
    for target in targets:
        t = time.perf_counter()
        auto = prune(path, options=PruneOptions(target_flops=target, **common), data=str(VAL), calib_data=str(CALIB), output=tmp / f"{name}-auto.onnx", force=True)
        t_auto = time.perf_counter() - t
        t = time.perf_counter()
        meas = prune(path, options=PruneOptions(target_flops=target, round_to="measured", **common), data=str(VAL), calib_data=str(CALIB),
                     output=tmp / f"{name}-measured.onnx", force=True)
        t_meas = time.perf_counter() - t
        d = auto.report.detail["rounding"]
        lat = d["latency"]
        m = meas.report.detail["rounding"]
        rows.append({
            "model": name, "target": target, "original_top1": top1(auto.report, "original"), "original_ms": lat["original_ms"],
            "auto": {"macs": d["reduction"], "top1": d["accuracy"]["rounded"]["top1"], "cut": lat["rounded_cut"], "round_to": d["round_to"]},
            "one": {"macs": d["unrounded_reduction"], "top1": d["accuracy"]["unrounded"]["top1"], "cut": lat["unrounded_cut"],
                    "vs": lat.get("unrounded_vs_rounded", 0.0), "spread": lat.get("spread")},
            "chose": d.get("chosen", "rounded"), "verdict": d.get("verdict", "same plan"),
            "measured": {"macs": meas.report.reduction, "top1": top1(meas.report), "cut": meas.report.detail["latency"]["measured_cut"],
                         "groups": f"{m.get('staircase_groups', '?')} of {m.get('staircase_groups', 0) + m.get('smooth_groups', 0)}" if m.get("mode") == "auto" else m.get("mode")},
            "seconds": (t_auto, t_meas), "settings": auto.report.detail["latency"]["settings"],
        })
        print(rows[-1], flush=True)
    return rows


def render(rows: list[dict], prov) -> str:
    settings = rows[0]["settings"] if rows else ""
    lines = ["# Channel rounding: what it costs and what it buys (demo models, measured latency)", "", *prov.header(), "",
             "Sensitivity allocation (L1, default grid) on `models/demo/fmnist_val.npz` (2,500 labelled images), reconstruction on 512 "
             "images of `fmnist_calib.npz`; top-1 after recovery, no fine-tuning, on the same 2,500 images (the allocation saw them: this "
             f"compares plans, it is not a test score). Latency measured with `--measure-latency` ({settings}, 21 interleaved rounds): cut "
             "of the original's median time, negative = slower than the original. auto: `--round-to auto` (global multiple of the SIMD "
             "block, halved only where the target needs it); round-to 1: the unrounded plan from the same data, timed against the rounded "
             "one in interleaved rounds (\"vs auto\": its time over the rounded plan's, IQR/median spread); chose: what `--round-to auto "
             "--measure-latency` wrote; measured: `--round-to measured` (per-group standalone probes, experimental).",
             "",
             "| model | target | original top-1 / ms | auto: MACs / top-1 / latency | round-to 1: MACs / top-1 / latency | round-to 1 time vs auto (spread) | auto chose | measured: MACs / top-1 / latency (groups on multiples) | s (auto / measured run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(k):
            return f"-{100 * r[k]['macs']:.1f}% / {100 * r[k]['top1']:.2f} / {-100 * r[k]['cut']:+.1f}%"
        lines.append(f"| {r['model']} | -{r['target']:.0%} | {100 * r['original_top1']:.2f} / {r['original_ms']:.3f} | {cell('auto')} (x{r['auto']['round_to']}) | "
                     f"{cell('one')} | {100 * r['one']['vs']:+.1f}% ({100 * (r['one']['spread'] or 0):.1f}%) | {r['chose']} | "
                     f"{cell('measured')} ({r['measured']['groups']}) | {r['seconds'][0]:.0f} / {r['seconds'][1]:.0f} |")
    lines += ["", "Verdicts of `--round-to auto --measure-latency`:", ""]
    lines += [f"- {r['model']} -{r['target']:.0%}: {r['verdict']}" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg11,resnet20,mobilenetv2")
    ap.add_argument("--targets", default="0.3,0.5")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rounding.md"))
    ap.add_argument("--threads", type=int, default=None, help="--latency-threads (default: every core)")
    args = ap.parse_args(argv)
    prov = provenance.start(script="benchmarks/rounding.py", argv=list(sys.argv[1:] if argv is None else argv))
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"  # cold: sensitivity and probe timings are first-run costs
        for name in args.models.split(","):
            rows += run_model(name, targets, cache, Path(tmp), threads=args.threads)
    text = render(rows, prov)
    print(text)
    if args.out:
        provenance.write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
