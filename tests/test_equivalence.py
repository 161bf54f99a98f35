"""Pruned model == original with removed channels masked, on every reference architecture.

Every zoo model is exported with both torch exporters; for several random
plans the pruned model must (1) pass the full ONNX checker, (2) compute the
masked original's outputs (rel. error <= 1e-4) in ONNX Runtime, (3) have the
MACs the plan predicted, and (4) leave the input model untouched.
"""

import numpy as np
import onnx
import pytest

from models.zoo import ZOO
from onnxprune.flops import count
from onnxprune.groups import find_groups
from onnxprune.rewrite import apply_mask
from oracle import masked_model, random_mask, rel_err, run

NAMES = [n for n in ZOO if n != "resnet50"]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", NAMES)
def test_random_plans_match_masked_original(zoo_export, name, exporter):
    model = onnx.load(str(zoo_export(name, exporter)))
    before = model.SerializeToString()
    cg = find_groups(model)
    shape = ZOO[name][1]
    x = np.random.default_rng(0).standard_normal((3, *shape[1:])).astype(np.float32)
    assert cg.prunable_groups, "every reference model has prunable groups"
    for seed in range(3):
        mask = random_mask(cg, np.random.default_rng(seed))
        assert not mask.all()
        pruned = apply_mask(cg, mask)
        onnx.checker.check_model(pruned, full_check=True)
        got, want = run(pruned, x)[0], run(masked_model(cg, mask), x)[0]
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-4, (name, exporter, seed)
        assert count(pruned).total_macs == cg.macs(mask)
        assert count(pruned).total_macs < cg.total_macs
    assert model.SerializeToString() == before, "apply_mask must not mutate its input"


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_structure_after_pruning_mobilenet(zoo_export, exporter):
    """Depthwise convs get group == kept channels; weights are sliced on the right axes."""
    cg = find_groups(onnx.load(str(zoo_export("mobilenetv2_small", exporter))))
    mask = random_mask(cg, np.random.default_rng(3), max_ratio=0.6)
    pruned = apply_mask(cg, mask)
    inits = {t.name: t for t in pruned.graph.initializer}
    dw = 0
    for node in pruned.graph.node:
        if node.op_type != "Conv":
            continue
        g = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = inits[node.input[1]].dims
        if g > 1:
            dw += 1
            assert w[1] == 1 and w[0] == g, f"depthwise {node.name}: weight {w}, group {g}"
    assert dw > 0


def test_channel_shuffle_is_blocked_with_reason(zoo_export):
    cg = find_groups(onnx.load(str(zoo_export("shuffle_net_block", "legacy"))))
    reasons = [g.blocked_reason for g in cg.groups if not g.prunable]
    assert any("reshapes the channel axis" in r for r in reasons)
    assert any("graph output" in r for r in reasons)


def test_resnet56_zero_padding_shortcut_groups(zoo_export):
    """Option-A shortcuts couple stage outputs; the padded channels form their own prunable group."""
    cg = find_groups(onnx.load(str(zoo_export("resnet56", "legacy", 1.0))))
    pads = [g for g in cg.groups if any("Pad" in p for p in g.producers)]
    assert pads and all(g.prunable for g in pads)
    assert cg.prunable_macs_share == pytest.approx(1.0, abs=1e-3)
