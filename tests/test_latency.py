"""Latency-targeted pruning: tables and their cache, the staircase, usage and error paths.

No timed assertions (speed belongs in benchmarks/latency_target.py): measurements here run
on tiny models, and what is checked is structure, keys, refusals and messages.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune import allocate
from onnxprune.api import PruneOptions, prune
from onnxprune.errors import DeviceError, UsageError
from onnxprune.groups import find_groups
from onnxprune.importance import score_units
from onnxprune.latency import LatencyCost, build_latency_model, measure_pair, model_feeds, useful_levels
from onnxprune.latency_table import (
    CPU,
    CUDA,
    LatencySettings,
    LayerSpec,
    MeasurementError,
    TableCache,
    build_tables,
    candidate_counts,
    check_provider,
    lookup,
    measured_points,
    resolve_settings,
)
from onnxprune.runtime import _cuda_probe

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo" / "fmnist_vgg11.onnx"


def chain_model(channels=(3, 32, 32, 16), hw=8) -> onnx.ModelProto:
    """Conv-Relu chain with a dynamic batch: ``channels[i] -> channels[i+1]``, 3x3 pad 1."""
    nodes, inits, prev = [], [], "x"
    rng = np.random.default_rng(0)
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, [cout, cin, 3, 3], rng.standard_normal(cout * cin * 9).astype(np.float32)))
        inits.append(helper.make_tensor(f"b{i}", TensorProto.FLOAT, [cout], np.zeros(cout, np.float32)))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels[0], hw, hw])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", channels[-1], hw, hw])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


SETTINGS = LatencySettings(provider=CPU, batch=1, threads=1)


# --------------------------------------------------------------------------- tables and cache
def test_candidates_and_lookup_keep_the_staircase():
    assert candidate_counts(64, 16) == [16, 32, 48, 64]
    assert candidate_counts(16, 16) == [4, 8, 16]  # small groups also try half and quarter steps
    assert candidate_counts(12, 16) == [4, 8, 12]
    pts = measured_points(512, 16, max_points=8)
    assert len(pts) <= 12 and pts[0] == 16 and pts[-2:] == [496, 512]
    curve = {16: 1.0, 48: 3.0, 64: 4.0}
    assert lookup(curve, 32, 16) == pytest.approx(2.0)  # between measured multiples: linear
    assert lookup(curve, 40, 16) == 3.0  # not a multiple of the step: costs the next measured count (padded up)
    assert lookup(curve, 8, 16) == 1.0


def test_table_cache_key_and_resume(tmp_path):
    spec = LayerSpec("conv", 32, 32, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (8, 8), True)
    specs = [("a", spec), ("b", spec), ("dw", LayerSpec("dw", 16, 16, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (8, 8), True))]

    class Stop(Exception):
        pass

    def stop_after(k):
        def progress(done, total):
            if done >= k:
                raise Stop
        return progress

    with pytest.raises(Stop):
        build_tables(specs, SETTINGS, cache_dir=tmp_path, progress=stop_after(2))
    cache = TableCache(tmp_path, SETTINGS)
    assert cache.path.is_file() and sum(len(v) for v in cache.entries.values()) == 2  # flushed on the interruption
    first = build_tables(specs, SETTINGS, cache_dir=tmp_path)
    assert first.cached == 2 and first.measured > 0  # resumed: only the missing points were measured
    assert set(first.tables) == {"a", "b", "dw"} and first.tables["a"] is not None
    assert first.tables["a"].out_curve == first.tables["b"].out_curve  # identical layers share one entry
    again = build_tables(specs, SETTINGS, cache_dir=tmp_path)
    assert again.measured == 0 and again.cached == first.measured + first.cached
    # the key: provider, batch, threads, ORT version and hardware identity
    ident = cache.identity
    assert {"provider", "batch", "threads", "ort", "hardware"} <= set(ident)
    other = [TableCache(tmp_path, LatencySettings(provider=CPU, batch=2, threads=1)).path, TableCache(tmp_path, LatencySettings(provider=CPU, batch=1, threads=2)).path]
    assert cache.path not in other and len(set(other)) == 2
    doc = json.loads(cache.path.read_text())
    assert doc["identity"] == ident and spec.key() in doc["entries"]


# --------------------------------------------------------------------------- allocation on the staircase
class _StairLM:
    """A latency model whose time drops only every 16 channels of each group, with candidates every 8."""

    def __init__(self, cg):
        self.cg = cg
        self.settings = type("S", (), {"step": 8})()
        self.measured = self.predict(None)

    def predict(self, mask=None):
        mask = self.cg.full_mask() if mask is None else mask
        return float(sum(np.ceil(mask[list(g.units)].sum() / 16) * 16 * (k + 1) for k, g in enumerate(self.cg.prunable_groups)))


def test_allocation_picks_only_counts_where_time_drops():
    cg = find_groups(chain_model((3, 48, 48, 32)))
    scores = score_units(cg, "l1")
    lm = _StairLM(cg)
    builder = allocate.MaskBuilder(cg, scores)
    levels = useful_levels(lm, builder, eps=0.0)
    for g in cg.prunable_groups:
        assert all(c % 16 == 0 for c in levels[g.id]), levels  # 8, 24, 40: no time saved, never a level
        assert set(levels[g.id]) < set(candidate_counts(g.channels, 8))
    cost = LatencyCost(lm, builder, levels=levels)
    curves = allocate.SensitivityCurves("top1", 0.9, (0.25, 0.5, 0.75), {g.id: (0.01, 0.02, 0.05) for g in cg.prunable_groups})
    for alloc in (allocate.uniform(cg, scores, target=0.3, cost=cost), allocate.by_threshold(cg, scores, curves, target=0.3, cost=cost),
                  allocate.cost_aware(cg, scores, curves, target=0.3, cost=cost)):
        assert alloc.detail["cost_reduction"] >= 0.3
        for gid, n in alloc.keep.items():
            assert n % 16 == 0, (alloc.strategy, gid, n)
            g = cg.group(gid)
            if n < g.channels:  # every removal saves time: one more step back costs more
                up = levels[gid][list(levels[gid]).index(n) + 1]
                assert lm.predict(builder.mask({**alloc.keep, gid: int(up)})) > lm.predict(builder.mask(alloc.keep))


# --------------------------------------------------------------------------- usage and errors
def cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_exactly_one_target():
    with pytest.raises(UsageError, match="exactly one target"):
        PruneOptions(target_flops=0.3, target_latency=0.3)
    assert PruneOptions(target_latency=0.3).target_flops is None  # the default MAC target steps aside
    assert PruneOptions().target_flops == 0.3
    with pytest.raises(UsageError, match="--target-latency must be"):
        PruneOptions(target_latency=1.5)
    r = cli(DEMO, "--target-flops", "0.3", "--target-latency", "0.3")
    assert r.returncode == 2 and "exactly one target" in r.stderr and "To fix" in r.stderr
    r = cli(DEMO)
    assert r.returncode == 2 and "--target-latency" in r.stderr


def test_unreachable_latency_target_writes_nothing(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(chain_model(), model)
    out = tmp_path / "m.pruned.onnx"
    r = cli(model, "--target-latency", "0.99", "--device", "cpu", "--latency-threads", "1", "--latency-max-spread", "100",
            "--cache-dir", tmp_path / "cache", "-o", out, "--report", tmp_path / "r.json")
    assert r.returncode == 2, r.stderr
    assert "unreachable" in r.stderr and "at most" in r.stderr and "--target-latency" in r.stderr
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_noisy_measurement_is_refused_with_advice():
    cg = find_groups(chain_model())
    with pytest.raises(MeasurementError) as err:
        measure_pair(cg.model, None, SETTINGS, model_feeds(cg, 1), rounds=9, max_spread=1e-12)
    text = str(err.value)
    assert "too noisy" in text and "--latency-threads" in text and "--latency-batch" in text and "--latency-repeats" in text


def test_latency_target_end_to_end_reports_measured_and_predicted(tmp_path):
    res = prune(DEMO, options=PruneOptions(target_latency=0.3, strategy="uniform", device="cpu", latency_threads=1, latency_max_spread=100,
                                           latency_tolerance=0.99, cache_dir=str(tmp_path)), write=False)
    lat = res.report.detail["latency"]
    assert lat["provider"] == CPU and lat["batch"] == 1 and lat["threads"] == 1
    assert len(lat["iterations"]) == 1 and lat["original_ms"] > 0 and lat["pruned_ms"] > 0
    text = "\n".join(res.report.summary_lines())
    assert "Latency (measured, batch 1, CPUExecutionProvider, 1 thread" in text and "Predicted" in text and "loop 1" in text
    assert "MACs" in text and "set by the latency target -30.0%" in text
    again = prune(DEMO, options=PruneOptions(target_latency=0.3, strategy="uniform", device="cpu", latency_threads=1, latency_max_spread=100,
                                             latency_tolerance=0.99, cache_dir=str(tmp_path)), write=False)
    assert again.report.detail["latency"]["table"]["measured_points"] == 0  # second run: all from the cache


def test_mac_target_can_measure_latency(tmp_path):
    res = prune(DEMO, options=PruneOptions(target_flops=0.3, strategy="uniform", device="cpu", measure_latency=True, latency_threads=1,
                                           latency_max_spread=100), write=False)
    lat = res.report.detail["latency"]
    assert lat["target"] is None and lat["macs_cut"] == pytest.approx(res.report.reduction)
    assert "Latency (measured" in "\n".join(res.report.summary_lines())


# --------------------------------------------------------------------------- GPU: never claim it without it
class _FakeSession:
    def __init__(self, providers):
        self._p = providers

    def get_providers(self):
        return self._p


def test_cuda_path_refuses_cpu_session():
    with pytest.raises(MeasurementError, match="refusing"):
        check_provider(_FakeSession([CPU]), LatencySettings(provider=CUDA))
    check_provider(_FakeSession([CUDA, CPU]), LatencySettings(provider=CUDA))  # the real thing passes
    if not _cuda_probe()[0]:
        with pytest.raises(DeviceError):
            resolve_settings("cuda")


@pytest.mark.skipif(not _cuda_probe()[0], reason=f"no working CUDA provider here ({_cuda_probe()[1]})")
def test_cuda_tables_measure_on_the_gpu(tmp_path):
    settings = resolve_settings("cuda", batch=1)
    assert settings.provider == CUDA and settings.step == 8
    spec = LayerSpec("conv", 32, 32, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (16, 16), True)
    b = build_tables([("a", spec)], settings, cache_dir=tmp_path)
    assert b.measured > 0 and "cuda" in Path(b.cache_path).name


# --------------------------------------------------------------------------- closed loop
def test_closed_loop_corrects_a_biased_model_and_stays_bounded(monkeypatch):
    """The model predicts cuts 10 points too small; the loop must correct the request, report every
    iteration with its prediction, and stop within the iteration bound."""
    import onnxprune.latency_loop as loop_mod
    from onnxprune.latency import PairTiming

    cg = find_groups(chain_model((3, 64, 64, 32)))
    builder = allocate.MaskBuilder(cg, score_units(cg, "l1"))

    class LM:
        measured, settings = 1.0, SETTINGS

        def __init__(self):
            self.cg = cg

        def predict(self, mask=None):  # fraction of MACs kept: the "model"
            return 1.0 if mask is None else cg.macs(mask) / cg.total_macs

        def refit(self, points):
            pass

    def fake_measure(a, b, settings, feeds, **kw):  # the truth: 10 points more cut than MACs say
        ratio = max(cg.macs(builder.mask(current["keep"])) / cg.total_macs - 0.10, 0.05)
        return PairTiming(1e-3, 1e-3 * ratio, ratio, 0.01, 9, 1e-3)

    current = {}

    def alloc_fn(t):
        a = allocate.uniform(cg, builder.scores, target=t, round_to=1)
        current["keep"] = a.keep
        return a

    monkeypatch.setattr(loop_mod, "measure_pair", fake_measure)
    res = loop_mod.closed_loop(target=0.4, lm=LM(), allocate_fn=alloc_fn, to_mask=builder.mask, apply=lambda m: cg.model,
                               max_reduction=0.95, tolerance=0.02, iterations=4, feeds={})
    its = res.iterations
    assert 1 < len(its) <= 4 and its[0].predicted_target == 0.4
    assert its[0].measured_cut > 0.45  # the first try overshoots by the model's bias
    assert its[1].predicted_target < 0.35  # and the request was corrected down
    assert res.reached and abs(its[res.chosen].measured_cut - 0.4) <= 0.02
    assert abs(its[res.chosen].error) < 0.05  # the kept prediction includes the measured bias


def test_explicit_round_to_restricts_latency_levels(tmp_path):
    """An explicit --round-to N keeps latency-mode counts at multiples of N (or the full count), where
    auto would use the table's step; 12 is not a multiple of the CPU step (8 or 16), so the default
    staircase alone could not produce these counts."""
    model = tmp_path / "m.onnx"
    onnx.save(chain_model((3, 48, 48, 48), hw=16), model)
    opts = dict(target_latency=0.3, strategy="uniform", device="cpu", latency_threads=1, latency_max_spread=100, latency_tolerance=0.99,
                cache_dir=str(tmp_path / "cache"))
    res = prune(model, options=PruneOptions(round_to=12, **opts), write=False)
    rows = [g for g in res.report.groups if g.blocked_reason is None]
    assert rows and any(g.channels_after < g.channels_before for g in rows)
    for g in rows:
        assert g.channels_after % 12 == 0 or g.channels_after == g.channels_before, (g.id, g.channels_after)
    assert res.report.round_to == 12
    w = {i.name: tuple(i.dims) for i in res.model.graph.initializer}
    assert w["w0"][0] % 12 == 0 and w["w1"][1] == w["w0"][0]  # the written weights follow the kept counts
    cg = find_groups(chain_model((3, 48, 48, 48), hw=16))  # the levels themselves, on a real latency model
    lm = build_latency_model(cg, resolve_settings("cpu", batch=1, threads=1), cache_dir=tmp_path / "cache", rounds=3, max_spread=100)
    builder = allocate.MaskBuilder(cg, score_units(cg, "l1"))
    for gid, lv in useful_levels(lm, builder, round_to=12).items():
        assert all(c % 12 == 0 or c == cg.group(gid).channels for c in lv), lv


def test_latency_target_just_past_the_predicted_limit_is_measured_not_refused(tmp_path):
    """The table predicts and the loop measures: a target within --latency-tolerance of the
    predicted limit goes to the loop (which starts at the limit); one clearly past it is refused
    before any measurement of a pruned model, naming the largest predicted cut."""
    from onnxprune.api import latency_setup
    from onnxprune.errors import TargetError

    model = tmp_path / "m.onnx"
    onnx.save(chain_model(), model)
    common = dict(strategy="uniform", device="cpu", latency_threads=1, latency_max_spread=100, cache_dir=str(tmp_path / "cache"))
    cg = find_groups(chain_model())
    opts = PruneOptions(target_latency=0.01, **common)
    _, _, limit = latency_setup(cg, score_units(cg, "l1"), opts, lambda *a: None)
    assert 0 < limit < 0.97
    with pytest.raises(TargetError) as err:
        prune(model, options=PruneOptions(target_latency=min(limit + 0.05, 0.99), **common), write=False)
    assert "at most" in str(err.value) and "largest cut measured" not in str(err.value)
    try:
        res = prune(model, options=PruneOptions(target_latency=limit + 0.01, **common), write=False)
    except TargetError as exc:  # the measurement at the limit fell short: refused by what was measured
        assert "largest cut measured" in str(exc)
    else:
        lat = res.report.detail["latency"]
        assert lat["iterations"][0]["predicted_target"] == pytest.approx(limit, abs=1e-5)


@pytest.mark.parametrize("strategy,resolved", [("sensitivity", "sensitivity"), ("cost-aware", "cost-aware"), ("auto", "cost-aware")])
def test_latency_target_with_data_driven_strategies(tmp_path, strategy, resolved):
    """--target-latency with --strategy sensitivity / cost-aware: the curves drive the allocation at
    each loop request (a regression: this path once crashed before allocating); with data the
    default strategy of a latency target is cost-aware (drop per saved millisecond)."""
    res = prune(DEMO, options=PruneOptions(target_latency=0.3, strategy=strategy, device="cpu", latency_threads=1, latency_max_spread=100,
                                           latency_tolerance=0.99, cache_dir=str(tmp_path), limit=64, grid=(0.25, 0.5), calibrate=32),
                data=str(DEMO.parent / "fmnist_val.npz"), write=False)
    assert res.report.strategy == resolved and res.report.detail["latency"]["iterations"]
    assert res.curves is not None and res.report.metrics["pruned"]["top1"] is not None
