"""Apply a pruning decision to the graph, returning a new model.

``apply_mask(cg, unit_kept)`` slices every constant the analysis recorded:
Conv weights on axis 0 (outputs) and 1 (inputs; the per-group positions for
grouped convs), biases, BN parameters and statistics, per-channel constants,
Gemm/MatMul rows (consumers) and columns (producers); it sets depthwise
``group`` to the kept channel count, rewrites Split sizes, Slice bounds, Pad
widths and literal channel counts in Reshape/Resize shape vectors. Stale
intermediate shapes are cleared and re-inferred; graph inputs/outputs, names,
opset and metadata are unchanged. The input model is never mutated.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .edits import PadChannels, SetGroup, ShapeEntry, SliceBounds, SliceTensor, SplitSizes
from .errors import PlanError, VerificationError
from .graph import _weightless_copy, opset_version
from .groups import ChannelGraph

log = logging.getLogger(__name__)


class _Consts:
    """Read/write constants by name: initializers or Constant nodes."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.const_nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        self.inputs = {i.name: i for i in model.graph.input}
        self.consumers = defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}

    def get(self, name: str) -> np.ndarray:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.const_nodes[name]
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
        from .graph import GraphIndex

        return GraphIndex(self.model).const(name)

    def set(self, name: str, value: np.ndarray) -> None:
        if name in self.inits:
            t = self.inits[name]
            new = numpy_helper.from_array(np.ascontiguousarray(value).astype(numpy_helper.to_array(t).dtype, copy=False), name)
            t.CopyFrom(new)
            if name in self.inputs:  # old IR: initializer also listed as input
                vi = self.inputs[name]
                dims = vi.type.tensor_type.shape.dim
                del dims[:]
                for d in value.shape:
                    dims.add().dim_value = int(d)
            return
        node = self.const_nodes[name]
        dtype = self.get(name).dtype
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.asarray(value, dtype=dtype), name)))

    def private(self, node: onnx.NodeProto, slot: int, value: np.ndarray) -> None:
        """Give ``node`` its own constant at input ``slot`` holding ``value``."""
        base = f"{node.name}__{slot}"
        name = base
        k = 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        t = numpy_helper.from_array(np.asarray(value), name)
        self.model.graph.initializer.append(t)
        self.inits[name] = self.model.graph.initializer[-1]
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name


def _set_int_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _drop_attr(node: onnx.NodeProto, name: str) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)


def apply_mask(cg: ChannelGraph, unit_kept: np.ndarray, *, reinfer: bool = True, verify: bool = True) -> onnx.ModelProto:
    """Return a new model keeping only the units set in ``unit_kept``."""
    unit_kept = np.asarray(unit_kept, dtype=bool)
    if unit_kept.shape != (cg.n_units,):
        raise VerificationError(f"mask has shape {unit_kept.shape}, expected ({cg.n_units},)")
    empty = cg.empty_segment(unit_kept)
    if empty is not None:
        raise PlanError(
            f"the plan removes every channel that passes through '{empty}', which would leave it with no output",
            fix="keep at least one channel in each Split output / channel Slice (edit the plan or lower --target-flops)",
            node=empty,
        )
    kept = cg.atom_kept(unit_kept)
    m = onnx.ModelProto()
    m.CopyFrom(cg.model)
    consts = _Consts(m)
    nodes = {n.name: n for n in m.graph.node}
    opset = opset_version(m)

    # constants: slice in place when every user slices alike, else one private copy per node
    by_node: dict[str, dict[str, dict[tuple, SliceTensor]]] = defaultdict(lambda: defaultdict(dict))
    for e in cg.edits:
        if isinstance(e, SliceTensor):
            by_node[e.tensor][e.node].setdefault(e.key(), e)
    for tensor, per_node in by_node.items():
        users = {n.name for n in consts.consumers[tensor]}
        shared = len({frozenset(v) for v in per_node.values()}) > 1 or bool(users - set(per_node))
        arr = consts.get(tensor)
        for node_name, edits in per_node.items():
            new = arr
            for e in edits.values():
                mask = kept(e.atoms)
                if not mask.all():
                    new = np.take(new, np.nonzero(mask)[0], axis=e.axis)
            if new is arr:
                continue
            if shared:
                node = nodes[node_name]
                for slot, name in enumerate(node.input):
                    if name == tensor:
                        consts.private(node, slot, new.astype(arr.dtype, copy=False))
            else:
                consts.set(tensor, new)
                break  # all users slice alike: one in-place edit serves them all

    for e in cg.edits:
        if isinstance(e, SetGroup):
            _set_int_attr(nodes[e.node], "group", int(kept(e.atoms).sum()))
        elif isinstance(e, SplitSizes):
            node = nodes[e.node]
            sizes = np.array([int(kept(p).sum()) for p in e.parts], dtype=np.int64)
            _drop_attr(node, "num_outputs")
            if opset < 13:
                _set_int_attr(node, "split", sizes.tolist())
            else:
                _drop_attr(node, "split")
                consts.private(node, 1, sizes)
        elif isinstance(e, SliceBounds):
            node = nodes[e.node]
            s = int(kept(e.atoms[: e.start]).sum())
            end = int(kept(e.atoms[: e.end]).sum())
            if opset < 10:
                starts, ends = list(_attr(node, "starts")), list(_attr(node, "ends"))
                starts[e.position], ends[e.position] = s, end
                _set_int_attr(node, "starts", starts)
                _set_int_attr(node, "ends", ends)
            else:
                for slot, full, val in ((1, e.starts, s), (2, e.ends, end)):
                    v = np.array(full, dtype=np.int64)
                    v[e.position] = val
                    consts.private(node, slot, v)
        elif isinstance(e, PadChannels):
            node = nodes[e.node]
            b, a = int(kept(e.before).sum()), int(kept(e.after).sum())
            if opset < 11:
                pads = list(_attr(node, "pads"))
                pads[e.axis], pads[e.axis + e.rank] = b, a
                _set_int_attr(node, "pads", pads)
            else:
                v = np.array(e.pads, dtype=np.int64)
                v.reshape(-1)[e.axis] = b
                v.reshape(-1)[e.axis + e.rank] = a
                consts.private(node, 1, v)
        elif isinstance(e, ShapeEntry):
            v = consts.get(e.tensor).copy()
            v.reshape(-1)[e.position] = int(kept(e.atoms).sum()) * e.factor
            node = nodes[e.node]
            if e.tensor in node.input and len(consts.consumers[e.tensor]) > 1:
                consts.private(node, list(node.input).index(e.tensor), v)
            else:
                consts.set(e.tensor, v)

    _drop_unused_initializers(m)
    del m.graph.value_info[:]
    if reinfer:
        try:
            inferred = onnx.shape_inference.infer_shapes(_weightless_copy(m), data_prop=True)  # no weight copies
            m.graph.value_info.extend(inferred.graph.value_info)
        except Exception as exc:  # inference is a convenience; ORT re-infers at load
            log.debug("shape inference after pruning failed: %s", exc)
    if verify and reinfer:
        _verify_channels(cg, m, kept)
    return m


def _drop_unused_initializers(m: onnx.ModelProto) -> None:
    """Remove initializers no node reads any more (originals replaced by private copies)."""
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    used |= {i for n in m.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH for sub in [a.g] for nn in sub.node for i in nn.input}
    declared_inputs = {i.name for i in m.graph.input}
    keep = [t for t in m.graph.initializer if t.name in used or t.name in declared_inputs]
    if len(keep) != len(m.graph.initializer):
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)


def _attr(node, name):
    from .graph import attr

    return attr(node, name)


def _verify_channels(cg: ChannelGraph, m: onnx.ModelProto, kept) -> None:
    """Every tracked tensor must have exactly the kept number of channels."""
    shapes = {}
    for vi in m.graph.value_info:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for name, (axis, atoms) in cg.tensor_maps.items():
        s = shapes.get(name)
        if s is None or axis >= len(s) or s[axis] is None:
            continue
        want = int(kept(atoms).sum())
        if s[axis] != want:
            raise VerificationError(
                f"after pruning, tensor '{name}' has {s[axis]} channels on axis {axis} but the plan keeps {want}",
                fix="this is a bug in onnxprune; please report it with the model, and use --exclude on the node meanwhile",
                node=name,
            )
