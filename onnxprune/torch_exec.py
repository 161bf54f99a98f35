"""Execute an ONNX graph node by node with torch ops, so its weights can be trained.

:class:`OnnxModule` is an ``nn.Module`` built from an ``onnx.ModelProto``:

* **Parameters** are the graph's float initializers of rank >= 1 that feed a
  data input of some node. Rank-0 float constants (exporters write ``x / 6``
  that way), float tensors read as shapes/scales/limits (Resize scales, Clip
  bounds) and BatchNormalization running statistics are **buffers**; so are
  all non-float initializers. Module names cannot contain ``.``, so each
  initializer gets a key ``t<k>_<sanitised name>``; :meth:`OnnxModule.key_of`
  and :meth:`OnnxModule.named_onnx_tensors` map between the two.
* **Write-back**: :meth:`OnnxModule.state_to_onnx` returns a *new* ModelProto
  whose changed initializers hold the current values (same name, dtype and
  shape); nodes, names, opset and metadata are untouched.
* **Ops** live in the registry :data:`onnxprune.torch_ops.OPS`
  (``op_type -> OpDef``, one decorated builder per op; see that module).
  :func:`unsupported_ops` lists what a model lacks.
* **Shape subgraphs** (``Shape -> Gather -> Concat -> Reshape`` from the legacy
  exporter) are *static*: they depend only on input shapes and constants. The
  first forward for a given input shape runs every node; later forwards with
  that shape reuse the static values (host ones as Python lists, so no device
  sync) and run only the data nodes. A graph whose shapes depend on data
  values (a computed Reshape target) runs every node every time instead.

**Re-inserted normalization** (``renormalize=True``): exporters fold each
Conv→BatchNorm into the conv's weight and bias, so a graph trains without
normalization. The module then gives every eligible conv (a float weight and
bias, each read by that node only; no BatchNormalization reading its output;
some Conv/Gemm/MatMul downstream, so not a head) a BatchNorm again,
``z -> γ (z - μ) / sqrt(σ² + eps) + β`` on the conv output ``z``. It starts
as the identity; :meth:`OnnxModule.init_normalization` sets ``μ, σ²`` to the
per-channel statistics of ``z`` on sample data and ``γ = sqrt(σ² + eps)``,
``β = μ``, so the eval-mode function is unchanged. Training uses batch
statistics (running ones updated, torch momentum 0.1). Write-back folds it
into the same initializers (``s = γ / sqrt(running σ² + eps)``)::

    W' = W * s[:, None, ...]        b' = (b - μ_running) * s + β

so the written graph has the same nodes, names and shapes.

BatchNormalization runs in train mode (batch statistics, running stats updated
with ``running = momentum * running + (1 - momentum) * batch``, ONNX's
``momentum`` convention) when the module is training and ``train_bn=True``;
otherwise it uses the running statistics. Dropout is active only in training.

Example::

    net = OnnxModule(onnx.load("pruned.onnx"))
    logits = net(torch.randn(8, 3, 32, 32))
    tuned = net.state_to_onnx(onnx.load("pruned.onnx"))
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import FinetuneError, MissingDependencyError
from .extract import dynamic_batch
from .graph import graph_inputs, node_label, opset_version

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise MissingDependencyError("fine-tuning needs torch", fix="pip install 'onnxprune[finetune]'") from exc

from .torch_ops import (  # noqa: F401  (OpDef, op, supported_ops, unsupported_ops: re-exported)
    FLOAT_TYPES,
    OPS,
    TORCH_DTYPES,
    NodeCtx,
    OpDef,
    Runtime,
    Unsupported,
    _host,
    _n_out,
    _op_key,
    op,
    supported_ops,
    unsupported_ops,
)

__all__ = ["OnnxModule", "OPS", "OpDef", "op", "supported_ops", "unsupported_ops"]

# --------------------------------------------------------------------------- the module
def _key(k: int, name: str) -> str:
    return f"t{k}_" + re.sub(r"[^0-9A-Za-z_]", "_", name)[:48]


def _to_torch(t: onnx.TensorProto) -> "torch.Tensor":
    if t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data:
        raise FinetuneError(f"initializer '{t.name}' has unloaded external data", fix="load the model with onnxprune.graph.load_model")
    if t.data_type not in TORCH_DTYPES:
        raise FinetuneError(
            f"initializer '{t.name}' has ONNX type {t.data_type}, which torch cannot hold", fix="convert it to a numeric type"
        )
    if t.data_type == onnx.TensorProto.BFLOAT16:
        return torch.from_numpy(numpy_helper.to_array(t).astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(numpy_helper.to_array(t), copy=True))


def _constant_value(node: onnx.NodeProto) -> "torch.Tensor":
    for a in node.attribute:
        if a.name == "value":
            return _to_torch(a.t)
        if a.name in ("value_float", "value_floats"):
            return torch.tensor(onnx.helper.get_attribute_value(a), dtype=torch.float32)
        if a.name in ("value_int", "value_ints"):
            return torch.tensor(onnx.helper.get_attribute_value(a), dtype=torch.int64)
    raise Unsupported("Constant with a sparse or string value")


#: BatchNormalization inputs that are running statistics (mutable buffers).
_BN_STATS = {"BatchNormalization": (3, 4)}
#: Nodes reading a tensor's shape only (the tensor itself is not used).
_SHAPE_ONLY = {"Shape", "Size"}
#: Never precomputed, even when every input is constant.
_NOT_STATIC = {"Dropout"}
#: (op, input index) read as weights: weight decay applies to these.
_WEIGHT_SLOTS = {("Conv", 1), ("ConvTranspose", 1), ("Gemm", 0), ("Gemm", 1), ("MatMul", 0), ("MatMul", 1)}
_NONE, _TRASH = 0, 1  # env slot of absent inputs / of unnamed outputs


class OnnxModule(nn.Module):
    """An ``nn.Module`` that runs ``model``'s graph with torch ops; see the module docstring.

    ``forward(*inputs)`` takes one tensor per graph input (initializers excluded)
    and returns the first output, or a tuple when the graph has several.
    Attributes: ``input_names``, ``output_names``, ``initializer_names`` (all,
    graph order), ``parameter_names`` (the trainable ones), ``weight_names``
    (Conv/ConvTranspose/Gemm/MatMul weights, the ones weight decay applies to).
    """

    def __init__(self, model: onnx.ModelProto, *, train_bn: bool = True, renormalize: bool = False) -> None:
        super().__init__()
        model = dynamic_batch(model)  # a fixed-batch export trains on any batch; initializers (write-back) unchanged
        g = model.graph
        self._rt = Runtime(train_bn)
        self._opset = opset_version(model)
        self._cache: dict = {}
        nodes = _live_nodes(model)
        self.input_names = tuple(i.name for i in graph_inputs(model))
        self.output_names = tuple(o.name for o in g.output)
        self.initializer_names = tuple(t.name for t in g.initializer)
        self._key_of: dict[str, str] = {}
        consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in nodes:
            for i, name in enumerate(node.input):
                if name:
                    consumers.setdefault(name, []).append((node, i))
        self._register_initializers(g, consumers)
        self.weight_names = tuple(
            n for n in self.parameter_names if any((nd.op_type, i) in _WEIGHT_SLOTS for nd, i in consumers.get(n, ()))
        )
        self.renorms = nn.ModuleDict()
        self._renorm_of: dict[int, str] = {}  # id(node) -> renorms key
        self._renorm_tensors: dict[str, tuple[str, str]] = {}  # renorms key -> (weight, bias) initializer names
        if renormalize:
            self._select_renorms(nodes, consumers)
        self._build_plan(nodes)

    # ---------------------------------------------------------------- construction
    def _register_initializers(self, g: onnx.GraphProto, consumers: dict) -> None:
        stats = {n.input[i] for n in g.node for i in _BN_STATS.get(n.op_type, ()) if i < len(n.input)}
        params, mutable = [], set()
        for k, t in enumerate(g.initializer):
            key = _key(k, t.name)
            self._key_of[t.name] = key
            value = _to_torch(t)
            data_use = False
            for nd, i in consumers.get(t.name, ()):
                opdef = OPS.get(_op_key(nd))
                host = opdef.host | opdef.soft_host if opdef else frozenset()
                data_use |= nd.op_type not in _SHAPE_ONLY and i not in host
            if t.data_type in FLOAT_TYPES and value.dim() >= 1 and t.name not in stats and data_use:
                self.register_parameter(key, nn.Parameter(value))
                params.append(t.name)
            else:
                self.register_buffer(key, value)
                if t.name in stats:
                    mutable.add(t.name)
        self.parameter_names = tuple(params)
        self._mutable = frozenset(mutable)

    def _select_renorms(self, nodes: list[onnx.NodeProto], consumers: dict) -> None:
        """A (dormant) :class:`_Renorm` for every eligible conv; see the module docstring."""
        params = set(self.parameter_names)
        feeds_linear: set[str] = set()  # tensors with a Conv/Gemm/MatMul downstream
        for node in reversed(nodes):
            if node.op_type in ("Conv", "Gemm", "MatMul") or any(o in feeds_linear for o in node.output if o):
                feeds_linear.update(i for i in node.input if i)
        for node in nodes:
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
                continue
            w, b, out = node.input[1], node.input[2], node.output[0]
            private = all(len(consumers.get(n, ())) == 1 for n in (w, b))
            normalized = any(nd.op_type == "BatchNormalization" for nd, _ in consumers.get(out, ()))
            if w in params and b in params and private and not normalized and out in feeds_linear:
                bias = getattr(self, self._key_of[b])
                key = f"n{len(self.renorms)}"
                self.renorms[key] = _Renorm(bias.shape[0], bias.dtype)
                self._renorm_of[id(node)] = key
                self._renorm_tensors[key] = (w, b)

    @torch.no_grad()
    def init_normalization(self, batches) -> int:
        """Set every re-inserted BatchNorm from the conv-output statistics over ``batches``
        (an iterable of input tensors, or of tuples of them) so the eval-mode function is
        unchanged; returns the number of normalized convs. Runs in eval mode."""
        if not len(self.renorms):
            return 0
        was = self.training
        self.eval()
        for m in self.renorms.values():
            m.start_recording()
        try:
            for xb in batches:
                self(*(xb if isinstance(xb, (tuple, list)) else (xb,)))
        finally:
            for m in self.renorms.values():
                m.finish_recording()
            self.train(was)
        return sum(m.active for m in self.renorms.values())

    def renorm_parameters(self) -> list["nn.Parameter"]:
        """γ and β of the re-inserted BatchNorms (trainable, no weight decay)."""
        return [p for m in self.renorms.values() for p in (m.weight, m.bias)]

    def _folded_values(self) -> dict[str, "torch.Tensor"]:
        """Initializer name -> conv weight/bias with the re-inserted BatchNorm folded in."""
        out = {}
        for key, (w_name, b_name) in self._renorm_tensors.items():
            m = self.renorms[key]
            if not m.active:
                continue
            w, b = getattr(self, self._key_of[w_name]).detach(), getattr(self, self._key_of[b_name]).detach()
            s = (m.weight / torch.sqrt(m.running_var + m.eps)).detach().double()
            out[w_name] = (w.double() * s.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
            out[b_name] = ((b.double() - m.running_mean.double()) * s + m.bias.detach().double()).to(b.dtype)
        return out

    def _build_plan(self, nodes: list[onnx.NodeProto]) -> None:
        slots: dict[str, int] = {"": _NONE, "\0trash": _TRASH}

        def slot(name: str) -> int:
            return slots.setdefault(name, len(slots))

        self._input_slots = tuple(slot(n) for n in self.input_names)
        params = set(self.parameter_names)
        self._param_slots = tuple((slot(n), self._key_of[n]) for n in self.parameter_names)
        buffer_slots = [(slot(n), self._key_of[n]) for n in self.initializer_names if n not in params]
        static = {n for n in self.initializer_names if n not in params and n not in self._mutable} | {""}
        shapes = {n: tuple(getattr(self, k).shape) for n, k in self._key_of.items()}
        missing = sorted({_op_key(n) for n in nodes if _op_key(n) not in OPS and n.op_type != "Constant"})
        errors, built = [], []
        for k, node in enumerate(nodes):
            for name in node.input:
                if name and name not in slots:
                    raise FinetuneError(
                        f"tensor '{name}' read by node '{node_label(node)}' is never produced",
                        fix="pass a valid, topologically sorted ONNX model",
                    )
            for o in node.output:
                if o:
                    slot(o)  # known even when the node cannot be built, so all problems are listed
            try:
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    key = f"c{k}_" + re.sub(r"[^0-9A-Za-z_]", "_", node.output[0])[:48]
                    self.register_buffer(key, _constant_value(node), persistent=False)
                    buffer_slots.append((slot(node.output[0]), key))
                    static.add(node.output[0])
                    continue
                if _op_key(node) not in OPS:
                    continue
                opdef = OPS[_op_key(node)]
                fn = opdef.build(NodeCtx(node, self._opset, self._rt, shapes))
                if id(node) in self._renorm_of:
                    fn = _renormed(fn, self.renorms[self._renorm_of[id(node)]], self._rt)
            except Unsupported as exc:
                errors.append(f"{node.op_type} '{node_label(node)}': {exc}")
                continue
            is_static = node.op_type in _SHAPE_ONLY or (
                node.op_type not in _NOT_STATIC and len(node.input) > 0 and all(i in static for i in node.input)
            )
            if is_static:
                static.update(o for o in node.output if o)
            outs = tuple(slot(o) if o else _TRASH for o in node.output[: _n_out(node)])
            built.append((node, opdef, fn, is_static, tuple(slot(i) for i in node.input), outs))
        if missing or errors:
            parts = [f"does not support op type(s) {', '.join(missing)}"] if missing else []
            parts += [f"cannot run {len(errors)} node(s): {'; '.join(errors[:8])}"] if errors else []
            raise FinetuneError(
                f"the torch executor {' and '.join(parts)}",
                fix="fine-tune the original torch model instead, or add rules to onnxprune.torch_exec.OPS",
            )
        self._buffer_slots = tuple(buffer_slots)
        self._make_steps(built, slots, static)

    def _make_steps(self, built: list, slots: dict[str, int], static: set[str]) -> None:
        """Two plans: every node (first run per input shape) and data nodes only (cached shapes)."""
        init_slots = {s for s, _ in self._param_slots} | {s for s, _ in self._buffer_slots}
        static_slots = {slots[n] for n in static if n in slots} - {_NONE}
        output_slots = {slots.get(o, _NONE) for o in self.output_names}
        host_slot: dict[int, int] = {}
        cache_data: set[int] = {s for s in output_slots if s in static_slots and s not in init_slots}
        fast: list[tuple] = []
        self._cacheable = True
        for node, opdef, fn, is_static, ins, outs in built:
            if is_static:
                continue
            fins = []
            for i, s in enumerate(ins):
                if s != _NONE and (i in opdef.host or i in opdef.soft_host) and s in static_slots:
                    s = host_slot.setdefault(s, len(slots) + len(host_slot))
                elif s != _NONE and i in opdef.host:
                    self._cacheable = False  # a shape computed from data values
                elif s in static_slots and s not in init_slots:
                    cache_data.add(s)
                fins.append(s)
            fast.append((fn, tuple(fins), outs))
        self._env_len = len(slots) + len(host_slot)
        self._cache_data, self._cache_host = tuple(sorted(cache_data)), tuple(host_slot.items())
        self._full_steps = tuple((fn, ins, outs, ()) for _, _, fn, _, ins, outs in built)
        self._fast_steps = _with_frees(fast, output_slots)
        self._output_slots = tuple(slots.get(o, _NONE) for o in self.output_names)

    # ---------------------------------------------------------------- running
    def train(self, mode: bool = True):
        self._rt.training = mode
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._cache.clear()
        return super().load_state_dict(*args, **kwargs)

    def forward(self, *inputs):
        if len(inputs) != len(self._input_slots):
            raise FinetuneError(
                f"the model takes {len(self._input_slots)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}",
                fix="pass one tensor per graph input",
            )
        rt = self._rt
        if inputs:
            rt.device = inputs[0].device
        env: list = [None] * self._env_len
        for s, x in zip(self._input_slots, inputs):
            env[s] = x
        params, bufs = self._parameters, self._buffers
        for s, k in self._param_slots:
            env[s] = params[k]
        for s, k in self._buffer_slots:
            env[s] = bufs[k]
        key = (tuple(x.shape for x in inputs), rt.device, torch.is_inference_mode_enabled())
        cached = self._cache.get(key) if self._cacheable else None
        if cached is None:
            _run(self._full_steps, env)
            if self._cacheable:
                self._store(key, env)
        else:
            for s, v in cached:
                env[s] = v
            _run(self._fast_steps, env)
        if len(self._output_slots) == 1:
            return env[self._output_slots[0]]
        return tuple(env[s] for s in self._output_slots)

    def _store(self, key, env: list) -> None:
        entries = [(s, env[s]) for s in self._cache_data]
        entries += [(h, _host(env[s])) for s, h in self._cache_host]
        if len(self._cache) >= 8:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = tuple(entries)

    # ---------------------------------------------------------------- names and write-back
    def key_of(self, onnx_name: str) -> str:
        """Module attribute name (parameter or buffer) of initializer ``onnx_name``."""
        return self._key_of[onnx_name]

    def named_onnx_tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """``(initializer name, parameter or buffer)`` for every initializer."""
        for name in self.initializer_names:
            yield name, getattr(self, self._key_of[name])

    def named_onnx_parameters(self) -> Iterator[tuple[str, "nn.Parameter"]]:
        """``(initializer name, parameter)`` for the trainable initializers."""
        for name in self.parameter_names:
            yield name, getattr(self, self._key_of[name])

    def state_to_onnx(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` whose initializers hold this module's current values.

        Re-inserted BatchNorms are folded into their conv's weight and bias.
        Only trainable initializers and BN running statistics whose value
        changed are rewritten (as ``raw_data``, same name, dims and ONNX dtype,
        cast back if the module was converted, e.g. with ``.half()``);
        everything else is copied byte for byte. ``model`` is not modified.
        """
        out = onnx.ModelProto()
        out.CopyFrom(model)
        current = dict(self.named_onnx_tensors())
        current.update(self._folded_values())  # re-inserted BatchNorms folded back (module docstring)
        for t in out.graph.initializer:
            value = current.get(t.name)
            if value is None or tuple(value.shape) != tuple(t.dims):
                have = "absent" if value is None else f"{list(value.shape)}"
                raise FinetuneError(
                    f"initializer '{t.name}' is {list(t.dims)} in the model but {have} in the fine-tuned module",
                    fix="write back into the model the module was built from",
                )
            if t.name in self.parameter_names or t.name in self._mutable:
                new = value.detach().to("cpu", TORCH_DTYPES[t.data_type]).contiguous()
                if not torch.equal(new, _to_torch(t)):
                    _set_raw(t, new)
        return out


class _Renorm(nn.Module):
    """A BatchNorm on a conv output: dormant (identity) until :meth:`finish_recording`
    sets it from recorded statistics with ``γ = sqrt(σ² + eps)``, ``β = μ`` (identity
    in eval mode); then batch statistics in training, running ones in eval."""

    def __init__(self, channels: int, dtype: "torch.dtype", eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(channels, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(channels, dtype=dtype))
        self.register_buffer("running_var", torch.ones(channels, dtype=dtype))
        self.active = False  # a Python flag (no device sync per forward); set once, never reset
        self._acc: list | None = None

    def start_recording(self) -> None:
        self._acc = [0, 0.0, 0.0]

    def record(self, z: "torch.Tensor") -> None:
        dims = [d for d in range(z.dim()) if d != 1]
        zd = z.detach().double()
        self._acc[0] += z.numel() // z.shape[1]
        self._acc[1] = self._acc[1] + zd.sum(dims)
        self._acc[2] = self._acc[2] + (zd * zd).sum(dims)

    def finish_recording(self) -> None:
        acc, self._acc = self._acc, None
        if acc is None or acc[0] == 0:
            return
        n, s, ss = acc
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
            self.weight.copy_(torch.sqrt(var + self.eps))
            self.bias.copy_(mean)
        self.active = True

    def forward(self, z: "torch.Tensor", training: bool) -> "torch.Tensor":
        if self._acc is not None:
            self.record(z)
            return z
        if not self.active:
            return z
        return F.batch_norm(z, self.running_mean, self.running_var, self.weight, self.bias, training, self.momentum, self.eps)


def _renormed(fn, norm: _Renorm, rt: Runtime):
    """The conv callable ``fn`` followed by its re-inserted BatchNorm."""

    def conv_bn(x, w, b=None):
        return norm(fn(x, w, b), rt.training and rt.train_bn)

    return conv_bn


def _live_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that contribute to a graph output, in graph order."""
    needed = {o.name for o in model.graph.output}
    live = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output if o):
            live.append(node)
            needed.update(i for i in node.input if i)
    return live[::-1]


def _with_frees(steps: list[tuple], keep: set[int]) -> tuple[tuple, ...]:
    """Attach to each step the env slots last read by it (released after it runs)."""
    last: dict[int, int] = {}
    for k, (_, ins, _) in enumerate(steps):
        for s in ins:
            last[s] = k
    frees: dict[int, list[int]] = {}
    for s, k in last.items():
        if s not in keep and s not in (_NONE, _TRASH):
            frees.setdefault(k, []).append(s)
    return tuple((fn, ins, outs, tuple(frees.get(k, ()))) for k, (fn, ins, outs) in enumerate(steps))


def _run(steps: tuple, env: list) -> None:
    """The hot loop: call each node's callable on its input slots, store its outputs."""
    for fn, ins, outs, free in steps:
        r = fn(*[env[i] for i in ins])
        if len(outs) == 1:
            env[outs[0]] = r
        else:
            for s, v in zip(outs, r):
                env[s] = v
        for s in free:
            env[s] = None


def _set_raw(t: onnx.TensorProto, value: "torch.Tensor") -> None:
    """Replace ``t``'s data by ``value`` (little-endian raw bytes), keeping name/dims/type/doc."""
    for field in ("float_data", "double_data", "int32_data", "int64_data", "uint64_data", "string_data", "external_data"):
        t.ClearField(field)
    t.data_location = onnx.TensorProto.DEFAULT
    t.raw_data = value.reshape(-1).view(torch.uint8).numpy().tobytes()
