"""Recovery without training on the demo models: allocation, which channels, how to fit (issue #15).

For each Fashion-MNIST demo model (VGG-11, ResNet-20, MobileNetV2) and MAC
target (-30%, -50%), per **allocation** (how many channels each group keeps,
always from L1 scores, so both criteria prune the same counts: equal MACs):

* ``uniform``: one ratio for all groups, round_to 8 (or 4 where 8 cannot reach
  the target); ``uniform-r1``: the same at round_to 1;
* ``sensitivity``: :func:`onnxprune.allocate.by_threshold` on sensitivity
  curves measured on the validation images (the default strategy with data),
  at the default round_to (``auto``); ``sensitivity-r1``: at round_to 1;
* ``calibrated-r1``: the same on curves measured after reconstruction
  (``--calibrated-sensitivity``, coarser grid; opt-in, slow);

channels chosen by ``l1`` or by ``recon`` (:mod:`onnxprune.recon_criterion`,
on the calibration images); then reconstruction on the unlabeled calibration
images (``models/demo/fmnist_calib.npz``, 512; ``--calib-n`` adds train-split
images) with

* ``HEAD``: the reconstruction of the source commit (``git show
  HEAD:onnxprune/reconstruct.py``, its defaults), the baseline (uniform rows);
* ``layerwise`` / ``sequential`` / ``blockwise``: :class:`onnxprune.reconstruct.Reconstructor`
  modes, otherwise defaults; ``+affected``: blockwise with ``scope="affected"``
  (all on the uniform rows; the other allocations get ``--alloc-fits``).

Settings are chosen on the validation images (``models/demo/fmnist_val.npz``,
2,500 test-split images) and reported on the other 7,500 test-split images
(never used for any choice). No training, no labels in the recovery.

    python benchmarks/recovery_modes.py --allocs uniform uniform-r1 sensitivity sensitivity-r1   # ~40 min on 2 loaded cores
    python benchmarks/recovery_modes.py --quick    # resnet20 at -30% only, to /tmp
    python benchmarks/recovery_modes.py --models resnet20 --fits blockwise --no-head --out /tmp/x.md   # iterate

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

from benchmarks import provenance  # noqa: E402
from benchmarks.calibration import CALIB_NPZ, DEMO, VAL_NPZ, accuracy, held_out_test, uniform_alloc  # noqa: E402
from onnxprune import allocate  # noqa: E402
from onnxprune.errors import TargetError  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402
from onnxprune.groups import find_groups  # noqa: E402
from onnxprune.hardware import round_to_candidates  # noqa: E402
from onnxprune.importance import score_units  # noqa: E402
from onnxprune.reconstruct import Reconstructor  # noqa: E402
from onnxprune.rewrite import apply_mask  # noqa: E402

FITS = {
    "layerwise": dict(mode="layerwise"),
    "sequential": dict(mode="sequential"),
    "blockwise": dict(mode="blockwise"),
    "blockwise+affected": dict(mode="blockwise", scope="affected"),
}
CAL_GRID = (0.2, 0.4, 0.6, 0.8)  # calibrated sensitivity: one reconstruction per point, so a coarser grid
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


ALLOCS = ("uniform", "uniform-r1", "sensitivity", "sensitivity-r1", "calibrated-r1")


def allocations(cg, l1, name: str, target: float, which, curves) -> list[tuple[str, int, object]]:
    """``(label, round_to, Allocation)`` per allocation in ``which``; counts come from L1 scores (both criteria use them)."""
    out = []
    for label in which:
        if label == "uniform":
            alloc, r = uniform_alloc(cg, l1, name, target)
        elif label == "uniform-r1":
            alloc, r = allocate.uniform(cg, l1, target=target, round_to=1), 1
        else:
            c = curves["calibrated" if label.startswith("calibrated") else "plain"]
            if c is None:
                continue
            if label.endswith("-r1"):
                alloc, r = allocate.by_threshold(cg, l1, c, target=target, round_to=1), 1
            else:
                for r in round_to_candidates("auto"):  # the pipeline's default: the largest SIMD multiple that reaches the target
                    try:
                        alloc = allocate.by_threshold(cg, l1, c, target=target, round_to=r)
                        break
                    except TargetError:
                        continue
                else:
                    continue
        out.append((label, r, alloc))
    return out


def sensitivity_curves(cg, l1, data, which, recon_kw) -> tuple[dict, dict]:
    """Sensitivity curves on the validation images (top-1 drop per group and ratio, L1 channels): plain, and
    after reconstruction (``calibrated``, the ``--calibrated-sensitivity`` measurement) when asked for."""
    from onnxprune.data import Dataset
    from onnxprune.evaluate import Evaluator
    from onnxprune.sensitivity import analyze

    x_val, y_val, x_cal = data[0], data[1], data[2]
    curves, secs = {"plain": None, "calibrated": None}, {}
    if not any(a.startswith(("sensitivity", "calibrated")) for a in which):
        return curves, secs
    ev = Evaluator.from_original(Dataset(x_val, y_val, "fmnist_val.npz"), cg.model, device="cpu")
    t = time.perf_counter()
    curves["plain"] = analyze(cg, l1, ev).curves
    secs["plain"] = time.perf_counter() - t
    if any(a.startswith("calibrated") for a in which):
        t = time.perf_counter()
        curves["calibrated"] = analyze(cg, l1, ev, grid=CAL_GRID, transform=Reconstructor(cg, x_cal, **recon_kw).transform()).curves
        secs["calibrated"] = time.perf_counter() - t
    return curves, secs


def run_model(name: str, targets, data, head, fits, allocs, alloc_fits, recon_kw) -> list[dict]:
    cg = find_groups(load_model(DEMO / f"fmnist_{name}.onnx"))
    x_val, y_val, x_cal, x_test, y_test = data
    base = (accuracy(cg.model, x_val, y_val), accuracy(cg.model, x_test, y_test))
    l1 = score_units(cg, "l1")
    t = time.perf_counter()
    recon = score_units(cg, "recon", data=x_cal)
    recon_s = time.perf_counter() - t
    curves, sens_s = sensitivity_curves(cg, l1, data, allocs, recon_kw)
    for k, v in sens_s.items():
        log.info("%s: %s sensitivity %.1fs", name, k, v)
    rows = []
    for target in targets:
        for alloc_label, round_to, alloc in allocations(cg, l1, name, target, allocs, curves):
            for crit, scores in (("l1", l1), ("recon", recon)):
                mask = allocate.MaskBuilder(cg, scores).mask(alloc.keep)
                pruned = apply_mask(cg, mask)
                row = {"model": name, "target": target, "alloc": alloc_label, "round_to": round_to, "criterion": crit,
                       "achieved": 1 - cg.macs(mask) / cg.total_macs, "unpruned": base,
                       "pruned": (accuracy(pruned, x_val, y_val), accuracy(pruned, x_test, y_test)), "fits": {},
                       "criterion_s": recon_s if crit == "recon" else 0.0, "sens_s": sens_s}  # fmt: skip
                if alloc_label == "uniform":
                    variants = ([("HEAD", None)] if head is not None else []) + [(k, FITS[k]) for k in fits]
                else:
                    variants = [(k, FITS[k]) for k in alloc_fits]
                for label, kw in variants:
                    t = time.perf_counter()
                    if kw is None:
                        model = head(cg, mask, pruned, x_cal).model
                    else:
                        model = Reconstructor(cg, x_cal, **{**recon_kw, **kw}).recover(mask, pruned).model
                    secs = time.perf_counter() - t
                    row["fits"][label] = (accuracy(model, x_val, y_val), accuracy(model, x_test, y_test), secs)
                    log.info("%s -%.0f%% %s r%d %s %s: val %.2f test %.2f (%.1fs)", name, 100 * target, alloc_label, round_to, crit, label,
                             *row["fits"][label])  # fmt: skip
                rows.append(row)
    return rows


def machine() -> str:
    return f"{provenance.cpu_model()}, {os.cpu_count()} logical CPUs shared with other engineers' jobs"


def cell(r, k) -> str:
    return f"{r['fits'][k][0]:.2f} / {r['fits'][k][1]:.2f}" if k in r["fits"] else "—"


def render(rows, labels, alloc_labels, args, started, load0, wall) -> str:
    import onnxruntime

    calib = f"{args.calib_n:,} unlabeled Fashion-MNIST train-split images (the 512 of `fmnist_calib.npz`" + (
        f" plus {args.calib_n - 512:,} more drawn with seed 1)" if args.calib_n > 512 else ")")
    extra = ", ".join(f"{k}={v}" for k, v in recon_options(args).items())
    out = [
        "# Recovery without training: allocation, channel choice and fitting mode (demo models)",
        "",
        f"Command: `python benchmarks/recovery_modes.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` ({wall / 60:.1f} min). "
        f"Source: commit {commit()}. Date: {started} UTC.  ",
        f"Machine: {machine()} (1-min load {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); Python {platform.python_version()}, "
        f"numpy {np.__version__}, ONNX Runtime {onnxruntime.__version__} CPU.",
        "",
        "Top-1 (%) on the 2,500 validation images (`fmnist_val.npz`) / on the 7,500 held-out test images. Channel counts come from L1 "
        "scores, so the `l1` and `recon` rows of one allocation have identical counts and MACs (stated per row). Reconstruction on "
        f"{calib}" + (f", Reconstructor options {extra}" if extra else "") + ". No labels in the recovery; the sensitivity allocations "
        "measure top-1 drops on the validation images.",
        "",
        "Allocations: `uniform` = one ratio for all groups, round_to 8 (4 where 8 cannot reach the target), the setting of the earlier "
        "table; `uniform-r1` = the same at round_to 1; `sensitivity` / `sensitivity-r1` = `allocate.by_threshold` on sensitivity curves "
        "(the default strategy with data, grid 0.1..0.9) at the default round_to (`auto` here: " + "/".join(map(str, round_to_candidates("auto"))) + ", the largest that reaches the target) / at 1; `calibrated-r1` = the same on curves measured after "
        f"reconstruction (`--calibrated-sensitivity`; grid {', '.join(str(g) for g in CAL_GRID)}).",
        "",
        "## Uniform allocation: fitting modes",
        "",
        "| model | target | achieved MACs | criterion | unpruned | pruned | " + " | ".join(labels) + " |",
        "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in labels) + " |",
    ]
    uni = [r for r in rows if r["alloc"] == "uniform"]
    for r in uni:
        out.append(f"| {r['model']} | -{r['target']:.0%} | -{r['achieved']:.1%} | {r['criterion']} | {r['unpruned'][0]:.2f} / {r['unpruned'][1]:.2f} | "
                   f"{r['pruned'][0]:.2f} / {r['pruned'][1]:.2f} | " + " | ".join(cell(r, k) for k in labels) + " |")
    if uni:
        out += ["", "Time per reconstruction (s, mean over these rows): " + ", ".join(
            f"{k} {np.mean([r['fits'][k][2] for r in uni if k in r['fits']]):.1f}" for k in labels) + "; `recon` criterion: " + ", ".join(
            dict.fromkeys(f"{r['model']} {r['criterion_s']:.1f}" for r in rows if r["criterion"] == "recon")) + " (s, once per model).", ""]
        means = {k: np.mean([r["fits"][k][0] for r in uni if k in r["fits"]]) for k in labels}
        out.append("Mean validation top-1 over these rows: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()) + ".")
        out.append("")
    others = [r for r in rows if r["alloc"] != "uniform"]
    if others:
        out += ["## Allocation axis", "", "| model | target | allocation | round_to | achieved MACs | criterion | pruned | " + " | ".join(alloc_labels) + " |",
                "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in alloc_labels) + " |"]
        for r in rows:
            if r["alloc"] == "uniform" and not any(k in r["fits"] for k in alloc_labels):
                continue
            out.append(f"| {r['model']} | -{r['target']:.0%} | {r['alloc']} | {r['round_to']} | -{r['achieved']:.1%} | {r['criterion']} | "
                       f"{r['pruned'][0]:.2f} / {r['pruned'][1]:.2f} | " + " | ".join(cell(r, k) for k in alloc_labels) + " |")
        sens = dict.fromkeys(f"{r['model']} " + " + ".join(f"{k} {v:.0f}" for k, v in r["sens_s"].items()) for r in rows if r["sens_s"])
        out += ["", "Sensitivity analysis time (s, once per model, on the validation images): " + "; ".join(sens) + ".", ""]
        for fit in alloc_labels:
            per = {}
            for r in rows:
                if fit in r["fits"]:
                    per.setdefault((r["alloc"], r["criterion"]), []).append(r["fits"][fit][0])
            n = max(len(v) for v in per.values())
            out.append(f"Mean validation top-1 with `{fit}` over the {n} model/target pairs, by allocation and criterion: " + ", ".join(
                f"{a} {c} {np.mean(v):.2f}" for (a, c), v in per.items() if len(v) == n) + ".")
        out.append("")
    # choice on validation, report on test
    out += ["## Settings chosen on validation, reported on test", "",
            "Chosen: the (allocation, criterion, fit) with the best validation top-1 of all rows above (HEAD excluded).", "",
            "| model | target | chosen (allocation, round_to, criterion, fit) | achieved MACs | val | test | unpruned test | gap (test, points) | HEAD default (uniform, l1) test | goal |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in dict.fromkeys((r["model"], r["target"]) for r in rows):
        cand = [(r["fits"][k][0], k, r) for r in rows if (r["model"], r["target"]) == key for k in r["fits"] if k != "HEAD"]
        val, fit, r = max(cand, key=lambda c: c[0])
        test = r["fits"][fit][1]
        gap = r["unpruned"][1] - test
        head = next((q["fits"]["HEAD"][1] for q in rows if (q["model"], q["target"]) == key and q["criterion"] == "l1" and "HEAD" in q["fits"]), None)
        goal = GOALS.get(key)
        verdict = f"<= {goal} -> **{'MET' if gap <= goal else 'MISSED'}**" if goal else ("not worse than HEAD -> **" + ("MET" if head is None or test >= head - 0.3 else "MISSED") + "**")
        out.append(f"| {key[0]} | -{key[1]:.0%} | {r['alloc']}, {r['round_to']}, {r['criterion']}, {fit} | -{r['achieved']:.1%} | {val:.2f} | {test:.2f} | "
                   f"{r['unpruned'][1]:.2f} | {gap:+.2f} | {'—' if head is None else f'{head:.2f}'} | {verdict} |")
    out.append("")
    out.append("'Not worse' allows 0.3 points (test-set standard error at 92% on 7,500 images: 0.31). The gap is unpruned minus chosen, on test.")
    return "\n".join(out) + "\n"


def recon_options(args) -> dict:
    """Reconstructor options other than the fit mode (from the flags)."""
    out = {}
    if args.calib_n > 1024:
        out["max_samples"] = args.calib_n
    if args.rows != 8192:
        out["rows"] = args.rows
    return out


def calibration_images(n: int) -> np.ndarray:
    """The shipped 512 calibration images, plus ``n - 512`` other train-split images (seed 1; never test images)."""
    x_cal = np.load(CALIB_NPZ, allow_pickle=False)["x"]
    if n <= len(x_cal):
        return x_cal[:n]
    from models.fashion_mnist import load_split

    x, _ = load_split("train")
    shipped = np.sort(np.random.default_rng(0).choice(len(x), size=len(x_cal), replace=False))  # models.fashion_mnist.write_demo_sets
    if not np.array_equal(x[shipped], x_cal):
        raise SystemExit("error: fmnist_calib.npz is not the seed-0 train subset; cannot add disjoint images")
    rest = np.setdiff1d(np.arange(len(x)), shipped)
    more = np.sort(np.random.default_rng(1).choice(rest, size=n - len(x_cal), replace=False))
    return np.concatenate([x_cal, x[more]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg11", "resnet20", "mobilenetv2"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--fits", nargs="+", default=list(FITS), choices=list(FITS), help="fits of the uniform rows (with HEAD)")
    ap.add_argument("--allocs", nargs="+", default=list(ALLOCS), choices=list(ALLOCS))
    ap.add_argument("--alloc-fits", nargs="+", default=["blockwise"], choices=list(FITS), help="fits of the other allocations")
    ap.add_argument("--no-head", action="store_true", help="skip the HEAD baseline")
    ap.add_argument("--calib-n", type=int, default=512, help="calibration images (beyond 512: more train-split images)")
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--test-n", type=int, default=7500)
    ap.add_argument("--quick", action="store_true", help="resnet20 at -30%% only, written to /tmp")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery_modes.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.quick:
        args.models, args.targets, args.out = ["resnet20"], [0.3], Path("/tmp/recovery_modes_quick.md")
    started, load0, t0 = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0], time.perf_counter()
    val = np.load(VAL_NPZ, allow_pickle=False)
    x_test, y_test = held_out_test(val["x"], args.test_n)
    data = (val["x"], val["y"], calibration_images(args.calib_n), x_test, y_test)
    head = None if args.no_head else head_reconstruct()
    rows = []
    for name in args.models:
        rows += run_model(name, args.targets, data, head, args.fits, args.allocs, args.alloc_fits, recon_options(args))
    labels = (["HEAD"] if head is not None else []) + list(args.fits)
    text = render(rows, labels, args.alloc_fits, args, started, load0, time.perf_counter() - t0)
    print(text)
    provenance.write_atomic(args.out, text)  # a failed run leaves the old results file whole
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
