"""Training-step time of the ONNX torch executor vs the equivalent hand-written torch module.

One step = forward + backward + SGD step (momentum 0.9), batch 64, train mode.
Three columns per model:

* ``torch+BN``: the zoo module itself (Conv -> BatchNorm in train mode);
* ``torch folded``: the same module with BN folded into the convs
  (``torch.fx`` fusion) -- the same math the exported ONNX graph holds;
* ``executor``: :class:`onnxprune.torch_exec.OnnxModule` on the legacy export.

``ratio`` is executor / torch folded (target <= 1.2). Median of ``--iters``
steps after ``--warmup`` steps, the three taking turns; 1 thread by default for stable numbers on
shared machines.

    python benchmarks/finetune_speed.py [--iters 40] [--threads 1] [--device cpu] [--exporter legacy] [--out PATH]

Prints the table after the provenance header (command, commit, machine, load);
``--out`` also writes it as markdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from onnxprune.graph import load_model  # noqa: E402
from onnxprune.torch_exec import OnnxModule  # noqa: E402

from benchmarks import provenance  # noqa: E402

TARGET = 1.2
MODELS = {"plain_cnn": 1.0, "vgg11_bn": 0.5, "resnet20": 1.0}


def _stepper(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def step() -> float:
        if x.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return step


def step_times(nets: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, *, warmup: int, iters: int) -> list[float]:
    """Median seconds of one forward+backward+SGD step for each net.

    The nets take turns in blocks of 5 steps, so load changes on a shared
    machine hit all of them alike.
    """
    steps = [_stepper(n, x, y) for n in nets]
    for s in steps:
        for _ in range(warmup):
            s()
    times: list[list[float]] = [[] for _ in nets]
    for _ in range(max(1, iters // 5)):
        for s, t in zip(steps, times):
            t.extend(s() for _ in range(5))
    return [statistics.median(t) for t in times]


def folded(net: torch.nn.Module) -> torch.nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(net.eval(), inplace=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--exporter", default="legacy", choices=("legacy", "dynamo"))
    ap.add_argument("--out", default=None, help="also write the report as markdown (e.g. benchmarks/results/finetune_speed.md)")
    args = ap.parse_args(argv)
    prov = provenance.start(script="benchmarks/finetune_speed.py", argv=list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(s: str) -> None:  # printed now, kept for the markdown file
        lines.append(s)
        print(s, flush=True)

    from models.export import export_onnx
    from models.zoo import ZOO, randomize_bn

    dev = torch.device(args.device)
    say(f"device {dev}, {args.threads} thread(s), batch {args.batch}, {args.exporter} export, median of {args.iters} steps")
    header = f"{'model':<18}{'width':>6}{'torch+BN ms':>13}{'folded ms':>11}{'executor ms':>13}{'ratio':>7}{'vs BN':>7}"
    say(header)
    say("-" * len(header))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, width in MODELS.items():
            ctor, shape = ZOO[name]
            torch.manual_seed(0)
            net = randomize_bn(ctor(width=width), seed=0).eval()
            model = load_model(export_onnx(net, Path(tmp) / f"{name}.onnx", input_shape=(2, *shape[1:]), exporter=args.exporter))
            x = torch.randn(args.batch, *shape[1:], device=dev)
            y = torch.randint(0, 10, (args.batch,), device=dev)
            kw = dict(warmup=args.warmup, iters=args.iters)
            fold = folded(net).to(dev)
            t_bn, t_fold, t_exec = step_times([net.to(dev), fold, OnnxModule(model).to(dev)], x, y, **kw)
            ratio = t_exec / t_fold
            worst = max(worst, ratio)
            say(f"{name:<18}{width:>6.2f}{t_bn * 1e3:>13.2f}{t_fold * 1e3:>11.2f}{t_exec * 1e3:>13.2f}{ratio:>7.2f}{t_exec / t_bn:>7.2f}")
    say(f"worst ratio {worst:.2f} (target <= {TARGET})")
    head = "\n".join(prov.header())
    sys.stdout.write("\n" + head + "\n")
    if args.out:
        provenance.write_atomic(args.out, "# Training-step time: ONNX torch executor vs torch\n\n" + head + "\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
