"""Least-squares reconstruction of pruned layers (no training).

After pruning, a *consumer* (a Conv of any ``group``, ConvTranspose, Gemm, or
MatMul with a constant weight, reading at least one removed channel) sees
fewer inputs. Reconstruction re-fits it: with unlabeled samples it solves for
the weights on the *kept* inputs that best reproduce the original model's
output of the same node (kept output channels)

    min_{W', b'}  sum_rows || Y_orig[row] - (W' x[row] + b') ||^2 + lam ||W'||^2

independently per convolution group (:mod:`onnxprune.layerfit`: a grouped conv
is ``G`` small systems, a depthwise conv or an explicit BatchNormalization one
per channel). This is the feature-map reconstruction of He et al. (ICCV 2017)
and ThiNet (Luo et al., ICCV 2017); the channels come from the pruning plan
(or from :func:`onnxprune.importance.score_units` with ``criterion="recon"``,
which picks them by the same reconstruction error).

**Modes** (``mode=``):

* ``"sequential"``: layers in graph order; ``x[row]`` is read from
  the pruned model *as fitted so far*, so each fit also absorbs the error of
  the layers upstream of it.
* ``"layerwise"``: ``x[row]`` is the *original* model's input at the kept
  channels; every layer is fitted alone, in one pass of the original model.
* ``"blockwise"`` (default): as sequential, but a conv whose only reader is a
  residual ``Add`` is fitted to reproduce the original *Add output* minus the
  pruned model's other Add input (the shortcut): the block's output, not the
  conv's, so the last conv of a block also absorbs the shortcut's error.
  Same cost as sequential; equal to it on nets without residual Adds.
  Measured in ``benchmarks/results/recovery_modes.md``.

``scope="affected"`` also re-fits every Conv/Gemm/MatMul/BatchNormalization
downstream of a consumer (depthwise convs, layers whose inputs were not pruned
but changed); ``"consumers"`` (default) only the consumers.

**Rows.** A row is one sample at one output position. Per layer, ``R =
max(rows, 2 * (F + 1))`` rows (``F`` features per group) are drawn as ``k =
ceil(R / N)`` output positions per sample, uniformly without replacement (all
positions if fewer), seeded per layer; the same positions are read from the
original model (targets) and the pruned model (inputs). Every fifth sample is
held out: fitted weights are applied (per group) only where they also bring
the held-out rows closer to the original, then refitted on all rows (systems
of up to 1,024 unknowns; larger ones keep the fit on four fifths of the rows,
which saves a solve that costs more than the rows it adds); a fit that is not
better than the current weights is not applied.

**Cost.** One pass of the original model for all targets (their sampled rows,
float16 above ``target_budget_mb``), then one pass of the pruned model
through :class:`onnxprune.activations.Stream` (each node runs once; the
tensors later nodes read are kept for all samples, float16 above
``memory_budget_mb``), and per layer ``A^T A`` over its ``R`` rows with BLAS
plus one or two solves of ``F + 1`` unknowns per group. Time and memory grow
linearly with the samples; the fits themselves do not depend on them.

Exactness: if a removed channel is a linear combination of kept channels of
the same group (e.g. a duplicated filter), the original output is reachable
and the solution reproduces it (up to the ridge term). An unpruned model has
no consumers and is returned unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .activations import Stream
from .calibrate import _check_x, _working_copy
from .errors import UsageError
from .fold import Params
from .groups import ChannelGraph
from .layerfit import Layer, Normal, current, describe, gather, input_rows, output_rows, write
from .recon_targets import OriginalPass
from .runtime import Runner, largest_activation

log = logging.getLogger(__name__)

MODES = ("sequential", "layerwise", "blockwise")
SCOPES = ("consumers", "affected")
_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
Progress = Callable[[int, int], None]
REFIT_FEATURES = 1024  # systems up to this size are solved again on all rows after the held-out check


@dataclass(frozen=True)
class LayerFit:
    """Reconstruction of one layer: relative output error (sampled rows) before and after, or why it was skipped."""

    node: str
    features: int
    rows: int
    error_before: float = float("nan")
    error_after: float = float("nan")
    skipped: str | None = None
    groups: int = 1
    groups_fitted: int = 0

    @property
    def applied(self) -> bool:
        return self.skipped is None


@dataclass(frozen=True)
class ReconstructionResult:
    model: onnx.ModelProto
    layers: tuple[LayerFit, ...]
    samples: int
    seconds: float
    mode: str = "blockwise"
    timings: dict = field(default_factory=dict, compare=False)  # seconds per phase: picks, targets, activations, normals, fit (solves)
    cache_peak_mb: float = 0.0
    spill_peak_mb: float = 0.0  # most MiB written to spill files at once (targets or activations over the memory budget)

    method = "reconstruct"

    def summary(self) -> str:
        done = [f for f in self.layers if f.applied]
        if not done:
            return f"reconstructed no layer ({len(self.layers)} consumers skipped)"
        before = np.median([f.error_before for f in done])
        after = np.median([f.error_after for f in done])
        skipped = len(self.layers) - len(done)
        return (
            f"reconstructed {len(done)} layers ({self.mode}) on {self.samples} samples in {self.seconds:.1f}s, "
            f"median layer output error {before:.3f} -> {after:.3f}" + (f"; {skipped} skipped" if skipped else "")
        )


class Reconstructor:
    """Fits the layers of pruned versions of ``cg.model`` on samples ``x``; see the module docstring.

    Implements the recovery protocol (:mod:`onnxprune.recovery`): ``recover(mask, pruned)``
    returns a result whose ``.model`` is the recovered model; ``transform()`` gives the
    function :func:`onnxprune.sensitivity.analyze` applies to every pruned variant.
    """

    method = "reconstruct"

    def __init__(
        self,
        cg: ChannelGraph,
        x: np.ndarray,
        *,
        rows: int = 8192,
        ridge: float = 1e-3,
        max_samples: int = 1024,
        batch_size: int = 64,
        device: str = "cpu",
        threads: int | None = None,
        seed: int = 0,
        mode: str = "blockwise",
        scope: str = "consumers",
        target_budget_mb: float = 512,
        memory_budget_mb: float = 4096,
    ):
        if rows < 1 or ridge < 0 or max_samples < 2:
            raise UsageError("reconstruction needs rows >= 1, ridge >= 0 and max_samples >= 2", fix="use the defaults")
        if mode not in MODES:
            raise UsageError(f"unknown reconstruction mode '{mode}'", fix=f"use one of {', '.join(MODES)}")
        if scope not in SCOPES:
            raise UsageError(f"unknown reconstruction scope '{scope}'", fix=f"use one of {', '.join(SCOPES)}")
        self.cg = cg
        self.x = _check_x(cg.model, x)[:max_samples]
        self.rows, self.ridge, self.seed = int(rows), float(ridge), int(seed)
        self.mode, self.scope = mode, scope
        # memory_budget_mb bounds all that recovery keeps for all samples: the sampled targets get up to a
        # quarter of it (at most target_budget_mb), the activations kept between layers the rest; past
        # their share both go float16, then to spill files (activations.Spilled)
        self.target_budget = min(float(target_budget_mb), float(memory_budget_mb) / 4) * 2**20
        self.memory_budget = float(memory_budget_mb) * 2**20 - self.target_budget
        self.batch = int(batch_size)
        # a fixed-batch model runs its batch at a time; the runtime pads the last chunk and trims its outputs;
        # large activations get smaller chunks without ORT's arena (runtime.lean_batch): one chunk stays small
        self.runner = Runner(device=device, batch_size=batch_size, threads=threads).lean(largest_activation(cg.shapes))
        self.compute = {c.node: c for c in cg.compute}
        self.nodes = {n.name: n for n in cg.model.graph.node}

    # ---- which layers
    def _candidates(self, kept) -> list[str]:
        consumers = [n.name for n in self.cg.model.graph.node if self._is_consumer(n.name, kept)]
        if self.scope == "consumers":
            return consumers
        start, tainted, out = set(consumers), set(), []
        for node in self.cg.model.graph.node:
            if node.name in start or any(i in tainted for i in node.input):
                tainted.update(o for o in node.output if o)
                if node.op_type in (*_COMPUTE, "BatchNormalization"):
                    out.append(node.name)
        return out

    def _is_consumer(self, name: str, kept) -> bool:
        cm = self.compute.get(name)
        return cm is not None and cm.in_atoms is not None and not kept(cm.in_atoms).all() and self.nodes[name].op_type in _COMPUTE

    def _layers(self, kept, m: onnx.ModelProto, params: Params) -> tuple[list[Layer], list[LayerFit]]:
        pnodes = {n.name: n for n in m.graph.node}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.cg.model.graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        position = {n.name: k for k, n in enumerate(self.cg.model.graph.node)}
        layers, skipped, order = [], [], []
        for name in self._candidates(kept):
            node, pnode = self.nodes[name], pnodes[name]
            target, side, pos = node.output[0], None, float(position[name])
            users = readers.get(target, [])
            if self.mode == "blockwise" and node.op_type == "Conv" and len(users) == 1 and users[0].op_type == "Add" and len(users[0].input) == 2:
                add = users[0]
                other = add.input[1] if add.input[0] == target else add.input[0]
                if other != target and other in self.cg.tensor_maps and add.output[0] in self.cg.tensor_maps:
                    target, side, pos = add.output[0], other, position[add.name] - 0.5
            axis, keep = self._channels(target, node, kept)
            got = describe(pnode, params.get(pnode, 1) if node.op_type != "BatchNormalization" else None, self.cg.shapes,
                           target=target, target_axis=axis, target_keep=keep, side=side)  # fmt: skip
            if isinstance(got, str):
                skipped.append(LayerFit(name, 0, 0, skipped=got))
                continue
            layers.append(got)
            order.append(pos)
        return [layers[k] for k in np.argsort(order, kind="stable")], skipped

    def _channels(self, tensor: str, node: onnx.NodeProto, kept) -> tuple[int, np.ndarray | None]:
        shape = self.cg.shapes.get(tensor)
        rank = len(shape) if shape else 2
        if tensor in self.cg.tensor_maps:
            axis, atoms = self.cg.tensor_maps[tensor]
            return (-1 if axis == rank - 1 and axis != 1 else axis), np.flatnonzero(kept(atoms))
        return (1 if node.op_type in ("Conv", "ConvTranspose", "BatchNormalization") else -1), None

    def _features(self, layer: Layer, params: Params, m_nodes) -> int:
        cur = current(params, m_nodes[layer.node], layer)
        return int(cur.shape[1] - 1) if cur is not None else 0

    def _picks(self, layer: Layer, features: int, k_layer: int) -> np.ndarray:
        """Output positions per sample, ``(N, k)``: the rows of this layer (see the module docstring)."""
        n, p = len(self.x), layer.positions
        want = max(self.rows, 2 * (features + 1))
        k = min(p, math.ceil(want / n))
        if k == p:
            return np.tile(np.arange(p, dtype=np.int64), (n, 1))
        rng = np.random.default_rng([self.seed, k_layer])
        return np.stack([rng.choice(p, k, replace=False) for _ in range(n)]).astype(np.int64)

    # ---- the fit
    def recover(self, mask: np.ndarray, pruned: onnx.ModelProto, *, progress: Progress | None = None) -> ReconstructionResult:
        """Re-fit the layers of ``pruned = apply_mask(cg, mask)``; returns a new model (inputs unchanged)."""
        t0 = time.perf_counter()
        kept, m = _working_copy(self.cg, mask, pruned)
        params = Params(m)
        pnodes = {n.name: n for n in m.graph.node}
        layers, fits = self._layers(kept, m, params)
        features = {L.node: self._features(L, params, pnodes) for L in layers}
        timings = {"picks": 0.0, "targets": 0.0, "activations": 0.0, "normals": 0.0, "fit": 0.0}
        t = time.perf_counter()
        picks = {L.node: self._picks(L, features[L.node], k) for k, L in enumerate(layers)}
        timings["picks"] = time.perf_counter() - t
        peak = spill = 0.0
        if layers:
            normals = {L.node: (Normal(), Normal()) for L in layers} if self.mode == "layerwise" else None
            t = time.perf_counter()
            original = OriginalPass(self.cg, self.runner, self.x, batch=self.batch, target_budget=self.target_budget)
            stream = Stream(self.runner, m, self.x, budget_bytes=self.memory_budget) if normals is None else None
            try:
                targets = original.sampled_targets(layers, picks) if normals is None else None
                if targets is None:
                    targets = original.full_pass(layers, picks, kept, normals)
                timings["targets"] = time.perf_counter() - t
                for done, L in enumerate(layers, 1):
                    if normals is None:
                        t = time.perf_counter()
                        vals = stream.get(m, [L.x] + ([L.side] if L.side else []))
                        timings["activations"] += time.perf_counter() - t
                        t = time.perf_counter()
                        eqs = self._sequential_normals(L, vals, picks[L.node], targets.pop(L.node))
                        timings["normals"] += time.perf_counter() - t
                    else:
                        eqs = normals.pop(L.node)
                    t = time.perf_counter()
                    fits.append(self._fit(params, pnodes[L.node], L, *eqs))
                    timings["fit"] += time.perf_counter() - t
                    if progress:
                        progress(done, len(layers))
            finally:  # spill files go on error too
                original.close()
                if stream is not None:
                    stream.close()
            peak = stream.peak_bytes / 2**20 if stream is not None else 0.0
            spill = (original.spilled_bytes + (stream.spilled_peak_bytes if stream is not None else 0)) / 2**20
        seconds = time.perf_counter() - t0
        result = ReconstructionResult(m, tuple(fits), len(self.x), seconds, self.mode, timings, peak, spill if layers else 0.0)
        log.info("%s", result.summary())
        return result

    run = recover  # earlier name

    def _sequential_normals(self, layer: Layer, vals: dict, pk: np.ndarray, target: np.ndarray) -> tuple[Normal, Normal]:
        """Normal equations of one layer: its sampled rows for all samples (``R x F`` floats, bounded
        by ``rows``, not by the samples) are gathered batch by batch, then multiplied once (one BLAS
        call per split instead of one per batch)."""
        x, k = vals[layer.x], pk.shape[1]
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for start in range(0, len(x), self.batch):
            end = min(start + self.batch, len(x))
            a = input_rows(layer, x[start:end], pk[start:end])
            t = output_rows(target[start * k : end * k].astype(np.float32), a.shape[0])
            side = output_rows(gather(np.asarray(vals[layer.side][start:end]), pk[start:end], layer.target_axis).astype(np.float32), a.shape[0]) if layer.side else 0.0
            held = np.repeat(np.arange(start, end) % 5 == 4, k)
            parts.append((a, t - side, held))
        a = np.concatenate([p[0] for p in parts], axis=1)
        y = np.concatenate([p[1] for p in parts], axis=1)
        held = np.concatenate([p[2] for p in parts])
        del parts
        eqs = (Normal(), Normal())
        eqs[0].add(a[:, ~held], y[:, ~held])
        eqs[1].add(a[:, held], y[:, held])
        return eqs

    def _fit(self, params: Params, node: onnx.NodeProto, layer: Layer, fit: Normal, hold: Normal) -> LayerFit:
        """Solve on the fit rows; keep per group only what improves the held-out rows; refit on all rows."""
        cur = current(params, node, layer)
        n_rows = fit.n + hold.n
        if fit.gram is None:
            return LayerFit(node.name, 0, n_rows, skipped="no sampled rows")
        groups, features = fit.gram.shape[0], fit.gram.shape[1] - 1
        info = dict(groups=groups)
        if cur is None or cur.shape != fit.rhs.shape:
            return LayerFit(node.name, features, n_rows, skipped="its weights do not match the kept channels", **info)
        if fit.n < features + 1 and self.ridge == 0.0:
            return LayerFit(node.name, features, n_rows, skipped=f"{fit.n} sampled rows for {features + 1} weights per output: pass more calibration samples or a ridge > 0", **info)
        ridge = self.ridge if layer.kind != "bn" else 1e-9  # one weight per channel: well-posed, shrinking it only biases the scale
        sol, ok = fit.solve(ridge)
        total = fit + hold
        use = ok
        g_cur = total.gram @ cur
        if hold.gram is None:
            g_sol = fit.gram_times_solution(sol, ridge)
        else:
            h_sol, h_cur = hold.gram @ sol, hold.gram @ cur
            use = ok & (hold.sq_error(sol, h_sol) < hold.sq_error(cur, h_cur))
            if not use.any():
                e = total.error(cur, g_cur)
                return LayerFit(node.name, features, n_rows, e, e, skipped="the fit did not improve the held-out samples", **info)
            if features + 1 <= REFIT_FEATURES:
                sol, ok = total.solve(ridge)
                use &= ok
                g_sol = total.gram_times_solution(sol, ridge)
            else:
                g_sol = fit.gram_times_solution(sol, ridge) + h_sol
        pick = use[:, None, None]
        new, g_new = np.where(pick, sol, cur), np.where(pick, g_sol, g_cur)
        before, after = total.error(cur, g_cur), total.error(new, g_new)
        if not after < before:
            return LayerFit(node.name, features, n_rows, before, before, skipped="the fit was not better than the current weights", **info)
        write(params, node, layer, new)
        return LayerFit(node.name, features, n_rows, before, after, groups_fitted=int(use.sum()), **info)

    # ---- the recovery protocol
    def calibrate(self, mask: np.ndarray, pruned: onnx.ModelProto, *, method: str | None = None, progress: Progress | None = None) -> ReconstructionResult:
        """:meth:`recover` under the name :class:`onnxprune.calibrate.Calibrator` uses."""
        if method not in (None, "reconstruct"):
            raise UsageError(f"a Reconstructor only reconstructs (asked for method '{method}')", fix="use onnxprune.recovery.make_recovery(cg, x, method)")
        return self.recover(mask, pruned, progress=progress)

    def transform(self, *, method: str | None = None) -> Callable[[onnx.ModelProto, np.ndarray], onnx.ModelProto]:
        """``fn(pruned, mask) -> reconstructed model`` for ``sensitivity.analyze(transform=...)``."""
        if method not in (None, "reconstruct"):
            raise UsageError(f"a Reconstructor only reconstructs (asked for method '{method}')", fix="use onnxprune.recovery.make_recovery(cg, x, method)")
        return lambda pruned, mask: self.recover(mask, pruned).model


def reconstruct(
    cg: ChannelGraph,
    mask: np.ndarray,
    pruned: onnx.ModelProto,
    x: np.ndarray,
    *,
    rows: int = 8192,
    ridge: float = 1e-3,
    max_samples: int = 1024,
    batch_size: int = 64,
    device: str = "cpu",
    threads: int | None = None,
    mode: str = "blockwise",
    scope: str = "consumers",
    progress: Progress | None = None,
) -> ReconstructionResult:
    """Re-fit the layers of ``pruned = apply_mask(cg, mask)`` on unlabeled samples ``x``.

    Returns a new model; neither input is changed. Example::

        model = reconstruct(cg, mask, apply_mask(cg, mask), x_calib).model
    """
    rec = Reconstructor(cg, x, rows=rows, ridge=ridge, max_samples=max_samples, batch_size=batch_size, device=device, threads=threads,
                        mode=mode, scope=scope)  # fmt: skip
    return rec.recover(mask, pruned, progress=progress)


__all__ = ["MODES", "SCOPES", "reconstruct", "Reconstructor", "ReconstructionResult", "LayerFit"]
