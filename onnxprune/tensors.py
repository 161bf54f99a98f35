"""Weights without copies: lazy external tensors, weightless skeletons, streamed writes.

Python's protobuf runtime (upb) copies on every access: reading ``t.raw_data``
returns a new ``bytes``, assigning one copies it into the message's arena,
``CopyFrom`` copies every weight, and a message frees nothing until it is
freed whole. A model of size S therefore costs 2-6 S in a naive pipeline.
This module is how onnxprune stays near S:

* *lazy tensors*: :func:`~onnxprune.graph.load_model` leaves the large
  initializers of very large external-data models on disk. A lazy tensor is an
  ordinary external-data ``TensorProto`` whose ``location`` is the absolute
  path of a data file ``load_model`` validated (and registered in this
  process); :func:`tensor_value` maps it read-only (``np.memmap``, nothing is
  read until used), :func:`read_rows` reads a block of rows. onnx and ONNX
  Runtime refuse absolute locations, so a lazy model handed to them fails
  loudly instead of reading a wrong file: :func:`materialize` first.
* :func:`skeleton`: a copy of a model without its initializers (nodes,
  inputs, metadata), to which a caller adds only the tensors it needs.
* :func:`write_sliced`: ``np.take`` of a (lazy or inline) tensor along several
  axes, block by block, straight into a new ``TensorProto``.
* :func:`write_inline` / :func:`externalize`: serialize a model one tensor at
  a time (the bytes are the same as ``SerializeToString``), or write its
  weights to an open data file one tensor at a time.
* :func:`parse_model_file` / :func:`check_in_parts`: ``onnx.load`` and
  ``onnx.checker.check_model(path)`` without holding the file's bytes and the
  parsed model at once (both hold 2x the file otherwise).

Example: ``w = tensor_value(model.graph.initializer[0])`` (a view, not a copy, when lazy).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .errors import BadModelError, OutputError

#: Data files load_model validated (an allow-list for this process): lazy tensors are read only from these.
_LAZY_FILES: set[str] = set()
#: Rows of a source tensor read at a time when slicing or streaming (bytes).
BLOCK_BYTES = 4 * 2**20
_PACKED = {onnx.TensorProto.STRING, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
_PACKED |= {getattr(onnx.TensorProto, n) for n in ("FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3", "FLOAT6E3M2") if hasattr(onnx.TensorProto, n)}


# --------------------------------------------------------------------------- memory
def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A tensor's transient buffers (its bytes, a sliced copy) freed between the
    long-lived blocks protobuf allocates for the next tensor otherwise stay in
    the process (heap fragmentation), adding up over hundreds of tensors.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None
#: Transient buffers at least this large are followed by :func:`release_freed_memory`.
TRIM_BYTES = 2**20


# --------------------------------------------------------------------------- lazy tensors
def plain_dtype(data_type: int) -> np.dtype | None:
    """Little-endian numpy dtype of a type stored one element per ``itemsize`` bytes, else None (strings, 4-bit...)."""
    if data_type in _PACKED:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).newbyteorder("<")
    except Exception:  # an undefined or unknown type
        return None


def make_lazy(t: onnx.TensorProto, data_file: Path, offset: int, length: int) -> None:
    """Point external tensor ``t`` at the absolute path of ``data_file`` (validated by the caller) and register it."""
    path = str(Path(data_file).resolve())
    _LAZY_FILES.add(path)
    set_external(t, path, offset, length)


def set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = key, value


def is_lazy(t: onnx.TensorProto) -> bool:
    """External tensor with an absolute location (made by :func:`make_lazy`, or an untrusted one :func:`_source` refuses)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return False
    return any(e.key == "location" and os.path.isabs(e.value) for e in t.external_data)


def _source(t: onnx.TensorProto) -> tuple[str, int, int, np.dtype]:
    """(file, offset, length, dtype) of a lazy tensor; refuses files load_model did not validate."""
    info = {e.key: e.value for e in t.external_data}
    path = info.get("location", "")
    if path not in _LAZY_FILES:
        raise BadModelError(
            f"tensor '{t.name}' points to external data '{path}', which onnxprune did not load",
            fix="load the model with onnxprune.graph.load_model (external data relative to the model's folder)",
        )
    dtype = plain_dtype(t.data_type)
    if dtype is None:
        raise BadModelError(f"tensor '{t.name}' has a type onnxprune cannot read lazily", fix="load the model with lazy=False")
    return path, int(info.get("offset", 0)), int(info.get("length", 0)), dtype


def _read_error(t: onnx.TensorProto, path: str, exc: Exception) -> BadModelError:
    return BadModelError(
        f"cannot read the data of '{t.name}' from '{path}' ({type(exc).__name__}: {str(exc)[:120]}); was the file changed or truncated?",
        fix="restore the model's external data file",
    )


def tensor_value(t: onnx.TensorProto) -> np.ndarray:
    """Value of ``t``: a read-only ``np.memmap`` when lazy (read on use), else ``numpy_helper.to_array`` (one copy)."""
    if not is_lazy(t):
        return numpy_helper.to_array(t)
    path, offset, _, dtype = _source(t)
    try:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(t.dims))
    except (OSError, ValueError) as exc:
        raise _read_error(t, path, exc) from exc


def read_rows(t: onnx.TensorProto, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of axis 0 of lazy tensor ``t``, read from its file into a new array."""
    path, offset, _, dtype = _source(t)
    dims = tuple(int(d) for d in t.dims)
    row = int(np.prod(dims[1:], dtype=np.int64))
    count = (stop - start) * row
    try:
        with open(path, "rb") as f:
            arr = np.fromfile(f, dtype=dtype, count=count, offset=offset + start * row * dtype.itemsize)
    except (OSError, ValueError) as exc:
        raise _read_error(t, path, exc) from exc
    if arr.size != count:
        raise _read_error(t, path, EOFError("the file is shorter than the tensor"))
    return arr.reshape((stop - start, *dims[1:]))


def copy_bytes(t: onnx.TensorProto, out: BinaryIO, *, block: int = BLOCK_BYTES) -> int:
    """Copy the bytes of lazy tensor ``t`` into ``out`` block by block; return how many.

    Read errors become :class:`BadModelError`; write errors stay ``OSError`` (the caller's to report).
    """
    path, offset, length, _ = _source(t)
    done = 0
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise _read_error(t, path, exc) from exc
    with f:
        f.seek(offset)
        while done < length:
            try:
                chunk = f.read(min(block, length - done))
            except OSError as exc:
                raise _read_error(t, path, exc) from exc
            if not chunk:
                raise _read_error(t, path, EOFError("the file is shorter than the tensor"))
            out.write(chunk)
            done += len(chunk)
    return done


def read_bytes(t: onnx.TensorProto) -> bytes:
    """All bytes of lazy tensor ``t``."""
    path, offset, length, _ = _source(t)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as exc:
        raise _read_error(t, path, exc) from exc
    if len(data) != length:
        raise _read_error(t, path, EOFError("the file is shorter than the tensor"))
    return data


def has_lazy(model: onnx.ModelProto) -> bool:
    return any(is_lazy(t) for t in model.graph.initializer)


# --------------------------------------------------------------------------- copies without weights
def _is_repeated(fd) -> bool:
    r = getattr(fd, "is_repeated", None)
    return bool(r) if r is not None else fd.label == fd.LABEL_REPEATED


def _copy_fields(src, dst, keep: Callable[[object], bool]) -> None:
    """Copy the set fields of ``src`` for which ``keep(field_descriptor)`` into ``dst`` (same message type)."""
    for fd, value in src.ListFields():
        if not keep(fd):
            continue
        if _is_repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _has_unknown_fields(msg) -> bool:
    try:
        from google.protobuf import unknown_fields

        return len(unknown_fields.UnknownFieldSet(msg)) > 0
    except Exception:  # an old protobuf without the API: assume there may be some
        return True


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without ``graph.initializer`` (no weight is copied); add tensors to it as needed."""
    m = onnx.ModelProto()
    if _has_unknown_fields(model) or _has_unknown_fields(model.graph):  # rare: keep them, at the price of a copy
        m.CopyFrom(model)
        del m.graph.initializer[:]
        return m
    _copy_fields(model, m, lambda fd: fd.name != "graph")
    if model.HasField("graph"):
        m.graph.SetInParent()
        _copy_fields(model.graph, m.graph, lambda fd: fd.name != "initializer")
    return m


def copy_meta(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
    """Name, dims, type, doc string... of ``src`` into ``dst``; not its data nor its storage."""
    _copy_fields(src, dst, lambda fd: fd.name not in ("raw_data", "external_data", "data_location"))


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its lazy tensors read into memory (a new model), or ``model`` itself when none is lazy.

    Needed before handing a lazily loaded model to ONNX Runtime, onnx or torch.
    """
    if not has_lazy(model):
        return model
    m = skeleton(model)
    for t in model.graph.initializer:
        dst = m.graph.initializer.add()
        if is_lazy(t):
            copy_meta(t, dst)
            dst.raw_data = read_bytes(t)
        else:
            dst.CopyFrom(t)
    return m


# --------------------------------------------------------------------------- writing tensors
def fill_from_array(dst: onnx.TensorProto, arr: np.ndarray, name: str) -> None:
    """Set ``dst`` to ``numpy_helper.from_array(arr, name)`` (same proto, fewer intermediate copies)."""
    data_type = _raw_type(arr.dtype)
    if data_type is None:
        dst.CopyFrom(numpy_helper.from_array(arr, name))
        return
    _fill_raw(dst, name, data_type, arr.shape, numpy_helper.tobytes_little_endian(arr))


def _raw_type(dtype: np.dtype) -> int | None:
    """ONNX type of a plain numeric numpy dtype stored as ``raw_data``, else None."""
    if dtype.kind not in "biuf" or dtype.hasobject:
        return None
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    except Exception:
        return None
    return data_type if plain_dtype(data_type) is not None else None


def _fill_raw(dst: onnx.TensorProto, name: str, data_type: int, shape, data: bytes) -> None:
    dst.dims.extend(int(d) for d in shape)
    if name:
        dst.name = name
    dst.data_type = data_type
    dst.raw_data = data


def _take_all(arr: np.ndarray, takes: Mapping[int, np.ndarray]) -> np.ndarray:
    for axis, idx in takes.items():
        arr = np.take(arr, idx, axis=axis)
    return np.ascontiguousarray(arr)


def write_sliced(dst: onnx.TensorProto, src: onnx.TensorProto, takes: Mapping[int, np.ndarray], *, name: str | None = None) -> None:
    """``dst`` := ``src`` after ``np.take(·, idx, axis)`` for every ``axis: idx`` in ``takes`` (in order).

    Reads ``src`` block by block along axis 0 (lazy tensors straight from
    their file) into one output array, so the extra memory is about twice the
    output (the array, then its bytes for the protobuf) plus one block.
    The values are exactly those of the plain ``np.take`` chain. ``name``
    defaults to ``src.name``.
    """
    name = src.name if name is None else name
    dims = tuple(int(d) for d in src.dims)
    idx0 = takes.get(0)
    simple = plain_dtype(src.data_type) is None or not dims or _raw_type(np.dtype(plain_dtype(src.data_type))) is None
    if simple or (idx0 is not None and len(idx0) > 1 and np.any(np.diff(idx0) <= 0)):
        fill_from_array(dst, _take_all(tensor_value(src), takes), name)  # packed types, scalars, unsorted picks
        return
    lazy = is_lazy(src)
    full = None if lazy else tensor_value(src)
    dtype = np.dtype(plain_dtype(src.data_type)) if full is None else full.dtype
    out = np.empty(tuple(len(takes[a]) if a in takes else d for a, d in enumerate(dims)), dtype=dtype)
    row_bytes = max(1, int(np.prod(dims[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, BLOCK_BYTES // row_bytes)
    pos = 0
    for s in range(0, dims[0], step):
        e = min(dims[0], s + step)
        if idx0 is not None:
            lo, hi = np.searchsorted(idx0, [s, e])
            if lo == hi:
                continue
        block = read_rows(src, s, e) if lazy else full[s:e]
        if idx0 is not None:
            block = np.take(block, idx0[lo:hi] - s, axis=0)
        for axis, idx in takes.items():
            if axis:
                block = np.take(block, idx, axis=axis)
        out[pos : pos + len(block)] = block
        pos += len(block)
        del block
    del full
    shape = out.shape
    data = numpy_helper.tobytes_little_endian(out)
    del out  # the bytes are the only copy while protobuf makes its own
    _fill_raw(dst, name, src.data_type, shape, data)
    if len(data) >= TRIM_BYTES:
        del data
        release_freed_memory()


# --------------------------------------------------------------------------- writing models
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _part(msg, keep: Callable[[int], bool]):
    part = type(msg)()
    _copy_fields(msg, part, lambda fd: keep(fd.number))
    return part.SerializeToString()


_GRAPH_FIELD, _INIT_FIELD, _RAW_FIELD = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


class _TensorPlan:
    """Serialized size of one initializer; a raw-data tensor is written as its
    fields before ``raw_data``, the raw bytes, its fields after (no serialized copy)."""

    __slots__ = ("head", "tail", "raw_len", "size")

    def __init__(self, t: onnx.TensorProto):
        self.head = self.tail = None
        self.raw_len = 0
        if t.HasField("raw_data") and not _has_unknown_fields(t):
            self.head = _part(t, lambda n: n < _RAW_FIELD)
            self.tail = _part(t, lambda n: n > _RAW_FIELD)
            raw = t.raw_data  # a copy (upb), measured and dropped
            self.raw_len = len(raw)
            del raw
            if self.raw_len >= TRIM_BYTES:
                release_freed_memory()
            self.size = len(self.head) + 1 + len(_varint(self.raw_len)) + self.raw_len + len(self.tail)
        else:
            self.size = _byte_size(t)

    def write(self, t: onnx.TensorProto, f: BinaryIO) -> None:
        if self.head is None:
            data = t.SerializeToString()
            n = len(data)
        else:
            f.write(self.head)
            f.write(bytes([_RAW_FIELD << 3 | 2]) + _varint(self.raw_len))
            data = t.raw_data
            n = len(self.head) + 1 + len(_varint(len(data))) + len(data) + len(self.tail)
        if n != self.size:
            raise OutputError(f"tensor '{t.name}' changed while the model was being written", fix="save it again")
        f.write(data)
        del data
        if self.head is not None:
            f.write(self.tail)
        if self.size >= TRIM_BYTES:
            release_freed_memory()


class InlinePlan:
    """Sizes for :func:`write_inline`, measured one tensor at a time (no copy of the whole model)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.fallback = _has_unknown_fields(model) or _has_unknown_fields(model.graph) or has_lazy(model)
        if self.fallback:
            self.size = _byte_size(model)
            return
        self.head = _part(model, lambda n: n < _GRAPH_FIELD)
        self.tail = _part(model, lambda n: n > _GRAPH_FIELD)
        self.has_graph = model.HasField("graph")
        g = model.graph
        self.ghead = _part(g, lambda n: n < _INIT_FIELD)
        self.gtail = _part(g, lambda n: n > _INIT_FIELD)
        self.tensors = [_TensorPlan(t) for t in g.initializer]
        self.glen = len(self.ghead) + len(self.gtail) + sum(1 + len(_varint(p.size)) + p.size for p in self.tensors)
        graph = 1 + len(_varint(self.glen)) + self.glen if self.has_graph else 0
        self.size = len(self.head) + len(self.tail) + graph


def _byte_size(msg) -> int:
    try:
        return msg.ByteSize()
    except Exception:  # upb refuses to measure messages over 2 GiB
        return 2**31


def write_inline(model: onnx.ModelProto, f: BinaryIO, plan: InlinePlan | None = None) -> None:
    """Write ``model.SerializeToString()`` to ``f``, one initializer at a time.

    Protobuf fields are written in field-number order, as ``SerializeToString``
    does: the ModelProto fields before ``graph``, the graph (its fields before
    ``initializer``, the initializers, the rest), the fields after it; a
    tensor's ``raw_data`` is copied once, not serialized.
    """
    plan = plan or InlinePlan(model)
    if plan.fallback:
        data = materialize(model).SerializeToString()
        f.write(data)
        return
    f.write(plan.head)
    if plan.has_graph:
        f.write(bytes([_GRAPH_FIELD << 3 | 2]) + _varint(plan.glen))
        f.write(plan.ghead)
        for t, p in zip(plan.model.graph.initializer, plan.tensors):
            f.write(bytes([_INIT_FIELD << 3 | 2]) + _varint(p.size))
            p.write(t, f)
        f.write(plan.gtail)
    f.write(plan.tail)


def externalize(model: onnx.ModelProto, data: BinaryIO, location: str, *, size_threshold: int = 1024) -> onnx.ModelProto:
    """Write the initializers of ``model`` with at least ``size_threshold`` bytes of ``raw_data``
    (and all lazy ones) to ``data``, one at a time; return a skeleton model pointing at them
    as ``location`` (offsets in the order written). Smaller tensors stay inline.
    """
    m = skeleton(model)
    for t in model.graph.initializer:
        dst = m.graph.initializer.add()
        if is_lazy(t):
            copy_meta(t, dst)
            offset = data.tell()
            set_external(dst, location, offset, copy_bytes(t, data))
        elif t.data_location == onnx.TensorProto.EXTERNAL:
            raise OutputError(
                f"initializer '{t.name}' has external data that was never loaded",
                fix="load the model with onnxprune.graph.load_model (not load_weights=False) before saving it",
            )
        elif t.HasField("raw_data") and tensor_nbytes(t) >= size_threshold:
            copy_meta(t, dst)
            offset = data.tell()
            raw = t.raw_data
            data.write(raw)
            set_external(dst, location, offset, len(raw))
            del raw
            release_freed_memory()
        else:
            dst.CopyFrom(t)
    return m


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of data of ``t`` from its dims (no copy of ``raw_data``)."""
    n = int(np.prod([int(d) for d in t.dims], dtype=np.int64))
    dtype = plain_dtype(t.data_type)
    return n * dtype.itemsize if dtype is not None else (n + 1) // 2


# --------------------------------------------------------------------------- reading models
def _read_varint(f: BinaryIO, end: int) -> int:
    result = shift = 0
    for _ in range(10):
        if f.tell() >= end:
            break
        b = f.read(1)[0]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result
        shift += 7
    raise DecodeError("Error parsing message (truncated or malformed varint)")


def _fields(f: BinaryIO, start: int, end: int):
    """``(number, wire_type, field_start, payload_start, field_end)`` of each protobuf field in ``[start, end)``."""
    pos = start
    while pos < end:
        f.seek(pos)
        tag = _read_varint(f, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise DecodeError("Error parsing message (field number 0)")
        if wire == 0:
            _read_varint(f, end)
            payload = stop = f.tell()
        elif wire in (1, 5):
            payload = f.tell()
            stop = payload + (8 if wire == 1 else 4)
        elif wire == 2:
            n = _read_varint(f, end)
            payload = f.tell()
            stop = payload + n
        else:  # groups: never used by ONNX
            raise DecodeError(f"Error parsing message (wire type {wire})")
        if stop > end:
            raise DecodeError("Error parsing message (truncated)")
        yield number, wire, pos, payload, stop
        pos = stop


def parse_model_file(path: str | os.PathLike) -> onnx.ModelProto:
    """``onnx.load(path, load_external_data=False)`` for binary files, one field at a time.

    Protobuf merges repeated parses: parsing the file's top-level fields one
    by one, and the ``graph`` field's own fields one by one (one initializer
    at a time), gives the same message as parsing the whole file, while only
    one field's bytes are held. Framing errors raise ``DecodeError``.
    """
    model = onnx.ModelProto()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for number, wire, start, payload, stop in _fields(f, 0, size):
            if number == _GRAPH_FIELD and wire == 2:
                model.graph.SetInParent()
                for _, _, s, _, e in _fields(f, payload, stop):
                    f.seek(s)
                    model.graph.MergeFromString(f.read(e - s))
                    if e - s >= TRIM_BYTES:
                        release_freed_memory()
            else:
                f.seek(start)
                model.MergeFromString(f.read(stop - start))
    return model


def check_in_parts(model: onnx.ModelProto, *, keep_elements: int = 64) -> None:
    """``onnx.checker.check_model`` of an all-inline ``model`` (IR >= 4) without serializing it whole.

    The C++ checker gets the model with its large initializers declared as
    graph inputs instead; then each of those gets the checks ``check_graph``
    applies to initializers (non-empty unique name, ``check_tensor``), one at
    a time. Raises ``onnx.checker.ValidationError`` like the checker.
    """
    from onnx.checker import C, ValidationError

    ctx = C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    light = skeleton(model)
    declared = {i.name for i in model.graph.input}
    moved = []
    for t in model.graph.initializer:
        n = int(np.prod([int(d) for d in t.dims], dtype=np.int64))
        if n <= keep_elements or t.data_location == onnx.TensorProto.EXTERNAL:
            light.graph.initializer.add().CopyFrom(t)  # checked in place, with its neighbours
        else:
            moved.append(t)
            if t.name not in declared:
                light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(light.SerializeToString())  # model-level and graph checks come first, as in the checker
    seen = {t.name for t in light.graph.initializer}
    for t in moved:
        if not t.name:
            raise ValidationError("Tensor initializers must have a non-empty name")
        if t.name in seen:
            raise ValidationError(f"{t.name} initializer name is not unique")
        seen.add(t.name)
        onnx.checker.check_tensor(t, ctx)
        if len(t.dims) and np.prod([int(d) for d in t.dims], dtype=np.float64) * 4 >= TRIM_BYTES:
            release_freed_memory()
