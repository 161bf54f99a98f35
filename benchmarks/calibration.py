"""Accuracy recovered by calibration (no training) on the Fashion-MNIST demo models.

Three tables, all top-1 on ``models/demo/fmnist_val.npz`` (2,500 test images):

1. **Uniform L1 + recovery, the default path.** For each model and MAC target:
   the channels ``prune(strategy="uniform", criterion="l1")`` keeps with every
   other option at its default (``--round-to auto``, which depends on the CPU's
   SIMD width; the table names what it chose), top-1 unpruned, pruned, and after
   :func:`onnxprune.reconstruct.reconstruct` (least-squares re-fit of the
   layers that lost inputs, blockwise: the default ``--calibrate-method``),
   next to :func:`onnxprune.calibrate.calibrate` with ``method`` bias / affine /
   both for comparison, on the 512
   unlabeled images of ``models/demo/fmnist_calib.npz``. The time is one full
   call (original-model pass + calibration), ONNX Runtime on CPU. Goal: at
   -30% MACs, accuracy with the default method within 3 points of unpruned.
2. **Sensitivity allocation, calibrated vs uncalibrated measurements.** The
   public API ``prune(strategy="sensitivity", criterion="l1", calibrate=512,
   calibrated_sensitivity=False / True)`` (default calibration method, i.e.
   reconstruction) at the default ``round_to="auto"``,
   sensitivity measured on the same val set; top-1 after pruning, after
   calibration and after a fixed fine-tuning budget, next to uniform L1 with
   the same budget. Budget (every row): :func:`onnxprune.finetune.finetune`,
   ``--epochs`` epoch(s) on ``--train-n`` random Fashion-MNIST training images
   (seed 0, the subset of ``benchmarks/quality.py``), SGD momentum 0.9, cosine
   lr (vgg11 0.01, resnet20 0.003: the lrs ``benchmarks/quality.py``'s pilot
   picked), batch 64, crop+flip, distillation from the unpruned model, final
   weights kept. Because the sensitivity rows chose their ratios on the val
   set, top-1 on the 7,500 test-split images outside the val set is reported too.
3. **Calibration time vs one fine-tuning epoch**: one reconstruction
   (512 samples, the default method) against one epoch on the subset and on the full
   60,000-image training file (measured, or extrapolated by steps with
   ``--full-epoch extrapolate``).

    python benchmarks/calibration.py                 # full run (~13 min idle on 2 cores, 2-3x that under load)
    python benchmarks/calibration.py --quick         # smoke test: vgg11, -30%, small grid and FT
    python benchmarks/calibration.py --no-finetune   # tables 1 and 2 without fine-tuning

Prints markdown and writes ``benchmarks/results/calibration.md`` (``--quick``: /tmp).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.fashion_mnist import N_TRAIN_FILE, balanced_subset, load_split  # noqa: E402
from onnxprune import allocate  # noqa: E402
from onnxprune.api import PruneOptions, prune  # noqa: E402
from onnxprune.calibrate import METHODS, calibrate  # noqa: E402
from onnxprune.reconstruct import reconstruct  # noqa: E402
from onnxprune.errors import TargetError  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402
from onnxprune.hardware import simd_channel_block  # noqa: E402
from onnxprune.groups import find_groups  # noqa: E402
from onnxprune.rewrite import apply_mask  # noqa: E402
from onnxprune.sensitivity import DEFAULT_GRID  # noqa: E402

from benchmarks import provenance  # noqa: E402

DEMO = ROOT / "models" / "demo"
VAL_NPZ, CALIB_NPZ = DEMO / "fmnist_val.npz", DEMO / "fmnist_calib.npz"
GOAL_POINTS = 3.0
SMALL_FRACTION = 0.10  # "a small fraction of one epoch": at most 10% of a full-training-set epoch
FT_LR = {"vgg11": 0.01, "resnet20": 0.003}  # benchmarks/results/quality.md, pilot on the val split
SENS_VARIANTS = (("sensitivity L1, uncalibrated measurements", False), ("sensitivity L1, calibrated measurements", True))
MODEL_NOTES: list[str] = []
log = logging.getLogger("calibration")


@dataclass
class Data:
    x_val: np.ndarray
    y_val: np.ndarray
    x_cal: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    x_train: np.ndarray | None = None
    y_train: np.ndarray | None = None


def load_data(args) -> Data:
    val = np.load(VAL_NPZ, allow_pickle=False)
    d = Data(val["x"], val["y"], np.load(CALIB_NPZ, allow_pickle=False)["x"])
    d.x_test, d.y_test = held_out_test(d.x_val, args.test_n)
    if not args.no_finetune:
        x, y = load_split("train")  # 55,000 images; same subset as benchmarks/quality.py
        idx = np.sort(np.random.default_rng(0).choice(len(x), size=args.train_n, replace=False))
        d.x_train, d.y_train = np.ascontiguousarray(x[idx]), y[idx]
    return d


def held_out_test(x_val: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The test split without the 2,500 images of ``fmnist_val.npz`` (its balanced seed-0 subset), first ``n`` of the rest."""
    x, y = load_split("test")
    idx = balanced_subset(y, 250, seed=0)
    if not np.array_equal(x[idx], x_val):
        raise SystemExit("error: models/demo/fmnist_val.npz is not the balanced seed-0 test subset; cannot hold it out")
    keep = np.setdiff1d(np.arange(len(y)), idx)[:n]
    return x[keep], y[keep]


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    return 100.0 * float((out.argmax(1) == y).mean())


# --------------------------------------------------------------------------- table 1: uniform + calibration
def note_model(name: str, path: Path) -> None:
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        MODEL_NOTES.append(f"- {name}: {meta.get('arch')} width {meta.get('width')}, {meta.get('epochs')} epochs, {meta.get('parameters'):,} parameters.")


def uniform_alloc(cg, scores, name: str, target: float, candidates=(8, 4)):
    """Uniform L1 at the largest of ``candidates`` that reaches the target (used by ``benchmarks/recovery_modes.py``;
    table 1 here takes its channels from ``prune()`` instead, see :func:`default_uniform`)."""
    for k, r in enumerate(candidates):
        try:
            return allocate.uniform(cg, scores, target=target, round_to=r), r
        except TargetError as exc:  # narrow groups cannot shrink at this multiple
            if k + 1 == len(candidates):
                raise
            log.info("%s -%.0f%%: %s; trying round_to %d", name, 100 * target, exc.message, candidates[k + 1])
    raise AssertionError("no rounding candidates")


def default_uniform(path: Path, target: float):
    """The default path's channels: ``prune(strategy="uniform", criterion="l1")`` with every other option at
    its default (``round_to="auto"``, whatever auto does in this checkout), recovery off; returns the result
    and how auto rounded (``"16"``, or ``"per group, step 16"`` when it measured per-group levels)."""
    res = prune(path, options=PruneOptions(target_flops=target, strategy="uniform", criterion="l1", device="cpu", calibrate=0), write=False)
    rep = res.report
    mode = ((rep.detail or {}).get("rounding") or {}).get("mode")
    return res, (f"per group, step {rep.round_to}" if mode == "auto" else str(rep.round_to))


def uniform_rows(name: str, path: Path, targets, data: Data) -> list[dict]:
    """Table 1; each row also keeps the reconstructed model (the default method) under ``_model``."""
    cg = find_groups(load_model(path))
    base = accuracy(cg.model, data.x_val, data.y_val)
    note_model(name, path)
    rows = []
    for target in targets:
        res, round_to = default_uniform(path, target)
        mask = res.plan.to_mask(cg)
        pruned = apply_mask(cg, mask)
        row = {"model": name, "target": target, "round_to": round_to, "achieved": res.report.reduction, "unpruned": base,
               "pruned": accuracy(pruned, data.x_val, data.y_val)}
        for method in METHODS:
            t = time.perf_counter()
            res = calibrate(cg, mask, pruned, data.x_cal, method=method)
            row[f"{method}_s"] = time.perf_counter() - t
            row[method] = accuracy(res.model, data.x_val, data.y_val)
            row[f"{method}_err"] = (res.output_error_before, res.output_error_after)
        t = time.perf_counter()
        res = reconstruct(cg, mask, pruned, data.x_cal)  # the default --calibrate-method
        row["reconstruct_s"] = time.perf_counter() - t
        row["reconstruct"] = accuracy(res.model, data.x_val, data.y_val)
        row["_model"] = res.model
        rows.append(row)
        log.info("%s -%.0f%% uniform: pruned %.2f, both %.2f (%.2fs), reconstruct %.2f (%.2fs)", name, 100 * target, row["pruned"],
                 row["both"], row["both_s"], row["reconstruct"], row["reconstruct_s"])
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| model | target | round_to (auto) | achieved MACs | unpruned | pruned | **reconstruct (default)** | gap, reconstruct | "
        "bias | affine | both | gap, both | time reconstruct / bias / affine / both (s) | output error before -> after (both) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for r in rows:
        before, after = r["both_err"]
        lines.append(
            f"| {r['model']} | -{r['target']:.0%} | {r['round_to']} | -{r['achieved']:.1%} | {r['unpruned']:.2f} | {r['pruned']:.2f} | "
            f"**{r['reconstruct']:.2f}** | {r['unpruned'] - r['reconstruct']:+.2f} | {r['bias']:.2f} | {r['affine']:.2f} | {r['both']:.2f} | "
            f"{r['unpruned'] - r['both']:+.2f} | {r['reconstruct_s']:.2f} / {r['bias_s']:.2f} / {r['affine_s']:.2f} / {r['both_s']:.2f} | {before:.3f} -> {after:.3f} |"
        )
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- table 2: allocation strategies
def sensitivity_row(name: str, path: Path, target: float, calibrated: bool, cache_dir: str, args) -> dict:
    """One ``prune()`` call through the public API at the default ``round_to="auto"``."""
    opts = PruneOptions(target_flops=target, strategy="sensitivity", criterion="l1", round_to="auto", device="cpu", calibrate=512,
                        calibrated_sensitivity=calibrated, cache_dir=cache_dir, grid=tuple(args.grid))
    t = time.perf_counter()
    res = prune(path, options=opts, data=str(VAL_NPZ), calib_data=str(CALIB_NPZ), write=False)
    rep = res.report
    d = rep.detail
    return {
        "model": name, "target": target, "allocation": SENS_VARIANTS[calibrated][0], "round_to": rep.round_to, "achieved": rep.reduction,
        "pruned": 100 * rep.metrics["pruned"]["top1"], "calibrated": 100 * rep.metrics["calibrated"]["top1"],
        "sens_s": d.get("sensitivity_seconds"), "sens_cached": d.get("sensitivity_cached_groups", 0), "prune_s": time.perf_counter() - t,
        "_model": res.model,
    }


def uniform_as_strategy_row(u: dict) -> dict:
    return {"model": u["model"], "target": u["target"], "allocation": "uniform L1", "round_to": u["round_to"], "achieved": u["achieved"],
            "pruned": u["pruned"], "calibrated": u["reconstruct"], "sens_s": None, "sens_cached": 0, "_model": u["_model"]}


def ft_options(name: str, args):
    from onnxprune.finetune import FinetuneOptions

    return FinetuneOptions(epochs=args.epochs, lr=FT_LR.get(name, 0.01), batch_size=64, optimizer="sgd", device="cpu", seed=0)


def finetune_row(row: dict, teacher, data: Data, args) -> None:
    """Adds top-1 after the fixed budget (val set and test split), FT wall time and per-epoch time."""
    from onnxprune.finetune import finetune

    res = finetune(row["_model"], data.x_train, data.y_train, teacher=teacher, options=ft_options(row["model"], args))
    if res.stopped_reason:
        log.warning("%s: %s", row["allocation"], res.stopped_reason)
    row["ft"] = accuracy(res.model, data.x_val, data.y_val)
    row["ft_test"] = accuracy(res.model, data.x_test, data.y_test)
    row["ft_s"] = res.seconds
    row["epoch_s"] = float(np.mean([h["seconds"] for h in res.history])) if res.history else None
    row["stopped"] = res.stopped_reason


def full_epoch(name: str, model, teacher, data: Data, args) -> dict:
    """One epoch on all 60,000 images of the training file (train + val split), same settings otherwise."""
    from dataclasses import replace

    from onnxprune.finetune import finetune

    x1, y1 = load_split("train")
    x2, y2 = load_split("val")
    x, y = np.concatenate([x1, x2]), np.concatenate([y1, y2])
    res = finetune(model, x, y, teacher=teacher, options=replace(ft_options(name, args), epochs=1))
    return {"images": len(x), "seconds": res.history[0]["seconds"] if res.history else res.seconds, "top1": accuracy(res.model, data.x_val, data.y_val)}


def strategy_rows(name: str, path: Path, uniform: list[dict], data: Data, args, tmp: Path) -> list[dict]:
    rows = []
    for u in uniform:
        rows.append(uniform_as_strategy_row(u))
        for label, calibrated in SENS_VARIANTS:
            cache = tmp / f"{name}-{'cal' if calibrated else 'uncal'}"  # one per variant: later targets reuse the analysis
            r = sensitivity_row(name, path, u["target"], calibrated, str(cache), args)
            log.info("%s -%.0f%% %s: -%.1f%% MACs, pruned %.2f, calibrated %.2f, analysis %.1fs (%d groups cached)", name, 100 * u["target"],
                     label, 100 * r["achieved"], r["pruned"], r["calibrated"], r["sens_s"] or 0, r["sens_cached"])
            rows.append(r)
    for r in rows:
        r["cal_test"] = accuracy(r["_model"], data.x_test, data.y_test)
    if not args.no_finetune:
        teacher = load_model(path)
        for r in rows:
            finetune_row(r, teacher, data, args)
            log.info("%s -%.0f%% %s: after FT %.2f (test %.2f), %.0fs", name, 100 * r["target"], r["allocation"], r["ft"], r["ft_test"], r["ft_s"])
    return rows


def fmt(v, spec: str = ".2f", empty: str = "—") -> str:
    return empty if v is None else format(v, spec)


def strategy_table(rows: list[dict], n_test: int) -> str:
    head = (
        f"| model | target | allocation | round_to | achieved MACs | pruned | calibrated | after FT | calibrated, test {n_test:,} | after FT, test {n_test:,} | sensitivity analysis (s) | FT (s) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for r in rows:
        sens = "—" if r["sens_s"] is None else (f"{r['sens_s']:.1f}" if not r["sens_cached"] else f"cached ({r['sens_cached']} groups)")
        lines.append(
            f"| {r['model']} | -{r['target']:.0%} | {r['allocation']} | {r['round_to']} | -{r['achieved']:.1%} | {r['pruned']:.2f} | {r['calibrated']:.2f} | "
            f"{fmt(r.get('ft'))} | {fmt(r['cal_test'])} | {fmt(r.get('ft_test'))} | {sens} | {fmt(r.get('ft_s'), '.0f')} |"
        )
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- table 3: time
def timing_rows(uniform: list[dict], srows: list[dict], full: dict | None, args) -> list[dict]:
    out = []
    for name in dict.fromkeys(u["model"] for u in uniform):
        cal = [u["reconstruct_s"] for u in uniform if u["model"] == name]  # the default method
        epochs = [r["epoch_s"] for r in srows if r["model"] == name and r.get("epoch_s")]
        if not epochs:
            continue
        sub = float(np.mean(epochs))
        steps_sub, steps_full = max(1, args.train_n // 64), N_TRAIN_FILE // 64
        f = (full or {}).get(name)
        full_s, how = (f["seconds"], "measured") if f else (sub * steps_full / steps_sub, f"extrapolated x{steps_full}/{steps_sub} steps")
        cal_s = float(np.mean(cal))
        out.append({"model": name, "n_train": args.train_n, "cal_s": cal_s, "cal_all": cal, "sub_s": sub, "n_sub": len(epochs), "full_s": full_s, "how": how,
                    "ratio_sub": cal_s / sub, "ratio_full": cal_s / full_s, "full_top1": f["top1"] if f else None})
    return out


def timing_table(trows: list[dict], args) -> str:
    head = (
        f"| model | calibration, 512 samples, reconstruct (default) (s) | FT epoch on {args.train_n:,} images (s) | FT epoch on {N_TRAIN_FILE:,} images (s) | "
        f"calibration / epoch ({args.train_n:,}) | calibration / epoch ({N_TRAIN_FILE:,}) |\n| --- | --- | --- | --- | --- | --- |\n"
    )
    lines = [
        f"| {t['model']} | {t['cal_s']:.2f} (mean of {' / '.join(f'{c:.2f}' for c in t['cal_all'])}) | {t['sub_s']:.1f} (mean of {t['n_sub']} rows) | "
        f"{t['full_s']:.0f} ({t['how']}) | {t['ratio_sub']:.1%} | {t['ratio_full']:.2%} |"
        for t in trows
    ]
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- verdicts and rendering
def goal_lines(uniform: list[dict], srows: list[dict]) -> list[str]:
    out = []
    for u in uniform:
        gap = u["unpruned"] - u["reconstruct"]
        # every allocation listed, none picked: the sensitivity rows were measured on these same images
        sens = [r for r in srows if r["model"] == u["model"] and r["target"] == u["target"] and r["allocation"] != "uniform L1"]
        extra = ("; sensitivity allocations (table 2, optimistic: measured on these images): "
                 + ", ".join(f"{r['allocation'].removeprefix('sensitivity L1, ')} {r['calibrated']:.2f}" for r in sens)) if sens else ""
        if abs(u["target"] - 0.3) < 1e-9:
            out.append(f"- {u['model']} at -30% (round_to {u['round_to']}): uniform L1 + reconstruction gap {gap:.2f} points -> **{'MET' if gap <= GOAL_POINTS else 'MISSED'}** "
                       f"(goal <= {GOAL_POINTS:g}; bias+affine 'both', not the default: gap {u['unpruned'] - u['both']:.2f}){extra}.")
        else:
            out.append(f"- {u['model']} at -{u['target']:.0%} (round_to {u['round_to']}): no goal set; uniform L1 + reconstruction gap {gap:.2f} points "
                       f"(bias+affine 'both', not the default: {u['unpruned'] - u['both']:.2f}){extra}.")
    return out


def _better(a: float | None, b: float | None, what: str) -> str:
    if a is None or b is None:
        return f"{what}: not measured"
    if abs(a - b) < 1e-9:
        return f"{what}: tie ({a:.2f})"
    return f"{what}: {'calibrated' if a > b else 'uncalibrated'} better (calibrated {a:.2f}, uncalibrated {b:.2f}, difference {a - b:+.2f})"


def noise_note(data: Data, p: float = 0.92) -> str:
    se = [100 * np.sqrt(p * (1 - p) / len(y)) for y in (data.y_val, data.y_test)]
    return (f"One run (seed 0) per row, no repeats: at ~{p:.0%} top-1 the binomial standard error is {se[0]:.2f} points on the "
            f"{len(data.y_val):,} val images and {se[1]:.2f} on the {len(data.y_test):,} test images, and the fine-tuning seed adds variation "
            "that was not measured, so differences below about 1 point after FT are not evidence either way.")


def sensitivity_lines(srows: list[dict]) -> list[str]:
    out = []
    for u in (r for r in srows if r["allocation"] == "uniform L1"):
        pick = {r["allocation"]: r for r in srows if r["model"] == u["model"] and r["target"] == u["target"]}
        unc, cal = pick[SENS_VARIANTS[0][0]], pick[SENS_VARIANTS[1][0]]
        parts = [_better(cal["calibrated"], unc["calibrated"], "before FT"), _better(cal.get("ft"), unc.get("ft"), "after FT"),
                 _better(cal.get("ft_test"), unc.get("ft_test"), "after FT on the test split")]
        macs = f"MACs -{unc['achieved']:.1%} uncalibrated / -{cal['achieved']:.1%} calibrated (uniform -{u['achieved']:.1%})"
        if not unc["sens_cached"] and not cal["sens_cached"]:
            parts.append(f"analysis {unc['sens_s']:.1f} s uncalibrated vs {cal['sens_s']:.1f} s calibrated ({cal['sens_s'] / unc['sens_s']:.1f}x)")
        out.append(f"- {u['model']} at -{u['target']:.0%}, {macs}: " + "; ".join(parts) + ".")
    return out


def full_epoch_note(args) -> str:
    if args.full_epoch == "measure":
        return (f"The {N_TRAIN_FILE:,}-image epoch was run: all images of the training file (train + val split), "
                "starting from the uniform L1 model at the first target, same options.")
    return f"The {N_TRAIN_FILE:,}-image epoch is extrapolated from the subset epoch by the number of steps (batch 64), not measured."


def timing_lines(trows: list[dict]) -> list[str]:
    out = []
    for t in trows:
        ok = t["ratio_full"] <= SMALL_FRACTION
        out.append(f"- {t['model']}: calibration {t['cal_s']:.2f} s = {t['ratio_full']:.2%} of one {N_TRAIN_FILE:,}-image epoch ({t['how']}) and "
                   f"{t['ratio_sub']:.1%} of one {t['n_train']:,}-image epoch -> **{'MET' if ok else 'MISSED'}** (small fraction read as <= {SMALL_FRACTION:.0%} of a full epoch)."
                   + (f" Top-1 on `fmnist_val.npz` after that one full epoch (by-product of the timing run): {t['full_top1']:.2f}." if t["full_top1"] is not None else ""))
    return out


def auto_line(uniform: list[dict]) -> str:
    used = ", ".join(f"{u['model']} -{u['target']:.0%}: {u['round_to']}" for u in uniform)
    return (f"`--round-to auto` on this CPU: SIMD channel block {simd_channel_block()} (16 on AVX-512, 8 otherwise); the multiples "
            f"`prune()` chose here ({used}) depend on it, so on a CPU with a different SIMD width these rows change. "
            "Table 1 takes its channels from `prune(strategy='uniform', criterion='l1', calibrate=0)` with every other option at its default.")


def render(uniform, srows, trows, args, data: Data, prov: "provenance.Provenance") -> str:
    parts = ["# Recovery without training (reconstruction, the default; calibration methods for comparison)\n", *prov.header(), "",
             "## 1. Uniform L1 pruning + recovery, no training: the default path\n", table(uniform)]
    parts += [
        f"Top-1 on {len(data.y_val)} images of the Fashion-MNIST test split (`models/demo/fmnist_val.npz`); recovery fitted on the {len(data.x_cal)} "
        "unlabeled images of `models/demo/fmnist_calib.npz`; no labels, no training, no setting chosen on these images.",
        "Default path: uniform allocation, L1 criterion, `--round-to auto`, `--calibrate-method reconstruct` (blockwise least-squares re-fit), "
        "i.e. the **reconstruct (default)** column. bias / affine / both are the other `--calibrate-method` values, shown for comparison. "
        f"gap = unpruned - recovered top-1, in points; goal at -30% MACs: gap <= {GOAL_POINTS:g}.",
        auto_line(uniform),
        "Time: one `reconstruct()` or `calibrate()` call (original-model pass + fit), ONNX Runtime CPU, on the shared machine above.",
        "Output error: relative L2 distance of the logits to the unpruned model's on the calibration images.",
    ] + MODEL_NOTES + goal_lines(uniform, srows)
    parts += ["", "## 2. Sensitivity allocation: calibrated vs uncalibrated measurements, then a fixed fine-tuning budget\n", strategy_table(srows, len(data.y_test))]
    ft = "not run (`--no-finetune`)" if args.no_finetune else (
        f"{args.epochs} epoch(s) on the same {args.train_n:,} random training images (train split, seed 0), SGD momentum 0.9, weight decay 5e-4, "
        f"cosine lr to 0, lr {', '.join(f'{m} {lr:g}' for m, lr in FT_LR.items())} (picked by `benchmarks/quality.py`'s pilot), batch 64, crop+flip, "
        "distillation from the unpruned model (T=4, weight 0.5), final weights kept, torch CPU")
    parts += [
        f"`prune(path, options=PruneOptions(target_flops=t, strategy='sensitivity', criterion='l1', round_to='auto', device='cpu', calibrate=512, "
        f"calibrated_sensitivity=False|True, grid={tuple(args.grid)}), data='models/demo/fmnist_val.npz', calib_data='models/demo/fmnist_calib.npz', write=False)`; "
        "pruned/calibrated = the report's metrics on the val set (calibrated = after the default reconstruction). "
        "Uniform L1 rows are table 1's `reconstruct (default)` models.",
        "Sensitivity is measured on the same 2,500 val images the `pruned`/`calibrated`/`after FT` columns use, so those are optimistic for the sensitivity rows; "
        f"the `test` columns use {len(data.y_test):,} images of the Fashion-MNIST test split that are not in the val set (the test split minus the val set's 2,500).",
        noise_note(data),
        "Sensitivity analysis time: the `analyze()` wall time in the report; the analysis does not depend on the target, so the second target of a model reuses it from a cache.",
        f"Fine-tuning budget, identical for every row: {ft}.",
    ] + sensitivity_lines(srows)
    if trows:
        parts += ["", "## 3. Calibration time vs one fine-tuning epoch\n", timing_table(trows, args),
                  "Epoch time: the `seconds` of the training epoch in `finetune()`'s history (training steps only, no evaluation; pruned model, distillation, "
                  f"{args.threads} torch thread(s)); the subset column is the mean over the model's fine-tuned rows. " + full_epoch_note(args)] + timing_lines(trows)
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg11", "resnet20"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--out", type=Path, default=None, help="markdown output (default benchmarks/results/calibration.md; --quick: /tmp)")
    ap.add_argument("--quick", action="store_true", help="smoke test: vgg11, -30%%, grid 0.3 0.6, FT on 512 images, extrapolated full epoch")
    ap.add_argument("--no-finetune", action="store_true", help="skip fine-tuning (and the time comparison)")
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (same for every row)")
    ap.add_argument("--train-n", type=int, default=6000, help="training images for fine-tuning (random subset, seed 0)")
    ap.add_argument("--test-n", type=int, default=7500, help="held-out test images (test split minus the val set) for the test columns")
    ap.add_argument("--grid", nargs="+", type=float, default=list(DEFAULT_GRID), help="sensitivity ratios")
    ap.add_argument("--full-epoch", choices=["measure", "extrapolate"], default="measure", help="one epoch on 60,000 images: run it or extrapolate")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.models, args.targets, args.grid, args.train_n, args.test_n, args.full_epoch = ["vgg11"], [0.3], [0.3, 0.6], 512, 1000, "extrapolate"
        args.out = args.out or Path(tempfile.gettempdir()) / "onnxprune_calibration_quick.md"
    args.out = args.out or ROOT / "benchmarks" / "results" / "calibration.md"
    return args


def run_model(name: str, path: Path, data: Data, args, tmp: Path):
    uniform = uniform_rows(name, path, args.targets, data)
    srows = strategy_rows(name, path, uniform, data, args, tmp)
    full = None
    if not args.no_finetune and args.full_epoch == "measure":
        full = full_epoch(name, uniform[0]["_model"], load_model(path), data, args)
        log.info("%s: one epoch on %d images %.0fs, top-1 %.2f", name, full["images"], full["seconds"], full["top1"])
    return uniform, srows, full


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnxprune").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    if not args.no_finetune:
        import torch

        torch.set_num_threads(args.threads)
    prov = provenance.start(script="benchmarks/calibration.py", argv=args.argv)
    data = load_data(args)
    uniform, srows, full = [], [], {}
    with tempfile.TemporaryDirectory(prefix="onnxprune_calibration_") as tmp:
        for name in args.models:
            path = DEMO / f"fmnist_{name}.onnx"
            if not path.is_file():
                raise SystemExit(f"error: {path} not found")
            u, s, f = run_model(name, path, data, args, Path(tmp))
            uniform, srows = uniform + u, srows + s
            if f:
                full[name] = f
    trows = [] if args.no_finetune else timing_rows(uniform, srows, full, args)
    text = render(uniform, srows, trows, args, data, prov)
    print(text)
    provenance.write_atomic(args.out, text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
