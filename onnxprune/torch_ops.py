"""Torch implementations of ONNX ops, for :class:`onnxprune.torch_exec.OnnxModule`.

The registry :data:`OPS` maps ``op_type -> OpDef``. A builder, registered with
the :func:`op` decorator, parses a node's attributes once and returns a small
callable taking the input tensors; adding an op is one decorated function.
``OpDef.host`` lists the inputs read as Python values (shapes, axes, pads,
scales); ``OpDef.soft_host`` those read as Python values only when constant
(Gather indices, Clip bounds). :func:`unsupported_ops` lists the op types a
model uses that the registry lacks. Semantics follow the ONNX operator
specification (and ONNX Runtime where the spec leaves a choice, e.g. Resize
coordinate rounding).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import FinetuneError, MissingDependencyError
from .graph import attr, node_label

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise MissingDependencyError("fine-tuning needs torch", fix="pip install 'onnxprune[finetune]'") from exc


__all__ = ["OPS", "OpDef", "op", "supported_ops", "unsupported_ops"]

TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


# --------------------------------------------------------------------------- registry
class Unsupported(Exception):
    """Raised by a builder for a node whose attributes it cannot handle."""


class Runtime:
    """Mutable state the op closures read at run time."""

    def __init__(self, train_bn: bool) -> None:
        self.training = False
        self.train_bn = train_bn
        self.device = torch.device("cpu")


@dataclass
class NodeCtx:
    """What a builder sees: the node, the opset, run-time state and initializer shapes."""

    node: onnx.NodeProto
    opset: int
    rt: Runtime
    const_shapes: dict[str, tuple[int, ...]]

    def attr(self, name: str, default: Any = None) -> Any:
        return attr(self.node, name, default)

    @property
    def n_out(self) -> int:
        """Number of outputs up to the last named one."""
        return _n_out(self.node)

    def input_shape(self, i: int) -> tuple[int, ...] | None:
        name = self.node.input[i] if i < len(self.node.input) else ""
        return self.const_shapes.get(name)


@dataclass(frozen=True)
class OpDef:
    """``build(ctx) -> callable(*inputs)``. Inputs in ``host`` are read as Python values
    (the callable gets a list/scalar once cached, a tensor on the first run); inputs in
    ``soft_host`` are passed as Python values only when they are constant."""

    build: Callable[[NodeCtx], Callable]
    host: frozenset = frozenset()
    soft_host: frozenset = frozenset()


OPS: dict[str, OpDef] = {}


def op(*names: str, host: tuple[int, ...] = (), soft_host: tuple[int, ...] = ()):
    """Register ``builder(ctx) -> callable(*inputs)`` for the given op types."""

    def deco(builder):
        for n in names:
            OPS[n] = OpDef(builder, frozenset(host), frozenset(soft_host))
        return builder

    return deco


def supported_ops() -> list[str]:
    return sorted(OPS)


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types in ``model`` the executor has no rule for (sorted, unique)."""
    return sorted({_op_key(n) for n in model.graph.node if _op_key(n) not in OPS and n.op_type != "Constant"})


def _n_out(node: onnx.NodeProto) -> int:
    n = len(node.output)
    while n > 1 and not node.output[n - 1]:
        n -= 1
    return n


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _host(v):
    """Python value of a shape/axes/scales input (tensor -> list or scalar)."""
    if v is None or isinstance(v, (list, tuple, int, float)):
        return v
    return v.tolist()


# --------------------------------------------------------------------------- elementwise
for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "MatMul": torch.matmul,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "Where": torch.where, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Exp": torch.exp, "Log": torch.log, "Relu": F.relu,
    "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Softplus": F.softplus, "Mish": F.mish,
    "HardSwish": F.hardswish, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "Sign": torch.sign, "Not": torch.logical_not, "Sin": torch.sin, "Cos": torch.cos,
}.items():
    OPS[_name] = OpDef(functools.partial(lambda c, f: f, f=_fn))

for _name, _fn in {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}.items():
    OPS[_name] = OpDef(functools.partial(lambda c, f: lambda *xs: functools.reduce(f, xs), f=_fn))


@op("Identity")
def _identity(c):
    return lambda x: x


@op("Mean")
def _mean(c):
    return lambda *xs: functools.reduce(torch.add, xs) / len(xs)


@op("Div")
def _div(c):
    def div(a, b):
        if a.is_floating_point():
            return torch.div(a, b)
        return torch.div(a, b, rounding_mode="trunc")

    return div


@op("Softsign")
def _softsign(c):
    return F.softsign


@op("LeakyRelu")
def _leaky(c):
    alpha = c.attr("alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


@op("Elu")
def _elu(c):
    alpha = c.attr("alpha", 1.0)
    return lambda x: F.elu(x, alpha)


@op("Celu")
def _celu(c):
    alpha = c.attr("alpha", 1.0)
    return lambda x: F.celu(x, alpha)


@op("Selu")
def _selu(c):
    alpha, gamma = c.attr("alpha", 1.67326319217681884765625), c.attr("gamma", 1.05070102214813232421875)
    if abs(alpha - 1.6732632) < 1e-6 and abs(gamma - 1.050701) < 1e-6:
        return F.selu
    return lambda x: gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@op("HardSigmoid")
def _hardsigmoid(c):
    alpha, beta = c.attr("alpha", 0.2), c.attr("beta", 0.5)
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        return F.hardsigmoid
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


@op("Gelu")
def _gelu(c):
    approx = c.attr("approximate", "none")
    return lambda x: F.gelu(x, approximate=approx)


@op("PRelu")
def _prelu(c):
    def prelu(x, slope):
        if slope.numel() == 1:
            return F.prelu(x, slope.reshape(1))
        if x.dim() >= 2 and slope.dim() == x.dim() - 1 and slope.shape[0] == x.shape[1] and slope.numel() == x.shape[1]:
            return F.prelu(x, slope.reshape(-1))
        return torch.where(x >= 0, x, x * slope)

    return prelu


@op("Clip", soft_host=(1, 2))
def _clip(c):
    if c.opset < 11:
        lo, hi = c.attr("min", None), c.attr("max", None)
        return lambda x: torch.clamp(x, lo, hi)

    def clip(x, lo=None, hi=None):
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
            lo, hi = (torch.as_tensor(v, dtype=x.dtype, device=x.device) if v is not None else None for v in (lo, hi))
        return torch.clamp(x, lo, hi)

    return clip


@op("Softmax", "LogSoftmax")
def _softmax(c):
    f = torch.softmax if c.node.op_type == "Softmax" else torch.log_softmax
    if c.opset >= 13:
        axis = c.attr("axis", -1)
        return lambda x: f(x, axis)
    axis = c.attr("axis", 1)  # old semantics: flatten to 2-D at axis

    def old(x):
        a = axis % x.dim()
        return f(x.reshape(math.prod(x.shape[:a]), -1), 1).reshape(x.shape)

    return old


@op("Dropout", host=(1, 2))
def _dropout(c):
    rt, ratio0, n_out = c.rt, c.attr("ratio", 0.5), c.n_out

    def dropout(x, ratio=None, training_mode=None):
        p = ratio0 if ratio is None else float(_host(ratio))
        if n_out == 1:
            return F.dropout(x, p, rt.training) if p > 0 else x
        if not rt.training or p == 0:
            return x, torch.ones_like(x, dtype=torch.bool)
        mask = torch.rand_like(x) >= p
        return x * mask / (1 - p), mask

    return dropout


@op("Cast")
def _cast(c):
    to = c.attr("to")
    if to not in TORCH_DTYPES:
        raise Unsupported(f"Cast to ONNX type {to}")
    dtype = TORCH_DTYPES[to]
    return lambda x: x.to(dtype)


@op("CastLike")
def _castlike(c):
    return lambda x, like: x.to(like.dtype)


# --------------------------------------------------------------------------- conv / linear / norm
def _pads_pairs(pads: list[int], nd: int) -> list[tuple[int, int]]:
    pads = list(pads or [0] * (2 * nd))
    return [(pads[i], pads[i + nd]) for i in range(nd)]


def _torch_pad(pairs: list[tuple[int, int]]) -> list[int]:
    """ONNX (begin, end) per spatial axis -> F.pad's last-axis-first flat list."""
    out: list[int] = []
    for b, e in reversed(pairs):
        out += [b, e]
    return out


def _same_pads(x, kernel, strides, dil, upper: bool) -> list[int]:
    pairs = []
    for i, (k, s, d) in enumerate(zip(kernel, strides, dil)):
        n = x.shape[2 + i]
        total = max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
        small = total // 2
        pairs.append((small, total - small) if upper else (total - small, small))
    return _torch_pad(pairs)


def _spatial(c: NodeCtx, weight_index: int | None) -> int:
    k = c.attr("kernel_shape")
    if k:
        return len(k)
    shp = c.input_shape(weight_index) if weight_index is not None else None
    if shp:
        return len(shp) - 2
    raise Unsupported(f"{c.node.op_type} without kernel_shape whose weight is computed")


@op("Conv")
def _conv(c):
    nd = _spatial(c, 1)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if conv is None:
        raise Unsupported(f"{nd}-D Conv")
    strides, dil = c.attr("strides", [1] * nd), c.attr("dilations", [1] * nd)
    groups, auto = c.attr("group", 1), c.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        upper = auto == "SAME_UPPER"

        def conv_same(x, w, b=None):
            k = w.shape[2:]
            return conv(F.pad(x, _same_pads(x, k, strides, dil, upper)), w, b, strides, 0, dil, groups)

        return conv_same
    pairs = _pads_pairs(c.attr("pads") if auto != "VALID" else None, nd)
    if all(b == e for b, e in pairs):
        padding = [b for b, _ in pairs]
        return lambda x, w, b=None: conv(x, w, b, strides, padding, dil, groups)
    tp = _torch_pad(pairs)
    return lambda x, w, b=None: conv(F.pad(x, tp), w, b, strides, 0, dil, groups)


@op("ConvTranspose")
def _conv_transpose(c):
    nd = _spatial(c, 1)
    convt = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}.get(nd)
    if convt is None:
        raise Unsupported(f"{nd}-D ConvTranspose")
    strides, dil = c.attr("strides", [1] * nd), c.attr("dilations", [1] * nd)
    groups, auto = c.attr("group", 1), c.attr("auto_pad", "NOTSET")
    out_pad = c.attr("output_padding", [0] * nd)
    out_shape = c.attr("output_shape")
    pairs = _pads_pairs(c.attr("pads") if auto == "NOTSET" else None, nd)
    simple = not out_shape and auto in ("NOTSET", "VALID") and all(b == e for b, e in pairs)
    if simple and all(p < max(s, d) for p, s, d in zip(out_pad, strides, dil)):
        padding = [b for b, _ in pairs]
        return lambda x, w, b=None: convt(x, w, b, strides, padding, out_pad, groups, dil)

    def convt_general(x, w, b=None):
        y = convt(x, w, None, strides, 0, 0, groups, dil)
        crops = []
        for i in range(nd):
            full = y.shape[2 + i] + out_pad[i]
            if out_shape or auto in ("SAME_UPPER", "SAME_LOWER"):
                target = out_shape[-nd + i] if out_shape else x.shape[2 + i] * strides[i]
                total = full - target
                half = total // 2
                first = half if auto == "SAME_UPPER" else total - half  # ONNX: NOTSET/SAME_LOWER pad the head more
                crops.append((first, total - first))
            else:
                crops.append(pairs[i])
        y = F.pad(y, _torch_pad([(0, p) for p in out_pad]))
        y = F.pad(y, _torch_pad([(-b0, -e0) for b0, e0 in crops]))
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * nd))
        return y

    return convt_general


@op("Gemm")
def _gemm(c):
    alpha, beta = c.attr("alpha", 1.0), c.attr("beta", 1.0)
    ta, tb = c.attr("transA", 0), c.attr("transB", 0)
    if alpha == 1.0 and beta == 1.0 and not ta and tb:

        def linear(a, b, bias=None):
            if bias is None or bias.dim() == 1:
                return F.linear(a, b, bias)
            return F.linear(a, b) + bias

        return linear

    def gemm(a, b, bias=None):
        y = torch.matmul(a.t() if ta else a, b.t() if tb else b)
        if alpha != 1.0:
            y = y * alpha
        if bias is not None:
            y = y + (bias * beta if beta != 1.0 else bias)
        return y

    return gemm


@op("BatchNormalization")
def _batchnorm(c):
    rt, eps = c.rt, c.attr("epsilon", 1e-5)
    momentum = 1.0 - c.attr("momentum", 0.9)  # torch weights the batch statistic
    n_out = c.n_out

    def bn(x, scale, bias, mean, var):
        y = F.batch_norm(x, mean, var, scale, bias, rt.training and rt.train_bn, momentum, eps)
        return y if n_out == 1 else (y, mean, var)[:n_out]

    return bn


@op("InstanceNormalization")
def _instancenorm(c):
    eps = c.attr("epsilon", 1e-5)
    return lambda x, s, b: F.instance_norm(x, weight=s, bias=b, eps=eps)


@op("LayerNormalization")
def _layernorm(c):
    axis, eps = c.attr("axis", -1), c.attr("epsilon", 1e-5)
    if c.n_out > 1:
        raise Unsupported("LayerNormalization with Mean/InvStdDev outputs")

    def ln(x, s, b=None):
        y = F.layer_norm(x, x.shape[axis % x.dim():], None, None, eps) * s
        return y if b is None else y + b

    return ln


@op("GroupNormalization")
def _groupnorm(c):
    groups, eps = c.attr("num_groups"), c.attr("epsilon", 1e-5)

    def gn(x, s, b):
        if s.numel() != x.shape[1]:  # opset 18: one scale per group
            s, b = s.repeat_interleave(x.shape[1] // groups), b.repeat_interleave(x.shape[1] // groups)
        return F.group_norm(x, groups, s, b, eps)

    return gn


# --------------------------------------------------------------------------- pooling
def _sum_pool(x, kernel, strides, padding, ceil):
    """Window sums (zero padding, symmetric ``padding``) via avg pooling with divisor 1."""
    nd = len(kernel)
    if nd == 1:
        y = F.avg_pool2d(x.unsqueeze(-2), (1, kernel[0]), (1, strides[0]), (0, padding[0]), ceil, True, 1)
        return y.squeeze(-2)
    fn = F.avg_pool2d if nd == 2 else F.avg_pool3d
    return fn(x, kernel, strides, padding, ceil, True, 1)


def _crop_ceil(y, x, tp: list[int], eff: list[int], strides: list[int]):
    """Drop ceil-mode windows that start in the end padding (ONNX's rule; torch,
    seeing pre-padded input, keeps them)."""
    nd = len(eff)
    index: list = [slice(None)] * y.dim()
    for i in range(nd):
        n = x.shape[2 + i]
        begin, end = tp[2 * (nd - 1 - i)], tp[2 * (nd - 1 - i) + 1]
        out = -(-(n + begin + end - eff[i]) // strides[i]) + 1
        if (out - 1) * strides[i] >= n + begin:
            out -= 1
        index[2 + i] = slice(0, out)
    return y[tuple(index)]


def _pool_attrs(c):
    kernel = c.attr("kernel_shape")
    nd = len(kernel)
    strides, dil = c.attr("strides", [1] * nd), c.attr("dilations", [1] * nd)
    auto = c.attr("auto_pad", "NOTSET")
    pairs = _pads_pairs(c.attr("pads") if auto == "NOTSET" else None, nd)
    return kernel, nd, strides, dil, auto, pairs, bool(c.attr("ceil_mode", 0))


@op("MaxPool")
def _maxpool(c):
    kernel, nd, strides, dil, auto, pairs, ceil = _pool_attrs(c)
    if c.n_out > 1 and c.node.output[1]:
        raise Unsupported("MaxPool with an Indices output")
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    if auto == "NOTSET" and all(b == e and 2 * b <= k for (b, e), k in zip(pairs, kernel)):  # torch's limit
        padding = [b for b, _ in pairs]
        return lambda x: pool(x, kernel, strides, padding, dil, ceil)
    upper = auto != "SAME_LOWER"

    def maxpool_padded(x):
        tp = _same_pads(x, kernel, strides, dil, upper) if auto.startswith("SAME") else _torch_pad(pairs)
        y = pool(F.pad(x, tp, value=-math.inf), kernel, strides, 0, dil, ceil)
        return _crop_ceil(y, x, tp, eff, strides) if ceil else y

    return maxpool_padded


@op("AveragePool")
def _avgpool(c):
    kernel, nd, strides, dil, auto, pairs, ceil = _pool_attrs(c)
    if any(d != 1 for d in dil):
        raise Unsupported("AveragePool with dilations")
    include = bool(c.attr("count_include_pad", 0))
    if auto == "NOTSET" and all(b == e and 2 * b <= k for (b, e), k in zip(pairs, kernel)):
        padding = [b for b, _ in pairs]
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return lambda x: pool(x, kernel, strides, padding, ceil, include)
    upper = auto != "SAME_LOWER"

    def avgpool_padded(x):  # sum over the window / number of counted positions
        tp = _same_pads(x, kernel, strides, dil, upper) if auto.startswith("SAME") else _torch_pad(pairs)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        mask = F.pad(ones, tp, value=1.0 if include else 0.0)
        zero = [0] * nd
        y = _sum_pool(F.pad(x, tp), kernel, strides, zero, ceil) / _sum_pool(mask, kernel, strides, zero, ceil)
        return _crop_ceil(y, x, tp, kernel, strides) if ceil else y

    return avgpool_padded


@op("LpPool")
def _lppool(c):
    kernel, nd, strides, dil, auto, pairs, ceil = _pool_attrs(c)
    if any(d != 1 for d in dil) or auto != "NOTSET":
        raise Unsupported("LpPool with dilations or auto_pad")
    p = float(c.attr("p", 2))
    tp = _torch_pad(pairs)
    zero = [0] * nd
    return lambda x: _sum_pool(F.pad(x.abs() ** p, tp), kernel, strides, zero, ceil) ** (1.0 / p)


@op("GlobalAveragePool")
def _gap(c):
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def _gmp(c):
    return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# --------------------------------------------------------------------------- reductions
def _reduce_prod(x, dims, keep):
    for a in sorted((a % x.dim() for a in dims), reverse=True):
        x = torch.prod(x, a, keep)
    return x


_REDUCE = {
    "ReduceMean": lambda x, d, k: torch.mean(x, d, k),
    "ReduceSum": lambda x, d, k: torch.sum(x, d, k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, k),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, d, k),
    "ReduceL1": lambda x, d, k: torch.sum(x.abs(), d, k),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, k),
    "ReduceProd": _reduce_prod,
}


@op(*_REDUCE, host=(1,))
def _reduce(c):
    f = _REDUCE[c.node.op_type]
    keep, noop = bool(c.attr("keepdims", 1)), bool(c.attr("noop_with_empty_axes", 0))
    axes_attr = c.attr("axes")

    def reduce(x, axes=None):
        axes = axes_attr if axes_attr is not None else _host(axes)
        if not axes:
            if noop:
                return x
            axes = list(range(x.dim()))
        return f(x, tuple(axes), keep)

    return reduce


@op("ArgMax", "ArgMin")
def _argmax(c):
    axis, keep, last = c.attr("axis", 0), bool(c.attr("keepdims", 1)), c.attr("select_last_index", 0)
    f = torch.argmax if c.node.op_type == "ArgMax" else torch.argmin

    def arg(x):
        if last:
            n = x.shape[axis]
            return n - 1 - f(x.flip(axis), axis, keep)
        return f(x, axis, keep)

    return arg


# --------------------------------------------------------------------------- shape ops
@op("Shape")
def _shape(c):
    start, end = c.attr("start", 0), c.attr("end", None)
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device)


@op("Size")
def _size(c):
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@op("Flatten")
def _flatten(c):
    axis = c.attr("axis", 1)
    if axis == 1:
        return lambda x: torch.flatten(x, 1)
    return lambda x: x.reshape(math.prod(x.shape[: axis + x.dim() if axis < 0 else axis]), -1)


@op("Reshape", host=(1,))
def _reshape(c):
    allowzero = c.attr("allowzero", 0) if c.opset >= 5 else 0
    shape_attr = c.attr("shape")  # opset 1-4

    def reshape(x, shape=None):
        shape = list(shape_attr if shape is None else _host(shape))
        if not allowzero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)

    return reshape


@op("Transpose")
def _transpose(c):
    perm = c.attr("perm")
    return lambda x: x.permute(perm if perm is not None else list(reversed(range(x.dim()))))


@op("Squeeze", host=(1,))
def _squeeze(c):
    axes_attr = c.attr("axes")

    def squeeze(x, axes=None):
        axes = axes_attr if axes_attr is not None else _host(axes)
        return torch.squeeze(x) if axes is None else torch.squeeze(x, tuple(axes))

    return squeeze


@op("Unsqueeze", host=(1,))
def _unsqueeze(c):
    axes_attr = c.attr("axes")

    def unsqueeze(x, axes=None):
        axes = axes_attr if axes_attr is not None else _host(axes)
        axes = [axes] if isinstance(axes, int) else axes
        rank = x.dim() + len(axes)
        for a in sorted(a % rank for a in axes):
            x = x.unsqueeze(a)
        return x

    return unsqueeze


@op("Concat")
def _concat(c):
    axis = c.attr("axis", 0)
    return lambda *xs: torch.cat(xs, axis)


@op("Split", host=(1,))
def _split(c):
    axis, n = c.attr("axis", 0), c.n_out
    split_attr = c.attr("split")

    def split(x, sizes=None):
        sizes = split_attr if split_attr is not None else _host(sizes)
        if not sizes:
            parts = torch.split(x, -(-x.shape[axis] // n), axis)
        else:
            parts = torch.split(x, list(sizes), axis)
        return parts if n > 1 else parts[0]

    return split


@op("Slice", host=(1, 2, 3, 4))
def _slice(c):
    if c.opset < 10:
        a_starts, a_ends, a_axes = c.attr("starts"), c.attr("ends"), c.attr("axes")
    else:
        a_starts = a_ends = a_axes = None

    def slice_(x, starts=None, ends=None, axes=None, steps=None):
        starts = a_starts if a_starts is not None else _host(starts)
        ends = a_ends if a_ends is not None else _host(ends)
        axes = a_axes if a_axes is not None else _host(axes)
        axes = range(len(starts)) if axes is None else axes
        steps = _host(steps) or [1] * len(starts)
        index: list[Any] = [slice(None)] * x.dim()
        flips = []
        for s, e, a, st in zip(starts, ends, axes, steps):
            a %= x.dim()
            if st > 0:
                index[a] = slice(s, e, st)
            else:
                flips.append((a, list(range(*slice(s, e, st).indices(x.shape[a])))))
        x = x[tuple(index)]
        for a, idx in flips:
            x = x.index_select(a, torch.tensor(idx, dtype=torch.int64, device=x.device))
        return x

    return slice_


@op("Gather", soft_host=(1,))
def _gather(c):
    axis = c.attr("axis", 0)

    def gather(x, idx):
        a = axis % x.dim()
        if isinstance(idx, int) or (isinstance(idx, torch.Tensor) and idx.dim() == 0):
            return x.select(a, int(idx))
        if not isinstance(idx, torch.Tensor):
            idx = torch.tensor(idx, dtype=torch.int64, device=x.device)
        idx = torch.where(idx < 0, idx + x.shape[a], idx)
        y = torch.index_select(x, a, idx.reshape(-1))
        return y.reshape(*x.shape[:a], *idx.shape, *x.shape[a + 1:])

    return gather


@op("ConstantOfShape", host=(0,))
def _constant_of_shape(c):
    value = c.attr("value")
    v = numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    fill, dtype = v[0].item(), TORCH_DTYPES.get(value.data_type if value is not None else 1, torch.float32)
    rt = c.rt
    return lambda shape: torch.full(tuple(_host(shape)), fill, dtype=dtype, device=rt.device)


@op("Expand", host=(1,))
def _expand(c):
    return lambda x, shape: x.expand(torch.broadcast_shapes(x.shape, tuple(_host(shape))))


@op("Tile", host=(1,))
def _tile(c):
    return lambda x, repeats: x.repeat(_host(repeats))


@op("Range")
def _range(c):
    return lambda s, e, d: torch.arange(s.item(), e.item(), d.item(), dtype=s.dtype, device=s.device)


@op("DepthToSpace", "SpaceToDepth")
def _depth_space(c):
    b, mode = c.attr("blocksize"), c.attr("mode", "DCR")
    if c.node.op_type == "SpaceToDepth":

        def s2d(x):
            n, ch, h, w = x.shape
            y = x.reshape(n, ch, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
            return y.reshape(n, ch * b * b, h // b, w // b)

        return s2d
    if mode == "CRD":
        return lambda x: F.pixel_shuffle(x, b)

    def d2s(x):
        n, ch, h, w = x.shape
        y = x.reshape(n, b, b, ch // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, ch // (b * b), h * b, w * b)

    return d2s


@op("Pad", host=(1, 2, 3))
def _pad(c):
    mode = c.attr("mode", "constant")
    tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if tmode is None:
        raise Unsupported(f"Pad mode '{mode}'")
    a_pads, a_value = (c.attr("pads"), c.attr("value", 0.0)) if c.opset < 11 else (None, 0.0)

    def pad(x, pads=None, value=None, axes=None):
        pads = a_pads if a_pads is not None else _host(pads)
        value = a_value if value is None else _host(value)
        value = value[0] if isinstance(value, list) else value
        r = x.dim()
        axes = [a % r for a in (_host(axes) or range(r))]
        pairs = [(0, 0)] * r
        for i, a in enumerate(axes):
            pairs[a] = (pads[i], pads[i + len(axes)])
        while pairs and pairs[0] == (0, 0):
            pairs.pop(0)  # F.pad pads trailing axes; leading untouched axes are dropped
        if not pairs:
            return x
        if tmode == "constant":
            return F.pad(x, _torch_pad(pairs), "constant", float(value or 0.0))
        return F.pad(x, _torch_pad(pairs), tmode)

    return pad


# --------------------------------------------------------------------------- resize
_COORD = {  # x_resized, scale, length_in, length_out -> x_original (float32 numpy, like ORT)
    "half_pixel": lambda x, s, i, o: (x + np.float32(0.5)) / s - np.float32(0.5),
    "pytorch_half_pixel": lambda x, s, i, o: (x + np.float32(0.5)) / s - np.float32(0.5) if o > 1 else 0 * x,
    "align_corners": lambda x, s, i, o: x * np.float32(i - 1) / np.float32(o - 1) if o > 1 else 0 * x,
    "asymmetric": lambda x, s, i, o: x / s,
    "tf_half_pixel_for_nn": lambda x, s, i, o: (x + np.float32(0.5)) / s,
    "half_pixel_symmetric": lambda x, s, i, o: np.float32(i / 2 * (1 - o / (s * i))) + (x + np.float32(0.5)) / s - np.float32(0.5),
}
_ROUND = {
    "round_prefer_floor": lambda v: np.ceil(v - 0.5),
    "round_prefer_ceil": lambda v: np.floor(v + 0.5),
    "floor": np.floor,
    "ceil": np.ceil,
    "simple": np.floor,
}


def _resize_plan(mode, coord, nearest, n_in, n_out, scale):
    """Per-axis source indices (and weights for linear), computed once per size."""
    x = np.arange(n_out, dtype=np.float32)
    src = _COORD[coord](x, np.float32(scale), n_in, n_out).astype(np.float32)
    if mode == "nearest":
        idx = np.clip(_ROUND[nearest](src), 0, n_in - 1).astype(np.int64)
        return idx, None, None
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


@op("Resize", "Upsample", host=(1, 2, 3))
def _resize(c):
    is_up = c.node.op_type == "Upsample"
    mode = c.attr("mode", "nearest")
    mode = {"bilinear": "linear", "trilinear": "linear"}.get(mode, mode)
    if mode not in ("nearest", "linear"):
        raise Unsupported(f"{c.node.op_type} mode '{mode}'")
    legacy = is_up or c.opset < 11
    coord = "asymmetric" if legacy else c.attr("coordinate_transformation_mode", "half_pixel")
    nearest = "floor" if legacy else c.attr("nearest_mode", "round_prefer_floor")
    if coord not in _COORD:
        raise Unsupported(f"Resize coordinate_transformation_mode '{coord}'")
    if c.attr("antialias", 0) or c.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise Unsupported("Resize with antialias or keep_aspect_ratio_policy")
    axes_attr, scales_attr = c.attr("axes"), c.attr("scales")
    plans: dict = {}

    def resize(x, *rest):
        if legacy:
            scales, sizes = (scales_attr if scales_attr is not None else _host(rest[0])), None
        else:
            scales = _host(rest[1]) if len(rest) > 1 else None
            sizes = _host(rest[2]) if len(rest) > 2 else None
        r = x.dim()
        axes = [a % r for a in (axes_attr or range(r))]
        full_scale, full_out = [1.0] * r, list(x.shape)
        for i, a in enumerate(axes):
            if sizes:
                full_out[a] = int(sizes[i])
                full_scale[a] = full_out[a] / x.shape[a]
            else:
                full_scale[a] = float(scales[i])
                full_out[a] = int(math.floor(x.shape[a] * full_scale[a]))
        if full_out[:2] != list(x.shape[:2]):
            raise FinetuneError(
                f"Resize '{node_label(c.node)}' scales the batch or channel axis",
                fix="export a model that resizes spatial axes only",
            )
        return _resample(x, full_out, full_scale, bool(sizes))

    def _resample(x, out, scale, by_size):
        spatial_in, spatial_out = list(x.shape[2:]), out[2:]
        if spatial_in == spatial_out and all(s == 1.0 for s in scale):
            return x  # ONNX Runtime copies the input whatever the coordinate mode
        ratios = [o / i for o, i in zip(spatial_out, spatial_in)]
        nd = len(spatial_in)
        if nd in (1, 2, 3) and mode == "linear" and coord in ("align_corners", "half_pixel", "pytorch_half_pixel") and (
            coord != "pytorch_half_pixel" or min(spatial_out) > 1
        ):
            tmode = ("linear", "bilinear", "trilinear")[nd - 1]
            if coord == "align_corners":
                return F.interpolate(x, size=spatial_out, mode=tmode, align_corners=True)
            if by_size:
                return F.interpolate(x, size=spatial_out, mode=tmode, align_corners=False)
            return F.interpolate(x, scale_factor=scale[2:], mode=tmode, align_corners=False, recompute_scale_factor=False)
        if (nd in (1, 2, 3) and mode == "nearest" and coord == "asymmetric" and nearest in ("floor", "simple")
                and all(r >= 1 and r == int(r) and (int(r) & (int(r) - 1)) == 0 for r in ratios)
                and all(s == r for s, r in zip(scale[2:], ratios))):
            return F.interpolate(x, size=spatial_out, mode="nearest")
        for a in range(2, x.dim()):
            n_in, n_out = x.shape[a], out[a]
            if n_in == n_out and scale[a] == 1.0 and coord != "tf_half_pixel_for_nn":
                continue  # identity axis
            key = (a, n_in, n_out, scale[a], x.device)
            if key not in plans:
                i0, i1, w = _resize_plan(mode, coord, nearest, n_in, n_out, scale[a])
                to = functools.partial(torch.as_tensor, device=x.device)
                shape = [1] * x.dim()
                shape[a] = n_out
                plans[key] = (to(i0), None if i1 is None else to(i1), None if w is None else to(w).reshape(shape))
            i0, i1, w = plans[key]
            if i1 is None:
                x = x.index_select(a, i0)
            else:
                lo, hi = x.index_select(a, i0), x.index_select(a, i1)
                x = lo + (hi - lo) * w.to(x.dtype)
        return x

    return resize
