"""Train a zoo architecture on Fashion-MNIST (CPU), export it to ONNX, write a JSON sidecar.

Recipe: SGD (momentum 0.9, nesterov, weight decay on conv/linear weights only), one-epoch
linear warm-up then cosine decay per step, light augmentation (random crop with 2-pixel
zero padding + horizontal flip), seeded. Inputs are the 1x32x32 ``[0, 1]`` tensors of
:mod:`models.fashion_mnist` (28x28 zero-padded to 32x32), so CIFAR architectures apply
unchanged with ``in_channels=1``.

Example::

    python -m models.train vgg11_bn --epochs 12 --width 0.25 --out models/demo/fmnist_vgg11.onnx

writes ``fmnist_vgg11.onnx`` (legacy exporter, dynamic batch axis) and
``fmnist_vgg11.json`` (arch, width, epochs, val/test accuracy in torch and ONNX Runtime,
training time, the exact command).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from models.fashion_mnist import load_split


def augment(x, gen, *, pad: int = 2):
    """Random crop (zero padding ``pad``) + random horizontal flip of a ``(B, C, H, W)`` batch."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (B,1,H,1)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (B,1,1,W)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(x.shape[1])[None, :, None, None]
    out = xp[bi, ci, rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def predict_torch(model, x: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """Arg-max class per sample of ``model`` (put in eval mode)."""
    import torch

    model.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            preds.append(model(torch.from_numpy(x[i:i + batch_size])).argmax(1).numpy())
    return np.concatenate(preds)


def predict_ort(path: Path, x: np.ndarray, *, batch_size: int = 500, threads: int = 1) -> np.ndarray:
    """Arg-max class per sample of the ONNX model at ``path`` (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    preds = [sess.run(None, {name: x[i:i + batch_size]})[0].argmax(1)
             for i in range(0, len(x), batch_size)]
    return np.concatenate(preds)


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent, rounded to 2 decimals."""
    return round(100.0 * float((pred == y).mean()), 2)


def evaluate_torch(model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode."""
    return accuracy(predict_torch(model, x), y)


def evaluate_ort(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (%) of the ONNX model at ``path`` with ONNX Runtime on CPU."""
    return accuracy(predict_ort(path, x), y)


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from a labeled ``.npz`` (loaded without pickle)."""
    with np.load(path, allow_pickle=False) as d:
        if not {"x", "y"} <= set(d.files):
            raise SystemExit(f"error: {path} needs arrays 'x' and 'y' (has {', '.join(d.files)})")
        return d["x"], d["y"]


def param_groups(model, weight_decay: float):
    """Weight decay on conv/linear weights only (not on biases or BN affine parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay from ``base`` to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * t))


def build_model(arch: str, width: float):
    from models.zoo import ZOO

    if arch not in ZOO:
        raise SystemExit(f"error: unknown architecture {arch!r}; choose from {', '.join(sorted(ZOO))}")
    ctor, _default_shape = ZOO[arch]
    return ctor(num_classes=10, in_channels=1, width=width)


def train(args):
    """Train as ``args`` say; return ``(model in eval mode, result dict)``."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_tr, y_tr = load_split("train", n=args.train_n)
    x_val, y_val = load_split("val")
    x_te, y_te = load_split("test")
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)

    model = build_model(args.arch, args.width)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)  # channels-last convs are ~2x faster on CPU here
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch} width={args.width}: {n_params:,} parameters, "
          f"{len(x_tr):,} training images, {torch.get_num_threads()} threads", flush=True)

    opt = torch.optim.SGD(param_groups(model, args.wd), lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = min(steps_per_epoch, total // 10 or 1)
    step, history = 0, []
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(xt), generator=gen)
        loss_sum, seen = 0.0, 0
        for i in range(0, len(xt), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = augment(xt[idx], gen).contiguous(memory_format=fmt), yt[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, args.lr)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
        train_s = time.perf_counter() - t0
        val_acc = evaluate_torch(model, x_val, y_val)
        history.append({"epoch": epoch, "loss": round(loss_sum / seen, 4),
                        "val_acc": round(val_acc, 2), "seconds": round(train_s, 1)})
        print(f"epoch {epoch:3d}/{args.epochs}  {train_s:6.1f}s  loss {loss_sum / seen:.4f}  "
              f"val {val_acc:.2f}%", flush=True)
    train_time = time.perf_counter() - t_start
    train_cpu = time.process_time() - cpu_start

    model = model.to(memory_format=torch.contiguous_format).eval()
    result = {
        "arch": args.arch,
        "width": args.width,
        "epochs": args.epochs,
        "train_images": len(x_tr),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.wd,
        "label_smoothing": args.label_smoothing,
        "seed": args.seed,
        "parameters": n_params,
        "input": "float32 (N,1,32,32) in [0,1]; Fashion-MNIST 28x28 zero-padded by 2",
        "val_acc_torch": round(val_acc, 2),
        "test_acc_torch": round(evaluate_torch(model, x_te, y_te), 2),
        "train_seconds": round(train_time, 1),
        "train_cpu_seconds": round(train_cpu, 1),
        "threads": args.threads,
        "channels_last": args.channels_last,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "history": history,
    }
    return model, result


def export_and_check(model, result: dict, out: Path,
                     extra_sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Export ``model`` to ``out`` (legacy exporter) and compare torch and ORT predictions."""
    from models.export import export_onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out, input_shape=(1, 1, 32, 32), exporter="legacy")
    result["onnx_bytes"] = out.stat().st_size
    sets = {"val": load_split("val"), "test": load_split("test")}
    sets.update(extra_sets)
    result["eval"] = {}
    for name, (x, y) in sets.items():
        pt, po = predict_torch(model, x), predict_ort(out, x)
        result["eval"][name] = {"n": len(y), "acc_torch": accuracy(pt, y), "acc_ort": accuracy(po, y),
                                "argmax_agreement": round(100.0 * float((pt == po).mean()), 2)}
        if (pt != po).any():
            print(f"WARNING: torch and ONNX Runtime disagree on {int((pt != po).sum())} of "
                  f"{len(y)} {name} samples", file=sys.stderr)
    result["val_acc_ort"] = result["eval"]["val"]["acc_ort"]
    result["test_acc_ort"] = result["eval"]["test"]["acc_ort"]
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.train",
                                description="Train a zoo CNN on Fashion-MNIST and export ONNX.")
    p.add_argument("arch", help="architecture name in models.zoo.ZOO, e.g. vgg11_bn")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--out", type=Path, required=True, help="output .onnx path (sidecar: .json)")
    p.add_argument("--train-n", type=int, default=None, metavar="N",
                   help="train on the first N of the 55,000 training images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="train in channels-last memory format (faster on CPU)")
    p.add_argument("--eval-npz", type=Path, action="append", default=[], metavar="NPZ",
                   help="also report torch/ORT accuracy on this labeled .npz (repeatable)")
    p.add_argument("--save-pt", type=Path, default=None, metavar="PATH",
                   help="also save the torch state_dict here")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    args = p.parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else argv

    extra_sets = {p.name: load_npz(p) for p in args.eval_npz}  # fail before training, not after
    model, result = train(args)
    if args.save_pt is not None:
        import torch

        torch.save(model.state_dict(), args.save_pt)
    result = export_and_check(model, result, args.out, extra_sets)
    result["command"] = "python -m models.train " + shlex.join(argv_list)
    sidecar = args.out.with_suffix(".json")
    sidecar.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["eval"].items():
        print(f"{name:>16s} ({r['n']:5d}): torch {r['acc_torch']:.2f}%  ONNX Runtime "
              f"{r['acc_ort']:.2f}%  argmax agreement {r['argmax_agreement']:.2f}%")
    print(f"ONNX file: {result['onnx_bytes']:,} bytes")
    print(f"wrote {args.out} and {sidecar}")


if __name__ == "__main__":
    main()
