"""Multiply-accumulates (MACs) and parameters per layer, the literature's way.

Convention (stated in every output): MACs of Conv, ConvTranspose, Gemm and
MatMul-with-constant-weight only, per sample (the batch axis is excluded), no
bias, BatchNorm or activation terms. FLOPs = 2 x MACs.

* Conv, weight ``[Cout, Cin/g, k...]``, output ``[N, Cout, s...]``:
  ``MACs = Cout * prod(s) * (Cin/g) * prod(k)``.
* ConvTranspose, weight ``[Cin, Cout/g, k...]``, input ``[N, Cin, s...]``:
  ``MACs = Cin * prod(s) * (Cout/g) * prod(k)`` (every input pixel scatters a kernel).
* Gemm ``[N, K] x [K, M]``: ``MACs = K * M``. MatMul ``[N, ..., K] x [K, M]``:
  ``MACs = prod(...) * K * M``.

Example: ``count(load_model("vgg16.onnx")).total_macs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx

from .errors import ShapeError
from .graph import GraphIndex, attr, infer_shapes, node_label

CONVENTION = "MACs = multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul per sample (no bias/BN/activations); FLOPs = 2 x MACs"
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Geometry:
    """Shape facts of one compute node: ``macs = spatial * kernel * cout * cin / group``.

    ``cin``/``cout`` are the channel (feature) counts on the pruned axes;
    ``group`` is 1 for Gemm/MatMul.
    """

    spatial: int
    kernel: int
    cin: int
    cout: int
    group: int

    @property
    def macs(self) -> int:
        return self.spatial * self.kernel * self.cout * (self.cin // self.group)


@dataclass(frozen=True)
class LayerCost:
    name: str
    op_type: str
    output_shape: tuple
    macs: int
    params: int
    geometry: Geometry


@dataclass(frozen=True)
class CostReport:
    layers: tuple[LayerCost, ...]

    @property
    def total_macs(self) -> int:
        return sum(l.macs for l in self.layers)

    @property
    def conv_macs(self) -> int:
        return sum(l.macs for l in self.layers if l.op_type in ("Conv", "ConvTranspose"))

    @property
    def fc_macs(self) -> int:
        return sum(l.macs for l in self.layers if l.op_type in ("Gemm", "MatMul"))

    @property
    def total_params(self) -> int:
        return sum(l.params for l in self.layers)

    def by_name(self) -> dict[str, LayerCost]:
        return {l.name: l for l in self.layers}


def is_compute(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """Conv/ConvTranspose/Gemm always; MatMul only with a constant 2-D weight."""
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        return True
    if node.op_type == "MatMul" and len(node.input) == 2:
        w = index.const(node.input[1])
        return w is not None and w.ndim == 2
    return False


def shapes_needed(model: onnx.ModelProto, index: GraphIndex | None = None) -> list[str]:
    """Tensors whose shapes the cost model needs."""
    index = index or GraphIndex(model)
    need = []
    for n in model.graph.node:
        if not is_compute(n, index):
            continue
        if n.op_type == "ConvTranspose":
            need.append(n.input[0])
        elif n.op_type == "MatMul":
            need.append(n.input[0])
        need.append(n.output[0])
    return need


def _size(index: GraphIndex, name: str, shapes: Mapping[str, tuple]) -> int:
    if not name:
        return 0
    if name in index.initializers:
        return int(np.prod(index.initializers[name].dims, dtype=np.int64))
    v = index.const(name)
    return int(v.size) if v is not None else 0


def geometry(node: onnx.NodeProto, index: GraphIndex, shapes: Mapping[str, tuple]) -> Geometry:
    """Geometry of a compute node; raises :class:`ShapeError` naming the node when shapes are missing."""

    def shape_of(name: str) -> tuple:
        s = shapes.get(name)
        if s is None or any(d is None for d in s[1:]):
            raise ShapeError(
                f"shape of '{name}' (at node '{node_label(node)}') is unknown",
                fix="pass --input-shape NAME:1x3xHxW for the model's inputs",
                node=node_label(node),
            )
        return s

    wname = node.input[1]
    w_shape = shapes.get(wname)
    if w_shape is None:
        w = index.const(wname)
        w_shape = tuple(w.shape) if w is not None else shape_of(wname)
    op = node.op_type
    if op == "Conv":
        out = shape_of(node.output[0])
        g = int(attr(node, "group", 1))
        cout, cin_g = int(w_shape[0]), int(w_shape[1])
        return Geometry(math.prod(out[2:]), math.prod(w_shape[2:]), cin_g * g, cout, g)
    if op == "ConvTranspose":
        inp = shape_of(node.input[0])
        g = int(attr(node, "group", 1))
        cin, cout_g = int(w_shape[0]), int(w_shape[1])
        # macs = Cin * prod(s_in) * Cout/g * k  == spatial*kernel*cout*cin/group with cout:=Cout
        return Geometry(math.prod(inp[2:]), math.prod(w_shape[2:]), cin, cout_g * g, g)
    if op == "Gemm":
        trans_b = int(attr(node, "transB", 0))
        k, m = (w_shape[1], w_shape[0]) if trans_b else (w_shape[0], w_shape[1])
        return Geometry(1, 1, int(k), int(m), 1)
    if op == "MatMul":
        inp = shape_of(node.input[0])
        lead = math.prod(inp[1:-1]) if len(inp) > 2 else 1
        return Geometry(int(lead), 1, int(w_shape[0]), int(w_shape[1]), 1)
    raise ValueError(op)


def count(
    model: onnx.ModelProto,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    shapes: Mapping[str, tuple] | None = None,
) -> CostReport:
    """Per-layer MACs and parameters of ``model`` (see module docstring for the convention)."""
    index = GraphIndex(model)
    if shapes is None:
        if input_shapes is None:  # dynamic spatial dims: the file's metadata (Ultralytics imgsz) when present
            from .input_shapes import metadata_shapes

            input_shapes = metadata_shapes(model)
        shapes = infer_shapes(model, input_shapes=input_shapes, need=shapes_needed(model, index))
    layers = []
    for k, node in enumerate(model.graph.node):
        if not is_compute(node, index):
            continue
        geo = geometry(node, index, shapes)
        params = _size(index, node.input[1], shapes) + (_size(index, node.input[2], shapes) if len(node.input) > 2 else 0)
        out_shape = shapes.get(node.output[0], ())
        layers.append(LayerCost(node.name or f"{node.op_type}_{k}", node.op_type, tuple(out_shape), geo.macs, params, geo))
    return CostReport(tuple(layers))
