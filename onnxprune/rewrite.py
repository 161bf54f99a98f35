"""Apply a pruning decision to the graph, returning a new model.

``apply_mask(cg, unit_kept)`` slices every constant the analysis recorded:
Conv weights on axis 0 (outputs) and 1 (inputs; the per-group positions for
grouped convs), biases, BN parameters and statistics, per-channel constants,
Gemm/MatMul rows (consumers) and columns (producers); it sets depthwise
``group`` to the kept channel count, rewrites Split sizes, Slice bounds, Pad
widths and literal channel counts in Reshape/Resize shape vectors. Stale
intermediate shapes are cleared and re-inferred; graph inputs/outputs, names,
opset and metadata are unchanged. The input model is never mutated, and the
output shares nothing with it (protobuf messages cannot share parts): it is
built from a skeleton of the input, each sliced weight cut block by block from
its source, each other initializer copied once; lazy tensors (see
:mod:`onnxprune.tensors`) that no edit touches stay references to their file.
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
from .tensors import fill_from_array, skeleton, tensor_nbytes, tensor_value, write_sliced

log = logging.getLogger(__name__)


class _Consts:
    """Constants of the output model ``m`` (a skeleton of ``src``): read, edit, write.

    Initializer edits are recorded, not applied: a chain of ``np.take`` per
    axis (:meth:`set_slice`, :meth:`private_slice`) or a new small value
    (:meth:`set`, :meth:`private`). :meth:`write` then adds every initializer
    ``m`` still uses, one at a time: unchanged ones copied from ``src`` (lazy
    ones stay references to their file), edited ones built from their source.
    ``Constant`` nodes are edited in ``m``'s own node copies.
    """

    def __init__(self, src: onnx.ModelProto, m: onnx.ModelProto):
        self.m = m
        self.tensors = list(src.graph.initializer)
        self.inits = {t.name: k for k, t in enumerate(self.tensors)}  # the last of duplicate names wins
        self.const_nodes = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
        self.inputs = {i.name: i for i in m.graph.input}
        self.consumers = defaultdict(list)
        for n in m.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.names = set(self.inits) | {o for n in m.graph.node for o in n.output}
        self.pending: dict[str, tuple] = {}  # name -> ("takes", {axis: idx}) | ("value", array)
        self.privates: list[tuple[str, int, tuple]] = []  # (name, source index or -1, pending)

    def tensor(self, name: str) -> onnx.TensorProto:
        return self.tensors[self.inits[name]]

    def get(self, name: str) -> np.ndarray:
        if name in self.pending:
            return self._realize(self.tensor(name), self.pending[name])
        if name in self.inits:
            return tensor_value(self.tensor(name))
        node = self.const_nodes[name]
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
        from .graph import GraphIndex

        return GraphIndex(self.m).const(name)

    @staticmethod
    def _realize(t: onnx.TensorProto, pending: tuple) -> np.ndarray:
        kind, what = pending
        if kind == "value":
            return what
        arr = tensor_value(t)
        for axis, idx in what.items():
            arr = np.take(arr, idx, axis=axis)
        return arr

    def _set_input_dims(self, name: str, shape) -> None:
        if name in self.inputs:  # old IR: initializer also listed as input
            dims = self.inputs[name].type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dims.add().dim_value = int(d)

    def set(self, name: str, value: np.ndarray) -> None:
        if name in self.inits:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor(name).data_type)
            self.pending[name] = ("value", np.ascontiguousarray(value).astype(dtype, copy=False))
            self._set_input_dims(name, np.shape(value))
            return
        node = self.const_nodes[name]
        dtype = self.get(name).dtype
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.asarray(value, dtype=dtype), name)))

    def _takes(self, name: str, takes: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        rank = len(self.tensor(name).dims)
        return {int(a) % rank if rank else int(a): idx for a, idx in takes.items()}

    def set_slice(self, name: str, takes: dict[int, np.ndarray]) -> None:
        """Replace constant ``name`` by its slice (for every user)."""
        if name not in self.inits or name in self.pending:
            self.set(name, _take_chain(self.get(name), takes))
            return
        takes = self._takes(name, takes)
        self.pending[name] = ("takes", takes)
        dims = list(self.tensor(name).dims)
        self._set_input_dims(name, [len(takes[a]) if a in takes else d for a, d in enumerate(dims)])

    def private_slice(self, node: onnx.NodeProto, slot: int, name: str, takes: dict[int, np.ndarray]) -> None:
        """Give ``node`` its own slice of constant ``name`` at input ``slot``."""
        if name not in self.inits or name in self.pending:
            self.private(node, slot, _take_chain(self.get(name), takes))
            return
        self._private(node, slot, self.inits[name], ("takes", self._takes(name, takes)))

    def private(self, node: onnx.NodeProto, slot: int, value: np.ndarray) -> None:
        """Give ``node`` its own constant at input ``slot`` holding ``value``."""
        self._private(node, slot, -1, ("value", np.asarray(value)))

    def _private(self, node: onnx.NodeProto, slot: int, source: int, pending: tuple) -> None:
        base = f"{node.name}__{slot}"
        name = base
        k = 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        self.privates.append((name, source, pending))
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name

    def write(self) -> None:
        """Add the initializers ``m`` uses: originals in order (edited or copied), then private copies."""
        m = self.m
        used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
        used |= {i for n in m.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH for nn in a.g.node for i in nn.input}
        used |= {i.name for i in m.graph.input}
        jobs = []  # (dst, name, source tensor, pending or None), in output order
        for k, t in enumerate(self.tensors):
            if t.name in used:  # else replaced everywhere by private copies (or never read)
                jobs.append((m.graph.initializer.add(), t.name, t, self.pending.get(t.name) if self.inits[t.name] == k else None))
        for name, source, pending in self.privates:
            if name in used:
                jobs.append((m.graph.initializer.add(), name, self.tensors[source] if source >= 0 else None, pending))
        # Fill the largest edits first: a slice's transient copies (its source's
        # bytes, the sliced array, its bytes) then coexist with little of the
        # output, instead of with almost all of it.
        jobs.sort(key=lambda j: -tensor_nbytes(j[2]) if j[3] is not None and j[2] is not None else 0)
        for dst, name, src, pending in jobs:
            if pending is None:
                dst.CopyFrom(src)
            else:
                self._write(dst, name, src, pending)

    @staticmethod
    def _write(dst: onnx.TensorProto, name: str, src: onnx.TensorProto | None, pending: tuple) -> None:
        kind, what = pending
        if kind == "takes":
            write_sliced(dst, src, what, name=name)
        else:
            fill_from_array(dst, np.ascontiguousarray(what), name)


def _take_chain(arr: np.ndarray, takes: dict[int, np.ndarray]) -> np.ndarray:
    for axis, idx in takes.items():
        arr = np.take(arr, idx, axis=axis)
    return arr


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
    """Return a new model keeping only the units set in ``unit_kept``.

    The new model is built from a skeleton of ``cg.model`` (no full copy):
    each sliced weight is cut from its source block by block, every other
    initializer is copied once (a lazy one stays a reference to its file).
    """
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
    m = skeleton(cg.model)
    del m.graph.value_info[:]  # stale channel counts; re-inferred below
    consts = _Consts(cg.model, m)
    nodes = {n.name: n for n in m.graph.node}
    opset = opset_version(m)

    # constants: slice for every user when all slice alike, else one private copy per node
    by_node: dict[str, dict[str, dict[tuple, SliceTensor]]] = defaultdict(lambda: defaultdict(dict))
    for e in cg.edits:
        if isinstance(e, SliceTensor):
            by_node[e.tensor][e.node].setdefault(e.key(), e)
    for tensor, per_node in by_node.items():
        users = {n.name for n in consts.consumers[tensor]}
        shared = len({frozenset(v) for v in per_node.values()}) > 1 or bool(users - set(per_node))
        for node_name, edits in per_node.items():
            takes: dict[int, np.ndarray] = {}
            for e in edits.values():
                mask = kept(e.atoms)
                if not mask.all():
                    idx = np.nonzero(mask)[0]
                    takes[e.axis] = takes[e.axis][idx] if e.axis in takes else idx  # a second take indexes the first
            if not takes:
                continue
            if shared:
                node = nodes[node_name]
                for slot, name in enumerate(node.input):
                    if name == tensor:
                        consts.private_slice(node, slot, tensor, takes)
            else:
                consts.set_slice(tensor, takes)
                break  # all users slice alike: one edit serves them all

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

    consts.write()
    if reinfer:
        try:
            inferred = onnx.shape_inference.infer_shapes(_weightless_copy(m), data_prop=True)  # no weight copies
            m.graph.value_info.extend(inferred.graph.value_info)
        except Exception as exc:  # inference is a convenience; ORT re-infers at load
            log.debug("shape inference after pruning failed: %s", exc)
    if verify and reinfer:
        _verify_channels(cg, m, kept)
    return m


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
