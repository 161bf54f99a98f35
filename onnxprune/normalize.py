"""Normalize exporter habits around constants before analysis.

Exporters and simplifiers deduplicate identical initializers: the all-zero
bias of every bias-free conv whose BatchNorm was folded at default
statistics, repeated constants, tied weights. The legacy torch exporter keeps
one copy and feeds the others through ``Identity`` nodes; others share one
initializer between several nodes, or compute a weight at run time from
constants (``Cast``, ``Reshape``, ``Squeeze``/``Unsqueeze``).

:func:`normalize_constants` turns every such chain into a plain constant, so
the analysis can slice it:

* an ``Identity`` whose input is a constant is removed and its consumers read
  the constant itself (a shared initializer: slicing gives each node its own
  copy at rewrite time, see :mod:`onnxprune.rewrite`, so a node that still
  reads the tensor unsliced never sees it change);
* ``Cast``, ``Reshape``, ``Squeeze``, ``Unsqueeze`` and ``Flatten`` whose
  inputs are all constants are evaluated once (numpy) into a new initializer
  named after their output.

The result computes exactly what the input computes. Each change is a
:class:`Normalization`, listed in the report. A chain that ends in a graph
input or in an op outside this list is left alone; the analysis then blocks
the group and :func:`why_not_constant` names the node that stops it.

Example::

    model2, changes = normalize_constants(model)   # model2 is model when nothing changes
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import GraphIndex, attr, node_label, opset_version
from .tensors import plain_dtype

log = logging.getLogger(__name__)

#: Ops evaluated on constant inputs (besides ``Identity``, which is bypassed without copying data).
FOLDABLE = ("Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
#: Largest tensor (bytes) a fold may create: folding copies data, so big weights stay as they are.
MAX_FOLD_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Normalization:
    """One change to the graph beyond pruning: ``kind`` is ``identity`` or ``fold``."""

    kind: str
    node: str
    op_type: str
    tensor: str

    def describe(self) -> str:
        if self.kind == "identity":
            return f"removed {self.op_type} '{self.node}' on constant '{self.tensor}' (its consumers read the constant)"
        return f"folded {self.op_type} '{self.node}' on constants into initializer '{self.tensor}'"


def summarize(changes) -> str:
    """One line for a list of :class:`Normalization`, e.g. ``"12 Identity removed, 2 Cast folded"``."""
    counts = Counter((c.op_type, c.kind) for c in changes)
    return ", ".join(f"{n} {op} {'removed' if kind == 'identity' else 'folded'}" for (op, kind), n in sorted(counts.items()))


def _subgraph_names(model: onnx.ModelProto) -> set[str]:
    """Names read inside If/Loop/Scan bodies (outer-scope captures must keep their producer)."""
    names: set[str] = set()

    def walk(g: onnx.GraphProto, inside: bool) -> None:
        for n in g.node:
            if inside:
                names.update(i for i in n.input if i)
            for a in n.attribute:
                for sg in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs if a.type == onnx.AttributeProto.GRAPHS else []:
                    walk(sg, True)

    walk(model.graph, False)
    return names


def _resolve(renames: Mapping[str, str], name: str) -> str:
    """Follow bypassed ``Identity`` outputs back to the constant they pass on."""
    while name in renames:
        name = renames[name]
    return name


def _fold(node: onnx.NodeProto, values: list[np.ndarray], opset: int) -> np.ndarray | None:
    """Value of ``node`` on constant ``values``, or None when it cannot be computed exactly here."""
    op = node.op_type
    x = values[0]
    if op == "Cast":
        to = plain_dtype(int(attr(node, "to", 0)))
        return None if to is None else x.astype(to.newbyteorder("="))
    if op == "Reshape":
        if len(values) < 2:
            return None
        shape = [int(d) for d in values[1].ravel().tolist()]
        if not int(attr(node, "allowzero", 0)):
            shape = [x.shape[i] if d == 0 and i < x.ndim else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    if op == "Flatten":
        axis = int(attr(node, "axis", 1))
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    if op in ("Squeeze", "Unsqueeze"):
        axes = attr(node, "axes") if opset < 13 else (values[1].ravel().tolist() if len(values) > 1 else None)
        if op == "Squeeze":
            if axes is None:
                return np.squeeze(x)
            return np.squeeze(x, axis=tuple(int(a) % x.ndim for a in axes))
        if axes is None:
            return None
        out_rank = x.ndim + len(axes)
        out = x
        for a in sorted(int(a) % out_rank for a in axes):
            out = np.expand_dims(out, a)
        return out
    return None


def plan_normalizations(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, np.ndarray], list[Normalization]]:
    """What :func:`normalize_constants` would change, read-only.

    Returns ``(renames, folded, changes)``: ``renames[y] = x`` for a bypassed
    ``Identity`` (y -> x), ``folded[y]`` the value of a folded node's output.
    """
    index = GraphIndex(model)
    opset = opset_version(model)
    keep = index.graph_outputs | _subgraph_names(model)
    renames: dict[str, str] = {}
    folded: dict[str, np.ndarray] = {}
    changes: list[Normalization] = []

    def is_const(name: str) -> bool:
        return name in folded or index.is_const(name)

    def value(name: str) -> np.ndarray | None:
        return folded[name] if name in folded else index.const(name)

    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1 or not node.output[0] or node.output[0] in keep:
            continue
        ins = [_resolve(renames, i) for i in node.input if i]
        if not ins or not all(is_const(i) for i in ins):
            continue
        out = node.output[0]
        if node.op_type == "Identity":
            renames[out] = ins[0]
            changes.append(Normalization("identity", node_label(node), node.op_type, ins[0]))
        elif node.op_type in FOLDABLE:
            vals = [value(i) for i in ins]
            if any(v is None for v in vals) or sum(v.nbytes for v in vals) > MAX_FOLD_BYTES:
                continue
            try:
                v = _fold(node, [np.asarray(v) for v in vals], opset)
            except (ValueError, IndexError) as exc:  # an inconsistent node: leave it for ORT to report
                log.debug("cannot fold %s '%s': %s", node.op_type, node_label(node), exc)
                v = None
            if v is None:
                continue
            folded[out] = np.ascontiguousarray(v)
            changes.append(Normalization("fold", node_label(node), node.op_type, out))
    return renames, folded, changes


def apply_normalizations(model: onnx.ModelProto, renames: Mapping[str, str], folded: Mapping[str, np.ndarray]) -> None:
    """Apply a plan from :func:`plan_normalizations` to ``model`` in place."""
    g = model.graph
    drop = set(renames) | set(folded)
    kept_nodes = [n for n in g.node if not (len(n.output) == 1 and n.output[0] in drop)]
    for n in kept_nodes:
        for k, i in enumerate(n.input):
            if i in renames:
                n.input[k] = _resolve(renames, i)
    del g.node[:]
    g.node.extend(kept_nodes)
    for name, v in folded.items():
        g.initializer.append(numpy_helper.from_array(v, name))
    stale = [vi for vi in g.value_info if vi.name in renames]
    for vi in stale:
        g.value_info.remove(vi)
    if model.ir_version < 4:  # initializers must also be graph inputs before IR 4
        types = {vi.name: vi for vi in g.value_info}
        for name in folded:
            vi = types.get(name) or onnx.helper.make_tensor_value_info(name, numpy_helper.from_array(folded[name]).data_type, folded[name].shape)
            g.input.append(vi)


def normalize_constants(model: onnx.ModelProto, *, copy: bool = True) -> tuple[onnx.ModelProto, tuple[Normalization, ...]]:
    """Return ``(model', changes)``; ``model'`` computes exactly what ``model`` computes.

    ``model`` is not changed when ``copy`` (the default): ``model'`` is a copy
    when something changed, else ``model`` itself.
    """
    renames, folded, changes = plan_normalizations(model)
    if not changes:
        return model, ()
    if copy:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    else:
        m = model
    apply_normalizations(m, renames, folded)
    log.info("normalized constants: %s", summarize(changes))
    return m, tuple(changes)


def why_not_constant(index: GraphIndex, name: str, *, depth: int = 0) -> str:
    """Why tensor ``name`` is not a constant, naming the node or input that stops it.

    Example: ``"'b' is computed by Mul 'scale' from graph input 'gain'"``.
    """
    if name in index.graph_inputs:
        return f"'{name}' is graph input (fed at run time)"
    node = index.producer.get(name)
    if node is None:
        return f"'{name}' has no producer and is not an initializer"
    label = f"{node.op_type} '{node_label(node)}'"
    if depth < 8 and node.op_type in ("Identity", *FOLDABLE):
        src = next((i for i in node.input if i and not index.is_const(i)), None)
        if src is not None:
            return f"'{name}' comes from {label}, and {why_not_constant(index, src, depth=depth + 1)}"
        return f"'{name}' comes from {label} on constants that onnxprune could not fold"
    return f"'{name}' is computed at run time by {label}"
