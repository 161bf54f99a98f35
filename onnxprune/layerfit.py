"""One layer as a linear map from sampled input rows to output rows, for least-squares re-fitting.

Every layer kind that :mod:`onnxprune.reconstruct` re-fits is written as ``G``
independent linear systems (one per convolution group; ``G = 1`` for a plain
conv, Gemm or MatMul; ``G = C`` for a depthwise conv or a BatchNormalization):

    Y_g[rows, O_g] ~= A_g[rows, F_g] @ W_g[F_g, O_g] + b_g

A *row* is one sample at one output position. ``A_g`` holds the receptive
field of that position in group ``g``'s input channels, in the weight's own
order (channel, then kernel taps), so ``W_g`` is a reshaped slice of the node's
weight:

* Conv (any ``group``): ``F_g = C_in/G * kh * kw``, ``W_g = W[g*O_g:(g+1)*O_g].reshape(O_g, -1).T``.
  Zero padding is a zero in ``A``.
* ConvTranspose (``group == 1``): a transposed conv is a stride-1 conv over
  the input upsampled by inserting ``s - 1`` zeros, padded by
  ``d*(k-1) - pad``, with the kernel flipped and its in/out axes swapped:
  ``W_conv[o, c, i, j] = W[c, o, kh-1-i, kw-1-j]``. Rows are gathered from
  the input directly (a tap on an inserted zero is a zero), nothing is upsampled.
* Gemm / MatMul with a constant 2-D weight, on inputs of any rank (a
  channels-last linear on ``[N, ..., K]``): a row is one sample at one
  position of the middle axes, ``F = K``.
* BatchNormalization: ``y_c = k_c z_c + c_c`` per channel (``G = C``, ``F = 1``);
  the fitted ``(k, c)`` are written as re-estimated statistics (:func:`onnxprune.fold.fold`).

:class:`Normal` accumulates ``A^T A``, ``A^T Y`` and ``|Y|^2`` per group with
BLAS (float64 up to 256 features, else float32 products summed in
float64), so memory is ``G * (F+1)^2`` whatever the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx

from .fold import Params, _set_float_attr, fold
from .graph import attr

FLOAT64_FEATURES = 256  # larger systems accumulate float32 products (2x faster), summed in float64


@dataclass(frozen=True)
class Layer:
    """What to fit for one node (geometry in the node's own input coordinates)."""

    node: str
    kind: str  # "conv" | "fc" | "bn"  (a ConvTranspose is a "conv" with up > 1 or a flipped kernel)
    op: str  # the ONNX op type
    x: str  # input tensor, read from the pruned model
    y: str  # output tensor of the node
    target: str  # tensor of the original model the fit reproduces (``y``, or a residual Add's output)
    target_axis: int
    target_keep: np.ndarray | None  # kept channels of ``target`` (original numbering); None = all
    positions: int  # output positions per sample
    out_w: int = 1
    groups: int = 1
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int] = (0, 0)  # begin (top, left) in the equivalent conv; may be negative
    dilations: tuple[int, int] = (1, 1)
    up: tuple[int, int] = (1, 1)  # ConvTranspose stride: input upsampling factor of the equivalent conv
    side: str | None = None  # pruned-model tensor subtracted from the target (block-wise fit)

    @property
    def transposed(self) -> bool:
        return self.op == "ConvTranspose"


# --------------------------------------------------------------------------- rows
def gather(y: np.ndarray, picks: np.ndarray, axis: int) -> np.ndarray:
    """Values of ``y`` (channel axis 1, or last for ``axis == -1``) at the picked positions -> ``(b * k, C)``."""
    b, k = picks.shape
    if axis == 1:
        flat = y.reshape(b, y.shape[1], -1)
        sel = np.take_along_axis(flat, picks[:, None, :], axis=2)  # (b, C, k)
        return sel.transpose(0, 2, 1).reshape(b * k, -1)
    flat = y.reshape(b, -1, y.shape[-1])
    return np.take_along_axis(flat, picks[:, :, None], axis=1).reshape(b * k, -1)


def conv_rows(x: np.ndarray, layer: Layer, picks: np.ndarray) -> np.ndarray:
    """Receptive fields of ``x`` (b, C, H, W) at the picked output positions -> ``(b * k, C * kh * kw)``."""
    b, C, H, W = x.shape
    k = picks.shape[1]
    (kh, kw), (sh, sw), (dh, dw), (pt, pl), (uh, uw) = layer.kernel, layer.strides, layer.dilations, layer.pads, layer.up
    if (kh, kw, sh, sw, pt, pl, uh, uw) == (1, 1, 1, 1, 0, 0, 1, 1):
        return gather(x, picks, 1)
    oi, oj = np.divmod(picks.reshape(-1), layer.out_w)
    n = np.repeat(np.arange(b), k)
    out = np.empty((len(n), C, kh * kw), dtype=np.float32)
    for a in range(kh):
        ii = oi * sh + a * dh - pt  # index into the (upsampled) input
        vi = (ii >= 0) & (ii <= (H - 1) * uh) & (ii % uh == 0)
        ii = np.clip(ii // uh, 0, H - 1)
        for c in range(kw):
            jj = oj * sw + c * dw - pl
            v = vi & (jj >= 0) & (jj <= (W - 1) * uw) & (jj % uw == 0)
            t = x[n, :, ii, np.clip(jj // uw, 0, W - 1)]  # (rows, C)
            t[~v] = 0.0
            out[:, :, a * kw + c] = t
    return out.reshape(len(n), -1)


def input_rows(layer: Layer, x: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """``A`` for one batch as ``(G, rows, F)`` float32 (``x`` may be float16: only the picked values are converted)."""
    x = np.asarray(x)
    if layer.kind == "conv":
        a = conv_rows(x, layer, picks)
    elif layer.kind == "bn":
        a = gather(x, picks, 1)
    else:
        a = gather(x, picks, -1)
    a = a.astype(np.float32, copy=False)
    g = layer.groups if layer.kind != "bn" else a.shape[1]
    return np.ascontiguousarray(a.reshape(len(a), g, -1).transpose(1, 0, 2))


def output_rows(y: np.ndarray, groups: int) -> np.ndarray:
    """Target rows ``(rows, O)`` as ``(G, rows, O/G)``."""
    return np.ascontiguousarray(y.reshape(len(y), groups, -1).transpose(1, 0, 2))


# --------------------------------------------------------------------------- normal equations
class Normal:
    """Per group: ``G = A1^T A1``, ``R = A1^T Y``, ``|Y|^2`` (``A1`` = ``A`` with a column of ones), float64."""

    def __init__(self, gram=None, rhs=None, y2=None, n: int = 0):
        self.gram, self.rhs, self.y2, self.n = gram, rhs, y2, n

    def add(self, a: np.ndarray, y: np.ndarray) -> None:
        """``a`` (G, r, F), ``y`` (G, r, O)."""
        if a.shape[1] == 0:
            return
        wide = a.shape[2] + 1 > FLOAT64_FEATURES
        dt = np.float32 if wide else np.float64
        a1 = np.concatenate([a.astype(dt, copy=False), np.ones((*a.shape[:2], 1), dtype=dt)], axis=2)
        yd = y.astype(dt, copy=False)
        if len(a1) == 1:  # one system: a1.T @ a1 on the same buffer runs BLAS syrk (half the work of a product)
            m = a1[0]
            g, r = (m.T @ m)[None].astype(np.float64), (m.T @ yd[0])[None].astype(np.float64)
        else:
            at = a1.transpose(0, 2, 1)
            g, r = (at @ a1).astype(np.float64), (at @ yd).astype(np.float64)
        y2 = np.einsum("gro,gro->g", yd, yd, dtype=np.float64)
        if self.gram is None:
            self.gram, self.rhs, self.y2 = g, r, y2
        else:
            self.gram += g
            self.rhs += r
            self.y2 += y2
        self.n += a.shape[1]

    def __add__(self, other: "Normal") -> "Normal":
        if other.gram is None:
            return self
        if self.gram is None:
            return other
        return Normal(self.gram + other.gram, self.rhs + other.rhs, self.y2 + other.y2, self.n + other.n)

    def sq_error(self, sol: np.ndarray, gsol: np.ndarray | None = None) -> np.ndarray:
        """Per group ``|A1 sol - Y|^2`` from the sums (``gsol``: ``gram @ sol`` when already known)."""
        cross = np.einsum("gfo,gfo->g", sol, self.rhs)
        quad = np.einsum("gfo,gfo->g", sol, self.gram @ sol if gsol is None else gsol)
        return np.maximum(self.y2 - 2 * cross + quad, 0.0)

    def error(self, sol: np.ndarray, gsol: np.ndarray | None = None) -> float:
        """Relative error ``|A1 sol - Y| / |Y|`` over all groups."""
        return float(np.sqrt(self.sq_error(sol, gsol).sum() / max(float(self.y2.sum()), 1e-30)))

    def ridge(self, ridge: float) -> np.ndarray:
        """Per group ``lam = ridge * mean(diag)`` of the weight rows (the bias row is not regularized)."""
        if self.gram.shape[1] == 1:
            return np.zeros(len(self.gram))
        return ridge * np.mean(np.diagonal(self.gram, axis1=1, axis2=2)[:, :-1], axis=1)

    def gram_times_solution(self, sol: np.ndarray, ridge: float) -> np.ndarray:
        """``gram @ sol`` for ``sol`` from :meth:`solve` with the same ``ridge``, without the product:
        ``(gram + L) sol = rhs`` gives ``gram @ sol = rhs - L sol`` (``L`` the ridge on the weight rows)."""
        out = self.rhs - self.ridge(ridge)[:, None, None] * sol
        out[:, -1] = self.rhs[:, -1]
        return out

    def solve(self, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        """``(solutions (G, F+1, O), ok per group)``: ridge ``ridge * mean(diag)`` on the weights, not the bias."""
        gram = self.gram.copy()
        f = gram.shape[1] - 1
        if f:
            lam = self.ridge(ridge)
            idx = np.arange(f)
            gram[:, idx, idx] += lam[:, None]
        try:
            sol = _spd_solve(gram, self.rhs)
            ok = np.all(np.isfinite(sol), axis=(1, 2))
        except np.linalg.LinAlgError:
            sol, ok = np.zeros_like(self.rhs), np.zeros(len(gram), dtype=bool)
            for g in range(len(gram)):
                try:
                    sol[g] = np.linalg.solve(gram[g], self.rhs[g])
                    ok[g] = bool(np.all(np.isfinite(sol[g])))
                except np.linalg.LinAlgError:
                    pass
        return np.where(ok[:, None, None], sol, 0.0), ok


def _spd_solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``gram @ x = rhs`` (symmetric, batched): Cholesky through torch when it is installed
    (about half the work of numpy's LU), numpy's LU otherwise or when Cholesky fails."""
    if gram.shape[1] > 256:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            g = torch.from_numpy(gram)
            chol, info = torch.linalg.cholesky_ex(g)
            if not bool(info.any()):
                return torch.cholesky_solve(torch.from_numpy(rhs), chol).numpy()
    return np.linalg.solve(gram, rhs)


# --------------------------------------------------------------------------- the node's present map, and writing a new one
def current(params: Params, node: onnx.NodeProto, layer: Layer) -> np.ndarray | None:
    """The node's map as ``(G, F+1, O_g)`` float64 (last row: bias), or None if it cannot be read."""
    w = params.get(node, 1)
    if w is None:
        return None
    w = w.astype(np.float64)
    op, g = node.op_type, layer.groups
    if op == "BatchNormalization":
        gamma, beta, mean, var = (params.get(node, k).astype(np.float64) for k in (1, 2, 3, 4))
        k = gamma / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
        return np.stack([k, beta - k * mean], axis=1)[:, :, None]
    if op in ("Conv", "ConvTranspose"):
        wc = _conv_weight(w, layer)
        cout = wc.shape[0]
        mat = wc.reshape(g, cout // g, -1).transpose(0, 2, 1)
        b = params.get(node, 2)
        bias = np.zeros(cout) if b is None else b.astype(np.float64)
        return np.concatenate([mat, bias.reshape(g, 1, -1)], axis=1)
    if op == "Gemm":
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        mat = alpha * (w.T if int(attr(node, "transB", 0)) else w)
        c = params.get(node, 2)
        bias = np.zeros(mat.shape[1]) if c is None else beta * np.broadcast_to(c.astype(np.float64).reshape(-1), (mat.shape[1],))
        return np.vstack([mat, bias[None, :]])[None]
    return np.vstack([w, np.zeros((1, w.shape[1]))])[None]  # MatMul


def _conv_weight(w: np.ndarray, layer: Layer) -> np.ndarray:
    """The weight as a conv weight ``[C_out, C_in/G, kh, kw]`` (a ConvTranspose's flipped and swapped)."""
    if layer.transposed:
        return np.flip(w, axis=(2, 3)).transpose(1, 0, 2, 3)
    return w


def write(params: Params, node: onnx.NodeProto, layer: Layer, sol: np.ndarray) -> None:
    """Store ``sol`` (the :func:`current` layout) as the node's parameters, in the weight's dtype."""
    op = node.op_type
    w = params.get(node, 1)
    dtype = w.dtype
    if op == "BatchNormalization":
        cur = current(params, node, layer)[:, :, 0]
        k, c = cur[:, 0], cur[:, 1]
        a, b = sol[:, 0, 0], sol[:, 1, 0]
        ok = k != 0
        s = np.where(ok, a / np.where(ok, k, 1.0), 1.0)
        fold(params.model, params, node, s, np.where(ok, b - s * c, 0.0))
        return
    if op in ("Conv", "ConvTranspose"):
        g, _, og = sol.shape
        mat = sol[:, :-1, :].transpose(0, 2, 1).reshape(g * og, -1)  # [C_out, C_in/G * kh * kw]
        if layer.transposed:
            wc = mat.reshape(w.shape[1], w.shape[0], *w.shape[2:])
            params.set(node, 1, np.flip(wc.transpose(1, 0, 2, 3), axis=(2, 3)), dtype)
        else:
            params.set(node, 1, mat.reshape(w.shape), dtype)
        params.set(node, 2, sol[:, -1, :].reshape(-1), dtype)
        return
    mat, bias = sol[0, :-1], sol[0, -1]
    if op == "Gemm":
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        b = mat / alpha
        params.set(node, 1, b.T if int(attr(node, "transB", 0)) else b, dtype)
        if beta == 0.0:
            _set_float_attr(node, "beta", 1.0)
            beta = 1.0
        c = params.get(node, 2)
        new_c = bias / beta
        params.set(node, 2, new_c.reshape(c.shape) if c is not None and c.size == len(new_c) else new_c, dtype)
        return
    params.set(node, 1, mat, dtype)  # MatMul: the bias goes into a private Add after it
    if np.any(bias != 0.0):
        fold(params.model, params, node, np.ones_like(bias), bias)


# --------------------------------------------------------------------------- which nodes, and their geometry
def conv_pads(node: onnx.NodeProto, in_hw: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int]) -> tuple[int, ...]:
    """Explicit ``(begin..., end...)`` pads of a Conv, ``auto_pad`` resolved."""
    mode = attr(node, "auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("NOTSET", ""):
        return tuple(int(v) for v in attr(node, "pads", [0] * (2 * len(k))))
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


def _known(shape) -> bool:
    return shape is not None and all(isinstance(v, int) and v > 0 for v in shape[1:])


def describe(node: onnx.NodeProto, w: np.ndarray | None, shapes: Mapping[str, tuple], *, target: str, target_axis: int,
             target_keep: np.ndarray | None, side: str | None = None) -> Layer | str:
    """The :class:`Layer` for ``node`` (original node; ``w`` its weight), or why it cannot be fitted."""
    op = node.op_type
    xs, ys = shapes.get(node.input[0]), shapes.get(node.output[0])
    common = dict(node=node.name, op=op, x=node.input[0], y=node.output[0], target=target, target_axis=target_axis, target_keep=target_keep, side=side)
    if op == "BatchNormalization":
        if len(node.input) < 5 or len(node.output) != 1 or not _known(xs) or len(xs) < 2:
            return "BatchNormalization without constant statistics or known shape"
        return Layer(kind="bn", positions=int(np.prod(xs[2:], dtype=np.int64)), **common)
    if w is None:
        return "its weight is not a constant"
    if op in ("Conv", "ConvTranspose"):
        if w.ndim != 4 or not _known(xs) or not _known(ys) or len(xs) != 4:
            return "only 2-D convolutions with known spatial size are re-fitted"
        g = int(attr(node, "group", 1))
        k = tuple(int(v) for v in w.shape[2:])
        s = tuple(int(v) for v in attr(node, "strides", [1, 1]))
        d = tuple(int(v) for v in attr(node, "dilations", [1, 1]))
        geo = dict(positions=int(ys[2] * ys[3]), out_w=int(ys[3]), groups=g, kernel=k, dilations=d)
        if op == "Conv":
            p = conv_pads(node, xs[2:], k, s, d)
            return Layer(kind="conv", strides=s, pads=(p[0], p[1]), **geo, **common)
        mode = attr(node, "auto_pad", b"NOTSET")
        if g != 1 or (mode.decode() if isinstance(mode, bytes) else mode) not in ("NOTSET", ""):
            return "ConvTranspose with groups or auto_pad is not re-fitted"
        p = [int(v) for v in attr(node, "pads", [0, 0, 0, 0])]
        eq = tuple(d[i] * (k[i] - 1) - p[i] for i in range(2))
        return Layer(kind="conv", strides=(1, 1), pads=eq, up=s, **geo, **common)
    if op == "Gemm":
        if int(attr(node, "transA", 0)) or xs is None or len(xs) != 2:
            return "Gemm with transA or a non-2-D input"
        return Layer(kind="fc", positions=1, **common)
    if op == "MatMul":
        if w.ndim != 2 or xs is None or len(xs) < 2 or not all(isinstance(v, int) and v > 0 for v in xs[1:]):
            return "only MatMul of an input of known shape by a 2-D constant is re-fitted"
        return Layer(kind="fc", positions=int(np.prod(xs[1:-1], dtype=np.int64)), **common)
    return f"{op} is not re-fitted"


__all__ = ["Layer", "Normal", "conv_pads", "conv_rows", "current", "describe", "gather", "input_rows", "output_rows", "write"]
