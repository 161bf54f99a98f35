"""Scale: prune a ResNet-50 and a > 2 GB external-data model; time and peak memory.

Builds two models in ``--out`` (a temporary folder by default):

* ``resnet50.onnx``: ImageNet ResNet-50 from ``models.zoo`` (legacy export,
  1x3x224x224), about 100 MB, weights inline;
* ``vgg_wide.onnx`` + ``vgg_wide.onnx.data``: a VGG-like net written with
  ``onnx.helper`` + numpy, weights in one external data file (> 2 GiB, over
  the protobuf limit): Conv 3->256, Conv 256->512 on 16x16, Flatten (131072),
  Gemm 131072->4096 (2 GiB of float32 by itself), Gemm 4096->4096, Gemm 4096->10.

Each model is then pruned with the library (``prune(..., strategy="uniform",
target_flops=0.3)``) in a fresh subprocess, so its peak resident memory
(``VmHWM``) belongs to that run alone. ``--stages`` runs a second subprocess per
model that walks the same stages by hand and prints the peak during each, to
show where memory goes. Target: peak memory <= 2x the model size. Both the
raw peak and the peak above ``base`` (the worker after importing
``onnxprune.api``: Python, numpy and onnx, 46 MiB, which no run can go below)
are reported; for a 97 MiB model that floor alone is 0.47x.

    python benchmarks/scale.py [--out DIR] [--keep] [--only vgg_wide] [--stages] [--results PATH]

Writes the table, after the provenance header (command, commit, machine,
load), to ``benchmarks/results/scale.md`` (``--results -``: print only).
The figures below are the notes of the change that introduced the low-memory
path; the results file is what the current code gives.

Measured (2 shared CPU cores, 23 GiB RAM, onnx 1.23, ORT 1.31, protobuf 7 (upb);
times vary 2-3x with the machine's load):

    model     size MiB  pruned MiB  saved as  MACs -%  prune s  peak MiB  peak/size  (peak-base)/size
    resnet50        97          70    inline     30.0      1.2       238       2.44              1.97
    vgg_wide      2117        1498  external     30.0     22.0      3002       1.42              1.40

Before this work (same machine and models): resnet50 2.4 s, peak 525 MiB
(5.39x, 4.9x above base); vgg_wide 79.1 s, peak 10693 MiB (5.05x).

Peak per stage (``--stages``; MiB, the whole process; before -> after):

    stage        resnet50    vgg_wide
    load_model   333 -> 170   4216 ->   48
    find_groups  273 -> 180   8386 ->   58
    score_units  214 -> 183   4291 -> 2120
    apply_mask   372 -> 224  10648 -> 2928
    save_model   516 -> 230   8750 -> 2969

Where the memory went, and what changed:

* ``load_model``: ``onnx.load`` holds the file's bytes and the parsed model
  at once, and ``onnx.checker.check_model(path)`` does the same in C++ (2x
  each, and they overlapped: 3.4x). Files >= 64 MiB are now parsed one field
  (one initializer) at a time and checked tensor by tensor
  (``tensors.parse_model_file``, ``tensors.check_in_parts``; the same
  models and error messages as before on 1,792 flipped, truncated and
  mutated files, ~200 of them in tests/test_memory.py). vgg_wide's external data (> 2 GB) is no
  longer read at all: its large initializers stay on disk as *lazy* tensors
  (read-only memory maps or block reads of the validated data file).
* ``find_groups`` copied the model (``CopyFrom``); it now analyzes the model
  itself when its nodes are named, and the weights' transient copies the
  rules read are returned to the OS (``malloc_trim``).
* ``score_units``: norms in float64 blocks, without transposed copies; for
  vgg_wide the 2 GiB weight is memory-mapped, so its pages count while they
  are read (1.0x).
* ``apply_mask`` copied the model, then replaced sliced weights (upb keeps
  the replaced bytes until the message dies). It now builds the output from
  a skeleton (no initializers), cuts each sliced weight from its source block
  by block, largest first, and copies each other weight once. Its peak is the
  input plus the output plus about twice the largest output tensor
  (vgg_wide's fc1: 1.45 GiB as an array, then as bytes for protobuf).
* ``save_model`` copied the model, converted it and serialized it whole. It
  now writes one tensor at a time: inline (byte-identical to
  ``SerializeToString``) or to the external data file, lazy tensors copied
  file to file. The stages run saves vgg_wide's 1.5 GB result inline; the
  prune run keeps the input's external layout.

Not below 2x raw for resnet50: Python + numpy + onnx take 46 MiB before any
model is read, and ``prune()`` holds the input (``cg.model``, ~103 MiB in
memory) and the pruned model (~70 MiB) together until it returns.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("resnet50", "vgg_wide")
TARGET_RATIO = 2.0
MIB = 2**20


# --------------------------------------------------------------------------- builders
def build_resnet50(folder: Path) -> Path:
    from models.export import export_onnx
    from models.zoo import build

    model, shape = build("resnet50")
    return export_onnx(model, folder / "resnet50.onnx", input_shape=shape, exporter="legacy")


def build_vgg_wide(folder: Path, *, fc_in_channels: int = 512, hidden: int = 4096, seed: int = 0) -> Path:
    """Write ``vgg_wide.onnx`` whose weights live in ``vgg_wide.onnx.data``, chunk by chunk (low memory)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    path = folder / "vgg_wide.onnx"
    data_name = path.name + ".data"
    hw = 16
    specs = {  # name: shape; weights ~ U(-a, a) with a = sqrt(3 / fan_in) (unit-variance activations)
        "conv1.w": (256, 3, 3, 3),
        "conv1.b": (256,),
        "conv2.w": (fc_in_channels, 256, 3, 3),
        "conv2.b": (fc_in_channels,),
        "fc1.w": (hidden, fc_in_channels * hw * hw),
        "fc1.b": (hidden,),
        "fc2.w": (hidden, hidden),
        "fc2.b": (hidden,),
        "fc3.w": (10, hidden),
        "fc3.b": (10,),
    }
    inits = []
    offset = 0
    with open(folder / data_name, "wb") as f:
        for name, shape in specs.items():
            n = int(np.prod(shape))
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            a = np.float32(np.sqrt(3.0 / fan_in)) if len(shape) > 1 else np.float32(0.01)
            step = 1 << 24
            for s in range(0, n, step):  # 64 MB at a time
                chunk = rng.random(min(step, n - s), dtype=np.float32)
                chunk *= 2 * a
                chunk -= a
                f.write(chunk.tobytes())
            t = TensorProto()
            t.name, t.data_type = name, TensorProto.FLOAT
            t.dims.extend(shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(n * 4))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += n * 4
            inits.append(t)
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.w", "fc1.b"], ["f1"], name="fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "fc2.w", "fc2.b"], ["f2"], name="fc2", transB=1),
        helper.make_node("Relu", ["f2"], ["r4"], name="relu4"),
        helper.make_node("Gemm", ["r4", "fc3.w", "fc3.b"], ["logits"], name="fc3", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "vgg_wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, hw, hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def model_bytes(path: Path) -> int:
    """The model file plus its external data files (same folder)."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# --------------------------------------------------------------------------- workers (fresh processes)
def _maxrss() -> int:
    """Peak resident memory of this process image, in bytes.

    Linux: ``VmHWM`` from /proc/self/status. ``ru_maxrss`` is not used there
    because the kernel carries it across exec: a worker forked from this
    (torch-importing, model-building) parent would report the parent's peak.
    Elsewhere: ``ru_maxrss`` (bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _rss() -> int:
    """Current resident memory in bytes (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def worker_prune(model: Path, out: Path) -> dict:
    """Prune with the public API exactly as the CLI does (uniform, -30%)."""
    from onnxprune.api import PruneOptions, prune

    base = _maxrss()
    t = time.perf_counter()
    result = prune(model, options=PruneOptions(target_flops=0.3, strategy="uniform"), output=out, force=True)
    seconds = time.perf_counter() - t
    r = result.report
    return {
        "seconds": seconds,
        "peak": _maxrss(),
        "base": base,
        "timings": r.timings,
        "macs_before": r.macs_before,
        "macs_after": r.macs_after,
        "params_before": r.params_before,
        "params_after": r.params_after,
    }


def worker_stages(model: Path, out: Path) -> dict:
    """The same stages as prune() by hand, with the peak (so far) after each one."""
    import numpy as np

    from onnxprune import allocate
    from onnxprune.flops import count
    from onnxprune.graph import load_model, save_model
    from onnxprune.groups import find_groups
    from onnxprune.importance import score_units
    from onnxprune.rewrite import apply_mask

    stages = [("start", _rss(), _maxrss(), 0.0)]
    live = [_rss()]

    def mark(name, t0):
        stages.append((name, live[0], _maxrss(), time.perf_counter() - t0))
        live[0] = _rss()
        _reset_peak()  # the next stage's peak is its own

    _reset_peak()

    t = time.perf_counter()
    m = load_model(model)
    mark("load_model", t)
    t = time.perf_counter()
    cg = find_groups(m)
    del m  # as prune() does (cg.model is m itself when its nodes are named)
    mark("find_groups", t)
    t = time.perf_counter()
    count(cg.model, shapes=cg.shapes)
    mark("count", t)
    t = time.perf_counter()
    scores = score_units(cg, "l1")
    mark("score_units", t)
    t = time.perf_counter()
    alloc = allocate.uniform(cg, scores, target=0.3, round_to=8)
    mask = allocate.MaskBuilder(cg, scores).mask(alloc.keep)
    mark("allocate", t)
    t = time.perf_counter()
    pruned = apply_mask(cg, np.asarray(mask))
    mark("apply_mask", t)
    t = time.perf_counter()
    save_model(pruned, out)
    mark("save_model", t)
    return {"stages": stages}


def _run_worker(kind: str, model: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, f"--worker-{kind}", str(model), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_output(out: Path) -> str:
    """Loads with onnxprune (external data too) and passes the ONNX checker."""
    import onnx

    data = out.with_name(out.name + ".data")
    onnx.checker.check_model(str(out))  # path form: works past 2 GB, does not load the weights
    return "external" if data.exists() else "inline"


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for the models (default: a temporary folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--only", choices=MODELS, action="append", help="run only this model (repeatable)")
    ap.add_argument("--stages", action="store_true", help="also print the peak memory after each stage")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "scale.md"), help="markdown output ('-': print only)")
    ap.add_argument("--worker-prune", nargs=2, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker-stages", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_prune:
        print(json.dumps(worker_prune(*args.worker_prune)))
        return
    if args.worker_stages:
        print(json.dumps(worker_stages(*args.worker_stages)))
        return

    from benchmarks import provenance

    prov = provenance.start(script="benchmarks/scale.py")
    folder = args.out or Path(tempfile.mkdtemp(prefix="onnxprune-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    names = args.only or list(MODELS)
    need = (0.2 if names == ["resnet50"] else 2.4 + 1.6 + (1.6 if args.stages else 0)) * 2**30
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(f"{folder} has {free / 2**30:.1f} GiB free; this benchmark needs about {need / 2**30:.1f} GiB")
    rows = []
    try:
        for name in names:
            path = folder / f"{name}.onnx"
            t = time.perf_counter()
            if not path.exists():
                (build_resnet50 if name == "resnet50" else build_vgg_wide)(folder)
            build_s = time.perf_counter() - t
            size = model_bytes(path)
            out = folder / f"{name}.pruned.onnx"
            res = _run_worker("prune", path, out)
            layout = _check_output(out)
            rows.append((name, size, build_s, res, model_bytes(out), layout))
            print(
                f"{name}: {size / MIB:.0f} MiB, pruned in {res['seconds']:.1f}s, peak {res['peak'] / MIB:.0f} MiB"
                f" ({res['peak'] / size:.2f}x), timings {json.dumps({k: round(v, 2) for k, v in res['timings'].items()})}",
                flush=True,
            )
            if args.stages:
                st = _run_worker("stages", path, folder / f"{name}.stages.onnx")["stages"]
                print(f"  {name} stages: RSS when the stage starts, peak RSS during the stage, seconds")
                for stage, start, peak, sec in st:
                    print(f"    {stage:<12} start {start / MIB:7.0f} MiB   peak {peak / MIB:7.0f} MiB ({peak / size:.2f}x model)  {sec:6.1f}s")
                for p in folder.glob(f"{name}.stages.onnx*"):
                    p.unlink()
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif args.keep:
            print(f"models kept in {folder}")

    print()
    head = (
        f"{'model':<10} {'size MiB':>9} {'pruned MiB':>10} {'saved as':>9} {'MACs -%':>8} {'prune s':>8} {'peak MiB':>9}"
        f" {'base MiB':>9} {'peak/size':>9} {'<= 2x':>6} {'(peak-base)/size':>16} {'<= 2x':>6}"
    )
    print(head)
    print("-" * len(head))
    for name, size, _, res, out_size, layout in rows:
        red = 1 - res["macs_after"] / res["macs_before"]
        ratio, net = res["peak"] / size, (res["peak"] - res["base"]) / size
        print(
            f"{name:<10} {size / MIB:9.0f} {out_size / MIB:10.0f} {layout:>9} {100 * red:8.1f} {res['seconds']:8.1f}"
            f" {res['peak'] / MIB:9.0f} {res['base'] / MIB:9.0f} {ratio:9.2f} {'yes' if ratio <= TARGET_RATIO else 'NO':>6}"
            f" {net:16.2f} {'yes' if net <= TARGET_RATIO else 'NO':>6}"
        )
    print(
        "peak = peak RSS (VmHWM) of a fresh process that runs prune(); base = that process after importing"
        " onnxprune.api (Python, numpy, onnx: the floor of any run); both ratios are shown"
    )
    if args.results != "-":
        provenance.write_atomic(args.results, markdown(rows, prov))
        print(f"wrote {args.results}")


def markdown(rows, prov) -> str:
    """The results file: provenance header, one row per model, what the columns mean."""
    out = ["# Scale: pruning ResNet-50 and a > 2 GB external-data model", "", *prov.header(), "",
           "| model | size MiB | pruned MiB | saved as | MACs removed | build s | prune s | peak MiB | base MiB | peak / size | (peak - base) / size |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, size, build_s, res, out_size, layout in rows:
        red = 1 - res["macs_after"] / res["macs_before"]
        out.append(f"| {name} | {size / MIB:.0f} | {out_size / MIB:.0f} | {layout} | {red:.1%} | {build_s:.1f} | {res['seconds']:.1f} | "
                   f"{res['peak'] / MIB:.0f} | {res['base'] / MIB:.0f} | {res['peak'] / size:.2f} | {(res['peak'] - res['base']) / size:.2f} |")
    timings = {name: res["timings"] for name, _, _, res, _, _ in rows}
    out += ["",
            "`prune(path, strategy=\"uniform\", target_flops=0.3)` in a fresh subprocess per model. size = the model file plus its external data; "
            "peak = peak resident memory (VmHWM) of that subprocess; base = the subprocess after importing `onnxprune.api` (Python, numpy, onnx), "
            f"the floor of any run. Target: peak <= {TARGET_RATIO:g}x the model size. Memory does not depend on the machine's load; "
            "the seconds do (shared machine, load in the header). resnet50: `models.zoo` ImageNet ResNet-50, legacy export, 1x3x224x224; "
            "vgg_wide: a VGG-like net written with `onnx.helper`, weights in one external data file (> 2 GiB).",
            "", "Stage times inside `prune()` (s): " + "; ".join(f"{n}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()) for n, t in timings.items()) + "."]
    return "\n".join(out) + "\n"

if __name__ == "__main__":
    main()
