"""MAC and parameter counts of onnxprune.flops against published numbers and hand computation.

Reference numbers (GUIDE section 2): CIFAR VGG16 = 313,196,544 conv + 5,120 FC MACs;
CIFAR ResNet-56 = 125,485,056 conv MACs; ResNet-50 at 224 = 4,087,136,256 conv +
2,048,000 FC MACs. Hand-built graphs check each geometry rule on its own.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import ShapeError
from onnxprune.flops import count
from onnxprune.graph import load_model

torch = pytest.importorskip("torch")
from models.export import EXPORTERS, export_onnx  # noqa: E402
from models.zoo import build  # noqa: E402


# --------------------------------------------------------------------------- exported zoo models
@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(name, exporter) -> (onnx.ModelProto, torch module)``, each exported once per session."""
    root = tmp_path_factory.mktemp("flops_exports")
    cache: dict = {}

    def get(name: str, exporter: str):
        key = (name, exporter)
        if key not in cache:
            model, shape = build(name)
            path = export_onnx(model, root / f"{name}_{exporter}.onnx", input_shape=shape, exporter=exporter)
            cache[key] = (load_model(path), model)
        return cache[key]

    return get


REFERENCES = [
    # name, conv MACs, FC MACs
    ("vgg16_bn", 313_196_544, 5_120),
    ("resnet56", 125_485_056, 640),
    ("resnet50", 4_087_136_256, 2_048_000),
]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name,conv,fc", REFERENCES, ids=[r[0] for r in REFERENCES])
def test_reference_macs(exported, name, conv, fc, exporter):
    model, _ = exported(name, exporter)
    report = count(model)
    assert report.conv_macs == conv
    assert report.fc_macs == fc
    assert report.total_macs == conv + fc


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["vgg16_bn", "resnet56"])
def test_layer_params_are_weight_plus_bias_sizes(exported, name, exporter):
    model, torch_model = exported(name, exporter)
    report = count(model)
    inits = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for layer in report.layers:
        node = nodes[layer.name]
        expected = sum(inits[i] for i in node.input[1:3] if i)
        assert layer.params == expected, layer.name
    # independent of the graph: every conv is followed by BN, so folding gives each a bias
    mods = [m for m in torch_model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(report.layers) == len(mods)
    assert report.total_params == sum(m.weight.numel() + m.weight.shape[0] for m in mods)


# --------------------------------------------------------------------------- hand-built graphs
def _model(nodes, inputs, inits, out_shape) -> onnx.ModelProto:
    """Graph of ``nodes`` with output ``y``; ``inputs`` is ``{name: shape}`` (str or None dims are
    symbolic), ``inits`` is ``{name: shape}`` (random values)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [d if d is not None else "N" for d in out_shape])],
        [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _conv_case(x, w, out, *, op="Conv", bias=True, **attrs):
    inits = {"w": w}
    ins = ["x", "w"]
    if bias:
        cout = w[0] if op == "Conv" else w[1] * attrs.get("group", 1)
        inits["b"] = (cout,)
        ins.append("b")
    return _model([helper.make_node(op, ins, ["y"], name="n0", **attrs)], {"x": x}, inits, out)


CONV_CASES = [
    # id, input, weight, attrs, bias, (out shape), MACs (hand-computed: Cout*prod(out)*Cin/g*prod(k))
    ("plain", (1, 3, 8, 8), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1]), True, (1, 4, 8, 8), 4 * 64 * 3 * 9),
    ("groups4", (1, 8, 10, 10), (16, 2, 3, 3), dict(group=4, pads=[1, 1, 1, 1]), False, (1, 16, 10, 10), 16 * 100 * 2 * 9),
    ("depthwise_s2", (1, 8, 10, 10), (8, 1, 3, 3), dict(group=8, strides=[2, 2], pads=[1, 1, 1, 1]), True, (1, 8, 5, 5), 8 * 25 * 1 * 9),
    ("dilation2", (1, 4, 12, 12), (6, 4, 3, 3), dict(dilations=[2, 2]), True, (1, 6, 8, 8), 6 * 64 * 4 * 9),
    # pads = [h_begin, w_begin, h_end, w_end]: H = 7+0+2-3+1 = 7, W = 7+1+3-3+1 = 9
    ("asym_pads", (1, 3, 7, 7), (5, 3, 3, 3), dict(pads=[0, 1, 2, 3]), True, (1, 5, 7, 9), 5 * 63 * 3 * 9),
    ("rect_kernel_strides", (1, 2, 9, 11), (3, 2, 1, 5), dict(strides=[1, 3]), False, (1, 3, 9, 3), 3 * 27 * 2 * 5),
    # SAME_UPPER: out = ceil(9 / 2) = 5
    ("same_upper_s2", (1, 3, 9, 9), (4, 3, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2]), True, (1, 4, 5, 5), 4 * 25 * 3 * 9),
    # VALID: out = floor((9 - 3) / 2) + 1 = 4
    ("valid_s2", (1, 3, 9, 9), (4, 3, 3, 3), dict(auto_pad="VALID", strides=[2, 2]), True, (1, 4, 4, 4), 4 * 16 * 3 * 9),
    ("conv1d", (1, 4, 20), (8, 4, 5), dict(), True, (1, 8, 16), 8 * 16 * 4 * 5),
    ("symbolic_batch", ("N", 3, 8, 8), (4, 3, 3, 3), dict(), True, (None, 4, 6, 6), 4 * 36 * 3 * 9),
]


@pytest.mark.parametrize("x,w,attrs,bias,out,macs", [c[1:] for c in CONV_CASES], ids=[c[0] for c in CONV_CASES])
def test_conv_geometry(x, w, attrs, bias, out, macs):
    report = count(_conv_case(x, w, out, bias=bias, **attrs))
    (layer,) = report.layers
    assert layer.op_type == "Conv"
    assert layer.name == "n0"
    assert layer.macs == macs
    assert report.conv_macs == macs and report.fc_macs == 0
    assert tuple(layer.output_shape) == out
    assert layer.params == int(np.prod(w)) + (w[0] if bias else 0)


CONVT_CASES = [
    # MACs = Cin * prod(input spatial) * Cout/g * prod(k)
    ("k4_s2", (1, 8, 5, 5), (8, 3, 4, 4), dict(strides=[2, 2], pads=[1, 1, 1, 1]), (1, 3, 10, 10), 8 * 25 * 3 * 16),
    ("k2_s2", (1, 6, 4, 4), (6, 5, 2, 2), dict(strides=[2, 2]), (1, 5, 8, 8), 6 * 16 * 5 * 4),
    ("group2", (1, 8, 5, 5), (8, 2, 3, 3), dict(group=2), (1, 4, 7, 7), 8 * 25 * 2 * 9),
    ("output_padding", (1, 4, 3, 3), (4, 2, 3, 3), dict(strides=[2, 2], output_padding=[1, 1]), (1, 2, 8, 8), 4 * 9 * 2 * 9),
]


@pytest.mark.parametrize("x,w,attrs,out,macs", [c[1:] for c in CONVT_CASES], ids=[c[0] for c in CONVT_CASES])
def test_conv_transpose_geometry(x, w, attrs, out, macs):
    report = count(_conv_case(x, w, out, op="ConvTranspose", **attrs))
    (layer,) = report.layers
    assert layer.op_type == "ConvTranspose"
    assert layer.macs == macs == report.conv_macs
    assert tuple(layer.output_shape) == out
    assert layer.params == int(np.prod(w)) + w[1] * attrs.get("group", 1)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(trans_b):
    w = (7, 20) if trans_b else (20, 7)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b)
    report = count(_model([node], {"x": ("N", 20)}, {"w": w, "b": (7,)}, ("N", 7)))
    (layer,) = report.layers
    assert layer.macs == 20 * 7 == report.fc_macs
    assert report.conv_macs == 0
    assert layer.params == 147


def test_gemm_without_bias():
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    (layer,) = count(_model([node], {"x": (2, 16)}, {"w": (5, 16)}, (2, 5))).layers
    assert layer.macs == 80 and layer.params == 80


def test_matmul_constant_weight_counts_leading_dims():
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    report = count(_model([node], {"x": ("N", 6, 20)}, {"w": (20, 7)}, ("N", 6, 7)))
    (layer,) = report.layers
    assert layer.macs == 6 * 20 * 7 == report.fc_macs
    assert layer.params == 140


def test_matmul_weight_from_constant_node():
    w = numpy_helper.from_array(np.ones((20, 7), np.float32), "wc")
    nodes = [
        helper.make_node("Constant", [], ["wc"], value=w),
        helper.make_node("MatMul", ["x", "wc"], ["y"], name="mm"),
    ]
    (layer,) = count(_model(nodes, {"x": (1, 20)}, {}, (1, 7))).layers
    assert layer.macs == 140


def test_matmul_between_activations_counts_zero():
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    report = count(_model([node], {"a": (1, 6, 20), "b": (1, 20, 7)}, {}, (1, 6, 7)))
    assert report.layers == ()
    assert report.total_macs == 0


def test_non_compute_ops_are_ignored():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    inits = {"w": (4, 3, 3, 3), "s": (4,), "bb": (4,), "m": (4,), "v": (4,), "fw": (10, 4), "fb": (10,)}
    report = count(_model(nodes, {"x": ("N", 3, 8, 8)}, inits, ("N", 10)))
    assert [l.name for l in report.layers] == ["c0", "fc"]
    assert report.conv_macs == 4 * 64 * 27
    assert report.fc_macs == 40
    assert report.total_params == 108 + 50


def test_input_shapes_resolve_symbolic_spatial_dims():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="n0", pads=[1, 1, 1, 1])
    model = _model([node], {"x": ("N", 3, "H", "W")}, {"w": (4, 3, 3, 3)}, ("N", 4, "H", "W"))
    report = count(model, input_shapes={"x": (1, 3, 10, 12)})
    assert report.total_macs == 4 * 120 * 27


def test_unknown_spatial_dims_raise_shape_error():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="n0")
    model = _model([node], {"x": ("N", 3, "H", "W")}, {"w": (4, 3, 3, 3)}, ("N", 4, "H2", "W2"))
    with pytest.raises(ShapeError, match="input-shape"):
        count(model)
