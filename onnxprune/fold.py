"""Fold a per-output-channel correction ``y -> s * y + t`` into a node's parameters.

Calibration (:mod:`onnxprune.calibrate`) computes, for each consumer of a
pruned group, a scale ``s`` and shift ``t`` per output channel; this module
writes them into the node so the graph keeps its structure:

* Conv: ``W[o] *= s[o]``, ``b[o] = s[o] * b[o] + t[o]`` (a bias input is added
  when missing); ConvTranspose the same on its ``[C_in, C_out/g, ...]`` layout.
* Gemm: the output axis of ``B`` (``transB`` aware) is scaled; ``C`` becomes
  ``s * C + t / beta`` (``beta`` set to 1 when there was no bias). A ``C`` of
  shape ``[N, M]`` cannot hold a per-channel vector: the node is skipped.
* MatMul has no bias: a private ``Add`` node is inserted after it.
* BatchNormalization: the new affine map is expressed through its running
  statistics where possible (so a later BN re-estimation stays meaningful),
  else through ``gamma``/``beta``.

Parameters shared with other nodes get private copies (:class:`Params`), so
a correction never leaks into an unrelated node.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import attr

log = logging.getLogger(__name__)

__all__ = ["Params", "fold", "out_axis"]

class Params:
    """Read/write node parameters of a model in place; shared constants get private copies."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.const_nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        self.uses: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                self.uses[i] = self.uses.get(i, 0) + 1
        self.graph_inputs = {i.name for i in model.graph.input}
        self.names = set(self.inits) | {o for n in model.graph.node for o in n.output} | self.graph_inputs

    def get(self, node: onnx.NodeProto, slot: int) -> np.ndarray | None:
        if len(node.input) <= slot or not node.input[slot]:
            return None
        name = node.input[slot]
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.const_nodes.get(name)
        if n is not None:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def set(self, node: onnx.NodeProto, slot: int, value: np.ndarray, dtype=None) -> None:
        """Give ``node`` the value ``value`` at input ``slot`` (in place when only this node uses it)."""
        old = self.get(node, slot)
        dtype = dtype or (old.dtype if old is not None else np.float32)
        value = np.ascontiguousarray(value, dtype=dtype)
        name = node.input[slot] if len(node.input) > slot else ""
        private = name and self.uses.get(name, 0) == 1 and name not in self.graph_inputs and (old is None or old.shape == value.shape)
        if private and name in self.inits:
            self.inits[name].CopyFrom(numpy_helper.from_array(value, name))
            return
        if private and name in self.const_nodes:
            n = self.const_nodes[name]
            del n.attribute[:]
            n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value, name)))
            return
        new = self.fresh(f"{node.name}__calib_{slot}")
        self.model.graph.initializer.append(numpy_helper.from_array(value, new))
        self.inits[new] = self.model.graph.initializer[-1]
        while len(node.input) <= slot:
            node.input.append("")
        if name:
            self.uses[name] -= 1
        node.input[slot] = new
        self.uses[new] = 1


def out_axis(node: onnx.NodeProto, rank: int) -> int:
    return 1 if node.op_type in ("Conv", "ConvTranspose", "BatchNormalization") else rank - 1


def _set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, float(value)))


def fold(model: onnx.ModelProto, params: Params, node: onnx.NodeProto, s: np.ndarray, t: np.ndarray) -> bool:
    """Replace ``node``'s output ``y`` by ``s * y + t`` (per output channel) in its parameters.

    Returns False (and changes nothing) where the node's bias cannot hold a
    per-channel vector (a Gemm bias of shape ``[N, M]``).
    """
    s = np.asarray(s, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    op = node.op_type
    scale = not np.all(s == 1.0)
    if op == "BatchNormalization":
        _fold_bn(params, node, s, t)
        return True
    w = params.get(node, 1)
    if op == "Gemm":
        c = params.get(node, 2)
        if c is not None and float(attr(node, "beta", 1.0)) != 0.0 and c.size not in (1, len(s)):
            log.warning("calibration skips Gemm '%s': its bias has shape %s, not one value per output", node.name, list(c.shape))
            return False
    if scale:
        w64 = w.astype(np.float64)
        if op == "Conv":
            w64 = w64 * s.reshape(-1, *[1] * (w.ndim - 1))
        elif op == "ConvTranspose":
            g = int(attr(node, "group", 1))
            shp = w64.shape
            w64 = (w64.reshape(g, shp[0] // g, shp[1], *shp[2:]) * s.reshape(g, 1, shp[1], *[1] * (w.ndim - 2))).reshape(shp)
        elif op == "Gemm" and attr(node, "transB", 0):
            w64 = w64 * s[:, None]
        else:  # Gemm (B is [K, M]) or MatMul
            w64 = w64 * s[None, :]
        params.set(node, 1, w64, w.dtype)
    if op in ("Conv", "ConvTranspose"):
        b = params.get(node, 2)
        b64 = np.zeros(len(s)) if b is None else b.astype(np.float64)
        params.set(node, 2, s * b64 + t, w.dtype)
    elif op == "Gemm":
        beta = float(attr(node, "beta", 1.0))
        c = params.get(node, 2)
        if c is None or beta == 0.0:
            params.set(node, 2, t, w.dtype)
            _set_float_attr(node, "beta", 1.0)
        else:
            c64 = np.broadcast_to(c.astype(np.float64).reshape(-1), (len(s),))
            new = s * c64 + t / beta
            params.set(node, 2, new.reshape(c.shape) if c.size == len(s) else new, c.dtype)
    elif op == "MatMul":
        _matmul_bias(model, params, node, t, w.dtype, s)
    return True


def _matmul_bias(model, params: Params, node, t, dtype, s) -> None:
    """MatMul has no bias: add (or update) a private ``Add`` node after it."""
    add_name = f"{node.name}__calib_add"
    adds = [n for n in model.graph.node if n.name == add_name]
    if adds:
        add = adds[0]
        old = params.get(add, 1).astype(np.float64)
        params.set(add, 1, s * old + t, dtype)
        return
    out = node.output[0]
    mid = params.fresh(f"{out}__calib_mm")
    node.output[0] = mid
    const = params.fresh(f"{node.name}__calib_bias")
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(t, dtype=dtype), const))
    params.inits[const] = model.graph.initializer[-1]
    params.uses[const] = 1
    add = helper.make_node("Add", [mid, const], [out], name=add_name)
    nodes = list(model.graph.node)
    k = next(i for i, n in enumerate(nodes) if n is node or n.name == node.name)
    model.graph.node.insert(k + 1, add)


def _fold_bn(params: Params, node, s, t) -> None:
    gamma, beta, mean, var = (params.get(node, k).astype(np.float64) for k in (1, 2, 3, 4))
    dtype = params.get(node, 1).dtype
    eps = float(attr(node, "epsilon", 1e-5))
    k = gamma / np.sqrt(var + eps)
    c = beta - k * mean
    k2, c2 = s * k, s * c + t
    with np.errstate(divide="ignore", invalid="ignore"):
        var2 = (var + eps) / (s * s) - eps
        mean2 = (beta - c2) / k2
    stats_ok = (s > 0) & (k2 != 0) & (var2 >= 0) & np.isfinite(var2) & np.isfinite(mean2)
    # fallback per channel: keep mean/var, move the change into gamma/beta
    gamma2 = np.where(stats_ok, gamma, k2 * np.sqrt(var + eps))
    beta2 = np.where(stats_ok, beta, c2 + k2 * mean)
    params.set(node, 1, gamma2, dtype)
    params.set(node, 2, beta2, dtype)
    params.set(node, 3, np.where(stats_ok, mean2, mean), dtype)
    params.set(node, 4, np.where(stats_ok, var2, var), dtype)
