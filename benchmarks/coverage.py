"""Coverage: how much of each architecture's conv MACs onnxprune can prune, and what blocks the rest.

    python benchmarks/coverage.py [--simplify none|onnxslim|onnxsim] [--only NAME ...]

Builds every model of ``models.zoo_extra.ALL`` (the zoo's CIFAR/ImageNet nets,
MobileNetV3/EfficientNet/ConvNeXt/FCN/ViT look-alikes, the YOLOv8-style
detector and segmenter) with seeded weights and BatchNorm at its default
statistics (not randomized: the exporters' deduplication of the all-zero
folded biases must show), exports each with both torch exporters (YOLO
models as Ultralytics does: fixed batch 1, ``imgsz`` metadata), optionally
runs a simplifier, analyzes it with :func:`onnxprune.groups.find_groups` and
writes ``benchmarks/results/coverage.md`` (``coverage_<simplifier>.md`` with
``--simplify``); the table is printed too.

Columns (MACs: Conv/ConvTranspose/Gemm/MatMul-with-constant-weights multiply-accumulates):

* *touched*: ``ChannelGraph.prunable_macs_share``, MACs of compute nodes at least one
  prunable group slices (input or output side);
* *out-prunable*: MACs of compute nodes whose output channels are all in prunable groups;
* *excl. outputs*: the same, leaving out compute nodes whose output channels reach a
  graph output (a path through non-compute ops; a compute node with a single output
  channel, such as YOLO's DFL conv, is passed through, since it carries no channel
  choice of its own). The goal: every CNN >= 95% here;
* *blocking reasons*: blocked groups by reason (node names and shapes elided), with
  the number of groups and the MACs of the nodes they would slice.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from benchmarks.provenance import write_atomic  # noqa: E402
from models.detector import export_yolo  # noqa: E402
from models.export import EXPORTERS, _quiet, export_onnx  # noqa: E402
from models.zoo_extra import ALL, build  # noqa: E402
from onnxprune.groups import find_groups  # noqa: E402

#: width per model (small, so the whole run takes minutes); others use 0.5
WIDTHS = {"resnet50": 0.25, "yolo_detector": 0.25, "yolo_segmenter": 0.25, "mobilenetv3_small": 1.0,
          "efficientnet_small": 1.0, "convnext_small": 1.0, "fcn_small": 1.0, "vit_small": 1.0}
YOLO = ("yolo_detector", "yolo_segmenter")


def provenance(command: str) -> list[str]:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"- command: `{command}`",
        f"- source commit: `{commit}`",
        f"- machine: {cpu}, {os.cpu_count()} cores (shared with other jobs), {platform.system()} {platform.machine()}",
        f"- onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, numpy {np.__version__}",
        f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
    ]


def simplify(path: Path, how: str) -> None:
    if how == "none":
        return
    m = onnx.load(str(path))
    with _quiet():
        if how == "onnxslim":
            import onnxslim

            m2 = onnxslim.slim(m)
        else:
            import onnxsim

            m2, ok = onnxsim.simplify(m)
            if not ok:
                raise RuntimeError("onnxsim could not validate the simplified model")
    del m2.metadata_props[:]
    m2.metadata_props.extend(m.metadata_props)
    onnx.save(m2, str(path))


def export(name: str, exporter: str, folder: Path, how: str) -> Path:
    model, shape = build(name, seed=0, width=WIDTHS.get(name, 0.5))
    path = folder / f"{name}_{exporter}.onnx"
    if name in YOLO:
        export_yolo(model, path, imgsz=shape[-1], exporter=exporter)
    else:
        export_onnx(model, path, input_shape=shape, exporter=exporter)
    simplify(path, how)
    return path


def macs_of(c) -> int:
    return c.spatial * c.kernel * len(c.out_atoms) * (c.in_fixed if c.in_atoms is None else len(c.in_atoms))


def reaching_outputs(cg) -> set[str]:
    """Compute nodes whose output reaches a graph output through non-compute ops
    (compute nodes with one output channel are passed through)."""
    model = cg.model
    stop = {c.node for c in cg.compute if len(c.out_atoms) > 1}
    consumers = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in model.graph.output}
    by_name = {n.name: n for n in model.graph.node}
    found = set()
    for c in cg.compute:
        todo, seen = deque(by_name[c.node].output), set()
        while todo:
            t = todo.popleft()
            if t in seen:
                continue
            seen.add(t)
            if t in outputs:
                found.add(c.node)
                break
            for n in consumers[t]:
                if n.name not in stop:
                    todo.extend(n.output)
    return found


def reason_kind(reason: str) -> str:
    r = re.sub(r"'[^']*'", "'…'", reason)
    r = re.sub(r"\(\[.*?\]\)", "(…)", r)
    r = re.sub(r"\[[^\]]*\]", "[…]", r)
    return r


def analyze(path: Path) -> dict:
    t = time.perf_counter()
    cg = find_groups(onnx.load(str(path)))
    seconds = time.perf_counter() - t
    ok = np.zeros(cg.n_units, dtype=bool)
    for g in cg.prunable_groups:
        ok[list(g.units)] = True
    out_ok = {c.node: bool(ok[cg.unit_of_atom[c.out_atoms]].all()) for c in cg.compute}
    total = sum(macs_of(c) for c in cg.compute)
    reach = reaching_outputs(cg)
    inner = [c for c in cg.compute if c.node not in reach]
    inner_total = sum(macs_of(c) for c in inner)
    kinds: dict[str, list] = defaultdict(lambda: [0, 0, ""])
    for g in cg.groups:
        if g.prunable:
            continue
        k = kinds[reason_kind(g.blocked_reason)]
        k[0] += 1
        k[1] += g.macs
        k[2] = k[2] or g.blocked_reason
    return {
        "macs": cg.total_macs,
        "groups": len(cg.groups),
        "prunable_groups": len(cg.prunable_groups),
        "touched": cg.prunable_macs_share,
        "out": cg.output_prunable_share,
        "inner": sum(macs_of(c) for c in inner if out_ok[c.node]) / inner_total if inner_total else 1.0,
        "reasons": sorted(kinds.items(), key=lambda kv: (-kv[1][1], -kv[1][0])),
        "identity_in": sum(n.op_type == "Identity" for n in onnx.load(str(path)).graph.node),
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simplify", choices=("none", "onnxslim", "onnxsim"), default="none")
    ap.add_argument("--only", nargs="*", help="model names (default: all)")
    ap.add_argument("--out", type=Path, help="results file (default benchmarks/results/coverage[_SIMPLIFIER].md)")
    args = ap.parse_args()
    names = args.only or list(ALL)
    command = "python benchmarks/coverage.py" + (f" --simplify {args.simplify}" if args.simplify != "none" else "") + (
        f" --only {' '.join(args.only)}" if args.only else "")
    header = ("| model | exporter | MACs | Identity nodes | prunable groups | touched | out-prunable | excl. outputs | top blocking reasons (groups, MACs sliced) |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---|")
    print(header, flush=True)
    rows, details, below = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for exp in EXPORTERS:
                try:
                    r = analyze(export(name, exp, Path(tmp), args.simplify))
                except Exception as exc:  # noqa: BLE001 - one failing model must not hide the others
                    row = f"| {name} | {exp} | – | – | – | – | – | – | FAILED: {type(exc).__name__}: {str(exc)[:200]} |"
                    rows.append(row)
                    print(row, flush=True)
                    continue
                top = "; ".join(f"{k} ({n}, {m:,})" for k, (n, m, _) in r["reasons"][:3]) or "–"
                row = (f"| {name} | {exp} | {r['macs']:,} | {r['identity_in']} | {r['prunable_groups']}/{r['groups']} | {r['touched']:.1%} | "
                       f"{r['out']:.1%} | {r['inner']:.1%} | {top} |")
                rows.append(row)
                print(row, flush=True)
                if r["inner"] < 0.95:
                    below.append(f"{name} ({exp}): {r['inner']:.1%}")
                for k, (n, m, example) in r["reasons"]:
                    details.append(f"| {name} | {exp} | {n} | {m:,} | {example} |")
    text = "\n".join([
        "# Coverage: conv MACs in prunable groups",
        "",
        *provenance(command),
        f"- simplifier: {args.simplify}; BatchNorm at default statistics (not randomized); widths: "
        + ", ".join(f"{k} {v}" for k, v in WIDTHS.items()) + ", others 0.5; YOLO models exported as Ultralytics does (batch 1, imgsz metadata)",
        "",
        "MACs: Conv/ConvTranspose/Gemm/MatMul (constant weights) multiply-accumulates per sample. "
        "*Identity nodes*: in the exported file (the legacy exporter's deduplicated constants, e.g. all-zero folded biases). "
        "*touched*: MACs of nodes a prunable group slices; *out-prunable*: MACs of nodes whose output channels are all prunable; "
        "*excl. outputs*: out-prunable, leaving out nodes whose channels reach a graph output (goal: >= 95% for every CNN).",
        "",
        header,
        *rows,
        "",
        "Below 95% excluding output channels: " + ("; ".join(below) if below else "none") + ".",
        "",
        "## Every blocking reason (one example each)",
        "",
        "| model | exporter | groups | MACs sliced | example |",
        "|---|---|---:|---:|---|",
        *details,
        "",
    ])
    out = args.out or ROOT / "benchmarks" / "results" / ("coverage.md" if args.simplify == "none" else f"coverage_{args.simplify}.md")
    write_atomic(out, text)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
