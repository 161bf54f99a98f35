"""``--round-to measured`` with a MAC target: per-group levels from measured staircases.

Real ORT measurements on tiny models built here; the assertions are on structure (levels, the
target and its overshoot bound, cache reuse, fallback, report lines), never on timings.
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
from onnxprune.errors import TargetError
from onnxprune.errors import UsageError
from onnxprune.groups import find_groups
from onnxprune.importance import score_units
from onnxprune.latency_table import CPU, LatencySettings, candidate_counts
from onnxprune.rounding import GroupRounding, Probe, RoundedMacs, allocate_rounded, probe_counts, rounding_setup

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo" / "fmnist_resnet20.onnx"
VAL = ROOT / "models" / "demo" / "fmnist_val.npz"
SETTINGS = LatencySettings(provider=CPU, batch=1, threads=1)


def cnn(channels=(3, 32, 24, 48), hw=8, batch="N") -> onnx.ModelProto:
    """Conv-Relu chain, global average pool and a Gemm head (10 classes)."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, [cout, cin, 3, 3], rng.standard_normal(cout * cin * 9).astype(np.float32)))
        inits.append(helper.make_tensor(f"b{i}", TensorProto.FLOAT, [cout], rng.standard_normal(cout).astype(np.float32)))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    c = channels[-1]
    inits.append(helper.make_tensor("fw", TensorProto.FLOAT, [10, c], rng.standard_normal(10 * c).astype(np.float32)))
    inits.append(helper.make_tensor("fb", TensorProto.FLOAT, [10], np.zeros(10, np.float32)))
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", "fw", "fb"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels[0], hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cg = find_groups(cnn())
    cache = tmp_path_factory.mktemp("cache")
    first = rounding_setup(cg, SETTINGS, cache_dir=cache)
    second = rounding_setup(cg, SETTINGS, cache_dir=cache)
    return cg, first, second


def test_probe_counts_reference_lower_level_and_counts_between():
    assert probe_counts(64, 16) == [(16, 4, [15, 10]), (48, 32, [47, 40]), (64, 48, [63, 56])]
    assert probe_counts(8, 16) == [(8, 2, [7, 5])]  # below one step: the full count is the reference
    assert probe_counts(24, 16) == [(16, 4, [15, 10]), (24, 6, [23, 15])]
    assert probe_counts(1, 16) == []
    for m, low, between in probe_counts(200, 8):
        assert low < min(between) and max(between) < m


def test_levels_are_multiples_or_any_count(setup):
    cg, rnd, _ = setup
    assert {g.id for g in cg.prunable_groups} == set(rnd.cost.levels) == set(rnd.probe.groups)
    for g in cg.prunable_groups:
        lv = rnd.cost.levels[g.id]
        assert list(lv) == sorted(set(lv.tolist())) and lv[-1] == g.channels and lv[0] >= 1
        d = rnd.probe.groups[g.id]
        assert d.measured and d.probes > 0 and 0 <= d.staircase_votes <= d.probes
        if d.step == 1:
            assert list(lv) == list(range(1, g.channels + 1))
        else:
            assert d.step == SETTINGS.step and list(lv) == candidate_counts(g.channels, d.step)


def test_second_call_reads_the_cache(setup):
    _, first, second = setup
    assert first.probe.measured_points > 0
    assert second.probe.measured_points == 0 and second.probe.cached_points == first.probe.measured_points + first.probe.cached_points
    assert second.probe.groups == first.probe.groups
    assert first.lm.build.measured > 0 and second.lm.build.measured == 0  # the latency tables are cached as well


def _overshoot_bound(cg, builder, cost, keep) -> float:
    """The finest step still achievable: the smallest MAC share a group not at full could give back."""
    red = 1 - cg.macs(builder.mask(keep)) / cg.total_macs
    steps = []
    for gid, n in keep.items():
        lv = cost.levels[gid]
        i = int(np.searchsorted(lv, n))
        if i + 1 < len(lv):
            steps.append(red - (1 - cg.macs(builder.mask({**keep, gid: int(lv[i + 1])})) / cg.total_macs))
    return min(steps)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("target", [0.2, 0.3, 0.5])
def test_allocation_meets_target_without_overshooting_the_finest_step(setup, target, mixed):
    cg, rnd, _ = setup
    cost = rnd.cost
    if mixed:  # one group on the staircase, the others at any count, whatever this machine measured
        ids = [g.id for g in cg.prunable_groups]
        forced = {gid: GroupRounding(16 if k == 0 else 1, 1, 1, True) for k, gid in enumerate(ids)}
        cost = RoundedMacs(cg, Probe(16, forced, 0, 0, 0.0, None).levels(cg))
        assert list(cost.levels[ids[0]]) == candidate_counts(cg.group(ids[0]).channels, 16)
    scores = score_units(cg, "l1")
    builder = allocate.MaskBuilder(cg, scores)
    for fn in (allocate.uniform,):
        alloc = fn(cg, scores, target=target, cost=cost)
        assert alloc.reduction >= target
        assert alloc.reduction - target < _overshoot_bound(cg, builder, cost, alloc.keep)
        for gid, n in alloc.keep.items():
            assert n in set(cost.levels[gid].tolist())


def test_staircase_groups_take_finer_multiples_when_the_target_needs_it(setup):
    cg, rnd, _ = setup
    staircase = Probe(16, {g.id: GroupRounding(16, 1, 1, True) for g in cg.prunable_groups}, 0, 0, 0.0, None)
    rnd2 = type(rnd)(staircase, rnd.lm, RoundedMacs(cg, staircase.levels(cg)), 16)
    scores = score_units(cg, "l1")
    top = allocate.check_reachable(cg, scores, target=0.5, round_to=1, cost=rnd2.cost)  # the most multiples of 16 can remove
    target = top + 0.01
    with pytest.raises(TargetError):
        allocate.uniform(cg, scores, target=target, cost=rnd2.cost)
    alloc = allocate_rounded(rnd2, cg, lambda cost: allocate.uniform(cg, scores, target=target, cost=cost))
    assert alloc.reduction >= target and rnd2.stair_step < 16


def test_prune_reports_rounding_cost_and_fallback(tmp_path):
    ok = tmp_path / "m.onnx"
    onnx.save(cnn(), ok)
    res = prune(ok, options=PruneOptions(target_flops=0.3, round_to="measured", cache_dir=str(tmp_path / "c"), latency_threads=1), output=tmp_path / "o.onnx")
    r = res.report.detail["rounding"]
    assert r["mode"] == "auto" and r["reduction"] == pytest.approx(res.report.reduction)
    assert r["reduction"] >= 0.3 and r["unrounded_reduction"] >= 0.3 and r["unrounded_predicted_ms"] > 0
    assert "accuracy" not in r  # no data: no evaluation
    line = next(x for x in res.report.summary_lines() if x.startswith("Rounding cost"))
    assert f"-{r['reduction']:.1%} vs -{r['unrounded_reduction']:.1%} unrounded" in line
    # a fixed batch of 4 cannot be measured at the default --latency-batch 1: today's global multiple, said so
    fixed = tmp_path / "fixed.onnx"
    onnx.save(cnn(batch=4), fixed)
    res = prune(fixed, options=PruneOptions(target_flops=0.3, round_to="measured", cache_dir=str(tmp_path / "c")), output=tmp_path / "f.onnx")
    r = res.report.detail["rounding"]
    assert r["mode"] == "fallback" and "--latency-batch 4" in r["note"] and "multiples of" in r["note"]
    assert any(x.startswith("Note: --round-to measured could not measure latency") for x in res.report.summary_lines())
    step = res.report.round_to
    assert step > 1 and all(g.channels_after % step == 0 or g.channels_after == g.channels_before for g in res.report.groups)
    # the default auto keeps the global multiple (halved where needed), no probing, and states what it cost
    before_cache = sorted(p.name for p in (tmp_path / "c").iterdir())
    res = prune(ok, options=PruneOptions(target_flops=0.3, cache_dir=str(tmp_path / "c")), output=tmp_path / "d.onnx")
    assert res.report.round_to in (16, 8, 4)
    assert all(g.channels_after % res.report.round_to == 0 or g.channels_after == g.channels_before for g in res.report.groups)
    r = res.report.detail["rounding"]
    assert r["mode"] == "global" and r["round_to"] == res.report.round_to and r["reduction"] == pytest.approx(res.report.reduction)
    assert r["unrounded_reduction"] >= 0.3 and "accuracy" not in r and "latency" not in r  # no data, no --measure-latency
    assert any(x.startswith(f"Rounding cost (every group on multiples of {r['round_to']}") for x in res.report.summary_lines())
    assert not (tmp_path / "c" / "probe").exists() and sorted(p.name for p in (tmp_path / "c").iterdir()) == before_cache
    # explicit --round-to keeps its meaning: no probing, no rounding detail
    res = prune(ok, options=PruneOptions(target_flops=0.3, round_to=8), output=tmp_path / "e.onnx")
    assert "rounding" not in res.report.detail and res.report.round_to == 8
    assert all(g.channels_after % 8 == 0 or g.channels_after == g.channels_before for g in res.report.groups)


def test_large_models_keep_the_global_multiple_without_measuring(tmp_path):
    """Above max_mib of weights nothing is measured (a 2.1 GB VGG once reached 16.6 GB RSS here): the
    error names the size and the flags that choose the multiple, and prune() falls back to it."""
    cg = find_groups(cnn())
    with pytest.raises(UsageError, match=r"MiB of weights.*") as info:
        rounding_setup(cg, SETTINGS, cache_dir=tmp_path / "c", max_mib=0.001)
    assert "--round-to 16" in info.value.fix and "--target-latency" in info.value.fix
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # nothing measured or cached


def test_cli_summary_states_rounding_cost(tmp_path):
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "onnxprune.cli", "prune", str(DEMO), "--target-flops", "0.3", "--strategy", "uniform",
                        "--round-to", "measured", "--data", str(VAL), "--limit", "300", "--calibrate", "0", "-o", str(out), "--report", str(rep),
                        "--cache-dir", str(tmp_path / "cache"), "--quiet"],
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    d = json.loads(rep.read_text())["detail"]["rounding"]
    assert d["mode"] == "auto" and d["accuracy"]["stage"] == "pruned"
    head = next(x for x in r.stdout.splitlines() if x.startswith("Rounding cost"))
    assert f"MACs -{100 * d['reduction']:.1f}% vs -{100 * d['unrounded_reduction']:.1f}% unrounded" in head
    tail = r.stdout.splitlines()[r.stdout.splitlines().index(head) + 1]
    assert f"{d['predicted_ms']:.3f} vs {d['unrounded_predicted_ms']:.3f} ms" in tail and "top1 pruned" in tail
    assert max(len(head), len(tail)) <= 100


def test_auto_rounding_states_accuracy_and_latency_of_the_unrounded_plan(tmp_path):
    """--round-to auto with data and --measure-latency: the unrounded (round-to 1) plan from the same
    sensitivity data is evaluated and timed beside the rounded one, and the summary says both."""
    res = prune(DEMO, options=PruneOptions(target_flops=0.3, strategy="uniform", limit=300, calibrate=0, measure_latency=True,
                                           latency_threads=1, latency_max_spread=100), data=str(VAL), write=False)
    r = res.report.detail["rounding"]
    assert r["mode"] == "global" and r["round_to"] == res.report.round_to > 1
    acc = r["accuracy"]
    assert acc["stage"] == "pruned" and acc["rounded"]["top1"] == pytest.approx(res.report.metrics["pruned"]["top1"])
    if not acc["same_plan"]:
        keep = r["unrounded_keep"]
        assert any(n % r["round_to"] for n in keep.values())  # the unrounded plan really is off the multiple somewhere
    lat = r["latency"]
    assert -1 < lat["unrounded_cut"] < 1 and r["chosen"] in ("rounded", "unrounded")  # a measured verdict, either way
    if r["chosen"] == "rounded":
        assert lat["rounded_cut"] == pytest.approx(res.report.detail["latency"]["measured_cut"])
    assert lat["unrounded_ms"] == pytest.approx(lat["rounded_ms"] * (1 + lat["unrounded_vs_rounded"]))
    lines = res.report.summary_lines()
    head = next(k for k, x in enumerate(lines) if x.startswith("Rounding cost (every group on multiples of"))
    assert "measured latency" in lines[head + 1] and "top1 pruned" in lines[head + 1] and "vs" in lines[head + 1]
    assert lines[head + 2].strip().lower() == r["verdict"].lower() and "--latency-tolerance 2%" in r["verdict"]


def _verdict_detail(slower, rounded_top1=None, unrounded_top1=None, mode="global", spread=0.0, rounds=15):
    r = {"mode": mode, "round_to": 16, "latency": {"unrounded_vs_rounded": slower, "spread": spread, "rounds": rounds}}
    if rounded_top1 is not None:
        r["accuracy"] = {"stage": "calibrated", "rounded": {"top1": rounded_top1}, "unrounded": {"top1": unrounded_top1}}
    return r


@pytest.mark.parametrize("slower, acc, keep", [
    (0.12, (0.90, 0.95), False),  # the multiple buys 12% of time: it stays, however accurate the unrounded plan
    (0.01, (0.90, 0.95), True),  # no measured speed, better accuracy: unrounded
    (-0.03, (0.90, 0.90), True),  # unrounded measured faster, accuracy equal: unrounded
    (0.01, (0.92, 0.91), False),  # no measured speed, but the rounded plan is more accurate
    (0.01, (None, None), True),  # no data: speed decides, and the finer plan is kept
])
def test_rounding_verdict_keeps_the_multiple_only_where_it_buys_measured_speed(slower, acc, keep):
    from onnxprune.api import rounding_verdict

    got = rounding_verdict(_verdict_detail(slower, *acc), 0.02)
    assert got is not None and got[0] is keep
    assert ("unrounded plan is kept" in got[1]) is keep and f"{abs(slower):.1%}" in got[1]
    assert rounding_verdict(_verdict_detail(0.01, mode="auto"), 0.02) is None  # --round-to measured decides per group
    # a noisy comparison (spread 15% over 15 rounds: a standard error of about 3.6%) keeps the multiple
    keep, why = rounding_verdict(_verdict_detail(0.01, 0.90, 0.95, spread=0.15, rounds=15), 0.02)
    assert keep is False and "standard error 3.6%" in why and "not within --latency-tolerance 2%" in why
    assert rounding_verdict(_verdict_detail(0.01, 0.90, 0.95, spread=0.01, rounds=15), 0.02)[0] is True
    # without top-1 or agreement (a segmentation net), cosine to the original decides
    seg = _verdict_detail(0.0)
    seg["accuracy"] = {"stage": "calibrated", "rounded": {"top1": None, "agreement": None, "cosine": 0.95}, "unrounded": {"top1": None, "agreement": None, "cosine": 0.60}}
    keep, why = rounding_verdict(seg, 0.02)
    assert keep is False and "its cosine is lower (60.00% vs 95.00%)" in why
    assert rounding_verdict({"mode": "global", "round_to": 16}, 0.02) is None  # not timed: the multiple stays, no verdict
    noisy = {"mode": "global", "round_to": 16, "latency": {"rounded_cut": 0.2, "same_plan": False, "error": "latency measurement too noisy"}}
    keep_rounded, why = rounding_verdict(noisy, 0.02)
    assert keep_rounded is False and "could not be compared (latency measurement too noisy)" in why


def test_unrounded_plan_is_written_when_rounding_buys_no_speed(tmp_path):
    """A tolerance so wide that any measurement counts as "no faster" forces the unrounded plan: the
    model written, the groups, the MACs, the recovered metrics and the latency in the report are
    all the unrounded plan's, and the model written really has that accuracy."""
    out = tmp_path / "p.onnx"
    res = prune(DEMO, options=PruneOptions(target_flops=0.3, strategy="uniform", limit=300, measure_latency=True, latency_threads=1,
                                           latency_max_spread=100, latency_tolerance=0.99),
                data=str(VAL), calib_data=str(VAL), output=out)
    rep = res.report
    r = rep.detail["rounding"]
    assert r["mode"] == "global" and r["round_to"] > 1 and r["chosen"] == "unrounded" and not r["latency"]["same_plan"]
    assert rep.round_to == 1 and rep.reduction == pytest.approx(r["unrounded_reduction"]) != pytest.approx(r["reduction"])
    after = {g.id: g.channels_after for g in rep.groups}
    assert {k: after[k] for k in r["unrounded_keep"]} == r["unrounded_keep"]
    assert any(after[k] % r["round_to"] for k in r["unrounded_keep"])
    assert rep.metrics["calibrated"] == r["accuracy"]["unrounded"]
    assert rep.detail["latency"]["macs_cut"] == pytest.approx(rep.reduction) and "measured_cut" in rep.detail["latency"]  # timed on the plan written
    import onnxruntime as ort

    from onnxprune.data import load_dataset

    ds = load_dataset(str(VAL), limit=300)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: ds.x.astype(np.float32)})[0]
    assert np.mean(logits.argmax(1) == ds.y) == pytest.approx(rep.metrics["calibrated"]["top1"])
    assert any(line.startswith("  Rounding bought no measured speed") for line in rep.summary_lines())


def test_rounding_cost_line_names_the_groups_narrower_than_the_multiple():
    from onnxprune.report import rounding_lines

    base = {"mode": "global", "round_to": 16, "reduction": 0.503, "unrounded_reduction": 0.5}
    assert rounding_lines({"rounding": base})[0].startswith("Rounding cost (every group on multiples of 16;")
    head = rounding_lines({"rounding": {**base, "narrow_groups": 2, "narrow_step": 4}})[0]
    assert head.startswith("Rounding cost (groups on multiples of 16, 2 narrower ones of 4; --round-to 1 for none): MACs -50.3% vs -50.0%")
