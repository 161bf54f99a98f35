"""The original model's side of reconstruction: sampled target rows, in one pass.

:class:`OriginalPass` runs the original model once over the samples and
returns, per layer, its target rows (``{node: (N * k, O)}``: the picked output
positions of every sample, kept channels), float16 when they would exceed
``target_budget`` bytes.

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

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .extract import has_subgraphs, prefix
from .groups import ChannelGraph
from .layerfit import Layer, Normal, gather, input_rows, output_rows
from .runtime import Runner, data_inputs, fixed_batch

log = logging.getLogger(__name__)

TARGET_BATCH = 16  # samples per run of the original model with its targets tapped


class OriginalPass:
    """Target rows of the original model ``cg.model`` on samples ``x`` (see the module docstring)."""

    def __init__(self, cg: ChannelGraph, runner: Runner, x: np.ndarray, *, batch: int, target_budget: float):
        self.cg, self.runner, self.x, self.batch, self.target_budget = cg, runner, x, int(batch), float(target_budget)

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
        batch = max(1, min(self.batch, int(512 * 2**20 // max(per_sample, 1))))  # the requested tensors of one batch stay under 512 MB
        runner = Runner(device=self.runner.device, batch_size=batch, threads=self.runner.threads)
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
                    out[L.node] = np.empty((n * pk.shape[1], y.shape[1]), dtype=dtype)
                out[L.node][start * pk.shape[1] : done * pk.shape[1]] = y
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
        sess = self.runner.session(base)
        n, input_name = len(self.x), data_inputs(self.cg.model)[0].name
        size = sum(n * picks[L.node].shape[1] * (len(L.target_keep) if L.target_keep is not None else self._width(L.target, L.target_axis)) for L in layers)
        dtype = np.float16 if 4 * size > self.target_budget else np.float32
        out: dict[str, np.ndarray] = {}
        step = min(self.batch, TARGET_BATCH)  # every tapped tensor is alive in ONNX Runtime at once: a small batch bounds its memory
        for start in range(0, n, step):
            end = min(n, start + step)
            feeds = {input_name: np.ascontiguousarray(self.x[start:end])}
            for name, L in zip(idx_names, layers):
                pk = picks[L.node][start:end]
                feeds[name] = (pk + (np.arange(end - start) * L.positions)[:, None]).reshape(-1)
            for L, y in zip(layers, sess.run_once(feeds)):
                k = picks[L.node].shape[1]
                if L.node not in out:
                    out[L.node] = np.empty((n * k, y.shape[1]), dtype=dtype)
                out[L.node][start * k : end * k] = y
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
