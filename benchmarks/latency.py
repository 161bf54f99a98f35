"""ONNX Runtime CPU latency of original vs pruned models: does removing MACs remove time?

CIFAR VGG16 (zoo ``vgg16_bn``, width 1.0) and ResNet-56 (zoo ``resnet56``), seeded
random weights and BN statistics, legacy (TorchScript) export. Each is pruned
uniformly (L1) to -30% and -50% MACs with ``--round-to`` 1, 8 (the old default),
the current default ``auto`` (the SIMD block, 16 with AVX-512, halved when the
target needs it) and 16, and timed at batch 1 and 32.

Wall-clock latency: ORT CPU provider, ``intra_op_num_threads`` (default 2),
``inter_op_num_threads=1``, sequential execution, ``ORT_ENABLE_ALL``, worker
spinning off (``--spin`` turns it on: on a shared, oversubscribed machine a
spinning worker steals the time slice of the thread doing the work). All
sessions of one model are created first; every round times each session in a
fresh random order (the fastest of several runs, the one least disturbed by
other jobs), and a variant's latency
reduction is the median over rounds of ``1 - t_pruned / t_original`` from the
same round, so slow drifts of a shared machine cancel; [IQR] given.

CPU-time check: the same variants with ``intra_op_num_threads=1`` (ORT then
computes on the calling thread) timed with ``time.thread_time``: the CPU
time the work took, nearly insensitive to other processes on the machine.

Diagnostics: how many Conv nodes ORT's optimized graph runs as NCHWc (blocked)
kernels, how many Reorder nodes it inserted, how many conv output channel
counts are not multiples of the machine's NCHWc block (16 with AVX-512, 8 with
AVX2), and the "padded MACs" reduction: MACs with every Conv channel count
rounded up to the block, which is what ORT's NCHWc kernels compute (they pad
tensors and filters to whole blocks).

    python benchmarks/latency.py [--quick] [--rounds 20] [--threads 2] [--spin] [--out benchmarks/results/latency.md]
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from onnxprune.api import PruneOptions, prune  # noqa: E402
from onnxprune.errors import TargetError  # noqa: E402
from onnxprune.flops import count  # noqa: E402

from benchmarks import provenance  # noqa: E402

TARGET_RATIO = 0.9
DEFAULT_ROUND = PruneOptions().round_to  # "auto" (SIMD block, halved if needed) since 1ea405b; 8 before
CHECKED_ROUNDS = tuple(dict.fromkeys((8, DEFAULT_ROUND)))  # rows the >= 0.9 target is judged on
MODELS = ("vgg16_bn", "resnet56")
BATCHES = (1, 32)


@dataclass
class Variant:
    model: str
    target: float | None  # None: the original
    round_to: int | str | None
    resolved: int | None = None  # the multiple prune() used ("auto" resolves per run)
    path: Path | None = None
    macs: int = 0
    padded_macs: int = 0
    skipped: str | None = None
    wall: dict = field(default_factory=lambda: {b: [] for b in BATCHES})  # per round, seconds
    cpu: dict = field(default_factory=lambda: {b: [] for b in BATCHES})
    nchwc: tuple[int, int, int] = (0, 0, 0)  # NCHWc convs, all convs, reorder nodes
    odd: tuple[int, int] = (0, 0)  # conv output-channel counts not multiple of the block, all convs
    odd_counts: dict = field(default_factory=dict)  # output-channel count not a block multiple -> number of convs

    @property
    def label(self) -> str:
        return "original" if self.target is None else f"-{self.target:.0%} r{self.rt}"

    @property
    def rt(self) -> str:
        if self.round_to in ("auto", "measured"):
            return f"{self.round_to}→{self.resolved}" if self.resolved else str(self.round_to)
        return str(self.round_to)


def block_size() -> int:
    """MLAS NCHWc block: 16 floats with AVX-512F, 8 with AVX2 (read from /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if "avx512f" in flags else 8


def session_options(threads: int, *, spin: bool, optimized_path: Path | None = None):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.log_severity_level = 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if optimized_path is not None:
        o.optimized_model_filepath = str(optimized_path)
    return o


def nchwc_stats(path: Path, tmp: Path) -> tuple[int, int, int]:
    """(Conv nodes ORT runs as NCHWc, all Conv nodes, Reorder nodes) in ORT's optimized graph."""
    opt = tmp / (path.stem + ".opt.onnx")
    ort.InferenceSession(str(path), session_options(1, spin=False, optimized_path=opt), providers=["CPUExecutionProvider"])
    c = collections.Counter((n.domain, n.op_type) for n in onnx.load(str(opt)).graph.node)
    nchwc = c[("com.microsoft.nchwc", "Conv")]
    plain = sum(v for (d, op), v in c.items() if op in ("Conv", "FusedConv") and d != "com.microsoft.nchwc")
    reorders = sum(v for (d, op), v in c.items() if op.startswith("Reorder"))
    return nchwc, nchwc + plain, reorders


def costs(model: onnx.ModelProto, block: int) -> tuple[int, int, tuple[int, int], dict]:
    """(MACs, padded MACs, (convs whose output count is not a block multiple, convs)).

    Padded: Conv (group 1) channel counts rounded up to the block, as ORT's NCHWc
    kernels pad them; inputs with fewer channels than a block are read unpadded.
    """
    up = lambda c: -(-c // block) * block  # noqa: E731
    macs = padded = odd = convs = 0
    odd_counts: dict = collections.Counter()
    for layer in count(model).layers:
        g = layer.geometry
        macs += layer.macs
        if layer.op_type == "Conv" and g.group == 1:
            convs += 1
            odd += g.cout % block != 0
            if g.cout % block:
                odd_counts[g.cout] += 1
            cin = g.cin if g.cin < block else up(g.cin)
            padded += g.spatial * g.kernel * up(g.cout) * cin
        else:
            padded += layer.macs
    return macs, padded, (odd, convs), dict(sorted(odd_counts.items()))


def prepare(name: str, targets, rounds_to, tmp: Path, block: int, log) -> list[Variant]:
    from models.export import export_onnx
    from models.zoo import build

    net, shape = build(name, width=1.0)
    src = export_onnx(net, tmp / f"{name}.onnx", input_shape=shape, exporter="legacy")
    out = [Variant(name, None, None, path=src)]
    for t in targets:
        for r in rounds_to:
            v = Variant(name, t, r)
            dst = tmp / f"{name}_{int(t * 100)}_r{r}.onnx"
            try:
                res = prune(src, options=PruneOptions(target_flops=t, strategy="uniform", criterion="l1", round_to=r), output=dst, force=True)
                v.resolved = int(res.report.round_to)
            except TargetError as exc:
                v.skipped = str(exc).split(". To fix")[0]
                log(f"  {name} {v.label}: skipped ({v.skipped})")
            else:
                v.path = dst
            out.append(v)
    for v in out:
        if v.path is not None:
            v.macs, v.padded_macs, v.odd, v.odd_counts = costs(onnx.load(str(v.path)), block)
            v.nchwc = nchwc_stats(v.path, tmp)
            log(f"  {name} {v.label}: {v.macs:,} MACs, NCHWc convs {v.nchwc[0]}/{v.nchwc[1]}")
    return out


def _time_rounds(sessions, xs, *, rounds: int, reps: dict, clock, store: str, log, what: str) -> None:
    rng = random.Random(0)
    for k in range(rounds):
        t0 = time.perf_counter()
        for b, x in xs.items():
            order = list(sessions)
            rng.shuffle(order)
            for v, sess, name in order:
                ts = []
                for _ in range(reps[b]):
                    t = clock()
                    sess.run(None, {name: x})
                    ts.append(clock() - t)
                getattr(v, store)[b].append(min(ts))  # least-disturbed run of this round
        log(f"  {what} round {k + 1}/{rounds}: {time.perf_counter() - t0:.1f} s")


def measure(variants: list[Variant], *, threads: int, spin: bool, rounds: int, cpu_rounds: int, reps: dict, log) -> None:
    xs = {b: np.random.default_rng(b).random((b, 3, 32, 32), dtype=np.float32) for b in BATCHES}

    def open_all(n_threads: int):
        out = []
        for v in variants:
            if v.path is not None:
                s = ort.InferenceSession(str(v.path), session_options(n_threads, spin=spin), providers=["CPUExecutionProvider"])
                name = s.get_inputs()[0].name
                for x in xs.values():  # warm-up
                    for _ in range(2):
                        s.run(None, {name: x})
                out.append((v, s, name))
        return out

    model = variants[0].model
    sessions = open_all(threads)
    _time_rounds(sessions, xs, rounds=rounds, reps=reps, clock=time.perf_counter, store="wall", log=log, what=f"{model} wall")
    del sessions
    if cpu_rounds:
        sessions = open_all(1)
        _time_rounds(sessions, xs, rounds=cpu_rounds, reps={1: max(3, reps[1] // 2), 32: 2}, clock=time.thread_time,
                     store="cpu", log=log, what=f"{model} cpu")
        del sessions


def _reduction(v: Variant, orig: Variant, b: int, store: str) -> tuple[float, float, float]:
    """Median over rounds of 1 - t/t_orig and its quartiles."""
    r = [1 - a / o for a, o in zip(getattr(v, store)[b], getattr(orig, store)[b])]
    if not r:
        return math.nan, math.nan, math.nan
    q = np.percentile(r, [25, 50, 75])
    return float(q[1]), float(q[0]), float(q[2])


def _stage(node_name: str) -> str:
    """CIFAR ResNet stage of a node from its exported name (``layers.N`` -> stage 1 + N // (blocks/3))."""
    import re

    m = re.search(r"layers\.(\d+)", node_name)
    return f"stage {1 + int(m.group(1)) // 9}" if m else "stem/head"


def stage_profile(orig: Variant, pruned: Variant, *, runs: int = 6, batch: int = 32) -> str:
    """ResNet-56: MACs and ORT kernel time per stage (1 thread, batch 32, ORT profiler), original vs pruned."""
    import json

    def macs(path):
        c = collections.Counter()
        for layer in count(onnx.load(str(path))).layers:
            c[_stage(layer.name)] += layer.macs
        return c

    def kernel_time(path):
        o = session_options(1, spin=False)
        o.enable_profiling = True
        o.profile_file_prefix = str(Path(path).with_suffix("")) + "_prof"
        s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
        for _ in range(runs):
            s.run(None, {s.get_inputs()[0].name: x})
        events = json.loads(Path(s.end_profiling()).read_text())
        t = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                t[_stage(e["name"])] += e["dur"]
        return t

    mo, mp, to, tp = macs(orig.path), macs(pruned.path), kernel_time(orig.path), kernel_time(pruned.path)
    T0, T1 = sum(to.values()), sum(tp.values())
    out = [f"\nWhere the time goes: {pruned.model} {pruned.label} vs original, ORT profiler, 1 thread, batch {batch}, {runs} runs:\n",
           "| stage | MMACs orig → pruned | MACs red. | share of time (orig) | time red. | µs per MMAC orig → pruned |",
           "|---|---|---|---|---|---|"]
    for st in sorted(set(mo) | set(to)):
        a, b, ta, tb = mo[st], mp[st], to[st], tp[st]
        eff = f"{ta / runs / (a / 1e6):.0f} → {tb / runs / (b / 1e6):.0f}" if a and b else "-"
        out.append(f"| {st} | {a / 1e6:.1f} → {b / 1e6:.1f} | {1 - b / a if a else 0:.0%} | {ta / T0:.0%} | {1 - tb / ta if ta else 0:.0%} | {eff} |")
    out.append(f"| total | {sum(mo.values()) / 1e6:.1f} → {sum(mp.values()) / 1e6:.1f} | {1 - sum(mp.values()) / sum(mo.values()):.0%} | 100% | {1 - T1 / T0:.0%} | |")
    return "\n".join(out) + "\n"


def render(variants: list[Variant], *, block: int) -> tuple[str, list[Variant]]:
    lines = [
        "| model | target | round_to | MACs red. | padded-MACs red. | latency red. b1 [IQR] | latency red. b32 [IQR] "
        "| ratio b1 | ratio b32 | CPU-time red. b1 / b32 (1 thread) | ms b1 | ms b32 | NCHWc convs | reorders "
        f"| convs not ×{block} | target (round_to 8 / default) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    misses = []
    for v in variants:
        orig = next(o for o in variants if o.model == v.model and o.target is None)
        if v.skipped:
            lines.append(f"| {v.model} | -{v.target:.0%} | {v.rt} | unreachable | | | | | | | | | | | | {v.skipped} |")
            continue
        ms = [1e3 * statistics.median(v.wall[b]) for b in BATCHES]
        tail = f"{ms[0]:.2f} | {ms[1]:.1f} | {v.nchwc[0]}/{v.nchwc[1]} | {v.nchwc[2]} | {v.odd[0]}/{v.odd[1]}"
        if v.target is None:
            lines.append(f"| {v.model} | original | - | - | - | - | - | - | - | - | {tail} | |")
            continue
        red = 1 - v.macs / orig.macs
        pred = 1 - v.padded_macs / orig.padded_macs
        (w1, l1, h1), (w32, l32, h32) = (_reduction(v, orig, b, "wall") for b in BATCHES)
        c1, c32 = (_reduction(v, orig, b, "cpu")[0] for b in BATCHES)
        q1, q32 = w1 / red, w32 / red
        verdict = ""
        if v.round_to in CHECKED_ROUNDS:
            ok = q1 >= TARGET_RATIO and q32 >= TARGET_RATIO
            verdict = "OK" if ok else "MISSED"
            if not ok:
                misses.append(v)
        lines.append(
            f"| {v.model} | -{v.target:.0%} | {v.rt} | {red:.1%} | {pred:.1%} | {w1:.1%} [{l1:.0%}, {h1:.0%}] | "
            f"{w32:.1%} [{l32:.0%}, {h32:.0%}] | {q1:.2f} | {q32:.2f} | {c1:.1%} / {c32:.1%} | {tail} | {verdict} |"
        )
    diag = [f"\nConv output-channel counts that are not multiples of {block} (ORT computes them rounded up), "
            f"round_to {' and '.join(map(str, CHECKED_ROUNDS))}:\n"]
    for v in variants:
        if v.round_to in CHECKED_ROUNDS and v.target is not None and not v.skipped:
            up = lambda c: -(-c // block) * block  # noqa: E731
            items = ", ".join(f"{c}→{up(c)} ×{n}" for c, n in v.odd_counts.items()) or "none"
            diag.append(f"- {v.model} {v.label}: {items}")
    return "\n".join(lines) + "\n" + "\n".join(diag) + "\n", misses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="-30%% only, round_to 1 and the default, fewer rounds; writes no file")
    ap.add_argument("--rounds", type=int, default=None, help="wall-clock rounds (default 20, quick 4)")
    ap.add_argument("--cpu-rounds", type=int, default=None, help="1-thread CPU-time rounds (default 8, quick 2; 0 skips)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin", action="store_true", help="let ORT workers spin-wait (ORT's default)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency.md"))
    args = ap.parse_args(argv)
    prov = provenance.start(script="benchmarks/latency.py", argv=list(sys.argv[1:] if argv is None else argv))
    targets = (0.3,) if args.quick else (0.3, 0.5)
    rounds_to = (1, DEFAULT_ROUND) if args.quick else tuple(dict.fromkeys((1, 8, DEFAULT_ROUND, "measured", 16)))
    rounds = args.rounds or (4 if args.quick else 20)
    cpu_rounds = args.cpu_rounds if args.cpu_rounds is not None else (2 if args.quick else 8)
    reps = {1: 10 if args.quick else 20, 32: 2 if args.quick else 3}
    block = block_size()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    variants: list[Variant] = []
    profile = ""
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            vs = prepare(name, targets, rounds_to, Path(tmp), block, log)
            measure(vs, threads=args.threads, spin=args.spin, rounds=rounds, cpu_rounds=cpu_rounds, reps=reps, log=log)
            variants += vs
            if name == "resnet56" and not args.quick:
                pick = [v for v in vs if v.target == 0.3 and v.round_to == 16 and v.path is not None]
                if pick:
                    profile = stage_profile(vs[0], pick[0])
    table, misses = render(variants, block=block)
    load1 = os.getloadavg()
    head = (
        f"ONNX Runtime {ort.__version__} CPUExecutionProvider, intra_op_num_threads={args.threads}, inter_op_num_threads=1, "
        f"sequential, ORT_ENABLE_ALL, spinning {'on' if args.spin else 'off'}; machine: {os.cpu_count()} logical CPUs shared "
        f"with other jobs (load average {load0[0]:.1f} at start, {load1[0]:.1f} at end), {platform.machine()}, NCHWc block {block}. "
        f"{rounds} interleaved rounds (random order per round), fastest of {reps[1]} runs at batch 1 / {reps[32]} at batch 32 "
        f"per round; latency reduction = median over rounds of 1 - t_pruned/t_original from the same round [IQR]; "
        f"ratio = latency red. / MACs red.; CPU-time columns: intra_op_num_threads=1, time.thread_time, {cpu_rounds} rounds. "
        f"MACs = Conv+Gemm multiply-accumulates per sample; uniform allocation, L1 criterion, legacy export, random weights.\n"
    )
    foot = (
        f"\nTarget: latency reduction >= {TARGET_RATIO} x MACs reduction at --round-to {' and '.join(map(str, CHECKED_ROUNDS))} "
        f"(8 was the default when this benchmark was specified; the default is now {DEFAULT_ROUND!r}), both batches: "
        + ("met on every row." if not misses else "MISSED on " + ", ".join(f"{v.model} {v.label}" for v in misses) + ".")
        + f" Wall time of this benchmark: {time.perf_counter() - t0:.0f} s.\n"
    )
    text = head + "\n" + table + profile + foot
    print(text)
    if args.out and not args.quick:
        provenance.write_atomic(args.out, "# Latency: original vs pruned (ONNX Runtime CPU)\n\n" + "\n".join(prov.header()) + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
