"""Least-squares reconstruction: exact where the original output is reachable, never worse, real gains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.groups import find_groups
from onnxprune.reconstruct import reconstruct
from onnxprune.rewrite import apply_mask
from tests.oracle import rel_err, run

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def duplicate_channel_net(consumer: str, hw: int = 9) -> onnx.ModelProto:
    """conv1 (3 -> 8, 3x3) whose channel 5 repeats channel 2, ReLU, then ``consumer`` reads all 8."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.4, (8, 3, 3, 3))
    b1 = rng.normal(0, 0.1, 8)
    w1[5], b1[5] = w1[2], b1[2]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    ]
    inits = [_c("w1", w1), _c("b1", b1)]
    if consumer.startswith("conv"):
        w2 = rng.normal(0, 0.3, (6, 8, 3, 3))
        attrs = {"kernel_shape": [3, 3], "strides": [2, 2]}
        if consumer == "conv_same":
            attrs["auto_pad"] = "SAME_UPPER"
        else:
            attrs["pads"] = [1, 0, 1, 2]
        ins = ["r1", "w2"] + ([] if consumer == "conv_nobias" else ["b2"])
        nodes.append(helper.make_node("Conv", ins, ["y"], name="consumer", **attrs))
        inits += [_c("w2", w2), _c("b2", rng.normal(0, 0.1, 6))]
    else:
        flat_in = "r1"
        if consumer in ("gemm_gap", "matmul"):
            nodes.append(helper.make_node("GlobalAveragePool", ["r1"], ["gap"], name="gap"))
            flat_in = "gap"
        nodes.append(helper.make_node("Flatten", [flat_in], ["f"], name="flatten", axis=1))
        feats = 8 if flat_in == "gap" else 8 * hw * hw
        if consumer == "matmul":
            nodes.append(helper.make_node("MatMul", ["f", "w2"], ["y"], name="consumer"))
            inits.append(_c("w2", rng.normal(0, 0.3, (feats, 5))))
        else:
            trans = consumer == "gemm_flatten"
            w2 = rng.normal(0, 0.3, (5, feats) if trans else (feats, 5))
            nodes.append(helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="consumer", transB=int(trans), alpha=0.5, beta=2.0))
            inits += [_c("w2", w2), _c("b2", rng.normal(0, 0.1, 5))]
    graph = helper.make_graph(
        nodes, "dup", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"] if consumer.startswith("conv") else ["n", 5])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def drop(cg, producer: str, channels):
    mask = cg.full_mask()
    g = next(g for g in cg.prunable_groups if producer in g.producers)
    for c in channels:
        mask[g.units[g.channel_ids.index(c)]] = False
    return mask


def data(n=96, hw=9, seed=1):
    return np.random.default_rng(seed).normal(0.3, 1.0, (n, 3, hw, hw)).astype(np.float32)


CONSUMERS = ["conv_pads", "conv_same", "conv_nobias", "gemm_flatten", "gemm_gap", "matmul"]


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_exact_when_removed_channel_is_a_copy_of_a_kept_one(consumer):
    model = duplicate_channel_net(consumer)
    cg = find_groups(model)
    mask = drop(cg, "conv1", [5])
    pruned = apply_mask(cg, mask)
    x, x_test = data(n=1500 if consumer == "gemm_flatten" else 96), data(n=32, seed=7)  # 567 inputs per output need rows
    ref = run(model, x_test)[0]
    assert rel_err(run(pruned, x_test)[0], ref) > 0.05, "pruning must change the output"
    res = reconstruct(cg, mask, pruned, x, ridge=0.0, rows=4096, max_samples=len(x))
    assert [f.node for f in res.layers if f.applied] == ["consumer"]
    onnx.checker.check_model(res.model, full_check=True)
    assert rel_err(run(res.model, x_test)[0], ref) <= 1e-4  # on samples it never saw
    # the default ridge stays close to exact
    res = reconstruct(cg, mask, pruned, x, rows=4096, max_samples=len(x))
    assert rel_err(run(res.model, x_test)[0], ref) <= 1e-2


def test_unpruned_model_is_unchanged_and_inputs_are_not_mutated():
    model = duplicate_channel_net("conv_pads")
    cg = find_groups(model)
    full = apply_mask(cg, cg.full_mask())
    before = (model.SerializeToString(deterministic=True), full.SerializeToString(deterministic=True))
    res = reconstruct(cg, cg.full_mask(), full, data())
    assert res.layers == ()
    assert [t.SerializeToString() for t in res.model.graph.initializer] == [t.SerializeToString() for t in full.graph.initializer]
    mask = drop(cg, "conv1", [1, 5])
    pruned = apply_mask(cg, mask)
    snap = pruned.SerializeToString(deterministic=True)
    reconstruct(cg, mask, pruned, data())
    assert (model.SerializeToString(deterministic=True), full.SerializeToString(deterministic=True)) == before
    assert pruned.SerializeToString(deterministic=True) == snap


def test_underdetermined_fit_keeps_the_weights():
    model = duplicate_channel_net("gemm_flatten")
    cg = find_groups(model)
    mask = drop(cg, "conv1", [5])
    pruned = apply_mask(cg, mask)
    res = reconstruct(cg, mask, pruned, data(n=96), ridge=0.0)  # 77 fit rows for 568 weights per output
    assert not res.layers[0].applied and "pass more calibration samples" in res.layers[0].skipped
    assert [t.SerializeToString() for t in res.model.graph.initializer] == [t.SerializeToString() for t in pruned.graph.initializer]
    # with the default ridge the fit may be used, but only if it helps the held-out samples
    res = reconstruct(cg, mask, pruned, data(n=96))
    f = res.layers[0]
    assert f.skipped == "the fit did not improve the held-out samples" or f.error_after < f.error_before


def _with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return m


def test_fitted_layers_are_closer_to_the_original_on_unseen_samples(zoo_export):
    """Checked through ONNX Runtime on samples the fit never saw, against the original model:
    every re-fitted layer's output (at its kept channels) is closer to the original than the
    merely pruned model's, the reported error is what ORT measures, and the logits improve."""
    path = zoo_export("resnet20", "legacy", 0.5)
    from onnxprune import allocate
    from onnxprune.importance import score_units

    cg = find_groups(onnx.load(str(path)))
    scores = score_units(cg, "l1")
    mask = allocate.MaskBuilder(cg, scores).mask(allocate.uniform(cg, scores, target=0.4, round_to=1).keep)
    pruned = apply_mask(cg, mask)
    x = np.random.default_rng(0).normal(size=(64, 3, 32, 32)).astype(np.float32)
    res = reconstruct(cg, mask, pruned, x, rows=2048, mode="sequential")  # each layer's own output is its target
    applied = [f for f in res.layers if f.applied]
    assert len(applied) >= 10, res.layers
    assert all(f.skipped for f in res.layers if not f.applied)
    onnx.checker.check_model(res.model, full_check=True)

    x_new = np.random.default_rng(1).normal(size=(32, 3, 32, 32)).astype(np.float32)
    nodes = {n.name: n for n in cg.model.graph.node}
    names = [nodes[f.node].output[0] for f in applied]
    ref, before, after = (run(_with_outputs(m, names), x_new) for m in (cg.model, pruned, res.model))
    kept = cg.atom_kept(mask)
    for f, name, r, b, a in zip(applied, names, ref[1:], before[1:], after[1:]):
        keep = kept(cg.tensor_maps[name][1]) if name in cg.tensor_maps else np.ones(r.shape[1], bool)
        r = r[:, keep]
        assert a.shape == b.shape == r.shape, (f.node, a.shape, r.shape)
        err_before, err_after = rel_err(b, r), rel_err(a, r)
        assert err_after < err_before, (f.node, err_after, err_before)
        # the error the fit reports (on its sampled rows) is what ORT measures on new samples (measured: within 5%)
        assert 0.75 * f.error_after - 1e-3 <= err_after <= 1.25 * f.error_after + 1e-3, (f.node, err_after, f.error_after)
    # the logits: measured 0.150 -> 0.009
    assert rel_err(after[0], ref[0]) < 0.25 * rel_err(before[0], ref[0])


def test_recovers_trained_model_accuracy_without_training():
    """Real data: the shipped Fashion-MNIST VGG-11 at -50% MACs, 512 unlabeled images."""
    from onnxprune import allocate
    from onnxprune.calibrate import calibrate
    from onnxprune.graph import load_model
    from onnxprune.importance import score_units

    cg = find_groups(load_model(DEMO / "fmnist_vgg11.onnx"))
    scores = score_units(cg, "l1")
    mask = allocate.MaskBuilder(cg, scores).mask(allocate.uniform(cg, scores, target=0.5, round_to=8).keep)
    pruned = apply_mask(cg, mask)
    val, x_cal = np.load(DEMO / "fmnist_val.npz"), np.load(DEMO / "fmnist_calib.npz")["x"]

    def top1(m):
        return float((run(m, val["x"])[0].argmax(1) == val["y"]).mean())

    base, after_prune = top1(cg.model), top1(pruned)
    affine = top1(calibrate(cg, mask, pruned, x_cal, method="both").model)
    rec = top1(reconstruct(cg, mask, pruned, x_cal).model)
    assert after_prune < 0.3 and base > 0.9
    assert rec > affine + 0.1, (rec, affine)  # measured: 0.91 vs 0.70
    assert rec > base - 0.04


def test_small_target_budget_gives_nearly_the_same_model(zoo_export):
    """Targets over ``target_budget_mb`` are kept as float16 (bounded memory): the fit barely changes."""
    from onnxprune import allocate
    from onnxprune.importance import score_units
    from onnxprune.reconstruct import Reconstructor

    cg = find_groups(onnx.load(str(zoo_export("resnet20", "legacy", 0.5))))
    scores = score_units(cg, "l1")
    mask = allocate.MaskBuilder(cg, scores).mask(allocate.uniform(cg, scores, target=0.4, round_to=1).keep)
    pruned = apply_mask(cg, mask)
    x = np.random.default_rng(0).normal(size=(32, 3, 32, 32)).astype(np.float32)
    one = Reconstructor(cg, x, rows=1024).recover(mask, pruned)
    small = Reconstructor(cg, x, rows=1024, target_budget_mb=0.05).recover(mask, pruned)
    assert [f.node for f in one.layers] == [f.node for f in small.layers]
    np.testing.assert_allclose([f.error_after for f in small.layers], [f.error_after for f in one.layers], rtol=2e-2, atol=1e-4)
    assert rel_err(run(small.model, x)[0], run(one.model, x)[0]) <= 1e-2


def test_progress_counts_fitted_layers_and_one_protocol_for_all_methods():
    """Every recovery method is made and applied the same way; reconstruct reports progress per layer."""
    from onnxprune.recovery import METHODS, Recovery, make_recovery
    from onnxprune.errors import UsageError

    model = duplicate_channel_net("conv_pads")
    cg = find_groups(model)
    mask = drop(cg, "conv1", [5])
    pruned = apply_mask(cg, mask)
    x, x_test = data(n=96), data(n=32, seed=7)
    ref = run(model, x_test)[0]
    base = rel_err(run(pruned, x_test)[0], ref)
    for method in METHODS:
        rec = make_recovery(cg, x, method)
        assert isinstance(rec, Recovery) and rec.method == method
        calls = []
        res = rec.recover(mask, pruned, progress=lambda d, t: calls.append((d, t)))
        assert res.method == method and calls and calls[-1][0] == calls[-1][1]
        assert rel_err(run(res.model, x_test)[0], ref) < base, method
        assert rel_err(run(rec.transform()(pruned, mask), x_test)[0], run(res.model, x_test)[0]) <= 1e-6
    with pytest.raises(UsageError, match="only reconstructs"):
        make_recovery(cg, x, "reconstruct").calibrate(mask, pruned, method="bias")
