"""The ``recon`` criterion: channels chosen by how well their consumers' outputs can be rebuilt."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import allocate
from onnxprune.errors import UsageError
from onnxprune.groups import find_groups
from onnxprune.importance import CRITERIA, score_units
from onnxprune.recon_criterion import greedy_order
from onnxprune.rewrite import apply_mask
from tests.oracle import rel_err, run


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def misleading_net() -> onnx.ModelProto:
    """conv1 (3 -> 8) + ReLU -> conv2 (8 -> 6). Channels 0-2 have the largest filters but a bias so
    negative that ReLU kills them (no contribution: L1 keeps them, reconstruction drops them);
    channels 5-7 have small filters but large consumer weights (L1 drops them, they matter)."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(0, 0.3, (8, 3, 3, 3)), rng.normal(0.2, 0.05, 8)
    w1[:3] *= 4.0
    b1[:3] = -100.0
    w1[5:] *= 0.3
    w2 = rng.normal(0, 0.3, (6, 8, 3, 3))
    w2[:, 5:] *= 10.0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, 8, 8])],
                              initializer=[_c("w1", w1), _c("b1", b1), _c("w2", w2)])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_recon_beats_l1_at_equal_macs_on_unseen_samples():
    cg = find_groups(misleading_net())
    rng = np.random.default_rng(1)
    x, x_test = rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32), rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    (g,) = cg.prunable_groups
    keep = {g.id: 4}
    masks = {c: allocate.MaskBuilder(cg, score_units(cg, c, data=x if c == "recon" else None)).mask(keep) for c in ("l1", "recon")}
    assert cg.macs(masks["l1"]) == cg.macs(masks["recon"])  # equal MACs
    kept = {c: sorted(g.channel_ids[i] for i, u in enumerate(g.units) if m[u]) for c, m in masks.items()}
    assert not set(kept["recon"]) & {0, 1, 2}, kept  # the dead channels go first
    assert set(kept["l1"]) >= {0, 1, 2}
    ref = run(cg.model, x_test)[0]
    err = {c: rel_err(run(apply_mask(cg, m), x_test)[0], ref) for c, m in masks.items()}
    assert err["recon"] < 0.5 * err["l1"], err


def test_greedy_order_is_thinet_on_a_known_matrix():
    # contributions: z0 = -z1 (they cancel: removing both costs nothing), z2 small, z3 large
    z = np.array([[1.0, 2.0], [-1.0, -2.0], [0.1, 0.0], [3.0, 3.0]])
    m = z @ z.T
    order = greedy_order(m).tolist()
    assert order[0] == 2 and set(order[1:3]) == {0, 1} and order[-1] == 3


def test_recon_needs_data_and_is_a_listed_criterion():
    cg = find_groups(misleading_net())
    assert "recon" in CRITERIA
    with pytest.raises(UsageError, match="--calib-data"):
        score_units(cg, "recon")


def test_prune_api_uses_the_calibration_samples_for_recon(tmp_path):
    """``prune(criterion="recon")`` reads its samples from --calib-data, with the channels the
    criterion picks (the dead ones go), and recovers with the default reconstruction."""
    from onnxprune.api import PruneOptions, prune

    path = tmp_path / "m.onnx"
    onnx.save(misleading_net(), path)
    x = np.random.default_rng(1).normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    opts = PruneOptions(target_flops=0.4, strategy="uniform", criterion="recon", round_to=1, calibrate=64)
    res = prune(path, options=opts, calib_data=str(tmp_path / "calib.npz"), write=False)
    cg = find_groups(misleading_net())
    mask = res.plan.to_mask(cg)
    (g,) = cg.prunable_groups
    kept = [c for i, c in enumerate(g.channel_ids) if mask[g.units[i]]]
    assert len(kept) < 8 and not set(kept) & {0, 1, 2}, kept
