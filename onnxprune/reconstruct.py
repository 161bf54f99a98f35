"""Least-squares reconstruction of the layers that lost input channels (no training).

After pruning, a *consumer* (a Conv with ``group == 1``, a Gemm, or a MatMul
with a constant weight, reading at least one removed channel) sees fewer
inputs. Bias compensation and affine re-normalization (:mod:`.calibrate`)
fix the first two moments of its output; reconstruction re-fits the whole
layer: with unlabeled samples it solves, per consumer, for the weights on the
*kept* inputs that best reproduce the original layer's output

    min_{W', b'}  sum_rows || Y_orig[row] - (W' x_pruned[row] + b') ||^2 + lam ||W'||^2

where a row is one sample at one output position, ``x_pruned[row]`` is the
flattened receptive field (``C_kept * kh * kw`` values, zero padding included)
read from the pruned model *as it is so far* (consumers are processed in graph
order, so each one also corrects the error of the layers upstream of it), and
``Y_orig[row]`` is the original model's output of the same node at the same
position, for the output channels the node keeps. This is the feature-map
reconstruction of He et al., "Channel pruning for accelerating very deep neural
networks" (ICCV 2017) and Luo et al., ThiNet (ICCV 2017), without their channel
selection: the channels come from the pruning plan.

The normal equations are accumulated batch by batch in float64 over
``rows`` randomly sampled rows (``G = A^T A``, ``A^T Y``; ``A`` has a column of
ones for the bias), so memory is ``O(features^2)``, not ``O(rows * features)``.
``lam = ridge * mean(diag(G))`` keeps the solve well-posed when inputs are
collinear; the bias is not regularized. Every fifth sample is held out: the
weights fitted on the others are applied only if they also bring the held-out
rows closer to the original (then the fit is redone on all rows), so a layer
with more weights than its samples can pin down (a Gemm after a large Flatten
with few samples) keeps its weights instead of over-fitting.

Exactness: if a removed channel is a linear combination of kept channels (e.g.
a duplicated filter), the original output is reachable and the solution
reproduces it (up to the ridge term). An unpruned model has no consumers and is
returned unchanged.

Cost: passes of the original model for the sampled targets (one when they
fit ``target_budget_mb``, else one per run of layers that fits), then for each
consumer a pass of the pruned model up to that consumer's input, on
``max_samples`` samples. Memory: the targets of one run of layers plus one
``features x features`` normal matrix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx

from .calibrate import _check_x, _fixed_batch, _prefix, _Runner, _working_copy
from .errors import UsageError
from .fold import Params, _set_float_attr, fold
from .graph import GraphIndex, attr
from .groups import ChannelGraph

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class LayerFit:
    """Reconstruction of one consumer: relative output error (sampled rows) before and after,
    or why it was skipped."""

    node: str
    features: int
    rows: int
    error_before: float = float("nan")
    error_after: float = float("nan")
    skipped: str | None = None

    @property
    def applied(self) -> bool:
        return self.skipped is None


@dataclass(frozen=True)
class ReconstructionResult:
    model: onnx.ModelProto
    layers: tuple[LayerFit, ...]
    samples: int
    seconds: float

    method = "reconstruct"

    def summary(self) -> str:
        done = [f for f in self.layers if f.applied]
        if not done:
            return f"reconstructed no layer ({len(self.layers)} consumers skipped)"
        before = np.median([f.error_before for f in done])
        after = np.median([f.error_after for f in done])
        skipped = len(self.layers) - len(done)
        return (
            f"reconstructed {len(done)} layers on {self.samples} samples in {self.seconds:.1f}s, "
            f"median layer output error {before:.3f} -> {after:.3f}" + (f"; {skipped} skipped" if skipped else "")
        )


@dataclass(frozen=True)
class _Layer:
    node: str
    op: str
    x: str  # input tensor (pruned model)
    y: str  # output tensor
    keep_out: np.ndarray  # kept output channels (original numbering)
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begin..., end...
    dilations: tuple[int, ...] = ()


class _Rows:
    """Sampled rows of one consumer: (sample, output position) pairs, chosen per batch."""

    def __init__(self, n_rows: int, n_samples: int, seed: int):
        self.per_sample = max(1, -(-n_rows // n_samples))
        self.rng = np.random.default_rng(seed)
        self.picks: list[np.ndarray] = []  # per batch: flat output-position indices, shape (b, per_sample)

    def pick(self, b: int, positions: int) -> np.ndarray:
        k = min(self.per_sample, positions)
        idx = np.argsort(self.rng.random((b, positions)), axis=1)[:, :k] if positions > k else np.tile(np.arange(positions), (b, 1))
        self.picks.append(idx)
        return idx


def _pads(node: onnx.NodeProto, in_hw: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int]) -> tuple[int, ...]:
    mode = attr(node, "auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("NOTSET", ""):
        p = list(attr(node, "pads", [0] * (2 * len(k))))
        return tuple(int(v) for v in p)
    if mode == "VALID":
        return (0,) * (2 * len(k))
    begin, end = [], []
    for n, kk, ss, dd in zip(in_hw, k, s, d):
        out = -(-n // ss)
        total = max((out - 1) * ss + (kk - 1) * dd + 1 - n, 0)
        small, big = total // 2, total - total // 2
        begin.append(big if mode == "SAME_LOWER" else small)
        end.append(small if mode == "SAME_LOWER" else big)
    return tuple(begin + end)


def _patches(x: np.ndarray, layer: _Layer, picks: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Receptive fields of ``x`` (b, C, H, W) at the picked output positions -> (b * k, C * kh * kw)."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    pt, pl, pb, pr = layer.pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    b, k = picks.shape
    oi, oj = np.divmod(picks, out_hw[1])
    n = np.repeat(np.arange(b), k)
    oi, oj = oi.reshape(-1), oj.reshape(-1)
    taps = [xp[n, :, oi * sh + a * dh, oj * sw + c * dw] for a in range(kh) for c in range(kw)]  # each (rows, C)
    return np.stack(taps, axis=2).reshape(len(n), -1)  # column order: channel, then (kh, kw): the weight layout


class _Normal:
    """Normal equations ``G = A^T A``, ``R = A^T Y`` and ``|Y|^2`` accumulated over rows (float64)."""

    def __init__(self, gram=None, rhs=None, y2: float = 0.0, n: int = 0):
        self.gram, self.rhs, self.y2, self.n = gram, rhs, y2, n

    def add(self, a: np.ndarray, y: np.ndarray) -> None:
        g, r = a.T @ a, a.T @ y
        self.gram = g if self.gram is None else self.gram + g
        self.rhs = r if self.rhs is None else self.rhs + r
        self.y2 += float(np.sum(y * y))
        self.n += len(a)

    def both(self, other: "_Normal") -> "_Normal":
        return _Normal(self.gram + other.gram, self.rhs + other.rhs, self.y2 + other.y2, self.n + other.n)

    def error(self, sol: np.ndarray) -> float:
        """Relative error ``|A sol - Y| / |Y|`` from the accumulated sums."""
        sq = self.y2 - 2 * float(np.sum(sol * self.rhs)) + float(np.sum(sol * (self.gram @ sol)))
        return float(np.sqrt(max(sq, 0.0) / max(self.y2, 1e-30)))


class Reconstructor:
    """Fits consumers of pruned channels; see the module docstring."""

    def __init__(
        self,
        cg: ChannelGraph,
        x: np.ndarray,
        *,
        rows: int = 16384,
        ridge: float = 1e-3,
        max_samples: int = 512,
        batch_size: int = 64,
        device: str = "cpu",
        threads: int | None = None,
        seed: int = 0,
        target_budget_mb: float = 256,
    ):
        if rows < 1 or ridge < 0 or max_samples < 2:
            raise UsageError("reconstruction needs rows >= 1, ridge >= 0 and max_samples >= 2", fix="use the defaults")
        self.cg = cg
        self.x = _check_x(cg.model, x)[:max_samples]
        self.rows, self.ridge, self.seed = int(rows), float(ridge), int(seed)
        self.target_budget = float(target_budget_mb) * 2**20
        fixed = _fixed_batch(cg.model)
        if fixed:  # a model exported with a fixed batch runs that many samples at a time
            batch_size = fixed
            self.x = self.x[: len(self.x) // fixed * fixed]
        self.runner = _Runner(device, batch_size, threads)
        self.index = GraphIndex(cg.model)
        self.compute = {c.node: c for c in cg.compute}

    # ---- which layers
    def _layers(self, kept) -> tuple[list[_Layer], list[LayerFit]]:
        layers, skipped = [], []
        for node in self.cg.model.graph.node:
            cm = self.compute.get(node.name)
            if cm is None or cm.in_atoms is None or kept(cm.in_atoms).all():
                continue
            reason = self._unsupported(node)
            if reason:
                skipped.append(LayerFit(node.name, 0, 0, skipped=reason))
                continue
            keep_out = np.flatnonzero(kept(cm.out_atoms))
            if node.op_type == "Conv":
                shape = self.cg.shapes.get(node.input[0])
                w = self.index.const(node.input[1])
                k = tuple(int(v) for v in w.shape[2:])
                s = tuple(int(v) for v in attr(node, "strides", [1] * len(k)))
                d = tuple(int(v) for v in attr(node, "dilations", [1] * len(k)))
                pads = _pads(node, shape[2:], k, s, d)
                layers.append(_Layer(node.name, "Conv", node.input[0], node.output[0], keep_out, k, s, pads, d))
            else:
                layers.append(_Layer(node.name, node.op_type, node.input[0], node.output[0], keep_out))
        return layers, skipped

    def _unsupported(self, node: onnx.NodeProto) -> str | None:
        op = node.op_type
        w = self.index.const(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            return "its weight is not a constant"
        if op == "Conv":
            if int(attr(node, "group", 1)) != 1:
                return "grouped convolution (not reconstructed; calibration still applies)"
            shape = self.cg.shapes.get(node.input[0])
            if w.ndim != 4 or shape is None or len(shape) != 4 or any(not isinstance(v, int) or v <= 0 for v in shape[2:]):
                return "only 2-D convolutions with known spatial size are reconstructed"
            return None
        if op == "Gemm":
            c = self.index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if int(attr(node, "transA", 0)):
                return "Gemm with transA"
            if c is not None and c.ndim == 2 and c.shape[0] != 1:
                return "Gemm bias is not one value per output"
            return None
        if op == "MatMul":
            shape = self.cg.shapes.get(node.input[0])
            if w.ndim != 2 or shape is None or len(shape) != 2:
                return "only MatMul of a 2-D input by a 2-D constant is reconstructed"
            return None
        return f"{op} is not reconstructed"

    # ---- data
    def _chunks(self, layers: list[_Layer]):
        """``(index of the first layer, layers)`` runs whose sampled targets fit ``target_budget`` bytes."""
        per_sample = max(1, -(-self.rows // len(self.x)))
        chunk, first, size = [], 0, 0
        for k, layer in enumerate(layers):
            shape = self.cg.shapes.get(layer.y) or ()
            positions = int(np.prod(shape[2:])) if layer.op == "Conv" and len(shape) > 2 and all(isinstance(v, int) for v in shape[2:]) else 1
            nbytes = 4 * len(self.x) * min(per_sample, positions) * len(layer.keep_out)
            if chunk and size + nbytes > self.target_budget:
                yield first, chunk
                chunk, first, size = [], k, 0
            chunk.append(layer)
            size += nbytes
        if chunk:
            yield first, chunk

    def _targets(self, layers: list[_Layer], first: int = 0) -> dict[str, tuple[_Rows, list[np.ndarray]]]:
        """One pass of the original model: sampled output rows (kept channels) of ``layers``."""
        names = list(dict.fromkeys(layer.y for layer in layers))
        model = _prefix(self.cg.model, names)
        out: dict[str, tuple[_Rows, list[np.ndarray]]] = {}
        for k, layer in enumerate(layers):
            out[layer.node] = (_Rows(self.rows, len(self.x), self.seed + first + k), [])
        for outs in self.runner.batches(model, self.x, names):
            vals = dict(zip(names, outs))
            for layer in layers:
                rows, ys = out[layer.node]
                y = vals[layer.y]
                if layer.op == "Conv":
                    b, c = y.shape[:2]
                    flat = y.reshape(b, c, -1)
                    idx = rows.pick(b, flat.shape[2])
                    sel = np.take_along_axis(flat, idx[:, None, :], axis=2)  # (b, c, k)
                    ys.append(sel.transpose(0, 2, 1).reshape(-1, c)[:, layer.keep_out])
                else:  # one row per sample: nothing to pick
                    ys.append(y[:, layer.keep_out])
        return out

    # ---- the fit
    def run(self, mask: np.ndarray, pruned: onnx.ModelProto, *, progress=None) -> ReconstructionResult:
        t0 = time.perf_counter()
        kept, m = _working_copy(self.cg, mask, pruned)
        layers, fits = self._layers(kept)
        params = Params(m)
        nodes = {n.name: n for n in m.graph.node}
        done = 0
        for first, chunk in self._chunks(layers):  # original-model targets for a few layers at a time
            targets = self._targets(chunk, first)
            for layer in chunk:
                fits.append(self._fit(m, params, nodes[layer.node], layer, *targets.pop(layer.node)))
                done += 1
                if progress:
                    progress(done, len(layers))
        seconds = time.perf_counter() - t0
        result = ReconstructionResult(m, tuple(fits), len(self.x), seconds)
        log.info("%s", result.summary())
        return result

    def calibrate(self, mask: np.ndarray, pruned: onnx.ModelProto, *, method: str = "reconstruct", progress=None) -> ReconstructionResult:
        """Same call as :meth:`onnxprune.calibrate.Calibrator.calibrate`, so either can be used."""
        return self.run(mask, pruned, progress=progress)

    def transform(self, *, method: str = "reconstruct"):
        """``fn(pruned, mask) -> reconstructed model`` for ``sensitivity.analyze(transform=...)``."""
        return lambda pruned, mask: self.run(mask, pruned).model

    def _fit(self, m: onnx.ModelProto, params: Params, node: onnx.NodeProto, layer: _Layer, rows: _Rows, ys: list[np.ndarray]) -> LayerFit:
        """Accumulate normal equations on a fit split and a held-out split (every 5th sample),
        solve on the fit split, apply only if the held-out error drops, then refit on all rows."""
        current = self._current(node, params)
        fit, hold = _Normal(), _Normal()
        start = 0
        for k, (xb,) in enumerate(self.runner.batches(_prefix(m, [layer.x]), self.x, [layer.x])):
            y = ys[k].astype(np.float64)
            if layer.op == "Conv":
                a = _patches(xb, layer, rows.picks[k], _out_hw(xb.shape[2:], layer))
            else:
                a = xb.reshape(len(xb), -1)
            a = np.concatenate([a.astype(np.float64), np.ones((len(a), 1))], axis=1)
            sample = np.repeat(np.arange(start, start + len(xb)), len(a) // len(xb))
            held = sample % 5 == 4
            fit.add(a[~held], y[~held])
            hold.add(a[held], y[held])
            start += len(xb)
        features = fit.gram.shape[0] - 1
        n_rows = fit.n + hold.n
        if current.shape[0] != features + 1 or current.shape[1] != len(layer.keep_out):
            return LayerFit(node.name, features, n_rows, skipped="its weights do not match the kept channels")
        if fit.n < features + 1 and self.ridge == 0.0:
            return LayerFit(node.name, features, n_rows, skipped=f"{fit.n} sampled rows for {features + 1} weights per output: pass more calibration samples or a ridge > 0")
        sol = self._solve(fit)
        if sol is None:
            return LayerFit(node.name, features, n_rows, skipped="singular normal equations")
        total = fit.both(hold)
        if hold.n and hold.error(sol) >= hold.error(current):
            e = total.error(current)
            return LayerFit(node.name, features, n_rows, e, e, skipped="the fit did not improve the held-out samples")
        sol = self._solve(total) if hold.n else sol
        if sol is None:
            return LayerFit(node.name, features, n_rows, skipped="singular normal equations")
        before, after = total.error(current), total.error(sol)
        if after >= before:
            return LayerFit(node.name, features, n_rows, before, before, skipped="the fit was not better than the current weights")
        self._write(params, node, sol)
        return LayerFit(node.name, features, n_rows, before, after)

    def _solve(self, eq: _Normal) -> np.ndarray | None:
        features = eq.gram.shape[0] - 1
        lam = self.ridge * float(np.mean(np.diag(eq.gram)[:-1])) if features else 0.0
        reg = np.full(features + 1, lam)
        reg[-1] = 0.0  # the bias is not regularized
        try:
            sol = np.linalg.solve(eq.gram + np.diag(reg), eq.rhs)
        except np.linalg.LinAlgError:
            return None
        return sol if np.all(np.isfinite(sol)) else None

    def _current(self, node: onnx.NodeProto, params: Params) -> np.ndarray:
        """The node's present map as a (features + 1, outputs) matrix (last row: bias)."""
        w = params.get(node, 1).astype(np.float64)
        op = node.op_type
        if op == "Conv":
            mat = w.reshape(w.shape[0], -1).T
            b = params.get(node, 2)
            bias = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        elif op == "Gemm":
            alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
            mat = alpha * (w.T if int(attr(node, "transB", 0)) else w)
            c = params.get(node, 2)
            bias = np.zeros(mat.shape[1]) if c is None else beta * np.broadcast_to(c.astype(np.float64).reshape(-1), (mat.shape[1],))
        else:  # MatMul
            mat, bias = w, np.zeros(w.shape[1])
        return np.vstack([mat, bias[None, :]])

    def _write(self, params: Params, node: onnx.NodeProto, sol: np.ndarray) -> None:
        """Store ``sol`` (the :meth:`_current` layout) as the node's weights and bias, in the weight's dtype."""
        mat, bias = sol[:-1], sol[-1]
        op = node.op_type
        w = params.get(node, 1)
        dtype = w.dtype
        if op == "Conv":
            params.set(node, 1, mat.T.reshape(w.shape), dtype)
            params.set(node, 2, bias, dtype)
        elif op == "Gemm":
            alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
            b = mat / alpha
            params.set(node, 1, b.T if int(attr(node, "transB", 0)) else b, dtype)
            if beta == 0.0:
                _set_float_attr(node, "beta", 1.0)
                beta = 1.0
            c = params.get(node, 2)
            new_c = bias / beta
            params.set(node, 2, new_c.reshape(c.shape) if c is not None and c.size == len(new_c) else new_c, dtype)
        else:  # MatMul: fit without changing the graph; the bias row is folded through a private Add
            params.set(node, 1, mat, dtype)
            if np.any(bias != 0.0):
                fold(params.model, params, node, np.ones_like(bias), bias)


def _out_hw(in_hw: Sequence[int], layer: _Layer) -> tuple[int, int]:
    out = []
    for n, k, s, d, pb, pe in zip(in_hw, layer.kernel, layer.strides, layer.dilations, layer.pads[:2], layer.pads[2:]):
        out.append((n + pb + pe - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def reconstruct(
    cg: ChannelGraph,
    mask: np.ndarray,
    pruned: onnx.ModelProto,
    x: np.ndarray,
    *,
    rows: int = 16384,
    ridge: float = 1e-3,
    max_samples: int = 512,
    batch_size: int = 64,
    device: str = "cpu",
    threads: int | None = None,
    progress=None,
) -> ReconstructionResult:
    """Re-fit the consumers of ``pruned = apply_mask(cg, mask)`` on unlabeled samples ``x``.

    Returns a new model; neither input is changed. Example::

        model = reconstruct(cg, mask, apply_mask(cg, mask), x_calib).model
    """
    rec = Reconstructor(cg, x, rows=rows, ridge=ridge, max_samples=max_samples, batch_size=batch_size, device=device, threads=threads)
    return rec.run(mask, pruned, progress=progress)


__all__ = ["reconstruct", "Reconstructor", "ReconstructionResult", "LayerFit"]
