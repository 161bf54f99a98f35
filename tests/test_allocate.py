"""Allocation: uniform binary search, rounding, sensitivity-based strategies."""

import numpy as np
import onnx
import pytest

from onnxprune import allocate
from onnxprune.allocate import SensitivityCurves, achievable, nearest
from onnxprune.errors import TargetError, UsageError
from onnxprune.flops import count
from onnxprune.groups import find_groups
from onnxprune.importance import score_units
from onnxprune.rewrite import apply_mask
from tests.test_latency import chain_model


@pytest.fixture(scope="module")
def vgg16(zoo_export):
    return find_groups(onnx.load(str(zoo_export("vgg16_bn", "legacy", 1.0))))


def test_achievable_counts():
    assert achievable(64, 16).tolist() == [16, 32, 48, 64]
    assert achievable(12, 16).tolist() == [4, 8, 12]  # narrower than the multiple: quarter steps, not frozen
    assert achievable(16, 16).tolist() == [16]
    assert achievable(3, 8).tolist() == [2, 3]
    assert achievable(1, 16).tolist() == [1]
    assert achievable(20, 8).tolist() == [8, 16, 20]
    assert achievable(5, 1).tolist() == [1, 2, 3, 4, 5]
    assert nearest(np.array([8, 16, 24]), 12) == 16  # ties go up
    with pytest.raises(UsageError):
        achievable(10, 0)


def test_uniform_vgg16_acra_target_without_rounding(vgg16):
    scores = score_units(vgg16, "l1")
    a = allocate.uniform(vgg16, scores, target=0.2918, round_to=1)
    assert vgg16.total_macs == 313_196_544 + 5_120
    assert 0.2918 <= a.reduction < 0.302
    # the pruned graph really has the MACs the allocation reports
    pruned = apply_mask(vgg16, allocate.MaskBuilder(vgg16, scores).mask(a.keep))
    assert count(pruned).total_macs == a.macs
    assert 0 < a.detail["ratio"] < 0.3


@pytest.mark.parametrize("round_to", [8, 16])
def test_uniform_with_rounding_meets_target(vgg16, round_to):
    scores = score_units(vgg16, "l1")
    a = allocate.uniform(vgg16, scores, target=0.2918, round_to=round_to)
    assert a.reduction >= 0.2918
    assert a.reduction < 0.2918 + 0.02, "greedy back-off keeps the overshoot small"
    for g in vgg16.prunable_groups:
        n = a.keep[g.id]
        assert n % round_to == 0 or n == g.channels


def test_unreachable_target_reports_maximum(vgg16):
    with pytest.raises(TargetError) as e:
        allocate.uniform(vgg16, score_units(vgg16, "l1"), target=0.999, round_to=64)
    assert "at most" in str(e.value) and "--target-flops" in str(e.value)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_target_outside_open_interval(vgg16, bad):
    with pytest.raises(UsageError, match="between 0 and 1"):
        allocate.uniform(vgg16, score_units(vgg16, "l1"), target=bad)


def _curves(cg, sensitive: set[str]) -> SensitivityCurves:
    grid = (0.1, 0.3, 0.5, 0.7, 0.9)
    drops = {}
    for g in cg.prunable_groups:
        k = 0.5 if g.id in sensitive else 0.02
        drops[g.id] = tuple(k * r * r for r in grid)
    return SensitivityCurves("top1", 0.9, grid, drops)


@pytest.mark.parametrize("fn", [allocate.by_threshold, allocate.cost_aware])
def test_sensitivity_strategies_spare_sensitive_groups(vgg16, fn):
    scores = score_units(vgg16, "l1")
    ids = [g.id for g in vgg16.prunable_groups]
    sensitive = set(ids[:4])
    a = fn(vgg16, scores, _curves(vgg16, sensitive), target=0.4, round_to=8)
    assert a.reduction >= 0.4
    ratio = {g.id: 1 - a.keep[g.id] / g.channels for g in vgg16.prunable_groups}
    mean_sensitive = np.mean([ratio[i] for i in sensitive])
    mean_robust = np.mean([ratio[i] for i in ids if i not in sensitive])
    assert mean_sensitive < mean_robust


def test_envelope_and_interpolation():
    c = SensitivityCurves("top1", 0.9, (0.2, 0.4, 0.6), {"g": (0.05, 0.02, 0.2)})
    r, env = c.envelope("g")
    assert env.tolist() == [0.0, 0.05, 0.05, 0.2]  # monotone envelope
    assert c.ratio_under("g", 0.05) == pytest.approx(0.4)
    assert c.ratio_under("g", 0.125) == pytest.approx(0.5)
    assert c.ratio_under("g", 1.0) == 1.0
    assert c.drop_at("g", 0.1) == pytest.approx(0.025)


def test_no_prunable_group_is_an_error(zoo_export):
    cg = find_groups(onnx.load(str(zoo_export("plain_cnn", "legacy", 1.0))), exclude=["*"])
    with pytest.raises(TargetError, match="no channel group can be pruned"):
        allocate.uniform(cg, score_units(cg, "l1"), target=0.3)


def test_auto_rounding_uses_simd_block_and_halves_when_needed(zoo_export):
    from onnxprune.api import PruneOptions, prune
    from onnxprune.hardware import round_to_candidates, simd_channel_block

    block = simd_channel_block()
    assert block in (8, 16) and round_to_candidates("auto")[0] == block and round_to_candidates(12) == [12]
    path = zoo_export("resnet56", "legacy", 1.0)
    r30 = prune(path, options=PruneOptions(target_flops=0.3), write=False).report
    assert r30.round_to == block and r30.reduction >= 0.3
    # ResNet-56's 16-channel stage cannot shrink at multiples of 16: -50% needs multiples of 8
    r50 = prune(path, options=PruneOptions(target_flops=0.5), write=False).report
    assert r50.round_to == 8 and r50.reduction >= 0.5
    kept = [g.channels_after for g in r50.groups if g.blocked_reason is None]
    assert all(k % 8 == 0 for k in kept)


def test_groups_narrower_than_the_multiple_shrink_but_do_not_choose_it():
    """12-channel groups at multiples of 16 take quarter steps instead of staying frozen, but
    ``--round-to auto`` picks its multiple with them frozen: their quarter steps must not make a
    coarse multiple "reachable" for every wide group (what the demo ResNet-20 showed)."""
    from onnxprune.api import _with_rounding

    cg = find_groups(chain_model((3, 12, 12, 32, 10)))
    scores = score_units(cg, "l1")
    by_width = {g.channels: g.id for g in cg.prunable_groups}
    assert sorted(g.channels for g in cg.prunable_groups) == [12, 12, 32]

    def auto(target):
        return _with_rounding([16, 8], lambda r: allocate.uniform(cg, scores, target=target, round_to=r), cg, scores, target)

    # frozen 12s: at most 39.8% at multiples of 16 (with quarter steps 71%), so -50% takes multiples of 8
    assert allocate.check_reachable(cg, scores, target=0.3, round_to=16, narrow=False) == pytest.approx(1 - 532 / 884)
    with pytest.raises(TargetError):
        allocate.check_reachable(cg, scores, target=0.5, round_to=16, narrow=False)
    a50 = auto(0.5)
    assert a50.detail["round_to"] == 8 and a50.reduction >= 0.5
    assert all(k % 8 == 0 or k == cg.groups[0].channels for k in a50.keep.values())
    a30 = auto(0.3)
    assert a30.detail["round_to"] == 16 and a30.reduction >= 0.3 and a30.keep[by_width[32]] in (16, 32)
    # asked for multiples of 16 outright, -45% is reachable only by shrinking the 12s in quarter steps
    a45 = allocate.uniform(cg, scores, target=0.45, round_to=16)
    assert a45.reduction >= 0.45 and a45.keep[by_width[32]] in (16, 32)
    narrow = [a45.keep[g.id] for g in cg.prunable_groups if g.channels == 12]
    assert all(k in (4, 8, 12) for k in narrow) and min(narrow) < 12
