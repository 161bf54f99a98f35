"""One rule per ONNX op type: how the op treats the channel axis.

A rule gets the analysis context and the node. It reads the channel maps of
the node's inputs (``ctx.map(name)``: the axis and, per position, the atom
that position carries), records the edits pruning needs, and sets the maps of
the outputs. A rule either

* produces channels (Conv, ConvTranspose, Gemm, MatMul with constant weight),
* passes them through (activations, BN, pooling...),
* couples inputs (Add, Mul, Concat...), or
* blocks: ``ctx.block(atoms, reason)`` marks channels that must not be pruned.

Ops without a rule block every channel that reaches them (see
:func:`unknown`), so an unsupported graph is left intact, never guessed.
Register a new op with ``@rule("OpType")``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .edits import PadChannels, SetGroup, ShapeEntry, SliceBounds, SplitSizes
from .graph import attr, node_label

RULES: dict[str, Callable] = {}


def rule(*op_types: str):
    def deco(fn):
        for op in op_types:
            RULES[op] = fn
        return fn

    return deco


class ChannelMap:
    """Channel axis of a tensor and the atom carried by each position on it."""

    __slots__ = ("axis", "atoms")

    def __init__(self, axis: int, atoms: np.ndarray):
        self.axis = int(axis)
        self.atoms = np.asarray(atoms, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.atoms)


def _mapped_inputs(ctx, node):
    return [(k, name, ctx.map(name)) for k, name in enumerate(node.input) if name and ctx.map(name) is not None]


def _block_inputs(ctx, node, reason: str) -> None:
    for _, _, m in _mapped_inputs(ctx, node):
        ctx.block(m.atoms, reason)


def unknown(ctx, node) -> None:
    """Fallback: block channels entering an op onnxprune has no rule for."""
    if _mapped_inputs(ctx, node):
        op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        _block_inputs(ctx, node, f"{op} '{node_label(node)}' is not supported for channel pruning")


# --------------------------------------------------------------------------- producers
@rule("Conv")
def conv(ctx, node) -> None:
    x = ctx.map(node.input[0])
    w = ctx.const(node.input[1])
    label = node_label(node)
    out_name = node.output[0]
    if w is None:
        reason = f"Conv '{label}' has a weight that is not a constant initializer"
        if x is not None:
            ctx.block(x.atoms, reason)
        _fixed_compute(ctx, node, ctx.shape(node.input[1]), reason, out_axis=0, in_axis=1, spatial_of=out_name)
        return
    cout, cin_g = int(w.shape[0]), int(w.shape[1])
    g = int(attr(node, "group", 1))
    cin = cin_g * g
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if x is not None and (x.axis != 1 or len(x) != cin):
        ctx.block(x.atoms, f"Conv '{label}' reads channels on an axis onnxprune did not track")
        x = None
    in_atoms = x.atoms if x is not None else ctx.fresh(node, cin, blocked=f"input of Conv '{label}' is not tracked")
    spatial, kernel = ctx.spatial(out_name), int(np.prod(w.shape[2:]))
    if g > 1 and g == cin:  # depthwise (channel multiplier m): out j reads input j // m
        m = cout // cin
        out_atoms = np.repeat(in_atoms, m)
        ctx.slice_tensor(node, node.input[1], 0, out_atoms)
        if bias:
            ctx.slice_tensor(node, bias, 0, out_atoms)
        ctx.edit(SetGroup(node.name, in_atoms))
        ctx.compute(node, spatial=spatial, kernel=kernel, out_atoms=out_atoms, in_atoms=None, in_fixed=1)
    else:
        out_atoms = ctx.fresh(node, cout)
        if g > 1:  # grouped: same positions pruned in every group
            ctx.tie_groups(in_atoms, g)
            ctx.tie_groups(out_atoms, g)
            in_group = in_atoms[:cin_g]
        else:
            in_group = in_atoms
        ctx.slice_tensor(node, node.input[1], 1, in_group)
        ctx.slice_tensor(node, node.input[1], 0, out_atoms)
        if bias:
            ctx.slice_tensor(node, bias, 0, out_atoms)
        ctx.compute(node, spatial=spatial, kernel=kernel, out_atoms=out_atoms, in_atoms=in_group)
    ctx.set_map(out_name, ChannelMap(1, out_atoms))


@rule("ConvTranspose")
def conv_transpose(ctx, node) -> None:
    x = ctx.map(node.input[0])
    w = ctx.const(node.input[1])
    label = node_label(node)
    g = int(attr(node, "group", 1))
    if w is None or g != 1:
        reason = f"ConvTranspose '{label}' " + ("has a non-constant weight" if w is None else f"is grouped (group={g})")
        if x is not None:
            ctx.block(x.atoms, reason)
        w_shape = tuple(w.shape) if w is not None else ctx.shape(node.input[1])
        _fixed_compute(ctx, node, w_shape, reason, out_axis=1, in_axis=0, spatial_of=node.input[0], group=g)
        return
    cin, cout = int(w.shape[0]), int(w.shape[1])
    if x is not None and (x.axis != 1 or len(x) != cin):
        ctx.block(x.atoms, f"ConvTranspose '{label}' reads channels on an axis onnxprune did not track")
        x = None
    in_atoms = x.atoms if x is not None else ctx.fresh(node, cin, blocked=f"input of ConvTranspose '{label}' is not tracked")
    out_atoms = ctx.fresh(node, cout)
    ctx.slice_tensor(node, node.input[1], 0, in_atoms)
    ctx.slice_tensor(node, node.input[1], 1, out_atoms)
    if len(node.input) > 2 and node.input[2]:
        ctx.slice_tensor(node, node.input[2], 0, out_atoms)
    ctx.compute(node, spatial=ctx.spatial(node.input[0]), kernel=int(np.prod(w.shape[2:])), out_atoms=out_atoms, in_atoms=in_atoms)
    ctx.set_map(node.output[0], ChannelMap(1, out_atoms))


def _fixed_compute(ctx, node, w_shape, reason: str, *, out_axis: int, in_axis: int, spatial_of: str | None, group: int = 1) -> None:
    """A compute node onnxprune cannot rewrite: its MACs still count, its channels are blocked.

    Conv weight ``[Cout, Cin/g, k...]`` (out_axis 0), ConvTranspose ``[Cin, Cout/g, k...]``
    (out_axis 1), Gemm ``[K, M]`` or ``[M, K]``.
    """
    if not w_shape or any(d is None for d in w_shape):
        return
    label = node.name
    cout = int(w_shape[out_axis]) * (group if node.op_type == "ConvTranspose" else 1)
    cin_g = int(w_shape[in_axis]) // (group if node.op_type == "ConvTranspose" else 1)
    out_atoms = ctx.fresh(node, cout, blocked=reason)
    in_atoms = ctx.fresh(f"untracked:{label}", cin_g, blocked=reason)
    kernel = int(np.prod(w_shape[2:])) if len(w_shape) > 2 else 1
    spatial = ctx.spatial(spatial_of) if spatial_of else 1
    ctx.compute(node, spatial=spatial, kernel=kernel, out_atoms=out_atoms, in_atoms=in_atoms)
    if node.output and node.output[0]:
        shp = ctx.shape(node.output[0])
        axis = 1 if node.op_type != "Gemm" else (len(shp) - 1 if shp else 1)
        ctx.set_map(node.output[0], ChannelMap(axis, out_atoms))


def _fc(ctx, node, *, k_axis: int, m_axis: int, w_shape, trans_a: bool) -> None:
    """Shared by Gemm and MatMul: weight rows (k_axis) consume, columns (m_axis) produce."""
    label = node_label(node)
    x = ctx.map(node.input[0])
    k, m = int(w_shape[k_axis]), int(w_shape[m_axis])
    x_shape = ctx.shape(node.input[0])
    rank = len(x_shape) if x_shape else 2
    if x is not None and (trans_a or x.axis != rank - 1 or len(x) != k):
        ctx.block(x.atoms, f"{node.op_type} '{label}' reads features on an axis onnxprune did not track")
        x = None
    in_atoms = x.atoms if x is not None else ctx.fresh(node, k, blocked=f"input of {node.op_type} '{label}' is not tracked")
    out_atoms = ctx.fresh(node, m)
    ctx.slice_tensor(node, node.input[1], k_axis, in_atoms)
    ctx.slice_tensor(node, node.input[1], m_axis, out_atoms)
    lead = int(np.prod([d or 1 for d in x_shape[1:-1]])) if x_shape and len(x_shape) > 2 else 1
    ctx.compute(node, spatial=lead, kernel=1, out_atoms=out_atoms, in_atoms=in_atoms)
    ctx.set_map(node.output[0], ChannelMap(rank - 1, out_atoms))


@rule("Gemm")
def gemm(ctx, node) -> None:
    w = ctx.const(node.input[1])
    if w is None or w.ndim != 2:
        reason = f"Gemm '{node_label(node)}' has a weight that is not a constant initializer"
        _block_inputs(ctx, node, reason)
        w_shape = ctx.shape(node.input[1])
        if w_shape and len(w_shape) == 2:
            tb = bool(attr(node, "transB", 0))
            _fixed_compute(ctx, node, w_shape, reason, out_axis=0 if tb else 1, in_axis=1 if tb else 0, spatial_of=None)
        return
    trans_b = bool(attr(node, "transB", 0))
    _fc(ctx, node, k_axis=1 if trans_b else 0, m_axis=0 if trans_b else 1, w_shape=w.shape, trans_a=bool(attr(node, "transA", 0)))
    if len(node.input) > 2 and node.input[2]:
        out = ctx.map(node.output[0])
        c = ctx.const(node.input[2])
        if c is None:
            ctx.block(out.atoms, f"Gemm '{node_label(node)}' has a non-constant bias")
        elif c.ndim >= 1 and c.shape[-1] == len(out) and len(out) > 1:
            ctx.slice_tensor(node, node.input[2], c.ndim - 1, out.atoms)


@rule("MatMul")
def matmul(ctx, node) -> None:
    w = ctx.const(node.input[1])
    if w is None or w.ndim != 2:
        _block_inputs(ctx, node, f"MatMul '{node_label(node)}' multiplies two activations, which mixes channels")
        return
    _fc(ctx, node, k_axis=0, m_axis=1, w_shape=w.shape, trans_a=False)


# --------------------------------------------------------------------------- pass-through
PASS_THROUGH = (
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Softplus Softsign Mish ThresholdedRelu "
    "Identity Cast Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round Sign Erf Sin Cos Not IsNaN IsInf"
).split()


@rule(*PASS_THROUGH)
def passthrough(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is not None:
        ctx.set_map(node.output[0], x)


@rule("Dropout")
def dropout(ctx, node) -> None:
    passthrough(ctx, node)
    if len(node.output) > 1 and node.output[1] and ctx.map(node.input[0]) is not None:
        ctx.set_map(node.output[1], ctx.map(node.input[0]))


@rule("BatchNormalization", "InstanceNormalization")
def batchnorm(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is None:
        return
    if x.axis != 1:
        ctx.block(x.atoms, f"{node.op_type} '{node_label(node)}' normalizes an axis that is not the channel axis")
        return
    for name in node.input[1:]:
        if name:
            ctx.slice_tensor(node, name, 0, x.atoms)
    ctx.set_map(node.output[0], x)
    for extra in node.output[1:]:  # training-mode running stats outputs
        if extra:
            ctx.block(x.atoms, f"BatchNormalization '{node_label(node)}' is in training mode")


@rule("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "MaxRoiPool")
def pool(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is None:
        return
    if x.axis != 1:
        ctx.block(x.atoms, f"{node.op_type} '{node_label(node)}' pools over the channel axis")
        return
    if len(node.output) > 1 and node.output[1]:
        ctx.block(x.atoms, f"MaxPool '{node_label(node)}' returns indices, which encode channel positions")
    ctx.set_map(node.output[0], x)


SHAPE_ARITHMETIC = ("Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Add", "Sub", "Mul", "Div")


@rule("Shape", "Size")
def shape_op(ctx, node) -> None:
    """Reads shapes. Shape vectors that feed Reshape/Resize are checked there;
    one that reaches a graph output (directly or through shape arithmetic)
    would change value, so the channels are blocked."""
    x = ctx.map(node.input[0])
    if x is None:
        return
    todo, seen = [node.output[0]], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in ctx.index.graph_outputs:
            ctx.block(x.atoms, f"{node.op_type} '{node_label(node)}' reports the channel count to graph output '{t}'")
            return
        for c in ctx.index.consumers.get(t, []):
            if c.op_type in SHAPE_ARITHMETIC:
                todo.extend(o for o in c.output if o)


# --------------------------------------------------------------------------- coupling
ELEMENTWISE = "Add Sub Mul Div Max Min Sum Mean Pow PRelu Clip Where Equal Less Greater And Or Xor Mod BitShift".split()


@rule(*ELEMENTWISE)
def elementwise(ctx, node) -> None:
    """Broadcasting op: inputs carrying the same channel axis are coupled position-wise.

    A constant with the full channel count on that axis is sliced; a constant
    with 1 there broadcasts and is left alone; an untracked activation with
    the full channel count blocks the channels (it cannot be sliced).
    """
    label = node_label(node)
    out_shape = ctx.shape(node.output[0])
    mapped = _mapped_inputs(ctx, node)
    if not mapped:
        return
    if out_shape is None:
        _block_inputs(ctx, node, f"{node.op_type} '{label}' has an unknown output shape")
        return
    rank = len(out_shape)
    main = None
    for _, name, m in mapped:
        r = len(ctx.shape(name) or ())
        axis = m.axis + rank - r
        if len(m) == (out_shape[axis] or -1):
            main = (axis, m)
            break
    if main is None:
        _block_inputs(ctx, node, f"{node.op_type} '{label}' broadcasts its channels in a way onnxprune does not track")
        return
    axis, out = main
    channels = len(out)
    for k, name in enumerate(node.input):
        if not name:
            continue
        shp = ctx.shape(name)
        if shp is None:
            if ctx.map(name) is not None or ctx.const(name) is None:
                ctx.block(out.atoms, f"{node.op_type} '{label}' has an input '{name}' of unknown shape")
            continue
        r = len(shp)
        a = axis - (rank - r)
        dim = shp[a] if 0 <= a < r else 1
        m = ctx.map(name)
        if m is not None:
            if m.axis != a:
                ctx.block(np.concatenate([m.atoms, out.atoms]), f"{node.op_type} '{label}' combines tensors whose channel axes differ")
            elif len(m) == channels:
                ctx.union(m.atoms, out.atoms)
            elif len(m) != 1:
                ctx.block(np.concatenate([m.atoms, out.atoms]), f"{node.op_type} '{label}' combines tensors with different channel counts")
            continue
        if dim == 1 or channels == 1:
            continue
        if ctx.const(name) is not None:
            ctx.slice_tensor(node, name, a, out.atoms)
        else:
            ctx.block(out.atoms, f"{node.op_type} '{label}' combines the channels with '{name}', whose channels onnxprune cannot track")
    ctx.set_map(node.output[0], ChannelMap(axis, out.atoms))


@rule("Concat")
def concat(ctx, node) -> None:
    label = node_label(node)
    mapped = _mapped_inputs(ctx, node)
    if not mapped:
        return
    out_shape = ctx.shape(node.output[0])
    if out_shape is None:
        _block_inputs(ctx, node, f"Concat '{label}' has an unknown output shape")
        return
    rank = len(out_shape)
    axis = int(attr(node, "axis")) % rank
    ch_axis = mapped[0][2].axis
    if any(m.axis != ch_axis for _, _, m in mapped):
        _block_inputs(ctx, node, f"Concat '{label}' joins tensors whose channel axes differ")
        return
    if axis != ch_axis:
        first = mapped[0][2]
        for _, name, m in mapped[1:]:
            if len(m) != len(first):
                _block_inputs(ctx, node, f"Concat '{label}' joins tensors with different channel counts")
                return
            ctx.union(m.atoms, first.atoms)
        for name in node.input:
            if ctx.map(name) is None and ctx.const(name) is None:
                shp = ctx.shape(name)
                if shp is None or (shp[ch_axis] or 0) > 1:
                    ctx.block(first.atoms, f"Concat '{label}' joins untracked tensor '{name}'")
            elif ctx.map(name) is None:
                ctx.slice_tensor(node, name, ch_axis, first.atoms)
        ctx.set_map(node.output[0], first)
        return
    parts = []
    for name in node.input:
        m = ctx.map(name)
        if m is not None:
            parts.append(m.atoms)
            continue
        shp = ctx.shape(name)
        n = shp[axis] if shp else None
        if n is None:
            _block_inputs(ctx, node, f"Concat '{label}' has input '{name}' of unknown channel count")
            return
        if ctx.const(name) is not None:
            atoms = ctx.fresh(node, n)
            ctx.slice_tensor(node, name, axis, atoms)
        else:
            atoms = ctx.fresh(node, n, blocked=f"Concat '{label}' input '{name}' is not tracked")
        parts.append(atoms)
    ctx.set_map(node.output[0], ChannelMap(axis, np.concatenate(parts)))


@rule("Split")
def split(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is None:
        return
    label = node_label(node)
    shp = ctx.shape(node.input[0])
    axis = int(attr(node, "axis", 0)) % len(shp)
    if axis != x.axis:
        for o in node.output:
            ctx.set_map(o, x)
        return
    sizes = None
    if len(node.input) > 1 and node.input[1]:
        v = ctx.fold(node.input[1])
        sizes = None if v is None else [int(s) for s in v.ravel()]
        if v is None:
            ctx.block(x.atoms, f"Split '{label}' has split sizes computed at run time")
            return
    elif attr(node, "split") is not None:
        sizes = [int(s) for s in attr(node, "split")]
    else:
        n = len(node.output)
        c = len(x)
        per = math.ceil(c / n)
        sizes = [min(per, c - per * i) for i in range(n)]
    if sum(sizes) != len(x) or len(sizes) != len(node.output):
        ctx.block(x.atoms, f"Split '{label}' sizes {sizes} do not match {len(x)} channels")
        return
    offsets = np.cumsum([0, *sizes])
    parts = tuple(x.atoms[offsets[i] : offsets[i + 1]] for i in range(len(sizes)))
    for p in parts:
        if len(p) == 0:
            ctx.block(x.atoms, f"Split '{label}' has an empty output")
            return
    ctx.edit(SplitSizes(node.name, parts))
    for o, p in zip(node.output, parts):
        ctx.set_map(o, ChannelMap(axis, p))


@rule("Slice")
def slice_(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is None:
        return
    label = node_label(node)
    shp = ctx.shape(node.input[0])
    rank = len(shp)
    if ctx.opset < 10:
        starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
        if axes is not None:
            axes = list(axes)
    else:
        vals = [ctx.fold(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
        if any(v is None for v, n in zip(vals, node.input[1:]) if n):
            ctx.block(x.atoms, f"Slice '{label}' has bounds computed at run time")
            return
        starts, ends, axes, steps = (None if v is None else [int(a) for a in v.ravel()] for v in vals[:4])
    axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
    if x.axis not in axes:
        ctx.set_map(node.output[0], x)
        return
    pos = axes.index(x.axis)
    step = 1 if steps is None else steps[pos]
    c = len(x)
    s, e = starts[pos], ends[pos]
    if step != 1:
        ctx.block(x.atoms, f"Slice '{label}' takes every {step}-th channel")
        return
    s = max(0, min(c, s + c if s < 0 else s))
    e = max(0, min(c, e + c if e < 0 else e))
    if e <= s:
        ctx.block(x.atoms, f"Slice '{label}' selects no channels")
        return
    ctx.edit(SliceBounds(node.name, pos, x.atoms, s, e, tuple(starts), tuple(ends)))
    # channels outside the slice are still alive upstream; only the kept ones pass
    ctx.set_map(node.output[0], ChannelMap(x.axis, x.atoms[s:e]))


@rule("Pad")
def pad(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is None:
        return
    label = node_label(node)
    rank = len(ctx.shape(node.input[0]))
    if ctx.opset < 11:
        pads = attr(node, "pads")
    else:
        v = ctx.fold(node.input[1]) if len(node.input) > 1 else None
        pads = None if v is None else [int(p) for p in v.ravel()]
    if pads is None:
        ctx.block(x.atoms, f"Pad '{label}' has pads computed at run time")
        return
    axes = None
    if ctx.opset >= 18 and len(node.input) > 3 and node.input[3]:
        av = ctx.fold(node.input[3])
        if av is None:
            ctx.block(x.atoms, f"Pad '{label}' has axes computed at run time")
            return
        axes = [int(a) % rank for a in av.ravel()]
    axes = axes or list(range(rank))
    if x.axis not in axes:
        ctx.set_map(node.output[0], x)
        return
    pos = axes.index(x.axis)
    before, after = pads[pos], pads[pos + len(axes)]
    if before == 0 and after == 0:
        ctx.set_map(node.output[0], x)
        return
    mode = attr(node, "mode", "constant")
    if before < 0 or after < 0:
        ctx.block(x.atoms, f"Pad '{label}' crops the channel axis (negative pads)")
        return
    if mode != "constant":
        ctx.block(x.atoms, f"Pad '{label}' pads the channel axis in mode '{mode}'")
        return
    b, a = ctx.fresh(node, before), ctx.fresh(node, after)
    ctx.edit(PadChannels(node.name, pos, len(axes), b, a, tuple(pads)))
    ctx.set_map(node.output[0], ChannelMap(x.axis, np.concatenate([b, x.atoms, a])))


# --------------------------------------------------------------------------- axis movers
def _axes_of(ctx, node, *, input_pos: int = 1):
    a = attr(node, "axes")
    if a is None and len(node.input) > input_pos and node.input[input_pos]:
        v = ctx.const(node.input[input_pos])
        if v is None:
            return "runtime"
        a = [int(i) for i in v.ravel()]
    return a


@rule("Squeeze", "Unsqueeze")
def squeeze(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is None:
        return
    label = node_label(node)
    in_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    axes = _axes_of(ctx, node)
    if axes == "runtime" or in_shape is None or out_shape is None:
        ctx.block(x.atoms, f"{node.op_type} '{label}' has axes computed at run time")
        return
    if node.op_type == "Squeeze":
        axes = [a % len(in_shape) for a in axes] if axes else [i for i, d in enumerate(in_shape) if d == 1]
        if x.axis in axes:
            ctx.block(x.atoms, f"Squeeze '{label}' removes the channel axis")
            return
        new_axis = x.axis - sum(1 for a in axes if a < x.axis)
    else:
        axes = sorted(a % len(out_shape) for a in axes)
        new_axis = x.axis
        for a in axes:
            if a <= new_axis:
                new_axis += 1
    ctx.set_map(node.output[0], ChannelMap(new_axis, x.atoms))


@rule("Transpose")
def transpose(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is None:
        return
    rank = len(ctx.shape(node.input[0]) or ())
    perm = attr(node, "perm") or list(reversed(range(rank)))
    ctx.set_map(node.output[0], ChannelMap(list(perm).index(x.axis), x.atoms))


@rule("Flatten")
def flatten(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is None:
        return
    shp = ctx.shape(node.input[0])
    rank = len(shp)
    f = int(attr(node, "axis", 1)) % rank if rank else 1
    if f != x.axis or any(d is None for d in shp[f + 1 :]):
        ctx.block(x.atoms, f"Flatten '{node_label(node)}' (axis={f}) merges the channel axis with others")
        return
    inner = int(np.prod(shp[f + 1 :], dtype=np.int64))
    ctx.set_map(node.output[0], ChannelMap(1, np.repeat(x.atoms, inner)))


@rule("Reshape")
def reshape(ctx, node) -> None:
    """Two safe forms: keep every dim up to the channel axis (``[N, C, H*W]``),
    or flatten the channel axis with everything after it (``[N, C*H*W]``:
    channel ``c`` owns features ``c*H*W ... (c+1)*H*W-1``). The target's
    entry at the channel axis must be -1, 0, a run-time copy of the channel
    dim, or a constant onnxprune can rewrite; anything else blocks.
    """
    x = ctx.map(node.input[0])
    if x is None:
        return
    label = node_label(node)
    ins, outs = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    a = x.axis
    if ins is None or outs is None or any(d is None for d in ins[1:]) or any(d is None for d in outs[1:]):
        ctx.block(x.atoms, f"Reshape '{label}' has shapes onnxprune cannot infer")
        return
    # everything before the channel axis (the batch dim included) must stay as it is
    lead_same = len(outs) > a and list(outs[:a]) == list(ins[:a])
    if lead_same and len(outs) > a and outs[a] == ins[a]:
        atoms, factor = x.atoms, 1
    elif lead_same and len(outs) == a + 1 and outs[a] == int(np.prod(ins[a:])):
        factor = int(np.prod(ins[a + 1 :], dtype=np.int64))
        atoms = np.repeat(x.atoms, factor)
    else:
        ctx.block(x.atoms, f"Reshape '{label}' reshapes the channel axis ({list(ins)} -> {list(outs)})")
        return
    entry = ctx.shape_entry(node.input[1], a, x)
    if entry == "keep":
        pass
    elif isinstance(entry, tuple) and entry[0] == "const":
        ctx.edit(ShapeEntry(entry[1], entry[2], x.atoms, factor, node.name))
    else:
        ctx.block(x.atoms, f"Reshape '{label}' target shape is computed in a way onnxprune cannot rewrite")
        return
    ctx.set_map(node.output[0], ChannelMap(a, atoms))


@rule("Resize", "Upsample")
def resize(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is None:
        return
    label = node_label(node)
    ins, outs = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if ins is None or outs is None or ins[x.axis] != outs[x.axis]:
        ctx.block(x.atoms, f"{node.op_type} '{label}' resizes the channel axis")
        return
    sizes_name = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 and node.input[3] else None
    axes = attr(node, "axes")  # opset 18: sizes/scales list only these axes
    position = x.axis
    if axes is not None:
        rank = len(ins)
        axes = [a % rank for a in axes]
        position = axes.index(x.axis) if x.axis in axes else None
    if sizes_name and position is not None:
        entry = ctx.shape_entry(sizes_name, position, x)
        if isinstance(entry, tuple) and entry[0] == "const":
            ctx.edit(ShapeEntry(entry[1], entry[2], x.atoms, 1, node.name))
        elif entry != "keep":
            ctx.block(x.atoms, f"Resize '{label}' output sizes are computed in a way onnxprune cannot rewrite")
            return
    ctx.set_map(node.output[0], x)


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")
def reduce(ctx, node) -> None:
    x = ctx.map(node.input[0])
    if x is None:
        return
    label = node_label(node)
    shp = ctx.shape(node.input[0])
    rank = len(shp)
    axes = _axes_of(ctx, node)
    if axes == "runtime":
        ctx.block(x.atoms, f"{node.op_type} '{label}' has axes computed at run time")
        return
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            ctx.set_map(node.output[0], x)
        else:
            ctx.block(x.atoms, f"{node.op_type} '{label}' reduces over the channel axis")
        return
    axes = [a % rank for a in axes]
    if x.axis in axes:
        ctx.block(x.atoms, f"{node.op_type} '{label}' reduces over the channel axis")
        return
    keep = int(attr(node, "keepdims", 1))
    new_axis = x.axis if keep else x.axis - sum(1 for a in axes if a < x.axis)
    ctx.set_map(node.output[0], ChannelMap(new_axis, x.atoms))


@rule("Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "LRN", "LayerNormalization", "GroupNormalization", "TopK", "CumSum")
def along_axis(ctx, node) -> None:
    """Ops that mix values along one axis: fine unless that axis is the channel axis."""
    x = ctx.map(node.input[0])
    if x is None:
        return
    label = node_label(node)
    rank = len(ctx.shape(node.input[0]) or ())
    if node.op_type in ("LRN", "GroupNormalization"):
        ctx.block(x.atoms, f"{node.op_type} '{label}' mixes neighbouring channels")
        return
    default = -1 if (node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and ctx.opset >= 13) else (1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") else 0)
    if node.op_type == "LayerNormalization":
        default = -1
    axis = int(attr(node, "axis", default)) % rank if rank else 0
    mixes = axis == x.axis
    if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and ctx.opset < 13:
        mixes = axis <= x.axis
    if node.op_type == "LayerNormalization":
        mixes = axis <= x.axis
    if mixes or node.op_type in ("ArgMax", "ArgMin", "TopK", "CumSum"):
        ctx.block(x.atoms, f"{node.op_type} '{label}' works along the channel axis")
        return
    ctx.set_map(node.output[0], x)


def describe_registry() -> dict[str, str]:
    """op type -> rule name, for documentation and tests."""
    return {op: fn.__name__ for op, fn in sorted(RULES.items())}


__all__ = ["RULES", "rule", "unknown", "ChannelMap", "describe_registry"]
