"""Test oracle: the original model with removed channels masked at every consumer.

Pruning is correct when the pruned model computes exactly what the original
computes after zeroing, in every Conv/ConvTranspose/Gemm/MatMul, the weights
that read a removed input channel. This is written independently of the
rewrite (it only zeroes; it never slices or changes a shape).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.graph import attr


def input_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 1
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "Gemm":
        return 1 if attr(node, "transB", 0) else 0
    return 0  # MatMul


def masked_model(cg, unit_kept: np.ndarray) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(cg.model)
    nodes = {n.name: n for n in m.graph.node}
    inits = {t.name: t for t in m.graph.initializer}
    kept = cg.atom_kept(unit_kept)
    for c in cg.compute:
        if c.in_atoms is None:
            continue
        gone = ~kept(c.in_atoms)
        if not gone.any():
            continue
        node = nodes[c.node]
        w = numpy_helper.to_array(inits[node.input[1]]).copy()
        idx = [slice(None)] * w.ndim
        idx[input_axis(node)] = np.nonzero(gone)[0]
        w[tuple(idx)] = 0
        # a private zeroed copy: a weight shared with another node must stay intact there
        name = f"{node.input[1]}__masked_{node.name}"
        m.graph.initializer.append(numpy_helper.from_array(w, name))
        node.input[1] = name
    return m


def random_mask(cg, rng: np.random.Generator, *, max_ratio: float = 0.8) -> np.ndarray:
    """Remove a random subset (never all) of each prunable group's units."""
    keep = cg.full_mask()
    for g in cg.prunable_groups:
        r = rng.uniform(0, max_ratio)
        n_remove = min(g.channels - 1, int(round(r * g.channels)))
        if n_remove <= 0:
            continue
        gone = rng.choice(np.array(g.units), size=n_remove, replace=False)
        keep[gone] = False
    for _, units in cg.segments:  # a valid plan leaves every Split output / channel Slice non-empty
        if len(units) and not keep[units].any():
            keep[rng.choice(units)] = True
    return keep


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
