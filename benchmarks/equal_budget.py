"""Equal-budget comparison: onnxprune's default pipeline vs Torch-Pruning, plus an ablation.

Run through ``benchmarks/quality.py --budget full`` (or ``--budget reduced``);
this module holds that mode. For every demo model, MAC target, epoch count and
seed:

* **onnxprune default**: ``prune()`` with default options (sensitivity
  allocation, ``round_to="auto"``, reconstruction on 512 val images; the
  sensitivity data are the first ``--val-n`` images of the ``val`` split),
  then ``finetune()`` with default options (lr chosen by the pilot,
  ``normalization="auto"``, distillation from the original), ``--val`` = the
  val split, so the best epoch (or the start) is kept by validation.
* **Torch-Pruning**: the trained torch model (zoo architecture with the ONNX
  weights; BatchNorm statistics re-estimated on 1,024 training images with γ/β
  set so the function is unchanged, because the demo checkpoints are not
  shipped), ``MagnitudePruner`` uniform L1, unrounded (``round_to=None``),
  classifier ignored, ``pruning_ratio`` searched to reach onnxprune default's
  achieved MAC reduction (equal MACs); fine-tuned **in torch** with its
  BatchNorm layers training: SGD momentum 0.9, weight decay 5e-4, cosine with
  the same warm-up, batch 64, the same crop+flip, cross-entropy; its lr chosen
  by the same pilot (same candidates, steps and val images), best epoch kept
  by the same val split; exported with ``models/export.py``. Its ratio is
  searched on conv + FC MACs counted in torch (``quality.conv_fc_macs``, the
  convention of ``onnxprune.flops``); runs before 2026-12-02 searched on
  Torch-Pruning's own counter, which also counts BatchNorm and activations. Torch-Pruning
  tries ``round_to`` None, 2, 4, 8 and keeps the first whose reduction lands
  within 2 points of the ask: it mis-traces the zero-padding shortcuts of the
  demo ResNet-20 at some multiples. When its reduction still differs from
  onnxprune's by more than a point, onnxprune's default pipeline runs again at
  Torch-Pruning's reduction (``@ TP's MACs``) and the verdict uses that row.
* ``--decisive-only`` (saves a fine-tuning per pair where Torch-Pruning
  lands more than a point away): onnxprune's default row is pruned and scored
  first and fine-tuned only when it decides the verdict; otherwise only the
  row at Torch-Pruning's MACs is fine-tuned.
* **Ablation** (one model/target, ``--ablation``): the default pipeline with
  one change each: ``normalization="folded"``, ``lr=0.01`` (no pilot),
  no distillation, ``round_to=1``.

Both sides get the same training images (the whole train split, or the first
``--train-n`` of a seeded permutation), the same epochs and the same val split;
top-1 is reported on the **test** split, never used for a choice. MACs are
counted by ``onnxprune.flops`` on each ONNX file.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from benchmarks import provenance  # noqa: E402
from models.fashion_mnist import load_split  # noqa: E402
from onnxprune.api import PruneOptions, prune  # noqa: E402
from onnxprune.finetune import MAX_HOLDOUT, FinetuneOptions, _augment, choose_lr, finetune  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402

log = logging.getLogger("quality")
AT_TP = " @ TP's MACs"  # onnxprune again at Torch-Pruning's achieved reduction when TP cannot hit onnxprune's
EQUAL_GAP = 0.01  # ... i.e. when the two reductions differ by more than one point
TOLERANCE = 0.1  # points: onnxprune default must be >= Torch-Pruning - this (mean over seeds)
ABLATIONS = {  # name -> (prune overrides, finetune overrides, distill)
    "default": ({}, {}, True),
    "normalization folded": ({}, {"normalization": "folded"}, True),
    "lr 0.01 (no pilot)": ({}, {"lr": 0.01}, True),
    "no distillation": ({}, {}, False),
    "round_to 1": ({"round_to": 1}, {}, True),
}
BUDGETS = {
    "full": dict(models=["vgg11", "resnet20", "mobilenetv2"], targets=[0.3, 0.5], epochs=[2, 5], train_n=None, seeds=[0, 1, 2]),
    "reduced": dict(models=["resnet20"], targets=[0.3, 0.5], epochs=[1], train_n=10000, seeds=[0]),
}


@dataclass
class BRow:
    model: str
    target: float
    epochs: int
    seed: int
    pipeline: str  # "onnxprune default", "Torch-Pruning", or an ablation name
    reduction: float = 0.0
    before: float | None = None
    after: float | None = None
    val_start: float | None = None
    val_best: float | None = None
    lr: float | None = None
    pilot: list = field(default_factory=list)
    best_epoch: int | None = None
    normalization: str | None = None
    prune_s: float = 0.0
    ft_s: float = 0.0
    note: str = ""
    latency_cut: float | None = None  # measured batch-1 ORT CPU latency cut of the final ONNX model vs the original


# --------------------------------------------------------------------------- data
@dataclass
class BData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sens_npz: str


def load_budget_data(train_n: int | None, val_n: int, workdir: Path) -> BData:
    x_tr, y_tr = load_split("train")
    if train_n is not None and train_n < len(x_tr):
        idx = np.sort(np.random.default_rng(0).permutation(len(x_tr))[:train_n])
        x_tr, y_tr = np.ascontiguousarray(x_tr[idx]), y_tr[idx]
    x_val, y_val = load_split("val")
    x_te, y_te = load_split("test")
    sens = workdir / f"sens_val{val_n}.npz"
    np.savez(sens, x=x_val[:val_n], y=y_val[:val_n])
    return BData(x_tr, y_tr, x_val, y_val, x_te, y_te, str(sens))


# --------------------------------------------------------------------------- onnxprune side
def onnxprune_run(name, path, original, data: BData, cache, *, target, epochs, seed, variant: str, at: float | None = None,
                  device: str = "cpu", tune: bool = True) -> BRow:
    """One onnxprune row; ``at`` prunes to that reduction instead of ``target`` (the row stays listed under ``target``);
    ``tune=False``: pruned and scored, not fine-tuned (``--decisive-only``)."""
    from benchmarks.quality import macs_params, top1

    prune_over, ft_over, distill = ABLATIONS[variant]
    t0 = time.perf_counter()
    res = prune(path, options=PruneOptions(target_flops=at or target, device="cpu", cache_dir=str(cache), **prune_over), data=data.sens_npz, write=False)
    label = "onnxprune default" if variant == "default" else f"onnxprune, {variant}"
    row = BRow(name, target, epochs, seed, label + (AT_TP if at else ""), prune_s=time.perf_counter() - t0)
    base_macs = macs_params(original)[0]
    row.reduction = 1.0 - macs_params(res.model)[0] / base_macs
    row.before = top1(res.model, data.x_test, data.y_test)
    rt = res.report.round_to
    if not tune:
        row.note = f"round_to {rt}; not fine-tuned (--decisive-only: the row at Torch-Pruning's MACs decides)"
        return row
    opts = FinetuneOptions(epochs=epochs, seed=seed, device=device, **ft_over)
    t0 = time.perf_counter()
    ft = finetune(res.model, data.x_train, data.y_train, val_x=data.x_val, val_y=data.y_val, teacher=original if distill else None, options=opts)
    row.ft_s = time.perf_counter() - t0
    row.after = top1(ft.model, data.x_test, data.y_test)
    row.val_start, row.val_best = _pct(ft.initial_val), _pct(ft.best_val)
    row.lr, row.pilot, row.best_epoch = ft.lr, [[lr, _pct(v)] for lr, v in ft.lr_pilot], ft.best_epoch
    row.normalization = f"{ft.normalization} ({ft.renormalized} convs)" if ft.renormalized else ft.normalization
    row.note = f"round_to {rt}" + (f"; {ft.note}" if ft.note else "")
    row.latency_cut = latency_cut(original, ft.model, data.x_test)
    return row


def _attempt(run, fallback: BRow) -> BRow:
    """``run()``, or ``fallback`` with the error in its note: a benchmark reports a failed row and goes on."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001
        log.exception("%s -%d%% seed %d %s failed", fallback.model, 100 * fallback.target, fallback.seed, fallback.pipeline)
        return dataclasses.replace(fallback, note=f"failed: {type(exc).__name__}: {str(exc)[:200]}")


def _pct(v):
    return None if v is None else 100.0 * v


def latency_cut(original: onnx.ModelProto, final: onnx.ModelProto, x: np.ndarray) -> float | None:
    """Measured latency cut of ``final`` vs ``original`` (batch 1, ORT CPU, every core, interleaved
    rounds): equal MACs are not equal speed (an unrounded plan can be slower than the original)."""
    from onnxprune.latency import measure_pair
    from onnxprune.latency_table import resolve_settings

    try:
        feeds = {original.graph.input[0].name: np.ascontiguousarray(x[:1], dtype=np.float32)}
        return measure_pair(original, final, resolve_settings("cpu", batch=1), feeds, rounds=21, check=False).cut
    except Exception as exc:  # noqa: BLE001 - a benchmark column, not a verdict
        log.warning("latency not measured: %s", exc)
        return None


# --------------------------------------------------------------------------- Torch-Pruning side
def tp_start_model(name: str, original: onnx.ModelProto, data: BData):
    """The zoo torch model with the ONNX weights and BatchNorm statistics re-estimated
    (function unchanged): the best stand-in for the training checkpoint."""
    import torch

    from benchmarks.quality import MODELS, _load_folded, _ort_pred, checkpoint_path, sidecar
    from models.train import build_model

    meta = sidecar(MODELS[name])
    model = build_model(meta["arch"], meta["width"]).eval()
    ckpt = checkpoint_path(meta)
    if ckpt is not None:
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        source = f"checkpoint {ckpt}"
    else:
        _load_folded(model, original)
        _unfold_bn(model, data.x_train[:1024])
        source = "ONNX weights, BatchNorm re-estimated on 1,024 training images (no checkpoint shipped)"
    x = data.x_test[:500]
    with torch.no_grad():
        agree = 100.0 * float((model(torch.from_numpy(x)).argmax(1).numpy() == _ort_pred(original, x)).mean())
    if agree < 99.0:
        raise RuntimeError(f"torch model ({source}) agrees with the ONNX model on only {agree:.1f}% of 500 test images")
    return model, source


def _unfold_bn(model, x: np.ndarray) -> None:
    """Every BatchNorm2d gets the statistics μ, σ² of its input on ``x``; γ and β change so
    the eval function is unchanged (old ``a z + c`` -> γ = a sqrt(σ² + eps), β = c + a μ)."""
    import torch

    stats = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            def hook(mod, inp, _out, stats=stats):
                z = inp[0].detach().double()
                s = stats.setdefault(mod, [0, 0.0, 0.0])
                s[0] += z.numel() // z.shape[1]
                s[1] = s[1] + z.sum((0, 2, 3))
                s[2] = s[2] + (z * z).sum((0, 2, 3))
            hooks.append(m.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), 256):
            model(torch.from_numpy(x[i : i + 256]))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for m, (n, s, ss) in stats.items():
            mean = s / n
            var = (ss / n - mean * mean).clamp_min(0)
            a = m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)  # old BN(z) = a z + c
            c = m.bias.double() - m.running_mean.double() * a
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.weight.copy_(a * torch.sqrt(var + m.eps))
            m.bias.copy_(c + a * mean)


def torch_train(model, data: BData, *, epochs: int, lr: float, seed: int, max_steps: int | None = None,
                x=None, y=None, val=None, select: bool = True, device: str = "cpu"):
    """Plain torch fine-tuning (what a Torch-Pruning user runs), same recipe details as
    ``onnxprune.finetune``: SGD momentum 0.9, wd 5e-4 on conv/linear weights, warm-up
    10% (<= 100 steps) then cosine to 0, batch 64, crop+flip, grad-norm clip 5,
    cross-entropy. Returns ``(model, val top-1 per epoch incl. start, best epoch)``."""
    import torch

    x = data.x_train if x is None else x
    y = data.y_train if y is None else y
    vx, vy = (data.x_val, data.y_val) if val is None else val
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = model.to(device)
    decay = [p for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for n, p in m.named_parameters() if n == "weight"]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}], lr=lr, momentum=0.9)
    bs = 64
    steps = max(1, len(x) // bs)
    steps = min(steps, max_steps or steps)
    total = steps * epochs
    warm = max(1, min(100, total // 10))
    pad = max(1, x.shape[2] // 8)

    def val_acc():
        model.eval()
        with torch.no_grad():
            pred = np.concatenate([model(torch.from_numpy(vx[i : i + 500]).to(device)).argmax(1).cpu().numpy() for i in range(0, len(vx), 500)])
        return 100.0 * float((pred == vy).mean())

    vals = [val_acc() if select else None]
    best_state, best_epoch = copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = rng.permutation(len(x))
        for step in range(steps):
            idx = perm[step * bs : (step + 1) * bs]
            xb = _augment(torch, torch.from_numpy(np.ascontiguousarray(x[idx])).to(device), rng, pad)
            done = (epoch - 1) * steps + step
            for g in opt.param_groups:
                g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * done / total)) * min(1.0, (done + 1) / warm)
            loss = torch.nn.functional.cross_entropy(model(xb), torch.from_numpy(y[idx]).to(device))
            if not math.isfinite(loss.item()):
                model.load_state_dict(best_state)
                return model.eval(), vals, best_epoch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        vals.append(val_acc())
        if not select or vals[-1] > max(v for v in vals[:-1] if v is not None):
            best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    return model.eval().cpu(), vals, best_epoch


def torch_pilot(model, data: BData, *, epochs: int, seed: int, opts: FinetuneOptions, device: str = "cpu") -> tuple[float, list]:
    """The same pilot as ``onnxprune.finetune`` (candidates, steps, slice size, val images)."""
    per_epoch = max(1, len(data.x_train) // opts.batch_size)
    steps = int(min(200, max(30, round(opts.pilot_fraction * per_epoch * epochs)), per_epoch))
    idx = np.sort(np.random.default_rng(seed + 1).permutation(len(data.x_train))[: steps * opts.batch_size])
    px, py = data.x_train[idx], data.y_train[idx]
    val = (data.x_val[:MAX_HOLDOUT], data.y_val[:MAX_HOLDOUT])
    scores, best = [], None
    cands = sorted(opts.lr_candidates)
    queue = list(cands)
    while queue:
        lr = queue.pop(0)
        _, vals, _ = torch_train(copy.deepcopy(model), data, epochs=1, lr=lr, seed=seed, max_steps=steps, x=px, y=py, val=val, select=False,
                                 device=device)
        v = vals[-1]
        scores.append([lr, v if math.isfinite(v) else None])
        best = choose_lr([(a, None if b is None else b / 100.0) for a, b in scores], "top1", len(val[0]))
        if not queue and lr == cands[-1] and best == lr:
            queue.append(3 * lr)
    return best if best is not None else cands[0], scores


def tp_run(name, tmodel, original, data: BData, workdir: Path, *, target, at, epochs, seed, device: str = "cpu") -> BRow:
    from benchmarks.quality import export, macs_params, top1, tp_prune

    t0 = time.perf_counter()
    tried, found = [], []
    ask = at - 0.005  # Torch-Pruning's MACs move in steps too: equal within half a point
    for rt in (None, 2, 4, 8):  # unrounded first; Torch-Pruning mis-traces some couplings (zero-padding shortcuts) at some multiples
        try:
            pm, ratio, tp_red, _ = tp_prune(tmodel, ask, round_to=rt)
        except RuntimeError as exc:
            tried.append(f"round_to {rt}: {str(exc)[:90]}")
            continue
        found.append((abs(tp_red - at), pm, ratio, tp_red, rt))
        if tp_red <= at + 0.02:
            break
        tried.append(f"round_to {rt}: its smallest working ratio {ratio:.3g} gives -{100 * tp_red:.1f}%")
    if not found:
        raise RuntimeError("Torch-Pruning cannot reach the target: " + "; ".join(tried))
    _, pm, ratio, tp_red, rt = min(found, key=lambda f: f[0])
    row = BRow(name, target, epochs, seed, "Torch-Pruning", prune_s=time.perf_counter() - t0)
    pruned = export(pm, workdir / f"{name}_tp_{target}_{seed}_before.onnx")
    row.reduction = 1.0 - macs_params(pruned)[0] / macs_params(original)[0]
    row.before = top1(pruned, data.x_test, data.y_test)
    t0 = time.perf_counter()
    lr, pilot = torch_pilot(pm, data, epochs=epochs, seed=seed, opts=FinetuneOptions(), device=device)
    tuned, vals, best = torch_train(pm, data, epochs=epochs, lr=lr, seed=seed, device=device)
    row.ft_s = time.perf_counter() - t0
    out = export(tuned, workdir / f"{name}_tp_{target}_{seed}.onnx")
    row.after = top1(out, data.x_test, data.y_test)
    row.val_start, row.val_best, row.best_epoch = vals[0], max(vals), best
    row.lr, row.pilot, row.normalization = lr, pilot, "BatchNorm layers (torch)"
    row.note = (f"pruning_ratio {ratio:.4g}, round_to {rt} (-{100 * tp_red:.1f}% conv+FC MACs counted in torch, asked -{100 * at:.1f}%)"
                + (f"; not {', '.join(tried)}" if tried else ""))
    row.latency_cut = latency_cut(original, out, data.x_test)
    return row


# --------------------------------------------------------------------------- report
def _mean(v):
    v = [x for x in v if x is not None]
    return None if not v else float(np.mean(v))


def _f(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def render(rows: list[BRow], meta: dict, final: bool) -> str:
    base = meta["base"]
    lines = [f"# Equal-budget comparison on Fashion-MNIST: onnxprune default vs Torch-Pruning ({meta['budget']} budget)", ""]
    if meta["budget"] == "full" and meta.get("subset"):
        lines += [f"**A SUBSET of the full-budget comparison of issue #16**: {meta['budget_text']}. Rows with fewer than 3 seeds "
                  "are not verdicts for the issue.", ""]
    if meta["budget"] != "full":
        lines += [f"**REDUCED BUDGET, not the full-budget comparison of issue #16**: {meta['budget_text']}. "
                  "The full mode is `python benchmarks/quality.py --budget full` (needs an idle machine).", ""]
    if not final:
        lines += ["**Partial results (run in progress or interrupted).**", ""]
    lines += ["| model | target | epochs | seed | pipeline | MACs reduction | latency change b1 | top-1 before FT | top-1 after FT | vs unpruned | "
              "val start → best | lr (pilot: lr → val) | best epoch | normalization | prune (s) | FT (s) | notes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pilot = ", ".join(f"{lr:g}→{_f(v)}" for lr, v in r.pilot) if r.pilot else "fixed"
        delta = None if r.after is None else r.after - base[r.model]
        lines.append(
            f"| {r.model} | -{100 * r.target:.0f}% | {r.epochs} | {r.seed} | {r.pipeline} | -{100 * r.reduction:.1f}% | "
            f"{'—' if r.latency_cut is None else f'{-100 * r.latency_cut:+.1f}%'} | {_f(r.before)} | "
            f"{_f(r.after)} | {_f(delta, '+.2f')} | {_f(r.val_start)} → {_f(r.val_best)} | {_f(r.lr, 'g')} ({pilot}) | {r.best_epoch} | "
            f"{r.normalization or '—'} | {r.prune_s:.0f} | {r.ft_s:.0f} | {r.note} |")
    lines += ["", "Unpruned test top-1: " + ", ".join(f"{m} {v:.2f}" for m, v in base.items()) + ".", "", "## Verdicts (mean over seeds, test top-1)", ""]
    lines += verdicts(rows) or ["- no complete pair yet"]
    lines += ["", "## Ablation (mean over seeds; each row changes one thing in the default pipeline; "
              "'vs default' against the default rows of the same seeds)", "",
              "| model | target | epochs | variant | seeds | MACs reduction | latency change b1 | top-1 after FT | vs default | val best |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    variants = {"onnxprune default"} | {f"onnxprune, {v}" for v in ABLATIONS if v != "default"}
    keyed = {}
    for r in rows:
        if r.pipeline in variants:
            keyed.setdefault((r.model, r.target, r.epochs, r.pipeline), []).append(r)
    for (m, t, e, p), rs in keyed.items():
        if not any(k[:3] == (m, t, e) and k[3] != "onnxprune default" for k in keyed):
            continue
        seeds = {r.seed for r in rs}  # against the default rows of the same seeds
        d = [r for r in keyed.get((m, t, e, "onnxprune default"), []) if r.seed in seeds and r.after is not None]
        diff = None if not d else _mean([r.after for r in rs]) - _mean([r.after for r in d])
        lat = _mean([r.latency_cut for r in rs])
        lines.append(f"| {m} | -{100 * t:.0f}% | {e} | {p.replace('onnxprune, ', '')} | {len(rs)} | -{100 * _mean([r.reduction for r in rs]):.1f}% | "
                     f"{'—' if lat is None else f'{-100 * lat:+.1f}%'} | "
                     f"{_f(_mean([r.after for r in rs]))} | {_f(diff, '+.2f') if p != 'onnxprune default' else '—'} | {_f(_mean([r.val_best for r in rs]))} |")
    lines += ["", "## Setup", ""] + [f"- {k}: {v}" for k, v in meta["setup"].items()]
    lines += ["", f"Total wall time {time.perf_counter() - meta['t0']:.0f} s."]
    return "\n".join(lines) + "\n"


def verdicts(rows: list[BRow]) -> list[str]:
    out = []
    keys = sorted({(r.model, r.target, r.epochs) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for m, t, e in keys:
        ox = [r for r in rows if (r.model, r.target, r.epochs, r.pipeline) == (m, t, e, "onnxprune default") and r.after is not None]
        tp = [r for r in rows if (r.model, r.target, r.epochs, r.pipeline) == (m, t, e, "Torch-Pruning") and r.after is not None]
        eq = [r for r in rows if (r.model, r.target, r.epochs, r.pipeline) == (m, t, e, "onnxprune default" + AT_TP) and r.after is not None]
        if not tp or not (ox or eq):  # with --decisive-only the default row may be untuned when the row at TP's MACs decides
            continue
        label = "onnxprune default"
        if eq:  # Torch-Pruning could not reach onnxprune's reduction: compare at Torch-Pruning's
            ox, label = eq, "onnxprune default" + AT_TP
        a, b = _mean([r.after for r in ox]), _mean([r.after for r in tp])
        ok = "MET" if a >= b - TOLERANCE else "MISSED"
        out.append(f"- **{ok}** {m} -{100 * t:.0f}%, {e} epoch(s): {label} {a:.2f} (seeds {[r.seed for r in ox]}, -{100 * _mean([r.reduction for r in ox]):.1f}% MACs) "
                   f"vs Torch-Pruning {b:.2f} (seeds {[r.seed for r in tp]}, -{100 * _mean([r.reduction for r in tp]):.1f}% MACs): {a - b:+.2f} points "
                   f"(goal >= -{TOLERANCE}){'' if len(ox) >= 3 else '; fewer than 3 seeds, not a verdict for issue #16'}"
                   + _latency_text(ox, tp) + ".")
    return out


def _latency_text(ox: list[BRow], tp: list[BRow]) -> str:
    a, b = [r.latency_cut for r in ox if r.latency_cut is not None], [r.latency_cut for r in tp if r.latency_cut is not None]
    if not a or not b:
        return ""
    return f"; measured latency change (batch 1) {-100 * _mean(a):+.1f}% vs {-100 * _mean(b):+.1f}%"


def combine(args) -> None:
    """``quality.py --budget-combine A.json B.json``: the verdicts over the rows of several budget runs
    (each JSON written with ``--json``; its setup, or for older files the ``.md`` of the same run,
    gives the command and commit copied into the setup), e.g. seed 0 of every model and seeds 1-2 of the rows that decide.
    Each pair (model, target, epochs, seed: onnxprune's rows, Torch-Pruning's, the ablation) comes
    whole from the first file that holds it, so a rerun listed first replaces an older run's pair
    and rows of two runs never mix within a pair."""
    from benchmarks.quality import DEMO, MODELS, top1

    t0 = time.perf_counter()
    prov = provenance.start(script="benchmarks/quality.py", argv=sys.argv[1:])
    rows, owner, sources = [], {}, {}
    for j in map(Path, args.budget_combine):
        saved = json.loads(j.read_text())  # {"setup", "rows"}; files written before the setup was kept: the rows alone
        dropped = set()
        for d in saved["rows"] if isinstance(saved, dict) else saved:
            r = BRow(**d)
            pair = (r.model, r.target, r.epochs, r.seed)
            if owner.setdefault(pair, j) == j:
                rows.append(r)
            else:
                dropped.add(f"{r.model} -{100 * r.target:.0f}% seed {r.seed}")
        dropped = sorted(dropped)
        if isinstance(saved, dict):
            keep = [f"{k}: {saved['setup'][k]}" for k in ("command", "source", "date") if k in saved["setup"]]
        else:  # the command and commit are in the .md of the same run
            md = j.with_suffix(".md")
            keep = [ln[2:] for ln in md.read_text().splitlines() if ln.startswith(("- command:", "- source:", "- date:"))] if md.is_file() else []
        sources[f"rows from {j.name}"] = ("; ".join(keep) or "(no .md beside it: command and commit unknown)") + (
            f"; its pairs {', '.join(dropped)} come from a file listed earlier" if dropped else "")
    x_te, y_te = load_split("test")
    models = sorted({r.model for r in rows})
    meta = {
        "budget": "full", "subset": True, "t0": t0, "base": {m: top1(load_model(DEMO / f"{MODELS[m]}.onnx"), x_te, y_te) for m in models},
        "budget_text": f"{len(rows)} rows of {len(sources)} runs combined: models {models}; seeds {sorted({r.seed for r in rows})}; "
                       f"epochs {sorted({r.epochs for r in rows})}",
        "setup": {"command": f"`{prov.command}`", "source": f"onnxprune commit {prov.commit} (this combination; the runs' own below)",
                  "date": f"{prov.started:%Y-%m-%d %H:%M} UTC", **sources},
    }
    out = args.out or (ROOT / "benchmarks" / "results" / "quality_equal_budget_combined.md")
    provenance.write_atomic(out, render(rows, meta, True))
    print(Path(out).read_text())


def _commit() -> str:
    try:
        h = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return h + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_budget(args) -> None:
    """``quality.py --budget full|reduced``; see the module docstring."""
    import tempfile
    import warnings

    import onnxruntime
    import torch
    import torch_pruning

    from benchmarks.quality import DEMO, MODELS, top1

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    cfg = dict(BUDGETS[args.budget])
    for key, arg in (("models", "models"), ("targets", "targets"), ("seeds", "seeds"), ("epochs", "budget_epochs")):
        if getattr(args, arg, None):
            cfg[key] = getattr(args, arg)
    if args.budget_train_n is not None:
        cfg["train_n"] = args.budget_train_n or None
    out = args.out or (ROOT / "benchmarks" / "results" / f"quality_equal_budget_{args.budget}.md")
    abl = args.ablation or f"{cfg['models'][0]}:{cfg['targets'][0]}"
    abl_model, abl_target = (None, None) if abl == "none" else (abl.split(":")[0], float(abl.split(":")[1]))
    abl_variants = [v for v in (args.ablation_variants.split(",") if getattr(args, "ablation_variants", None) else ABLATIONS) if v != "default"]
    unknown = [v for v in abl_variants if v not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown --ablation-variants {unknown}; choose from {sorted(ABLATIONS)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxprune_budget_") as tmp:
        workdir = Path(tmp)
        data = load_budget_data(cfg["train_n"], args.val_n, workdir)
        train_text = f"{len(data.x_train):,} training images" + ("" if cfg["train_n"] is None else " (seeded random subset of the 55,000-image train split)")
        meta = {
            "budget": args.budget, "t0": t0, "base": {}, "subset": any(cfg[k] != BUDGETS[args.budget][k] for k in cfg) or abl_model is None or len(abl_variants) < len(ABLATIONS) - 1,
            "budget_text": f"{', '.join(cfg['models'])}; targets {cfg['targets']}; {train_text}; epochs {cfg['epochs']}; seeds {cfg['seeds']}; "
                           + (f"ablation on {abl_model} -{100 * abl_target:.0f}% ({', '.join(abl_variants)})"
                              + (f", seeds {args.ablation_seeds}" if args.ablation_seeds else "") if abl_model else "no ablation rows (--ablation none)"),
            "setup": {
                "command": "`python benchmarks/quality.py " + " ".join(sys.argv[1:]) + "`",
                "source": f"onnxprune commit {_commit()} (working tree at the start of the run)",
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs unless stated); torch {args.threads} thread(s); "
                           f"training on {args.device}",
                "versions": f"python {platform.python_version()}, torch {torch.__version__}, torch-pruning {torch_pruning.__version__}, "
                            f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}",
                "data": f"train: {train_text}; selection (lr pilot, best epoch): the 5,000-image val split (last 5,000 of the training file), "
                        f"pilot scored on all of it; sensitivity: its first {args.val_n}; reported: the 10,000-image test split",
                "seeds": f"{cfg['seeds']} (fine-tuning seed: batch order, augmentation, pilot slice; pruning is deterministic); "
                         "training subset: seed 0",
                "budget": f"epochs {cfg['epochs']}, batch 64, same images and epochs for both pipelines; each pipeline's lr pilot "
                          "(3 candidates x 10% of the run's steps, 30..200) is extra and included in FT (s)",
            },
        }
        rows: list[BRow] = []

        def emit(final=False):
            out.parent.mkdir(parents=True, exist_ok=True)
            provenance.write_atomic(out, render(rows, meta, final))
            if args.json:
                provenance.write_atomic(args.json, json.dumps({"setup": meta["setup"], "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))

        models = {}
        for name in cfg["models"]:
            path = DEMO / f"{MODELS[name]}.onnx"
            original = load_model(path)
            meta["base"][name] = top1(original, data.x_test, data.y_test)
            tmodel, source = tp_start_model(name, original, data)
            meta["setup"][f"Torch-Pruning start ({name})"] = source
            models[name] = (path, original, tmodel, workdir / f"cache_{name}")
        for seed in cfg["seeds"]:  # seed outermost: an interrupted run still has whole seeds
            for name, (path, original, tmodel, cache) in models.items():
                for target in cfg["targets"]:
                    for epochs in cfg["epochs"]:
                        abl_here = (name, target) == (abl_model, abl_target) and (not args.ablation_seeds or seed in args.ablation_seeds)
                        variants = ["default", *abl_variants] if abl_here else ["default"]
                        default_row = None
                        for variant in variants:
                            deferred = variant == "default" and args.decisive_only  # fine-tuned below only if it decides
                            r = _attempt(lambda: onnxprune_run(name, path, original, data, cache, target=target, epochs=epochs, seed=seed,
                                                               variant=variant, device=args.device, tune=not deferred),
                                         BRow(name, target, epochs, seed, f"onnxprune, {variant}"))
                            rows.append(r)
                            log.info("%s -%d%% %de s%d %s: -%.1f%% MACs, %s -> %s (lr %s, %s), %.0f+%.0fs", name, 100 * target, epochs, seed,
                                     r.pipeline, 100 * r.reduction, _f(r.before), _f(r.after), r.lr, r.normalization, r.prune_s, r.ft_s)
                            emit()
                            if variant == "default":
                                default_row = r
                                t = _attempt(lambda: tp_run(name, tmodel, original, data, workdir, target=target, at=max(target, default_row.reduction),
                                                            epochs=epochs, seed=seed, device=args.device),
                                             BRow(name, target, epochs, seed, "Torch-Pruning"))
                                rows.append(t)
                                log.info("%s -%d%% %de s%d TP: -%.1f%% MACs, %s -> %s (lr %s), %.0fs", name, 100 * target, epochs, seed,
                                         100 * t.reduction, _f(t.before), _f(t.after), t.lr, t.ft_s)
                                emit()
                                at_tp = t.after is not None and abs(t.reduction - default_row.reduction) > EQUAL_GAP
                                if deferred and not at_tp:  # equal MACs after all (or no Torch-Pruning row): the default row decides, so tune it
                                    rows[rows.index(default_row)] = _attempt(
                                        lambda: onnxprune_run(name, path, original, data, cache, target=target, epochs=epochs, seed=seed,
                                                              variant="default", device=args.device),
                                        BRow(name, target, epochs, seed, "onnxprune default"))
                                    emit()
                                if at_tp:
                                    e = _attempt(lambda: onnxprune_run(name, path, original, data, cache, target=target, epochs=epochs, seed=seed,
                                                                       variant="default", at=round(t.reduction, 4), device=args.device),
                                                 BRow(name, target, epochs, seed, "onnxprune default" + AT_TP))
                                    rows.append(e)
                                    log.info("%s -%d%% at TP's MACs: -%.1f%%, %s -> %s", name, 100 * target, 100 * e.reduction, _f(e.before), _f(e.after))
                                    emit()
        emit(final=True)
    print(out.read_text())
    print(f"wrote {out}", file=sys.stderr)
