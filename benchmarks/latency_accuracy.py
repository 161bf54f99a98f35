"""Latency-targeted vs MAC-targeted allocation at equal measured latency, before and after fine-tuning (issue #13).

For each trained demo model (VGG-11, ResNet-20, MobileNetV2 on Fashion-MNIST):

1. **Latency-targeted**: ``--target-latency 0.3 --strategy sensitivity`` (L1 scores,
   reconstruction on ``models/demo/fmnist_calib.npz``), timed on ONNX Runtime CPU at
   ``--latency-batch`` with ``--latency-threads``.
2. **MAC-targeted at the same measured latency**: ``--target-flops t --strategy
   sensitivity --measure-latency`` with the same settings; ``t`` is searched (secant on
   measured points, at most ``--match-steps`` prunes) until the measured latency cut is
   within ``--match-tol`` of the latency-targeted run's. Matching is *by measurement*.
3. The original and both pruned models are then timed together, interleaved
   (O, L, M in rotating order, fastest of k runs per round, medians over rounds).
4. Both pruned models get the same fine-tuning budget: ``onnxprune.finetune`` with
   default options (lr by the pilot on validation unless ``--lr``, distillation from the original),
   ``--epochs`` epochs on a seeded ``--train-n`` subset of the train split; validation
   (lr pilot, best epoch) = the 5,000-image val split (held-out end of the training file).
5. Top-1 on the 10,000-image Fashion-MNIST **test** split before and after fine-tuning.

Data for sensitivity and selection: the first 2,500 images of the val split, *not*
``models/demo/fmnist_val.npz``: that file is 2,500 images drawn from the test split
(models/demo/README.md), and the test split must stay unused for choices.

    python benchmarks/latency_accuracy.py [--models vgg11,resnet20,mobilenetv2] [--seeds 0,1,2] [--from-head]

``--from-head`` runs the benchmark on a clean ``git archive HEAD`` export (plus this script), so
uncommitted work of others in the tree cannot change the code under test mid-run; the results
file names that export as the source.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from benchmarks.equal_budget import _commit, load_budget_data  # noqa: E402
from benchmarks import provenance  # noqa: E402
from benchmarks.quality import DEMO, MODELS, macs_params, top1  # noqa: E402
from onnxprune.api import PruneOptions, prune  # noqa: E402
from onnxprune.errors import OnnxPruneError, TargetError  # noqa: E402
from onnxprune.finetune import FinetuneOptions, finetune  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402
from onnxprune.hardware import cpu_identity, simd_channel_block  # noqa: E402
from onnxprune.latency import model_feeds  # noqa: E402
from onnxprune.latency_table import open_session, resolve_settings, time_runs  # noqa: E402

log = logging.getLogger("latency_accuracy")
LABELS = {"vgg11": "VGG-11", "resnet20": "ResNet-20", "mobilenetv2": "MobileNetV2"}


def test_top1(model, data) -> float:
    """Top-1 (fraction) on the test split; ``benchmarks.quality.top1`` answers in percent."""
    return top1(model, data.x_test, data.y_test) / 100.0


def common_options(args, cache: Path) -> dict:
    return dict(strategy=args.strategy, device="cpu", latency_batch=args.batch, latency_threads=args.threads,
                latency_repeats=args.rounds, latency_max_spread=args.max_spread, cache_dir=str(cache))


def mac_run(path, t: float, args, cache, data) -> dict:
    res = prune(path, options=PruneOptions(target_flops=t, measure_latency=True, **common_options(args, cache)),
                data=data.sens_npz, calib_data=str(DEMO / "fmnist_calib.npz"), write=False)
    return {"t": t, "cut": res.report.detail["latency"]["measured_cut"], "res": res}


def match_mac(path, goal: float, start: float, args, cache, data) -> tuple[dict, list[tuple[float, float]]]:
    """The MAC target whose measured latency cut is closest to ``goal`` (secant on measured points,
    starting at ``start``: the latency-targeted run's MACs cut)."""
    points: list[dict] = []
    t = min(max(start, 0.05), 0.9)
    for _ in range(args.match_steps):
        try:
            p = mac_run(path, round(t, 3), args, cache, data)
        except TargetError:
            t = 0.5 * (t + max([q["t"] for q in points], default=0.0))
            continue
        points.append(p)
        log.info("  MAC target %.3f -> measured latency cut %.1f%% (goal %.1f%%)", p["t"], 100 * p["cut"], 100 * goal)
        if abs(p["cut"] - goal) <= args.match_tol:
            break
        below = [q for q in points if q["cut"] < goal]
        above = [q for q in points if q["cut"] > goal]
        lo = max(below, key=lambda q: q["cut"]) if below else {"t": 0.0, "cut": 0.0}
        if above:
            hi = min(above, key=lambda q: q["cut"])
            t = lo["t"] + (hi["t"] - lo["t"]) * (goal - lo["cut"]) / max(hi["cut"] - lo["cut"], 1e-6)
        else:  # extrapolate through the origin / the last point below
            t = lo["t"] * goal / max(lo["cut"], 0.02) if lo["cut"] > 0.02 else lo["t"] + 0.1
        t = min(max(t, 0.05), 0.9)
        if any(abs(q["t"] - round(t, 3)) < 1e-9 for q in points):
            break
    if not points:
        raise TargetError("no MAC target could be pruned", fix="check the model")
    best = min(points, key=lambda q: abs(q["cut"] - goal))
    return best, [(q["t"], q["cut"]) for q in points]


def time_three(models: list[onnx.ModelProto], args, cg_model) -> dict:
    """Interleaved timing of original, latency-targeted and MAC-targeted: medians of per-round ratios."""
    from onnxprune.groups import find_groups

    settings = resolve_settings("cpu", batch=args.batch, threads=args.threads)
    feeds = model_feeds(find_groups(cg_model), settings.batch)
    sess = [open_session(m, settings) for m in models]
    first = time_runs(sess[0], feeds, min_runs=1, max_runs=3, warmup=2)
    for s in sess[1:]:
        time_runs(s, feeds, min_runs=1, max_runs=1, warmup=2)
    k = max(1, min(20, int(np.ceil(0.03 / max(first, 1e-6)))))
    times = [[] for _ in sess]
    for r in range(args.final_rounds):
        order = list(range(len(sess)))
        order = order[r % 3:] + order[:r % 3]
        for j in order:
            times[j].append(time_runs(sess[j], feeds, min_runs=k, min_seconds=0.0, max_runs=k, warmup=0))
    t = [np.asarray(v) for v in times]

    def spread(v):
        q25, q50, q75 = np.percentile(v, [25, 50, 75])
        return float((q75 - q25) / q50)

    rl, rm, lm = t[1] / t[0], t[2] / t[0], t[1] / t[2]
    return {"ms": [1e3 * float(np.median(v)) for v in t], "lat_cut": 1 - float(np.median(rl)), "mac_cut": 1 - float(np.median(rm)),
            "l_over_m": float(np.median(lm)), "spread": max(spread(rl), spread(rm)), "rounds": args.final_rounds, "k": k,
            "settings": settings.describe()}


def kept_text(res) -> str:
    return " ".join(f"{g.channels_after}/{g.channels_before}" for g in res.report.groups if g.blocked_reason is None)


def run_model(name: str, args, data, workdir: Path, row: dict, emit) -> dict:
    path = DEMO / f"{MODELS[name]}.onnx"
    original = load_model(path)
    cache = workdir / f"cache_{name}"
    row.update({"model": name, "orig_top1": test_top1(original, data)})
    base_macs = macs_params(original)[0]
    t0 = time.perf_counter()
    try:
        lat = prune(path, options=PruneOptions(target_latency=args.target, **common_options(args, cache)),
                    data=data.sens_npz, calib_data=str(DEMO / "fmnist_calib.npz"), write=False)
    except OnnxPruneError as exc:
        row["error"] = "latency-targeted run refused: " + exc.one_line()
        return row
    d = lat.report.detail["latency"]
    row["lat_loop_cut"], row["lat_iters"] = d["measured_cut"], len(d["iterations"])
    log.info("%s latency-targeted: measured cut %.1f%%, MACs cut %.1f%% (%.0f s)", name, 100 * d["measured_cut"],
             100 * lat.report.reduction, time.perf_counter() - t0)
    try:
        mac, tried = match_mac(path, d["measured_cut"], lat.report.reduction, args, cache, data)
    except OnnxPruneError as exc:
        row["error"] = "MAC-targeted match failed: " + exc.one_line()
        return row
    row["mac_t"], row["mac_tried"], row["mac_loop_cut"] = mac["t"], tried, mac["cut"]
    pruned = {"latency": lat.model, "MAC": mac["res"].model}
    row["macs_cut"] = {k: 1 - macs_params(m)[0] / base_macs for k, m in pruned.items()}
    row["kept"] = {"latency": kept_text(lat), "MAC": kept_text(mac["res"])}
    try:
        row["timing"] = time_three([original, lat.model, mac["res"].model], args, original)
    except OnnxPruneError as exc:
        row["timing_error"] = exc.one_line()
    row["before"] = {k: test_top1(m, data) for k, m in pruned.items()}
    row["after"], row["ft"] = {k: [] for k in pruned}, {k: [] for k in pruned}
    emit()
    for seed in args.seeds:
        for k, m in pruned.items():
            t1 = time.perf_counter()
            ft = finetune(m, data.x_train, data.y_train, val_x=data.x_val, val_y=data.y_val, teacher=original,
                          options=FinetuneOptions(epochs=args.epochs, seed=seed, device="cpu", lr=args.lr))
            acc = test_top1(ft.model, data)
            if macs_params(ft.model)[0] != macs_params(m)[0]:
                raise RuntimeError(f"{name} {k}: fine-tuning changed the MACs")
            row["after"][k].append(acc)
            row["ft"][k].append({"seed": seed, "lr": ft.lr, "best_epoch": ft.best_epoch, "s": time.perf_counter() - t1,
                                 "val": None if ft.best_val is None else 100 * ft.best_val})
            log.info("%s %s seed %d: %.2f -> %.2f (lr %s, %.0f s)", name, k, seed, 100 * row["before"][k], 100 * acc, ft.lr,
                     time.perf_counter() - t1)
            emit()
    row["seconds"] = time.perf_counter() - t0
    return row


def pct(v, spec=".1f") -> str:
    return "—" if v is None else format(100 * v, spec) + "%"


def acc(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def render(rows: list[dict], meta: dict) -> str:
    a = meta["args"]
    lines = [
        "# Latency-targeted vs MAC-targeted allocation at equal measured latency, before and after fine-tuning",
        "",
        f"Command: `{meta['command']}`; source {meta['commit']}; {meta['date']}.",
        f"Machine: {cpu_identity()}, {os.cpu_count()} logical CPUs shared with other engineers' jobs, NCHWc block {simd_channel_block()}; "
        f"load average {meta['load0'][0]:.2f} / {meta['load0'][1]:.2f} (1 / 5 min) at start, "
        + (f"{meta['load1'][0]:.2f} / {meta['load1'][1]:.2f} at end." if meta.get("load1") else "run in progress."),
        f"Versions: Python {platform.python_version()}, onnx {onnx.__version__}, ONNX Runtime {ort.__version__}, torch {meta['torch']}.",
        "",
        "Setup:",
        f"- Latency-targeted: `--target-latency {a.target} --strategy {a.strategy}` (L1, reconstruction on `models/demo/fmnist_calib.npz`, "
        f"512 unlabeled training images). Timing everywhere: ONNX Runtime CPU, batch {a.batch}, {a.threads} intra-op thread(s), no spinning, "
        f"`--latency-repeats {a.rounds}`, `--latency-max-spread {a.max_spread}`.",
        f"- MAC-targeted: `--target-flops t --strategy {a.strategy} --measure-latency`, same options; `t` matched **by measurement**: "
        f"secant search over at most {a.match_steps} prunes until the measured latency cut is within {100 * a.match_tol:.1f} points of "
        "the latency-targeted run's loop measurement; the closest is kept (`tried` lists t → measured cut).",
        f"- Final timing: original (O), latency-targeted (L) and MAC-targeted (M) interleaved in rotating order, {a.final_rounds} rounds, "
        "each model the fastest of k runs per round; cuts are 1 − median of per-round ratios; spread = IQR/median of those ratios.",
        "- Sensitivity data: first 2,500 images of the Fashion-MNIST val split (last 5,000 of the training file). Not "
        "`models/demo/fmnist_val.npz`, which is drawn from the test split.",
        f"- Fine-tuning (same for both): `onnxprune.finetune` defaults ({a.epochs} epoch(s), batch 64, SGD, "
        + ("lr by the pilot over the default candidates scored on validation" if a.lr is None else f"fixed lr {a.lr:g} (no pilot, for time)")
        + ", distillation from the original, the start or the epoch kept by validation) on a seeded (seed 0) "
        f"{meta['train_n']:,}-image subset of the 55,000-image train split; validation = the 5,000-image val split; fine-tuning seeds "
        f"{a.seeds} (batch order, augmentation, pilot slice).",
        "- Top-1: the 10,000-image **test** split, used for nothing else.",
        "",
        "## Results",
        "",
        "| model | orig top-1 | run | MAC target | MACs cut | latency cut (loop) | latency cut (final, interleaved) | ms (O / pruned) | "
        "top-1 before FT | top-1 after FT (mean) | per seed | lr per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = LABELS[r["model"]]
        if "error" in r or "before" not in r:
            lines.append(f"| {label} | {acc(r.get('orig_top1'))} | | | | | | | | | | {r.get('error', 'in progress')} |")
            continue
        tm = r.get("timing") or {}
        for k, run in (("latency", f"latency-targeted ({a.target})"), ("MAC", "MAC-targeted")):
            final = tm.get("lat_cut" if k == "latency" else "mac_cut")
            ms = f"{tm['ms'][0]:.2f} / {tm['ms'][1 if k == 'latency' else 2]:.2f}" if tm else r.get("timing_error", "—")
            after = r["after"][k]
            mean = float(np.mean(after)) if after else None
            lines.append(
                f"| {label} | {acc(r['orig_top1'])} | {run} | {'—' if k == 'latency' else r['mac_t']} | {pct(r['macs_cut'][k])} | "
                f"{pct(r['lat_loop_cut'] if k == 'latency' else r['mac_loop_cut'])} | {pct(final)} | {ms} | {acc(r['before'][k])} | "
                f"{acc(mean)} | {', '.join(acc(v) for v in after)} | {', '.join(format(f['lr'], 'g') for f in r['ft'][k])} |")
    lines += ["", "## Verdict per model (goal: latency-targeted ≥ MAC-targeted at equal measured latency)", ""]
    for r in rows:
        label = LABELS[r["model"]]
        if "error" in r or not (r.get("after") or {}).get("MAC"):
            lines.append(f"- {label}: no verdict ({r.get('error', 'fine-tuning not finished')}).")
            continue
        tm = r.get("timing") or {}
        n = min(len(r["after"]["latency"]), len(r["after"]["MAC"]))
        la, ma = np.mean(r["after"]["latency"][:n]), np.mean(r["after"]["MAC"][:n])
        bl, bm = r["before"]["latency"], r["before"]["MAC"]
        eq = (f"final interleaved cuts {pct(tm.get('lat_cut'))} (L) vs {pct(tm.get('mac_cut'))} (M), L/M time ratio "
              f"{tm['l_over_m']:.3f}, spread {pct(tm.get('spread'))}") if tm else f"final timing failed: {r.get('timing_error')}"
        lines.append(f"- **{label}: {'MET' if la >= ma else 'MISSED'}** after FT ({n} seed(s)): latency-targeted "
                     f"{100 * la:.2f} vs MAC-targeted {100 * ma:.2f} ({100 * (la - ma):+.2f} points); before FT {100 * bl:.2f} vs "
                     f"{100 * bm:.2f} ({100 * (bl - bm):+.2f}). MACs cut {pct(r['macs_cut']['latency'])} vs {pct(r['macs_cut']['MAC'])}; {eq}.")
    lines += ["", "## Kept channels per prunable group (kept/total, graph order)", ""]
    for r in rows:
        if "kept" in r:
            lines += [f"- {LABELS[r['model']]} latency-targeted: {r['kept']['latency']}",
                      f"- {LABELS[r['model']]} MAC-targeted (t={r['mac_t']}): {r['kept']['MAC']}",
                      f"- {LABELS[r['model']]} MAC targets tried (t → measured cut): "
                      + ", ".join(f"{t} → {pct(c)}" for t, c in r["mac_tried"])]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in meta.get("notes", [])]
    lines += ["", f"Wall time: {meta.get('wall', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def group_analysis(rows: list[dict], args) -> list[str]:
    """Per prunable group: MAC share, kept counts of both runs, and what the latency model (built now,
    at ``args.batch``/``args.threads``) predicts each run's cut of that group alone saves in time vs MACs."""
    from onnxprune import allocate
    from onnxprune.groups import find_groups
    from onnxprune.importance import score_units
    from onnxprune.latency import build_latency_model

    settings = resolve_settings("cpu", batch=args.batch, threads=args.threads)
    lines = ["## Where the two allocations differ (computed after the run)", "",
             f"`python benchmarks/latency_accuracy.py --analyze {' '.join(sys.argv[2:])}`; latency model built afresh ({settings.describe()}), "
             f"load average {os.getloadavg()[0]:.2f} at start. Per prunable group (graph order): the share of the model's MACs in the nodes it "
             "slices (groups overlap where they share nodes, e.g. a residual stream that feeds every block of its stage), the kept "
             "counts of both runs, and for each run's count *with every other group full*: the predicted share of the latency saved and "
             "the share of MACs saved (time/MACs: how much time a removed MAC of that group buys).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            if "kept" not in r:
                continue
            cg = find_groups(load_model(DEMO / f"{MODELS[r['model']]}.onnx"))
            lm = build_latency_model(cg, settings, cache_dir=tmp, rounds=args.rounds, max_spread=1e9)
            builder = allocate.MaskBuilder(cg, score_units(cg, "l1"))
            full_t = lm.predict(None)
            kept = {k: [int(t.split("/")[0]) for t in r["kept"][k].split()] for k in ("latency", "MAC")}
            groups = cg.prunable_groups
            if any(len(v) != len(groups) for v in kept.values()):
                lines.append(f"- {LABELS[r['model']]}: group list changed since the run; skipped")
                continue
            lines += [f"### {LABELS[r['model']]}", "", "| group (first producer) | channels | MACs touched | kept L | kept M | L: time / MACs saved | M: time / MACs saved |",
                      "|---|---|---|---|---|---|---|"]
            deeper = {"L": [0.0, 0.0], "M": [0.0, 0.0]}  # groups where that run keeps fewer: MACs saved alone (summed), count
            for i, g in enumerate(groups):
                cells, saved = [], {}
                for k in ("latency", "MAC"):
                    m = builder.mask({g.id: kept[k][i]})
                    dt, dm = 1 - lm.predict(m) / full_t, 1 - cg.macs(m) / max(cg.total_macs, 1)
                    cells.append("—" if kept[k][i] == g.channels else f"{100 * dt:.1f}% / {100 * dm:.1f}%")
                    saved[k] = dm
                if kept["latency"][i] != kept["MAC"][i]:
                    k = "latency" if kept["latency"][i] < kept["MAC"][i] else "MAC"
                    w = deeper["L" if k == "latency" else "M"]
                    w[0] += saved[k]
                    w[1] += 1
                lines.append(f"| {g.id} ({g.producers[0]}) | {g.channels} | {100 * g.macs_share:.1f}% | {kept['latency'][i]} | {kept['MAC'][i]} | {cells[0]} | {cells[1]} |")
            lines += ["", f"Latency-targeted keeps fewer channels in {deeper['L'][1]:.0f} groups, MAC-targeted in {deeper['M'][1]:.0f}. Predicted share of the original latency outside "
                      f"the per-layer tables (residual: elementwise ops, pooling, reorders, per-run overhead): "
                      f"{100 * max(lm.residual, 0.0) / max(lm.measured, 1e-12):.0f}%.", ""]
    return lines


def rerun_from_head(argv: list[str], out: str) -> int:
    """Export HEAD to a temporary folder, add this script, and run it there (see the module docstring)."""
    commit = _commit().replace("+dirty", "")
    with tempfile.TemporaryDirectory(prefix="onnxprune_head_") as tmp:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        shutil.copy2(Path(__file__), Path(tmp) / "benchmarks" / Path(__file__).name)
        rest = [a for a in argv if a != "--from-head"]
        label = f"{commit} (clean `git archive HEAD` export; benchmarks/latency_accuracy.py from the working tree)"
        cmd = [sys.executable, str(Path(tmp) / "benchmarks" / Path(__file__).name), *rest, "--out", str(Path(out).resolve()),
               "--source-label", label, "--command-label", "python benchmarks/latency_accuracy.py " + " ".join(argv)]
        return subprocess.run(cmd, cwd=tmp).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg11,resnet20,mobilenetv2")
    ap.add_argument("--target", type=float, default=0.3)
    ap.add_argument("--strategy", default="sensitivity", choices=["sensitivity", "cost-aware"], help="allocation of both runs")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for every latency measurement")
    ap.add_argument("--rounds", type=int, default=21, help="--latency-repeats of every prune")
    ap.add_argument("--final-rounds", type=int, default=31)
    ap.add_argument("--max-spread", type=float, default=0.2)
    ap.add_argument("--match-steps", type=int, default=4)
    ap.add_argument("--match-tol", type=float, default=0.01)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-n", type=int, default=10000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--lr", type=float, help="fixed fine-tuning lr for both runs (default: the pilot of onnxprune.finetune)")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency_accuracy.md"))
    ap.add_argument("--from-head", action="store_true", help="run on a clean export of HEAD (see the module docstring)")
    ap.add_argument("--source-label", help=argparse.SUPPRESS)  # set by --from-head
    ap.add_argument("--command-label", help=argparse.SUPPRESS)  # set by --from-head
    ap.add_argument("--analyze", action="store_true", help="append the per-group analysis to --out from its .json (after a run)")
    args = ap.parse_args()
    if args.analyze:
        out = Path(args.out)
        rows = json.loads(out.with_suffix(".json").read_text())
        text = out.read_text().split("\n## Where the two allocations differ")[0].rstrip("\n")
        provenance.write_atomic(out, text + "\n\n" + "\n".join(group_analysis(rows, args)) + "\n")
        print(out.read_text())
        return
    if args.from_head:
        sys.exit(rerun_from_head(sys.argv[1:], args.out))
    args.seeds = [int(s) for s in args.seeds.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    meta = {"args": args, "command": args.command_label or "python benchmarks/latency_accuracy.py " + " ".join(sys.argv[1:]),
            "commit": args.source_label or _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load0": os.getloadavg(),
            "torch": torch.__version__}
    out = Path(args.out)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="onnxprune_latacc_") as tmp:
        workdir = Path(tmp)
        data = load_budget_data(args.train_n, 2500, workdir)
        meta["train_n"] = len(data.x_train)

        def emit():
            meta["wall"] = time.perf_counter() - t0
            provenance.write_atomic(out, render(rows, meta))
            provenance.write_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1, default=str))

        for name in args.models.split(","):
            rows.append({"model": name})
            run_model(name, args, data, workdir, rows[-1], emit)
            emit()
    meta["load1"], meta["wall"] = os.getloadavg(), time.perf_counter() - t0
    provenance.write_atomic(out, render(rows, meta))
    provenance.write_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1, default=str))
    print(out.read_text())


if __name__ == "__main__":
    main()
