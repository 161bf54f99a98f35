"""Find the channel groups of an ONNX graph.

Every output channel of a producer (Conv, ConvTranspose, Gemm, MatMul, and
the constant channels a Pad or Concat adds) is an *atom*. Walking the graph
in order, the op rules (:mod:`onnxprune.rules`) give each tensor a channel
map (its channel axis and the atom at each position) and *unite* atoms that
must be removed together: the two inputs of a residual Add, a gate and the
tensor it scales, the positions of a grouped conv across groups. A *unit* is
a set of united atoms: removing it removes every position carrying one of
its atoms. A :class:`ChannelGroup` is the set of units owned by the same
producers (e.g. channel ``j`` of every conv feeding one residual stream);
allocation gives each group a ratio, importance ranks its units.

A group is blocked, with a reason in plain words, when any of its channels
reaches a graph output, an op without a rule, an excluded node, or anything
else the rules cannot rewrite exactly.

Example::

    cg = find_groups(load_model("resnet.onnx"))
    for g in cg.groups:
        print(g.id, g.channels, g.blocked_reason or "prunable")
"""

from __future__ import annotations

import fnmatch
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx.numpy_helper

from . import rules
from .edits import ComputeMap, Edit, ShapeEntry, SliceBounds, SliceTensor, SplitSizes
from .errors import UnsupportedModelError
from .flops import is_compute, shapes_needed
from .graph import GraphIndex, infer_shapes, node_label, opset_version
from .input_shapes import metadata_shapes
from .normalize import apply_normalizations, plan_normalizations, summarize, why_not_constant
from .rules import ChannelMap
from .tensors import release_freed_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together.

    ``units`` are global unit ids in the group's order; ``channel_ids[i]`` is
    the original channel index of unit ``i`` in its first producer (the
    numbering plans use). ``macs`` is the MACs of every compute node whose
    weights this group slices.
    """

    id: str
    producers: tuple[str, ...]
    members: tuple[str, ...]
    channels: int
    units: tuple[int, ...]
    channel_ids: tuple[int, ...]
    macs: int
    macs_share: float
    blocked_reason: str | None = None

    @property
    def prunable(self) -> bool:
        return self.blocked_reason is None


@dataclass(frozen=True, eq=False)
class ChannelGraph:
    """Result of :func:`find_groups`: everything pruning needs, read-only.

    ``model`` is the analyzed model: the caller's own when its nodes were all
    named (see :func:`find_groups`); nothing here or downstream mutates it.
    """

    model: onnx.ModelProto
    groups: tuple[ChannelGroup, ...]
    unit_of_atom: np.ndarray
    n_units: int
    edits: tuple[Edit, ...]
    compute: tuple[ComputeMap, ...]
    tensor_maps: Mapping[str, tuple[int, np.ndarray]]
    shapes: Mapping[str, tuple]
    total_macs: int
    atom_owner: tuple[str, ...]
    atom_channel: np.ndarray
    segments: tuple = ()  # (node name, unit ids): each must keep at least one unit (Split outputs, Slice ranges)
    normalizations: tuple = ()  # onnxprune.normalize.Normalization: changes beyond pruning made before analysis

    def empty_segment(self, unit_kept: np.ndarray) -> str | None:
        """Name of a Split/Slice whose output would lose every channel, else None."""
        for name, units in self.segments:
            if len(units) and not unit_kept[units].any():
                return name
        return None

    def group(self, gid: str) -> ChannelGroup:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(gid)

    @property
    def prunable_groups(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def full_mask(self) -> np.ndarray:
        return np.ones(self.n_units, dtype=bool)

    def atom_kept(self, unit_kept: np.ndarray):
        """``kept(atoms) -> bool array`` for a mask over units."""
        uo = self.unit_of_atom

        def kept(atoms: np.ndarray) -> np.ndarray:
            return unit_kept[uo[np.asarray(atoms, dtype=np.int64)]]

        return kept

    def macs(self, unit_kept: np.ndarray | None = None) -> int:
        """MACs of the model after removing the units not in ``unit_kept``."""
        if unit_kept is None:
            return self.total_macs
        kept = self.atom_kept(unit_kept)
        total = 0
        for c in self.compute:
            out = int(kept(c.out_atoms).sum())
            cin = c.in_fixed if c.in_atoms is None else int(kept(c.in_atoms).sum())
            total += c.spatial * c.kernel * out * cin
        return total

    @property
    def output_prunable_share(self) -> float:
        """Share of total MACs in compute nodes whose output channels all belong to prunable groups
        (the MACs whose own filters onnxprune may remove; a stricter measure than :attr:`prunable_macs_share`)."""
        ok = np.zeros(self.n_units, dtype=bool)
        for g in self.prunable_groups:
            ok[list(g.units)] = True
        macs = sum(c.spatial * c.kernel * len(c.out_atoms) * (c.in_fixed if c.in_atoms is None else len(c.in_atoms))
                   for c in self.compute if len(c.out_atoms) and ok[self.unit_of_atom[c.out_atoms]].all())
        return macs / self.total_macs if self.total_macs else 0.0

    @property
    def prunable_macs_share(self) -> float:
        """Share of total MACs in compute nodes touched by at least one prunable group."""
        names = {m for g in self.prunable_groups for m in g.members}
        touched = sum(c.spatial * c.kernel * len(c.out_atoms) * (c.in_fixed if c.in_atoms is None else len(c.in_atoms)) for c in self.compute if c.node in names)
        return touched / self.total_macs if self.total_macs else 0.0


#: Most channels (summed over all producers) one analysis tracks; real CNNs have well under 10**5.
MAX_CHANNELS = 2**22


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


class _Context:
    """What rules see: channel maps, shapes, constants, and recording calls."""

    def __init__(self, model: onnx.ModelProto, shapes: Mapping[str, tuple], exclude: Sequence[str]):
        self.model = model
        self.index = GraphIndex(model)
        self.shapes = shapes
        self.opset = opset_version(model)
        self.maps: dict[str, ChannelMap] = {}
        self.uf = _UnionFind()
        self.owner: list[str] = []
        self.channel: list[int] = []
        self.blocked: dict[int, str] = {}
        self.edits: list[Edit] = []
        self.compute_maps: list[ComputeMap] = []
        self.exclude = tuple(exclude)

    # reading
    def map(self, name: str) -> ChannelMap | None:
        return self.maps.get(name) if name else None

    def shape(self, name: str):
        return self.shapes.get(name)

    def const(self, name: str):
        return self.index.const(name)

    def spatial(self, name: str) -> int:
        s = self.shapes.get(name)
        return int(np.prod([d or 1 for d in s[2:]], dtype=np.int64)) if s else 1

    # recording
    def set_map(self, name: str, m: ChannelMap) -> None:
        self.maps[name] = m

    def fresh(self, node, n: int, *, blocked: str | None = None) -> np.ndarray:
        label = node.name if hasattr(node, "name") else str(node)
        if int(n) < 0 or len(self.uf.parent) + int(n) > MAX_CHANNELS:  # a malformed shape must not exhaust memory
            raise UnsupportedModelError(
                f"'{label}' has {int(n):,} channels, more than onnxprune tracks ({MAX_CHANNELS:,} in the whole model; a malformed shape?)",
                fix="check the model's input and weight shapes (e.g. onnx.shape_inference) or re-export it",
            )
        start = self.uf.add(int(n))
        if blocked and hasattr(node, "name"):
            label = f"untracked:{node.name}"  # blocked stand-ins never join a real producer's group
        self.owner.extend([label] * int(n))
        self.channel.extend(range(int(n)))
        atoms = np.arange(start, start + int(n), dtype=np.int64)
        if blocked:
            self.block(atoms, blocked)
        return atoms

    def block(self, atoms, reason: str) -> None:
        for a in np.asarray(atoms, dtype=np.int64).ravel().tolist():
            self.blocked.setdefault(a, reason)

    def union(self, a, b) -> None:
        for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist()):
            self.uf.union(x, y)

    def tie_groups(self, atoms: np.ndarray, groups: int) -> None:
        rows = atoms.reshape(groups, -1)
        for r in rows[1:]:
            self.union(rows[0], r)

    def slice_tensor(self, node, tensor: str, axis: int, atoms: np.ndarray) -> None:
        if self.const(tensor) is None:
            self.block(atoms, f"{node.op_type} '{node_label(node)}' reads '{tensor}', which is not a constant onnxprune can slice: {why_not_constant(self.index, tensor)}")
            return
        self.edits.append(SliceTensor(tensor, int(axis), np.asarray(atoms, dtype=np.int64), node.name))

    def edit(self, e: Edit) -> None:
        self.edits.append(e)

    def compute(self, node, *, spatial, kernel, out_atoms, in_atoms, in_fixed: int = 1) -> None:
        self.compute_maps.append(ComputeMap(node.name, int(spatial), int(kernel), out_atoms, in_atoms, int(in_fixed)))

    # shape vectors (Reshape targets, Resize sizes)
    def _trace(self, name: str, depth: int = 0):
        """Origins of the entries of a 1-D int tensor: ('lit', v, tensor, i) or ('dim', t, i) or None."""
        if depth > 12:
            return None
        v = self.const(name)
        if v is not None:
            if v.ndim > 1:
                return None
            return [("lit", int(e), name, i) for i, e in enumerate(v.ravel().tolist())]
        node = self.index.producer.get(name)
        if node is None:
            return None
        op = node.op_type
        if op == "Shape":
            s = self.shapes.get(node.input[0])
            if s is None:
                return None
            r = len(s)
            start = rules.attr(node, "start", 0)
            end = rules.attr(node, "end", r)
            start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
            return [("dim", node.input[0], i) for i in range(max(0, start), min(r, end))]
        if op in ("Cast", "Identity", "Unsqueeze", "Squeeze"):
            return self._trace(node.input[0], depth + 1)
        if op == "Concat":
            out = []
            for i in node.input:
                t = self._trace(i, depth + 1)
                if t is None:
                    s = self.shapes.get(i)
                    if not s or s[0] is None:
                        return None
                    t = [None] * (s[0] if len(s) == 1 else 1)
                out.extend(t)
            return out
        if op == "Gather":
            data = self._trace(node.input[0], depth + 1)
            idx = self.const(node.input[1])
            if data is None or idx is None:
                return None
            return [data[int(i)] for i in np.atleast_1d(idx).tolist()]
        if op == "Slice" and self.opset >= 10:
            data = self._trace(node.input[0], depth + 1)
            st = self.const(node.input[1])
            en = self.const(node.input[2])
            if data is None or st is None or en is None or (len(node.input) > 4 and node.input[4]):
                return None
            return data[int(st.ravel()[0]) : int(min(en.ravel()[0], len(data)))]
        return None

    def fold(self, name: str):
        """Integer value of ``name`` if it can be computed before run time, else None."""
        v = self._fold(name)
        if v is None:
            return None
        v = np.asarray(v)
        if v.dtype.kind == "f":
            if np.isnan(v).any():
                return None
            return v.astype(np.int64)
        return v

    def _fold(self, name: str, depth: int = 0):
        """Value of a small int tensor computed from constants and static dims, or None.

        Handles the shape arithmetic exporters emit (``Shape -> Gather ->
        Add/Div/Mul -> Slice`` for ``torch.chunk``); a dynamic dim used in
        the result makes it ``None``.
        """
        v = self.const(name)
        if v is not None:
            return v
        node = self.index.producer.get(name)
        if node is None or depth > 24:
            return None
        op = node.op_type
        if op == "Shape":
            t = self._trace(name)
            if t is None:
                return None
            # unknown (dynamic) dims are NaN: they poison only what uses them
            return np.array([np.nan if self.shapes[o[1]][o[2]] is None else self.shapes[o[1]][o[2]] for o in t], dtype=np.float64)
        args = [self._fold(i, depth + 1) if i else None for i in node.input]
        if any(a is None for a, i in zip(args, node.input) if i):
            return None
        try:
            if op in ("Identity", "Cast"):
                return args[0]
            if op == "ConstantOfShape":
                val = rules.attr(node, "value")
                fill = 0 if val is None else onnx.numpy_helper.to_array(val).ravel()[0]
                return np.full(tuple(int(d) for d in args[0]), fill)
            if op == "Reshape":
                return np.reshape(args[0], tuple(int(d) for d in args[1]))
            if op == "Transpose":
                return np.transpose(args[0], rules.attr(node, "perm"))
            if op in ("Add", "Sub", "Mul", "Div"):
                a, b = args
                if a.dtype.kind not in "iuf" or b.dtype.kind not in "iuf":
                    return None
                if op == "Div":  # integer division truncates toward zero
                    return np.trunc(np.asarray(a, dtype=np.float64) / b)
                return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b)
            if op == "Gather":
                return np.take(args[0], args[1], axis=int(rules.attr(node, "axis", 0)))
            if op == "Concat":
                return np.concatenate([np.atleast_1d(a) for a in args], axis=int(rules.attr(node, "axis", 0)))
            if op == "Unsqueeze":
                axes = rules.attr(node, "axes") or args[1].tolist()
                return np.expand_dims(args[0], tuple(axes))
            if op == "Squeeze":
                axes = rules.attr(node, "axes") or (args[1].tolist() if len(args) > 1 else None)
                return np.squeeze(args[0], tuple(axes) if axes else None)
            if op == "Slice":
                st, en = args[1], args[2]
                ax = args[3] if len(args) > 3 and args[3] is not None else np.arange(len(st))
                stp = args[4] if len(args) > 4 and args[4] is not None else np.ones(len(st), dtype=np.int64)
                idx = [slice(None)] * args[0].ndim
                for a_, s_, e_, p_ in zip(ax.tolist(), st.tolist(), en.tolist(), stp.tolist()):
                    idx[a_] = slice(s_, e_, p_)
                return args[0][tuple(idx)]
        except Exception:  # malformed shape arithmetic: treat as unknown
            return None
        return None

    def shape_entry(self, name: str, pos: int, x: ChannelMap):
        """How the entry ``pos`` of shape vector ``name`` follows pruning.

        Returns ``"keep"`` (it adapts by itself: -1, 0, or a run-time copy of
        this very channel dim), ``("const", tensor, index)`` (a literal to
        rewrite), or ``None`` (cannot follow pruning).
        """
        origins = self._trace(name)
        if origins is None or pos >= len(origins) or origins[pos] is None:
            return None
        o = origins[pos]
        if o[0] == "lit":
            if o[1] in (-1, 0):
                return "keep"
            return ("const", o[2], o[3])
        if o[0] == "dim":
            m = self.map(o[1])
            if m is not None and m.axis == o[2] and len(m) == len(x) and np.array_equal(m.atoms, x.atoms):
                return "keep"
        return None


def _finish_shared_constants(ctx: _Context) -> None:
    """Constants shared by several nodes get private copies at rewrite time
    (see :mod:`onnxprune.rewrite`); only what a copy cannot fix is blocked:
    one node needing two different slices of the same constant on one axis,
    or a literal in a shape vector that is not a direct input of its node.
    """
    per_node: dict[tuple[str, str, int], set] = defaultdict(set)
    for e in ctx.edits:
        if isinstance(e, SliceTensor):
            per_node[(e.tensor, e.node, e.axis)].add(e.atoms.tobytes())
    for e in ctx.edits:
        if isinstance(e, SliceTensor) and len(per_node[(e.tensor, e.node, e.axis)]) > 1:
            ctx.block(e.atoms, f"node '{e.node}' reads constant '{e.tensor}' twice with different channels")
    entries: dict[tuple, list[ShapeEntry]] = defaultdict(list)
    for e in ctx.edits:
        if isinstance(e, ShapeEntry):
            entries[(e.tensor, e.position)].append(e)
    for key, es in entries.items():
        nodes = {e.node for e in es}
        users = {n.name for n in ctx.index.consumers.get(key[0], [])}
        direct = all(any(n.name == e.node and key[0] in n.input for n in ctx.index.consumers.get(key[0], [])) for e in es)
        if len(users) > 1 and not direct:
            for e in es:
                ctx.block(e.atoms, f"shape constant '{key[0]}' is shared by several nodes ({', '.join(sorted(users | nodes))})")


def _analysis_shapes(model, input_shapes):
    """Shapes of every tensor; an ORT dry run fills in what inference leaves unknown."""
    need = list(shapes_needed(model))
    first = infer_shapes(model, input_shapes=input_shapes, need=need)
    index = GraphIndex(model)
    missing = [
        o
        for n in model.graph.node
        if n.op_type not in ("Constant",) and n.domain in ("", "ai.onnx")
        for o in n.output
        if o and (o not in first or any(d is None for d in first[o][1:])) and not index.is_const(o)
    ]
    if not missing:
        return first
    try:
        return infer_shapes(model, input_shapes=input_shapes, need=need + missing)
    except Exception as exc:  # noqa: BLE001 - a failed dry run only costs precision
        log.debug("dry run for %d shapes failed: %s", len(missing), exc)
        return first


def find_groups(
    model: onnx.ModelProto,
    *,
    exclude: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    shapes: Mapping[str, tuple] | None = None,
) -> ChannelGraph:
    """Analyze ``model`` and return its channel groups (see module docstring).

    ``model`` is not changed. ``cg.model`` is ``model`` itself when all its
    nodes have names (no copy: weights can be gigabytes), else a copy with
    names added (``op_type_k``); treat both as read-only while ``cg`` is used.

    ``exclude`` holds node names or glob patterns (``"*head*"``) whose channels
    must stay; their groups are blocked with a reason.
    """
    from .graph import ensure_node_names

    renames, folded, normalizations = plan_normalizations(model)
    if all(n.name for n in model.graph.node) and not normalizations:
        m = model  # nothing to add: analyze the model itself, no copy of its weights
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        ensure_node_names(m)
        apply_normalizations(m, renames, folded)
        del renames, folded
        if normalizations:
            log.info("normalized constants: %s", summarize(normalizations))
    if shapes is None:
        if input_shapes is None:  # dynamic spatial dims: the file's metadata (Ultralytics imgsz) when present
            input_shapes = metadata_shapes(m)
        shapes = _analysis_shapes(m, input_shapes)
    ctx = _Context(m, shapes, exclude)
    index = ctx.index
    for vi in m.graph.input:
        if vi.name in index.initializers:
            continue
        s = shapes.get(vi.name)
        if s and len(s) >= 2 and s[1]:
            ctx.set_map(vi.name, ChannelMap(1, ctx.fresh(f"input:{vi.name}", s[1], blocked=f"channels of graph input '{vi.name}' are fixed")))
    compute_nodes = [n for n in m.graph.node if is_compute(n, index)]
    if not compute_nodes:
        raise UnsupportedModelError(
            "the model has no Conv, ConvTranspose, Gemm or MatMul with constant weights",
            fix="onnxprune prunes CNNs; pass a model with convolution or fully connected layers",
        )
    for node in m.graph.node:
        fn = rules.RULES.get(node.op_type, rules.unknown)
        if node.domain not in ("", "ai.onnx"):
            fn = rules.unknown
        fn(ctx, node)
        if ctx.exclude and any(fnmatch.fnmatchcase(node.name, p) for p in ctx.exclude):
            reason = f"node '{node.name}' is excluded (--exclude)"
            for t in [*node.input, *node.output]:
                mp = ctx.map(t)
                if mp is not None:
                    ctx.block(mp.atoms, reason)
    for out in m.graph.output:
        mp = ctx.map(out.name)
        if mp is not None:
            ctx.block(mp.atoms, f"channels reach graph output '{out.name}'")
    _finish_shared_constants(ctx)
    cg = _build(ctx, m, shapes, tuple(normalizations))
    release_freed_memory()  # the weights' transient copies read by the rules
    return cg


def _build(ctx: _Context, model, shapes, normalizations: tuple = ()) -> ChannelGraph:
    n_atoms = len(ctx.uf.parent)
    roots = np.array([ctx.uf.find(a) for a in range(n_atoms)], dtype=np.int64)
    uniq, unit_of_atom = np.unique(roots, return_inverse=True)
    n_units = len(uniq)
    node_order = {n.name: k for k, n in enumerate(model.graph.node)}
    owner_order = [node_order.get(o, -1) for o in ctx.owner]
    unit_atoms: list[list[int]] = [[] for _ in range(n_units)]
    for a, u in enumerate(unit_of_atom.tolist()):
        unit_atoms[u].append(a)
    unit_blocked: dict[int, str] = {}
    for a, reason in ctx.blocked.items():
        unit_blocked.setdefault(int(unit_of_atom[a]), reason)
    by_key: dict[frozenset, list[int]] = defaultdict(list)
    for u, atoms in enumerate(unit_atoms):
        by_key[frozenset(ctx.owner[a] for a in atoms)].append(u)

    # which nodes each unit touches (edits and compute maps)
    unit_members: dict[int, set] = defaultdict(set)
    macs_of_node: dict[str, int] = {}
    for c in ctx.compute_maps:
        macs_of_node[c.node] = c.spatial * c.kernel * len(c.out_atoms) * (c.in_fixed if c.in_atoms is None else len(c.in_atoms))
        for arr in (c.out_atoms, c.in_atoms):
            if arr is not None:
                for u in np.unique(unit_of_atom[arr]).tolist():
                    unit_members[u].add(c.node)
    for e in ctx.edits:
        arrays = [getattr(e, f) for f in ("atoms", "before", "after") if hasattr(e, f)]
        arrays += list(getattr(e, "parts", ()))
        for arr in arrays:
            if len(arr):
                for u in np.unique(unit_of_atom[arr]).tolist():
                    unit_members[u].add(e.node)
    total = sum(macs_of_node.values())

    groups = []
    for key, units in by_key.items():
        units.sort(key=lambda u: min((owner_order[a], ctx.channel[a]) for a in unit_atoms[u]))
        first_atoms = [min(unit_atoms[u], key=lambda a: (owner_order[a], ctx.channel[a])) for u in units]
        producers = tuple(sorted(key, key=lambda o: node_order.get(o, -1)))
        members = set()
        for u in units:
            members |= unit_members[u]
        reasons = [unit_blocked[u] for u in units if u in unit_blocked]
        reason = reasons[0] if reasons else None
        if reason is None and len(units) < 2:
            reason = "a single channel cannot be pruned"
        if reason is None and not any(macs_of_node.get(mm) for mm in members):
            reason = "touches no Conv/Gemm/MatMul, so pruning it saves nothing"
        macs = sum(macs_of_node.get(mm, 0) for mm in members)
        order = min(owner_order[a] for a in first_atoms)
        groups.append((order, producers, members, units, first_atoms, macs, reason))
    groups.sort(key=lambda t: (t[0], t[1]))
    out = []
    for k, (order, producers, members, units, first_atoms, macs, reason) in enumerate(groups):
        if all(p.startswith(("input:", "untracked:")) for p in producers):
            continue  # graph-input channels: not a group of the model's own
        sorted_members = tuple(sorted(members, key=lambda mm: node_order.get(mm, -1)))
        out.append(
            ChannelGroup(
                id=f"g{len(out)}",
                producers=producers,
                members=sorted_members,
                channels=len(units),
                units=tuple(units),
                channel_ids=tuple(int(ctx.channel[a]) for a in first_atoms),
                macs=int(macs),
                macs_share=float(macs / total) if total else 0.0,
                blocked_reason=reason,
            )
        )
    segments = []
    for e in ctx.edits:
        if isinstance(e, SplitSizes):
            segments += [(e.node, np.unique(unit_of_atom[p])) for p in e.parts]
        elif isinstance(e, SliceBounds):
            segments.append((e.node, np.unique(unit_of_atom[e.atoms[e.start : e.end]])))
    tensor_maps = {name: (m.axis, m.atoms) for name, m in ctx.maps.items()}
    log.debug("found %d groups (%d prunable)", len(out), sum(g.prunable for g in out))
    return ChannelGraph(
        model=model,
        groups=tuple(out),
        unit_of_atom=unit_of_atom,
        n_units=n_units,
        edits=tuple(ctx.edits),
        compute=tuple(ctx.compute_maps),
        tensor_maps=tensor_maps,
        shapes=shapes,
        total_macs=int(total),
        atom_owner=tuple(ctx.owner),
        atom_channel=np.asarray(ctx.channel, dtype=np.int64),
        segments=tuple(segments),
        normalizations=normalizations,
    )


def describe(cg: ChannelGraph) -> list[dict]:
    """Groups as plain dicts (for tables and JSON)."""
    return [
        {
            "id": g.id,
            "producers": list(g.producers),
            "channels": g.channels,
            "macs": g.macs,
            "macs_share": round(g.macs_share, 6),
            "prunable": g.prunable,
            "blocked_reason": g.blocked_reason,
        }
        for g in cg.groups
    ]


__all__ = ["ChannelGroup", "ChannelGraph", "find_groups", "describe", "node_label"]
