"""Property tests: random CNN graphs, random masks, the pruning contract.

Hypothesis builds random ``onnx.helper`` CNNs from blocks (conv+relu,
conv+BN, depthwise with channel multiplier, grouped conv, residual add, SE
gating, concat of two branches, split+concat, max pooling) and a head
(GAP+Flatten+Gemm, Flatten+Gemm, FC->FC, or a plain conv), with channel counts
in 4..24 and spatial sizes in 4..12. For random masks the pruned model must
equal the oracle (original with removed channels zeroed at every consumer),
pass the full ONNX checker, and have ``cg.macs(mask)`` MACs; the full mask
must reproduce the original outputs bit for bit, and nothing mutates its input.

``derandomize=True`` keeps CI deterministic.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import PlanError
from onnxprune.flops import count
from onnxprune.groups import find_groups
from onnxprune.rewrite import apply_mask
from tests.oracle import masked_model, random_mask, rel_err, run

BLOCKS = (
    "conv_relu", "conv_bn", "depthwise", "grouped", "residual", "se", "concat2", "split_concat", "maxpool",
    "affine", "deconv", "resize", "pad_channels",
)  # fmt: skip
HEADS = ("gap_gemm", "flatten_gemm", "fc_fc", "conv", "reshape_gemm", "reducemean_gemm")
CH = st.integers(4, 24)


class _Builder:
    """Accumulates nodes and seeded random initializers for one random graph."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0
        self.split_parts: list[tuple[str, int]] = []  # (Split output, its size): keep >= 1 channel each

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def init(self, base: str, arr) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        name = self.name(op_type.lower())
        outs = [f"{name}_o{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=3, group=1, bias=True):
        fan_in = cin // group * k * k
        w = self.init("w", (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32))
        ins = [x, w] + ([self.init("b", self.rng.normal(0, 0.1, cout).astype(np.float32))] if bias else [])
        return self.op("Conv", ins, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)

    def bn(self, x, c):
        r = self.rng
        parts = [r.uniform(0.5, 1.5, c), r.normal(0, 0.3, c), r.normal(0, 0.5, c), r.uniform(0.3, 2.0, c)]
        return self.op("BatchNormalization", [x] + [self.init("bn", p.astype(np.float32)) for p in parts], epsilon=1e-5)

    def relu(self, x):
        return self.op("Relu", [x])

    def gemm(self, x, k, m):
        w = self.init("fw", (self.rng.standard_normal((m, k)) * np.sqrt(2.0 / k)).astype(np.float32))
        return self.op("Gemm", [x, w, self.init("fb", self.rng.normal(0, 0.1, m).astype(np.float32))], transB=1)

    def ints(self, vals) -> str:
        return self.init("i", np.asarray(vals, dtype=np.int64))


@st.composite
def random_cnn(draw):
    """A random CNN as ``(model, split_parts, input_shape)``."""
    opset = draw(st.sampled_from([13, 18]))
    b = _Builder(draw(st.integers(0, 2**31 - 1)))
    cin = draw(st.integers(1, 4))
    hw_in = hw = draw(st.integers(4, 12))
    symbolic = draw(st.booleans())
    x, c = "x", cin
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(BLOCKS))
        event(f"block {kind}")
        if kind == "conv_relu":
            cout = draw(CH)
            x, c = b.relu(b.conv(x, c, cout, k=draw(st.sampled_from([1, 3])))), cout
        elif kind == "conv_bn":
            cout = draw(CH)
            x = b.bn(b.conv(x, c, cout, bias=draw(st.booleans())), cout)
            x, c = (b.relu(x) if draw(st.booleans()) else x), cout
        elif kind == "depthwise":
            mult = draw(st.sampled_from([1, 2])) if 2 * c <= 24 else 1
            x, c = b.relu(b.conv(x, c, c * mult, group=c, bias=draw(st.booleans()))), c * mult
        elif kind == "grouped":
            divs = [g for g in (2, 3, 4) if c % g == 0]
            if not divs:
                continue
            g = draw(st.sampled_from(divs))
            cout = g * draw(st.integers(max(1, -(-4 // g)), 24 // g))
            x, c = b.relu(b.conv(x, c, cout, group=g)), cout
        elif kind == "residual":
            y = b.conv(b.relu(b.conv(x, c, c)), c, c)
            if draw(st.booleans()):  # projection shortcut
                cout = draw(CH)
                y2 = b.relu(b.conv(x, c, cout, k=1))
                y = b.conv(b.relu(y), c, cout, k=1)
                x, c = b.relu(b.op("Add", [y2, y])), cout
            else:
                x = b.relu(b.op("Add", [x, y]))
        elif kind == "se":
            r = max(2, c // 4)
            s = b.relu(b.conv(b.op("GlobalAveragePool", [x]), c, r, k=1))
            s = b.op("Sigmoid", [b.conv(s, r, c, k=1)])
            x = b.op("Mul", [x, s] if draw(st.booleans()) else [s, x])
        elif kind == "concat2":
            ca, cb = draw(CH), draw(CH)
            if ca + cb > 32:
                continue
            ya = b.relu(b.conv(x, c, ca))
            yb = b.relu(b.bn(b.conv(x, c, cb, k=1), cb))
            x, c = b.op("Concat", [ya, yb], axis=1), ca + cb
        elif kind == "split_concat":
            cmid = draw(CH)
            y = b.relu(b.conv(x, c, cmid, k=1))
            s0 = draw(st.integers(1, cmid - 1))
            if opset >= 18 and cmid % 2 == 0 and draw(st.booleans()):
                s0 = cmid // 2
                parts = b.op("Split", [y], n_out=2, axis=1, num_outputs=2)
            else:
                parts = b.op("Split", [y, b.ints([s0, cmid - s0])], n_out=2, axis=1)
            b.split_parts += [(parts[0], s0), (parts[1], cmid - s0)]
            if draw(st.booleans()):  # pure channel permutation
                x, c = b.op("Concat", [parts[1], parts[0]], axis=1), cmid
            else:
                ca, cb = draw(CH), draw(CH)
                ya = b.relu(b.conv(parts[0], s0, ca))
                yb = b.relu(b.conv(parts[1], cmid - s0, cb, k=1))
                x, c = b.op("Concat", [ya, yb], axis=1), ca + cb
        elif kind == "maxpool":
            if hw >= 4 and draw(st.booleans()):
                x, hw = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), hw // 2
            else:
                x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
        elif kind == "affine":  # per-channel scale and shift constants, as unfused exports write
            x = b.op("Mul", [x, b.init("s", b.rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32))])
            x = b.op("Add", [b.init("t", b.rng.normal(0, 0.3, (c, 1, 1)).astype(np.float32)), x])
        elif kind == "resize":  # nearest 2x upsampling, by scales or by sizes holding C
            if hw > 6:
                continue
            roi = "" if opset >= 18 else b.init("roi", np.zeros(0, dtype=np.float32))
            if not symbolic and draw(st.booleans()):  # sizes [N, C, 2H, 2W]: C is a literal to rewrite
                ins = [x, roi, b.init("sc", np.zeros(0, dtype=np.float32)), b.ints([2, c, 2 * hw, 2 * hw])]
            else:
                ins = [x, roi, b.init("sc", np.array([1, 1, 2, 2], dtype=np.float32))]
            x, hw = b.op("Resize", ins, mode="nearest"), hw * 2
        elif kind == "pad_channels":  # zero channels added on the channel axis, then a conv of the padded width
            before, after = draw(st.integers(0, 3)), draw(st.integers(1, 3))
            if opset >= 18 and draw(st.booleans()):
                x = b.op("Pad", [x, b.ints([before, after]), "", b.ints([1])])
            else:
                x = b.op("Pad", [x, b.ints([0, before, 0, 0, 0, after, 0, 0])])
            c += before + after
            if draw(st.booleans()):  # residual with a conv of the padded width
                x = b.relu(b.op("Add", [x, b.conv(x, c, c)]))
        elif kind == "deconv":  # ConvTranspose (group 1) upsampling, as in decoders
            if hw > 6:
                continue
            cout = draw(CH)
            w = b.init("dw", (b.rng.standard_normal((c, cout, 2, 2)) * np.sqrt(1.0 / c)).astype(np.float32))
            bias = b.init("db", b.rng.normal(0, 0.1, cout).astype(np.float32))
            x, c, hw = b.relu(b.op("ConvTranspose", [x, w, bias], kernel_shape=[2, 2], strides=[2, 2])), cout, hw * 2
    head = draw(st.sampled_from(HEADS))
    event(f"head {head}")
    ncls = draw(st.integers(2, 10))
    if head == "gap_gemm":
        y = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), c, ncls)
    elif head == "flatten_gemm":
        y = b.gemm(b.op("Flatten", [x], axis=1), c * hw * hw, ncls)
    elif head == "fc_fc":
        hidden = draw(CH)
        y = b.relu(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), c, hidden))
        y = b.gemm(y, hidden, ncls)
    elif head == "reshape_gemm":  # [N, C, H, W] -> [N, C*H*W]: literal to rewrite, or [0, -1]
        literal = not symbolic and draw(st.booleans())
        y = b.op("Reshape", [x, b.ints([-1, c * hw * hw] if literal else [0, -1])])
        y = b.gemm(y, c * hw * hw, ncls)
    elif head == "reducemean_gemm":  # dynamo-style global pooling
        if opset >= 18:
            y = b.op("ReduceMean", [x, b.ints([2, 3])], keepdims=0)
        else:
            y = b.op("ReduceMean", [x], axes=[-2, -1], keepdims=0)
        y = b.gemm(y, c, ncls)
    else:
        y = b.conv(x, c, ncls, k=1)
    graph = helper.make_graph(
        b.nodes,
        "random_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N" if symbolic else 2, cin, hw_in, hw_in])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)  # the full checker wants output shapes
    return model, tuple(b.split_parts), (2, cin, hw_in, hw_in)


def _emptied_split_parts(cg, mask, split_parts) -> list[str]:
    """The Split outputs that ``mask`` leaves without any channel."""
    kept = cg.atom_kept(mask)
    return [name for name, _size in split_parts if not kept(cg.tensor_maps[name][1]).any()]


def _keep_split_parts(cg, mask, split_parts) -> None:
    """Keep one channel of every Split output: ``apply_mask`` refuses a mask that empties one
    (a PlanError, asserted in the test; allocation never builds such a mask)."""
    for name in _emptied_split_parts(cg, mask, split_parts):
        _, atoms = cg.tensor_maps[name]
        mask[cg.unit_of_atom[atoms[0]]] = True


def _draw_mask(cg, rng, mode: str, max_ratio: float) -> np.ndarray:
    """``random``: a random share of every prunable group; ``min``: one unit left in
    every prunable group; ``one_group``: a random cut of one group only."""
    if mode == "random" or not cg.prunable_groups:
        return random_mask(cg, rng, max_ratio=max_ratio)
    mask = cg.full_mask()
    if mode == "min":
        for g in cg.prunable_groups:
            mask[list(g.units)] = False
            mask[g.units[int(rng.integers(g.channels))]] = True
        return mask
    g = cg.prunable_groups[int(rng.integers(len(cg.prunable_groups)))]
    n = int(rng.integers(1, g.channels))
    mask[rng.choice(np.array(g.units), size=n, replace=False)] = False
    return mask


def _without_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    return m


SETTINGS = dict(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@settings(max_examples=200, **SETTINGS)
@given(random_cnn(), st.integers(0, 2**32 - 1), st.floats(0.1, 0.95), st.sampled_from(["random", "min", "one_group"]))
def test_random_cnn_masks_match_oracle(case, mask_seed, max_ratio, mode):
    model, split_parts, shape = case
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    cg = find_groups(model)
    assert cg.total_macs == count(model).total_macs
    event(f"prunable groups: {min(len(cg.prunable_groups), 5)}{'+' if len(cg.prunable_groups) >= 5 else ''}")
    event(f"blocked groups: {min(len(cg.groups) - len(cg.prunable_groups), 3)}")
    rng = np.random.default_rng(mask_seed)
    x = rng.standard_normal(shape).astype(np.float32)
    for _ in range(2):
        mask = _draw_mask(cg, rng, mode, max_ratio)
        emptied = _emptied_split_parts(cg, mask, split_parts)
        if emptied:
            event("mask empties a Split output: refused")
            with pytest.raises(PlanError, match="removes every channel that passes through") as info:
                apply_mask(cg, mask)
            assert info.value.node in {name.rsplit("_o", 1)[0] for name in emptied}  # the Split node
            _keep_split_parts(cg, mask, split_parts)
            assert not _emptied_split_parts(cg, mask, split_parts)
        pruned = apply_mask(cg, mask)
        onnx.checker.check_model(pruned, full_check=True)
        want, got = run(masked_model(cg, mask), x), run(pruned, x)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            assert rel_err(a, b) <= 1e-4, rel_err(a, b)
        assert cg.macs(mask) == count(pruned).total_macs
    assert model.SerializeToString() == before


@settings(max_examples=200, **SETTINGS)
@given(random_cnn())
def test_full_mask_is_identity_and_inputs_unchanged(case):
    model, _, shape = case
    before = model.SerializeToString()
    cg = find_groups(model)
    assert model.SerializeToString() == before
    cg_model_before = cg.model.SerializeToString()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    full = apply_mask(cg, cg.full_mask())
    want = run(model, x)
    # without the re-inferred value_info, the outputs are bit for bit the original's ...
    for a, b in zip(run(_without_value_info(full), x), want):
        np.testing.assert_array_equal(a, b)
    # ... with it, ORT may pick other kernels (last-bit differences only)
    for a, b in zip(run(full, x), want):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-6
    assert cg.macs(cg.full_mask()) == count(full).total_macs == count(model).total_macs
    # a real cut must not touch the input either
    apply_mask(cg, random_mask(cg, np.random.default_rng(1)))
    assert model.SerializeToString() == before
    assert cg.model.SerializeToString() == cg_model_before
