"""Sensitivity analysis time: suffix caching vs full re-evaluation, with a breakdown.

``onnxprune.sensitivity.analyze`` measures every prunable group at every grid
ratio. With ``suffix=True`` the activations entering the part of the graph
downstream of a group (its frontier) come from one pass of the original model
and only that suffix runs per ratio; with ``suffix=False`` the whole pruned
model runs each time. Both must give the same drops (asserted within 1e-6).

Models: zoo ``vgg16_bn`` (width 0.25) and ``resnet56`` (width 0.5), seeded
random weights, 512 random N(0, 1) inputs, metric = agreement with the
original; plus the trained demo models in ``models/demo`` with their
shipped validation set (top-1) when present.

Timing: ``Evaluator(threads=1)`` so ORT computes on the calling thread; both
wall time and that thread's CPU time (``time.thread_time``, nearly immune to
other jobs on a shared machine) are reported. Full and suffix runs alternate
(``--repeat`` each, medians). The breakdown instruments the library without
changing it: ORT session creation, frontier passes, suffix/full model runs,
``apply_mask``, suffix-model construction and metric computation.
Mode ``suffix, before`` re-runs the suffix method as it was before the
consumer-start change in ``sensitivity.py`` (suffix from the group's producers;
constant-only frontier tensors such as computed Pad amounts forced a full
evaluation), by patching the two helpers that change introduced.
``MAC-predicted`` is the ratio the suffix method would reach if time were
proportional to MACs: (suffix MACs of every evaluation + frontier passes) /
(full-model MACs of every evaluation). Target: suffix time <= 0.5 x full.

    python benchmarks/sensitivity_speed.py [--quick] [--repeat 2] [--out benchmarks/results/sensitivity_speed.md]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
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
import onnxruntime as ort  # noqa: E402

from onnxprune import runtime, sensitivity  # noqa: E402
from onnxprune.data import Dataset, load_dataset  # noqa: E402
from onnxprune.evaluate import Evaluator  # noqa: E402
from onnxprune.flops import count  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402
from onnxprune.groups import find_groups  # noqa: E402
from onnxprune.importance import score_units  # noqa: E402

from benchmarks import provenance  # noqa: E402

TARGET = 0.5
TOL = 1e-6
DEMO = ROOT / "models" / "demo"


# --------------------------------------------------------------------------- instrumentation
@dataclass
class Ledger:
    """Wall and CPU seconds per activity."""

    wall: dict = field(default_factory=lambda: collections.defaultdict(float))
    cpu: dict = field(default_factory=lambda: collections.defaultdict(float))
    calls: dict = field(default_factory=lambda: collections.defaultdict(int))
    total_cpu: float = 0.0

    def add(self, key: str, wall: float, cpu: float) -> None:
        self.wall[key] += wall
        self.cpu[key] += cpu
        self.calls[key] += 1


class _Clock:
    def __init__(self, ledger: Ledger, key: str):
        self.ledger, self.key = ledger, key

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc):
        self.ledger.add(self.key, time.perf_counter() - self.w, time.thread_time() - self.c)


class _TimedSession:
    def __init__(self, sess, ledger: Ledger, kind: str):
        self._s, self._ledger, self._kind = sess, ledger, kind

    def run(self, *a, **k):
        with _Clock(self._ledger, f"ORT run: {self._kind}"):
            return self._s.run(*a, **k)

    def __getattr__(self, name):
        return getattr(self._s, name)


class _TimedOrt:
    """Stands in for the ``onnxruntime`` module inside ``onnxprune.runtime`` (``runtime._ort``)."""

    def __init__(self, ledger: Ledger):
        self._ledger = ledger

    def InferenceSession(self, *a, **k):  # noqa: N802 (mirrors ORT)
        with _Clock(self._ledger, "ORT session creation"):
            s = ort.InferenceSession(*a, **k)
        kind = "frontier pass" if len(s.get_outputs()) > 1 else "evaluated model"
        return _TimedSession(s, self._ledger, kind)

    def __getattr__(self, name):
        return getattr(ort, name)


class instrument:
    """Context manager: patch the module-level helpers ``analyze`` calls to record their time."""

    WRAP = {"apply_mask": "apply_mask", "suffix_model": "build suffix model", "compute_metrics": "metrics"}

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.saved = {}

    def __enter__(self):
        ledger = self.ledger
        for attr, key in self.WRAP.items():
            fn = getattr(sensitivity, attr)
            self.saved[attr] = fn

            def wrapped(*a, _fn=fn, _key=key, **k):
                with _Clock(ledger, _key):
                    return _fn(*a, **k)

            setattr(sensitivity, attr, wrapped)
        self.saved_ort = runtime._ort
        runtime._ort = lambda: _TimedOrt(ledger)  # every session analyze opens goes through the runtime layer
        return self

    def __exit__(self, *exc):
        for attr, fn in self.saved.items():
            setattr(sensitivity, attr, fn)
        runtime._ort = self.saved_ort


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    path: Path
    dataset: Dataset
    note: str


def zoo_case(name: str, width: float, n: int, tmp: Path) -> Case:
    from models.export import export_onnx
    from models.zoo import build

    net, shape = build(name, width=width)
    path = export_onnx(net, tmp / f"{name}_w{width}.onnx", input_shape=shape, exporter="legacy")
    x = np.random.default_rng(0).standard_normal((n, *shape[1:])).astype(np.float32)
    return Case(f"{name} w{width}", path, Dataset(x, None, "random"), f"random weights, {n} random inputs, agreement")


def demo_cases(limit: int | None) -> list[Case]:
    out = []
    val = DEMO / "fmnist_val.npz"
    for stem in ("fmnist_vgg11", "fmnist_resnet20"):
        p = DEMO / f"{stem}.onnx"
        if p.is_file() and val.is_file():
            ds = load_dataset(str(val), limit=limit)
            out.append(Case(stem, p, ds, f"trained, {len(ds)} shipped val images, top-1"))
    return out


class legacy_suffix:
    """Context manager: the suffix method as it was before the consumer-start change
    (suffix from the group's producers on; constant-only frontier tensors force full evaluation)."""

    available = hasattr(sensitivity, "_changed_part") and hasattr(sensitivity, "_with_static_producers")

    def __enter__(self):
        self.saved = (sensitivity._changed_part, sensitivity._with_static_producers)
        sensitivity._changed_part = lambda cg, producers, nodes: (nodes, {})
        sensitivity._with_static_producers = lambda model, part, dynamic: part
        return self

    def __exit__(self, *exc):
        sensitivity._changed_part, sensitivity._with_static_producers = self.saved


def suffix_macs(cg, *, legacy: bool) -> dict[str, tuple[int, int]]:
    """Per prunable group: (MACs of the part a suffix evaluation runs, or None when analyze
    evaluates the whole model because a frontier tensor has no batch axis; full MACs)."""
    layers = {l.name: l.macs for l in count(cg.model, shapes=cg.shapes).layers}
    total = sum(layers.values())
    out = {}
    for g in cg.prunable_groups:
        nodes = sensitivity._downstream(cg.model, g.members)
        if not legacy and legacy_suffix.available:
            nodes, _ = sensitivity._changed_part(cg, g.producers, nodes)
            nodes = sensitivity._with_static_producers(cg.model, nodes, sensitivity._dynamic_tensors(cg.model))
        front = sensitivity._frontier(cg.model, nodes)
        batch_major = all(f in cg.shapes and len(cg.shapes[f]) >= 2 and cg.shapes[f][0] is None for f in front)
        out[g.id] = (sum(layers.get(n.name, 0) for n in nodes) if batch_major else None, total)
    return out


MODES = ("full", "suffix", "suffix, before") if legacy_suffix.available else ("full", "suffix")


def run_case(case: Case, *, grid, repeat: int, log) -> dict:
    model = load_model(case.path)
    cg = find_groups(model)
    scores = score_units(cg, "l1")
    ev = Evaluator.from_original(case.dataset, cg.model, device="cpu", batch_size=128, threads=1)
    res = {m: [] for m in MODES}
    ledgers = {m: Ledger() for m in MODES}
    runs = {}
    for k in range(repeat):
        order = MODES[k % len(MODES):] + MODES[: k % len(MODES)]  # rotate who goes first
        for mode in order:
            ledger = Ledger() if k else ledgers[mode]  # breakdown from the first repetition
            legacy = legacy_suffix() if mode == "suffix, before" else contextlib.nullcontext()
            with instrument(ledger), legacy:
                w, c = time.perf_counter(), time.thread_time()
                run = sensitivity.analyze(cg, scores, ev, grid=grid, criterion="l1", suffix=(mode != "full"))
                res[mode].append((time.perf_counter() - w, time.thread_time() - c))
            ledger.total_cpu = res[mode][-1][1]
            runs[mode] = run
            log(f"  {case.name} {mode}: {res[mode][-1][0]:.1f} s wall, {res[mode][-1][1]:.1f} s CPU")
    a = runs["full"].curves.drops
    diff = 0.0
    for mode in MODES[1:]:
        b = runs[mode].curves.drops
        assert a.keys() == b.keys()
        diff = max([diff, *(abs(x - y) for gid in a for x, y in zip(a[gid], b[gid]))])
    assert diff <= TOL, f"{case.name}: suffix drops differ from full drops by {diff}"
    n_evals = {g.id: sum(1 for r in grid if sensitivity.nearest(np.arange(1, g.channels + 1), g.channels * (1 - r)) < g.channels)
               for g in cg.prunable_groups}

    def predicted(legacy: bool) -> float:
        """Suffix MACs of every evaluation, full MACs for groups evaluated on the whole model, plus frontier passes."""
        sm = suffix_macs(cg, legacy=legacy)
        fallback = {g for g in sm if sm[g][0] is None}
        full = sum(n_evals[g] * sm[g][1] for g in sm)
        work = sum(n_evals[g] * sm[g][1 if g in fallback else 0] for g in sm)
        passes = runs["suffix, before" if legacy else "suffix"].evaluations - sum(n_evals[g] for g in fallback)
        return (work + passes * next(iter(sm.values()))[1]) / full

    row = {"case": case, "groups": len(cg.prunable_groups), "max_diff": diff, "ledgers": ledgers, "runs": runs}
    for mode in MODES:
        row[mode] = (statistics.median(t[0] for t in res[mode]), statistics.median(t[1] for t in res[mode]))
    row["pred"] = {"suffix": predicted(False)}
    if "suffix, before" in MODES:
        row["pred"]["suffix, before"] = predicted(True)
    return row


def render(rows: list[dict]) -> tuple[str, bool]:
    lines = [
        "| model | data | groups | mode | suffix evals / full evals + frontier passes | wall s | CPU s "
        "| / full (wall) | / full (CPU) | MAC-predicted | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok_all = True
    for r in rows:
        fw, fc = r["full"]
        for mode in MODES:
            w, c = r[mode]
            run = r["runs"][mode]
            evals = f"{run.suffix_evaluations} / {run.evaluations}"
            if mode == "full":
                lines.append(f"| {r['case'].name} | {r['case'].note} | {r['groups']} | full re-evaluation | {evals} | {w:.1f} | {c:.1f} | 1 | 1 | 1 | |")
                continue
            verdict = ""
            if mode == "suffix":
                ok = c / fc <= TARGET
                ok_all &= ok
                verdict = "OK" if ok else "MISSED"
            lines.append(f"| | | | {mode} | {evals} | {w:.1f} | {c:.1f} | {w / fw:.2f} | {c / fc:.2f} | {r['pred'][mode]:.2f} | {verdict} |")
    out = "\n".join(lines) + "\n"
    out += "\nBreakdown (first repetition; CPU seconds of the analysing thread, share of that run, calls):\n\n"
    keys = ["ORT run: evaluated model", "ORT run: frontier pass", "ORT session creation", "apply_mask", "build suffix model", "metrics"]
    out += "| model | mode | " + " | ".join(keys) + " | rest (Python, copies) |\n|---|---|" + "---|" * (len(keys) + 1) + "\n"
    for r in rows:
        for mode in MODES:
            led = r["ledgers"][mode]
            total = led.total_cpu or 1e-12
            cells = []
            for k in keys:
                v = led.cpu.get(k, 0.0)
                cells.append(f"{v:.1f} ({v / total:.0%}, {led.calls.get(k, 0)}×)" if v else "-")
            rest = total - sum(led.cpu.get(k, 0.0) for k in keys)
            out += f"| {r['case'].name} | {mode} | " + " | ".join(cells) + f" | {rest:.1f} ({rest / total:.0%}) |\n"
    return out, ok_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3-point grid, 256 inputs, VGG16 only, one repetition; writes no file")
    ap.add_argument("--repeat", type=int, default=None, help="runs of each mode, alternating (default 2, quick 1)")
    ap.add_argument("--no-demo", action="store_true", help="skip the trained demo models")
    ap.add_argument("--only", default=None, help="comma-separated case names to run (e.g. fmnist_resnet20)")
    ap.add_argument("--append", action="store_true", help="append the tables to --out instead of replacing it")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sensitivity_speed.md"))
    args = ap.parse_args(argv)
    prov = provenance.start(script="benchmarks/sensitivity_speed.py", argv=list(sys.argv[1:] if argv is None else argv))
    grid = (0.25, 0.5, 0.75) if args.quick else sensitivity.DEFAULT_GRID
    repeat = args.repeat or (1 if args.quick else 2)
    n = 256 if args.quick else 512
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [zoo_case("vgg16_bn", 0.25, n, Path(tmp))]
        if not args.quick:
            cases.append(zoo_case("resnet56", 0.5, n, Path(tmp)))
            if not args.no_demo:
                cases += demo_cases(None)
        if args.only:
            cases = [c for c in cases if c.name in args.only.split(",")]
        for case in cases:
            rows.append(run_case(case, grid=grid, repeat=repeat, log=log))
    table, ok = render(rows)
    load1 = os.getloadavg()
    head = (
        f"ONNX Runtime {ort.__version__} CPU, Evaluator(threads=1, batch_size=128): intra_op_num_threads=1, so the "
        f"analysing thread's CPU time is the compute; {os.cpu_count()} logical CPUs shared with other jobs (load average "
        f"{load0[0]:.1f} at start, {load1[0]:.1f} at end). Grid {grid}, criterion l1, {repeat} alternating run(s) of each "
        f"mode, medians. Target: suffix CPU time <= {TARGET} x full.\n\n"
    )
    foot = f"\nTarget {'met' if ok else 'MISSED'}; drops of both modes equal within {TOL}. Benchmark wall time {time.perf_counter() - t0:.0f} s.\n"
    text = "\n".join(prov.header()) + "\n\n" + head + table + foot
    print(text)
    if args.out and not args.quick:
        if args.append and Path(args.out).is_file():
            provenance.write_atomic(args.out, Path(args.out).read_text() + "\n## Additional run\n\n" + text)
        else:
            provenance.write_atomic(args.out, "# Sensitivity analysis: suffix caching vs full re-evaluation\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
