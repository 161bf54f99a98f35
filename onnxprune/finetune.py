"""Fine-tune an ONNX model with torch and write the trained weights back.

:func:`finetune` runs the graph with :class:`onnxprune.torch_exec.OnnxModule`
(its float initializers are the parameters), trains it, and returns a *new*
ModelProto whose initializers hold the best weights; nodes, names, opset and
metadata are unchanged and the input model is never modified. torch is
imported only when fine-tuning runs (``pip install 'onnxprune[finetune]'``).

Loss, with student logits ``s``, teacher logits ``t`` (the original model run
by the same executor in eval mode), temperature ``T`` and weight ``a``::

    CE  = cross_entropy(s, y, label_smoothing)
    KD  = KL(softmax(t / T) || softmax(s / T)) * T**2      (outputs of rank 2)
    KD  = mean((s - t) ** 2)                               (rank > 2: dense maps)
    loss = (1 - a) * CE + a * KD     labels and teacher
    loss = CE                        labels only
    loss = KD                        teacher only (label-free)

Recipe for a model that starts close to the original (the pruned,
reconstructed one):

* **Validation data**: ``val_x`` when given, else ``holdout`` (10%, at most
  5,000; none under 100) of the training samples, held out of training. It picks the
  learning rate and the epoch kept, and the starting weights count as epoch 0:
  when no epoch beats them the input model is returned unchanged and
  ``FinetuneResult.note`` says so. Fine-tuning never ends below its start.
* **Learning rate** (``lr=None``): a pilot trains a fresh copy with each of
  ``lr_candidates`` (0.001, 0.003, 0.01; 0.03 too when 0.01 is chosen) for 10%
  of the run's steps (30..200) on a slice of the training data, scores it on
  (up to 5,000) validation samples and takes the largest lr within one
  standard error of the best score (:func:`choose_lr`).
* **Normalization** (``normalization="auto"``): exporters fold BatchNorm into
  the convs, so the graph would train without normalization; ``reinsert``
  gives every such conv a BatchNorm again, initialised so the function is
  unchanged, trained with batch statistics and folded back on write-back
  (:class:`onnxprune.torch_exec.OnnxModule`, ``renormalize``). Whether that
  helps depends on the model and its start, so ``auto`` measures it (batch of
  at least 16 and validation data; else it re-inserts from batch 16 on): one
  more pilot run trains the folded graph at the chosen lr, and folded is kept
  only when it beats re-insertion by more than one standard error on
  validation (:func:`_pilot_normalization`). Measured: re-insertion +0.36
  points test top-1 on the Fashion-MNIST ResNet-20 at -30% MACs (1 epoch, 10k
  images, mean of 3 seeds, ``benchmarks/results/quality_equal_budget_reduced.md``), but -8
  points on a MobileNetV2 pruned by 30% with no recovery (collapsed start).

Training: SGD with momentum or AdamW, weight decay 5e-4 on Conv/Gemm/MatMul
weights only (not biases, not re-inserted γ/β), per-step cosine learning rate
from ``lr`` to 0 after a short linear warm-up (10% of the steps, at most
100), gradient-norm clipping (distillation with T=4 scales gradients by about
T, which diverged at lr 0.01 on a calibrated model), optional random
crop (zero padding of H/8) and horizontal flip for image batches (rank-4
inputs of at least 8x8 with class labels). Validation after every epoch
measures top-1 (labels), agreement of arg-max with the teacher (no labels), or
the teacher MSE (dense outputs without labels); the best weights, the
untrained ones included (epoch 0), are returned (``holdout=0`` and no
``val_x``: the last epoch's, unchecked). A non-finite loss stops
training and keeps the best weights so far, saying so in
``FinetuneResult.stopped_reason``.

Several GPUs (torchrun + DistributedDataParallel): write a small script ::

    # train_ddp.py
    import numpy as np, onnx
    from onnxprune.finetune import FinetuneOptions, finetune_ddp_entry
    d = np.load("train.npz", allow_pickle=False)
    finetune_ddp_entry(onnx.load("pruned.onnx"), d["x"], d["y"],
                       options=FinetuneOptions(epochs=30, lr=0.05), out="tuned.onnx")

and run ``torchrun --nproc_per_node=4 train_ddp.py``. Each process trains on
its shard (``perm[rank::world]``) on ``cuda:LOCAL_RANK``; :func:`finetune`
wraps the module in ``DistributedDataParallel`` whenever
``torch.distributed.is_initialized()``; rank 0 reports progress and writes
``out``. Per-process batch size is ``batch_size``.

Example::

    result = finetune(pruned, x, y, val_x=vx, val_y=vy, options=FinetuneOptions(epochs=5))
    save_model(result.model, "tuned.onnx")
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx

from .errors import DataError, DeviceError, FinetuneError, MissingDependencyError, UsageError
from .graph import graph_inputs, save_model

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
#: ``normalization`` values: re-insert BatchNorm after folded convs for training, keep the graph as is, or decide.
NORMALIZATIONS = ("auto", "reinsert", "folded")
NORMALIZATION_HELP = (
    "BatchNorm while fine-tuning: 'reinsert' gives every conv whose BatchNorm the exporter folded a BatchNorm again "
    "(function unchanged at the start, trained with batch statistics, folded back into the conv on write-back); "
    "'folded' trains the graph as it is; 'auto' decides by a short pilot run of each on validation data (batch size at least 16; "
    "without validation data it re-inserts)."
)
#: learning rates the pilot tries when no ``lr`` is given (a model that starts close to the original).
LR_CANDIDATES = (0.01, 0.003, 0.001)
LR_HELP = (
    "Fine-tuning learning rate [default: chosen among 0.001, 0.003, 0.01 (and 0.03 when 0.01 wins) by a short pilot run "
    "on validation data (--val of `onnxprune finetune`, else 10% of the training data held out)]."
)
MIN_RENORM_BATCH = 16  # 'auto' re-inserts BatchNorm from this per-process batch size on
MAX_HOLDOUT = 5000
MIN_HOLDOUT = 100  # a smaller held-out split is noise: train on everything instead (and say so)
Progress = Callable[[dict], None]


@dataclass(frozen=True)
class FinetuneOptions:
    """Fine-tuning settings (one per CLI flag). ``distill_weight`` is ``a`` in the
    module docstring; it is ignored without a teacher, and is 1 without labels."""

    epochs: int = 1
    lr: float | None = None  # None = pilot over lr_candidates, chosen on validation data
    batch_size: int = 64
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    device: str = "auto"
    seed: int = 0
    augment: bool = True
    temperature: float = 4.0
    distill_weight: float = 0.5
    label_smoothing: float = 0.0
    max_steps_per_epoch: int | None = None
    train_bn: bool = True
    warmup_steps: int | None = None  # linear warm-up; None = 10% of all steps, at most 100
    grad_clip: float | None = 5.0  # max global gradient norm; None = no clipping
    normalization: str = "auto"  # one of NORMALIZATIONS; see NORMALIZATION_HELP
    lr_candidates: tuple[float, ...] = LR_CANDIDATES
    pilot_fraction: float = 0.1  # pilot steps per candidate, as a share of the run's steps (30..200)
    holdout: float = 0.1  # share of the training samples held out as validation when none is given (<= 5000; 0 = none)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1", "--epochs 5"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), "learning rate must be positive", "--lr 0.01, or omit it"),
            (self.normalization in NORMALIZATIONS, f"unknown normalization '{self.normalization}'", "--normalization auto, reinsert or folded"),
            (len(self.lr_candidates) >= 1 and all(v > 0 and math.isfinite(v) for v in self.lr_candidates),
             "learning-rate candidates must be positive", "values like (0.01, 0.003, 0.001)"),
            (0 < self.pilot_fraction <= 1, "pilot fraction must be in (0, 1]", "a value like 0.1"),
            (0 <= self.holdout < 1, "holdout must be in [0, 1)", "a value like 0.1, or 0 to train on every sample"),
            (self.batch_size >= 1, "batch size must be >= 1", "--batch-size 64"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer '{self.optimizer}'", "--optimizer sgd or --optimizer adamw"),
            (self.weight_decay >= 0, "weight decay must be >= 0", "a value like 5e-4"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)", "a value like 0.9"),
            (_valid_device(self.device), f"unknown device '{self.device}'", "--device auto, --device cuda or --device cpu"),
            (self.temperature > 0, "temperature must be positive", "a value like 4"),
            (0 <= self.distill_weight <= 1, "distillation weight must be in [0, 1]", "a value like 0.5"),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)", "a value like 0.1"),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "max steps per epoch must be >= 1", "omit it"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warm-up steps must be >= 0", "omit it"),
            (self.grad_clip is None or self.grad_clip > 0, "gradient clipping norm must be positive", "a value like 5"),
        ]
        for ok, message, fix in checks:
            if not ok:
                raise UsageError(f"fine-tuning option: {message}", fix=f"use {fix}")


@dataclass(frozen=True)
class FinetuneResult:
    """``model``: a new ModelProto with the best weights; ``history``: one dict per
    trained epoch (epoch, steps, train_loss, train_acc, val, lr, seconds);
    ``best_epoch`` 0 means no epoch beat the untrained weights (``model`` is then
    the input's copy and ``note`` says so); ``metric``: ``top1`` / ``agreement`` /
    ``teacher_mse`` / ``None`` (no validation data); ``lr``, ``lr_pilot``,
    ``normalization``, ``val_source``: how the run was set up."""

    model: onnx.ModelProto
    history: tuple[dict, ...]
    best_epoch: int
    device: str
    stopped_reason: str | None
    seconds: float
    metric: str | None = None
    initial_val: float | None = None
    best_val: float | None = None
    lr: float | None = None  # the learning rate used (given, or chosen by the pilot)
    lr_pilot: tuple[tuple[float, float | None], ...] = ()  # (candidate, val metric or None if it diverged)
    normalization: str = "folded"  # 'reinsert' or 'folded', as resolved
    normalization_pilot: tuple[tuple[str, float | None], ...] = ()  # ('reinsert'/'folded', val metric or None) when 'auto' measured it
    renormalized: int = 0  # convs that trained with a re-inserted BatchNorm
    val_source: str | None = None  # 'given', 'held out N of M training samples', or None
    note: str | None = None  # e.g. that no epoch beat the starting weights, which were kept


def _valid_device(d: str) -> bool:
    return d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())


def _require_torch():
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("fine-tuning needs torch", fix="pip install 'onnxprune[finetune]'") from exc
    return torch


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one -> DeviceError."""
    torch = _require_torch()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} was requested but torch sees no CUDA GPU", fix="use --device cpu or --device auto")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible", fix="use --device cuda")
    return name


# --------------------------------------------------------------------------- checks
def _input_info(model: onnx.ModelProto, what: str) -> tuple[str, tuple, int]:
    ins = graph_inputs(model)
    if len(ins) != 1:
        raise FinetuneError(
            f"the {what} has {len(ins)} inputs ({', '.join(i.name for i in ins)}); fine-tuning supports one",
            fix="fine-tune a single-input model",
        )
    t = ins[0].type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)
    return ins[0].name, dims, t.elem_type


def _output_dims(model: onnx.ModelProto) -> tuple | None:
    t = model.graph.output[0].type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)


def _check_x(x: Any, name: str, dims: tuple, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise DataError(f"{what} must be a numpy array, got {type(x).__name__}", fix="pass an .npz file with an 'x' array")
    if x.ndim != len(dims) or len(x) == 0:
        raise DataError(
            f"{what} has shape {list(x.shape)} but input '{name}' has rank {len(dims)}",
            fix=f"pass samples shaped N x {' x '.join(str(d or '?') for d in dims[1:])}",
        )
    bad = [i for i, d in enumerate(dims[1:], 1) if d is not None and d != x.shape[i]]
    if bad:
        raise DataError(
            f"{what} has shape {list(x.shape)} but input '{name}' expects {['N', *dims[1:]]}",
            fix="resize or re-export so the sample shape matches the model input",
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{what} has dtype {x.dtype} but input '{name}' expects floats", fix="normalise the data to float32 first")
    return x


def _check_y(y: Any, n: int, what: str) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what} labels have dtype {y.dtype}; class indices are needed", fix="store labels as integers")
    if len(y) != n:
        raise DataError(f"{what} has {n} samples but {len(y)} labels", fix="give one label per sample")
    return y.astype(np.int64)


def _check_teacher(student: onnx.ModelProto, teacher: onnx.ModelProto) -> None:
    s_name, s_dims, _ = _input_info(student, "model")
    t_name, t_dims, _ = _input_info(teacher, "teacher")
    fix = "pass the original model the student was pruned from as --teacher"
    if s_name != t_name or len(s_dims) != len(t_dims):
        raise FinetuneError(
            f"teacher input '{t_name}' (rank {len(t_dims)}) does not match model input '{s_name}' (rank {len(s_dims)})", fix=fix
        )
    if any(a is not None and b is not None and a != b for a, b in zip(s_dims[1:], t_dims[1:])):
        raise FinetuneError(f"teacher input shape {list(t_dims)} does not match the model's {list(s_dims)}", fix=fix)
    if len(student.graph.output) != len(teacher.graph.output):
        raise FinetuneError(f"teacher has {len(teacher.graph.output)} outputs, the model {len(student.graph.output)}", fix=fix)
    so, to = _output_dims(student), _output_dims(teacher)
    if so is not None and to is not None:
        if len(so) != len(to) or any(a is not None and b is not None and a != b for a, b in zip(so[1:], to[1:])):
            raise FinetuneError(f"teacher output shape {list(to)} does not match the model's {list(so)} (class count?)", fix=fix)


# --------------------------------------------------------------------------- pieces
def _augment(torch, x, rng: np.random.Generator, pad: int):
    """Random crop from a zero-padded batch and random horizontal flip (one gather)."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy, ox = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    rows = oy[:, None] + np.arange(h)
    cols = ox[:, None] + np.arange(w)
    cols = np.where((rng.random(n) < 0.5)[:, None], cols[:, ::-1], cols)
    dev = x.device
    rows_t = torch.from_numpy(rows).to(dev)[:, None, :, None]
    cols_t = torch.from_numpy(np.ascontiguousarray(cols)).to(dev)[:, None, None, :]
    return xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows_t, cols_t]


def _loss(torch, out, t_out, y, opts: FinetuneOptions):
    F = torch.nn.functional
    kd = None
    if t_out is not None:
        if out.dim() == 2:
            temp = opts.temperature
            kd = F.kl_div(F.log_softmax(out / temp, 1), F.log_softmax(t_out / temp, 1), reduction="batchmean", log_target=True) * temp**2
        else:
            kd = F.mse_loss(out, t_out)
    if y is None:
        return kd
    ce = F.cross_entropy(out, y, label_smoothing=opts.label_smoothing)
    if kd is None:
        return ce
    return (1 - opts.distill_weight) * ce + opts.distill_weight * kd


@dataclass
class _Run:
    """Everything one training run needs (internal, mutable)."""

    net: Any
    train_net: Any
    teacher: Any
    device: Any
    dtype: Any
    opts: FinetuneOptions
    rank: int = 0
    world: int = 1

    def batch(self, x: np.ndarray, idx=None):
        torch = _require_torch()
        a = x if idx is None else x[idx]
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.dtype, non_blocking=True)


def _predict(torch, net, x: np.ndarray, run: _Run) -> list:
    """Outputs of ``net`` (eval mode) on ``x`` in batches, kept on the device."""
    outs, bs = [], max(1, run.opts.batch_size * 2)
    with torch.no_grad():
        for i in range(0, len(x), bs):
            o = net(run.batch(x[i : i + bs]))
            outs.append(o[0] if isinstance(o, tuple) else o)
    return outs


def _validate(torch, run: _Run, val_x, val_y, teacher_val) -> float | None:
    if val_x is None:
        return None
    was = run.net.training
    run.net.eval()
    outs = _predict(torch, run.net, val_x, run)
    run.net.train(was)
    if val_y is not None:
        pred = torch.cat([o.argmax(1) for o in outs]).cpu().numpy()
        return float((pred == val_y).mean())
    out = torch.cat(outs)
    if out.dim() > 2 and out.shape[1] == 1:
        return float(((out - teacher_val) ** 2).mean())
    return float((out.argmax(1) == teacher_val).float().mean())


def _teacher_val(torch, run: _Run, val_x, val_y):
    if val_x is None or val_y is not None or run.teacher is None:
        return None
    out = torch.cat(_predict(torch, run.teacher, val_x, run))
    return out if out.dim() > 2 and out.shape[1] == 1 else out.argmax(1)


def _metric_name(val_x, val_y, out_shape) -> str | None:
    if val_x is None:
        return None
    if val_y is not None:
        return "top1"
    return "teacher_mse" if len(out_shape) > 2 and out_shape[1] == 1 else "agreement"


def _better(metric: str | None, new: float | None, old: float | None) -> bool:
    if metric is None or old is None:
        return True
    return new < old if metric == "teacher_mse" else new > old


# --------------------------------------------------------------------------- public API
def finetune(
    model: onnx.ModelProto,
    train_x: np.ndarray,
    train_y: np.ndarray | None = None,
    *,
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    teacher: onnx.ModelProto | None = None,
    options: FinetuneOptions | None = None,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train ``model``'s float initializers on ``train_x``/``train_y``; see the module docstring.

    ``progress(event)`` receives dicts with ``kind`` = ``start`` / ``step`` /
    ``epoch`` / ``stop`` and epoch, epochs, step, steps, loss, acc, lr, val;
    the lr pilot sends ``pilot_step`` and ``pilot`` (lr, val) events first.
    Without ``val_x``, ``options.holdout`` of the training samples become the
    validation data (for the pilot and for keeping the best weights).
    """
    opts = options or FinetuneOptions()
    torch = _require_torch()
    t0 = time.perf_counter()
    in_name, in_dims, _ = _input_info(model, "model")
    train_x = _check_x(train_x, in_name, in_dims, "training data")
    train_y = _check_y(train_y, len(train_x), "training data")
    if val_x is not None:
        val_x = _check_x(val_x, in_name, in_dims, "validation data")
    val_y = _check_y(val_y, 0 if val_x is None else len(val_x), "validation data")
    if train_y is None and teacher is None:
        raise DataError(
            "the training data has no labels and no teacher was given",
            fix="add labels ('y') to the data or pass --teacher ORIGINAL.onnx",
        )
    if val_x is not None and val_y is None and teacher is None:
        raise DataError(
            "the validation data has no labels and no teacher was given",
            fix="add labels ('y') to --val or pass --teacher ORIGINAL.onnx",
        )
    if len(train_x) < 2:
        raise DataError("fine-tuning needs at least 2 training samples", fix="pass more data with --data")
    if teacher is not None:
        _check_teacher(model, teacher)
    resolve_device(opts.device)
    train_x, train_y, val_x, val_y, val_source = _holdout(train_x, train_y, val_x, val_y, opts)
    renorm = opts.normalization == "reinsert" or (opts.normalization == "auto" and opts.batch_size >= MIN_RENORM_BATCH)
    pilot: tuple = ()
    lr = opts.lr
    if lr is None:
        lr, pilot = _pilot_lr(torch, model, train_x, train_y, val_x, val_y, teacher, opts, renorm, progress)
    norm_pilot: tuple = ()
    if renorm and opts.normalization == "auto" and val_x is not None:
        renorm, norm_pilot = _pilot_normalization(torch, model, train_x, train_y, val_x, val_y, teacher, opts, lr, pilot, progress)
    result = _fit(torch, model, train_x, train_y, val_x, val_y, teacher, dataclasses.replace(opts, lr=lr), renorm, progress)
    note = None
    if result.best_epoch == 0:  # the start won (or training stopped first): the input's weights, bit for bit
        if result.history and result.metric is not None:
            epochs = [h["val"] for h in result.history]
            best = min(epochs) if result.metric == "teacher_mse" else max(epochs)
            note = (f"no epoch beat the starting weights on validation ({result.metric} {result.initial_val:.4g} at the start, "
                    f"{best:.4g} at best); kept the starting weights unchanged")
            log.warning("fine-tuning: %s", note)
        result = dataclasses.replace(result, model=_copy(model))
    elif result.metric is None:
        note = "no validation data: the last epoch's weights are kept without a check against the starting weights"
    return dataclasses.replace(result, seconds=time.perf_counter() - t0, lr=lr, lr_pilot=pilot, normalization_pilot=norm_pilot,
                               val_source=val_source, note=note)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _holdout(train_x, train_y, val_x, val_y, opts: FinetuneOptions):
    """Validation data: the given one, else ``holdout`` of the training samples (seeded,
    100..5000; none when that would be under 100), removed from training;
    ``(train_x, train_y, val_x, val_y, source)``."""
    if val_x is not None:
        return train_x, train_y, val_x, val_y, "given"
    n_val = min(MAX_HOLDOUT, int(round(opts.holdout * len(train_x))))
    if n_val < MIN_HOLDOUT or len(train_x) - n_val < 2:
        return train_x, train_y, None, None, None
    perm = np.random.default_rng(opts.seed + 12345).permutation(len(train_x))
    vi, ti = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    vy = None if train_y is None else train_y[vi]
    ty = None if train_y is None else train_y[ti]
    return train_x[ti], ty, train_x[vi], vy, f"held out {n_val} of {len(train_x)} training samples"


def _pilot_lr(torch, model, train_x, train_y, val_x, val_y, teacher, opts: FinetuneOptions, renorm: bool, progress):
    """The learning rate: each of ``lr_candidates`` trains a fresh copy for a short run
    (``pilot_fraction`` of the full run's steps, 30..200, one cosine cycle) on a slice
    of the training data and is scored on (up to 5,000) validation samples; a
    candidate that diverges is never chosen; :func:`choose_lr` picks among the rest.
    When the largest candidate is chosen, 3x it is tried once more (the grid is open
    upwards). Returns ``(lr, ((lr, val or None), ...))``."""
    cands = sorted(set(float(v) for v in opts.lr_candidates))
    if len(cands) == 1 or val_x is None:
        if val_x is None and len(cands) > 1:
            log.warning("fine-tuning: no validation data for the lr pilot; using lr %g", 0.01)
            return 0.01, ()
        return cands[0], ()
    px, py, vx, vy, steps = _pilot_slice(train_x, train_y, val_x, val_y, opts)
    emit = progress or (lambda event: None)
    scores: list[tuple[float, float | None]] = []
    metric, best = None, None
    queue = list(cands)
    while queue:
        lr = queue.pop(0)
        val, metric = _pilot_run(torch, model, (px, py, vx, vy, steps), teacher, opts, lr, renorm, emit)
        scores.append((lr, val))
        log.info("fine-tuning lr pilot: lr %g -> %s %s", lr, metric, val)
        emit({"kind": "pilot", "lr": lr, "val": val, "metric": metric, "steps": steps})
        best = choose_lr(scores, metric, len(vx))
        if not queue and lr == cands[-1] and best == lr:
            queue.append(3 * lr)
    best = cands[0] if best is None else best
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank trains with rank 0's choice
        t = torch.tensor([best], dtype=torch.float64, device=resolve_device(opts.device))
        torch.distributed.broadcast(t, 0)
        best = float(t.item())
    return best, tuple(scores)


def _pilot_slice(train_x, train_y, val_x, val_y, opts: FinetuneOptions):
    """``(x, y, val_x, val_y, steps)`` of a pilot run: ``pilot_fraction`` of the full run's
    steps (30..200, at most one epoch) on a seeded slice, (up to 5,000) validation samples."""
    per_epoch = max(1, len(train_x) // opts.batch_size)
    per_epoch = min(per_epoch, opts.max_steps_per_epoch or per_epoch)
    steps = int(min(200, max(30, round(opts.pilot_fraction * per_epoch * opts.epochs)), per_epoch))
    idx = np.sort(np.random.default_rng(opts.seed + 1).permutation(len(train_x))[: steps * opts.batch_size])
    px, py = train_x[idx], None if train_y is None else train_y[idx]
    return px, py, val_x[:MAX_HOLDOUT], None if val_y is None else val_y[:MAX_HOLDOUT], steps


def _pilot_run(torch, model, piece, teacher, opts: FinetuneOptions, lr: float, renorm: bool, emit) -> tuple[float | None, str | None]:
    """One pilot run on ``piece`` (from :func:`_pilot_slice`); ``(val metric or None if it diverged, metric name)``."""
    px, py, vx, vy, steps = piece
    o = dataclasses.replace(opts, lr=lr, epochs=1, max_steps_per_epoch=steps, warmup_steps=None)
    relay = (lambda ev: emit({**ev, "kind": "pilot_step", "pilot_lr": lr}) if ev.get("kind") == "step" else None)
    res = _fit(torch, model, px, py, vx, vy, teacher, o, renorm, relay, select=False)
    val = res.history[-1]["val"] if res.history and res.stopped_reason is None else None
    if val is not None and not math.isfinite(val):
        val = None
    return val, res.metric


def _pilot_normalization(torch, model, train_x, train_y, val_x, val_y, teacher, opts: FinetuneOptions, lr: float, lr_pilot, progress):
    """``normalization="auto"``: whether re-inserted BatchNorm helps this model, measured. A pilot
    run (as for the lr) with BatchNorm re-inserted and one with the folded graph, both at ``lr``
    (the lr pilot's run is reused when it ran at ``lr``), scored on validation. Folded wins only
    when it is better by more than one standard error (:func:`choose_lr`'s noise bound): re-insertion
    measured +0.36 points on the Fashion-MNIST ResNet-20 at -30% (module docstring), but -8 points
    on a MobileNetV2 pruned by 30% without recovery, whose start had collapsed (88.3% folded vs
    80.4% re-inserted after 2 epochs on 5,400 images). Returns ``(renorm, (("reinsert", val), ("folded", val)))``."""
    from .torch_exec import OnnxModule

    if not len(OnnxModule(model, renormalize=True).renorms):
        return False, ()  # no conv whose BatchNorm was folded: nothing to decide
    piece = _pilot_slice(train_x, train_y, val_x, val_y, opts)
    emit = progress or (lambda event: None)
    with_bn = dict(lr_pilot).get(lr, "missing")
    metric = None
    if with_bn == "missing":
        with_bn, metric = _pilot_run(torch, model, piece, teacher, opts, lr, True, emit)
    folded, metric = _pilot_run(torch, model, piece, teacher, opts, lr, False, emit)
    scores = (("reinsert", with_bn), ("folded", folded))
    log.info("fine-tuning normalization pilot at lr %g: %s", lr, scores)
    emit({"kind": "normalization_pilot", "lr": lr, "scores": scores, "metric": metric})
    renorm = choose_reinsert(with_bn, folded, metric, len(piece[2]))
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank trains with rank 0's choice
        t = torch.tensor([float(renorm)], dtype=torch.float64, device=resolve_device(opts.device))
        torch.distributed.broadcast(t, 0)
        renorm = bool(t.item())
    return renorm, scores


def choose_reinsert(with_bn: float | None, folded: float | None, metric: str | None, n_val: int) -> bool:
    """The normalization pilot's choice: re-insert BatchNorm unless the folded graph scored
    better by more than one standard error (top-1 / agreement; 2% for the teacher MSE), or
    the re-inserted run diverged. Example: ``choose_reinsert(0.80, 0.87, "top1", 600) is False``."""
    if folded is None:
        return True
    if with_bn is None:
        return False
    if metric == "teacher_mse":
        return not folded < with_bn / 1.02
    se = math.sqrt(max(with_bn * (1 - with_bn), 0.0) / max(1, n_val))
    return not folded > with_bn + se


def choose_lr(scores, metric: str | None, n_val: int) -> float | None:
    """The pilot's choice: the **largest** lr whose validation score is within one
    standard error of the best score (``sqrt(p (1 - p) / n_val)`` for top-1 /
    agreement ``p``; 2% for the teacher MSE). A short pilot favours small learning
    rates (short-horizon bias: measured on the Fashion-MNIST ResNet-20 at -30%,
    30-step pilots ranked 0.001 > 0.003 > 0.01 by 0.1-0.5 points, within noise,
    while the full run at 0.01 ended 0.5 points above the one at 0.001), so
    scores the pilot cannot tell apart go to the larger lr. ``None`` if every
    candidate diverged. Example: ``choose_lr([(0.001, .9075), (0.01, .9025)], "top1", 2000) == 0.01``."""
    ok = [(lr, v) for lr, v in scores if v is not None]
    if not ok:
        return None
    if metric == "teacher_mse":
        best = min(v for _, v in ok)
        near = [lr for lr, v in ok if v <= best * 1.02]
    else:
        best = max(v for _, v in ok)
        se = math.sqrt(max(best * (1 - best), 0.0) / max(1, n_val))
        near = [lr for lr, v in ok if v >= best - se]
    return max(near)


def _fit(torch, model, train_x, train_y, val_x, val_y, teacher, opts: FinetuneOptions, renorm: bool, progress, *, select: bool = True):
    """One training run with a fixed ``opts.lr``: build the modules, re-insert BatchNorm
    when ``renorm``, train; ``select=False`` keeps the last weights (pilot runs)."""
    from .torch_exec import TORCH_DTYPES, OnnxModule

    _, _, elem = _input_info(model, "model")
    device = torch.device(resolve_device(opts.device))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    dtype = TORCH_DTYPES.get(elem, torch.float32)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(opts.seed)
        net = OnnxModule(model, train_bn=opts.train_bn, renormalize=renorm).to(device)
        tnet = OnnxModule(teacher, train_bn=False).to(device).eval().requires_grad_(False) if teacher is not None else None
        run = _Run(net, net, tnet, device, dtype, opts)
        out_shape = _probe(torch, run, train_x, train_y, val_y)
        n_norm = 0
        if renorm:
            bs = max(1, opts.batch_size)
            n_norm = net.init_normalization(run.batch(train_x[i : i + bs]) for i in range(0, min(len(train_x), 1024), bs))
        if distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            run.rank, run.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            run.train_net = DDP(net, device_ids=[device.index or 0] if device.type == "cuda" else None)
        result = _train(torch, run, model, train_x, train_y, val_x, val_y, out_shape, progress, select=select)
    return dataclasses.replace(result, normalization="reinsert" if n_norm else "folded", renormalized=n_norm)


def _probe(torch, run: _Run, train_x, train_y, val_y) -> tuple:
    """One eval forward on two samples: checks data/teacher/labels against the outputs."""
    xb = run.batch(train_x[:2])
    run.net.eval()
    try:
        with torch.no_grad():
            out = run.net(xb)
            t_out = run.teacher(xb) if run.teacher is not None else None
    except RuntimeError as exc:
        raise DataError(
            f"the model cannot run on samples shaped {list(train_x.shape[1:])}: {str(exc).splitlines()[0][:160]}",
            fix="pass data shaped like the model input",
        ) from exc
    out = out[0] if isinstance(out, tuple) else out
    if t_out is not None:
        t_out = t_out[0] if isinstance(t_out, tuple) else t_out
        if t_out.shape != out.shape:
            raise FinetuneError(
                f"teacher output shape {list(t_out.shape)} does not match the model's {list(out.shape)} (class count?)",
                fix="pass the original model the student was pruned from as --teacher",
            )
    for y, what in ((train_y, "training"), (val_y, "validation")):
        if y is not None:
            _check_labels(y, tuple(out.shape), what)
    return tuple(out.shape)


def _check_labels(y: np.ndarray, out_shape: tuple, what: str) -> None:
    dense = len(out_shape) > 2 and y.ndim == len(out_shape) - 1 and tuple(y.shape[1:]) == tuple(out_shape[2:])
    if len(out_shape) < 2 or not (y.ndim == 1 or dense):
        raise DataError(
            f"{what} labels shaped {list(y.shape)} do not fit the model output {['N', *out_shape[1:]]}",
            fix="pass one class index per sample (or per pixel for dense outputs), or use --teacher without labels",
        )
    if y.min() < 0 or y.max() >= out_shape[1]:
        raise DataError(
            f"{what} labels range over [{y.min()}, {y.max()}] but the model has {out_shape[1]} classes",
            fix="check the labels or the model (class count)",
        )


@dataclass(frozen=True)
class _Plan:
    """Batching of one run: ``steps`` batches of ``bs`` per epoch, ``total`` steps in all."""

    steps: int
    bs: int
    total: int
    pad: int  # crop padding; 0 = no augmentation


def _plan(run: _Run, train_x: np.ndarray, train_y) -> _Plan:
    opts = run.opts
    shard = len(range(run.rank, len(train_x), run.world))
    steps = max(1, shard // opts.batch_size)
    steps = min(steps, opts.max_steps_per_epoch or steps)
    image = train_x.ndim == 4 and min(train_x.shape[2:]) >= 8 and (train_y is None or train_y.ndim == 1)
    pad = max(1, train_x.shape[2] // 8) if image and opts.augment else 0
    return _Plan(steps, min(opts.batch_size, shard), steps * opts.epochs, pad)


def _train_step(torch, run: _Run, optimizer, xb, y_t) -> tuple[float, float]:
    """Forward (student, teacher), loss, backward, update. Skips the update when
    the loss is not finite; returns (loss, accuracy), averaged over ranks."""
    out = run.train_net(xb)
    out = out[0] if isinstance(out, tuple) else out
    t_out = None
    if run.teacher is not None:
        with torch.no_grad():
            t_out = run.teacher(xb)
            t_out = t_out[0] if isinstance(t_out, tuple) else t_out
    loss = _loss(torch, out, t_out, y_t, run.opts)
    acc = (out.argmax(1) == y_t).float().mean() if y_t is not None else torch.zeros((), device=out.device)
    stats = torch.stack([loss.detach().float(), acc])
    if run.world > 1:
        torch.distributed.all_reduce(stats)
        stats /= run.world
    loss_v, acc_v = stats.tolist()
    if math.isfinite(loss_v):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.opts.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], run.opts.grad_clip)
        optimizer.step()
    return loss_v, acc_v


def _run_epoch(torch, run: _Run, optimizer, plan: _Plan, epoch: int, train_x, train_y, rng, emit) -> tuple[list, list, float, str | None]:
    """One pass over this rank's shard: (losses, accuracies, last lr, stop reason or None)."""
    opts = run.opts
    run.net.train()
    perm = rng.permutation(len(train_x)) if run.world == 1 else _shard_perm(rng, len(train_x), run)
    losses: list[float] = []
    accs: list[float] = []
    lr = opts.lr
    for step in range(plan.steps):
        idx = perm[step * plan.bs : (step + 1) * plan.bs]
        xb = run.batch(train_x, idx)
        if plan.pad:
            xb = _augment(torch, xb, rng, plan.pad)
        y_t = torch.from_numpy(train_y[idx]).to(run.device) if train_y is not None else None
        done = (epoch - 1) * plan.steps + step
        warm = opts.warmup_steps if opts.warmup_steps is not None else max(1, min(100, plan.total // 10))
        lr = 0.5 * opts.lr * (1 + math.cos(math.pi * done / plan.total)) * min(1.0, (done + 1) / max(1, warm))
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_v, acc_v = _train_step(torch, run, optimizer, xb, y_t)
        if not math.isfinite(loss_v):
            return losses, accs, lr, f"loss became {loss_v} at epoch {epoch} step {step + 1}"
        losses.append(loss_v)
        accs.append(acc_v)
        emit({"kind": "step", "epoch": epoch, "epochs": opts.epochs, "step": step + 1, "steps": plan.steps,
              "loss": loss_v, "acc": acc_v if y_t is not None else None, "lr": lr})
    if not all(bool(torch.isfinite(p).all()) for p in run.net.parameters()):
        return losses, accs, lr, f"weights became non-finite in epoch {epoch}"
    return losses, accs, lr, None


def _train(torch, run: _Run, model, train_x, train_y, val_x, val_y, out_shape, progress, *, select: bool = True) -> FinetuneResult:
    opts, net = run.opts, run.net
    emit = progress if (progress is not None and run.rank == 0) else (lambda event: None)
    rng = np.random.default_rng(opts.seed + run.rank)
    plan = _plan(run, train_x, train_y)
    optimizer = _optimizer(torch, net, opts)
    metric = _metric_name(val_x, val_y, out_shape)
    teacher_val = _teacher_val(torch, run, val_x, val_y)
    best_val = initial_val = _validate(torch, run, val_x, val_y, teacher_val) if select else None
    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    best_epoch, history, stopped = 0, [], None
    emit({"kind": "start", "epochs": opts.epochs, "steps": plan.steps, "device": str(run.device), "metric": metric, "val": initial_val})
    for epoch in range(1, opts.epochs + 1):
        te = time.perf_counter()
        losses, accs, lr, problem = _run_epoch(torch, run, optimizer, plan, epoch, train_x, train_y, rng, emit)
        if problem is not None:
            stopped = f"{problem}; kept the weights of epoch {best_epoch} (try a lower --lr)"
            log.warning("fine-tuning stopped: %s", stopped)
            emit({"kind": "stop", "epoch": epoch, "reason": stopped})
            break
        if run.world > 1:  # batch statistics differ per rank: one set of running statistics for all
            for m in net.renorms.values():
                for buf in (m.running_mean, m.running_var):
                    torch.distributed.all_reduce(buf)
                    buf /= run.world
        val = _validate(torch, run, val_x, val_y, teacher_val)
        entry = {"epoch": epoch, "steps": len(losses), "train_loss": float(np.mean(losses)),
                 "train_acc": float(np.mean(accs)) if train_y is not None else None,
                 "val": val, "lr": lr, "seconds": time.perf_counter() - te}
        history.append(entry)
        if not select or metric is None or _better(metric, val, best_val):
            best_val, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        log.info("epoch %d/%d: loss %.4f, %s %s", epoch, opts.epochs, entry["train_loss"], metric, val)
        emit({"kind": "epoch", "epochs": opts.epochs, "metric": metric, "best_epoch": best_epoch, **entry})
    net.load_state_dict(best_state)
    return FinetuneResult(
        model=net.state_to_onnx(model), history=tuple(history), best_epoch=best_epoch, device=str(run.device),
        stopped_reason=stopped, seconds=0.0, metric=metric, initial_val=initial_val, best_val=best_val,
    )


def _shard_perm(rng: np.random.Generator, n: int, run: _Run) -> np.ndarray:
    """Same permutation on every rank (seeded by epoch draw), then this rank's shard."""
    seed = int(rng.integers(2**31)) if run.rank == 0 else 0
    torch = _require_torch()
    t = torch.tensor([seed], device=run.device)
    torch.distributed.broadcast(t, 0)
    return np.random.default_rng(int(t.item())).permutation(n)[run.rank :: run.world]


def _optimizer(torch, net, opts: FinetuneOptions):
    decay = set(net.weight_names)
    groups = [
        {"params": [p for n, p in net.named_onnx_parameters() if n in decay], "weight_decay": opts.weight_decay},
        {"params": [p for n, p in net.named_onnx_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    norm = net.renorm_parameters()
    if groups[1]["params"] or norm:
        groups[1]["params"] = groups[1]["params"] + norm  # re-inserted BatchNorm γ, β: no weight decay
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise FinetuneError("the model has no trainable float initializers", fix="fine-tune a model with Conv/Gemm weights")
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum)
    return torch.optim.AdamW(groups, lr=opts.lr)


def finetune_ddp_entry(
    model: onnx.ModelProto,
    train_x: np.ndarray,
    train_y: np.ndarray | None = None,
    *,
    out: str | os.PathLike | None = None,
    **kwargs: Any,
) -> FinetuneResult:
    """Entry point for ``torchrun``: join the process group, train, rank 0 saves ``out``.

    Reads the ``LOCAL_RANK`` torchrun sets, uses ``cuda:LOCAL_RANK`` with NCCL
    when GPUs are present (gloo on CPU), and leaves the group afterwards if it
    created it. ``kwargs`` go to :func:`finetune`.
    """
    torch = _require_torch()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    opts = kwargs.pop("options", None) or FinetuneOptions()
    cuda = torch.cuda.is_available() and opts.device != "cpu"
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        if cuda:
            torch.cuda.set_device(local_rank)
            opts = dataclasses.replace(opts, device=f"cuda:{local_rank}")
        result = finetune(model, train_x, train_y, options=opts, **kwargs)
        if out is not None and dist.get_rank() == 0:
            save_model(result.model, out)
        dist.barrier()
        return result
    finally:
        if created:
            dist.destroy_process_group()
