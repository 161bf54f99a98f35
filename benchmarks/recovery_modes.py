"""Recovery without training on the demo models: which channels, and how to fit (issue #15).

For each Fashion-MNIST demo model (VGG-11, ResNet-20, MobileNetV2) and MAC
target (-30%, -50%): uniform allocation (channel counts from L1 scores,
round_to 8, or 4 where 8 cannot reach the target), so both criteria prune
the same number of channels in every group (equal MACs); channels chosen by
``l1`` or by ``recon`` (:mod:`onnxprune.recon_criterion`, on the calibration
images); then reconstruction on the 512 unlabeled images of
``models/demo/fmnist_calib.npz`` with

* ``HEAD``: the reconstruction of the source commit (``git show
  HEAD:onnxprune/reconstruct.py``, its defaults), the baseline;
* ``layerwise`` / ``sequential`` / ``blockwise``: :class:`onnxprune.reconstruct.Reconstructor`
  modes, otherwise defaults; ``+affected``: blockwise with ``scope="affected"``.

Settings are chosen on the validation images (``models/demo/fmnist_val.npz``,
2,500 test-split images) and reported on the other 7,500 test-split images
(never used for any choice). No training, no labels in the recovery.

    python benchmarks/recovery_modes.py            # ~10-15 min on 2 shared cores
    python benchmarks/recovery_modes.py --quick    # resnet20 at -30% only

Prints markdown and writes ``benchmarks/results/recovery_modes.md``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.calibration import CALIB_NPZ, DEMO, VAL_NPZ, accuracy, held_out_test, uniform_alloc  # noqa: E402
from onnxprune import allocate  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402
from onnxprune.groups import find_groups  # noqa: E402
from onnxprune.importance import score_units  # noqa: E402
from onnxprune.reconstruct import Reconstructor  # noqa: E402
from onnxprune.rewrite import apply_mask  # noqa: E402

FITS = {
    "layerwise": dict(mode="layerwise"),
    "sequential": dict(mode="sequential"),
    "blockwise": dict(mode="blockwise"),
    "blockwise+affected": dict(mode="blockwise", scope="affected"),
}
GOALS = {("resnet20", 0.3): 1.5, ("resnet20", 0.5): 4.0}
log = logging.getLogger("recovery_modes")


def head_reconstruct():
    """``reconstruct`` of the source commit (baseline), from a private copy of its package
    (``git archive HEAD onnxprune``, imported as ``onnxprune_head``); None if unavailable."""
    folder = Path(tempfile.mkdtemp())
    try:
        tar = subprocess.run(["git", "archive", "HEAD", "onnxprune"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=tar, check=True)
        (folder / "onnxprune").rename(folder / "onnxprune_head")
        sys.path.insert(0, str(folder))
        return importlib.import_module("onnxprune_head.reconstruct").reconstruct
    except Exception as exc:  # noqa: BLE001
        log.warning("no HEAD baseline: %s", exc)
        return None


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def run_model(name: str, targets, data, head, fits) -> list[dict]:
    cg = find_groups(load_model(DEMO / f"fmnist_{name}.onnx"))
    x_val, y_val, x_cal, x_test, y_test = data
    base = (accuracy(cg.model, x_val, y_val), accuracy(cg.model, x_test, y_test))
    l1 = score_units(cg, "l1")
    t = time.perf_counter()
    recon = score_units(cg, "recon", data=x_cal)
    recon_s = time.perf_counter() - t
    rows = []
    for target in targets:
        alloc, round_to = uniform_alloc(cg, l1, name, target)
        for crit, scores in (("l1", l1), ("recon", recon)):
            mask = allocate.MaskBuilder(cg, scores).mask(alloc.keep)
            pruned = apply_mask(cg, mask)
            row = {"model": name, "target": target, "round_to": round_to, "criterion": crit, "achieved": 1 - cg.macs(mask) / cg.total_macs,
                   "unpruned": base, "pruned": (accuracy(pruned, x_val, y_val), accuracy(pruned, x_test, y_test)), "fits": {}, "criterion_s": recon_s if crit == "recon" else 0.0}  # fmt: skip
            variants = ([("HEAD", None)] if head is not None else []) + [(k, FITS[k]) for k in fits]
            for label, kw in variants:
                t = time.perf_counter()
                model = head(cg, mask, pruned, x_cal).model if kw is None else Reconstructor(cg, x_cal, **kw).recover(mask, pruned).model
                secs = time.perf_counter() - t
                row["fits"][label] = (accuracy(model, x_val, y_val), accuracy(model, x_test, y_test), secs)
                log.info("%s -%.0f%% %s %s: val %.2f test %.2f (%.1fs)", name, 100 * target, crit, label, *row["fits"][label])
            rows.append(row)
    return rows


def render(rows, labels, args, started, load0, wall) -> str:
    import onnxruntime

    out = [
        "# Recovery without training: channel choice and fitting mode (demo models)",
        "",
        f"Command: `python benchmarks/recovery_modes.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` ({wall / 60:.1f} min). "
        f"Source: commit {commit()}. Date: {started} UTC.  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs shared with other engineers' jobs (1-min load {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end); Python {platform.python_version()}, numpy {np.__version__}, ONNX Runtime {onnxruntime.__version__} CPU.",
        "",
        "Top-1 (%) on the 2,500 validation images / on the 7,500 held-out test images. Uniform allocation from L1 counts, so `l1` and `recon` "
        "rows of a target have identical channel counts and MACs. Reconstruction on the 512 unlabeled images of `fmnist_calib.npz`.",
        "",
        "| model | target | achieved MACs | criterion | unpruned | pruned | " + " | ".join(labels) + " |",
        "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in labels) + " |",
    ]
    for r in rows:
        cells = [f"{r['fits'][k][0]:.2f} / {r['fits'][k][1]:.2f}" for k in labels]
        out.append(f"| {r['model']} | -{r['target']:.0%} | -{r['achieved']:.1%} | {r['criterion']} | {r['unpruned'][0]:.2f} / {r['unpruned'][1]:.2f} | "
                   f"{r['pruned'][0]:.2f} / {r['pruned'][1]:.2f} | " + " | ".join(cells) + " |")
    out += ["", "Time per reconstruction (s, mean over the rows): " + ", ".join(
        f"{k} {np.mean([r['fits'][k][2] for r in rows]):.1f}" for k in labels) + "; `recon` criterion: " + ", ".join(
        dict.fromkeys(f"{r['model']} {r['criterion_s']:.1f}" for r in rows if r["criterion"] == "recon")) + " (s, once per model).", ""]
    # choice on validation, report on test
    out.append("## Settings chosen on validation, reported on test")
    out.append("")
    out.append("| model | target | chosen (criterion, fit) | val | test | unpruned test | gap (test, points) | HEAD default (l1) test | goal |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in dict.fromkeys((r["model"], r["target"]) for r in rows):
        cand = [(r["fits"][k][0], r["criterion"], k, r) for r in rows if (r["model"], r["target"]) == key for k in labels if k != "HEAD"]
        val, crit, fit, r = max(cand, key=lambda c: c[0])
        test = r["fits"][fit][1]
        gap = r["unpruned"][1] - test
        head = next((q["fits"]["HEAD"][1] for q in rows if (q["model"], q["target"]) == key and q["criterion"] == "l1" and "HEAD" in q["fits"]), None)
        goal = GOALS.get(key)
        verdict = f"<= {goal} -> **{'MET' if gap <= goal else 'MISSED'}**" if goal else ("not worse than HEAD -> **" + ("MET" if head is None or test >= head - 0.3 else "MISSED") + "**")
        out.append(f"| {key[0]} | -{key[1]:.0%} | {crit}, {fit} | {val:.2f} | {test:.2f} | {r['unpruned'][1]:.2f} | {gap:+.2f} | "
                   f"{'—' if head is None else f'{head:.2f}'} | {verdict} |")
    out.append("")
    means = {k: np.mean([r["fits"][k][0] for r in rows]) for k in labels}
    out.append("Mean validation top-1 over all rows: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()) + ".")
    crit_means = {c: np.mean([max(r["fits"][k][0] for k in labels if k != "HEAD") for r in rows if r["criterion"] == c]) for c in ("l1", "recon")}
    out.append("Best fit per row, mean validation top-1 by criterion: " + ", ".join(f"{c} {v:.2f}" for c, v in crit_means.items()) + ".")
    out.append("'Not worse' allows 0.3 points (test-set standard error at 92% on 7,500 images: 0.31).")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg11", "resnet20", "mobilenetv2"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--fits", nargs="+", default=list(FITS), choices=list(FITS))
    ap.add_argument("--test-n", type=int, default=7500)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery_modes.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.quick:
        args.models, args.targets, args.out = ["resnet20"], [0.3], Path("/tmp/recovery_modes_quick.md")
    started, load0, t0 = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0], time.perf_counter()
    val = np.load(VAL_NPZ, allow_pickle=False)
    x_test, y_test = held_out_test(val["x"], args.test_n)
    data = (val["x"], val["y"], np.load(CALIB_NPZ, allow_pickle=False)["x"], x_test, y_test)
    head = head_reconstruct()
    rows = []
    for name in args.models:
        rows += run_model(name, args.targets, data, head, args.fits)
    labels = (["HEAD"] if head is not None else []) + list(args.fits)
    text = render(rows, labels, args, started, load0, time.perf_counter() - t0)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
