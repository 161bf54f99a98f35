"""Recover accuracy after pruning without training: calibrate activation statistics.

Exported CNNs have BatchNormalization folded into the convolutions, so the
usual fix for the accuracy collapse after pruning (re-estimating BN running
statistics) has no BN to work on. :func:`calibrate` does the equivalent on the
folded weights, with unlabeled samples ``x`` and ONNX Runtime only. It runs
``x`` through the original model (``cg.model``) and the pruned model (same
node and tensor names; kept channels keep their order) and changes only
weights and biases (plus, for a MatMul, one ``Add`` node carrying a new bias).

**Consumers** are the compute nodes (Conv, ConvTranspose, Gemm, MatMul) that
read at least one removed channel. **Affected** nodes are the consumers and
everything downstream of them: only their values differ from the original.

1. Bias compensation (``method="bias"`` or ``"both"``). A consumer
   ``y = f(x) + b`` that is linear in its input ``x`` lost the term
   ``f(x_R)``, where ``x_R`` is ``x`` with every kept channel zeroed. Its
   expectation is ``f(E[x_R])`` because ``f`` is linear. ``E[x]`` is the
   per-position mean over the samples of the original model's input
   activation (shape ``[C, H, W]``; removed channels only). Then

       b'[o] = b[o] + mean_p f(E[x_R])[o, p]

   where ``p`` runs over the output positions. ``f`` is the original node
   without its bias, with the same strides, pads, dilations and groups. It
   is run once on the mean map with ONNX Runtime. For a Conv this is
   ``sum_{c removed} sum_{kh,kw} W[o,c,kh,kw] * E[x_c]`` at the shifted
   positions. With zero padding, border outputs see fewer taps, and the
   formula counts that exactly. For Gemm after Flatten (``y = alpha*x@B +
   beta*C``) there is no spatial axis:
   ``C'[m] = C[m] + alpha * sum_{f removed} mean_f * B[f, m] / beta``, which
   is exact per feature. For a grouped conv each output reads only the
   removed channels of its own group. Depthwise consumers lose the matching
   outputs, so they need nothing. A consumer without a bias gets a new bias
   initializer.

   *Approximation*: a per-channel bias is constant over positions, so it
   restores the output's expectation averaged over positions exactly. That
   average is also the least-squares best constant. Position ``p`` is off by
   ``f(E[x_R])[o,p] - mean_p f(E[x_R])[o,p]``, which is non-zero wherever
   the exact compensation varies with position. With zero padding the border
   rows and columns get fewer taps, so they are over-compensated, and the
   interior is under-compensated by one constant per channel (the border
   deficit's share of the average). It is also non-zero where the removed
   activation's mean varies spatially.
   ``CalibrationResult.layers[i].bias_border_error`` reports the RMS of this
   residual relative to the RMS of the compensation. A 1x1 conv without
   padding, or a Gemm/MatMul, is exact when the removed channels are
   constant. (Position-exact compensation would need a ``[C, H, W]``
   constant added after the conv: an extra node, and a fixed input size.)

2. Affine re-normalization (``method="affine"`` or ``"both"``). A *target*
   is an affected compute node or an affected BatchNormalization. A compute
   node whose only consumer is a BatchNormalization lets that BN be its
   target. Targets are visited in topological order. For each one,
   per-channel mean/std (over samples and positions) of its output ``T`` are
   measured in the *partly calibrated* pruned model (``mu_p, sd_p``) and in
   the original model (``mu_o, sd_o``, kept channels). Then ``T`` is
   replaced by ``s*T + t`` with

       s = sd_o / sd_p,   t = mu_o - s * mu_p

   folded into the node: ``W'[o] = s[o] W[o]`` (Conv output rows, Gemm
   columns of ``B``, ConvTranspose ``W[:, o]``) and ``b' = s*b + t``. This is
   BN re-estimation applied to the folded weights: a folded conv computes
   ``gamma*(z - mu)/sigma + beta``, and matching its output moments
   re-estimates ``mu`` and ``sigma`` on the pruned network while keeping
   ``gamma`` and ``beta``. Downstream targets are measured after upstream ones
   are fixed, so each sees corrected inputs.

   For an explicit BatchNormalization ``y = k z + c`` (``k =
   gamma/sqrt(var+eps)``, ``c = beta - k*mean``), the same ``s, t`` give
   ``k' = s k`` and ``c' = s c + t``, which are written as re-estimated
   statistics with ``gamma``, ``beta`` and ``eps`` unchanged:

       var' = (var + eps) / s^2 - eps,   mean' = (beta - c') / k'

   If ``var'`` would be negative, or ``s = 0``, the change goes into
   ``gamma``/``beta`` instead. In general ``mean' = mu_p + (mean - mu_o)/s``.
   When the calibration data has the statistics the BN was trained with
   (``mu_o = mean``, ``sd_o^2 = var``), this gives ``mean' = mu_p`` and
   ``var' = sd_p^2`` (up to an ``eps`` term): the BN input statistics of the
   pruned model, as in torch's BN recalibration. Unlike plain re-estimation,
   it leaves the unpruned model unchanged.

   Residual Add / Concat: a conv's target is its own output *before* the Add,
   matched channel by channel against the same branch of the original. Every
   kept channel exists in both, so coupled channels need no extra care.
   Channels with ``sd_p ~ 0`` (dead) are only shifted (``s = 1``). ``s`` is
   capped at ``max_scale``.

   With ``"both"``, step 1 runs first, then step 2. A per-channel constant
   does not change a channel's std, and step 2 re-matches its mean, so on
   every node step 2 touches the result equals ``"affine"`` (up to float
   rounding). The two differ only on nodes step 2 skips, i.e. the layer
   producing a graph output when ``affine_outputs=False``. Measured on the
   Fashion-MNIST VGG (benchmarks/calibration.py), also matching the logits
   layer is better (91.0% vs 90.5% at -30% MACs), hence the default
   ``affine_outputs=True``. ``"bias"`` alone needs no run of the pruned
   model, but it recovers much less, because the kept channels' statistics
   also go stale.

Example::

    cg = find_groups(model); mask = ...; pruned = apply_mask(cg, mask)
    res = calibrate(cg, mask, pruned, np.load("calib.npz")["x"])
    save_model(res.model, "pruned.calibrated.onnx")
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import DataError, UsageError, VerificationError
from .extract import has_subgraphs, needed_nodes, prefix, subgraph
from .fold import Params, fold, out_axis
from .graph import GraphIndex, opset_version
from .groups import ChannelGraph
from .runtime import Runner, check_batch_size, data_inputs, fixed_batch

log = logging.getLogger(__name__)

METHODS = ("bias", "affine", "both")
Progress = Callable[[int, int], None]
_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerCalibration:
    """What calibration changed in one node.

    ``kind``: ``"bias"`` (step 1), ``"affine"`` (step 2 on a compute node) or
    ``"bn"`` (step 2 on a BatchNormalization). ``shift`` is max |added bias|
    (bias) or max |t| (affine/bn). ``log_scale`` is mean |log s| (0 for bias).
    ``bias_border_error``: the RMS over output positions of the part of the
    exact expected compensation that a per-channel bias cannot hold, divided
    by the RMS of the compensation (0 = exact; bias kind only).
    """

    node: str
    kind: str
    channels: int
    shift: float
    log_scale: float = 0.0
    bias_border_error: float = 0.0


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """The calibrated model (a new ModelProto) and what was done.

    ``output_error_before/after``: relative L2 error ``||y - y_orig|| /
    ||y_orig||`` of the graph outputs on the calibration samples, before and
    after calibration (``None`` when ``measure=False``).
    """

    model: onnx.ModelProto
    method: str
    samples: int
    seconds: float
    layers: tuple[LayerCalibration, ...]
    output_error_before: float | None = None
    output_error_after: float | None = None

    def summary(self) -> str:
        kinds = {k: sum(1 for layer in self.layers if layer.kind == k) for k in ("bias", "affine", "bn")}
        text = f"calibrated ({self.method}) on {self.samples} samples in {self.seconds:.2f}s: " + ", ".join(
            f"{n} {k}" for k, n in kinds.items() if n
        )
        if self.output_error_before is not None:
            text += f"; output error {self.output_error_before:.4f} -> {self.output_error_after:.4f}"
        return text


class _Moments:
    """Streaming per-channel sums (float64) over every axis except ``axis``."""

    def __init__(self, axis: int):
        self.axis = axis
        self.n = 0
        self.s = self.q = None

    def add(self, v: np.ndarray) -> None:
        axes = tuple(i for i in range(v.ndim) if i != self.axis)
        s = np.sum(v, axis=axes, dtype=np.float64)
        q = np.sum(np.square(v, dtype=np.float64) if v.dtype != np.float32 else v * v, axis=axes, dtype=np.float64)
        self.s = s if self.s is None else self.s + s
        self.q = q if self.q is None else self.q + q
        self.n += v.size // v.shape[self.axis]

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.s / self.n
        var = np.maximum(self.q / self.n - mu * mu, 0.0)
        return mu, np.sqrt(var)


class _ActivationCache:
    """Tensors of the partly calibrated model for all samples, kept while later nodes need them.

    Targets are visited in topological order, so the tensors computed for one
    target are final: they are upstream of every later fold. The stats of the
    next target then need only the nodes between cached tensors and it, which
    makes the sequential pass cost about one forward pass instead of one per
    target. When the cache would exceed ``budget`` bytes (or the graph has
    subgraphs), each target runs from the model input, batch by batch.
    """

    def __init__(self, runner: Runner, x: np.ndarray, input_name: str, budget: float, batch: int | None = None):
        self.runner, self.x, self.input_name, self.budget = runner, x, input_name, budget
        self.batch = batch  # the model's fixed batch (declared on segment inputs so the runtime pads), or None
        self.cache: dict[str, np.ndarray] = {input_name: x}
        self.done: set[str] = set()
        self.enabled = budget > 0

    def nbytes(self) -> int:
        return sum(v.nbytes for k, v in self.cache.items() if k != self.input_name)

    def moments(self, model: onnx.ModelProto, tensor: str, axis: int) -> _Moments:
        mo = _Moments(axis)
        if tensor in self.cache:
            mo.add(self.cache[tensor])
            return mo
        if self.enabled and not has_subgraphs(model):
            got = self._segment_moments(model, tensor, axis)
            if got is not None:
                return got
        for _, (v,) in self.runner.batches(prefix(model, [tensor]), self.x, [tensor]):
            mo.add(v)
        return mo

    def _segment_moments(self, model: onnx.ModelProto, tensor: str, axis: int) -> _Moments | None:
        g = model.graph
        keep = needed_nodes(model, [tensor], available=self.cache)
        names = {n.name for n in keep}
        users: dict[str, set] = {}
        for n in g.node:
            for i in n.input:
                users.setdefault(i, set()).add(n.name)
        feeds = [i for i in dict.fromkeys(i for n in keep for i in n.input) if i in self.cache]
        later = [o for n in keep for o in n.output if o and o != tensor and users.get(o, set()) - names - self.done]
        outs = [tensor, *later]
        inputs = {f: (helper.np_dtype_to_tensor_dtype(self.cache[f].dtype), [self.batch, *self.cache[f].shape[1:]]) for f in feeds}
        seg = subgraph(model, keep, inputs, outs)
        mo = _Moments(axis)
        parts: list[list[np.ndarray]] = [[] for _ in outs]
        n = len(self.x)
        for k, (_, vals) in enumerate(self.runner.batches(seg, {f: self.cache[f] for f in feeds}, outs)):
            mo.add(vals[0])
            for p, v in zip(parts, vals):
                p.append(v)
            if k == 0:
                per_sample = sum(v.nbytes for v in vals) / max(len(vals[0]), 1)
                if self.nbytes() + per_sample * n > self.budget:
                    log.debug("activation cache over budget at '%s': running from the input from now on", tensor)
                    self.enabled = False
                    self.cache = {self.input_name: self.x}
                    return None
        for o, p in zip(outs, parts):
            self.cache[o] = np.concatenate(p)
        self.done |= names
        for k in list(self.cache):
            if k != self.input_name and k != tensor and not (users.get(k, set()) - self.done):
                del self.cache[k]
        return mo

    def commit(self, tensor: str, axis: int, s: np.ndarray, t: np.ndarray) -> None:
        """The target's node now computes ``s * T + t``: update the cached value to match."""
        v = self.cache.get(tensor)
        if v is None:
            return
        shape = [1] * v.ndim
        shape[axis] = -1
        self.cache[tensor] = (v * s.reshape(shape).astype(v.dtype) + t.reshape(shape).astype(v.dtype)).astype(v.dtype)


# --------------------------------------------------------------------------- the calibrator
@dataclass(frozen=True)
class _Target:
    node: str  # node whose output is matched and whose parameters change
    tensor: str
    kind: str  # "affine" | "bn"


class Calibrator:
    """Calibrates pruned versions of ``cg.model`` on samples ``x``.

    Original-model statistics are computed once in the constructor. Reuse one
    calibrator for many masks, e.g. in the sensitivity analysis::

        cal = Calibrator(cg, x)
        analyze(cg, scores, evaluator, transform=cal.transform())

    Implements the recovery protocol (:mod:`onnxprune.recovery`) with the
    ``method`` given here: ``recover(mask, pruned)``, ``transform()``.
    """

    def __init__(
        self,
        cg: ChannelGraph,
        x: np.ndarray,
        *,
        method: str = "both",
        affine_outputs: bool = True,
        batch_size: int = 64,
        device: str = "cpu",
        threads: int | None = None,
        progress: Progress | None = None,
    ):
        if method not in METHODS:
            raise UsageError(f"unknown calibration method '{method}'", fix=f"use one of {', '.join(METHODS)}")
        self.method, self.affine_outputs = method, bool(affine_outputs)
        self.cg = cg
        self.x = _check_x(cg.model, x)
        # a fixed-batch model runs its batch at a time; the runtime pads the last chunk and trims its outputs
        self.runner = Runner(device=device, batch_size=check_batch_size(batch_size), threads=threads)
        self.nodes = {n.name: n for n in cg.model.graph.node}
        self.index = GraphIndex(cg.model)
        self.compute = {c.node: c for c in cg.compute if self.nodes[c.node].op_type in _COMPUTE}
        self.outputs = [o.name for o in cg.model.graph.output]
        self.input_name = data_inputs(cg.model)[0].name
        self._original_pass(progress)

    # ---- statistics of the original model
    def _candidates(self) -> dict[str, int]:
        """Tensors whose per-channel moments may be needed: compute and BN outputs -> channel axis."""
        out = {}
        for node in self.cg.model.graph.node:
            if node.name in self.compute or node.op_type == "BatchNormalization":
                t = node.output[0]
                shp = self.cg.shapes.get(t)
                rank = len(shp) if shp else 2
                out[t] = self.cg.tensor_maps[t][0] if t in self.cg.tensor_maps else out_axis(node, rank)
        return out

    def _original_pass(self, progress: Progress | None) -> None:
        moments_axes = self._candidates()
        mean_inputs = sorted({self.nodes[c].input[0] for c, cm in self.compute.items() if cm.in_atoms is not None})
        names = list(dict.fromkeys([*self.outputs, *moments_axes, *mean_inputs]))
        model = prefix(self.cg.model, names)
        moments = {t: _Moments(a) for t, a in moments_axes.items()}
        sums: dict[str, np.ndarray] = {}
        ref: dict[str, list] = {o: [] for o in self.outputs}
        n = len(self.x)
        for done, outs in self.runner.batches(model, self.x, names):
            vals = dict(zip(names, outs))
            for t, mo in moments.items():
                mo.add(vals[t])
            for t in mean_inputs:
                s = vals[t].astype(np.float64).sum(axis=0)
                sums[t] = s if t not in sums else sums[t] + s
            for o in self.outputs:
                ref[o].append(vals[o])
            if progress:
                progress(done, n)
        self.orig_moments = {t: mo.mean_std() for t, mo in moments.items()}
        self.orig_mean_maps = {t: s / n for t, s in sums.items()}
        self.reference = [np.concatenate(ref[o]) for o in self.outputs]

    # ---- structure for one mask
    def _consumers(self, kept) -> list[str]:
        out = []
        for name, cm in self.compute.items():
            if cm.in_atoms is not None and not kept(cm.in_atoms).all():
                out.append(name)
        return out

    def _targets(self, consumers: list[str], affine_outputs: bool) -> list[_Target]:
        model = self.cg.model
        consumers_of: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                consumers_of.setdefault(i, []).append(n)
        tainted: set[str] = set()
        targets = []
        start = set(consumers)
        graph_out = set(self.outputs)
        for node in model.graph.node:
            if not (node.name in start or any(i in tainted for i in node.input)):
                continue
            tainted.update(o for o in node.output if o)
            t = node.output[0]
            if not affine_outputs and t in graph_out:
                continue
            if node.name in self.compute:
                users = consumers_of.get(t, [])
                if len(users) == 1 and users[0].op_type == "BatchNormalization" and t not in graph_out and _bn_foldable(users[0], self.index):
                    continue  # its BN is the target
                targets.append(_Target(node.name, t, "affine"))
            elif node.op_type == "BatchNormalization" and _bn_foldable(node, self.index) and len(node.output) == 1:
                targets.append(_Target(node.name, t, "bn"))
        return targets

    # ---- the calibration
    def calibrate(
        self,
        mask: np.ndarray,
        pruned: onnx.ModelProto,
        *,
        method: str | None = None,
        affine_outputs: bool | None = None,
        max_scale: float = 100.0,
        memory_budget_mb: float = 1024,
        measure: bool = True,
        progress: Progress | None = None,
    ) -> CalibrationResult:
        """Calibrate ``pruned`` (= ``apply_mask(cg, mask)``); see the module docstring.

        ``memory_budget_mb`` caps the activations kept between targets (see
        :class:`_ActivationCache`); above it each target runs from the input.
        """
        method = self.method if method is None else method
        affine_outputs = self.affine_outputs if affine_outputs is None else affine_outputs
        if method not in METHODS:
            raise UsageError(f"unknown calibration method '{method}'", fix=f"use one of {', '.join(METHODS)}")
        t0 = time.perf_counter()
        kept, m = _working_copy(self.cg, mask, pruned)
        params = Params(m)
        nodes = {n.name: n for n in m.graph.node}
        consumers = self._consumers(kept)
        targets = self._targets(consumers, affine_outputs) if method in ("affine", "both") else []
        layers: list[LayerCalibration] = []
        before = self._output_error(m) if measure else None
        total = len(targets) + (1 if method != "affine" else 0)
        done = 0
        if method in ("bias", "both"):
            for name in consumers:
                layers.append(self._compensate(m, params, nodes[name], kept))
            layers = [layer for layer in layers if layer is not None]
            done += 1
            if progress:
                progress(done, total)
        acts = _ActivationCache(self.runner, self.x, self.input_name, memory_budget_mb * 2**20, fixed_batch(self.cg.model))
        for tg in targets:
            layer = self._match(m, params, nodes[tg.node], tg, kept, max_scale, acts)
            if layer is not None:
                layers.append(layer)
            done += 1
            if progress:
                progress(done, total)
        after = self._output_error(m) if measure else None
        seconds = time.perf_counter() - t0
        log.info("calibration (%s): %d consumers, %d targets, %.2fs", method, len(consumers), len(targets), seconds)
        return CalibrationResult(m, method, len(self.x), seconds, tuple(layers), before, after)

    def recover(self, mask: np.ndarray, pruned: onnx.ModelProto, *, progress: Progress | None = None) -> CalibrationResult:
        """The recovery protocol: :meth:`calibrate` with the constructor's ``method``."""
        return self.calibrate(mask, pruned, method=self.method, affine_outputs=self.affine_outputs, progress=progress)

    def transform(self, *, method: str | None = None, affine_outputs: bool | None = None) -> Callable[[onnx.ModelProto, np.ndarray], onnx.ModelProto]:
        """``fn(pruned, mask) -> calibrated model`` for ``sensitivity.analyze(transform=...)`` (default: the constructor's method)."""
        method = self.method if method is None else method
        affine_outputs = self.affine_outputs if affine_outputs is None else affine_outputs

        def fn(pruned: onnx.ModelProto, mask: np.ndarray) -> onnx.ModelProto:
            return self.calibrate(mask, pruned, method=method, affine_outputs=affine_outputs, measure=False).model

        return fn

    def _output_error(self, model: onnx.ModelProto) -> float:
        outs = self.runner.run(model, self.x, self.outputs)
        num = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for o, r in zip(outs, self.reference))
        den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in self.reference)
        return float(np.sqrt(num / max(den, 1e-30)))

    def _compensate(self, m, params: Params, node, kept) -> LayerCalibration | None:
        """Step 1 for one consumer: add the removed channels' expected contribution to the bias."""
        cm = self.compute[node.name]
        orig = self.nodes[node.name]
        x_name = orig.input[0]
        axis, atoms = self.cg.tensor_maps[x_name]
        mean_map = self.orig_mean_maps[x_name].copy()
        gone = ~kept(atoms)
        idx = [slice(None)] * mean_map.ndim
        idx[axis - 1] = np.nonzero(~gone)[0]
        mean_map[tuple(idx)] = 0.0  # only removed channels contribute
        contrib = self._linear_part(orig, mean_map[None].astype(np.float32))[0].astype(np.float64)
        o = out_axis(orig, contrib.ndim + 1) - 1
        contrib = np.moveaxis(contrib, o, 0).reshape(contrib.shape[o], -1)
        delta = contrib.mean(axis=1)
        resid = contrib - delta[:, None]
        rms = float(np.sqrt(np.mean(contrib**2)))
        border = float(np.sqrt(np.mean(resid**2)) / rms) if rms > 0 else 0.0
        keep_out = kept(cm.out_atoms)
        delta = delta[keep_out]
        if not fold(m, params, node, np.ones_like(delta), delta):
            return None
        return LayerCalibration(node.name, "bias", int(len(delta)), float(np.abs(delta).max(initial=0.0)), 0.0, border)

    def _linear_part(self, orig: onnx.NodeProto, inp: np.ndarray) -> np.ndarray:
        """The original node without its bias, applied to ``inp`` (one sample)."""
        w_name = orig.input[1]
        w = self.index.const(w_name)
        node = helper.make_node(orig.op_type, ["x", "w"], ["y"], name="n")
        node.attribute.extend([a for a in orig.attribute if a.name not in ("beta",)])
        graph = helper.make_graph(
            [node],
            "bias_comp",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(inp.shape))],
            [onnx.ValueInfoProto(name="y")],
            initializer=[numpy_helper.from_array(w.astype(np.float32), "w")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset_version(self.cg.model))], ir_version=self.cg.model.ir_version)
        return self.runner.session(model).run_once({"x": inp}, ["y"])[0]

    def _match(self, m, params: Params, node, tg: _Target, kept, max_scale: float, acts: _ActivationCache | None = None) -> LayerCalibration | None:
        """Step 2 for one target: match per-channel mean/std of its output to the original."""
        axis = self.cg.tensor_maps[tg.tensor][0] if tg.tensor in self.cg.tensor_maps else 1
        acts = acts or _ActivationCache(self.runner, self.x, self.input_name, 0, fixed_batch(self.cg.model))
        mo = acts.moments(m, tg.tensor, axis)
        mu_p, sd_p = mo.mean_std()
        mu_o, sd_o = self.orig_moments[tg.tensor]
        if tg.tensor in self.cg.tensor_maps:
            sel = kept(self.cg.tensor_maps[tg.tensor][1])
            mu_o, sd_o = mu_o[sel], sd_o[sel]
        if len(mu_o) != len(mu_p):
            raise VerificationError(
                f"tensor '{tg.tensor}' has {len(mu_p)} channels in the pruned model but the mask keeps {len(mu_o)}",
                fix="pass the pruned model made from this mask (apply_mask(cg, mask))",
                node=tg.node,
            )
        dead = sd_p <= 1e-6 * np.maximum(sd_o, 1e-30)
        s = np.where(dead, 1.0, np.minimum(sd_o / np.where(dead, 1.0, sd_p), max_scale))
        t = mu_o - s * mu_p
        if not fold(m, params, node, s, t):
            return None
        acts.commit(tg.tensor, axis, s, t)
        ls = float(np.mean(np.abs(np.log(np.maximum(s, 1e-12))))) if len(s) else 0.0
        return LayerCalibration(node.name, tg.kind, int(len(s)), float(np.abs(t).max(initial=0.0)), ls)


def _bn_foldable(node: onnx.NodeProto, idx: GraphIndex) -> bool:
    return len(node.input) >= 5 and all(idx.const(n) is not None for n in node.input[1:5])


def _check_x(model: onnx.ModelProto, x) -> np.ndarray:
    """``x`` as the model input wants it (float32 cast from float64), or DataError with the fix."""
    from .data import Dataset, check_against_model

    inputs = data_inputs(model)
    if len(inputs) != 1:
        raise UsageError(
            f"calibration needs a model with one input, this one has {len(inputs)}",
            fix="export the model with a single image input",
        )
    if not isinstance(x, np.ndarray) or x.ndim < 2 or len(x) < 2:
        raise DataError(
            "calibration samples must be an array of shape (N, ...) with N >= 2",
            fix="pass e.g. 512 unlabeled inputs (np.load('calib.npz')['x'])",
        )
    t = inputs[0].type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)
    dtype = helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else np.dtype(np.float32)
    ds = check_against_model(Dataset(x, None, "the calibration samples"), shape, dtype, input_name=inputs[0].name, num_classes=None)
    return ds.x


def _working_copy(cg: ChannelGraph, mask, pruned: onnx.ModelProto):
    """``(kept, copy of pruned)`` after checking that ``mask`` and ``pruned`` belong to ``cg``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (cg.n_units,):
        raise UsageError(f"mask has shape {mask.shape}, expected ({cg.n_units},)", fix="pass the mask the pruned model was made with")
    m = onnx.ModelProto()
    m.CopyFrom(pruned)
    _check_pruned(cg, m)
    return cg.atom_kept(mask), m


def _check_pruned(cg: ChannelGraph, pruned: onnx.ModelProto) -> None:
    names = {n.name for n in cg.model.graph.node}
    have = {n.name for n in pruned.graph.node}
    if not names <= have:
        missing = sorted(names - have)[:3]
        raise UsageError(
            f"the pruned model does not come from this analysis (missing nodes {missing})",
            fix="pass apply_mask(cg, mask) for the same cg that calibrate gets",
        )


def calibrate(
    cg: ChannelGraph,
    mask: np.ndarray,
    pruned: onnx.ModelProto,
    x: np.ndarray,
    *,
    batch_size: int = 64,
    method: str = "both",
    affine_outputs: bool = True,
    device: str = "cpu",
    threads: int | None = None,
    memory_budget_mb: float = 1024,
    measure: bool = True,
    progress: Progress | None = None,
) -> CalibrationResult:
    """Calibrate ``pruned = apply_mask(cg, mask)`` on unlabeled samples ``x``.

    Returns a new model and statistics. Neither ``cg.model`` nor ``pruned`` is
    changed. ``method``: ``"bias"`` (compensate removed channels' mean
    contribution), ``"affine"`` (match per-channel mean/std of every affected
    layer to the original), or ``"both"``. ``affine_outputs``: also match
    the layer producing a graph output (the logits). See the module docstring
    for the math.

    Example: ``model = calibrate(cg, mask, apply_mask(cg, mask), x_calib).model``
    """
    cal = Calibrator(cg, x, method=method, batch_size=batch_size, device=device, threads=threads)
    return cal.calibrate(
        mask, pruned, method=method, affine_outputs=affine_outputs, memory_budget_mb=memory_budget_mb, measure=measure, progress=progress
    )


__all__ = ["calibrate", "Calibrator", "CalibrationResult", "LayerCalibration", "METHODS"]
