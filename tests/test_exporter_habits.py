"""Files as exporters and simplifiers write them: constants behind Identity/Cast/Reshape,
shared initializers, dynamic spatial dims with metadata, plans checkable without the analysis.

Every case checks masked equivalence (pruned == original with removed channels
zeroed), that normalization keeps the function, and that the input is untouched.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from models.export import export_onnx
from models.zoo import ZOO
from onnxprune.api import PruneOptions, analyze_model, prune
from onnxprune.errors import DataError
from onnxprune.flops import count
from onnxprune.groups import find_groups
from onnxprune.normalize import normalize_constants
from onnxprune.plan import PruningPlan
from onnxprune.rewrite import apply_mask
from oracle import masked_model, random_mask, rel_err, run

RNG = np.random.default_rng(0)


def _default_bn_export(tmp_path, name: str, exporter: str = "legacy", width: float = 0.5):
    """A zoo model with BatchNorm at its default statistics (as freshly built nets and many exports are)."""
    torch.manual_seed(0)
    ctor, shape = ZOO[name]
    model = ctor(width=width).eval()
    return export_onnx(model, tmp_path / f"{name}_{exporter}.onnx", input_shape=shape, exporter=exporter), shape


def _check_plans(cg, original: onnx.ModelProto, x: np.ndarray, seeds=(0, 1, 2)):
    full = apply_mask(cg, cg.full_mask())
    assert rel_err(run(full, x)[0], run(original, x)[0]) <= 1e-5, "normalization must keep the function"
    for seed in seeds:
        mask = random_mask(cg, np.random.default_rng(seed))
        assert not mask.all()
        pruned = apply_mask(cg, mask)
        onnx.checker.check_model(pruned, full_check=True)
        got, want = run(pruned, x)[0], run(masked_model(cg, mask), x)[0]
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-4, seed
        assert count(pruned).total_macs == cg.macs(mask)


@pytest.mark.parametrize("name", ["resnet20", "densenet_small", "resnext_small", "mobilenetv2_small"])
def test_identity_dedup_of_folded_zero_biases(tmp_path, name):
    """Bias-free conv + BN at default statistics, legacy export: zero biases reach convs through Identity."""
    path, shape = _default_bn_export(tmp_path, name)
    model = onnx.load(str(path))
    identities = [n for n in model.graph.node if n.op_type == "Identity"]
    assert identities, "the legacy exporter deduplicates the all-zero folded biases through Identity nodes"
    before = model.SerializeToString()
    cg = find_groups(model)
    assert model.SerializeToString() == before, "find_groups must not change its input"
    assert {c.op_type for c in cg.normalizations} == {"Identity"}
    assert len(cg.normalizations) == len(identities)
    blocked = [g for g in cg.groups if not g.prunable]
    assert not any("not a constant" in g.blocked_reason for g in blocked), [g.blocked_reason for g in blocked]
    assert all("graph output" in g.blocked_reason or "single channel" in g.blocked_reason for g in blocked), [g.blocked_reason for g in blocked]
    x = RNG.standard_normal((2, *shape[1:])).astype(np.float32)
    _check_plans(cg, model, x)


def test_prune_reports_normalizations(tmp_path):
    path, _ = _default_bn_export(tmp_path, "resnet20")
    r = prune(path, options=PruneOptions(target_flops=0.3, round_to=1), write=False)
    assert r.report.reduction >= 0.3
    d = r.report.to_dict()
    assert d["normalizations"] and all(n.startswith("removed Identity") for n in d["normalizations"])
    assert any(line.startswith("Normalized before pruning") and "Identity" in line for line in r.report.summary_lines())


def _conv_node(name, x, w, b, y, **attrs):
    return helper.make_node("Conv", [x, w, b] if b else [x, w], [y], name=name, pads=[1, 1, 1, 1], **attrs)


def _model(nodes, inits, *, inputs=None, out_shape=("n", 6)):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_shared_and_tied_initializers_get_private_copies():
    """Two branches share one weight (tied) and one bias; pruning them differently slices private copies."""
    inits = [
        numpy_helper.from_array(_w(8, 3, 3, 3), "W"),
        numpy_helper.from_array(_w(8), "B"),
        numpy_helper.from_array(_w(6, 8, 3, 3), "Wc"),
        numpy_helper.from_array(_w(6, 8, 3, 3), "Wd"),
    ]
    nodes = [
        _conv_node("a", "x", "W", "B", "a"),
        helper.make_node("Relu", ["a"], ["ar"], name="ra"),
        _conv_node("b", "x", "W", "B", "b"),
        helper.make_node("Sigmoid", ["b"], ["bs"], name="sb"),
        _conv_node("c", "ar", "Wc", "", "c"),
        _conv_node("d", "bs", "Wd", "", "d"),
        helper.make_node("Concat", ["c", "d"], ["y"], name="cat", axis=1),
    ]
    model = _model(nodes, inits, out_shape=("n", 12, 8, 8))
    cg = find_groups(model)
    ga = next(g for g in cg.groups if g.producers == ("a",))
    gb = next(g for g in cg.groups if g.producers == ("b",))
    assert ga.prunable and gb.prunable and ga.id != gb.id
    mask = cg.full_mask()
    mask[list(ga.units[:3])] = False
    mask[list(gb.units[-2:])] = False
    pruned = apply_mask(cg, mask)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert rel_err(run(pruned, x)[0], run(masked_model(cg, mask), x)[0]) <= 1e-5
    inits_after = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    nodes_after = {n.name: n for n in pruned.graph.node}
    wa, wb = inits_after[nodes_after["a"].input[1]], inits_after[nodes_after["b"].input[1]]
    w = numpy_helper.to_array(inits[0])
    assert np.array_equal(wa, w[3:]) and np.array_equal(wb, w[:6])
    assert nodes_after["a"].input[1] != nodes_after["b"].input[1]
    _check_plans(cg, model, x)


def test_cast_reshape_constant_chains_are_folded():
    """A float16 weight through Cast, a [1, C] bias through Reshape, a Constant bias through Identity."""
    w16 = _w(8, 3, 3, 3).astype(np.float16)
    inits = [
        numpy_helper.from_array(w16, "W16"),
        numpy_helper.from_array(_w(1, 8), "B2d"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
        numpy_helper.from_array(_w(6, 8, 3, 3), "W2"),
    ]
    nodes = [
        helper.make_node("Cast", ["W16"], ["W"], name="cast_w", to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["B2d", "flat"], ["B"], name="reshape_b"),
        _conv_node("a", "x", "W", "B", "a"),
        helper.make_node("Relu", ["a"], ["ar"], name="ra"),
        helper.make_node("Constant", [], ["B2c"], name="const_b2", value=numpy_helper.from_array(_w(6), "v")),
        helper.make_node("Identity", ["B2c"], ["B2"], name="id_b2"),
        _conv_node("c", "ar", "W2", "B2", "c"),
        helper.make_node("Relu", ["c"], ["cr"], name="rc"),
        helper.make_node("ReduceMean", ["cr"], ["y"], name="gap", axes=[2, 3], keepdims=0),
    ]
    model = _model(nodes, inits)
    cg = find_groups(model)
    kinds = {(c.op_type, c.kind) for c in cg.normalizations}
    assert kinds == {("Cast", "fold"), ("Reshape", "fold"), ("Identity", "identity")}
    assert next(g for g in cg.groups if g.producers == ("a",)).prunable
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    _check_plans(cg, model, x)
    m2, changes = normalize_constants(model)
    assert len(changes) == 3 and m2 is not model
    assert not any(n.op_type in ("Cast", "Reshape", "Identity") for n in m2.graph.node)
    assert normalize_constants(m2)[1] == () and normalize_constants(m2)[0] is m2


def test_chains_to_graph_inputs_or_runtime_ops_stay_blocked_with_the_node_named():
    inits = [numpy_helper.from_array(_w(8, 3, 3, 3), "W"), numpy_helper.from_array(_w(8), "B0"), numpy_helper.from_array(_w(6, 8, 3, 3), "W2"),
             numpy_helper.from_array(_w(6, 6, 3, 3), "W3")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8]), helper.make_tensor_value_info("bias_in", TensorProto.FLOAT, [8]),
              helper.make_tensor_value_info("gain", TensorProto.FLOAT, [6])]
    nodes = [
        helper.make_node("Identity", ["bias_in"], ["B"], name="id_from_input"),
        _conv_node("a", "x", "W", "B", "a"),
        helper.make_node("Relu", ["a"], ["ar"], name="ra"),
        helper.make_node("Mul", ["B0", "B0"], ["B0sq"], name="sq"),  # constant-only, but not an op normalization folds
        helper.make_node("Slice", ["B0sq", "s0", "s6"], ["B0s"], name="sl"),
        helper.make_node("Mul", ["B0s", "gain"], ["B2"], name="scale_by_input"),
        _conv_node("c", "ar", "W2", "B2", "c"),
        helper.make_node("Relu", ["c"], ["cr"], name="rc"),
        _conv_node("e", "cr", "W3", "", "e"),
        helper.make_node("ReduceMean", ["e"], ["y"], name="gap", axes=[2, 3], keepdims=0),
    ]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([6], np.int64), "s6")]
    model = _model(nodes, inits, inputs=inputs)
    cg = find_groups(model)
    ga = next(g for g in cg.groups if g.producers == ("a",))
    assert not ga.prunable
    assert "id_from_input" in ga.blocked_reason and "graph input" in ga.blocked_reason and "'bias_in'" in ga.blocked_reason
    gc = next(g for g in cg.groups if g.producers == ("c",))
    assert not gc.prunable and "Mul 'scale_by_input'" in gc.blocked_reason


def _dynamic_hw_export(tmp_path, imgsz: str | None):
    torch.manual_seed(0)
    model = ZOO["resnet20"][0](width=0.5).eval()
    path = tmp_path / "dyn.onnx"
    with torch.no_grad():
        torch.onnx.export(model, torch.randn(1, 3, 32, 32), str(path), input_names=["images"], output_names=["out"], dynamo=False,
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "out": {0: "batch"}}, opset_version=17)
    m = onnx.load(str(path))
    if imgsz is not None:
        p = m.metadata_props.add()
        p.key, p.value = "imgsz", imgsz
    onnx.save(m, str(path))
    return path


def test_dynamic_spatial_dims_from_metadata(tmp_path):
    path = _dynamic_hw_export(tmp_path, "[32, 32]")
    cg, costs = analyze_model(path)
    assert cg.prunable_groups and costs.total_macs > 0
    r = prune(path, options=PruneOptions(target_flops=0.3, round_to=1), write=False)
    assert r.report.detail["input_shapes"] == {"shapes": {"images": [1, 3, 32, 32]}, "source": "metadata 'imgsz'"}
    assert r.report.reduction >= 0.3
    # the same MACs as an explicit --input-shape
    cg2, costs2 = analyze_model(path, input_shapes={"images": (1, 3, 32, 32)})
    assert costs2.total_macs == costs.total_macs
    # metadata that disagrees with the data names both
    np.savez(tmp_path / "d24.npz", x=RNG.standard_normal((4, 3, 24, 24)).astype(np.float32))
    with pytest.raises(DataError, match=r"metadata 'imgsz'.*3x32x32.*--data.*3x24x24"):
        prune(path, options=PruneOptions(target_flops=0.3), data=str(tmp_path / "d24.npz"), write=False)
    # --input-shape overrides the metadata
    r3 = prune(path, options=PruneOptions(target_flops=0.3, round_to=1, input_shapes={"images": (1, 3, 24, 24)}),
               data=str(tmp_path / "d24.npz"), write=False)
    assert r3.report.detail["input_shapes"]["source"] == "--input-shape"


def test_dynamic_spatial_dims_from_data_without_metadata(tmp_path):
    path = _dynamic_hw_export(tmp_path, None)
    np.savez(tmp_path / "d.npz", x=RNG.standard_normal((8, 3, 32, 32)).astype(np.float32))
    r = prune(path, options=PruneOptions(target_flops=0.3, round_to=1, strategy="uniform", calibrate=0), data=str(tmp_path / "d.npz"), write=False)
    assert r.report.detail["input_shapes"] == {"shapes": {"images": [1, 3, 32, 32]}, "source": "--data"}


def _rows_match(new: np.ndarray, rows: np.ndarray) -> bool:
    """``new`` == ``rows`` with some input channels (axis 1) dropped, order kept (the consumer side of other groups)."""
    if new.shape[0] != rows.shape[0]:
        return False
    j = 0
    for c in range(new.shape[1]):
        while j < rows.shape[1] and not np.array_equal(rows[:, j], new[:, c]):
            j += 1
        if j == rows.shape[1]:
            return False
        j += 1
    return True


@pytest.mark.parametrize("name", ["split_net", "inception_small", "resnext_small"])
def test_plan_is_checkable_without_the_analysis(tmp_path, name):
    """Slicing each producer conv's weight rows by the plan's own numbering gives the pruned weights."""
    path, _ = _default_bn_export(tmp_path, name, "dynamo")
    model = onnx.load(str(path))
    cg = find_groups(model)
    mask = random_mask(cg, np.random.default_rng(5), max_ratio=0.6)
    plan = PruningPlan.from_mask(cg, mask)
    d = json.loads(json.dumps(plan.to_dict()))
    pruned = apply_mask(cg, mask)
    orig_w = {n.name: numpy_helper.to_array(next(t for t in cg.model.graph.initializer if t.name == n.input[1]))
              for n in cg.model.graph.node if n.op_type == "Conv"}
    new_w = {n.name: numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == n.input[1]))
             for n in pruned.graph.node if n.op_type == "Conv"}
    removed: dict[str, set] = {}
    checked = 0
    for g in d["groups"]:
        assert set(g["kept_by_producer"]) == set(g["removed_by_producer"])
        for p, rem in g["removed_by_producer"].items():
            kept = g["kept_by_producer"][p]
            assert not set(kept) & set(rem)
            removed.setdefault(p, set()).update(rem)
    for p, rem in removed.items():
        if p not in orig_w:
            continue
        keep = [c for c in range(orig_w[p].shape[0]) if c not in rem]
        assert _rows_match(new_w[p], orig_w[p][keep]), p
        checked += 1
    assert checked >= 2
    # the plan re-applies, and a tampered kept_by_producer is refused with the producer named
    assert np.array_equal(PruningPlan.from_dict(d).to_mask(cg), mask)
    g0 = d["groups"][0]
    p0 = next(iter(g0["kept_by_producer"]))
    g0["kept_by_producer"][p0] = g0["kept_by_producer"][p0][:-1]
    from onnxprune.errors import PlanError

    with pytest.raises(PlanError, match="kept_by_producer"):
        PruningPlan.from_dict(d).to_mask(cg)


class _ViewMidNet(torch.nn.Module):
    """conv -> view(1, C, H*W) -> softmax over positions -> view back -> conv: channels pass the Reshapes unchanged."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        n, c, h, w = y.shape
        z = torch.softmax(y.reshape(n, c, h * w), dim=2).reshape(n, c, h, w)
        return self.b(z).mean((2, 3))


def test_fixed_batch_reshape_keeping_channels_is_not_blocked(tmp_path):
    """A fixed-batch export writes literal batch 1 in Reshape targets; shapes must say 1 too (not a symbolic batch)."""
    torch.manual_seed(0)
    path = tmp_path / "view1.onnx"
    with torch.no_grad():
        torch.onnx.export(_ViewMidNet().eval(), torch.randn(1, 3, 8, 8), str(path), dynamo=False, opset_version=17)
    model = onnx.load(str(path))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][0] == 1
    cg = find_groups(model)
    g = next(g for g in cg.groups if any("a" in p.split("/") or p.endswith("a/Conv") for p in g.producers))
    assert g.prunable, g.blocked_reason
    _check_plans(cg, model, RNG.standard_normal((1, 3, 8, 8)).astype(np.float32))


def test_fixed_batch_detector_shapes_keep_the_real_batch(tmp_path):
    """Ultralytics-style fixed batch 1: where ONNX inference loses the batch (Split/Concat), the dry run's 1 is kept,
    so the head's ``Reshape(1, C, H*W)`` is read as keeping channels (blocked only because they reach the output)."""
    from models.detector import export_yolo, init_weights, yolo_detector

    path = export_yolo(init_weights(yolo_detector(width=0.25, num_classes=8)), tmp_path / "det.onnx", imgsz=64, exporter="legacy")
    cg = find_groups(onnx.load(str(path)))
    reasons = [g.blocked_reason for g in cg.groups if not g.prunable]
    assert not any("None" in r for r in reasons), reasons
    assert sum("graph output" in r for r in reasons) >= 1
