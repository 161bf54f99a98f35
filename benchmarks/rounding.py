"""What channel rounding costs on the demo models: old ``--round-to auto`` vs the measured one vs none.

For each shipped demo model and MAC target (-30%, -50%), sensitivity allocation (L1) on
``--data`` with reconstruction on ``--calib-data``:

* **old auto**: every group at multiples of the SIMD block (16 with AVX-512), halved only where
  the target is unreachable (what ``--round-to auto`` did before ``onnxprune.rounding``);
* **new auto**: ``--round-to measured`` (multiples only for groups whose measured time steps; it was
  ``auto`` when ``results/rounding.md`` was written, see its commit);
* **round-to 1**: the unrounded plan the new auto run reports beside its own (same scores and
  sensitivity data, so identical to a ``--round-to 1`` run), with its accuracy after recovery.

Columns: achieved MACs cut, top-1 after recovery (no fine-tuning) on ``--data``, and predicted
latency (ms, batch 1) of each plan from one latency model per model (tables plus the rounding
probes, anchored on one end-to-end measurement of the original), so the three plans are compared
on the same model. Predicted, not measured: on a shared 2-core machine a per-plan measurement of
these 0.1-1 ms models is noisier than the differences.

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
from onnxprune.allocate import MaskBuilder  # noqa: E402
from onnxprune.api import PruneOptions, prune  # noqa: E402
from onnxprune.errors import TargetError  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402
from onnxprune.groups import find_groups  # noqa: E402
from onnxprune.hardware import round_to_candidates  # noqa: E402
from onnxprune.importance import score_units  # noqa: E402
from onnxprune.latency_table import resolve_settings  # noqa: E402
from onnxprune.normalize import normalize_constants  # noqa: E402
from onnxprune.rounding import rounding_setup  # noqa: E402

DEMO = ROOT / "models" / "demo"
VAL, CALIB = DEMO / "fmnist_val.npz", DEMO / "fmnist_calib.npz"


def old_auto(path: Path, target: float, cache: Path, out: Path):
    """The global multiple, halved only when the target is unreachable (the previous default)."""
    for k, r in enumerate(round_to_candidates("auto")):
        try:
            return prune(path, options=PruneOptions(target_flops=target, round_to=r, cache_dir=str(cache)), data=str(VAL),
                         calib_data=str(CALIB), output=out, force=True)
        except TargetError:
            if k + 1 == len(round_to_candidates("auto")):
                raise
    raise AssertionError("unreachable")


def top1(report, stage: str = "calibrated") -> float:
    return report.metrics[stage]["top1"]


def run_model(name: str, targets, cache: Path, tmp: Path) -> list[dict]:
    path = DEMO / f"fmnist_{name}.onnx"
    cg = find_groups(normalize_constants(load_model(path), copy=False)[0])
    t = time.perf_counter()
    rnd = rounding_setup(cg, resolve_settings("cpu"), cache_dir=cache)
    setup_cold = time.perf_counter() - t
    t = time.perf_counter()
    rnd = rounding_setup(cg, resolve_settings("cpu"), cache_dir=cache)
    setup_warm = time.perf_counter() - t
    n_stair = sum(1 for g in rnd.probe.groups.values() if g.step > 1)
    rows = []
    for target in targets:
        old = old_auto(path, target, cache, tmp / f"{name}-old.onnx")
        new = prune(path, options=PruneOptions(target_flops=target, round_to="measured", cache_dir=str(cache)), data=str(VAL), calib_data=str(CALIB),
                    output=tmp / f"{name}-new.onnx", force=True)
        d = new.report.detail["rounding"]
        builder = MaskBuilder(cg, score_units(cg, "l1"))
        pred = {"old": rnd.predicted_ms(old.plan.to_mask(cg)), "new": rnd.predicted_ms(new.plan.to_mask(cg)),
                "one": rnd.predicted_ms(builder.mask(d["unrounded_keep"]))}
        rows.append({
            "model": name, "target": target, "original_top1": top1(new.report, "original"), "original_ms": rnd.predicted_ms(None),
            "old": {"macs": old.report.reduction, "top1": top1(old.report), "ms": pred["old"], "round_to": old.report.round_to},
            "new": {"macs": new.report.reduction, "top1": top1(new.report), "ms": pred["new"]},
            "one": {"macs": d["unrounded_reduction"], "top1": d["accuracy"]["unrounded"]["top1"], "ms": pred["one"]},
            "groups": f"{n_stair} of {len(rnd.probe.groups)}", "setup_cold": setup_cold, "setup_warm": setup_warm,
            "probe_points": rnd.probe.measured_points + rnd.probe.cached_points,
        })
        print(rows[-1], flush=True)
    return rows


def render(rows: list[dict], prov) -> str:
    lines = ["# Channel rounding: what it costs and what it buys (demo models)", "", *prov.header(), "",
             "Sensitivity allocation (L1, grid of the defaults) on `models/demo/fmnist_val.npz` (2,500 labelled images), reconstruction "
             "on 512 images of `fmnist_calib.npz`; top-1 after recovery, no fine-tuning, on the same 2,500 images (all three plans alike). "
             "Predicted latency: batch 1, ONNX Runtime CPU, every core, one latency model per model (standalone-layer tables plus the "
             "rounding probes, anchored on the measured original). old auto: global multiple of the SIMD block, halved only when "
             "unreachable; new auto: `--round-to measured`; round-to 1: the unrounded plan from the same data, as the new auto run reports it.",
             "",
             "| model | target | original top-1 | old auto: MACs cut / top-1 / pred. ms | new auto: MACs cut / top-1 / pred. ms | round-to 1: MACs cut / top-1 / pred. ms | groups on multiples | probe s (cold / cached) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cell = [f"-{100 * r[k]['macs']:.1f}% / {100 * r[k]['top1']:.2f} / {r[k]['ms']:.3f}" for k in ("old", "new", "one")]
        cell[0] += f" (x{r['old']['round_to']})"
        lines.append(f"| {r['model']} | -{r['target']:.0%} | {100 * r['original_top1']:.2f} (pred. {r['original_ms']:.3f} ms) | {' | '.join(cell)} | "
                     f"{r['groups']} | {r['setup_cold']:.1f} / {r['setup_warm']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg11,resnet20,mobilenetv2")
    ap.add_argument("--targets", default="0.3,0.5")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rounding.md"))
    args = ap.parse_args(argv)
    prov = provenance.start(script="benchmarks/rounding.py", argv=list(sys.argv[1:] if argv is None else argv))
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"  # cold: the probe timings in the table are first-run costs
        for name in args.models.split(","):
            rows += run_model(name, targets, cache, Path(tmp))
    text = render(rows, prov)
    print(text)
    if args.out:
        provenance.write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
