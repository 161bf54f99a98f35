"""Activations of a model for all samples, computed once and incrementally.

Layer-by-layer recovery (:mod:`onnxprune.reconstruct`) visits nodes in graph
order and, before each fit, needs one tensor of the *current* model for every
sample. Re-running the model from its input for each layer costs one forward
pass per layer. :class:`Stream` instead keeps the tensors that later nodes
still read (the *frontier*) for all samples, and computes a requested tensor
by running only the nodes between the frontier and it
(:func:`onnxprune.extract.subgraph`). Over a whole recovery every node runs
once: the cost of one forward pass, batch by batch.

A node's weights may change after its *input* was requested and before its
output is: the stream runs a node only when a later request needs it, so it
always uses the weights as they are then. Tensors produced upstream of a
changed node stay valid.

Memory: the frontier for all samples (linear in samples), bounded by
``budget_bytes`` (``--memory-budget``). Past the budget, in two steps:

1. the cached tensors are kept as float16 (values above 60,000 stay float32)
   and converted back to float32 one batch at a time when fed to ONNX Runtime
   (``tests/test_reconstruct_kinds.py`` checks the fitted model barely changes);
2. a tensor that still does not fit next to the resident ones is written, batch
   by batch as ONNX Runtime returns it, to a file in a temporary folder
   (:class:`Spilled`) and read back one batch at a time. Plain ``write``/``readinto``,
   not ``mmap``: pages of a mapped file would count in the resident size and
   stay there, read pages only pass through the OS page cache. The folder is
   removed by :meth:`Stream.close` (``with Stream(...)``), on error and at exit.

So the resident cache (``peak_bytes``) never passes the budget plus one batch;
``spilled_peak_bytes`` counts what went to disk. Disk I/O is sequential and costs
far less than the segment runs (measured in ``benchmarks/results/memory_budget.md``).

Example::

    s = Stream(Runner(device="cpu"), model, x)
    a = s.get(model, ["conv3_in"])["conv3_in"]   # runs up to conv3's input
    b = s.get(model, ["conv4_in"])["conv4_in"]   # runs only the nodes after it
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from .errors import OutputError
from .extract import has_subgraphs, needed_nodes, prefix, subgraph
from .runtime import Runner, data_inputs, fixed_batch, release_memory

log = logging.getLogger(__name__)

_HALF_MAX = 6.0e4


class AsFloat32:
    """A read-only view of an array that yields float32 slices (feeds float16 caches to ONNX Runtime)."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, idx):
        return np.asarray(self.a[idx], dtype=np.float32)

    @property
    def shape(self):
        return self.a.shape


def _fits_half(v: np.ndarray) -> bool:
    return v.size == 0 or (float(v.max()) < _HALF_MAX and float(v.min()) > -_HALF_MAX)


def as_float32(a):
    return a if a.dtype != np.float16 else AsFloat32(a)


class Chunks:
    """An array of all samples kept as the batches ONNX Runtime returned (no concatenation copy).

    ``c[i:j]`` is a batch itself (no copy) when ``i:j`` is one of them, else the
    concatenated overlap. ``np.asarray(c)`` concatenates everything.
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.nbytes = sum(p.nbytes for p in parts)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        if not isinstance(idx, slice) or idx.step not in (None, 1):
            return np.asarray(self)[idx]
        start, stop, _ = idx.indices(len(self))
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        if k < len(self.parts) and self.starts[k] == start and self.starts[k + 1] == stop:
            return self.parts[k]
        out, pos = [], start
        while pos < stop:
            k = int(np.searchsorted(self.starts, pos, side="right")) - 1
            p = self.parts[k]
            out.append(p[pos - self.starts[k] : stop - self.starts[k]])
            pos = int(self.starts[k]) + len(p)
        return np.concatenate(out) if out else np.empty((0, *self.shape[1:]), self.dtype)

    def __array__(self, dtype=None, copy=None):
        a = np.concatenate(self.parts)
        return a if dtype is None else a.astype(dtype)

    def astype(self, dtype) -> "Chunks":
        return Chunks([p.astype(dtype) for p in self.parts])


class Spilled:
    """An array of all samples kept in a file, appended batch by batch and read back by slices
    (plain file I/O; see the module docstring). ``nbytes`` is 0: nothing of it stays resident."""

    def __init__(self, folder: str, dtype, row_shape: tuple):
        fd, self.path = tempfile.mkstemp(suffix=".bin", dir=folder)
        self.file = os.fdopen(fd, "w+b")
        self.dtype, self.row_shape, self.rows = np.dtype(dtype), tuple(row_shape), 0
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.nbytes = 0

    @property
    def shape(self) -> tuple:
        return (self.rows, *self.row_shape)

    @property
    def disk_bytes(self) -> int:
        return self.rows * self.row_bytes

    def __len__(self) -> int:
        return self.rows

    def append(self, part: np.ndarray) -> None:
        try:
            self.file.seek(self.disk_bytes)
            self.file.write(np.ascontiguousarray(part, dtype=self.dtype).data)
        except OSError as exc:
            raise OutputError(
                f"could not write activations over the memory budget to the spill file {self.path} ({exc})",
                fix="free disk space in the temporary folder (TMPDIR), or pass a larger --memory-budget",
            ) from exc
        self.rows += len(part)

    def __getitem__(self, idx):
        if not isinstance(idx, slice) or idx.step not in (None, 1):
            return np.asarray(self)[idx]
        start, stop, _ = idx.indices(self.rows)
        out = np.empty((max(stop - start, 0), *self.row_shape), dtype=self.dtype)
        self.file.flush()
        self.file.seek(start * self.row_bytes)
        if out.nbytes and self.file.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise OSError(f"spill file {self.path} is shorter than expected")
        return out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


class Stream:
    """Tensors of ``model`` for all samples ``x``, computed segment by segment (see the module docstring)."""

    def __init__(self, runner: Runner, model: onnx.ModelProto, x: np.ndarray, *, budget_bytes: float = 4 * 2**30):
        self.runner, self.x, self.budget = runner, x, float(budget_bytes)
        self._folder: tempfile.TemporaryDirectory | None = None  # created at the first spill; removed by close(), at exit or on collection
        self.spilled_bytes = self.spilled_peak_bytes = 0
        self.input_name = data_inputs(model)[0].name
        self.batch = fixed_batch(model)
        self.cache: dict[str, np.ndarray | Chunks] = {self.input_name: x}
        self.done: set[str] = set()
        self.users: dict[str, set[str]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.users.setdefault(i, set()).add(n.name)
        self.half = False
        self.whole = has_subgraphs(model)  # If/Loop: outer-scope reads are not node inputs; run prefixes
        self.peak_bytes = 0

    def nbytes(self) -> int:
        """Resident bytes of the cache (spilled tensors count 0; the samples ``x`` are the caller's)."""
        return sum(v.nbytes for k, v in self.cache.items() if k != self.input_name)

    def close(self) -> None:
        """Drop the cache and remove the spill folder (also done at exit)."""
        for v in self.cache.values():
            if isinstance(v, Spilled):
                v.close()
        self.cache = {self.input_name: self.x}
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spill_folder(self) -> str:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="onnxprune-spill-")
            log.info("activations over the %.0f MB memory budget: spilling to %s", self.budget / 2**20, self._folder.name)
        return self._folder.name

    def _pending(self, tensor: str, done: set[str]) -> bool:
        return bool(self.users.get(tensor, set()) - done)

    def get(self, model: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, np.ndarray]:
        """``{tensor: value for all samples}`` (float32 or float16), running only what is not cached."""
        missing = [t for t in dict.fromkeys(tensors) if t not in self.cache]
        out = {t: self.cache[t] for t in tensors if t in self.cache}
        if not missing:
            return out
        if self.whole:
            vals = self.runner.run(prefix(model, missing), self.x, missing)
            out.update(zip(missing, vals))
            return out
        keep = [n for n in needed_nodes(model, missing, available=self.cache) if n.op_type != "Constant"]
        names = {n.name for n in keep}
        done = self.done | names
        later = [o for n in keep for o in n.output if o and o not in missing and self._pending(o, done)]
        outs = [*missing, *later]
        feeds = [i for i in dict.fromkeys(i for n in keep for i in n.input) if i in self.cache]
        inputs = {f: (helper.np_dtype_to_tensor_dtype(np.dtype(np.float32) if self.cache[f].dtype == np.float16 else self.cache[f].dtype),
                      [self.batch, *self.cache[f].shape[1:]]) for f in feeds}  # fmt: skip
        seg = subgraph(model, keep, inputs, outs)
        got = self._run(seg, {f: as_float32(self.cache[f]) for f in feeds}, outs)
        del seg
        if not self.runner.arena:
            release_memory()  # a large segment's session is gone: hand its working memory back
        self.done |= names
        for o in outs:
            v = got.get(o)
            if v is None:
                continue
            if o in missing:
                out[o] = v
            if self._pending(o, self.done):
                self.cache[o] = v
        self.peak_bytes = max(self.peak_bytes, self.nbytes() + sum(v.nbytes for k, v in out.items() if k not in self.cache))
        for k in list(self.cache):
            if k != self.input_name and not self._pending(k, self.done) and k not in tensors:
                v = self.cache.pop(k)
                if isinstance(v, Spilled):
                    v.close()
        self.spilled_bytes = sum(v.disk_bytes for v in self.cache.values() if isinstance(v, Spilled))
        self._check_budget()
        return out

    def _run(self, seg: onnx.ModelProto, feeds: Mapping[str, object], outs: list[str]) -> dict[str, Chunks | Spilled]:
        """Run ``seg`` batch by batch; tensors without a batch axis (shape arithmetic) are not kept.

        Each output is sized at its first batch (``rows * bytes of that batch / its samples``); one
        that would take the resident cache past the budget goes to a :class:`Spilled` file instead."""
        got: dict[str, list | Spilled | None] = {}
        resident = self.nbytes()
        spilled, start, n = 0, 0, len(self.x)
        for done, vals in self.runner.batches(seg, feeds, outs):
            for o, v in zip(outs, vals):
                if o not in got:
                    batched = v.ndim >= 1 and np.issubdtype(v.dtype, np.floating) and len(v) == done - start
                    got[o] = [] if batched else None
                    if batched:
                        size = v.nbytes * n // max(len(v), 1)
                        if self.half and v.dtype == np.float32 and resident + size // 2 <= self.budget:
                            resident += size // 2  # float16 in memory (values that do not fit stay float32: at most one batch more)
                        elif resident + size > self.budget:
                            got[o] = Spilled(self._spill_folder(), v.dtype, v.shape[1:])  # spilled as computed: exact
                            spilled += size
                        else:
                            resident += size
                part = got[o]
                if part is None:
                    continue
                if isinstance(part, Spilled):
                    part.append(v)
                    continue
                half = self.half and v.dtype == np.float32 and _fits_half(v)
                part.append(v.astype(np.float16) if half else v)
            start = done
        self.spilled_peak_bytes = max(self.spilled_peak_bytes, self.spilled_bytes + spilled)
        return {o: (v if isinstance(v, Spilled) else Chunks(v)) for o, v in got.items() if v is not None and (isinstance(v, Spilled) or v)}

    def _check_budget(self) -> None:
        if self.half or self.nbytes() + self.spilled_bytes <= self.budget:
            return
        log.info("activation cache %.0f MB over its %.0f MB budget: keeping activations as float16", (self.nbytes() + self.spilled_bytes) / 2**20, self.budget / 2**20)
        self.half = True
        for k, v in list(self.cache.items()):
            if k != self.input_name and isinstance(v, Chunks) and v.dtype == np.float32 and all(_fits_half(p) for p in v.parts):
                self.cache[k] = v.astype(np.float16)


__all__ = ["AsFloat32", "Chunks", "Spilled", "Stream", "as_float32"]
