"""Accuracy of pruned Fashion-MNIST models before and after a fixed fine-tuning budget.

For every trained demo model present (``models/demo/fmnist_vgg11.onnx``, and
``fmnist_resnet20.onnx`` / ``fmnist_mobilenetv2.onnx`` when they exist) and
every MAC target, this compares

* onnxprune ``uniform`` allocation with the L1, FPGM and BN-scale criteria,
* onnxprune ``sensitivity`` (ACRA threshold) and ``cost-aware`` allocation (L1),
* Torch-Pruning 1.6 (``MagnitudePruner`` + ``MagnitudeImportance(p=1)``,
  ``global_pruning=False``, ``round_to=8``, classifier ignored) on the same
  trained torch checkpoint, ``pruning_ratio`` searched (scan + bisection) for
  the smallest ratio whose MAC reduction (conv + FC MACs counted in torch by
  :func:`conv_fc_macs`, the convention of ``onnxprune.flops``) reaches the target,
* when Torch-Pruning's rounding lands far from the target, onnxprune again at
  Torch-Pruning's achieved MACs, so the two are also compared at equal MACs.

Protocol (nothing is selected on the test data):

* sensitivity is measured on the first ``--val-n`` images of the ``val`` split
  (top-1 drop per group and ratio);
* top-1 is reported on the first ``--test-n`` images of the ``test`` split;
* every fine-tuned row gets the same budget: :func:`onnxprune.finetune.finetune`
  for ``--epochs`` epochs on the same ``--train-n`` random training images,
  SGD (momentum 0.9, wd 5e-4), lr 0.01 cosine to 0, batch 64, crop+flip,
  distillation from the unpruned model (T=4, weight 0.5), final weights kept
  (no validation-based selection). The Torch-Pruning model is exported to ONNX
  with ``models/export.py`` (legacy exporter, like the demo models) and
  fine-tuned by the same function, so only the removed channels differ;
* MACs and params of every row are counted by :mod:`onnxprune.flops` on the
  ONNX file (Conv + Gemm multiply-accumulates, no bias/BN/activations).

The BN-scale criterion needs BatchNormalization nodes, which the exporters fold
into the convs; the script exports the checkpoint a second time with BN kept
(``TrainingMode.PRESERVE``), prunes that graph with ``criterion="bn"`` and
re-applies the resulting plan (same groups, same kept channels) to the folded
demo model, so it is fine-tuned exactly like the other rows.

    python benchmarks/quality.py                 # full run, writes benchmarks/results/quality.md
    python benchmarks/quality.py --quick         # smoke test, < 3 min, writes /tmp/onnxprune_quality_quick.md
    python benchmarks/quality.py --models vgg11 --targets 0.3 --epochs 2 --train-n 8000
    python benchmarks/quality.py --budget full      # equal budget vs Torch-Pruning + ablation (benchmarks/equal_budget.py)
    python benchmarks/quality.py --budget reduced   # the same, ResNet-20, 10k images, 1 epoch, 1 seed

Torch runs single-threaded by default (``--threads``): on the shared 2-core
machine this was ~5x faster than 2 threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from models.fashion_mnist import load_split  # noqa: E402
from onnxprune.api import PruneOptions, prune  # noqa: E402
from onnxprune.finetune import FinetuneOptions, finetune  # noqa: E402
from onnxprune.flops import count  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402
from onnxprune.plan import PruningPlan  # noqa: E402

from benchmarks import provenance  # noqa: E402

DEMO = ROOT / "models" / "demo"
RESULTS = ROOT / "benchmarks" / "results" / "quality.md"
MODELS = {  # short name -> demo file stem
    "vgg11": "fmnist_vgg11",
    "resnet20": "fmnist_resnet20",
    "mobilenetv2": "fmnist_mobilenetv2",
}
GOALS = {0.3: 0.3, 0.5: 1.0}  # target -> max top-1 loss (points) after fine-tuning
EQUAL_MACS_GAP = 0.015  # add "at TP's MACs" rows when TP misses onnxprune's reduction by more than this

log = logging.getLogger("quality")


# --------------------------------------------------------------------------- data / evaluation
@dataclass
class Data:
    x_test: np.ndarray
    y_test: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    val_npz: str  # sensitivity data (val split subset), as a file for prune(data=...)


def load_data(args, workdir: Path) -> Data:
    x_te, y_te = load_split("test", n=args.test_n)
    x_tr, y_tr = load_split("train")
    idx = np.sort(np.random.default_rng(0).choice(len(x_tr), size=args.train_n, replace=False))
    x_val, y_val = load_split("val", n=args.val_n)
    val_npz = workdir / f"val{args.val_n}.npz"
    np.savez(val_npz, x=x_val, y=y_val)
    return Data(x_te, y_te, np.ascontiguousarray(x_tr[idx]), y_tr[idx], str(val_npz))


def top1(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i : i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])
    return 100.0 * float((pred == y).mean())


def macs_params(model: onnx.ModelProto) -> tuple[int, int]:
    c = count(model)
    return c.total_macs, c.total_params


# --------------------------------------------------------------------------- torch side
def sidecar(stem: str) -> dict:
    p = DEMO / f"{stem}.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def checkpoint_path(meta: dict) -> Path | None:
    """The ``--save-pt`` path of the sidecar's training command, if that file exists."""
    argv = shlex.split(meta.get("command", ""))
    for i, a in enumerate(argv[:-1]):
        if a == "--save-pt":
            p = Path(argv[i + 1])
            p = p if p.is_absolute() else ROOT / p
            return p if p.is_file() else None
    return None


def torch_model(meta: dict, onnx_model: onnx.ModelProto, data: Data):
    """The trained torch model: the checkpoint when present, else the ONNX weights
    copied into the zoo architecture (BN folded -> identity BN). Returns
    ``(model, source)``; ``(None, reason)`` when neither reproduces the ONNX model."""
    import torch

    from models.train import build_model

    model = build_model(meta["arch"], meta["width"]).eval()
    ckpt = checkpoint_path(meta)
    if ckpt is not None:
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        source = f"checkpoint {ckpt}"
    else:
        _load_folded(model, onnx_model)
        source = "ONNX weights (BN folded into convs)"
    x = data.x_test[:500]
    with torch.no_grad():
        pt = model(torch.from_numpy(x)).argmax(1).numpy()
    agree = 100.0 * float((pt == _ort_pred(onnx_model, x)).mean())
    if agree < 99.0:
        return None, f"torch model from {source} agrees with the ONNX model on only {agree:.1f}% of 500 test images"
    return model, source


def _ort_pred(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)


def _load_folded(model, onnx_model: onnx.ModelProto) -> None:
    """Copy folded Conv/Gemm weights (graph order) into Conv2d/Linear modules (module
    order); BN layers become identities carrying the folded bias."""
    import torch
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    nodes = [n for n in onnx_model.graph.node if n.op_type in ("Conv", "Gemm")]
    mods = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    bns = {}
    prev = None
    for m in model.modules():  # BN following each conv, in module order
        if isinstance(m, torch.nn.Conv2d):
            prev = m
        elif isinstance(m, torch.nn.BatchNorm2d) and prev is not None:
            bns[prev] = m
            prev = None
    if len(nodes) != len(mods):
        raise RuntimeError(f"{len(nodes)} Conv/Gemm nodes but {len(mods)} Conv2d/Linear modules")
    with torch.no_grad():
        for n, m in zip(nodes, mods):
            w = torch.from_numpy(init[n.input[1]].copy())
            m.weight.copy_(w if w.shape == m.weight.shape else w.T)
            b = torch.from_numpy(init[n.input[2]].copy()) if len(n.input) > 2 and n.input[2] in init else None
            if isinstance(m, torch.nn.Linear) or m not in bns:
                if b is not None:
                    m.bias.copy_(b)
                continue
            bn = bns[m]
            bn.weight.fill_(1.0)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.bias.copy_(b if b is not None else torch.zeros_like(bn.bias))


def export(model, path: Path, *, keep_bn: bool = False) -> onnx.ModelProto:
    """Legacy export like the demo models; ``keep_bn`` keeps BatchNormalization nodes."""
    import torch

    from models.export import export_onnx

    if not keep_bn:
        export_onnx(model, path, input_shape=(1, 1, 32, 32), exporter="legacy")
        return load_model(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (torch.zeros(1, 1, 32, 32),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        )
    return load_model(path)


def conv_fc_macs(model, ex) -> int:
    """Conv + Linear multiply-accumulates of one forward pass of ``model`` on ``ex`` per image (the
    convention of ``onnxprune.flops``: no bias, BatchNorm or activations)."""
    import torch

    total = [0]

    def conv(mod, _inp, out):
        total[0] += out.numel() // out.shape[0] * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    def linear(mod, _inp, out):
        total[0] += out.numel() // out.shape[0] * mod.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(ex)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total[0]


def tp_prune(model, target: float, round_to: int = 8):
    """Torch-Pruning uniform L1: smallest ``pruning_ratio`` whose MAC reduction reaches
    ``target`` (scan in steps of 0.02, then bisection inside the first crossing step).
    Reductions are conv + FC multiply-accumulates counted in torch (:func:`conv_fc_macs`, the
    convention of ``onnxprune.flops``), not Torch-Pruning's own counter, which also counts
    BatchNorm, activations and adds (20% more on the demo MobileNetV2), so equal MACs are equal on
    both sides. Returns ``(pruned model, ratio, reduction, seconds)``."""
    import torch
    import torch_pruning as tp

    t0 = time.perf_counter()
    ex = torch.zeros(1, 1, 32, 32)
    base = conv_fc_macs(model, ex)
    # the classifier (last Linear), found by position in each deep copy
    head_idx = [i for i, m in enumerate(model.modules()) if isinstance(m, torch.nn.Linear)][-1]

    def run(ratio: float):
        m = copy.deepcopy(model)
        ignored = [x for i, x in enumerate(m.modules()) if i == head_idx]
        pruner = tp.pruner.MagnitudePruner(
            m, ex, importance=tp.importance.MagnitudeImportance(p=1), global_pruning=False,
            pruning_ratio=float(ratio), ignored_layers=ignored, round_to=round_to,
        )
        pruner.step()
        return m, 1.0 - conv_fc_macs(m, ex) / base

    broken: list[str] = []
    best_seen = 0.0

    def safe(ratio: float):
        """``run`` or ``(None, -1)`` when the pruned model no longer runs (Torch-Pruning
        mis-traced a coupling, e.g. a zero-padding shortcut)."""
        nonlocal best_seen
        try:
            m, red = run(ratio)
        except Exception as exc:  # noqa: BLE001
            broken.append(f"{ratio:.3f} ({str(exc)[:60]})")
            return None, -1.0
        best_seen = max(best_seen, red)
        return m, red

    lo, found = 0.0, None
    for r in np.arange(0.02, 0.96, 0.02):
        m, red = safe(r)
        if red >= target:
            found = (float(r), m, red)
            break
        lo = float(r)
    if found is None:
        raise RuntimeError(
            f"Torch-Pruning's uniform search (round_to {round_to}) reaches at most -{100 * best_seen:.1f}% MACs, not -{100 * target:.0f}%; "
            f"{len(broken)} of 47 ratios gave a model that no longer runs, e.g. {broken[0] if broken else '-'}"
        )
    hi, best, best_red = found
    for _ in range(8):
        mid = 0.5 * (lo + hi)
        m, red = safe(mid)
        if red >= target:
            hi, best, best_red = mid, m, red
        else:
            lo = mid
    return best.eval(), hi, best_red, time.perf_counter() - t0


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    model: str
    target: float
    method: str
    pruned: onnx.ModelProto | None = field(repr=False, default=None)
    reduction: float = 0.0
    params: int = 0
    before: float | None = None
    after: float | None = None
    prune_s: float = 0.0
    ft_s: float | None = None
    note: str = ""
    finetune: bool = True
    group: str = "onnxprune"  # onnxprune | tp | equal

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "pruned"}


def onnxprune_row(name, target, method, path, data, cache, *, strategy, criterion, round_to=8, finetune_it=True, group="onnxprune", **extra):
    """One ``prune()`` call, the default pipeline (which calibrates on ``data`` unless ``calibrate=0``)."""
    t0 = time.perf_counter()
    res = prune(
        path,
        options=PruneOptions(target_flops=target, strategy=strategy, criterion=criterion, round_to=round_to, cache_dir=str(cache), device="cpu", **extra),
        data=data.val_npz,
        write=False,
    )
    row = Row(name, target, method, res.model, prune_s=time.perf_counter() - t0, finetune=finetune_it, group=group)
    cached = res.report.detail.get("sensitivity_cached_groups")
    if cached:
        row.note = "sensitivity analysis reused from the cache"
    return row


def bn_row(name, target, folded_path, unfolded_path, data, cache, workdir, *, round_to=8, finetune_it):
    """BN-scale criterion on the BN-preserving export; plan re-applied to the folded model."""
    t0 = time.perf_counter()
    res = prune(unfolded_path, options=PruneOptions(target_flops=target, strategy="uniform", criterion="bn", round_to=round_to, device="cpu"), write=False)
    folded = load_model(folded_path)
    from onnxprune.groups import find_groups

    cg = find_groups(folded)
    plan = res.plan.to_dict()
    ids = {g.id: g for g in cg.groups}
    for gp in plan["groups"]:
        g = ids[gp["id"]]
        if g.channels != gp["channels"]:
            raise RuntimeError(f"group {gp['id']}: {gp['channels']} channels in the BN export, {g.channels} in the demo model")
        gp["producers"] = list(g.producers)
    plan_path = workdir / f"{name}_bn_{target}.plan.json"
    PruningPlan.from_dict(plan).save(plan_path)
    # same data as the other rows, so the default calibration runs here too
    res2 = prune(folded_path, options=PruneOptions(target_flops=target, round_to=round_to, device="cpu"), plan=plan_path, data=data.val_npz, write=False)
    return Row(name, target, "onnxprune uniform, BN scale", res2.model, prune_s=time.perf_counter() - t0, finetune=finetune_it)


def finish(row: Row, base_macs: int, original: onnx.ModelProto, data: Data, ft_opts: FinetuneOptions) -> Row:
    m, p = macs_params(row.pruned)
    row.reduction, row.params = 1.0 - m / base_macs, p
    row.before = top1(row.pruned, data.x_test, data.y_test)
    if row.finetune:
        t0 = time.perf_counter()
        res = finetune(row.pruned, data.x_train, data.y_train, teacher=original, options=ft_opts)
        row.ft_s = time.perf_counter() - t0
        row.after = top1(res.model, data.x_test, data.y_test)
    log.info("%s %s %s: -%.1f%% MACs, top-1 %.2f -> %s (%.0fs + %ss)", row.model, row.target, row.method, 100 * row.reduction,
             row.before, "-" if row.after is None else f"{row.after:.2f}", row.prune_s, "-" if row.ft_s is None else f"{row.ft_s:.0f}")
    row.pruned = None
    return row


FT_SETS = {  # "all": every row except "sensitivity @ TP's MACs" (before FT only); "all-equal": that one too
    "all": None,
    "all-equal": None,
    "required": {"onnxprune uniform, L1", "onnxprune sensitivity, L1", "onnxprune cost-aware, L1", "Torch-Pruning uniform, L1",
                 "onnxprune uniform, L1, no calibration"},
    "best": {"onnxprune uniform, L1", "onnxprune cost-aware, L1", "Torch-Pruning uniform, L1"},  # for larger budgets
}


def choose_round_to(path, target: float) -> tuple[int, str]:
    """8, or the largest smaller multiple (4, 2, 1) at which onnxprune can reach ``target``
    (small groups cannot shrink at 8); the same value is then used by every method."""
    from onnxprune.errors import TargetError

    first = None
    for rt in (8, 4, 2, 1):
        try:
            prune(path, options=PruneOptions(target_flops=target, strategy="uniform", round_to=rt, device="cpu"), write=False)
        except TargetError as exc:
            first = first or str(exc).split(". To fix")[0].split(" (")[0]
            continue
        return rt, "" if rt == 8 else f"round_to {rt} for every method here: at round_to 8 onnxprune says '{first}'"
    raise RuntimeError(f"target {target} unreachable even at round_to 1")


def pick_lr(name, path, original, data: Data, ft_opts: FinetuneOptions, args, tmodel, workdir: Path) -> tuple[float, dict]:
    """Learning rate for every fine-tuning run of this model: the best of ``args.lr_grid`` by
    mean **val** top-1 after one epoch on the first ``args.pilot_n`` fine-tuning images, over two
    starting points at the first target: onnxprune's default uniform-L1 model (calibrated) and
    Torch-Pruning's model (not calibrated), so the lr suits both kinds of start."""
    if len(args.lr_grid) == 1:
        return args.lr_grid[0], {}
    target = args.targets[0]
    rt, _ = choose_round_to(path, target)
    starts = [prune(path, options=PruneOptions(target_flops=target, strategy="uniform", criterion="l1", round_to=rt, device="cpu"),
                    data=data.val_npz, write=False).model]
    if tmodel is not None:
        try:
            starts.append(export(tp_prune(tmodel, target, round_to=rt)[0], workdir / "pilot_tp.onnx"))
        except RuntimeError as exc:
            log.info("%s: lr pilot without a Torch-Pruning start (%s)", name, exc)
    with np.load(data.val_npz, allow_pickle=False) as d:
        vx, vy = d["x"], d["y"]
    n = min(args.pilot_n, len(data.x_train))
    scores = {}
    for lr in args.lr_grid:
        opts = replace(ft_opts, lr=lr, epochs=1)
        accs = [top1(finetune(m, data.x_train[:n], data.y_train[:n], teacher=original, options=opts).model, vx, vy) for m in starts]
        scores[lr] = accs
        log.info("%s: lr pilot %g -> val top-1 %s", name, lr, " / ".join(f"{a:.2f}" for a in accs))
    best = max(scores, key=lambda lr: (float(np.mean(scores[lr])), lr))
    return best, scores


def bench_model(name: str, args, data: Data, ft_opts: FinetuneOptions, workdir: Path, emit) -> list[Row]:
    stem = MODELS[name]
    path = DEMO / f"{stem}.onnx"
    original = load_model(path)
    base_macs, base_params = macs_params(original)
    base_acc = top1(original, data.x_test, data.y_test)
    meta = sidecar(stem)
    cache = workdir / f"cache_{name}"
    rows = [Row(name, 0.0, "unpruned", params=base_params, before=base_acc, finetune=False, group="ref")]
    emit(rows)
    tmodel, source = (torch_model(meta, original, data) if meta else (None, "no JSON sidecar with the architecture"))
    t0 = time.perf_counter()
    lr, pilot = pick_lr(name, path, original, data, ft_opts, args, tmodel, workdir)
    ft_opts = replace(ft_opts, lr=lr)
    args.model_info[name] = {"lr": lr, "pilot": pilot, "pilot_s": time.perf_counter() - t0, "macs": base_macs, "torch": source,
                             "pilot_n": min(args.pilot_n, len(data.x_train))}
    log.info("%s: unpruned top-1 %.2f, %d MACs, lr %g; torch model: %s", name, base_acc, base_macs, lr,
             source if tmodel is not None else f"unavailable ({source})")
    unfolded = None
    if tmodel is not None:
        unfolded = workdir / f"{stem}.bn.onnx"
        export(tmodel, unfolded, keep_bn=True)
    wanted = FT_SETS[args.ft]

    def ft(method: str) -> bool:
        return wanted is None or method in wanted

    def add(trows: list[Row], make, method: str, target: float) -> None:
        """Append the row ``make()`` builds, fine-tuned/evaluated; a failure becomes a row with the reason."""
        try:
            r = make()
            if r.before is None and r.pruned is None:
                trows.append(r)
            else:
                trows.append(finish(r, base_macs, original, data, ft_opts))
        except Exception as exc:  # noqa: BLE001 - a benchmark reports failures and goes on
            log.exception("%s %s %s failed", name, target, method)
            trows.append(Row(name, target, method, note=f"failed: {type(exc).__name__}: {str(exc)[:300]}", finetune=False))
        emit(rows + trows)

    for target in args.targets:
        trows: list[Row] = []
        rt, rt_note = choose_round_to(path, target)
        if rt_note:
            args.model_info[name].setdefault("notes", []).append(f"{name} -{100 * target:.0f}%: {rt_note}")
        for method, strategy in (("onnxprune uniform, L1", "uniform"), ("onnxprune sensitivity, L1", "sensitivity"),
                                 ("onnxprune cost-aware, L1", "cost-aware")):
            add(trows, lambda: onnxprune_row(name, target, method, path, data, cache, strategy=strategy, criterion="l1",
                                             round_to=rt, finetune_it=ft(method)), method, target)
        method = "onnxprune uniform, L1, no calibration"
        add(trows, lambda: onnxprune_row(name, target, method, path, data, cache, strategy="uniform", criterion="l1", round_to=rt,
                                         finetune_it=ft(method), calibrate=0), method, target)
        method = "Torch-Pruning uniform, L1"

        def tp_row():
            if tmodel is None:
                return Row(name, target, method, note=f"skipped: {source}", finetune=False, group="tp")
            pm, ratio, tp_red, tp_s = tp_prune(tmodel, target, round_to=rt)
            t0 = time.perf_counter()
            pruned = export(pm, workdir / f"{stem}.tp{int(target * 100)}.onnx")
            return Row(name, target, method, pruned, prune_s=tp_s + time.perf_counter() - t0, finetune=ft(method), group="tp",
                       note=f"pruning_ratio {ratio:.4g} (-{100 * tp_red:.1f}% conv+FC MACs counted in torch)")

        add(trows, tp_row, method, target)
        ref = trows[0].reduction if trows[0].before is not None else None
        if trows[-1].before is not None and ref is not None and abs(trows[-1].reduction - ref) > EQUAL_MACS_GAP:
            at = round(trows[-1].reduction, 4)
            for m2, strategy in (("onnxprune uniform, L1", "uniform"), ("onnxprune sensitivity, L1", "sensitivity")):
                def eq_row(m2=m2, strategy=strategy):
                    r = onnxprune_row(name, at, f"{m2} @ TP's MACs", path, data, cache, strategy=strategy, criterion="l1", round_to=rt,
                                      finetune_it=strategy == "uniform" or args.ft == "all-equal", group="equal")
                    r.target = target  # listed under the nominal target
                    r.note = (r.note + "; " if r.note else "") + f"target -{100 * at:.1f}% = Torch-Pruning's achieved reduction"
                    return r

                add(trows, eq_row, f"{m2} @ TP's MACs", target)
        method = "onnxprune uniform, FPGM"
        add(trows, lambda: onnxprune_row(name, target, method, path, data, cache, strategy="uniform", criterion="fpgm", round_to=rt,
                                         finetune_it=ft(method)), method, target)
        method = "onnxprune uniform, BN scale"

        def bn():
            if unfolded is None:
                return Row(name, target, method, note=f"skipped: no BN graph ({source})", finetune=False)
            return bn_row(name, target, path, unfolded, data, cache, workdir, round_to=rt, finetune_it=ft(method))

        add(trows, bn, method, target)
        rows.extend(trows)
        emit(rows)
    return rows


# --------------------------------------------------------------------------- report
def fmt(v, spec=".2f", empty="—"):
    return empty if v is None else format(v, spec)


def table(rows: list[Row]) -> list[str]:
    base = {r.model: r.before for r in rows if r.group == "ref"}
    out = [
        "| model | target | method | MACs reduction | params | top-1 before FT | top-1 after FT | delta vs unpruned | prune (s) | FT (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.group == "ref":
            out.append(f"| {r.model} | — | unpruned | 0% | {r.params:,} | {r.before:.2f} | — | — | — | — |")
            continue
        if r.before is None:
            out.append(f"| {r.model} | -{100 * r.target:.0f}% | {r.method} | — | — | — | — | — | — | — |")
            continue
        final = r.after if r.after is not None else r.before
        delta = f"{final - base[r.model]:+.2f}" + ("" if r.after is not None else " (no FT)")
        after = fmt(r.after) if r.after is not None else "not fine-tuned"
        out.append(
            f"| {r.model} | -{100 * r.target:.0f}% | {r.method} | -{100 * r.reduction:.1f}% | {r.params:,} | {r.before:.2f} | {after} "
            f"| {delta} | {r.prune_s:.1f} | {fmt(r.ft_s, '.0f')} |"
        )
    return out


def _lr_text(name: str, info: dict) -> str:
    if not info.get("pilot"):
        return f"{name} {info['lr']:g}"
    tried = ", ".join(f"{lr:g} -> {' / '.join(f'{a:.1f}' for a in accs)}%" for lr, accs in info["pilot"].items())
    return (f"{name} **{info['lr']:g}** (pilot: val top-1 after 1 epoch on {info.get('pilot_n', '?')} images, onnxprune uniform L1 / "
            f"Torch-Pruning at the first target: {tried}; best mean; {info['pilot_s']:.0f} s)")


def find(rows, model, target, method):
    for r in rows:
        if r.model == model and r.target == target and r.method == method and r.before is not None:
            return r
    return None


def verdicts(rows: list[Row]) -> list[str]:
    lines = []
    base = {r.model: r.before for r in rows if r.group == "ref"}
    for model in base:
        for target in sorted({r.target for r in rows if r.model == model and r.group != "ref"}):
            tag = f"{model} -{100 * target:.0f}%"
            goal = GOALS.get(target)
            cands = [r for r in rows if r.model == model and r.target == target and r.group == "onnxprune" and r.after is not None]
            if goal is not None and cands:
                gaps = [(r.method.replace("onnxprune ", ""), base[model] - r.after) for r in cands]
                met = [f"{m} ({g:+.2f})" for m, g in gaps if g <= goal]
                missed = [f"{m} ({g:+.2f})" for m, g in gaps if g > goal]
                ok = "MET" if not missed else ("PARTLY MET" if met else "MISSED")
                lines.append(
                    f"- **{ok}** {tag}: within {goal:.1f} points of unpruned ({base[model]:.2f}) after FT — "
                    f"met by {', '.join(met) or 'none'}; missed by {', '.join(missed) or 'none'} (gap = unpruned - fine-tuned, points)."
                )
            tpr = find(rows, model, target, "Torch-Pruning uniform, L1")
            ul = find(rows, model, target, "onnxprune uniform, L1")
            if tpr is not None and ul is not None:
                eq = find(rows, model, target, "onnxprune uniform, L1 @ TP's MACs")
                cmp_row = eq if eq is not None else ul
                if tpr.after is not None and cmp_row.after is not None:
                    ok = "MET" if cmp_row.after >= tpr.after else "MISSED"
                    lines.append(
                        f"- **{ok}** {tag}: onnxprune >= Torch-Pruning at equal MACs and budget — uniform L1 at -{100 * cmp_row.reduction:.1f}% "
                        f"{cmp_row.after:.2f} vs Torch-Pruning at -{100 * tpr.reduction:.1f}% {tpr.after:.2f} after FT "
                        f"({cmp_row.after - tpr.after:+.2f}); before FT {cmp_row.before:.2f} vs {tpr.before:.2f}."
                    )
                    nc = find(rows, model, target, "onnxprune uniform, L1, no calibration")
                    if nc is not None and nc.after is not None:
                        lines.append(
                            f"  - without onnxprune's calibration (channel choice and allocation only): {nc.after:.2f} at -{100 * nc.reduction:.1f}% "
                            f"vs {tpr.after:.2f} ({nc.after - tpr.after:+.2f}); before FT {nc.before:.2f} vs {tpr.before:.2f}."
                        )
                    if eq is None and abs(tpr.reduction - ul.reduction) > 0.005:
                        lines.append(f"  - MACs are not exactly equal (-{100 * ul.reduction:.1f}% vs -{100 * tpr.reduction:.1f}%).")
                    es = find(rows, model, target, "onnxprune sensitivity, L1 @ TP's MACs")
                    if es is not None:
                        lines.append(
                            f"  - sensitivity at Torch-Pruning's MACs: {es.before:.2f} before FT, after FT {fmt(es.after)}."
                        )
            sens = [r for r in (find(rows, model, target, "onnxprune sensitivity, L1"), find(rows, model, target, "onnxprune cost-aware, L1")) if r]
            if ul is not None and sens:
                # each variant is judged on its own: no best-of pick on the test images
                wins = [s.before >= ul.before for s in sens]
                ok = "MET" if all(wins) else ("MISSED" if not any(wins) else "MIXED")
                detail = ", ".join(f"{s.method.replace('onnxprune ', '')} {s.before:.2f} ({'>=' if w else '<'})" for s, w in zip(sens, wins))
                lines.append(f"- **{ok}** {tag}: each sensitivity-based variant >= uniform before FT — {detail} vs uniform L1 {ul.before:.2f}.")
    return lines


def source_hash() -> str:
    """Short hash of the onnxprune sources, to notice a change while the benchmark runs."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "onnxprune").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def render(rows: list[Row], args, ft_opts: FinetuneOptions, started: float, final: bool) -> str:
    lines = ["# Pruning quality on Fashion-MNIST: onnxprune vs Torch-Pruning", ""] + args.prov.header() + [""]
    if not final:
        lines += ["**Partial results (run in progress or interrupted).**", ""]
    lines += table(rows)
    lines += [
        "",
        f"Top-1 (%) on the first {args.test_n_used:,} images of the Fashion-MNIST **test** split; sensitivity measured on the first "
        f"{args.val_n} images of the **val** split (last 5,000 of the training file); no choice is made on test data.",
        f"Fine-tuning budget, identical for every fine-tuned row: {ft_opts.epochs} epoch(s) on the same {args.train_n:,} random training images "
        f"(train split, seed 0), SGD momentum {ft_opts.momentum}, cosine lr schedule to 0, batch {ft_opts.batch_size}, weight decay "
        f"{ft_opts.weight_decay}, crop+flip, distillation from the unpruned model (T={ft_opts.temperature:g}, weight {ft_opts.distill_weight}), "
        "final weights kept; `onnxprune.finetune.finetune` for all rows (Torch-Pruning's model exported to ONNX first with `models/export.py`).",
        "Learning rate, one per model and shared by all its rows: " + "; ".join(_lr_text(n, i) for n, i in args.model_info.items()) + ".",
        "MACs: Conv+Gemm multiply-accumulates counted by `onnxprune.flops` on each ONNX file (Torch-Pruning's ratio was searched on "
        "conv+FC MACs counted in torch, the same convention; results files written before 2026-12-02 used its own counter, which also counts BatchNorm and activations). round_to = 8 unless a note says otherwise (then the same smaller value for every method of that row group), classifier never pruned.",
        "BN scale: the checkpoint exported again with BatchNormalization kept, pruned with `criterion=\"bn\"`, the plan re-applied to the folded demo model.",
        f"onnxprune rows are `prune()`'s default pipeline, which recovers the pruned model with the default `--calibrate-method "
        f"{PruneOptions().calibrate_method}` (least-squares re-fit of the layers that lost inputs; no training, labels unused) on "
        f"{PruneOptions().calibrate} images of the same val subset; the `no calibration` row passes `calibrate=0`. "
        "Torch-Pruning has no such step: its \"before FT\" column is the raw pruned model.",
        f"Wall time on the shared machine above, torch {args.threads} thread(s); prune (s) includes the "
        "sensitivity analysis where it ran (rows marked in the notes reused the cached analysis of the same model and data).",
    ]
    notes = [f"- {n}" for i in args.model_info.values() for n in i.get("notes", [])]
    notes += [f"- {r.model} -{100 * r.target:.0f}% {r.method}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "Notes:"] + notes
    if args.ft != "all":
        lines += ["", f"Only the {', '.join(sorted(FT_SETS[args.ft]))} rows were fine-tuned (`--ft {args.ft}`); the others show top-1 before fine-tuning only."]
    lines += ["", "## Targets", ""] + (verdicts(rows) or ["- no complete rows yet"])
    now = source_hash()
    lines += ["", f"Total wall time {time.perf_counter() - started:.0f} s; hash of the onnxprune sources {args.source_hash}"
              + ("" if now == args.source_hash else f" at the start, {now} at the end (edited by others during the run; this process imported them at the start, so every row used the start version)") + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS), help="default: every demo model present")
    p.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5])
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (same for every row)")
    p.add_argument("--train-n", type=int, default=6000, help="training images for fine-tuning (random subset, seed 0)")
    p.add_argument("--test-n", type=int, default=10000, help="test images for top-1")
    p.add_argument("--val-n", type=int, default=1000, help="val images for the sensitivity analysis")
    p.add_argument("--ft", choices=list(FT_SETS), default="all", help="which rows to fine-tune")
    p.add_argument("--lr-grid", nargs="+", type=float, default=[0.01, 0.003, 0.001, 0.0003],
                   help="fine-tuning lr candidates; one pilot per model picks one on the val subset (one value: no pilot)")
    p.add_argument("--pilot-n", type=int, default=2000, help="training images of the one-epoch lr pilot")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None, help=f"markdown output (default {RESULTS.relative_to(ROOT)}; --quick: /tmp)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: vgg11, small data, 1 epoch on 512 images")
    g = p.add_argument_group("equal-budget mode (benchmarks/equal_budget.py): onnxprune default vs Torch-Pruning + ablation")
    g.add_argument("--budget", choices=["full", "reduced"], default=None,
                   help="full: 3 demo models, -30/-50%%, whole train split, 2 and 5 epochs, seeds 0 1 2; reduced: resnet20, 10k images, 1 epoch, seed 0")
    g.add_argument("--seeds", nargs="+", type=int, default=None, help="budget mode: fine-tuning seeds")
    g.add_argument("--budget-epochs", nargs="+", type=int, default=None, help="budget mode: epoch counts")
    g.add_argument("--budget-train-n", type=int, default=None, help="budget mode: training images (0 = the whole train split)")
    g.add_argument("--ablation", default=None, help="budget mode: MODEL:TARGET of the ablation rows, or none [default: first model, first target]")
    g.add_argument("--device", default="cpu", help="budget mode: torch device for both pipelines' training (cpu, cuda); ORT stays on CPU")
    g.add_argument("--decisive-only", action="store_true",
                   help="budget mode: fine-tune onnxprune's default row only when it decides the verdict (not when the row at Torch-Pruning's MACs does)")
    g.add_argument("--ablation-seeds", nargs="+", type=int, default=None, help="budget mode: seeds that also run the ablation rows [default: every seed]")
    g.add_argument("--ablation-variants", default=None, help="budget mode: comma-separated ablation rows to run, e.g. 'round_to 1' [default: all]")
    g.add_argument("--budget-combine", nargs="+", type=Path, default=None, metavar="JSON",
                   help="verdicts over the rows of several budget runs (their --json files); writes --out")
    args = p.parse_args(argv)
    if args.budget:
        args.targets = args.targets if argv_has(argv, "--targets") else None
        return args
    if args.quick:
        args.models = args.models or ["vgg11"]
        args.epochs, args.train_n, args.test_n, args.val_n, args.pilot_n = 1, 512, 1000, 200, 256
        args.out = args.out or Path(tempfile.gettempdir()) / "onnxprune_quality_quick.md"
    args.out = args.out or RESULTS
    args.model_info = {}
    args.source_hash = source_hash()
    args.prov = provenance.start(script="benchmarks/quality.py", argv=list(sys.argv[1:] if argv is None else argv))
    if args.models is None:
        args.models = [m for m, stem in MODELS.items() if (DEMO / f"{stem}.onnx").is_file()]
    return args


def argv_has(argv, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in (sys.argv[1:] if argv is None else argv))


def main(argv=None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxprune", "torch", "torch_pruning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.budget_combine:
        from benchmarks.equal_budget import combine

        combine(args)
        return
    if args.budget:
        from benchmarks.equal_budget import run_budget

        run_budget(args)
        return
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ft_opts = FinetuneOptions(epochs=args.epochs, lr=0.01, batch_size=64, optimizer="sgd", device="cpu", seed=0)
    missing = [m for m in args.models if not (DEMO / f"{MODELS[m]}.onnx").is_file()]
    if missing:
        raise SystemExit(f"error: no demo model for {', '.join(missing)} in {DEMO}")
    with tempfile.TemporaryDirectory(prefix="onnxprune_quality_") as tmp:
        workdir = Path(tmp)
        data = load_data(args, workdir)
        args.test_n_used = len(data.y_test)
        log.info("models %s, targets %s, FT %d epoch(s) x %d images, test %d, val %d", args.models, args.targets, args.epochs,
                 args.train_n, len(data.y_test), args.val_n)
        all_rows: list[Row] = []

        def emit(current: list[Row], final: bool = False) -> None:
            rows = all_rows + current
            provenance.write_atomic(args.out, render(rows, args, ft_opts, started, final))
            if args.json:
                args.json.write_text(json.dumps([r.to_dict() for r in rows], indent=1))

        for name in args.models:
            all_rows.extend(bench_model(name, args, data, ft_opts, workdir, emit))
        emit([], final=True)
    text = args.out.read_text()
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
