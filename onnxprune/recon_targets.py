"""The original model's side of reconstruction: sampled target rows, in one pass.

:class:`OriginalPass` runs the original model once over the samples and
returns, per layer, its target rows (``{node: (N * k, O)}``: the picked output
positions of every sample, kept channels), float16 when they would exceed
``target_budget`` bytes, and written to a spill file (:class:`onnxprune.activations.Spilled`,
read back batch by batch) when even float16 would exceed it; :meth:`OriginalPass.close`
removes the files.

* :meth:`OriginalPass.sampled_targets` (used whenever it applies): the original
  model plus, per layer, ``Reshape -> Transpose -> Flatten -> Gather`` nodes
  that select its sampled rows inside ONNX Runtime, so no full activation is
  copied out; the model runs ``TARGET_BATCH`` samples at a time because every
  tapped tensor is alive at once.
* :meth:`OriginalPass.full_pass` (fixed-batch models, If/Loop graphs, and the
  layer-wise mode): the tapped tensors themselves come back, a batch that
  keeps them under 512 MB at a time, and the rows are gathered in numpy; in
  layer-wise mode the normal equations are accumulated here too, from the
  original inputs at the kept channels (every fifth sample held out).
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .activations import Spilled
from .extract import has_subgraphs, prefix
from .groups import ChannelGraph
from .layerfit import Layer, Normal, gather, input_rows, output_rows
from .runtime import CHUNK_BYTES, Runner, data_inputs, fixed_batch, lean_batch

log = logging.getLogger(__name__)

TARGET_BATCH = 16  # samples per run of the original model with its targets tapped


class OriginalPass:
    """Target rows of the original model ``cg.model`` on samples ``x`` (see the module docstring)."""

    def __init__(self, cg: ChannelGraph, runner: Runner, x: np.ndarray, *, batch: int, target_budget: float):
        self.cg, self.runner, self.x, self.batch, self.target_budget = cg, runner, x, int(batch), float(target_budget)
        self._folder: tempfile.TemporaryDirectory | None = None
        self._spilled: list[Spilled] = []
        self.spilled_bytes = 0

    def close(self) -> None:
        """Remove the spill files of the targets (they are only read while the layers are fitted)."""
        for s in self._spilled:
            s.close()
        self._spilled = []
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def _store(self, rows: int, width: int, size: int):
        """An empty ``(rows, width)`` target store: float32, float16 over the budget, a spill file over it even as float16."""
        if 4 * size <= self.target_budget:
            return np.empty((rows, width), dtype=np.float32)
        if 2 * size <= self.target_budget:
            return np.empty((rows, width), dtype=np.float16)
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="onnxprune-targets-")
            log.info("reconstruction targets over %.0f MB even as float16: spilling to %s", self.target_budget / 2**20, self._folder.name)
        s = Spilled(self._folder.name, np.float16, (width,))
        self._spilled.append(s)
        self.spilled_bytes += rows * width * 2
        return s

    @staticmethod
    def _put(out, start: int, y: np.ndarray) -> None:
        """Rows ``start...`` of a target store; batches come in order, so a spill file is appended to."""
        if isinstance(out, Spilled):
            assert len(out) == start, (len(out), start)
            out.append(y.astype(np.float16))
        else:
            out[start : start + len(y)] = y

    def full_pass(self, layers: list[Layer], picks: dict, kept, normals: dict | None) -> dict[str, np.ndarray]:
        """Sampled target rows of every layer, ``{node: (N * k, O)}``, in one pass of the original model.

        With ``normals`` (layer-wise mode) the normal equations are accumulated here too, from the
        original inputs at the kept channels."""
        n = len(self.x)
        sizes = {L.node: n * picks[L.node].shape[1] * (len(L.target_keep) if L.target_keep is not None else self._width(L.target, L.target_axis)) for L in layers}
        dtype = np.float16 if 4 * sum(sizes.values()) > self.target_budget else np.float32
        if dtype == np.float16:
            log.info("reconstruction targets over %.0f MB: kept as float16", self.target_budget / 2**20)
        names = list(dict.fromkeys([L.target for L in layers] + ([L.x for L in layers] if normals is not None else [])))
        per_sample = sum(4 * int(np.prod([d for d in (self.cg.shapes.get(t) or (1,))[1:] if isinstance(d, int)] or [1])) for t in names)
        batch, arena = lean_batch(per_sample, self.runner.batch, chunk_bytes=4 * CHUNK_BYTES)  # the requested tensors of one batch stay under 256 MB
        runner = Runner(device=self.runner.device, batch_size=batch, threads=self.runner.threads, arena=arena and self.runner.arena)
        out: dict[str, np.ndarray] = {}
        start = 0
        for done, vals in runner.batches(prefix(self.cg.model, names), self.x, names):
            v = dict(zip(names, vals))
            for L in layers:
                pk = picks[L.node][start:done]
                y = gather(v[L.target], pk, L.target_axis)
                if L.target_keep is not None:
                    y = y[:, L.target_keep]
                if L.node not in out:
                    out[L.node] = self._store(n * pk.shape[1], y.shape[1], sum(sizes.values()))
                self._put(out[L.node], start * pk.shape[1], y)
                if normals is not None:
                    xk = self._kept_input(v[L.x], L, kept)
                    self._accumulate(normals[L.node], L, xk, pk, y.astype(np.float32), start)
            start = done
        return out

    def sampled_targets(self, layers: list[Layer], picks: dict) -> dict[str, np.ndarray] | None:
        """Targets as :meth:`full_pass` gives them, but gathered inside ONNX Runtime: the original
        model plus, per layer, ``Gather`` nodes that return only its sampled rows (kept channels), so
        no activation leaves the runtime. None where this does not apply (fixed batch, If/Loop)."""
        if fixed_batch(self.cg.model) is not None or has_subgraphs(self.cg.model):
            return None
        base = prefix(self.cg.model, list(dict.fromkeys(L.target for L in layers)))
        g = base.graph
        del g.output[:]
        idx_names = []
        for i, L in enumerate(layers):
            shape = self.cg.shapes.get(L.target)
            if not shape or len(shape) < 2:
                return None
            t, p = L.target, f"__rec{i}"
            if L.target_axis == 1:
                g.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), f"{p}_shape"))
                g.node.extend([helper.make_node("Reshape", [t, f"{p}_shape"], [f"{p}_r"], name=f"{p}_reshape"),
                               helper.make_node("Transpose", [f"{p}_r"], [f"{p}_t"], name=f"{p}_transpose", perm=[0, 2, 1])])  # fmt: skip
                t, rank = f"{p}_t", 3
            else:
                rank = len(shape)
            g.node.append(helper.make_node("Flatten", [t], [f"{p}_f"], name=f"{p}_flatten", axis=rank - 1))
            g.input.append(helper.make_tensor_value_info(f"{p}_rows", onnx.TensorProto.INT64, [f"{p}_n"]))
            g.node.append(helper.make_node("Gather", [f"{p}_f", f"{p}_rows"], [f"{p}_g"], name=f"{p}_gather", axis=0))
            out = f"{p}_g"
            if L.target_keep is not None:
                g.initializer.append(numpy_helper.from_array(L.target_keep.astype(np.int64), f"{p}_keep"))
                g.node.append(helper.make_node("Gather", [out, f"{p}_keep"], [f"{p}_k"], name=f"{p}_channels", axis=1))
                out = f"{p}_k"
            g.output.append(onnx.ValueInfoProto(name=out))
            idx_names.append(f"{p}_rows")
        n, input_name = len(self.x), data_inputs(self.cg.model)[0].name
        tapped = sum(4 * int(np.prod(self.cg.shapes[L.target][1:])) for L in layers if all(isinstance(d, int) for d in self.cg.shapes[L.target][1:]))
        step, arena = lean_batch(tapped, min(self.batch, TARGET_BATCH), chunk_bytes=4 * CHUNK_BYTES)  # every tapped tensor is alive in ORT at once
        sess = Runner(device=self.runner.device, batch_size=step, threads=self.runner.threads, arena=arena and self.runner.arena).session(base)
        size = sum(n * picks[L.node].shape[1] * (len(L.target_keep) if L.target_keep is not None else self._width(L.target, L.target_axis)) for L in layers)
        dtype = np.float16 if 4 * size > self.target_budget else np.float32
        out: dict[str, np.ndarray] = {}
        for start in range(0, n, step):
            end = min(n, start + step)
            feeds = {input_name: np.ascontiguousarray(self.x[start:end])}
            for name, L in zip(idx_names, layers):
                pk = picks[L.node][start:end]
                feeds[name] = (pk + (np.arange(end - start) * L.positions)[:, None]).reshape(-1)
            for L, y in zip(layers, sess.run_once(feeds)):
                k = picks[L.node].shape[1]
                if L.node not in out:
                    out[L.node] = self._store(n * k, y.shape[1], size)
                self._put(out[L.node], start * k, y)
        return out

    def _width(self, tensor: str, axis: int) -> int:
        shape = self.cg.shapes.get(tensor) or (0, 0)
        d = shape[axis]
        return int(d) if isinstance(d, int) else 0

    def _kept_input(self, x: np.ndarray, layer: Layer, kept) -> np.ndarray:
        """The original input at the channels the pruned node still reads."""
        if layer.x not in self.cg.tensor_maps:
            return x
        axis, atoms = self.cg.tensor_maps[layer.x]
        return np.take(x, np.flatnonzero(kept(atoms)), axis=axis)

    def _accumulate(self, eqs: tuple[Normal, Normal], layer: Layer, xb: np.ndarray, pk: np.ndarray, y: np.ndarray, start: int) -> None:
        """Add one batch (samples ``start...``) to the fit / held-out normal equations (every 5th sample held out)."""
        a = input_rows(layer, xb, pk)
        g = a.shape[0]
        yg = output_rows(y, g)
        sample = np.repeat(np.arange(start, start + len(pk)), pk.shape[1])
        held = sample % 5 == 4
        eqs[0].add(a[:, ~held], yg[:, ~held])
        eqs[1].add(a[:, held], yg[:, held])


__all__ = ["OriginalPass", "TARGET_BATCH"]
