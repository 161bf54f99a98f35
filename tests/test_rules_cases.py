"""Hand-built graphs, one per op rule, checked against the pruning contract.

For every case and several random masks (:func:`tests.oracle.random_mask`):

* the pruned model run in ONNX Runtime equals :func:`tests.oracle.masked_model`
  (the original with removed input channels zeroed at every consumer), rel err <= 1e-4;
* it passes ``onnx.checker.check_model(full_check=True)``;
* ``cg.macs(mask) == flops.count(pruned).total_macs``;
* the input model is byte-for-byte unchanged.

Structural asserts (weight shapes, depthwise ``group``, Split sizes, ...) follow
each case. Negative cases check that the group is blocked with a reason in
plain words and that applying a random mask leaves its weights alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.flops import count
from onnxprune.groups import find_groups
from onnxprune.rewrite import apply_mask
from tests.oracle import masked_model, random_mask, rel_err, run


# --------------------------------------------------------------------------- builder
class Net:
    """Tiny ``onnx.helper`` graph builder with seeded random weights.

    ``n = Net([1, 3, 8, 8]); y = n.conv(n.x, 3, 8); m = n.model(y)``.
    """

    def __init__(self, in_shape, *, opset: int = 13, seed: int = 0, in_name: str = "x"):
        self.in_shape = list(in_shape)
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.x = in_name
        self._k = 0

    def _name(self, base: str) -> str:
        self._k += 1
        return f"{base}{self._k}"

    def init(self, name: str, arr) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def rand(self, name: str, shape, scale: float | None = None) -> str:
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / np.sqrt(max(fan, 1))
        return self.init(name, (self.rng.standard_normal(shape) * s).astype(np.float32))

    def ints(self, name: str, vals) -> str:
        return self.init(name, np.asarray(vals, dtype=np.int64))

    def op(self, op_type: str, inputs, *, name: str | None = None, n_out: int = 1, outputs=None, domain: str = "", **attrs):
        name = name or self._name(op_type.lower())
        outs = outputs or ([f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)])
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 and outputs is None else outs

    def conv(self, x: str, cin: int, cout: int, *, k: int = 3, group: int = 1, name: str | None = None, bias: bool = True, stride: int = 1):
        name = name or self._name("conv")
        w = self.rand(f"{name}.w", [cout, cin // group, k, k])
        ins = [x, w]
        if bias:
            ins.append(self.rand(f"{name}.b", [cout], 0.1))
        return self.op("Conv", ins, name=name, kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride, stride])

    def bn(self, x: str, c: int, *, name: str | None = None):
        name = name or self._name("bn")
        r = self.rng
        ins = [
            x,
            self.init(f"{name}.scale", r.uniform(0.5, 1.5, c).astype(np.float32)),
            self.init(f"{name}.bias", r.normal(0, 0.3, c).astype(np.float32)),
            self.init(f"{name}.mean", r.normal(0, 0.5, c).astype(np.float32)),
            self.init(f"{name}.var", r.uniform(0.3, 2.0, c).astype(np.float32)),
        ]
        return self.op("BatchNormalization", ins, name=name, epsilon=1e-5)

    def relu(self, x: str):
        return self.op("Relu", [x])

    def gemm(self, x: str, k: int, m: int, *, name: str | None = None, trans_b: int = 1):
        name = name or self._name("fc")
        w = self.rand(f"{name}.w", [m, k] if trans_b else [k, m])
        b = self.rand(f"{name}.b", [m], 0.1)
        return self.op("Gemm", [x, w, b], name=name, transB=trans_b)

    def model(self, *outputs: str, extra_outputs=(), in_shape=None) -> onnx.ModelProto:
        shape = in_shape or self.in_shape
        graph = helper.make_graph(
            self.nodes,
            "case",
            [helper.make_tensor_value_info(self.x, TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
            + [helper.make_tensor_value_info(o, t, None) for o, t in extra_outputs],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=8)
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
        del m.graph.output[:]
        m.graph.output.extend(inferred.graph.output)  # full_check wants output shapes
        if any(not o.type.tensor_type.HasField("shape") for o in m.graph.output):  # measure what inference missed
            x = np.zeros([d if isinstance(d, int) else 1 for d in shape], dtype=np.float32)
            for o, v in zip(m.graph.output, run(m, x)):
                if not o.type.tensor_type.HasField("shape"):
                    o.CopyFrom(helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, list(v.shape)))
        onnx.checker.check_model(m, full_check=True)
        return m


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(name)


def node_attr(model: onnx.ModelProto, name: str, key: str):
    for a in node(model, name).attribute:
        if a.name == key:
            return helper.get_attribute_value(a)
    return None


def input_value(model: onnx.ModelProto, node_name: str, slot: int) -> np.ndarray:
    return weight(model, node(model, node_name).input[slot])


def group_of(cg, producer: str):
    hits = [g for g in cg.groups if producer in g.producers]
    assert len(hits) == 1, f"{producer} is a producer of {len(hits)} groups: {[g.id for g in cg.groups]}"
    return hits[0]


def kept_count(mask, g) -> int:
    return int(mask[list(g.units)].sum())


def kept_channel_ids(mask, g) -> list[int]:
    return [cid for u, cid in zip(g.units, g.channel_ids) if mask[u]]


def kept_positions(cg, mask, tensor: str) -> np.ndarray:
    """Original positions along ``tensor``'s channel axis that ``mask`` keeps."""
    _, atoms = cg.tensor_maps[tensor]
    return np.nonzero(cg.atom_kept(mask)(atoms))[0]


def keep_one_of(cg, mask, tensor: str, lo: int, hi: int) -> None:
    """Keep at least one of positions ``lo..hi-1`` of ``tensor`` (a Split part, a Slice range)."""
    _, atoms = cg.tensor_maps[tensor]
    if not cg.atom_kept(mask)(atoms[lo:hi]).any():
        mask[cg.unit_of_atom[atoms[lo]]] = True


def check_contract(
    model, *, n_masks: int = 4, seed: int = 0, exclude=(), batch: int = 2, prunable: tuple[str, ...] = (), fix_mask=None
):
    """Run the contract for ``n_masks`` random masks; return ``(cg, [(mask, pruned), ...])``.

    ``prunable`` names producers whose group must be prunable (and is actually
    cut by every mask); ``fix_mask(cg, mask)`` may adjust each mask in place
    (e.g. keep one channel of every Split part, see ``test_split_part_emptied``).
    """
    before = model.SerializeToString()
    cg = find_groups(model, exclude=exclude)
    assert model.SerializeToString() == before, "find_groups mutated its input"
    for p in prunable:
        g = group_of(cg, p)
        assert g.prunable, f"group of {p} is blocked: {g.blocked_reason}"
    rng = np.random.default_rng(seed)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else batch for d in dims]
    x = rng.standard_normal(shape).astype(np.float32)
    results = []
    for _ in range(n_masks):
        mask = random_mask(cg, rng, max_ratio=0.9)
        for p in prunable:  # make sure each named group is really cut
            g = group_of(cg, p)
            if kept_count(mask, g) == g.channels:
                mask[g.units[int(rng.integers(g.channels))]] = False
        if fix_mask is not None:
            fix_mask(cg, mask)
        pruned = apply_mask(cg, mask)
        onnx.checker.check_model(pruned, full_check=True)
        want = run(masked_model(cg, mask), x)
        got = run(pruned, x)
        assert len(want) == len(got)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            assert rel_err(a, b) <= 1e-4, rel_err(a, b)
        assert cg.macs(mask) == count(pruned).total_macs
        if prunable:
            assert cg.macs(mask) < cg.total_macs
        assert model.SerializeToString() == before, "apply_mask mutated its input"
        results.append((mask, pruned))
    # the full mask changes nothing: same outputs, bit for bit (without the re-inferred
    # value_info, which lets ORT pick other kernels)
    full = apply_mask(cg, cg.full_mask())
    del full.graph.value_info[:]
    for a, b in zip(run(full, x), run(model, x)):
        np.testing.assert_array_equal(a, b)
    assert model.SerializeToString() == before
    return cg, results


# --------------------------------------------------------------------------- producers and pass-through
def test_conv_bn_relu_chain_slices_bn():
    n = Net([1, 3, 8, 8])
    y = n.conv(n.x, 3, 8, name="c1", bias=False)
    y = n.relu(n.bn(y, 8, name="bn1"))
    y = n.conv(y, 8, 6, name="c2")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c1",))
    g = group_of(cg, "c1")
    assert "bn1" in g.members
    for mask, p in res:
        keep = kept_channel_ids(mask, g)
        for part in ("scale", "bias", "mean", "var"):
            np.testing.assert_array_equal(weight(p, f"bn1.{part}"), weight(m, f"bn1.{part}")[keep])
        np.testing.assert_array_equal(weight(p, "c1.w"), weight(m, "c1.w")[keep])
        np.testing.assert_array_equal(weight(p, "c2.w"), weight(m, "c2.w")[:, keep])
    assert "graph output" in group_of(cg, "c2").blocked_reason


def test_conv_prelu_per_channel_slope():
    n = Net([1, 3, 8, 8])
    y = n.conv(n.x, 3, 8, name="c1")
    slope = n.init("slope", n.rng.uniform(0.05, 0.5, (8, 1, 1)).astype(np.float32))
    y = n.op("PRelu", [y, slope], name="prelu")
    y = n.conv(y, 8, 4, name="c2")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c1",))
    g = group_of(cg, "c1")
    for mask, p in res:
        keep = kept_channel_ids(mask, g)
        assert weight(p, "slope").shape == (len(keep), 1, 1)
        np.testing.assert_array_equal(weight(p, "slope"), weight(m, "slope")[keep])


def test_add_mul_per_channel_and_scalar_constants():
    n = Net([1, 3, 8, 8])
    y = n.conv(n.x, 3, 8, name="c1")
    y = n.op("Add", [y, n.rand("a_c", [1, 8, 1, 1], 1.0)], name="add_c")
    y = n.op("Mul", [y, n.init("m_s", np.array(1.7, dtype=np.float32))], name="mul_s")
    y = n.op("Mul", [n.rand("m_c", [8, 1, 1], 1.0), y], name="mul_c")  # constant first, rank 3
    y = n.op("Add", [y, n.init("a_s", np.array([0.3], dtype=np.float32))], name="add_s")
    y = n.op("Sub", [y, n.rand("s_c", [1, 8, 1, 1], 1.0)], name="sub_c")
    y = n.conv(n.relu(y), 8, 4, name="c2")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c1",))
    g = group_of(cg, "c1")
    for mask, p in res:
        keep = kept_channel_ids(mask, g)
        assert weight(p, "a_c").shape == (1, len(keep), 1, 1)
        assert weight(p, "m_c").shape == (len(keep), 1, 1)
        assert weight(p, "s_c").shape == (1, len(keep), 1, 1)
        assert weight(p, "m_s").shape == ()
        assert weight(p, "a_s").shape == (1,)
        np.testing.assert_array_equal(weight(p, "m_c"), weight(m, "m_c")[keep])


def test_residual_add_couples_two_convs():
    n = Net([1, 3, 8, 8])
    a = n.relu(n.conv(n.x, 3, 8, name="stem"))
    b = n.relu(n.conv(a, 8, 5, name="inner"))
    b = n.conv(b, 5, 8, name="back")
    y = n.relu(n.op("Add", [a, b], name="res"))
    y = n.conv(y, 8, 4, name="head")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("stem", "inner"))
    g = group_of(cg, "stem")
    assert set(g.producers) >= {"stem", "back"}
    assert g.channels == 8
    assert group_of(cg, "inner").id != g.id
    for mask, p in res:
        k = kept_count(mask, g)
        assert weight(p, "stem.w").shape[0] == weight(p, "back.w").shape[0] == k
        assert weight(p, "inner.w").shape[1] == weight(p, "head.w").shape[1] == k
        # the same channel positions go from both producers
        keep = kept_channel_ids(mask, g)
        np.testing.assert_array_equal(weight(p, "back.b"), weight(m, "back.b")[keep])
        np.testing.assert_array_equal(weight(p, "stem.b"), weight(m, "stem.b")[keep])


def test_se_gating_mul_couples_gate_with_features():
    n = Net([1, 3, 8, 8])
    y = n.relu(n.conv(n.x, 3, 12, name="body"))
    s = n.op("GlobalAveragePool", [y], name="gap")
    s = n.relu(n.conv(s, 12, 4, k=1, name="squeeze"))
    s = n.op("Sigmoid", [n.conv(s, 4, 12, k=1, name="excite")], name="sig")
    y = n.op("Mul", [y, s], name="gate")
    y = n.conv(y, 12, 6, name="out")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("body", "squeeze"))
    g = group_of(cg, "body")
    assert set(g.producers) >= {"body", "excite"}
    for mask, p in res:
        k = kept_count(mask, g)
        assert weight(p, "excite.w").shape[0] == k
        assert weight(p, "squeeze.w").shape[1] == k
        assert weight(p, "out.w").shape[1] == k


@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_channel_multiplier_two(bias):
    c = 6
    n = Net([1, 3, 8, 8])
    y = n.relu(n.conv(n.x, 3, c, name="pw"))
    y = n.relu(n.conv(y, c, 2 * c, group=c, name="dw", bias=bias))
    y = n.conv(y, 2 * c, 5, k=1, name="proj")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("pw",))
    g = group_of(cg, "pw")
    assert "dw" in g.members and "proj" in g.members
    for mask, p in res:
        keep = kept_channel_ids(mask, g)
        k = len(keep)
        assert node_attr(p, "dw", "group") == k
        assert weight(p, "dw.w").shape == (2 * k, 1, 3, 3)
        rows = np.array([[2 * j, 2 * j + 1] for j in keep]).ravel()
        np.testing.assert_array_equal(weight(p, "dw.w"), weight(m, "dw.w")[rows])
        np.testing.assert_array_equal(weight(p, "proj.w"), weight(m, "proj.w")[:, rows])
        if bias:
            np.testing.assert_array_equal(weight(p, "dw.b"), weight(m, "dw.b")[rows])


def test_grouped_conv_between_two_convs():
    n = Net([1, 3, 8, 8])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.relu(n.conv(y, 8, 16, group=4, name="gc"))
    y = n.conv(y, 16, 5, name="c2")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0", "gc"))
    g_in, g_out = group_of(cg, "c0"), group_of(cg, "gc")
    assert g_in.channels == 2  # 8 inputs / 4 groups: position j is tied across groups
    assert g_out.channels == 4
    for mask, p in res:
        ki, ko = kept_count(mask, g_in), kept_count(mask, g_out)
        assert node_attr(p, "gc", "group") == 4
        assert weight(p, "c0.w").shape[0] == 4 * ki
        assert weight(p, "gc.w").shape == (4 * ko, ki, 3, 3)
        assert weight(p, "c2.w").shape[1] == 4 * ko


def test_concat_then_conv_offsets():
    n = Net([1, 3, 8, 8])
    a = n.relu(n.conv(n.x, 3, 5, name="ca"))
    b = n.relu(n.conv(n.x, 3, 7, name="cb"))
    y = n.op("Concat", [a, b], name="cat", axis=1)
    y = n.conv(y, 12, 4, name="c2")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("ca", "cb"))
    ga, gb = group_of(cg, "ca"), group_of(cg, "cb")
    assert ga.id != gb.id
    for mask, p in res:
        cols = kept_channel_ids(mask, ga) + [5 + j for j in kept_channel_ids(mask, gb)]
        np.testing.assert_array_equal(weight(p, "c2.w"), weight(m, "c2.w")[:, cols])


def test_concat_then_bn():
    n = Net([1, 3, 8, 8])
    a = n.conv(n.x, 3, 4, name="ca")
    b = n.conv(n.x, 3, 6, name="cb")
    y = n.op("Concat", [a, b], name="cat", axis=-3)  # negative axis on purpose
    y = n.relu(n.bn(y, 10, name="bn"))
    y = n.conv(y, 10, 3, name="c2")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("ca", "cb"))
    ga, gb = group_of(cg, "ca"), group_of(cg, "cb")
    for mask, p in res:
        idx = kept_channel_ids(mask, ga) + [4 + j for j in kept_channel_ids(mask, gb)]
        for part in ("scale", "bias", "mean", "var"):
            np.testing.assert_array_equal(weight(p, f"bn.{part}"), weight(m, f"bn.{part}")[idx])


# --------------------------------------------------------------------------- Split / Slice / Pad / Resize
def _split_net(opset: int, style: str):
    n = Net([1, 3, 8, 8], opset=opset)
    y = n.relu(n.conv(n.x, 3, 10, name="c0"))
    if style == "input":
        outs = n.op("Split", [y, n.ints("sizes", [4, 6])], name="split", n_out=2, axis=1)
    elif style == "attr":
        outs = n.op("Split", [y], name="split", n_out=2, axis=1, split=[4, 6])
    else:  # num_outputs (opset 18): equal halves
        outs = n.op("Split", [y], name="split", n_out=2, axis=1, num_outputs=2)
    sizes = [5, 5] if style == "num_outputs" else [4, 6]
    a = n.conv(outs[0], sizes[0], 3, name="ca")
    b = n.conv(outs[1], sizes[1], 3, name="cb")
    return n.model(n.op("Concat", [a, b], name="cat", axis=1)), sizes


@pytest.mark.parametrize("opset,style", [(13, "input"), (18, "num_outputs"), (11, "attr"), (18, "input")])
def test_split_on_channels(opset, style):
    m, sizes = _split_net(opset, style)

    def fix(cg, mask):
        keep_one_of(cg, mask, "split_out0", 0, sizes[0])
        keep_one_of(cg, mask, "split_out1", 0, sizes[1])

    cg, res = check_contract(m, prunable=("c0",), fix_mask=fix)
    g = group_of(cg, "c0")
    for mask, p in res:
        keep = np.array(kept_channel_ids(mask, g))
        want = [int((keep < sizes[0]).sum()), int((keep >= sizes[0]).sum())]
        sp = node(p, "split")
        if opset < 13:
            assert list(node_attr(p, "split", "split")) == want
        else:
            assert input_value(p, "split", 1).tolist() == want
            assert node_attr(p, "split", "num_outputs") is None
        assert weight(p, "ca.w").shape[1] == want[0]
        assert weight(p, "cb.w").shape[1] == want[1]
        assert len(sp.output) == 2


def _mask_without(cg, drop_ids, producer="c0"):
    """The full mask less channels ``drop_ids`` of ``producer``'s group."""
    g = group_of(cg, producer)
    mask = cg.full_mask()
    for u, cid in zip(g.units, g.channel_ids):
        if cid in drop_ids:
            mask[u] = False
    return mask


EMPTIED = (
    "the plan removes every channel that passes through '{}', which would leave it with no output. "
    "To fix: keep at least one channel in each Split output / channel Slice (edit the plan or lower --target-flops)."
)


def _check_emptied_is_refused(m, node):
    """Removing both channels of a 2-channel part is refused with a PlanError naming ``node``;
    removing one of them prunes exactly."""
    from onnxprune.errors import PlanError

    cg = find_groups(m)
    with pytest.raises(PlanError) as info:
        apply_mask(cg, _mask_without(cg, {0, 1}))
    assert type(info.value) is PlanError and info.value.node == node
    assert str(info.value) == EMPTIED.format(node)
    mask = _mask_without(cg, {0})
    p = apply_mask(cg, mask)
    onnx.checker.check_model(p, full_check=True)
    x = np.random.default_rng(0).standard_normal([d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim])
    x = x.astype(np.float32)
    assert rel_err(run(p, x)[0], run(masked_model(cg, mask), x)[0]) <= 1e-4
    assert cg.macs(mask) == count(p).total_macs < cg.total_macs


def test_split_part_emptied():
    n = Net([1, 3, 8, 8])
    y = n.conv(n.x, 3, 4, name="c0")
    a, b = n.op("Split", [y, n.ints("sizes", [2, 2])], name="split", n_out=2, axis=1)
    m = n.model(n.op("Concat", [n.conv(a, 2, 3, name="ca"), n.conv(b, 2, 3, name="cb")], name="cat", axis=1))
    _check_emptied_is_refused(m, "split")


def test_slice_range_emptied():
    n = Net([1, 3, 8, 8])
    y = n.conv(n.x, 3, 4, name="c0")
    y = n.op("Slice", [y, n.ints("st", [0]), n.ints("en", [2]), n.ints("ax", [1])], name="sl")
    _check_emptied_is_refused(n.model(n.conv(y, 2, 3, name="c1")), "sl")


@pytest.mark.parametrize("opset", [13, 18])
def test_slice_on_channels_constant_bounds(opset):
    n = Net([1, 3, 8, 8], opset=opset)
    y = n.relu(n.conv(n.x, 3, 10, name="c0"))
    y = n.op("Slice", [y, n.ints("st", [2]), n.ints("en", [7]), n.ints("ax", [1])], name="slice")
    y2 = n.op("Slice", [y, n.ints("st2", [-4, 0]), n.ints("en2", [100, 6]), n.ints("ax2", [1, 3])], name="slice2")
    y = n.conv(y2, 4, 3, name="c1")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0",), fix_mask=lambda cg, mask: keep_one_of(cg, mask, "slice2_out", 0, 4))
    g = group_of(cg, "c0")
    for mask, p in res:
        keep = np.array(kept_channel_ids(mask, g))
        inside = keep[(keep >= 2) & (keep < 7)]
        assert weight(p, "c1.w").shape[1] == int((inside >= 3).sum())
        np.testing.assert_array_equal(weight(p, "c1.w"), weight(m, "c1.w")[:, inside[inside >= 3] - 3])


def test_slice_on_channels_opset9_attributes():
    n = Net([1, 3, 8, 8], opset=9)
    y = n.relu(n.conv(n.x, 3, 10, name="c0"))
    y = n.op("Slice", [y], name="slice", starts=[1], ends=[8], axes=[1])
    y = n.conv(y, 7, 3, name="c1")
    m = n.model(y)
    check_contract(m, prunable=("c0",), fix_mask=lambda cg, mask: keep_one_of(cg, mask, "slice_out", 0, 7))


@pytest.mark.parametrize("opset", [13, 18])
def test_pad_channel_axis_then_add(opset):
    n = Net([1, 3, 8, 8], opset=opset)
    y = n.relu(n.conv(n.x, 3, 6, name="c0"))
    if opset >= 18:
        pads = n.op("Pad", [y, n.ints("pads", [1, 2]), "", n.ints("pax", [1])], name="pad")
    else:
        pads = n.op("Pad", [y, n.ints("pads", [0, 1, 0, 0, 0, 2, 0, 0])], name="pad")
    z = n.conv(n.x, 3, 9, name="c1")
    y = n.relu(n.op("Add", [pads, z], name="add"))
    y = n.conv(y, 9, 4, name="c2")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0",))
    # c1's channels 1..6 meet c0's channels (one unit each); 0, 7, 8 meet the zero padding
    shared = [g for g in cg.groups if set(g.producers) == {"c0", "c1"}]
    assert len(shared) == 1 and shared[0].channels == 6 and shared[0].prunable
    for mask, p in res:
        k = len(kept_positions(cg, mask, "add_out"))
        assert weight(p, "c2.w").shape[1] == weight(p, "c1.w").shape[0] == k
        np.testing.assert_array_equal(weight(p, "c1.w"), weight(m, "c1.w")[kept_positions(cg, mask, "c1_out")])
        np.testing.assert_array_equal(kept_positions(cg, mask, "add_out"), kept_positions(cg, mask, "c1_out"))


def test_pad_channel_axis_opset10_attribute():
    n = Net([1, 3, 8, 8], opset=10)
    y = n.relu(n.conv(n.x, 3, 6, name="c0"))
    y = n.op("Pad", [y], name="pad", pads=[0, 2, 0, 0, 0, 0, 0, 0])
    y = n.conv(y, 8, 4, name="c2")
    check_contract(n.model(y), prunable=("c0",))


@pytest.mark.parametrize("mode", ["sizes", "scales"])
def test_resize_with_channel_dim(mode):
    n = Net([1, 3, 6, 6], opset=13)
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    roi = n.init("roi", np.zeros(0, dtype=np.float32))
    if mode == "sizes":
        scales = n.init("scales", np.zeros(0, dtype=np.float32))
        y = n.op("Resize", [y, roi, scales, n.ints("sizes", [1, 8, 12, 12])], name="up", mode="nearest")
    else:
        y = n.op("Resize", [y, roi, n.init("scales", np.array([1, 1, 2, 2], dtype=np.float32))], name="up", mode="nearest")
    y = n.conv(y, 8, 4, name="c1")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0",))
    g = group_of(cg, "c0")
    for mask, p in res:
        if mode == "sizes":
            assert input_value(p, "up", 3).tolist() == [1, kept_count(mask, g), 12, 12]
        else:
            assert input_value(p, "up", 2).tolist() == [1, 1, 2, 2]


def test_conv_transpose_decoder():
    n = Net([1, 3, 6, 6])
    y = n.relu(n.conv(n.x, 3, 8, name="enc"))
    w = n.rand("up.w", [8, 6, 2, 2])
    b = n.rand("up.b", [6], 0.1)
    y = n.relu(n.op("ConvTranspose", [y, w, b], name="up", kernel_shape=[2, 2], strides=[2, 2]))
    y = n.conv(y, 6, 3, name="dec")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("enc", "up"))
    ge, gu = group_of(cg, "enc"), group_of(cg, "up")
    for mask, p in res:
        np.testing.assert_array_equal(weight(p, "up.w"), weight(m, "up.w")[kept_channel_ids(mask, ge)][:, kept_channel_ids(mask, gu)])
        assert weight(p, "up.b").shape == (kept_count(mask, gu),)


# --------------------------------------------------------------------------- heads
def test_gap_flatten_gemm():
    n = Net([1, 3, 8, 8])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Flatten", [n.op("GlobalAveragePool", [y], name="gap")], name="flat", axis=1)
    y = n.gemm(y, 8, 5, name="fc")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0",))
    g = group_of(cg, "c0")
    assert "fc" in g.members
    assert "graph output" in group_of(cg, "fc").blocked_reason
    for mask, p in res:
        np.testing.assert_array_equal(weight(p, "fc.w"), weight(m, "fc.w")[:, kept_channel_ids(mask, g)])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_conv_flatten_gemm_channel_owns_rows(trans_b):
    h = w = 3
    n = Net([1, 3, h, w])
    y = n.relu(n.conv(n.x, 3, 6, name="c0"))
    y = n.op("Flatten", [y], name="flat")
    y = n.gemm(y, 6 * h * w, 4, name="fc", trans_b=trans_b)
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0",))
    g = group_of(cg, "c0")
    for mask, p in res:
        rows = np.concatenate([np.arange(c * h * w, (c + 1) * h * w) for c in kept_channel_ids(mask, g)])
        orig = weight(m, "fc.w")
        want = orig[:, rows] if trans_b else orig[rows]
        np.testing.assert_array_equal(weight(p, "fc.w"), want)


@pytest.mark.parametrize("target", ["literal", "zero_minus_one"])
def test_reshape_flatten_to_gemm(target):
    h = w = 4
    n = Net([1, 3, h, w])
    y = n.relu(n.conv(n.x, 3, 6, name="c0"))
    shape = [-1, 6 * h * w] if target == "literal" else [0, -1]
    y = n.op("Reshape", [y, n.ints("shape", shape)], name="rs")
    y = n.gemm(y, 6 * h * w, 4, name="fc")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0",))
    g = group_of(cg, "c0")
    for mask, p in res:
        k = kept_count(mask, g)
        got_shape = input_value(p, "rs", 1).tolist()
        assert got_shape == ([-1, k * h * w] if target == "literal" else [0, -1])
        assert weight(p, "fc.w").shape == (4, k * h * w)


def test_reshape_literal_symbolic_batch():
    h = w = 3
    n = Net(["N", 3, h, w])
    y = n.relu(n.conv(n.x, 3, 5, name="c0"))
    y = n.op("Reshape", [y, n.ints("shape", [-1, 5 * h * w])], name="rs")
    y = n.gemm(y, 5 * h * w, 4, name="fc")
    check_contract(n.model(y), prunable=("c0",), batch=3)


def test_gemm_relu_gemm_gemm_head():
    n = Net([1, 3, 6, 6])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Flatten", [n.op("GlobalAveragePool", [y])], name="flat")
    y = n.relu(n.gemm(y, 8, 12, name="fc1"))
    y = n.gemm(y, 12, 10, name="fc2", trans_b=0)
    y = n.gemm(y, 10, 3, name="fc3")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0", "fc1", "fc2"))
    g1, g2 = group_of(cg, "fc1"), group_of(cg, "fc2")
    for mask, p in res:
        k1, k2 = kept_count(mask, g1), kept_count(mask, g2)
        assert weight(p, "fc1.w").shape[0] == k1 and weight(p, "fc1.b").shape == (k1,)
        assert weight(p, "fc2.w").shape == (k1, k2) and weight(p, "fc2.b").shape == (k2,)
        assert weight(p, "fc3.w").shape == (3, k2)


def test_matmul_add_bias_head():
    n = Net([1, 3, 6, 6])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Flatten", [n.op("GlobalAveragePool", [y])], name="flat")
    y = n.op("MatMul", [y, n.rand("w1", [8, 12])], name="mm1")
    y = n.relu(n.op("Add", [y, n.rand("b1", [12], 0.1)], name="bias1"))
    y = n.op("MatMul", [y, n.rand("w2", [12, 4])], name="mm2")
    y = n.op("Add", [y, n.rand("b2", [4], 0.1)], name="bias2")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0", "mm1"))
    g = group_of(cg, "mm1")
    for mask, p in res:
        keep = kept_channel_ids(mask, g)
        rows = kept_channel_ids(mask, group_of(cg, "c0"))
        np.testing.assert_array_equal(weight(p, "w1"), weight(m, "w1")[rows][:, keep])
        np.testing.assert_array_equal(weight(p, "b1"), weight(m, "b1")[keep])
        assert weight(p, "w2").shape == (len(keep), 4)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean_spatial(opset, keepdims):
    n = Net([1, 3, 6, 6], opset=opset)
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    if opset >= 18:
        y = n.op("ReduceMean", [y, n.ints("axes", [2, 3])], name="rm", keepdims=keepdims)
    else:
        y = n.op("ReduceMean", [y], name="rm", axes=[-2, -1], keepdims=keepdims)
    if keepdims:
        y = n.conv(y, 8, 5, k=1, name="c1")
    else:
        y = n.gemm(y, 8, 5, name="fc")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0",))
    g = group_of(cg, "c0")
    for mask, p in res:
        keep = kept_channel_ids(mask, g)
        if keepdims:
            np.testing.assert_array_equal(weight(p, "c1.w"), weight(m, "c1.w")[:, keep])
        else:
            np.testing.assert_array_equal(weight(p, "fc.w"), weight(m, "fc.w")[:, keep])


def test_transpose_nhwc_then_matmul():
    n = Net([1, 3, 5, 5])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Transpose", [y], name="nhwc", perm=[0, 2, 3, 1])
    y = n.op("MatMul", [y, n.rand("w", [8, 6])], name="mm")
    y = n.relu(y)
    y = n.op("MatMul", [y, n.rand("w2", [6, 4])], name="mm2")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0", "mm"))
    g = group_of(cg, "c0")
    for mask, p in res:
        assert weight(p, "w").shape[0] == kept_count(mask, g)
    # MatMul MACs count H*W rows
    assert count(m).by_name()["mm"].macs == 25 * 8 * 6


# --------------------------------------------------------------------------- negative cases
def _assert_blocked(cg, producer: str, *phrases: str):
    g = group_of(cg, producer)
    assert not g.prunable, f"group of {producer} should be blocked"
    reason = g.blocked_reason.lower()
    assert any(ph.lower() in reason for ph in phrases), g.blocked_reason
    return g


def _assert_untouched(m, res, *tensors, axes=None):
    """Tensors are unchanged (or, with ``axes``, keep their size on those axes)."""
    for _, p in res:
        for t in tensors:
            if axes is None:
                np.testing.assert_array_equal(weight(p, t), weight(m, t))
            else:
                for a in axes:
                    assert weight(p, t).shape[a] == weight(m, t).shape[a]


def test_channel_shuffle_blocks():
    n = Net([1, 3, 6, 6])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Reshape", [y, n.ints("s1", [1, 2, 4, 6, 6])], name="rs1")
    y = n.op("Transpose", [y], name="tr", perm=[0, 2, 1, 3, 4])
    y = n.op("Reshape", [y, n.ints("s2", [1, 8, 6, 6])], name="rs2")
    y = n.conv(y, 8, 4, name="c1")
    m = n.model(y)
    cg, res = check_contract(m)
    g = _assert_blocked(cg, "c0", "reshapes the channel axis")
    assert "rs1" in g.blocked_reason
    _assert_untouched(m, res, "c0.w", "c0.b", "s1", "s2")
    _assert_untouched(m, res, "c1.w", axes=[1])


def test_conv_output_also_graph_output_blocks():
    n = Net([1, 3, 6, 6])
    feat = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.conv(feat, 8, 4, name="c1")
    y2 = n.conv(y, 4, 6, name="c2")
    m = n.model(y2, feat)
    cg, res = check_contract(m, prunable=("c1",))
    _assert_blocked(cg, "c0", "graph output")
    _assert_untouched(m, res, "c0.w", "c0.b")
    _assert_untouched(m, res, "c1.w", axes=[1])


def test_exclude_glob_blocks_group():
    n = Net([1, 3, 6, 6])
    y = n.relu(n.conv(n.x, 3, 8, name="conv1"))
    y = n.relu(n.conv(y, 8, 8, name="conv2_a"))
    y = n.conv(y, 8, 4, name="conv3")
    m = n.model(y)
    cg, res = check_contract(m, exclude=["conv2*"])
    g = _assert_blocked(cg, "conv2_a", "excluded")
    assert "conv2_a" in g.blocked_reason
    # conv2_a's input channels are conv1's: excluded too (conv2_a's weights must not change)
    _assert_blocked(cg, "conv1", "excluded")
    _assert_untouched(m, res, "conv1.w", "conv1.b", "conv2_a.w", "conv2_a.b", "conv3.w")


def test_custom_domain_op_blocks():
    n = Net([1, 3, 6, 6])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Relu", [y], name="custom", domain="com.example")
    y = n.conv(y, 8, 4, name="c1")
    graph = helper.make_graph(
        n.nodes,
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 6, 6])],  # ORT cannot run it: declare shapes
        n.inits,
    )
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)], ir_version=8
    )
    before = m.SerializeToString()
    cg = find_groups(m)
    g = _assert_blocked(cg, "c0", "not supported")
    assert "custom" in g.blocked_reason
    assert not any(grp.prunable for grp in cg.groups)
    p = apply_mask(cg, random_mask(cg, np.random.default_rng(0)))
    for t in ("c0.w", "c0.b", "c1.w"):
        np.testing.assert_array_equal(weight(p, t), weight(m, t))
    assert cg.macs(cg.full_mask()) == count(p).total_macs
    assert m.SerializeToString() == before


@pytest.mark.parametrize("opset,axis", [(13, 1), (13, -3), (11, 1), (11, 0)])
def test_softmax_over_channel_axis_blocks(opset, axis):
    n = Net([1, 3, 6, 6], opset=opset)
    y = n.conv(n.x, 3, 8, name="c0")
    y = n.op("Softmax", [y], name="sm", axis=axis)
    y = n.conv(y, 8, 4, name="c1")
    m = n.model(y)
    cg, res = check_contract(m)
    _assert_blocked(cg, "c0", "channel axis")
    _assert_untouched(m, res, "c0.w", "c0.b", "c1.w")


def test_softmax_over_width_does_not_block():
    n = Net([1, 3, 6, 6], opset=13)
    y = n.conv(n.x, 3, 8, name="c0")
    y = n.op("Softmax", [y], name="sm", axis=-1)
    y = n.conv(y, 8, 4, name="c1")
    check_contract(n.model(y), prunable=("c0",))


def test_shared_weight_two_convs_get_private_copies():
    """One weight read by two convs on different channels: each conv gets its own sliced copy."""
    n = Net([1, 3, 6, 6])
    a = n.relu(n.conv(n.x, 3, 8, name="ca"))
    b = n.relu(n.conv(n.x, 3, 8, name="cb"))
    w = n.rand("shared.w", [8, 8, 3, 3])
    ya = n.op("Conv", [a, w], name="sa", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    yb = n.op("Conv", [b, w], name="sb", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = n.op("Concat", [ya, yb], name="cat", axis=1)
    y = n.conv(y, 16, 4, name="head")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("sa", "sb", "ca", "cb"))
    for mask, p in res:
        convs = {nd.name: nd for nd in p.graph.node}
        assert convs["sa"].input[1] != convs["sb"].input[1] or mask.all()


def test_reshape_splitting_channel_axis_blocks():
    n = Net([1, 3, 4, 4])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Reshape", [y, n.ints("s", [1, 2, 4, 16])], name="split_c")
    y = n.op("Reshape", [y, n.ints("s2", [1, 128])], name="flat")
    y = n.gemm(y, 128, 4, name="fc")
    m = n.model(y)
    cg, res = check_contract(m)
    g = _assert_blocked(cg, "c0", "reshapes the channel axis")
    assert "split_c" in g.blocked_reason
    _assert_untouched(m, res, "c0.w", "c0.b", "s", "s2", "fc.w")


def test_maxpool_with_indices_blocks():
    n = Net([1, 3, 6, 6])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    vals, idx = n.op("MaxPool", [y], name="mp", n_out=2, kernel_shape=[2, 2], strides=[2, 2])
    y = n.conv(vals, 8, 4, name="c1")
    m = n.model(y, extra_outputs=[(idx, TensorProto.INT64)])
    cg, res = check_contract(m)
    _assert_blocked(cg, "c0", "indices")
    _assert_untouched(m, res, "c0.w", "c0.b", "c1.w")


def test_grouped_conv_transpose_blocks():
    n = Net([1, 4, 6, 6])
    y = n.relu(n.conv(n.x, 4, 8, name="c0"))
    y = n.op("ConvTranspose", [y, n.rand("ct.w", [8, 3, 2, 2])], name="ct", group=2, strides=[2, 2], kernel_shape=[2, 2])
    y = n.conv(y, 6, 4, name="c1")
    m = n.model(y)
    cg = find_groups(m)
    _assert_blocked(cg, "c0", "grouped")
    rng = np.random.default_rng(0)
    x = rng.standard_normal([1, 4, 6, 6]).astype(np.float32)
    for _ in range(3):
        mask = random_mask(cg, rng)
        p = apply_mask(cg, mask)
        onnx.checker.check_model(p, full_check=True)
        assert rel_err(run(p, x)[0], run(masked_model(cg, mask), x)[0]) <= 1e-4
        for t in ("c0.w", "c0.b", "ct.w", "c1.w"):
            np.testing.assert_array_equal(weight(p, t), weight(m, t))


def test_gemm_trans_a_blocks():
    n = Net([1, 3, 4, 4])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Flatten", [n.op("GlobalAveragePool", [y])], name="flat")
    y = n.op("Gemm", [y, n.rand("w", [1, 5])], transA=1, name="fcA")
    m = n.model(y)
    cg, res = check_contract(m)
    _assert_blocked(cg, "c0", "did not track")
    _assert_untouched(m, res, "c0.w", "w")


@pytest.mark.parametrize("op", ["LRN", "ReduceMeanC", "LayerNorm"])
def test_ops_mixing_channels_block(op):
    n = Net([1, 3, 6, 6], opset=17)
    f = n.relu(n.conv(n.x, 3, 8, name="c0"))
    if op == "LRN":
        y, phrase = n.op("LRN", [f], size=3, name="lrn"), "neighbouring channels"
    elif op == "ReduceMeanC":
        y, phrase = n.op("Mul", [f, n.op("ReduceMean", [f], axes=[1], keepdims=1, name="rmc")]), "reduces over the channel axis"
    else:
        t = n.op("Transpose", [f], perm=[0, 2, 3, 1])
        t = n.op("LayerNormalization", [t, n.rand("ln.s", [8], 1.0), n.rand("ln.b", [8], 1.0)], axis=-1, name="ln")
        y, phrase = n.op("Transpose", [t], perm=[0, 3, 1, 2]), "channel axis"
    y = n.conv(y, 8, 4, name="c1")
    m = n.model(y)
    cg, res = check_contract(m)
    _assert_blocked(cg, "c0", phrase)
    _assert_untouched(m, res, "c0.w", "c1.w")


def test_pad_negative_on_channels_blocks():
    n = Net([1, 3, 6, 6])
    y = n.relu(n.conv(n.x, 3, 6, name="c0"))
    y = n.op("Pad", [y, n.ints("p", [0, -1, 0, 0, 0, 0, 0, 0])], name="pad")
    y = n.conv(y, 5, 4, name="c1")
    m = n.model(y)
    cg, res = check_contract(m)
    _assert_blocked(cg, "c0", "pad")
    _assert_untouched(m, res, "c0.w", "c1.w")


# --------------------------------------------------------------------------- more pass-through / coupling forms
def test_concat_on_spatial_axis_couples_inputs():
    n = Net([1, 3, 4, 4])
    a = n.relu(n.conv(n.x, 3, 8, name="ca"))
    b = n.relu(n.conv(n.x, 3, 8, name="cb"))
    y = n.op("Concat", [a, b], axis=2, name="cat")
    y = n.conv(y, 8, 3, name="c1")
    cg, res = check_contract(n.model(y), prunable=("ca",))
    assert set(group_of(cg, "ca").producers) == {"ca", "cb"}


def test_split_num_outputs_uneven():
    n = Net([1, 3, 4, 4], opset=18)
    y = n.relu(n.conv(n.x, 3, 10, name="c0"))
    o = n.op("Split", [y], n_out=3, axis=1, num_outputs=3, name="sp")  # 4, 4, 2
    y = n.op("Concat", [n.conv(o[0], 4, 2, name="a"), n.conv(o[1], 4, 2, name="b"), n.conv(o[2], 2, 2, name="c")], axis=1)

    def fix(cg, mask):
        for k, size in enumerate((4, 4, 2)):
            keep_one_of(cg, mask, f"sp_out{k}", 0, size)

    cg, res = check_contract(n.model(y), prunable=("c0",), fix_mask=fix)
    for mask, p in res:
        sizes = input_value(p, "sp", 1).tolist()
        assert sizes == [len(kept_positions(cg, mask, f"sp_out{k}")) for k in range(3)]
        assert node_attr(p, "sp", "num_outputs") is None


def test_split_on_spatial_axis_passes_channels():
    n = Net([1, 3, 8, 8])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    a, b = n.op("Split", [y, n.ints("sz", [3, 5])], n_out=2, axis=2, name="sp")
    y = n.conv(n.op("Concat", [b, a], axis=2), 8, 3, name="c1")
    check_contract(n.model(y), prunable=("c0",))


def test_legacy_runtime_flatten_shape():
    """Shape -> Gather -> Unsqueeze -> Concat([N, -1]) -> Reshape, as the legacy exporter writes."""
    n = Net([1, 3, 4, 4])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    g0 = n.op("Gather", [n.op("Shape", [y]), n.ints("i0", 0)], axis=0)
    cat = n.op("Concat", [n.op("Unsqueeze", [g0, n.ints("ax0", [0])]), n.ints("m1", [-1])], axis=0)
    y = n.op("Reshape", [y, cat], name="rs")
    y = n.gemm(y, 128, 3, name="fc")
    check_contract(n.model(y), prunable=("c0",))


def test_reshape_keep_channel_axis_literal():
    """[1, C, H, W] -> [1, C, H*W] with a literal C, then a spatial mean and a Gemm."""
    n = Net([1, 3, 4, 4])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Reshape", [y, n.ints("s", [1, 8, 16])], name="rs")
    y = n.op("ReduceMean", [y], axes=[2], keepdims=0)
    y = n.gemm(y, 8, 3, name="fc")
    cg, res = check_contract(n.model(y), prunable=("c0",))
    for mask, p in res:
        assert input_value(p, "rs", 1).tolist() == [1, kept_count(mask, group_of(cg, "c0")), 16]


def test_squeeze_unsqueeze_head():
    n = Net([1, 3, 4, 4])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Squeeze", [n.op("GlobalAveragePool", [y]), n.ints("ax", [2, 3])])
    y = n.relu(n.gemm(y, 8, 6, name="fc"))
    y = n.op("Squeeze", [n.op("Unsqueeze", [y, n.ints("ax2", [-1])]), n.ints("ax3", [2])])
    y = n.gemm(y, 6, 3, name="fc2")
    check_contract(n.model(y), prunable=("c0", "fc"))


def test_gemm_bias_forms_row_and_scalar():
    n = Net([1, 3, 4, 4])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Flatten", [n.op("GlobalAveragePool", [y])])
    y = n.relu(n.op("Gemm", [y, n.rand("w1", [8, 6]), n.rand("b1", [1, 6])], name="fc1"))
    y = n.relu(n.op("Gemm", [y, n.rand("w2", [6, 5]), n.init("b2", np.array(0.5, dtype=np.float32))], name="fc2"))
    y = n.gemm(y, 5, 3, name="fc3")
    cg, res = check_contract(n.model(y), prunable=("c0", "fc1", "fc2"))
    for mask, p in res:
        assert weight(p, "b1").shape == (1, kept_count(mask, group_of(cg, "fc1")))
        assert weight(p, "b2").shape == ()


def test_instance_norm_and_bn1d():
    n = Net([1, 3, 4, 4])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("InstanceNormalization", [y, n.rand("in.s", [8], 1.0), n.rand("in.b", [8], 1.0)], name="inorm")
    y = n.op("Flatten", [n.op("GlobalAveragePool", [y])])
    y = n.relu(n.bn(n.gemm(y, 8, 6, name="fc1"), 6, name="bn1d"))
    y = n.gemm(y, 6, 3, name="fc2")
    cg, res = check_contract(n.model(y), prunable=("c0", "fc1"))
    for mask, p in res:
        assert weight(p, "in.s").shape == (kept_count(mask, group_of(cg, "c0")),)
        assert weight(p, "bn1d.var").shape == (kept_count(mask, group_of(cg, "fc1")),)


def test_upsample_opset9():
    n = Net([1, 3, 4, 4], opset=9)
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Upsample", [y, n.init("sc", np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    check_contract(n.model(n.conv(y, 8, 3, name="c1")), prunable=("c0",))


def test_per_channel_constants_as_constant_nodes():
    n = Net([1, 3, 4, 4])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    c = n.op("Constant", [], name="k", value=numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1), "kv"))
    y = n.op("Add", [y, c], name="addk")
    c2 = n.op("Constant", [], name="k2", value_floats=[float(v) for v in np.linspace(0.5, 1.5, 8)])
    y = n.op("Mul", [n.op("Transpose", [y], perm=[0, 2, 3, 1]), c2], name="mulk")  # NHWC: channel last
    y = n.op("Transpose", [y], perm=[0, 3, 1, 2])
    cg, res = check_contract(n.model(n.conv(y, 8, 3, name="c1")), prunable=("c0",))
    for mask, p in res:
        k = kept_count(mask, group_of(cg, "c0"))
        consts = {nd.name: numpy_helper.to_array(nd.attribute[0].t) for nd in p.graph.node if nd.op_type == "Constant"}
        assert consts["k"].shape == (1, k, 1, 1) and consts["k2"].shape == (k,)


def test_old_ir_initializers_listed_as_inputs():
    n = Net([1, 3, 4, 4], opset=9)
    y = n.relu(n.bn(n.conv(n.x, 3, 8, name="c0"), 8, name="bn"))
    m = n.model(n.conv(y, 8, 3, name="c1"))
    m.ir_version = 3
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    cg, res = check_contract(m, prunable=("c0",))
    for mask, p in res:
        k = kept_count(mask, group_of(cg, "c0"))
        dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in p.graph.input}
        assert dims["c0.w"][0] == k and dims["bn.scale"] == [k]


def test_conv1d_strided_dilated_then_flatten_gemm():
    n = Net([1, 3, 10])
    y = n.relu(n.op("Conv", [n.x, n.rand("w0", [8, 3, 3]), n.rand("b0", [8], 0.1)], name="c0", pads=[1, 1]))
    y = n.relu(n.op("Conv", [y, n.rand("w1", [6, 8, 3])], name="c1", strides=[2], dilations=[2], pads=[2, 2]))
    y = n.gemm(n.op("Flatten", [y]), 6 * 5, 3, name="fc")
    cg, res = check_contract(n.model(y), prunable=("c0", "c1"))
    for mask, p in res:
        assert weight(p, "fc.w").shape == (3, 5 * kept_count(mask, group_of(cg, "c1")))


def test_conv3d_chain():
    n = Net([1, 2, 4, 4, 4])
    y = n.relu(n.op("Conv", [n.x, n.rand("w0", [8, 2, 3, 3, 3])], name="c0", pads=[1] * 6))
    y = n.op("Conv", [y, n.rand("w1", [6, 8, 1, 1, 1])], name="c1")
    check_contract(n.model(y), prunable=("c0",))


def test_conv_transpose_output_padding_and_auto_pad_conv():
    n = Net([1, 3, 5, 5])
    y = n.relu(n.op("Conv", [n.x, n.rand("w0", [8, 3, 3, 3])], name="c0", strides=[2, 2], auto_pad="SAME_UPPER"))
    ct = n.rand("ct.w", [8, 6, 3, 3])
    y = n.relu(n.op("ConvTranspose", [y, ct], name="ct", strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]))
    check_contract(n.model(n.conv(y, 6, 3, name="c1")), prunable=("c0", "ct"))


def test_depthwise_multiplier_three_then_grouped():
    n = Net([1, 3, 6, 6])
    y = n.relu(n.conv(n.x, 3, 6, name="c0"))
    y = n.relu(n.conv(y, 6, 18, group=6, name="dw"))
    y = n.relu(n.conv(y, 18, 9, group=3, name="gc"))
    cg, res = check_contract(n.model(n.conv(y, 9, 3, name="c1")), prunable=("c0", "gc"))
    for mask, p in res:
        k = len(kept_positions(cg, mask, "c0_out"))  # units tie channels {0, 2, 4} and {1, 3, 5}
        assert group_of(cg, "c0").channels == 2
        assert node_attr(p, "dw", "group") == k
        assert node_attr(p, "gc", "group") == 3
        assert weight(p, "gc.w").shape[1] * 3 == weight(p, "dw.w").shape[0]


# --------------------------------------------------------------------------- regressions (bugs found by these tests, now fixed)
@pytest.mark.parametrize("axes,sizes", [([2, 3], [12, 12]), ([1, 2, 3], [8, 12, 12])])
def test_resize_opset18_axes(axes, sizes):
    n = Net([1, 3, 6, 6], opset=18)
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    y = n.op("Resize", [y, "", "", n.ints("sizes", sizes)], name="up", mode="nearest", axes=axes)
    check_contract(n.model(n.conv(y, 8, 4, name="c1")), prunable=("c0",))


@pytest.mark.parametrize("case", ["grouped_convtranspose", "conv_weight_via_identity", "gemm_weight_via_identity"])
def test_blocked_producers_still_count_macs(case):
    n = Net([1, 4, 6, 6])
    y = n.relu(n.conv(n.x, 4, 8, name="c0"))
    if case == "grouped_convtranspose":
        y = n.op("ConvTranspose", [y, n.rand("ct.w", [8, 3, 2, 2])], name="ct", group=2, strides=[2, 2], kernel_shape=[2, 2])
        y = n.conv(y, 6, 4, name="c1")
    elif case == "conv_weight_via_identity":  # like DequantizeLinear -> Conv in QDQ models
        y = n.op("Conv", [y, n.op("Identity", [n.rand("c1.w", [4, 8, 3, 3])])], name="c1", pads=[1, 1, 1, 1])
    else:
        y = n.op("Flatten", [n.op("GlobalAveragePool", [y])])
        y = n.op("Gemm", [y, n.op("Identity", [n.rand("fc.w", [8, 5])])], name="fc")
    m = n.model(y)
    cg = find_groups(m)
    assert cg.total_macs == count(m).total_macs
    assert cg.macs(cg.full_mask()) == count(m).total_macs


def test_reshape_merging_channels_into_batch():
    n = Net([1, 3, 4, 4])
    y = n.relu(n.conv(n.x, 3, 16, name="c0"))
    y = n.op("Reshape", [y, n.ints("s", [16, 16])], name="rs")  # rows: channels, columns: pixels
    y = n.op("MatMul", [y, n.rand("w", [16, 5])], name="mm")
    m = n.model(y)
    cg, res = check_contract(m)  # numerics differ (rel err ~1) unless c0 is blocked
    _assert_blocked(cg, "c0", "reshape")


def test_shape_of_pruned_tensor_is_graph_output():
    n = Net([1, 3, 4, 4])
    y = n.relu(n.conv(n.x, 3, 8, name="c0"))
    s = n.op("Shape", [y], name="shp")
    m = n.model(n.conv(y, 8, 3, name="c1"))
    m.graph.output.append(helper.make_tensor_value_info(s, TensorProto.INT64, [4]))
    check_contract(m)


@pytest.mark.parametrize("style", ["reshape_literal", "unsqueeze"])
def test_se_with_linear_layers(style):
    """SE written with Linear layers: GAP -> Flatten -> Gemm -> Relu -> Gemm -> Sigmoid -> [N, C, 1, 1] -> Mul."""
    n = Net([1, 3, 6, 6])
    x = n.relu(n.conv(n.x, 3, 8, name="c0"))
    s = n.op("Flatten", [n.op("GlobalAveragePool", [x])])
    s = n.relu(n.gemm(s, 8, 3, name="fc1"))
    s = n.op("Sigmoid", [n.gemm(s, 3, 8, name="fc2")])
    if style == "reshape_literal":
        s = n.op("Reshape", [s, n.ints("sh", [-1, 8, 1, 1])], name="rs")
    else:
        s = n.op("Unsqueeze", [s, n.ints("ax", [2, 3])])
    y = n.conv(n.op("Mul", [x, s], name="gate"), 8, 4, name="c1")
    m = n.model(y)
    cg, res = check_contract(m, prunable=("c0", "fc1"))
    g = group_of(cg, "c0")
    assert set(g.producers) == {"c0", "fc2"}
    for mask, p in res:
        k = kept_count(mask, g)
        assert weight(p, "fc2.w").shape == (k, kept_count(mask, group_of(cg, "fc1")))
        if style == "reshape_literal":
            assert input_value(p, "rs", 1).tolist() == [-1, k, 1, 1]
