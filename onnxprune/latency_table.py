"""Per-layer latency tables measured on the runtime, cached on disk.

For every compute node (Conv, Gemm, MatMul with a constant weight) the time
is measured as a function of kept input and output channels, at the counts a
group can really take on this provider (multiples of :func:`~onnxprune.hardware.channel_step`,
the full count, and half/quarter steps for groups of at most two steps).

**Why standalone single-layer models** (not profiling the full model): a table
needs the time of one layer at many channel counts while the rest of the
model is unchanged. Profiling the full model gives each node's time only at
the channel counts of the model that ran, so covering the counts would take
one full-model run per count and per layer, and ORT's per-node profile does
not attribute the layout reorders it inserts. A standalone model with the
node's attributes, input size, batch and layout runs in milliseconds, and
identical layers (ResNet blocks, repeated VGG convs) share one entry, also
across models. What standalone layers miss (elementwise ops, pooling, the
reorders ORT inserts between layers, session overhead) is fitted per node
from the measured full model (:mod:`onnxprune.latency`).

**Separable tables.** Measuring every (input, output) pair is quadratic, so a
conv is measured along its output counts (inputs full) and its input counts
(outputs full): ``t(ci, co) = t(C, K) * t(ci, K)/t(C, K) * t(C, co)/t(C, K)``.
Depthwise convs have one axis. Where a dimension has more than ``max_points``
candidate counts, a subset is measured (the smallest, the full count, the
step below it, evenly spaced between) and multiples of the step in between
are interpolated linearly (time is linear in channels between steps); a count
that is not a multiple of the step costs what the next measured count costs
(ORT pads it up), so the staircase is never smoothed away.

**Cache.** One JSON file per measurement setting (provider, batch, threads,
ORT version, CPU or GPU identity): ``{layer signature: {point: seconds}}``,
flushed as points are measured, so an interrupted build resumes and other
models with the same layers reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import DeviceError, OnnxPruneError, UsageError
from .graph import write_text_atomic
from .hardware import channel_step, cpu_identity
from .runtime import CPU, CUDA, available_providers, make_session, ort_version, resolve_providers

log = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
LATENCY_DEVICES = ("auto", "cpu", "cuda", "tensorrt")
TABLE_VERSION = 1
MAX_POINTS = 8  # measured counts per table axis; multiples of the step in between are interpolated


class MeasurementError(OnnxPruneError):
    """A latency measurement is too noisy to trust, or ran on another provider than claimed."""


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured: the provider evaluation uses, batch, threads (stated in every report).

    ``spinning`` off: ORT's worker threads sleep between ops; on a machine shared with other jobs
    a spinning worker steals the time slice of the thread doing the work, and figures become noise.
    """

    provider: str = CPU
    batch: int = 1
    threads: int = 1
    spinning: bool = False

    def providers(self) -> list[str]:
        return {CPU: [CPU], CUDA: [CUDA, CPU], TRT: [TRT, CUDA, CPU]}[self.provider]

    @property
    def config(self) -> dict[str, str]:
        return {"session.intra_op.allow_spinning": "1" if self.spinning else "0"}

    @property
    def step(self) -> int:
        return channel_step(self.provider)

    def describe(self) -> str:
        """``"batch 1, CPUExecutionProvider, 2 threads, no spinning"``."""
        spin = "spinning" if self.spinning else "no spinning"
        return f"batch {self.batch}, {self.provider}, {self.threads} thread{'s' if self.threads != 1 else ''}, {spin}"

    def identity(self) -> dict:
        """Everything a measured time depends on besides the layer: the cache key."""
        hw = gpu_identity() if self.provider != CPU else cpu_identity()
        return {**asdict(self), "ort": ort_version(), "hardware": hw, "version": TABLE_VERSION}


def gpu_identity() -> str:
    """The GPU name from ``nvidia-smi`` (the first device), or ``"unknown GPU"``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "unknown GPU"
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return (out.stdout.strip().splitlines() or ["unknown GPU"])[0]
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_settings(device: str = "auto", *, batch: int = 1, threads: int | None = None, spinning: bool = False) -> LatencySettings:
    """Settings on the provider ``device`` really gives (DeviceError if CUDA/TensorRT is asked for and absent).

    ``threads`` None: every core this process may use (ORT's default is the physical cores; stating
    the number keeps reports comparable)."""
    if isinstance(batch, bool) or int(batch) < 1:
        raise UsageError(f"--latency-batch must be >= 1, got {batch}", fix="e.g. --latency-batch 1")
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise UsageError(f"--latency-threads must be >= 1, got {threads}", fix="e.g. --latency-threads 2, or leave it out")
    if device not in LATENCY_DEVICES:
        raise UsageError(f"unknown device {device!r}", fix="pass --device auto, cpu, cuda or tensorrt")
    if device == "tensorrt":
        if TRT not in available_providers():
            raise DeviceError("TensorRT was requested but this onnxruntime has no TensorrtExecutionProvider", fix="install onnxruntime-gpu with TensorRT, or use --device cuda")
        resolve_providers("cuda")  # TensorRT needs a working CUDA as well
        provider = TRT
    else:
        provider = resolve_providers(device)[0]
    n = int(threads) if threads is not None else available_cores()
    return LatencySettings(provider=provider, batch=int(batch), threads=n, spinning=spinning)


def check_provider(session, settings: LatencySettings) -> None:
    """Refuse to time a session that does not run on ``settings.provider``.

    ``onnxruntime-gpu`` lists CUDA as available without a GPU and silently runs on CPU: a CPU
    figure reported as a GPU figure is worse than no figure. ``session`` is an ORT
    ``InferenceSession`` or an :class:`onnxprune.runtime.Session`."""
    got = session.get_providers() if hasattr(session, "get_providers") else [session.provider]
    if not got or got[0] != settings.provider:
        raise MeasurementError(
            f"asked to measure latency on {settings.provider} but the session runs on {got[0] if got else 'no provider'}; "
            "refusing to report its timings as " + settings.provider,
            fix="use --device cpu to measure on the CPU, or install a working GPU build (check onnxruntime.get_device() and nvidia-smi)",
        )


def open_session(model, settings: LatencySettings):
    """A :class:`~onnxprune.runtime.Session` on exactly ``settings.provider`` (checked)."""
    sess = make_session(model, device="auto", threads=settings.threads, providers=settings.providers(), config=settings.config)
    check_provider(sess._sess, settings)
    return sess


def time_runs(sess, feeds: Mapping[str, np.ndarray], *, min_runs: int = 5, min_seconds: float = 0.02, max_runs: int = 50, warmup: int = 2) -> float:
    """Fastest of several runs (seconds): the run least disturbed by other processes."""
    for _ in range(warmup):
        sess.run_once(feeds)
    best, n, t_start = float("inf"), 0, time.perf_counter()
    while n < min_runs or (time.perf_counter() - t_start < min_seconds and n < max_runs):
        t = time.perf_counter()
        sess.run_once(feeds)
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


# --------------------------------------------------------------------------- layer signatures
@dataclass(frozen=True)
class LayerSpec:
    """A compute node as a standalone model: what its time depends on.

    ``kind``: ``conv`` (group 1), ``dw`` (depthwise: group = cin = cout), ``gemm`` (``rows`` x
    ``cin`` times ``cin`` x ``cout``, rows per sample), ``other`` (grouped convs,
    ConvTranspose: scaled by MACs from the full-size time).
    """

    kind: str
    cin: int
    cout: int
    group: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    spatial: tuple[int, ...] = ()  # input spatial dims (conv) or rows per sample (gemm)
    bias: bool = True
    op: str = "Conv"

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def with_channels(self, cin: int, cout: int) -> "LayerSpec":
        group = cin if self.kind == "dw" else self.group
        return LayerSpec(self.kind, cin, cout, group, self.kernel, self.strides, self.pads, self.dilations, self.spatial, self.bias, self.op)


def _ints(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return tuple(int(v) for v in a.ints) if a.ints else int(a.i)
    return default


def layer_spec(node: onnx.NodeProto, shapes: Mapping[str, tuple], consts: Mapping[str, tuple]) -> LayerSpec:
    """The :class:`LayerSpec` of ``node`` from the analysis shapes (``consts``: initializer shapes)."""
    x = shapes.get(node.input[0]) or ()
    w = consts.get(node.input[1]) if len(node.input) > 1 else None
    w = w if w is not None else shapes.get(node.input[1]) if len(node.input) > 1 else None
    bias = len(node.input) > 2 and bool(node.input[2])
    if node.op_type == "Conv" and w is not None and len(x) >= 3 and all(isinstance(d, int) for d in x[2:]):
        group = int(_ints(node, "group", 1))
        cout, cin = int(w[0]), int(w[1]) * group
        nd = len(w) - 2
        kind = "conv" if group == 1 else "dw" if group == cin == cout else "other"
        if next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET") not in (b"", b"NOTSET"):
            kind = "other"  # SAME_* padding: not rebuilt standalone, scaled by MACs
        return LayerSpec(kind, cin, cout, group, tuple(int(k) for k in w[2:]), _ints(node, "strides", (1,) * nd),
                         _ints(node, "pads", (0,) * (2 * nd)), _ints(node, "dilations", (1,) * nd), tuple(int(d) for d in x[2:]), bias)
    if node.op_type in ("Gemm", "MatMul") and w is not None and len(w) == 2:
        trans = node.op_type == "Gemm" and int(_ints(node, "transB", 0)) == 1
        k, m = (int(w[1]), int(w[0])) if trans else (int(w[0]), int(w[1]))
        rows = int(np.prod([d for d in x[1:-1]])) if len(x) > 2 and all(isinstance(d, int) for d in x[1:-1]) else 1
        return LayerSpec("gemm", k, m, 1, spatial=(rows,), bias=bias, op="Gemm")
    return LayerSpec("other", 0, 0, op=node.op_type)


def standalone(spec: LayerSpec, batch: int) -> tuple[bytes, dict[str, np.ndarray]]:
    """A one-node model with ``spec``'s attributes and random inputs at ``batch``."""
    rng = np.random.default_rng(0)
    if spec.kind == "gemm":
        rows = batch * spec.spatial[0]
        x = rng.standard_normal((rows, spec.cin), dtype=np.float32)
        inits = [helper.make_tensor("w", TensorProto.FLOAT, [spec.cin, spec.cout], rng.standard_normal(spec.cin * spec.cout, dtype=np.float32))]
        node = helper.make_node("MatMul", ["x", "w"], ["y0"])
        nodes = [node]
        if spec.bias:
            inits.append(helper.make_tensor("b", TensorProto.FLOAT, [spec.cout], np.zeros(spec.cout, np.float32)))
            nodes.append(helper.make_node("Add", ["y0", "b"], ["y"]))
        else:
            nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        shape = [rows, spec.cin]
    else:
        shape = [batch, spec.cin, *spec.spatial]
        x = rng.standard_normal(shape, dtype=np.float32)
        wshape = [spec.cout, spec.cin // spec.group, *spec.kernel]
        inits = [helper.make_tensor("w", TensorProto.FLOAT, wshape, rng.standard_normal(int(np.prod(wshape)), dtype=np.float32))]
        ins = ["x", "w"]
        if spec.bias:
            inits.append(helper.make_tensor("b", TensorProto.FLOAT, [spec.cout], np.zeros(spec.cout, np.float32)))
            ins.append("b")
        nodes = [helper.make_node("Conv", ins, ["y"], kernel_shape=list(spec.kernel), strides=list(spec.strides),
                                  pads=list(spec.pads), dilations=list(spec.dilations), group=spec.group)]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString(), {"x": x}


# --------------------------------------------------------------------------- candidate counts
def candidate_counts(channels: int, step: int) -> list[int]:
    """Counts a dimension of ``channels`` can take: multiples of ``step`` and the full count;
    groups of at most two steps also get half and quarter steps (a 16-channel stage may gain at 8).
    ``candidate_counts(64, 16) -> [16, 32, 48, 64]``; ``candidate_counts(16, 16) -> [4, 8, 16]``."""
    vals = set(range(step, channels, step)) | {channels}
    if channels <= 2 * step:
        vals |= {s for s in (step // 2, step // 4) if 1 <= s < channels}
    return sorted(vals)


def measured_points(channels: int, step: int, max_points: int = MAX_POINTS) -> list[int]:
    """The subset of :func:`candidate_counts` that is measured (all of them up to ``max_points``)."""
    cands = candidate_counts(channels, step)
    if len(cands) <= max_points:
        return cands
    must = {cands[0], cands[-1], cands[-2]} | {c for c in cands if c % step}
    rest = max(max_points - len(must), 2)
    idx = np.unique(np.linspace(0, len(cands) - 1, rest + 2).round().astype(int))
    return sorted(must | {cands[i] for i in idx})


def lookup(curve: Mapping[int, float], count: int, step: int) -> float:
    """Time at ``count`` from measured ``{count: seconds}``: exact where measured; linear between
    measured multiples of ``step``; otherwise the next measured count up (ORT pads up to it)."""
    if count in curve:
        return curve[count]
    pts = sorted(curve)
    hi = next((p for p in pts if p > count), pts[-1])
    lo = next((p for p in reversed(pts) if p < count), None)
    if lo is None or count % step or lo % step or hi % step or hi == count:
        return curve[hi]
    return curve[lo] + (curve[hi] - curve[lo]) * (count - lo) / (hi - lo)


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class LayerTable:
    """Measured seconds of one layer: at full size, along its output and input counts."""

    spec: LayerSpec
    full: float
    out_curve: Mapping[int, float]
    in_curve: Mapping[int, float]


class TableCache:
    """``{layer signature: {point: seconds}}`` in one JSON file per measurement setting."""

    def __init__(self, cache_dir: str | os.PathLike | None, settings: LatencySettings):
        ident = settings.identity()
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
        short = settings.provider.replace("ExecutionProvider", "").lower()
        self.path = Path(cache_dir) / f"latency-{short}-b{settings.batch}-t{settings.threads}-{digest}.json" if cache_dir else None
        self.identity = ident
        self.entries: dict[str, dict[str, float]] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            try:
                doc = json.loads(self.path.read_text())
                if doc.get("identity") == ident:
                    self.entries = {k: {p: float(v) for p, v in d.items()} for k, d in doc.get("entries", {}).items()}
            except (OSError, ValueError, AttributeError):
                log.warning("ignoring unreadable latency cache %s", self.path)

    def get(self, key: str, point: str) -> float | None:
        return self.entries.get(key, {}).get(point)

    def put(self, key: str, point: str, seconds: float) -> None:
        self.entries.setdefault(key, {})[point] = float(seconds)
        self._dirty = True

    def flush(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"identity": self.identity, "entries": self.entries}, indent=0, sort_keys=True))
        self._dirty = False


@dataclass(frozen=True)
class TableBuild:
    tables: Mapping[str, LayerTable]  # node name -> table
    measured: int  # points measured in this build
    cached: int  # points read from the cache
    seconds: float
    cache_path: str | None


def build_tables(
    nodes: Sequence[tuple[str, LayerSpec]],
    settings: LatencySettings,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_points: int = MAX_POINTS,
    progress: Callable[[int, int], None] | None = None,
) -> TableBuild:
    """Measure (or read from the cache) the table of every ``(node name, spec)``; identical specs are
    measured once. The cache is flushed at least every 2 s and on any exit, so an interrupted
    build resumes where it stopped."""
    t0 = time.perf_counter()
    cache = TableCache(cache_dir, settings)
    step = settings.step
    todo: dict[str, list[tuple[int, int]]] = {}
    specs: dict[str, LayerSpec] = {}
    for _, spec in nodes:
        if spec.kind == "other" or spec.key() in specs:
            if spec.kind == "other" and spec.cin and spec.key() not in specs:
                specs[spec.key()] = spec
                todo[spec.key()] = [(spec.cin, spec.cout)]
            continue
        specs[spec.key()] = spec
        outs = measured_points(spec.cout, step, max_points)
        pts = [(spec.cin, c) for c in outs]
        if spec.kind != "dw":
            pts += [(c, spec.cout) for c in measured_points(spec.cin, step, max_points) if c != spec.cin]
        todo[spec.key()] = pts
    total = sum(len(p) for p in todo.values())
    done = measured = cached = 0
    last_flush = time.perf_counter()
    try:
        for key, pts in todo.items():
            spec = specs[key]
            for ci, co in pts:
                point = f"{ci}x{co}"
                if cache.get(key, point) is None:
                    if spec.kind == "dw":
                        ci = co
                    model, feeds = standalone(spec.with_channels(ci, co), settings.batch)
                    cache.put(key, point, time_runs(open_session(model, settings), feeds))
                    measured += 1
                else:
                    cached += 1
                done += 1
                if progress:
                    progress(done, total)
                if time.perf_counter() - last_flush > 2.0:
                    cache.flush()
                    last_flush = time.perf_counter()
    finally:
        cache.flush()
    tables = {}
    for name, spec in nodes:
        if spec.key() not in todo:
            continue
        e = cache.entries[spec.key()]
        full = e[f"{spec.cin}x{spec.cout}"]
        out_curve = {int(p.split("x")[1]): v for p, v in e.items() if int(p.split("x")[0]) == spec.cin}
        in_curve = {int(p.split("x")[0]): v for p, v in e.items() if int(p.split("x")[1]) == spec.cout}
        tables[name] = LayerTable(spec, full, out_curve, in_curve)
    return TableBuild(tables, measured, cached, time.perf_counter() - t0, str(cache.path) if cache.path else None)
