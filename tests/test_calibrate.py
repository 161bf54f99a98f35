"""Calibration of pruned models: exactness on constructed graphs, invariants, and real accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibrate import Calibrator, CalibrationResult, calibrate
from onnxprune.errors import DataError, UsageError
from onnxprune.groups import find_groups
from onnxprune.rewrite import apply_mask
from tests.oracle import rel_err, run

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- graph building
class G:
    """Tiny ONNX graph builder: ``g.conv(x, cout, k)`` etc. return the output tensor name."""

    def __init__(self, cin: int = 3, hw: int = 8, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0
        self.shape = {"x": (cin, hw, hw)}
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, hw, hw])

    def _name(self, op):
        self.k += 1
        return f"{op.lower()}{self.k}"

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op, inputs, **attrs):
        name = self._name(op)
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x, cout, k=3, pad=None, bias=True, group=1, w=None, b=None):
        cin = self.shape[x][0]
        pad = k // 2 if pad is None else pad
        w = self.rng.normal(0, 1 / np.sqrt(cin // group * k * k), (cout, cin // group, k, k)) if w is None else w
        name = self._name("Conv")
        ins = [x, self.const(name + "_w", w)]
        if bias:
            ins.append(self.const(name + "_b", self.rng.normal(0, 0.1, cout) if b is None else b))
        self.nodes.append(helper.make_node("Conv", ins, [name], name=name, kernel_shape=[k, k], pads=[pad] * 4, group=group))
        hw = self.shape[x][1] + 2 * pad - k + 1
        self.shape[name] = (cout, hw, hw)
        return name

    def bn(self, x):
        c = self.shape[x][0]
        name = self._name("BN")
        p = [
            self.const(name + "_g", self.rng.uniform(0.5, 1.5, c)),
            self.const(name + "_b", self.rng.normal(0, 0.2, c)),
            self.const(name + "_m", self.rng.normal(0, 0.2, c)),
            self.const(name + "_v", self.rng.uniform(0.5, 2.0, c)),
        ]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *p], [name], name=name, epsilon=1e-5))
        self.shape[name] = self.shape[x]
        return name

    def relu(self, x):
        out = self.node("Relu", [x])
        self.shape[out] = self.shape[x]
        return out

    def add(self, a, b):
        out = self.node("Add", [a, b])
        self.shape[out] = self.shape[a]
        return out

    def head(self, x, classes=5, pool=True, op="Gemm", bias=True):
        k = self.shape[x][0] * (1 if pool else self.shape[x][1] * self.shape[x][2])
        if pool:
            x = self.node("GlobalAveragePool", [x])
        f = self.node("Flatten", [x])
        w = self.rng.normal(0, 1 / np.sqrt(k), (k, classes))
        ins = [f, self.const(f"{op}_w", w)]
        if op == "Gemm" and bias:
            ins.append(self.const(f"{op}_b", self.rng.normal(0, 0.1, classes)))
        return self.node(op, ins)

    def model(self, out):
        y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
        graph = helper.make_graph(self.nodes, "g", [self.input], [y], initializer=self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def drop(cg, producer: str, channels, mask=None):
    """Mask removing ``channels`` (original indices) of the group produced by ``producer``."""
    mask = cg.full_mask() if mask is None else mask
    g = next(g for g in cg.prunable_groups if producer in g.producers)
    for c in channels:
        mask[g.units[g.channel_ids.index(c)]] = False
    return mask


def data(shape=(3, 8, 8), n=64, seed=1):
    return np.random.default_rng(seed).normal(0.5, 1.0, (n, *shape)).astype(np.float32)


def frozen_bytes(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString(deterministic=True)


def constant_channel_net(consumer: str):
    """conv1 channel 5 is the constant relu(0.7) (zero weights); ``consumer`` reads it."""
    g = G()
    w = g.rng.normal(0, 0.3, (6, 3, 3, 3))
    w[5] = 0.0
    b = g.rng.normal(0, 0.1, 6)
    b[5] = 0.7
    h = g.relu(g.conv("x", 6, 3, w=w, b=b))
    if consumer == "conv1x1":
        out = g.conv(h, 4, k=1, pad=0)
    elif consumer == "conv1x1_nobias":
        out = g.conv(h, 4, k=1, pad=0, bias=False)
    elif consumer == "gemm":
        out = g.head(h, pool=False, bias=False)
    elif consumer == "gemm_transB":
        f = g.node("Flatten", [h])
        w = g.const("wt", g.rng.normal(0, 0.05, (5, 6 * 8 * 8)))
        out = g.node("Gemm", [f, w, g.const("bt", g.rng.normal(0, 0.1, (1, 5)))], transB=1, alpha=0.5, beta=2.0)
    elif consumer == "convtranspose":
        w = g.const("wct", g.rng.normal(0, 0.3, (6, 4, 1, 1)))
        out = g.node("ConvTranspose", [h, w], kernel_shape=[1, 1])
    elif consumer == "matmul":
        out = g.head(h, pool=False, op="MatMul")
    else:
        raise ValueError(consumer)
    return g.model(out)


# --------------------------------------------------------------------------- tests
def test_full_mask_changes_nothing():
    g = G()
    h = g.relu(g.conv(g.relu(g.bn(g.conv("x", 8))), 8))
    model = g.model(g.head(g.relu(g.add(h, g.conv(h, 8)))))
    cg = find_groups(model)
    x = data()
    pruned = apply_mask(cg, cg.full_mask())
    for method in ("bias", "affine", "both"):
        res = calibrate(cg, cg.full_mask(), pruned, x, method=method)
        assert isinstance(res, CalibrationResult) and res.layers == ()
        assert rel_err(run(res.model, x)[0], run(model, x)[0]) <= 1e-5
    # forcing the affine step on every layer (stats already equal) is also a no-op
    cal = Calibrator(cg, x)
    m = onnx.ModelProto()
    m.CopyFrom(pruned)
    from onnxprune.fold import Params

    params, nodes = Params(m), {n.name: n for n in m.graph.node}
    kept = cg.atom_kept(cg.full_mask())
    targets = cal._targets(list(cal.compute), True)
    assert {t.kind for t in targets} == {"affine", "bn"}
    for t in targets:
        cal._match(m, params, nodes[t.node], t, kept, 100.0)
    assert rel_err(run(m, x)[0], run(model, x)[0]) <= 1e-5


@pytest.mark.parametrize("consumer", ["conv1x1", "conv1x1_nobias", "gemm", "gemm_transB", "matmul", "convtranspose"])
@pytest.mark.parametrize("method", ["bias", "both"])
def test_bias_compensation_exact_for_constant_channel(consumer, method):
    model = constant_channel_net(consumer)
    cg = find_groups(model)
    mask = drop(cg, "conv1", [5])
    pruned = apply_mask(cg, mask)
    x = data()
    ref = run(model, x)[0]
    assert rel_err(run(pruned, x)[0], ref) > 1e-2  # pruning alone changes the output
    before_pruned, before_orig = frozen_bytes(pruned), frozen_bytes(cg.model)
    res = calibrate(cg, mask, pruned, x, method=method)
    assert rel_err(run(res.model, x)[0], ref) <= 1e-5
    assert res.output_error_after <= 1e-5 < res.output_error_before
    assert frozen_bytes(pruned) == before_pruned and frozen_bytes(cg.model) == before_orig  # inputs untouched
    bias_layers = [layer for layer in res.layers if layer.kind == "bias"]
    assert len(bias_layers) == 1 and bias_layers[0].bias_border_error < 1e-6
    if consumer == "matmul":
        assert any(n.op_type == "Add" for n in res.model.graph.node)
    if consumer == "conv1x1_nobias":
        conv = next(n for n in res.model.graph.node if n.name == "conv3")
        assert len(conv.input) == 3 and conv.input[2]  # a new bias initializer


def test_grouped_consumer_exact():
    """group=2 ties channel c and c+3; both are constant, both are removed together."""
    g = G()
    w = g.rng.normal(0, 0.3, (6, 3, 3, 3))
    w[[1, 4]] = 0.0
    b = g.rng.normal(0, 0.1, 6)
    b[[1, 4]] = [0.7, 0.3]
    h = g.relu(g.conv("x", 6, 3, w=w, b=b))
    model = g.model(g.conv(h, 4, k=1, pad=0, group=2))
    cg = find_groups(model)
    mask = drop(cg, "conv1", [1])
    assert int((~mask).sum()) == 1
    pruned = apply_mask(cg, mask)
    assert pruned.graph.initializer[0].dims[0] == 4  # both positions removed
    x = data()
    res = calibrate(cg, mask, pruned, x, method="bias")
    assert rel_err(run(res.model, x)[0], run(model, x)[0]) <= 1e-5


def test_padded_consumer_exact_in_spatial_mean():
    """3x3 conv with zero padding: the per-channel bias restores the spatial mean, borders differ."""
    g = G()
    w = g.rng.normal(0, 0.3, (6, 3, 3, 3))
    w[5] = 0.0
    b = g.rng.normal(0, 0.1, 6)
    b[5] = 0.7
    h = g.relu(g.conv("x", 6, 3, w=w, b=b))
    model = g.model(g.conv(h, 4, k=3, pad=1))
    cg = find_groups(model)
    mask = drop(cg, "conv1", [5])
    x = data()
    res = calibrate(cg, mask, apply_mask(cg, mask), x, method="bias")
    ref, out = run(model, x)[0], run(res.model, x)[0]
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), ref.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    # the bias is the spatial average of the exact compensation: interior positions (all 9 taps)
    # are off by one constant per channel, border positions (fewer taps) by more
    diff = (out - ref).astype(np.float64)
    interior = diff[:, :, 1:-1, 1:-1]
    np.testing.assert_allclose(interior, np.broadcast_to(interior[:1, :, :1, :1], interior.shape), atol=1e-5)
    assert rel_err(out, ref) > 1e-4
    assert 0.05 < res.layers[0].bias_border_error < 1.0  # reported


def _residual_net():
    g = G(hw=8)
    a = g.relu(g.conv("x", 16))
    b = g.relu(g.conv(a, 16))
    b = g.conv(b, 16)
    a2 = g.relu(g.add(a, b))  # residual: conv1, conv3 channels coupled
    c = g.relu(g.conv(a2, 24))
    return g.model(g.head(c))


def test_residual_targets_match_original_moments():
    model = _residual_net()
    cg = find_groups(model)
    rng = np.random.default_rng(3)
    mask = cg.full_mask()
    for grp in cg.prunable_groups:
        mask[rng.choice(np.array(grp.units), size=grp.channels // 2, replace=False)] = False
    x = data(n=128)
    cal = Calibrator(cg, x)
    pruned = apply_mask(cg, mask)
    res = cal.calibrate(mask, pruned, method="affine")
    assert res.output_error_after < 0.5 * res.output_error_before
    kept = cg.atom_kept(mask)
    targets = [n for n in cg.model.graph.node if n.op_type in ("Conv", "Gemm")]
    names = [n.output[0] for n in targets]
    from onnxprune.extract import prefix
    from onnxprune.runtime import Runner

    runner = Runner(device="cpu", batch_size=64)
    new = runner.run(prefix(res.model, names), x, names)
    old = runner.run(prefix(cg.model, names), x, names)
    for name, a, b in zip(names, new, old):
        axis, atoms = cg.tensor_maps[name]
        b = np.take(b, np.nonzero(kept(atoms))[0], axis=axis)
        red = tuple(i for i in range(a.ndim) if i != axis)
        np.testing.assert_allclose(a.mean(axis=red), b.mean(axis=red), rtol=1e-3, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(a.std(axis=red), b.std(axis=red), rtol=1e-3, atol=1e-4, err_msg=name)


def test_explicit_bn_equals_folded():
    """Conv->BN re-estimation and the folded conv's affine calibration give the same model."""
    g = G(seed=5)
    h = g.relu(g.bn(g.conv("x", 8, bias=False)))
    h = g.relu(g.bn(g.conv(h, 8, bias=False)))
    model = g.model(g.head(h))
    folded = _fold_bn(model)
    x = data(n=96)
    np.testing.assert_allclose(run(folded, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-5)
    outs = []
    for m in (model, folded):
        cg = find_groups(m)
        conv_names = [n.name for n in cg.model.graph.node if n.op_type == "Conv"]
        mask = drop(cg, conv_names[0], [0, 3, 6])
        mask = drop(cg, conv_names[1], [1, 2], mask)
        res = calibrate(cg, mask, apply_mask(cg, mask), x, method="affine")
        outs.append(run(res.model, x)[0])
        if m is model:
            kinds = [layer.kind for layer in res.layers]
            assert kinds == ["bn", "affine"]  # BN after the consumer conv re-estimated, head matched; BN1 unaffected
            orig = {t.name: numpy_helper.to_array(t) for t in cg.model.graph.initializer}
            new = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
            bn = [n for n in res.model.graph.node if n.op_type == "BatchNormalization"][1]
            gamma_kept = new[bn.input[1]]
            keep_idx = [0, 3, 4, 5, 6, 7]  # the second conv drops channels 1 and 2
            assert gamma_kept.shape == (6,)
            np.testing.assert_allclose(gamma_kept, orig[bn.input[1]][keep_idx], rtol=1e-6)  # gamma kept
            assert not np.allclose(new[bn.input[3]], orig[bn.input[3]][keep_idx])  # mean re-estimated
    assert rel_err(outs[0], outs[1]) <= 1e-4


def _fold_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every Conv->BN pair folded (what exporters write)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = list(m.graph.node)
    keep = []
    for node in nodes:
        if node.op_type != "BatchNormalization":
            keep.append(node)
            continue
        conv = next(n for n in keep if n.output[0] == node.input[0])
        gmm, beta, mean, var = (inits[i].astype(np.float64) for i in node.input[1:5])
        k = gmm / np.sqrt(var + 1e-5)
        w = inits[conv.input[1]] * k[:, None, None, None]
        b = beta - k * mean
        for t in m.graph.initializer:
            if t.name == conv.input[1]:
                t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), t.name))
        bname = conv.name + "_fb"
        m.graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), bname))
        conv.input.append(bname)
        conv.output[0] = node.output[0]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    kept_inits = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept_inits)
    return m


def test_calibrator_transform_and_progress():
    model = _residual_net()
    cg = find_groups(model)
    x = data(n=32)
    cal = Calibrator(cg, x, batch_size=16)
    mask = drop(cg, next(n.name for n in cg.model.graph.node if n.op_type == "Conv" and n.name != "conv1"), [0, 1])
    pruned = apply_mask(cg, mask)
    calls = []
    res = cal.calibrate(mask, pruned, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1]
    out = cal.transform()(pruned, mask)
    no_cache = cal.calibrate(mask, pruned, memory_budget_mb=0).model  # every target run from the input
    assert rel_err(run(no_cache, x)[0], run(res.model, x)[0]) <= 1e-5
    assert rel_err(run(out, x)[0], run(res.model, x)[0]) <= 1e-6
    assert "calibrated (both)" in res.summary()


def test_errors():
    model = constant_channel_net("conv1x1")
    cg = find_groups(model)
    mask = drop(cg, "conv1", [5])
    pruned = apply_mask(cg, mask)
    x = data()
    with pytest.raises(UsageError, match="method"):
        calibrate(cg, mask, pruned, x, method="magic")
    with pytest.raises(DataError):
        calibrate(cg, mask, pruned, x.astype(np.int64))
    with pytest.raises(DataError):
        calibrate(cg, mask, pruned, x[:1])
    with pytest.raises(UsageError, match="mask"):
        calibrate(cg, mask[:-1], pruned, x)
    with pytest.raises(DataError, match="channels-last"):
        calibrate(cg, mask, pruned, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    other = constant_channel_net("gemm")
    with pytest.raises(UsageError, match="does not come from"):
        calibrate(cg, mask, other, x)


# --------------------------------------------------------------------------- a trained model
def _train_tiny_cnn():
    """A small BN CNN trained ~5 s on real Fashion-MNIST (16x16, 1 epoch), exported with BN folded."""
    torch = pytest.importorskip("torch")
    fm = pytest.importorskip("models.fashion_mnist")
    import io

    try:
        xt, yt = fm.load_split("train", n=6000)
        xv, yv = fm.load_split("val", n=2000)
    except fm.FashionMNISTError as exc:
        pytest.skip(str(exc))
    pool = lambda a: a.reshape(len(a), 1, 16, 2, 16, 2).mean((3, 5)).astype(np.float32)  # noqa: E731
    xt, xv = pool(xt), pool(xv)
    nn = torch.nn
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def cbr(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    net = nn.Sequential(*cbr(1, 16), nn.MaxPool2d(2), *cbr(16, 32), nn.MaxPool2d(2), *cbr(32, 32),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x_train, y_train = torch.from_numpy(xt[:-512]), torch.from_numpy(yt[:-512])
    net.train()
    perm = torch.randperm(len(x_train))
    for i in range(0, len(x_train), 64):
        idx = perm[i : i + 64]
        loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    torch.set_num_threads(threads)
    f = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, 16, 16),), f, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})  # fmt: skip
    return onnx.load_from_string(f.getvalue()), xt[-512:], xv, yv


def test_calibration_recovers_accuracy_of_trained_cnn():
    from onnxprune import allocate
    from onnxprune.importance import score_units

    model, x_calib, xv, yv = _train_tiny_cnn()
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # folded by the exporter

    def acc(m):
        return 100.0 * float((run(m, xv)[0].argmax(1) == yv).mean())

    cg = find_groups(model)
    base = acc(cg.model)
    assert base > 60
    scores = score_units(cg, "l1")
    cal = Calibrator(cg, x_calib)  # 512 unlabeled training images, no labels used
    for target in (0.3, 0.5):
        alloc = allocate.uniform(cg, scores, target=target, round_to=8)
        mask = allocate.MaskBuilder(cg, scores).mask(alloc.keep)
        pruned = apply_mask(cg, mask)
        before = acc(pruned)
        after = acc(cal.calibrate(mask, pruned, method="both").model)
        bias_only = acc(cal.calibrate(mask, pruned, method="bias").model)
        # measured: 30% -> 16.2 pruned, 62.6 calibrated (70.4 unpruned); 50% -> 9.7 / 52.8
        assert after >= before + 20, (target, base, before, after)
        assert after >= base - 25, (target, base, before, after)
        assert bias_only >= before, (target, before, bias_only)


def test_fixed_batch_model():
    """A model exported with batch 4 runs 4 samples at a time; the last 2 are padded, not dropped."""
    model = constant_channel_net("conv1x1")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    cg = find_groups(model)
    mask = drop(cg, "conv1", [5])
    x = data(n=30)
    res = calibrate(cg, mask, apply_mask(cg, mask), x, batch_size=64)
    assert res.samples == 30
    assert rel_err(run(res.model, x[:4])[0], run(model, x[:4])[0]) <= 1e-5


DEMO = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "demo"


@pytest.mark.parametrize(
    "name, floor, gain",
    [("vgg11", 88.0, 20.0), ("resnet20", 70.0, 50.0)],  # measured on 1000 images: 63.7->90.9 and 9.4->75.0
)
def test_calibration_on_demo_models(name, floor, gain):
    """The shipped trained demo models at -30% MACs (uniform L1, round_to 8)."""
    from onnxprune import allocate
    from onnxprune.graph import load_model
    from onnxprune.importance import score_units

    path = DEMO / f"fmnist_{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} not trained yet")
    val = np.load(DEMO / "fmnist_val.npz", allow_pickle=False)
    xv, yv = val["x"][:1000], val["y"][:1000]
    x_calib = np.load(DEMO / "fmnist_calib.npz", allow_pickle=False)["x"]
    cg = find_groups(load_model(path))
    scores = score_units(cg, "l1")
    alloc = allocate.uniform(cg, scores, target=0.3, round_to=8)
    mask = allocate.MaskBuilder(cg, scores).mask(alloc.keep)
    pruned = apply_mask(cg, mask)

    def acc(m):
        return 100.0 * float((run(m, xv)[0].argmax(1) == yv).mean())

    before = acc(pruned)
    res = calibrate(cg, mask, pruned, x_calib, measure=False)
    after = acc(res.model)
    assert after >= floor and after >= before + gain, (name, before, after)
