"""YOLOv8-style detector and segmenter, end to end through ``onnxprune.api.prune``.

The models (``models/detector.py``) are exported as Ultralytics does: fixed
batch 1 with ``imgsz`` metadata, or dynamic batch/H/W (sizes from the
metadata), with both torch exporters and through onnxslim (what Ultralytics
runs). BatchNorm stays at its default statistics except where noted, so the
legacy exporter feeds the all-zero folded biases through ``Identity`` nodes;
conv weights are Kaiming-initialised so outputs do not collapse to constants
(the equivalence check must have power: it asserts pruning moves the outputs).

For each variant and a -30% and -50% MACs target: the achieved reduction
meets the target, output shapes are unchanged (at a second size too for
dynamic exports), the pruned model computes what the original computes with
the removed channels zeroed (the masked-equivalence oracle of
``tests/oracle.py``), the convs that write the outputs stay blocked with a
reason, and >= 95% of the other conv MACs are in prunable groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from models.detector import export_yolo, head_final_weights, init_weights, yolo_detector, yolo_segmenter
from models.zoo import randomize_bn
from onnxprune.api import PruneOptions, prune
from onnxprune.flops import count
from onnxprune.groups import find_groups
from oracle import masked_model, rel_err, run

IMGSZ = 64


@dataclass(frozen=True)
class Variant:
    task: str  # detect | segment
    exporter: str  # legacy | dynamo
    dynamic: bool = False
    simplify: str = ""  # "" | onnxslim | onnxsim (both in the dev extra)
    random_bn: bool = False

    @property
    def id(self) -> str:
        parts = [self.task, self.exporter, "dynamic" if self.dynamic else "b1"]
        parts += [self.simplify] * bool(self.simplify) + ["randbn"] * self.random_bn
        return "-".join(parts)


VARIANTS = [
    Variant("detect", "legacy"),  # Ultralytics' default export minus the simplifier
    Variant("detect", "legacy", simplify="onnxslim"),  # what `yolo export format=onnx` writes
    Variant("detect", "dynamo", dynamic=True),
    Variant("segment", "legacy", dynamic=True, simplify="onnxslim"),
    Variant("segment", "dynamo", random_bn=True),
    Variant("detect", "legacy", dynamic=True, simplify="onnxsim"),  # onnxsim is in the dev extra
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("yolo")
    cache: dict = {}

    def get(v: Variant):
        if v not in cache:
            torch.manual_seed(0)
            model = init_weights((yolo_detector if v.task == "detect" else yolo_segmenter)(num_classes=8))
            if v.random_bn:
                randomize_bn(model, seed=0)
            model.eval()  # never run the model in train mode: that would move the BN statistics
            path = export_yolo(model, folder / f"{v.id}.onnx", imgsz=IMGSZ, exporter=v.exporter, dynamic=v.dynamic, simplify=v.simplify)
            heads = head_final_weights(model)
            cache[v] = (path, heads)
        return cache[v]

    return get


def _head_nodes(cg, head_weights: list[np.ndarray]) -> set[str]:
    """ONNX nodes of the head's final convs, found by their (random, BN-folded where needed) weights."""
    inits = {t.name: t for t in cg.model.graph.initializer}
    found: set[str] = set()
    for node in cg.model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if any(w.shape == h.shape and np.allclose(w, h, rtol=1e-5, atol=1e-7) for h in head_weights):
            found.add(node.name)
    return found


def _output_prunable(cg) -> dict[str, bool]:
    """Per compute node: are all its output channels in prunable groups?"""
    ok = np.zeros(cg.n_units, dtype=bool)
    for g in cg.prunable_groups:
        ok[list(g.units)] = True
    return {c.node: bool(ok[cg.unit_of_atom[c.out_atoms]].all()) for c in cg.compute}


def _macs(c) -> int:
    return c.spatial * c.kernel * len(c.out_atoms) * (c.in_fixed if c.in_atoms is None else len(c.in_atoms))


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.id)
def test_export_looks_like_ultralytics(exported, v):
    path, _ = exported(v)
    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["imgsz"] == f"[{IMGSZ}, {IMGSZ}]" and meta["task"] == v.task and meta["stride"] == "32"
    ops = {n.op_type for n in m.graph.node}
    assert {"Conv", "Sigmoid", "Mul", "Concat", "MaxPool", "Resize", "Softmax", "Reshape"} <= ops
    assert "Split" in ops or "Slice" in ops  # C2f's chunk
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    if v.dynamic:
        assert all(isinstance(d, str) for d in (dims[0], dims[2], dims[3])), dims
    else:
        assert dims == [1, 3, IMGSZ, IMGSZ]
    if v.exporter == "legacy" and not v.simplify and not v.random_bn:
        # the exporter habit the analysis must see through
        assert any(n.op_type == "Identity" for n in m.graph.node)
    assert [o.name for o in m.graph.output] == (["output0", "output1"] if v.task == "segment" else ["output0"])


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.id)
def test_analysis_blocks_only_the_output_convs(exported, v):
    path, head_weights = exported(v)
    cg = find_groups(onnx.load(str(path)))  # dynamic dims: sizes from the imgsz metadata
    heads = _head_nodes(cg, head_weights)
    expected = 6 + 1 + (4 if v.task == "segment" else 0)  # box+cls per scale, DFL, (mask coeffs per scale, proto)
    assert len(heads) == expected, sorted(heads)
    group_of_unit = {u: g for g in cg.groups for u in g.units}
    for c in cg.compute:
        if c.node in heads:
            for u in np.unique(cg.unit_of_atom[c.out_atoms]).tolist():
                g = group_of_unit.get(u)
                assert g is not None and not g.prunable and g.blocked_reason, (c.node, g)
    prunable = _output_prunable(cg)
    rest = [c for c in cg.compute if c.node not in heads]
    share = sum(_macs(c) for c in rest if prunable[c.node]) / sum(_macs(c) for c in rest)
    blocked = sorted({g.blocked_reason for g in cg.groups if not g.prunable and not set(g.producers) & heads})
    assert share >= 0.95, (f"{share:.1%} of non-head conv MACs prunable", blocked[:5])


@pytest.mark.parametrize("target", [0.3, 0.5])
@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.id)
def test_prune_keeps_outputs_and_matches_masked_original(exported, v, target):
    path, _ = exported(v)
    original = onnx.load(str(path))
    before = original.SerializeToString()
    res = prune(path, options=PruneOptions(target_flops=target), write=False)
    assert original.SerializeToString() == before
    r = res.report
    assert 1 - r.macs_after / r.macs_before >= target - 1e-9, (r.macs_before, r.macs_after)
    assert r.macs_after == count(res.model, input_shapes={"images": (1, 3, IMGSZ, IMGSZ)}).total_macs
    onnx.checker.check_model(res.model, full_check=True)

    cg = find_groups(original)
    mask = res.plan.to_mask(cg)
    assert not mask.all()
    x = _x((1, 3, IMGSZ, IMGSZ))
    got, want, orig = run(res.model, x), run(masked_model(cg, mask), x), run(original, x)
    assert [a.shape for a in got] == [a.shape for a in orig]
    for g, w, o in zip(got, want, orig):
        assert rel_err(g, w) <= 1e-4
        # the check has power: pruning moved the outputs far beyond the tolerance
        assert rel_err(w, o) > 1e-3
    if v.dynamic:  # a pruned dynamic export still runs at other sizes and batches
        x2 = _x((2, 3, 96, 128), seed=1)
        got2, want2 = run(res.model, x2), run(masked_model(cg, mask), x2)
        assert [a.shape for a in got2] == [a.shape for a in run(original, x2)]
        assert all(rel_err(g, w) <= 1e-4 for g, w in zip(got2, want2))
