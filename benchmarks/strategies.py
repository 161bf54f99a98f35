"""Allocation strategies on the trained demo models: top-1 before fine-tuning.

For each demo model in ``models/demo`` (Fashion-MNIST VGG-11, and ResNet-20
when it exists), each MAC target (-30%, -50%), each criterion (l1, fpgm, bn)
and each strategy (uniform, sensitivity = threshold allocation, cost-aware),
runs ``onnxprune.prune`` with the default ``--round-to`` and the shipped
validation set, and reports top-1 before fine-tuning (right after pruning, and
after the activation-statistics calibration prune() applies by default when
given data), the achieved MAC
reduction and wall times. With ``--round-to auto`` (the default
since 1ea405b) prune() itself halves the multiple (16, 8, 4) until the target
is reachable; the table shows the multiple used. With a fixed default, a
target it cannot reach is reported and re-run at --round-to 4. Sensitivity curves are cached under ``--cache-dir``
(a fresh temporary folder per run by default, so no curve measured by older
code is reused), so the analysis runs once per model and criterion and the
later targets reuse it; the table shows the analysis time of the run that
computed it.

Note: exporters fold BatchNormalization into the convs, so on exported
models the ``bn`` criterion has no BN scales and falls back to ``l1`` (the
table says when it did).

    python benchmarks/strategies.py [--quick] [--cache-dir DIR] [--out benchmarks/results/strategies.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from onnxprune.api import PruneOptions, prune  # noqa: E402
from onnxprune.errors import TargetError  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402
from onnxprune.groups import find_groups  # noqa: E402
from onnxprune.importance import score_units  # noqa: E402

from benchmarks import provenance  # noqa: E402

DEMO = ROOT / "models" / "demo"
MODELS = ("fmnist_vgg11", "fmnist_resnet20")
STRATEGIES = ("uniform", "sensitivity", "cost-aware")
CRITERIA = ("l1", "fpgm", "bn")
TARGETS = (0.3, 0.5)


FALLBACK_ROUND = 4


def _opts(target, strategy, criterion, round_to, cache_dir, limit) -> PruneOptions:
    return PruneOptions(target_flops=target, strategy=strategy, criterion=criterion, round_to=round_to,
                        cache_dir=cache_dir, device="cpu", limit=limit)


def bn_falls_back(path: Path) -> bool:
    """True when the bn criterion gives the same scores as l1 (no BatchNormalization nodes left)."""
    logging.getLogger("onnxprune.importance").setLevel(logging.ERROR)
    cg = find_groups(load_model(path))
    units = [u for g in cg.prunable_groups for u in g.units]
    return bool(np.array_equal(score_units(cg, "bn")[units], score_units(cg, "l1")[units]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="VGG-11 only, -30%% only, criterion l1, first 500 images; writes no file")
    ap.add_argument("--cache-dir", default=None, help="sensitivity cache (default: a fresh temporary folder, removed at the end)")
    ap.add_argument("--data", default=str(DEMO / "fmnist_val.npz"))
    ap.add_argument("--calib-data", default=str(DEMO / "fmnist_calib.npz"), help="unlabeled calibration images (not the val set)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "strategies.md"))
    args = ap.parse_args(argv)
    prov = provenance.start(script="benchmarks/strategies.py", argv=list(sys.argv[1:] if argv is None else argv))
    if args.cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="onnxprune-strategies-") as tmp:
            args.cache_dir = tmp
            return run(args, prov, cache_note="a fresh temporary folder")
    return run(args, prov, cache_note=args.cache_dir)


def run(args, prov, cache_note: str) -> int:
    models = [m for m in (MODELS[:1] if args.quick else MODELS) if (DEMO / f"{m}.onnx").is_file()]
    targets = TARGETS[:1] if args.quick else TARGETS
    criteria = CRITERIA[:1] if args.quick else CRITERIA
    limit = 500 if args.quick else None
    round_to = PruneOptions().round_to
    calib = args.calib_data if args.calib_data and Path(args.calib_data).is_file() else None
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    rows, notes = [], []
    missing = [m for m in MODELS if m not in models and not args.quick]
    if missing:
        notes.append(f"not run (model file absent in models/demo when this ran): {', '.join(missing)}")
    for name in models:
        path = DEMO / f"{name}.onnx"
        fallback = bn_falls_back(path)
        if fallback and "bn" in criteria:
            notes.append(f"{name}: no BatchNormalization nodes (folded by the exporter), so 'bn' fell back to 'l1' scores")
        for crit in criteria:
            # all runs of one criterion together: the cache holds one (criterion, grid) per model file
            for target in targets:
                rt = round_to
                for strat in STRATEGIES:
                    t = time.perf_counter()
                    try:
                        res = prune(path, options=_opts(target, strat, crit, rt, args.cache_dir, limit), data=args.data, calib_data=calib, write=False)
                    except TargetError as exc:
                        if rt != round_to:
                            raise
                        notes.append(f"{name} -{target:.0%}: unreachable at --round-to {round_to} ({str(exc).split('. To fix')[0]}); "
                                     f"rows marked r{FALLBACK_ROUND} use --round-to {FALLBACK_ROUND}")
                        rt = FALLBACK_ROUND
                        res = prune(path, options=_opts(target, strat, crit, rt, args.cache_dir, limit), data=args.data, calib_data=calib, write=False)
                    wall = time.perf_counter() - t
                    rep = res.report
                    d = rep.detail
                    row = {
                        "model": name, "criterion": crit, "target": target, "strategy": strat,
                        "red": 1 - rep.macs_after / rep.macs_before,
                        "orig": rep.metrics["original"]["top1"], "top1": rep.metrics["pruned"]["top1"],
                        "cal": rep.metrics.get("calibrated", {}).get("top1"),
                        "wall": wall, "sens_s": d.get("sensitivity_seconds"), "cached": d.get("sensitivity_cached_groups"),
                        "groups": sum(1 for g in rep.groups if g.blocked_reason is None),
                        "n": rep.metrics["pruned"]["n"], "round_to": rt, "used": int(rep.round_to),
                    }
                    rows.append(row)
                    log(f"  {name} {crit} -{target:.0%} {strat}: top1 {row['top1']:.4f} (MACs -{row['red']:.1%}) {wall:.1f} s")
    lines = [
        "| model | criterion | target | strategy | round_to used | MACs red. | top-1 original | top-1 pruned | drop (pts) "
        "| top-1 pruned + calibration | wall s | of which sensitivity analysis s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["sens_s"] is None:
            sens = "-"
        elif r["cached"] and r["cached"] >= r["groups"]:
            sens = f"cached ({r['sens_s']:.1f})"
        else:
            sens = f"{r['sens_s']:.1f}"
        cal = "-" if r["cal"] is None else f"{100 * r['cal']:.2f}"
        crit = r["criterion"] + (" (= l1)" if r["criterion"] == "bn" and any("'bn' fell back" in n and r["model"] in n for n in notes) else "")
        lines.append(
            f"| {r['model']} | {crit} | -{r['target']:.0%}{'' if r['round_to'] == round_to else ' (r' + str(r['round_to']) + ')'} | {r['strategy']} | {r['used']} | {r['red']:.1%} | {100 * r['orig']:.2f} | "
            f"{100 * r['top1']:.2f} | {100 * (r['orig'] - r['top1']):.2f} | {cal} | {r['wall']:.1f} | {sens} |"
        )
    summary = []
    for key, label in (("top1", "pruned"), ("cal", "pruned + calibration")):
        best = {}
        for r in rows:
            k = (r["model"], r["target"])
            if r[key] is not None and (k not in best or r[key] > best[k][key]):
                best[k] = r
        summary += [f"highest {label} at {k[0]} -{k[1]:.0%}: {b['strategy']} / {b['criterion']} ({100 * b[key]:.2f}%; descriptive, "
                    "read on the same images the sensitivity was measured on, not a held-out choice)" for k, b in best.items()]
    n = rows[0]["n"] if rows else 0
    head = (
        f"Trained demo models, shipped validation set ({n} images, {args.data.split('/')[-1]}), top-1 before fine-tuning: "
        f"right after pruning, and after prune()'s default activation-statistics calibration (PruneOptions.calibrate="
        f"{PruneOptions().calibrate} unlabeled samples of {Path(calib).name if calib else '--data'}, method "
        f"{PruneOptions().calibrate_method}; sensitivity measured uncalibrated); --round-to {round_to} (default), ONNX Runtime {ort.__version__} CPU "
        f"(default threads: {os.cpu_count()} logical CPUs, shared); sensitivity grid = default, cache in {cache_note}. "
        f"Wall s = whole prune() call (load, reference pass, scoring, allocation, rewrite, evaluation).\n"
    )
    notes = list(dict.fromkeys(notes))
    text = head + "\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in summary + notes)
    text += f"\n\nBenchmark wall time {time.perf_counter() - t_start:.0f} s.\n"
    print(text)
    if args.out and not args.quick:
        provenance.write_atomic(args.out, "# Allocation strategies: top-1 before fine-tuning\n\n" + "\n".join(prov.header()) + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
