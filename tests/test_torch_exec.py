"""The torch executor computes what ONNX Runtime computes, and writes weights back exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.errors import FinetuneError  # noqa: E402
from onnxprune.graph import load_model, save_model  # noqa: E402
from onnxprune.torch_exec import OPS, OnnxModule, unsupported_ops  # noqa: E402

RTOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    """Two shared cores: torch's default thread pool oversubscribes them badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)) if b.size else 0.0


def torch_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, times: int = 2) -> list[np.ndarray]:
    """Run the executor ``times`` times (first run fills the shape cache, later runs use it)."""
    mod = OnnxModule(model).eval()
    outs = None
    with torch.no_grad():
        for _ in range(times):
            y = mod(*[torch.from_numpy(feeds[n]) for n in mod.input_names])
            y = y if isinstance(y, tuple) else (y,)
            new = [t.numpy() for t in y]
            if outs is not None:
                for a, b in zip(new, outs):
                    np.testing.assert_array_equal(a, b)
            outs = new
    return outs


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = RTOL) -> None:
    ref = ort_run(model, feeds)
    got = torch_run(model, feeds)
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert r.shape == g.shape, (r.shape, g.shape)
        if np.issubdtype(r.dtype, np.floating):
            assert rel_err(g, r) <= rtol, rel_err(g, r)
        else:
            np.testing.assert_array_equal(g, r)


# --------------------------------------------------------------------------- zoo models, both exporters
def _zoo():
    try:
        from models.export import export_onnx
        from models.zoo import ZOO, randomize_bn
    except Exception:  # pragma: no cover - before models/ exists
        return None
    return ZOO, randomize_bn, export_onnx


ZOO_PARAMS = [
    pytest.param(name, exporter, marks=[pytest.mark.slow] if exporter == "dynamo" else [])
    for name in (sorted(_zoo()[0]) if _zoo() else [])
    for exporter in ("legacy", "dynamo")
]


@pytest.mark.parametrize("name,exporter", ZOO_PARAMS)
def test_zoo_model_matches_onnxruntime(name, exporter, tmp_path):
    ZOO, randomize_bn, export_onnx = _zoo()
    ctor, shape = ZOO[name]
    width, shape = (0.25, (1, 3, 64, 64)) if name == "resnet50" else (1.0, shape)
    torch.manual_seed(0)
    net = randomize_bn(ctor(width=width), seed=1).eval()
    path = export_onnx(net, tmp_path / f"{name}.onnx", input_shape=(2, *shape[1:]), exporter=exporter)
    model = load_model(path)
    rng = np.random.default_rng(0)
    for batch in (3, 1):  # a batch the exporter never saw, then another (new cache entry)
        x = rng.standard_normal((batch, *shape[1:])).astype(np.float32)
        assert_matches_ort(model, {model.graph.input[0].name: x})
    # ... and it is the torch model itself
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert rel_err(torch_run(model, {model.graph.input[0].name: x}, times=1)[0], want) <= RTOL


# --------------------------------------------------------------------------- hand-built graphs
def build(nodes, inputs: dict[str, tuple], inits: dict[str, np.ndarray] | None = None, *, opset: int = 17,
          outputs=("y",), in_type=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, in_type, list(s)) for n, s in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type for vi in [*inferred.graph.value_info, *inferred.graph.output] if vi.HasField("type")}
    for o in model.graph.output:
        if o.name in types and types[o.name].tensor_type.elem_type:
            o.type.CopyFrom(types[o.name])
        else:
            o.type.tensor_type.elem_type = TensorProto.FLOAT
    return model


def feeds_for(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def i64(*v):
    return np.array(v, dtype=np.int64)


def f32(*v):
    return np.array(v, dtype=np.float32)


N = helper.make_node
X4 = {"x": (2, 3, 7, 9)}
W = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)

CASES = {
    # padding
    "pad_constant": ([N("Pad", ["x", "p", "v"], ["y"], mode="constant")], X4, {"p": i64(0, 0, 1, 2, 0, 0, 3, 0), "v": f32(0.5)}, 17),
    "pad_reflect": ([N("Pad", ["x", "p"], ["y"], mode="reflect")], X4, {"p": i64(0, 0, 2, 1, 0, 0, 1, 3)}, 17),
    "pad_edge": ([N("Pad", ["x", "p"], ["y"], mode="edge")], X4, {"p": i64(0, 0, 2, 1, 0, 0, 1, 3)}, 17),
    "pad_axes18": ([N("Pad", ["x", "p", "", "a"], ["y"], mode="reflect")], X4, {"p": i64(1, 2, 1, 0), "a": i64(-1, 2)}, 18),
    "pad_crop": ([N("Pad", ["x", "p"], ["y"])], X4, {"p": i64(0, 0, -1, 1, 0, 0, 2, -2)}, 17),
    "pad_attr_v2": ([N("Pad", ["x"], ["y"], mode="edge", pads=[0, 0, 1, 1, 0, 0, 1, 1])], X4, {}, 10),
    # resize
    "resize_nearest_asym_floor": ([N("Resize", ["x", "", "s"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")], X4, {"s": f32(1, 1, 2, 2)}, 17),
    "resize_nearest_halfpixel": ([N("Resize", ["x", "", "s"], ["y"], mode="nearest")], X4, {"s": f32(1, 1, 1.5, 0.5)}, 17),
    "resize_nearest_ceil_sizes": ([N("Resize", ["x", "", "", "z"], ["y"], mode="nearest", nearest_mode="round_prefer_ceil")], X4, {"z": i64(2, 3, 11, 4)}, 17),
    "resize_nearest_tfnn": ([N("Resize", ["x", "", "s"], ["y"], mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn")], X4, {"s": f32(1, 1, 3, 2)}, 17),
    "resize_nearest_align": ([N("Resize", ["x", "", "", "z"], ["y"], mode="nearest", coordinate_transformation_mode="align_corners", nearest_mode="floor")], X4, {"z": i64(2, 3, 13, 5)}, 17),
    "resize_linear_align": ([N("Resize", ["x", "", "", "z"], ["y"], mode="linear", coordinate_transformation_mode="align_corners")], X4, {"z": i64(2, 3, 14, 17)}, 17),
    "resize_linear_halfpixel": ([N("Resize", ["x", "", "s"], ["y"], mode="linear")], X4, {"s": f32(1, 1, 2, 2)}, 17),
    "resize_linear_pytorch_hp_down": ([N("Resize", ["x", "", "", "z"], ["y"], mode="linear", coordinate_transformation_mode="pytorch_half_pixel")], X4, {"z": i64(2, 3, 4, 5)}, 17),
    "resize_linear_asym": ([N("Resize", ["x", "", "s"], ["y"], mode="linear", coordinate_transformation_mode="asymmetric")], X4, {"s": f32(1, 1, 2, 3)}, 17),
    "resize_axes18": ([N("Resize", ["x", "", "s"], ["y"], mode="nearest", axes=[3, 2], coordinate_transformation_mode="asymmetric", nearest_mode="floor")], X4, {"s": f32(2, 4)}, 18),
    "upsample_v9": ([N("Upsample", ["x", "s"], ["y"], mode="nearest")], X4, {"s": f32(1, 1, 2, 3)}, 9),
    "upsample_linear_v9": ([N("Upsample", ["x", "s"], ["y"], mode="linear")], X4, {"s": f32(1, 1, 2, 2)}, 9),
    # split / reduce / gemm
    "split_input": ([N("Split", ["x", "s"], ["a", "b", "c"], axis=3), N("Concat", ["c", "a", "b"], ["y"], axis=3)], X4, {"s": i64(2, 3, 4)}, 13),
    "split_attr": ([N("Split", ["x"], ["a", "b"], axis=3, split=[4, 5]), N("Pad", ["a", "p"], ["a2"]), N("Sub", ["b", "a2"], ["y"])], X4, {"p": i64(0, 0, 0, 0, 0, 0, 0, 1)}, 12),
    "split_num_outputs18": ([N("Split", ["x"], ["a", "b"], axis=2, num_outputs=2), N("Concat", ["b", "a"], ["y"], axis=2)], X4, {}, 18),
    "split_equal_v13": ([N("Split", ["x"], ["a", "b", "c"], axis=1), N("Mul", ["a", "c"], ["y"])], X4, {}, 13),
    "reducemean18": ([N("ReduceMean", ["x", "a"], ["y"], keepdims=0)], X4, {"a": i64(2, -1)}, 18),
    "reducemean_attr": ([N("ReduceMean", ["x"], ["y"], axes=[1])], X4, {}, 17),
    "reducesum13": ([N("ReduceSum", ["x", "a"], ["y"], keepdims=1)], X4, {"a": i64(1, 3)}, 13),
    "reducemax_all18": ([N("ReduceMax", ["x"], ["y"], keepdims=0)], X4, {}, 18),
    "reducel2_prod": ([N("ReduceL2", ["x"], ["a"], axes=[2]), N("ReduceProd", ["x"], ["b"], axes=[1, 3], keepdims=0), N("Add", ["a", "b"], ["y"])], {"x": (2, 3, 1, 4)}, {}, 17),
    "gemm_transA_alpha_beta": ([N("Gemm", ["x", "w", "c"], ["y"], transA=1, alpha=0.5, beta=2.0)], {"x": (5, 2)}, {"w": np.ones((5, 3), np.float32) * f32(1, 2, 3), "c": f32(1, -1, 0.5)}, 17),
    "gemm_transB_bias2d": ([N("Gemm", ["x", "w", "c"], ["y"], transB=1, beta=0.5)], {"x": (2, 5)}, {"w": np.arange(15, dtype=np.float32).reshape(3, 5) / 7, "c": np.ones((2, 3), np.float32)}, 17),
    "gemm_plain": ([N("Gemm", ["x", "w"], ["y"])], {"x": (2, 5)}, {"w": np.arange(15, dtype=np.float32).reshape(5, 3) / 7}, 17),
    "matmul": ([N("MatMul", ["x", "w"], ["y"])], X4, {"w": np.arange(18, dtype=np.float32).reshape(9, 2) / 9}, 17),
    # conv family
    "conv_asym_pads_groups_dil": ([N("Conv", ["x", "w"], ["y"], pads=[0, 2, 1, 1], strides=[2, 1], dilations=[1, 2], group=1)], X4, {"w": W}, 17),
    "conv_same_upper": ([N("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])], X4, {"w": W, "b": f32(1, 2, 3, 4)}, 17),
    "conv_same_lower": ([N("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2, 3])], X4, {"w": W}, 17),
    "conv_valid_grouped": ([N("Conv", ["x", "w"], ["y"], auto_pad="VALID", group=3)], X4, {"w": W[:3, :1]}, 17),
    "conv1d": ([N("Conv", ["x", "w", "b"], ["y"], pads=[1, 2], kernel_shape=[3])], {"x": (2, 3, 10)}, {"w": W[:, :, 0], "b": f32(1, 2, 3, 4)}, 17),
    "convtranspose_outpad": ([N("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0])], X4, {"w": W.transpose(1, 0, 2, 3).copy(), "b": f32(1, 2, 3, 4)}, 17),
    "convtranspose_asym_groups": ([N("ConvTranspose", ["x", "w"], ["y"], strides=[2, 1], pads=[0, 1, 2, 0], group=3)], X4, {"w": W[:3].reshape(3, 4, 3, 3) if False else np.random.default_rng(2).standard_normal((3, 2, 3, 3)).astype(np.float32)}, 17),
    "convtranspose_output_shape": ([N("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], output_shape=[15, 18])], X4, {"w": W.transpose(1, 0, 2, 3).copy()}, 17),
    "convtranspose_same_upper": ([N("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER")], X4, {"w": W.transpose(1, 0, 2, 3).copy()}, 17),
    "batchnorm_eval": ([N("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)], X4, {"s": f32(1, 2, 3), "b": f32(0, 1, -1), "m": f32(0.5, 0, -0.5), "v": f32(1, 2, 0.5)}, 15),
    "instancenorm": ([N("InstanceNormalization", ["x", "s", "b"], ["y"])], X4, {"s": f32(1, 2, 3), "b": f32(0, 1, -1)}, 17),
    "layernorm": ([N("LayerNormalization", ["x", "s", "b"], ["y"], axis=-2)], X4, {"s": np.ones((7, 9), np.float32) * 2, "b": np.zeros((7, 9), np.float32)}, 17),
    # pooling
    "maxpool_ceil_asym": ([N("MaxPool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1)], X4, {}, 17),
    "maxpool_dil": ([N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 1], pads=[1, 1, 1, 1])], X4, {}, 17),
    "maxpool_same": ([N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")], X4, {}, 17),
    "avgpool_include_pad": ([N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)], X4, {}, 17),
    "avgpool_exclude_pad_asym": ([N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 2, 1])], X4, {}, 17),
    "avgpool_ceil": ([N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)], X4, {}, 17),
    "avgpool_include_pad_asym": ([N("AveragePool", ["x"], ["y"], kernel_shape=[2, 3], pads=[1, 0, 0, 2], count_include_pad=1)], X4, {}, 17),
    "lppool": ([N("LpPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], p=3)], X4, {}, 17),
    "global_pools": ([N("GlobalMaxPool", ["x"], ["a"]), N("GlobalAveragePool", ["x"], ["b"]), N("Sub", ["a", "b"], ["y"])], X4, {}, 17),
    # activations and arithmetic
    "activations": ([
        N("LeakyRelu", ["x"], ["a1"], alpha=0.2), N("Sigmoid", ["a1"], ["a2"]), N("HardSigmoid", ["x"], ["a3"], alpha=0.3, beta=0.4),
        N("HardSwish", ["x"], ["a4"]), N("Tanh", ["a4"], ["a5"]), N("Elu", ["x"], ["a6"], alpha=0.7), N("Selu", ["x"], ["a7"]),
        N("Softplus", ["x"], ["a8"]), N("Mish", ["x"], ["a9"]), N("Erf", ["x"], ["a10"]), N("Relu", ["x"], ["a11"]),
        N("PRelu", ["x", "slope"], ["a12"]), N("Sum", ["a1", "a2", "a3", "a4", "a5", "a6"], ["s1"]),
        N("Sum", ["a7", "a8", "a9", "a10", "a11", "a12"], ["s2"]), N("Mul", ["s1", "s2"], ["y"])],
        X4, {"slope": f32(0.1, 0.2, 0.3).reshape(3, 1, 1)}, 18),
    "gelu20": ([N("Gelu", ["x"], ["a"]), N("Gelu", ["x"], ["b"], approximate="tanh"), N("Add", ["a", "b"], ["y"])], X4, {}, 20),
    "arith": ([
        N("Abs", ["x"], ["ab"]), N("Sqrt", ["ab"], ["sq"]), N("Neg", ["sq"], ["ng"]), N("Exp", ["ng"], ["ex"]),
        N("Add", ["ab", "one"], ["ab1"]), N("Log", ["ab1"], ["lg"]), N("Reciprocal", ["ab1"], ["rc"]),
        N("Pow", ["ab1", "half"], ["pw"]), N("Div", ["lg", "pw"], ["dv"]), N("Max", ["dv", "ex", "rc"], ["mx"]),
        N("Min", ["mx", "x"], ["mn"]), N("Sub", ["mn", "ex"], ["y"])],
        X4, {"one": f32(1.0), "half": np.float32(1.5)}, 17),
    "clip_inputs": ([N("Clip", ["x", "lo", "hi"], ["y"])], X4, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}, 13),
    "clip_min_only": ([N("Clip", ["x", "lo"], ["y"])], X4, {"lo": np.float32(-0.5)}, 13),
    "clip_attrs_v6": ([N("Clip", ["x"], ["y"], min=-0.2, max=0.3)], X4, {}, 6),
    "softmax13": ([N("Softmax", ["x"], ["a"], axis=1), N("LogSoftmax", ["x"], ["b"]), N("Add", ["a", "b"], ["y"])], X4, {}, 13),
    "softmax_v11_coerce": ([N("Softmax", ["x"], ["a"], axis=2), N("LogSoftmax", ["x"], ["b"]), N("Add", ["a", "b"], ["y"])], X4, {}, 11),
    "dropout_identity_cast": ([N("Dropout", ["x", "r"], ["d"]), N("Identity", ["d"], ["i"]), N("Cast", ["i"], ["c"], to=TensorProto.DOUBLE), N("Cast", ["c"], ["y"], to=TensorProto.FLOAT)], X4, {"r": np.float32(0.3)}, 13),
    # shapes
    "flatten_axis2": ([N("Flatten", ["x"], ["y"], axis=2)], X4, {}, 17),
    "flatten_axis0": ([N("Flatten", ["x"], ["y"], axis=0)], X4, {}, 17),
    "reshape_zero_neg": ([N("Reshape", ["x", "s"], ["y"])], X4, {"s": i64(0, -1, 9)}, 17),
    "reshape_allowzero": ([N("Reshape", ["x", "s"], ["y"], allowzero=1)], X4, {"s": i64(2, 3, 63)}, 17),
    "transpose": ([N("Transpose", ["x"], ["a"], perm=[0, 2, 3, 1]), N("Transpose", ["a"], ["y"])], X4, {}, 17),
    "squeeze_unsqueeze_attr": ([N("Unsqueeze", ["x"], ["a"], axes=[0, -1]), N("Squeeze", ["a"], ["y"], axes=[0])], X4, {}, 11),
    "squeeze_unsqueeze_input": ([N("Unsqueeze", ["x", "ax"], ["a"]), N("Squeeze", ["a", "sx"], ["b"]), N("Squeeze", ["b"], ["y"])], {"x": (2, 1, 7, 9)}, {"ax": i64(1, 5), "sx": i64(1)}, 13),
    "slice_steps": ([N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], X4, {"st": i64(-1, 1), "en": i64(-100, 100), "ax": i64(3, 2), "sp": i64(-2, 2)}, 13),
    "slice_v1_attrs": ([N("Slice", ["x"], ["y"], starts=[1, 0], ends=[3, -1], axes=[1, 3])], X4, {}, 9),
    "gather": ([N("Gather", ["x", "i"], ["a"], axis=1), N("Gather", ["x", "j"], ["b"], axis=1), N("ReduceSum", ["a"], ["r"], axes=[1], keepdims=0), N("Add", ["r", "b"], ["y"])], X4, {"i": i64(2, -1), "j": np.int64(-1)}, 11),
    "shape_subgraph": ([
        N("Shape", ["x"], ["s"]), N("Gather", ["s", "zero"], ["n"], axis=0), N("Unsqueeze", ["n", "ax0"], ["n1"]),
        N("Concat", ["n1", "m1"], ["shp"], axis=0), N("Reshape", ["x", "shp"], ["y"])],
        X4, {"zero": np.int64(0), "ax0": i64(0), "m1": i64(-1)}, 13),
    "shape_start_end": ([N("Shape", ["x"], ["s"], start=2), N("Cast", ["s"], ["y"], to=TensorProto.FLOAT)], X4, {}, 15),
    "constant_nodes": ([
        N("Constant", [], ["c"], value=numpy_helper.from_array(f32(1, 2, 3).reshape(3, 1, 1))), N("Constant", [], ["k"], value_float=2.0),
        N("Mul", ["x", "c"], ["a"]), N("Div", ["a", "k"], ["y"])], X4, {}, 13),
    "constant_of_shape_expand_tile": ([
        N("Shape", ["x"], ["s"]), N("ConstantOfShape", ["s"], ["z"], value=numpy_helper.from_array(f32(0.5))),
        N("Expand", ["b", "s"], ["e"]), N("Tile", ["x", "rep"], ["t"]), N("Slice", ["t", "st", "en", "ax"], ["t2"]),
        N("Add", ["z", "e"], ["ze"]), N("Add", ["ze", "t2"], ["y"])],
        X4, {"b": f32(1, 2, 3).reshape(3, 1, 1), "rep": i64(1, 1, 2, 1), "st": i64(0), "en": i64(7), "ax": i64(2)}, 13),
    "equal_where_range": ([
        N("Shape", ["x"], ["s"]), N("Gather", ["s", "three"], ["w"]), N("Range", ["zero", "w", "one"], ["r"]),
        N("Cast", ["r"], ["rf"], to=TensorProto.FLOAT), N("Equal", ["r", "two"], ["eq"]),
        N("Where", ["eq", "x", "rf"], ["y"])], X4, {"three": np.int64(3), "zero": np.int64(0), "one": np.int64(1), "two": np.int64(2)}, 13),
    "depth_to_space": ([N("DepthToSpace", ["x"], ["a"], blocksize=2), N("SpaceToDepth", ["a"], ["b"], blocksize=2), N("DepthToSpace", ["b"], ["y"], blocksize=2, mode="CRD")], {"x": (2, 8, 3, 5)}, {}, 13),
    "groupnorm21_size": ([N("GroupNormalization", ["x", "s", "b"], ["g"], num_groups=2, epsilon=1e-3), N("Size", ["x"], ["n"]),
                          N("Cast", ["n"], ["nf"], to=TensorProto.FLOAT), N("Div", ["g", "nf"], ["y"])],
                         {"x": (2, 4, 3, 5)}, {"s": f32(1, 2, 3, 4), "b": f32(0, 1, 0, -1)}, 21),
    "reducemin_l1_sumsquare": ([N("ReduceMin", ["x", "a"], ["p"]), N("ReduceL1", ["x", "a"], ["q"]), N("ReduceSumSquare", ["x", "a"], ["r"]),
                                N("Sum", ["p", "q", "r"], ["y"])], X4, {"a": i64(1)}, 18),
    "argmax_compare": ([N("ArgMax", ["x"], ["a"], axis=1, keepdims=0), N("Cast", ["a"], ["y"], to=TensorProto.FLOAT)], X4, {}, 13),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_built_graph_matches_onnxruntime(case):
    nodes, inputs, inits, opset = CASES[case]
    model = build(nodes, inputs, inits, opset=opset)
    assert_matches_ort(model, feeds_for(model))


def test_every_registered_op_is_exercised():
    used = {n.op_type for nodes, *_ in CASES.values() for n in nodes}
    # covered by the zoo exports or trivially aliasing a covered op
    aliases = {"Celu", "Softsign", "Floor", "Ceil", "Round", "Sign", "Not", "And", "Or", "Xor", "Less", "Greater",
               "LessOrEqual", "GreaterOrEqual", "Sin", "Cos", "Mean", "CastLike",
               "ArgMin", "Resize"}
    assert set(OPS) - used - aliases == set()


# --------------------------------------------------------------------------- parameters, buffers, errors
def _conv_bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3,
        "conv.bias": rng.standard_normal(4).astype(np.float32) * 0.1,
        "bn.weight": f32(1, 1.5, 0.5, 2), "bn.bias": f32(0, 0.1, -0.1, 0.2),
        "bn.running_mean": f32(0.1, 0, -0.2, 0.3), "bn.running_var": f32(1, 2, 0.5, 1.5),
        "fc.weight": rng.standard_normal((5, 4)).astype(np.float32) * 0.5, "fc.bias": np.zeros(5, np.float32),
        "six": np.float32(6.0), "flat": i64(0, -1),
    }
    nodes = [
        N("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        N("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"], ["b"], name="bn"),
        N("Relu", ["b"], ["r"], name="relu"), N("Div", ["r", "six"], ["d"], name="div"),
        N("GlobalAveragePool", ["d"], ["g"], name="gap"), N("Reshape", ["g", "flat"], ["f"], name="flat"),
        N("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1, name="fc"),
    ]
    model = build(nodes, {"x": (4, 3, 8, 8)}, inits, opset=15)
    model.producer_name = "test"
    helper.set_model_props(model, {"author": "me"})
    return model


def test_parameters_are_float_initializers_and_buffers_the_rest():
    mod = OnnxModule(_conv_bn_model())
    assert set(mod.parameter_names) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"}
    assert set(mod.weight_names) == {"conv.weight", "fc.weight"}
    assert len(list(mod.parameters())) == 6
    buffers = {n for n, _ in mod.named_onnx_tensors()} - set(mod.parameter_names)
    assert buffers == {"bn.running_mean", "bn.running_var", "six", "flat"}
    assert all("." not in k for k, _ in mod.named_parameters())
    assert isinstance(getattr(mod, mod.key_of("conv.weight")), torch.nn.Parameter)


def test_batchnorm_train_mode_matches_torch_and_updates_running_stats():
    model = _conv_bn_model()
    mod = OnnxModule(model).train()
    ref = torch.nn.BatchNorm2d(4, momentum=0.1, eps=1e-5).train()
    tensors = dict(mod.named_onnx_tensors())
    with torch.no_grad():
        ref.weight.copy_(tensors["bn.weight"]), ref.bias.copy_(tensors["bn.bias"])
        ref.running_mean.copy_(tensors["bn.running_mean"]), ref.running_var.copy_(tensors["bn.running_var"])
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        mod(x)
        conv = torch.nn.functional.conv2d(x, tensors["conv.weight"], tensors["conv.bias"], padding=1)
        ref(conv)
    torch.testing.assert_close(tensors["bn.running_mean"], ref.running_mean)
    torch.testing.assert_close(tensors["bn.running_var"], ref.running_var)
    frozen = OnnxModule(model, train_bn=False).train()
    before = dict(frozen.named_onnx_tensors())["bn.running_mean"].clone()
    with torch.no_grad():
        frozen(x)
    torch.testing.assert_close(dict(frozen.named_onnx_tensors())["bn.running_mean"], before)


def test_write_back_after_one_sgd_step(tmp_path):
    model = _conv_bn_model()
    original = model.SerializeToString()
    mod = OnnxModule(model).train()
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    x = torch.randn(4, 3, 8, 8)
    loss = mod(x).square().mean()
    loss.backward()
    opt.step()
    mod.eval()
    path = save_model(mod.state_to_onnx(model), tmp_path / "tuned.onnx")
    assert model.SerializeToString() == original  # the input is never modified
    tuned = load_model(path)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
    tensors = dict(mod.named_onnx_tensors())
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    stats = {"bn.running_mean", "bn.running_var"}
    # conv.bias before a train-mode BN gets a zero gradient: it may stay as it was
    assert set(mod.parameter_names) - {"conv.bias"} | stats <= changed <= set(mod.parameter_names) | stats
    for name in before:
        assert after[name].dtype == before[name].dtype and after[name].shape == before[name].shape
        np.testing.assert_array_equal(after[name], tensors[name].detach().numpy())
    for a, b in zip(model.graph.initializer, tuned.graph.initializer):
        assert a.name == b.name
        if a.name not in changed:
            assert a.SerializeToString() == b.SerializeToString()
    assert [n.SerializeToString() for n in tuned.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert tuned.opset_import == model.opset_import and tuned.metadata_props == model.metadata_props
    assert tuned.graph.input == model.graph.input and tuned.graph.output == model.graph.output
    with torch.no_grad():
        want = mod(x).numpy()
    assert rel_err(ort_run(tuned, {"x": x.numpy()})[0], want) <= RTOL


def test_exported_model_write_back_round_trip(tmp_path):
    """Legacy export (Shape->Gather->Concat->Reshape, Constant nodes): train, write back, reload."""
    class ViewFlatten(torch.nn.Module):
        def forward(self, x):
            return x.view(x.size(0), -1)

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU6(),
        torch.nn.Conv2d(6, 4, 3, stride=2), ViewFlatten(), torch.nn.Linear(4 * 3 * 3, 5),
    ).eval()
    export_onnx = pytest.importorskip("models.export").export_onnx
    model = load_model(export_onnx(net, tmp_path / "net.onnx", input_shape=(2, 3, 8, 8), input_name="x"))
    assert {"Shape", "Gather", "Concat", "Reshape"} <= {n.op_type for n in model.graph.node}
    mod = OnnxModule(model)
    assert len(mod._fast_steps) < len(mod._full_steps)  # the shape subgraph is skipped once cached
    opt = torch.optim.SGD(mod.parameters(), lr=0.05, momentum=0.9)
    for batch in (4, 4, 6):
        loss = mod.train()(torch.randn(batch, 3, 8, 8)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned = load_model(save_model(mod.eval().state_to_onnx(model), tmp_path / "t.onnx"))
    x = np.random.default_rng(3).standard_normal((5, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = mod(torch.from_numpy(x)).numpy()
    assert rel_err(ort_run(tuned, {"x": x})[0], want) <= RTOL
    assert rel_err(ort_run(model, {"x": x})[0], want) > 1e-3  # it did train


def test_shape_subgraph_is_computed_once_per_input_shape():
    nodes, inputs, inits, opset = CASES["shape_subgraph"]
    mod = OnnxModule(build(nodes, inputs, inits, opset=opset))
    assert [f for f, *_ in mod._fast_steps] == [mod._full_steps[-1][0]]  # only Reshape runs once cached
    for n in (2, 3, 2):
        y = mod(torch.randn(n, 3, 7, 9))
        assert y.shape == (n, 189)
    assert len(mod._cache) == 2


def test_unsupported_ops_are_all_listed():
    nodes = [
        N("TopK", ["x", "k"], ["v", "i"], axis=3), N("NonZero", ["x"], ["nz"]),
        N("Cast", ["nz"], ["nzf"], to=TensorProto.FLOAT), N("ReduceSum", ["nzf"], ["s"], keepdims=0),
        N("Resize", ["v", "", "sc"], ["r"], mode="cubic"), N("Mul", ["r", "s"], ["y"]),
        N("Einsum", ["x"], ["unused"], equation="ij->ji"),  # dead node: not reported
    ]
    model = build(nodes, X4, {"k": i64(2), "sc": f32(1, 1, 2, 2)})
    with pytest.raises(FinetuneError) as err:
        OnnxModule(model)
    msg = str(err.value)
    assert "NonZero" in msg and "TopK" in msg and "Einsum" not in msg
    assert "\n" not in msg
    assert unsupported_ops(model) == ["Einsum", "NonZero", "TopK"]  # a pre-check for the CLI (dead nodes too)


def test_node_level_unsupported_reason_names_the_node():
    model = build([N("Resize", ["x", "", "sc"], ["y"], mode="cubic", name="up1")], X4, {"sc": f32(1, 1, 2, 2)})
    with pytest.raises(FinetuneError, match="up1.*cubic"):
        OnnxModule(model)


def test_gradients_reach_every_parameter():
    mod = OnnxModule(_conv_bn_model()).train()
    mod(torch.randn(4, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mod.parameters())


# --------------------------------------------------------------------------- property-based: window ops
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def window_graphs(draw):
    op_type = draw(st.sampled_from(["Conv", "ConvTranspose", "MaxPool", "AveragePool"]))
    h, w = draw(st.integers(3, 9)), draw(st.integers(3, 9))
    k = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    s = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    d = [draw(st.integers(1, 2)), draw(st.integers(1, 2))] if op_type != "AveragePool" else [1, 1]
    pads = [draw(st.integers(0, k[i % 2] - 1)) for i in range(4)]
    attrs = {"kernel_shape": k, "strides": s, "pads": pads}
    if any(x > 1 for x in d):
        attrs["dilations"] = d
    for i in range(2):  # every output needs at least one window
        if (h, w)[i] + pads[i] + pads[i + 2] < (k[i] - 1) * d[i] + 1:
            pads[i + 2] += (k[i] - 1) * d[i] + 1 - ((h, w)[i] + pads[i] + pads[i + 2])
    if op_type in ("MaxPool", "AveragePool"):
        attrs["ceil_mode"] = draw(st.integers(0, 1))
    if op_type == "AveragePool":
        attrs["count_include_pad"] = draw(st.integers(0, 1))
    inits, cin = {}, draw(st.sampled_from([2, 4]))
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    if op_type in ("Conv", "ConvTranspose"):
        groups = draw(st.sampled_from([1, 2]))
        cout = 2 * draw(st.integers(1, 2))
        attrs["group"] = groups
        wshape = (cout, cin // groups, *k) if op_type == "Conv" else (cin, cout // groups, *k)
        inits = {"w": rng.standard_normal(wshape).astype(np.float32), "b": rng.standard_normal(cout).astype(np.float32)}
        if op_type == "ConvTranspose":
            attrs["output_padding"] = [draw(st.integers(0, s[i] - 1)) for i in range(2)]  # ORT: < stride
    ins = ["x", "w", "b"] if inits else ["x"]
    return build([N(op_type, ins, ["y"], **attrs)], {"x": (2, cin, h, w)}, inits)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window_graphs())
def test_random_window_ops_match_onnxruntime(model):
    assert_matches_ort(model, feeds_for(model))
