"""Cut parts out of an ONNX graph, to run them with :mod:`onnxprune.runtime`.

Every function returns a new ``ModelProto`` and leaves its input unchanged.

* :func:`with_outputs`: the whole model, with intermediate tensors added as
  graph outputs (so ONNX Runtime returns them).
* :func:`prefix`: the nodes needed to compute some tensors from the graph
  inputs; those tensors are its only outputs.
* :func:`needed_nodes` and :func:`subgraph`: a segment that starts at given
  tensors (fed as inputs: a sensitivity suffix from its frontier, a
  calibration segment from cached activations) and ends at given tensors.
* :func:`dynamic_batch`: a fixed-batch model as one that takes any batch
  (for executors that cannot pad, e.g. torch training).

A node is needed for a set of tensors when it produces one of them or an
input of another needed node; nodes are kept in graph order, which stays
topological. Example::

    m = prefix(model, ["conv3_out"])   # runs up to conv3 only
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """Whether a node carries a graph attribute (If/Loop/Scan): their outer-scope reads are not node inputs."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute)


def _named(names: Iterable[str]) -> list[onnx.ValueInfoProto]:
    """Output entries without type or shape: ORT reads them from the graph (value info may be stale after pruning)."""
    return [onnx.ValueInfoProto(name=n) for n in names]


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are its own outputs followed by those of ``names`` it lacks."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(_named([n for n in dict.fromkeys(names) if n not in have]))
    return m


def needed_nodes(model: onnx.ModelProto, outputs: Iterable[str], available: Iterable[str] = ()) -> list[onnx.NodeProto]:
    """The nodes needed to compute ``outputs`` when the tensors in ``available`` (and initializers) are given."""
    g = model.graph
    stop = set(available) | {t.name for t in g.initializer}
    need, keep = set(outputs), []
    for node in reversed(g.node):
        if any(o in need for o in node.output if o):
            keep.append(node)
            need.update(i for i in node.input if i and i not in stop)
    keep.reverse()
    return keep


def prefix(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """The nodes of ``model`` needed for ``outputs``, which become its only graph outputs.

    Graphs with subgraphs (If/Loop) are kept whole (:func:`has_subgraphs`).
    """
    g = model.graph
    keep = list(g.node) if has_subgraphs(model) else needed_nodes(model, outputs)
    used = {i for n in keep for i in n.input}
    init_names = {t.name for t in g.initializer}
    graph = helper.make_graph(
        keep,
        g.name,
        [i for i in g.input if i.name not in init_names or i.name in used],
        _named(outputs),
        initializer=[t for t in g.initializer if t.name in used],
        value_info=list(g.value_info),
    )
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def subgraph(
    model: onnx.ModelProto,
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, tuple[int, Sequence[int | None]]],
    outputs: Sequence[str],
    *,
    name: str = "segment",
) -> onnx.ModelProto:
    """``nodes`` of ``model`` as a model fed by ``inputs`` (``{tensor: (onnx elem type, shape)}``).

    ``Constant`` nodes whose outputs ``nodes`` read are added, and so are the
    initializers they read. ``outputs`` become the graph outputs. The batch
    dim of each input is declared as given: ``None`` for a dynamic batch, the
    model's fixed batch otherwise (so :class:`onnxprune.runtime.Session` pads).
    """
    g = model.graph
    names = {n.name for n in nodes}
    used = {i for n in nodes for i in n.input if i}
    consts = [n for n in g.node if n.op_type == "Constant" and n.output[0] in used and n.name not in names and n.output[0] not in inputs]
    declared = [helper.make_tensor_value_info(t, elem, list(shape)) for t, (elem, shape) in inputs.items()]
    graph = helper.make_graph(
        consts + list(nodes),
        f"{g.name}_{name}",
        declared,
        _named(outputs),
        initializer=[t for t in g.initializer if t.name in used and t.name not in inputs],
    )
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def suffix(
    model: onnx.ModelProto,
    names: set[str],
    frontier: Sequence[str],
    shapes: Mapping[str, Sequence[int | None]],
    dtypes: Mapping[str, int],
    *,
    batch: int | None = None,
) -> onnx.ModelProto:
    """The nodes of ``model`` named in ``names``, fed by the ``frontier`` tensors, ending at the graph outputs.

    ``shapes[f]`` gives each frontier tensor's dims after the batch axis (its
    first entry is ignored); the batch dim is ``batch``.
    """
    nodes = [n for n in model.graph.node if n.name in names]
    inputs = {f: (dtypes.get(f, onnx.TensorProto.FLOAT), (batch, *shapes[f][1:])) for f in frontier}
    return subgraph(model, nodes, inputs, [o.name for o in model.graph.output], name="suffix")


def _const_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = n.attribute[0].t
    return values


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when its batch is symbolic, else a copy that runs any batch size.

    A model exported with a fixed batch ``N`` declares ``N`` on its inputs and
    outputs, and exporters fold ``x.view(x.size(0), -1)`` into ``Reshape(x,
    [N, -1])``. In the copy the first dim of inputs and outputs declared ``N``
    becomes the symbol ``batch``, and a Reshape with a constant target ``[N,
    d1, ...]`` whose input has ``N`` rows of the same size (``prod(in[1:]) ==
    prod(d[1:])``, ``-1`` resolved) reads ``[0, d1, ...]`` instead (ONNX: 0 =
    copy the input's dim), through a new ``Constant`` node: initializers are
    untouched, so weights trained on the copy map back by name. Value info is
    dropped (it holds ``N``). Other batch-sized constants (Expand, Tile targets)
    are left as they are.
    """
    from .graph import attr, infer_shapes
    from .runtime import data_inputs, fixed_batch

    n_batch = fixed_batch(model)
    if n_batch is None:
        return model
    shapes = infer_shapes(model)
    consts = _const_values(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    fed = {i.name for i in data_inputs(model)}
    for vi in [*(i for i in m.graph.input if i.name in fed), *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == n_batch:
            dims[0].dim_param = "batch"
    nodes = []
    for k, original in enumerate(model.graph.node):
        node = onnx.NodeProto()
        node.CopyFrom(original)
        target = consts.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if target is not None and not attr(node, "allowzero", 0):
            want = numpy_helper.to_array(target).astype(np.int64).reshape(-1)
            have = shapes.get(node.input[0])
            if len(want) and want[0] == n_batch and have and have[0] == n_batch and None not in have[1:]:
                rest, size = want[1:], int(np.prod(have[1:], dtype=np.int64))
                known = int(np.prod([d for d in rest if d > 0], dtype=np.int64))
                if (-1 in rest and known and size % known == 0) or (-1 not in rest and 0 not in rest and known == size):
                    name = f"{node.input[1]}__any_batch{k}"
                    value = numpy_helper.from_array(np.concatenate([[0], rest]).astype(np.int64), name)
                    nodes.append(helper.make_node("Constant", [], [name], name=f"{node.name or k}__any_batch", value=value))
                    node.input[1] = name
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


__all__ = ["dynamic_batch", "has_subgraphs", "needed_nodes", "prefix", "subgraph", "suffix", "with_outputs"]
