"""Load, inspect and save ONNX models safely.

* :func:`load_model` reads a path (external data too), refusing external data
  that points outside the model's folder, and reports every failure as a
  :class:`~onnxprune.errors.BadModelError` naming the file and the fix.
  Large files are parsed and checked one tensor at a time; the weights of
  models with over 2 GB of external data stay on disk (lazy tensors, see
  :mod:`onnxprune.tensors`).
* :func:`infer_shapes` returns a shape for every tensor it can, using ONNX
  shape inference first and an ONNX Runtime dry run (batch 1) for what is
  still unknown; both run on weightless copies.
* :func:`save_model` writes atomically: a temporary file in the target folder,
  then ``os.replace``; a failure leaves nothing behind. It writes one tensor
  at a time (no serialized copy of the whole model).
* :class:`GraphIndex` maps tensors to their producer, consumers and constant
  values (initializers or ``Constant`` nodes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadModelError, OutputError, ShapeError, UsageError
from .tensors import (
    InlinePlan,
    check_in_parts,
    externalize,
    has_lazy,
    is_lazy,
    make_lazy,
    materialize,
    parse_model_file,
    plain_dtype,
    release_freed_memory,
    tensor_value,
    write_inline,
)

log = logging.getLogger(__name__)

#: Models above this size (protobuf limit) are saved with external data.
PROTOBUF_LIMIT = 2**31 - 2**20
Shape = tuple  # tuple of int | None; None is an unknown or symbolic dim
#: Largest input (bytes, batch 1) the ONNX Runtime dry run in :func:`infer_shapes` will feed.
DRY_RUN_INPUT_LIMIT = 2**30
#: load_model(lazy=None) keeps weights on disk when a model's external data reaches this size.
LAZY_THRESHOLD = PROTOBUF_LIMIT
#: Smallest external tensor kept on disk by a lazy load (smaller ones are read at once).
LAZY_MIN_BYTES = 2**20
#: Model files from this size on are parsed and checked one tensor at a time (see load_model).
LEAN_LOAD_BYTES = 64 * 2**20


def proto_size(model: onnx.ModelProto) -> int:
    """Serialized size of ``model`` (measured one tensor at a time), or ``2**31`` when protobuf refuses to measure it."""
    return InlinePlan(model).size


# --------------------------------------------------------------------------- load
def _check_external_locations(model: onnx.ModelProto, base: Path) -> None:
    base_resolved = base.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            raise BadModelError(
                f"initializer '{tensor.name}' points to external data '{loc}' outside the model's folder",
                fix="keep external data files next to the model (relative paths without '..')",
            )
        target = (base / loc).resolve()
        if base_resolved not in target.parents and target != base_resolved:
            raise BadModelError(
                f"initializer '{tensor.name}' points to external data '{loc}' outside the model's folder",
                fix="keep external data files next to the model",
            )
        if not target.is_file():
            raise BadModelError(
                f"external data file '{loc}' for initializer '{tensor.name}' is missing",
                fix=f"copy '{loc}' next to the model (into '{base.resolve()}')",
            )
        length = int(info.get("length", "-1") or -1)
        offset = int(info.get("offset", "0") or 0)
        size = target.stat().st_size
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise BadModelError(
                f"external data file '{loc}' is shorter than initializer '{tensor.name}' needs (truncated?)",
                fix="re-export the model or restore the complete data file",
            )


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def check_model_path(path: str | os.PathLike) -> Path:
    """Cheap checks of a model path (exists, a file, readable) before any work; return it as a Path."""
    p = Path(path)
    if not p.exists():
        raise BadModelError(f"model file '{p}' does not exist", fix="check the path")
    if p.is_dir():
        raise BadModelError(f"'{p}' is a directory, not a model file", fix="pass the path of an .onnx file")
    if not os.access(p, os.R_OK):
        raise BadModelError(f"model file '{p}' is not readable", fix="check its permissions")
    return p


def load_model(path: str | os.PathLike, *, load_weights: bool = True, lazy: bool | None = None) -> onnx.ModelProto:
    """Read an ONNX model from ``path``; raise :class:`BadModelError` on any problem.

    External data is read into the model, except with ``lazy`` (default:
    when the external data reaches :data:`LAZY_THRESHOLD`, i.e. the model could
    not be one protobuf message anyway): then initializers of at least
    :data:`LAZY_MIN_BYTES` stay on disk as *lazy* tensors, read on demand (see
    :mod:`onnxprune.tensors`; :func:`~onnxprune.tensors.materialize` reads
    them in). ``load_weights=False`` leaves external tensors unread.

    Files of :data:`LEAN_LOAD_BYTES` or more are parsed one field (one
    initializer) at a time and checked tensor by tensor
    (:func:`~onnxprune.tensors.parse_model_file`,
    :func:`~onnxprune.tensors.check_in_parts`): ``onnx.load`` and the path
    checker each hold the file's bytes and the parsed model at once (2x).

    Example: ``model = load_model("resnet.onnx")``.
    """
    p = check_model_path(path)
    lean = p.stat().st_size >= LEAN_LOAD_BYTES and _binary_format(p)
    checker_error = None
    if not lean:
        # The checker parses the file itself (a transient copy of it): run it
        # before loading, so that copy and ours never coexist; its verdict is
        # reported in the usual order, after the checks below.
        checker_error = _checker_verdict(lambda: onnx.checker.check_model(str(p)))
    try:
        model = parse_model_file(p) if lean else onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise BadModelError(
            f"'{p}' is not a valid ONNX model ({type(exc).__name__}: {str(exc)[:120]})",
            fix="pass an ONNX file exported by torch.onnx, tf2onnx or similar; the file may be truncated",
        ) from exc
    if lean:  # large file: check the parsed model tensor by tensor (unless external data needs the path)
        parts = _all_inline(model) and model.ir_version > 3  # else the path checker (it resolves external data; IR<=3 rules)
        checker_error = _checker_verdict(lambda: check_in_parts(model) if parts else onnx.checker.check_model(str(p)))
    if not model.graph.node and not model.graph.input:
        raise BadModelError(
            f"'{p}' does not contain an ONNX graph (empty or not an ONNX file)",
            fix="pass an ONNX file exported by torch.onnx, tf2onnx or similar",
        )
    _check_external_locations(model, p.parent)
    if load_weights:
        if lazy is None:
            lazy = _external_bytes(model, p.parent) >= LAZY_THRESHOLD
        try:
            if lazy:
                _load_lazily(model, p)
            else:
                onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except BadModelError:
            raise
        except Exception as exc:
            raise BadModelError(f"cannot read external data of '{p}': {exc}", fix="restore the data files") from exc
    if checker_error is not None:
        raise BadModelError(
            f"'{p}' fails the ONNX checker: {str(checker_error).splitlines()[0][:200]}",
            fix="re-export the model; onnxprune only reads valid ONNX",
        ) from checker_error
    _check_tensor_sizes(model, p)
    release_freed_memory()  # the transient copies above must not stay in the heap for the whole run
    return model


def _checker_verdict(check) -> Exception | None:
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - reported by the caller, in order
        return exc
    return None


def _binary_format(p: Path) -> bool:
    """Whether onnx reads ``p`` as binary protobuf (not a text format, by its extension)."""
    try:
        fmt = onnx.serialization.registry.get_format_from_file_extension(p.suffix)
    except Exception:  # an onnx without the registry: only binary files
        return True
    return fmt in (None, "protobuf")


def _external_info(t: onnx.TensorProto, base: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor; the length defaults to the rest of the file."""
    info = {e.key: e.value for e in t.external_data}
    target = base / info.get("location", "")
    offset = int(info.get("offset", "0") or 0)
    length = int(info.get("length", "-1") or -1)
    if length < 0:
        length = target.stat().st_size - offset
    return target, offset, length


def _external_bytes(model: onnx.ModelProto, base: Path) -> int:
    return sum(_external_info(t, base)[2] for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)


def _load_lazily(model: onnx.ModelProto, p: Path) -> None:
    """Large external initializers become lazy tensors (checked, not read); the rest is read now."""
    base = p.parent
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        target, offset, length = _external_info(t, base)
        n = int(np.prod([int(d) for d in t.dims], dtype=np.int64))
        need = _raw_size(t.data_type, n)
        if need is not None and (need != length or any(d < 0 for d in t.dims)):
            raise BadModelError(
                f"tensor '{t.name}' of shape {list(t.dims)} holds {length} bytes of data, not {need} (corrupt or truncated file)",
                fix="re-export the model or restore the original file",
            )
        if length >= LAZY_MIN_BYTES and plain_dtype(t.data_type) is not None:
            make_lazy(t, target, offset, length)
    for t in _all_tensors(model):  # small initializers and Constant attributes
        if t.data_location == onnx.TensorProto.EXTERNAL and not is_lazy(t):
            onnx.external_data_helper.load_external_data_for_tensor(t, str(base))


_TYPED_FIELDS = {  # data_type -> field holding one value per element when raw_data is empty
    onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.INT64: "int64_data", onnx.TensorProto.UINT64: "uint64_data",
    onnx.TensorProto.INT32: "int32_data", onnx.TensorProto.INT16: "int32_data", onnx.TensorProto.INT8: "int32_data",
    onnx.TensorProto.UINT16: "int32_data", onnx.TensorProto.UINT8: "int32_data", onnx.TensorProto.BOOL: "int32_data",
    onnx.TensorProto.FLOAT16: "int32_data", onnx.TensorProto.BFLOAT16: "int32_data", onnx.TensorProto.UINT32: "uint64_data",
}  # fmt: skip


def _raw_size(data_type: int, n: int) -> int | None:
    """Bytes of ``n`` packed elements of ``data_type`` in ``raw_data`` (None if unknown)."""
    try:
        if onnx.helper.tensor_dtype_to_string(data_type).endswith(("INT4", "FLOAT4E2M1")):
            return (n + 1) // 2
        return n * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except Exception:  # an unknown or undefined type: the checker's business
        return None


def _check_tensor_sizes(model: onnx.ModelProto, p: Path) -> None:
    """Every loaded constant holds exactly as much data as its dims say (the checker does not look)."""
    for t in _all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
            continue  # not loaded (load_weights=False), or variable-size strings
        n = 1
        for d in t.dims:
            n *= d
        if t.raw_data:
            have, need, unit = len(t.raw_data), _raw_size(t.data_type, n), "bytes"
            if need is None:
                continue
        elif t.data_type not in _TYPED_FIELDS:
            continue
        else:
            have, need, unit = len(getattr(t, _TYPED_FIELDS[t.data_type])), n, "values"
        if have != need or any(d < 0 for d in t.dims):
            raise BadModelError(
                f"tensor '{t.name}' of shape {list(t.dims)} holds {have} {unit} of data, not {need} (corrupt or truncated file)",
                fix="re-export the model or restore the original file",
            )


# --------------------------------------------------------------------------- shapes
def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME:1x3x224x224`` into ``("NAME", (1, 3, 224, 224))``."""
    name, sep, dims = spec.rpartition(":")
    try:
        if not sep or not name:
            raise ValueError
        shape = tuple(int(d) for d in dims.lower().split("x"))
        if not shape or any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise UsageError(
            f"malformed --input-shape '{spec}'",
            fix="write it as NAME:DIMS with positive integers, e.g. --input-shape input:1x3x224x224",
        ) from None
    return name, shape


def _dims(vi: onnx.ValueInfoProto) -> Shape | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (the data the user feeds)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _set_input_shapes(target: onnx.ModelProto, model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> None:
    """Fix the shapes of ``model``'s data inputs, as found (by name) among ``target``'s graph inputs."""
    names = {i.name for i in graph_inputs(model)}
    vis = {}
    for vi in target.graph.input:
        vis.setdefault(vi.name, vi)
    for name, shape in input_shapes.items():
        if name not in names:
            raise UsageError(
                f"--input-shape names '{name}', which is not a model input",
                fix=f"use one of: {', '.join(names) or '(none)'}",
            )
        vi = vis[name]
        old = _dims(vi)
        if old is not None and len(old) != len(shape):
            raise UsageError(
                f"--input-shape for '{name}' has {len(shape)} dims but the input has rank {len(old)}",
                fix=f"give {len(old)} dims, e.g. {name}:{'x'.join(_dim_hint(d, i, len(old)) for i, d in enumerate([1, *old[1:]]))}",
            )
        dims = vi.type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dims.add().dim_value = int(d)


def _dim_hint(d: int | None, i: int, rank: int) -> str:
    """A known dim as is; an unknown one as a placeholder (H, W for NCHW), for fix hints."""
    if d is not None:
        return str(d)
    return {2: "H", 3: "W"}.get(i, f"D{i}") if rank == 4 else f"D{i}"


def _ort_shapes(
    model: onnx.ModelProto, wanted: Sequence[str], input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Shape]:
    """Run the model once on zeros (batch 1) and read the shapes of ``wanted``.

    Float weights (and lazy ones) are fed as zero-filled inputs rather than
    copied into the session: shapes do not depend on their values, and the
    zeros are not even resident until ONNX Runtime reads them.
    """
    m = _weightless_copy(model, keep_unfed=True)
    if input_shapes:
        _set_input_shapes(m, model, input_shapes)
    kept = {t.name for t in m.graph.initializer}
    weights = {t.name: t for t in model.graph.initializer if t.name not in kept}
    have = {o.name for o in m.graph.output}
    for name in wanted:
        if name not in have:
            m.graph.output.add().name = name
    feeds = {}
    for vi in graph_inputs(m):
        t = weights.get(vi.name)
        if t is not None:
            feeds[vi.name] = np.zeros(tuple(t.dims), dtype=onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
            continue
        dims = _dims(vi)
        if dims is None:
            raise ShapeError(f"input '{vi.name}' has no shape", fix=f"pass --input-shape {vi.name}:1x3x224x224")
        shape = [1 if d is None else d for d in dims]
        if any(d is None for d in dims[1:]):
            raise ShapeError(
                f"input '{vi.name}' has dynamic dims {['?' if d is None else d for d in dims]} and shapes cannot be inferred",
                fix=f"pass --input-shape {vi.name}:{'x'.join(_dim_hint(d, i, len(dims)) for i, d in enumerate([1, *dims[1:]]))} with the real sizes",
            )
        elem = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if int(np.prod(shape, dtype=np.float64)) * np.dtype(elem).itemsize > DRY_RUN_INPUT_LIMIT:
            raise ShapeError(  # a malformed or hostile file must not make us allocate gigabytes
                f"input '{vi.name}' of shape {shape} is too large for a dry run to measure shapes",
                fix=f"pass --input-shape {vi.name}:DIMS with the real (smaller) sizes",
            )
        feeds[vi.name] = np.zeros(shape, dtype=elem)
    from .runtime import make_session

    try:  # CPU, no graph optimizations: only shapes are read
        outs = make_session(m.SerializeToString(), device="cpu", optimize=False).run_once(feeds, wanted)
    except Exception as exc:
        raise ShapeError(
            f"shapes could not be inferred and a dry run failed: {str(exc).splitlines()[0][:200]}",
            fix="pass --input-shape NAME:DIMS for each input",
        ) from exc
    return {n: tuple(int(d) for d in o.shape) for n, o in zip(wanted, outs)}


def _weightless_copy(model: onnx.ModelProto, *, keep_elements: int = 64, keep_unfed: bool = False) -> onnx.ModelProto:
    """A copy for shape inference: large initializers become typed graph inputs.

    Shape inference needs only their shapes; small ones (shape vectors,
    axes, split sizes) keep their values for data propagation, and with
    ``keep_unfed`` so does every tensor a dry run would not feed as zeros
    (integers of any size: indices; exotic float types).
    External (lazy) tensors always become inputs. This avoids copying
    hundreds of MB of weights for inference.
    """
    m = onnx.ModelProto()
    g = model.graph
    m.ir_version, m.producer_name = model.ir_version, model.producer_name
    m.opset_import.extend(model.opset_import)
    graph = m.graph
    graph.name = g.name
    graph.node.extend(g.node)
    graph.output.extend(g.output)
    graph.input.extend(g.input)
    declared = {i.name for i in g.input}
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        small = n <= keep_elements or (keep_unfed and t.data_type not in _ZERO_FED)
        if small and t.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(t)
        elif t.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if model.functions:
        m.functions.extend(model.functions)
    return m


#: Weight types the ONNX Runtime dry run feeds as zero-filled inputs (shapes do not depend on their values).
_ZERO_FED = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def infer_shapes(
    model: onnx.ModelProto, *, input_shapes: Mapping[str, Sequence[int]] | None = None, need: Sequence[str] = ()
) -> dict[str, Shape]:
    """Shapes of all tensors (per ONNX inference, batch dims may be ``None``).

    Tensors listed in ``need`` must end up with known dims after the first
    axis; those still unknown are measured with an ONNX Runtime dry run.
    Works on weightless copies: the model's weights are never copied.
    """
    m = _weightless_copy(model)
    if input_shapes:
        _set_input_shapes(m, model, input_shapes)
    data_inputs = [vi for vi in m.graph.input if vi.name in {i.name for i in graph_inputs(model)}]
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as exc:
        log.debug("onnx shape inference failed: %s", exc)
        inferred = m
    shapes: dict[str, Shape] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        d = _dims(vi)
        if d is not None:
            shapes[vi.name] = d
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    missing = [n for n in need if n not in shapes or any(x is None for x in shapes[n][1:])]
    if missing:
        log.debug("running ONNX Runtime to measure %d shapes", len(missing))
        measured = _ort_shapes(model, missing, input_shapes)
        symbolic_batch = any((_dims(vi) or (1,))[0] is None for vi in data_inputs)
        for n, s in measured.items():
            old = shapes.get(n)
            # keep a symbolic batch dim symbolic: the dry run used batch 1
            # (only when the model's batch is symbolic: a fixed-batch model's dry run ran at its real batch)
            if symbolic_batch and ((old and len(old) == len(s) and old[0] is None) or (not old and len(s) >= 2 and s[0] == 1)):
                s = (None, *s[1:])
            shapes[n] = s
    return shapes


# --------------------------------------------------------------------------- index
@dataclass
class GraphIndex:
    """Producer/consumer maps and constant lookup for one model (read-only use)."""

    model: onnx.ModelProto

    def __post_init__(self) -> None:
        g = self.model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        for node in g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
            if node.op_type == "Constant" and node.output:
                self.constant_nodes[node.output[0]] = node
        self.graph_outputs = {o.name for o in g.output}
        self.graph_inputs = {i.name for i in graph_inputs(self.model)}

    def const(self, name: str) -> np.ndarray | None:
        """Value of ``name`` if it is an initializer or a ``Constant`` output."""
        if not name:
            return None
        t = self.initializers.get(name)
        if t is not None:
            return tensor_value(t)  # a read-only view when the tensor is lazy; nothing is cached
        node = self.constant_nodes.get(name)
        if node is None:
            return None
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name == "value_float":
                return np.array(a.f, dtype=np.float32)
            if a.name == "value_floats":
                return np.array(list(a.floats), dtype=np.float32)
            if a.name == "value_int":
                return np.array(a.i, dtype=np.int64)
            if a.name == "value_ints":
                return np.array(list(a.ints), dtype=np.int64)
        return None

    def is_const(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes


def attr(node: onnx.NodeProto, name: str, default=None):
    """Attribute value of ``node`` (ints, floats, strings decoded), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                return v.decode()
            if isinstance(v, list) and v and isinstance(v[0], bytes):
                return [x.decode() for x in v]
            return v
    return default


def node_label(node: onnx.NodeProto) -> str:
    """A name for messages: the node name, or its first output when unnamed."""
    return node.name or (node.output[0] if node.output else node.op_type)


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a unique name (``op_type_k``) in place."""
    seen = {n.name for n in model.graph.node if n.name}
    for k, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{k}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def opset_version(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


# --------------------------------------------------------------------------- save
def check_output_path(
    out: str | os.PathLike, *, input_path: str | os.PathLike | None = None, force: bool = False, flag: str = "-o/--output"
) -> Path:
    """Validate an output path before any work is done; return it as a Path. ``flag`` is the
    option that names it (``--report``, ``--csv``...), so the fix says which flag to change."""
    o = Path(out)
    if input_path is not None and o.resolve() == Path(input_path).resolve():
        raise OutputError(f"output '{o}' is the input model", fix=f"choose another name with {flag}")
    if not o.parent.exists():
        raise OutputError(f"output folder '{o.parent}' does not exist", fix=f"create it first (mkdir -p {o.parent})")
    if o.is_dir():
        raise OutputError(f"output '{o}' is a directory", fix=f"give a file name with {flag}")
    if not os.access(o.parent, os.W_OK):
        raise OutputError(f"output folder '{o.parent}' is not writable", fix=f"choose a writable folder with {flag}")
    if o.exists() and not force:
        raise OutputError(f"output '{o}' already exists", fix="pass --force to overwrite it or choose another name")
    return o


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it to ``target``.

    On any exception (KeyboardInterrupt included) the temporary file is removed.
    """
    target = Path(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _write_error(target, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files: give the result the mode a plain open() would (or the old file's)
        os.chmod(tmp_path, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, OSError):  # disk full, permissions...: one line, not a traceback
            raise _write_error(target, exc) from exc
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(target: Path, exc: OSError) -> OutputError:
    return OutputError(
        f"cannot write '{target}' ({exc.strerror or type(exc).__name__})",
        fix="check free disk space and that the folder is writable, or choose another path with -o/--output",
    )


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(target, text.encode())


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Save ``model`` atomically. Large models (>2 GB) go to ``<name>.data`` beside it.

    Written one tensor at a time: no serialized (or converted) copy of the
    whole model is made. Lazy tensors are copied from their files block by
    block. ``external_data=None`` chooses external data for models with
    lazy tensors and for those over the protobuf limit.
    """
    path = Path(path)
    plan = None
    if external_data is None:
        if has_lazy(model) or not _all_inline(model):
            external_data = True
        else:
            plan = InlinePlan(model)
            external_data = plan.size >= PROTOBUF_LIMIT
    if not external_data:
        if has_lazy(model):  # asked for one file: the weights must come into memory
            model = materialize(model)
        plan = plan or InlinePlan(model)
        if plan.size >= 2**31:
            raise OutputError(f"model too large to serialize ({plan.size:,} bytes)", fix="save with external data")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                write_inline(model, f, plan)
        return path
    data_name = path.name + ".data"
    # Both files are written completely under temporary names; then the data is
    # renamed into place, then the model that points at it (back to back). A
    # failure or Ctrl-C before that leaves neither; a failure between the two
    # renames removes the new data file unless one existed before.
    data_target = path.parent / data_name
    had_data = data_target.exists()
    try:
        with atomic_path(path) as tmp_model, atomic_path(data_target) as tmp_data:
            with open(tmp_data, "wb") as f:
                m = externalize(model, f, data_name)
            with open(tmp_model, "wb") as f:
                write_inline(m, f)
    except BaseException:
        if not had_data:
            with contextlib.suppress(FileNotFoundError):
                data_target.unlink()
        raise
    return path


def has_external_data(path: str | os.PathLike, *, max_proto_bytes: int = 64 * 2**20) -> bool:
    """Whether the model file keeps tensors in external data files (reads the graph, not the data).

    Files over ``max_proto_bytes`` hold their weights inline (mostly): they are not parsed again.
    """
    p = Path(path)
    try:
        if p.stat().st_size > max_proto_bytes:
            return False
        return not _all_inline(onnx.load(str(p), load_external_data=False))
    except Exception:  # load_model reports problems with the file itself
        return False


def _all_inline(model: onnx.ModelProto) -> bool:
    return all(t.data_location != onnx.TensorProto.EXTERNAL for t in _all_tensors(model))
