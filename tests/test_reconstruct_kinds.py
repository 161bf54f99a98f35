"""Reconstruction of every consumer kind: grouped and depthwise convs, ConvTranspose,
channels-last MatMul, explicit BatchNormalization; the activation stream; the fitting modes.

Models are built in code; every claim is checked by running the models with ONNX Runtime
on samples the fit never saw."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.fold import Params
from onnxprune.groups import find_groups
from onnxprune.reconstruct import Reconstructor, reconstruct
from onnxprune.rewrite import apply_mask
from tests.oracle import rel_err, run


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _model(nodes, inits, out_shape, hw=8, name="m"):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _conv1(rng, cout=8, dups=((5, 2),)):
    """conv1 (3 -> cout, 3x3, pad 1) + ReLU; output channel a repeats channel b for each (a, b) in ``dups``."""
    w1, b1 = rng.normal(0, 0.4, (cout, 3, 3, 3)), rng.normal(0, 0.1, cout)
    for a, b in dups:
        w1[a], b1[a] = w1[b], b1[b]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]  # fmt: skip
    return nodes, [_c("w1", w1), _c("b1", b1)]


def drop(cg, producer, channels):
    mask = cg.full_mask()
    g = next(g for g in cg.prunable_groups if producer in g.producers)
    for c in channels:
        mask[g.units[g.channel_ids.index(c)]] = False
    return mask


def data(n=120, hw=8, seed=1):
    return np.random.default_rng(seed).normal(0.3, 1.0, (n, 3, hw, hw)).astype(np.float32)


def _exact(model, producer, channels, *, scope="consumers", expect=None, n=120):
    cg = find_groups(model)
    mask = drop(cg, producer, channels)
    pruned = apply_mask(cg, mask)
    x_test = data(n=24, seed=7)
    ref = run(model, x_test)[0]
    assert rel_err(run(pruned, x_test)[0], ref) > 0.05, "pruning must change the output"
    res = reconstruct(cg, mask, pruned, data(n=n), ridge=0.0, rows=4096, scope=scope)
    onnx.checker.check_model(res.model, full_check=True)
    if expect is not None:
        assert [f.node for f in res.layers if f.applied] == expect, res.layers
    assert rel_err(run(res.model, x_test)[0], ref) <= 1e-4
    return cg, res


def test_grouped_consumer_is_fitted_per_group_and_exact():
    """A ResNeXt-style grouped 3x3 conv (group 2): the removed position of each group repeats a
    kept channel of the same group, so each group's system can rebuild its output exactly."""
    rng = np.random.default_rng(0)
    nodes, inits = _conv1(rng, 8, dups=((1, 3), (5, 7)))  # position 1 of each group of 4 repeats position 3
    nodes.append(helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="grouped", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], group=2))
    inits += [_c("w2", rng.normal(0, 0.3, (6, 4, 3, 3))), _c("b2", rng.normal(0, 0.1, 6))]
    cg, res = _exact(_model(nodes, inits, ["n", 6, 4, 4]), "conv1", [1], expect=["grouped"])
    (fit,) = res.layers
    assert (fit.groups, fit.features, fit.groups_fitted) == (2, 3 * 9, 2)
    node = next(n for n in res.model.graph.node if n.name == "grouped")
    assert next(a.i for a in node.attribute if a.name == "group") == 2
    w = next(numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name == node.input[1])
    assert w.shape == (6, 3, 3, 3)


def test_mobilenetv2_block_with_depthwise_is_exact():
    """conv1 -> expand 1x1 -> depthwise 3x3 -> project 1x1: removing a block-input channel that repeats
    a kept one (expand re-fitted) and a hidden channel whose expand and depthwise filters repeat a kept
    one (project re-fitted) is undone exactly, with the depthwise conv re-fitted per channel in between."""
    rng = np.random.default_rng(1)
    nodes, inits = _conv1(rng, 8)
    we, be = rng.normal(0, 0.4, (16, 8, 1, 1)), rng.normal(0, 0.1, 16)
    wd, bd = rng.normal(0, 0.4, (16, 1, 3, 3)), rng.normal(0, 0.1, 16)
    we[9], be[9], wd[9], bd[9] = we[4], be[4], wd[4], bd[4]  # hidden channel 9 repeats 4 through expand and depthwise
    nodes += [
        helper.make_node("Conv", ["r1", "we", "be"], ["e"], name="expand", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["e"], ["re"], name="relu_e"),
        helper.make_node("Conv", ["re", "wd", "bd"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16),
        helper.make_node("Relu", ["d"], ["rd"], name="relu_d"),
        helper.make_node("Conv", ["rd", "wp", "bp"], ["y"], name="project", kernel_shape=[1, 1]),
    ]
    inits += [_c("we", we), _c("be", be), _c("wd", wd), _c("bd", bd), _c("wp", rng.normal(0, 0.3, (4, 16, 1, 1))), _c("bp", rng.normal(0, 0.1, 4))]
    model = _model(nodes, inits, ["n", 4, 8, 8])
    cg = find_groups(model)
    mask = drop(cg, "conv1", [5]) & drop(cg, "expand", [9])
    pruned = apply_mask(cg, mask)
    x_test = data(n=24, seed=7)
    ref = run(model, x_test)[0]
    assert rel_err(run(pruned, x_test)[0], ref) > 0.05
    res = reconstruct(cg, mask, pruned, data(), ridge=0.0, rows=4096, scope="affected")
    fits = {f.node: f for f in res.layers}
    assert set(fits) == {"expand", "dw", "project"}
    assert (fits["dw"].groups, fits["dw"].features) == (15, 9)  # one 9-tap system per kept channel
    assert fits["expand"].applied and fits["project"].applied
    assert rel_err(run(res.model, x_test)[0], ref) <= 1e-4


def test_depthwise_refit_reduces_its_output_error():
    """When the expand conv cannot be rebuilt exactly, re-fitting the depthwise conv per channel
    (scope="affected") brings its output closer to the original's than re-fitting the consumers only."""
    rng = np.random.default_rng(2)
    nodes, inits = _conv1(rng, 8, dups=())
    nodes += [
        helper.make_node("Conv", ["r1", "we"], ["e"], name="expand", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["e"], ["re"], name="relu_e"),
        helper.make_node("Conv", ["re", "wd"], ["y"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16),
    ]
    inits += [_c("we", rng.normal(0, 0.4, (16, 8, 1, 1))), _c("wd", rng.normal(0, 0.4, (16, 1, 3, 3)))]
    model = _model(nodes, inits, ["n", 16, 8, 8])
    cg = find_groups(model)
    mask = drop(cg, "conv1", [1, 5])
    pruned = apply_mask(cg, mask)
    x_test = data(n=48, seed=7)
    ref = run(model, x_test)[0]
    errs = {}
    for scope in ("consumers", "affected"):
        res = reconstruct(cg, mask, pruned, data(n=200), rows=4096, scope=scope)
        errs[scope] = rel_err(run(res.model, x_test)[0], ref)
    dw = next(f for f in res.layers if f.node == "dw")
    assert dw.applied and dw.groups == 16 and dw.groups_fitted >= 8 and dw.error_after < dw.error_before
    assert errs["affected"] < errs["consumers"], errs  # measured 0.287 vs 0.291: small, the expand re-fit did most of it


def test_conv_transpose_consumer_is_exact():
    rng = np.random.default_rng(3)
    nodes, inits = _conv1(rng, 8)
    nodes.append(helper.make_node("ConvTranspose", ["r1", "w2", "b2"], ["y"], name="up", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 0, 1, 2], output_padding=[1, 1]))  # fmt: skip
    inits += [_c("w2", rng.normal(0, 0.3, (8, 4, 3, 3))), _c("b2", rng.normal(0, 0.1, 4))]
    _exact(_model(nodes, inits, ["n", 4, "h", "w"]), "conv1", [5], expect=["up"])


@pytest.mark.parametrize("layout", ["nhwc", "tokens"])
def test_channels_last_matmul_consumer_is_exact(layout):
    """A linear on channels-last activations: MatMul of [N, H, W, C] (or tokens [N, H*W, C]) by [C, D]."""
    rng = np.random.default_rng(4)
    nodes, inits = _conv1(rng, 8)
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", ["r1"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]))
    else:
        nodes.append(helper.make_node("Reshape", ["r1", "shape"], ["flat"], name="flatten_hw"))
        nodes.append(helper.make_node("Transpose", ["flat"], ["t"], name="to_tokens", perm=[0, 2, 1]))
        inits.append(numpy_helper.from_array(np.array([0, 8, -1], dtype=np.int64), "shape"))
    nodes.append(helper.make_node("MatMul", ["t", "w2"], ["y"], name="linear"))
    inits.append(_c("w2", rng.normal(0, 0.3, (8, 5))))
    _exact(_model(nodes, inits, ["n", 8, 8, 5] if layout == "nhwc" else ["n", 64, 5]), "conv1", [5], expect=["linear"])


def test_explicit_batchnorm_is_re_estimated():
    """conv1 -> conv2 -> BatchNormalization -> ReLU -> conv3: with scope="affected" the BN is fitted
    as a per-channel affine map and written as new running statistics (gamma and beta unchanged),
    and the model gets closer to the original than with the consumers alone."""
    rng = np.random.default_rng(5)
    nodes, inits = _conv1(rng, 8, dups=())
    nodes += [
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "g", "b", "mu", "var"], ["n2"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3", kernel_shape=[1, 1]),
    ]
    inits += [_c("w2", rng.normal(0, 0.3, (6, 8, 3, 3))), _c("g", rng.uniform(0.5, 1.5, 6)), _c("b", rng.normal(0, 0.2, 6)),
              _c("mu", rng.normal(0, 0.5, 6)), _c("var", rng.uniform(0.5, 2.0, 6)), _c("w3", rng.normal(0, 0.4, (4, 6, 1, 1)))]  # fmt: skip
    model = _model(nodes, inits, ["n", 4, 8, 8])
    cg = find_groups(model)
    mask = drop(cg, "conv1", [0, 3, 6])
    pruned = apply_mask(cg, mask)
    x_test = data(n=48, seed=7)
    ref = run(model, x_test)[0]
    errs, models = {}, {}
    for scope in ("consumers", "affected"):
        res = reconstruct(cg, mask, pruned, data(n=200), rows=4096, scope=scope, ridge=0.1)  # a strong ridge leaves the BN work to do
        errs[scope], models[scope] = rel_err(run(res.model, x_test)[0], ref), res
    bn = next(f for f in models["affected"].layers if f.node == "bn")
    assert bn.applied and bn.groups == 6 and bn.features == 1
    inits_after = {t.name: numpy_helper.to_array(t) for t in models["affected"].model.graph.initializer}
    node = next(n for n in models["affected"].model.graph.node if n.name == "bn")
    np.testing.assert_array_equal(inits_after[node.input[1]], numpy_helper.to_array(inits[-5]))  # gamma
    assert not np.allclose(inits_after[node.input[3]], numpy_helper.to_array(inits[-3]))  # running mean re-estimated
    assert errs["affected"] < errs["consumers"], errs


def test_stream_matches_prefix_runs_and_float16_cache_is_close():
    from onnxprune.activations import Stream
    from onnxprune.extract import prefix
    from onnxprune.runtime import Runner

    rng = np.random.default_rng(6)
    nodes, inits = _conv1(rng, 8, dups=())
    nodes += [helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
              helper.make_node("Add", ["c2", "r1"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["y"], name="relu")]  # fmt: skip
    inits.append(_c("w2", rng.normal(0, 0.3, (8, 8, 3, 3))))
    model = _model(nodes, inits, ["n", 8, 8, 8])
    x = data(n=50)
    runner = Runner(device="cpu", batch_size=16)
    for budget, tol in ((2**30, 1e-6), (0, 2e-3)):
        s = Stream(runner, model, x, budget_bytes=budget)
        for t in ("r1", "c2", "y"):
            got = s.get(model, [t])[t]
            want = runner.run(prefix(model, [t]), x, [t])[0]
            assert got.shape == want.shape and rel_err(np.asarray(got, dtype=np.float32), want) <= tol, (t, budget)
        assert s.done == {"conv1", "relu1", "conv2", "add", "relu"}  # every node ran once
        assert "r1" not in s.cache  # dropped once its last reader ran
    assert s.half


def test_modes_all_improve_a_resnet_and_blockwise_targets_block_outputs(zoo_export):
    from onnxprune import allocate
    from onnxprune.importance import score_units

    cg = find_groups(onnx.load(str(zoo_export("resnet20", "legacy", 0.5))))
    scores = score_units(cg, "l1")
    mask = allocate.MaskBuilder(cg, scores).mask(allocate.uniform(cg, scores, target=0.4, round_to=1).keep)
    pruned = apply_mask(cg, mask)
    rng = np.random.default_rng(0)
    x, x_new = rng.normal(size=(64, 3, 32, 32)).astype(np.float32), rng.normal(size=(32, 3, 32, 32)).astype(np.float32)
    ref = run(cg.model, x_new)[0]
    before = rel_err(run(pruned, x_new)[0], ref)
    for mode in ("layerwise", "sequential", "blockwise"):
        rec = Reconstructor(cg, x, rows=2048, mode=mode)
        res = rec.recover(mask, pruned)
        assert res.mode == mode and sum(f.applied for f in res.layers) >= 10
        assert rel_err(run(res.model, x_new)[0], ref) < 0.5 * before, mode
        if mode == "blockwise":
            layers, _ = rec._layers(cg.atom_kept(mask), pruned, Params(pruned))
            assert sum(L.side is not None for L in layers) >= 6  # the last conv of each residual block
    # a cache forced into float16 gives nearly the same model
    half = Reconstructor(cg, x, rows=2048, memory_budget_mb=0).recover(mask, pruned)
    full = Reconstructor(cg, x, rows=2048).recover(mask, pruned)
    assert rel_err(run(half.model, x_new)[0], run(full.model, x_new)[0]) <= 2e-2
