"""The one ONNX Runtime layer: every ORT session onnxprune opens is built here.

* :func:`session_options`: threads, graph optimization level, logging.
* :func:`resolve_providers`: CUDA only when it really loads (``onnxruntime-gpu``
  lists ``CUDAExecutionProvider`` even where the CUDA libraries or the GPU are
  missing and then silently runs on CPU; we check the providers a session
  really got), else CPU.
* :class:`Session`: runs arrays (one input) or feeds (several) of any length,
  ``batch_size`` samples at a time, concatenated on axis 0; I/O binding on CUDA.
* Fixed batch: a model whose inputs declare a fixed batch dim ``N`` (exported
  without a dynamic batch axis) runs ``N`` samples at a time. The last chunk of
  ``n < N`` samples is padded by repeating its last sample ``N - n`` times and
  the outputs are trimmed back to ``n`` rows, so callers never see ``N``:
  ``run(x)[k][i]`` is the output for sample ``i`` whatever ``N`` and ``batch_size``.
* :class:`Runner`: one device, batch size and thread count for many models;
  intermediate tensors can be requested as outputs (added to a copy of the model,
  see :mod:`onnxprune.extract`).

Example::

    runner = Runner(device="cpu", batch_size=64)
    logits, feat = runner.run(model, x, ["logits", "conv3_out"])
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import onnx

from .errors import BadModelError, DataError, DeviceError, UnsupportedModelError, UsageError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Device = Literal["auto", "cuda", "cpu"]
DEVICES = ("auto", "cuda", "cpu")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(bool)": np.bool_,
}  # fmt: skip


# --------------------------------------------------------------------------- options and providers
def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors only: keep ORT's warnings off the user's terminal
    return ort


def ort_version() -> str:
    """The installed ONNX Runtime's version (part of every measurement cache key)."""
    return _ort().__version__


def available_providers() -> list[str]:
    """Execution providers this ONNX Runtime build lists (listed is not working: see :func:`resolve_providers`)."""
    return list(_ort().get_available_providers())


def check_batch_size(batch_size) -> int:
    """``batch_size`` as an int, or UsageError naming --batch-size."""
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise UsageError(f"batch size {batch_size} is not positive", fix="pass --batch-size 1 or more")
    return int(batch_size)


def session_options(threads: int | None = None, *, optimize: bool = True, config: Mapping[str, str] | None = None, arena: bool = True):
    """ORT ``SessionOptions``: ``threads`` intra-op threads (None: ORT's default), errors-only logging,
    all graph optimizations unless ``optimize=False`` (dry runs that read tensor shapes); ``config``:
    session config entries, e.g. ``{"session.intra_op.allow_spinning": "0"}`` (latency measurements);
    ``arena=False`` turns ORT's CPU memory arena off (see :func:`lean_batch`)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not arena:
        opts.enable_cpu_mem_arena = False
    for key, value in (config or {}).items():
        opts.add_session_config_entry(str(key), str(value))
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        if isinstance(threads, bool) or int(threads) < 1:
            raise UsageError(f"--threads {threads} is not a positive number", fix="pass --threads 1 or more, or leave it out")
        opts.intra_op_num_threads = int(threads)
    return opts


def _cuda_failure_reason() -> str:
    """Why the CUDA provider library does not load (its missing dependency), for error messages."""
    ort = _ort()
    lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not lib.exists():
        return "its provider library is missing from this onnxruntime install"
    try:
        ctypes.CDLL(str(lib))
    except OSError as exc:
        return str(exc).strip()[:200]
    return "the provider library loads but no usable CUDA device was found"


@functools.lru_cache(maxsize=1)
def _cuda_probe() -> tuple[bool, str]:
    """(works, reason): create a one-node session with CUDA and see whether ORT really kept CUDA."""
    ort = _ort()
    if CUDA not in ort.get_available_providers():
        return False, f"this onnxruntime {ort.__version__} build has no CUDA provider"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    opts = session_options(1)
    ort.set_default_logger_severity(4)  # the failed load logs at ERROR level; we report it ourselves
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=[CUDA, CPU])
        got = sess.get_providers()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:
        ort.set_default_logger_severity(3)
    if got and got[0] == CUDA:
        return True, ""
    return False, _cuda_failure_reason()


def _cuda_error(reason: str) -> DeviceError:
    return DeviceError(
        f"CUDA was requested but ONNX Runtime could not load the CUDA provider ({reason})",
        fix="use --device cpu or install a CUDA-enabled onnxruntime-gpu with matching CUDA/cuDNN",
    )


def check_device(device) -> str:
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}", fix="pass --device auto, cuda or cpu")
    return device


def resolve_providers(device: Device) -> list[str]:
    """ORT providers for ``device``: 'cpu', 'cuda' (DeviceError if CUDA does not really load) or 'auto'."""
    if check_device(device) == "cpu":
        return [CPU]
    ok, reason = _cuda_probe()
    if ok:
        log.info("running ONNX Runtime on CUDA")
        return [CUDA, CPU]
    if device == "cuda":
        raise _cuda_error(reason)
    log.info("running ONNX Runtime on CPU (CUDA unavailable: %s)", reason)
    return [CPU]


# --------------------------------------------------------------------------- model facts
def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (what a caller feeds)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch dim ``N`` of the model's first data input, or None when it is symbolic or absent."""
    for i in data_inputs(model)[:1]:
        dims = i.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None


def _pad_rows(chunk: np.ndarray, size: int) -> np.ndarray:
    """``chunk`` grown to ``size`` rows by repeating its last row (real data: no NaN from all-zero inputs)."""
    return np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])


# --------------------------------------------------------------------------- sessions
class Session:
    """An ORT session that runs arrays of any length in batches (see the module docstring).

    ``provider`` is the provider the session really uses, ``device`` is 'cuda'
    or 'cpu'. ``inputs`` lists ``(name, shape, dtype)`` (unknown dims and
    dtypes as None); ``input_name``/``input_shape``/``input_dtype`` are those
    of the first input. ``fixed_batch`` is the fixed batch dim ``N`` of the
    inputs, or None. With ``io_binding`` (default on CUDA) inputs and
    outputs go through ORT's I/O binding instead of ``InferenceSession.run``.
    """

    def __init__(self, session, *, io_binding: bool | None = None):
        self._sess = session
        self.provider: str = session.get_providers()[0]
        self.device: str = "cuda" if self.provider == CUDA else "cpu"
        self.io_binding = self.device == "cuda" if io_binding is None else bool(io_binding)
        self.inputs: list[tuple[str, tuple, np.dtype | None]] = [
            (
                a.name,
                tuple(d if isinstance(d, int) and d > 0 else None for d in (a.shape or [])),
                np.dtype(_ORT_TYPES[a.type]) if a.type in _ORT_TYPES else None,
            )
            for a in session.get_inputs()
        ]
        self.input_name, self.input_shape, self.input_dtype = self.inputs[0] if self.inputs else ("", (), None)
        self.output_names: list[str] = [o.name for o in session.get_outputs()]

    @functools.cached_property
    def fixed_batch(self) -> int | None:
        """The fixed batch dim ``N`` the inputs declare, or None (symbolic, or inputs that disagree)."""
        fixed = {shape[0] for _, shape, _ in self.inputs if shape and shape[0] is not None}
        if len(fixed) > 1:
            log.warning("inputs declare different fixed batch dims %s: running them unpadded", sorted(fixed))
        return fixed.pop() if len(fixed) == 1 else None

    def __repr__(self) -> str:
        return f"Session(inputs={[n for n, _, _ in self.inputs]}, outputs={self.output_names}, provider={self.provider!r})"

    def _feeds(self, x) -> dict:
        if isinstance(x, Mapping):
            missing = [n for n, _, _ in self.inputs if n not in x]
            if missing:
                raise UsageError(f"no data for model input(s) {missing}", fix=f"feed every input: {[n for n, _, _ in self.inputs]}")
            return {n: x[n] for n, _, _ in self.inputs}
        if len(self.inputs) != 1:
            raise UnsupportedModelError(
                f"the model has {len(self.inputs)} inputs ({', '.join(n for n, _, _ in self.inputs)}); evaluation needs exactly one",
                fix="export the model with a single image input",
            )
        return {self.input_name: np.asarray(x)}

    def batches(self, x, *, batch_size: int = 64, outputs: Sequence[str] | None = None) -> Iterator[tuple[int, list[np.ndarray]]]:
        """``(samples done, outputs of the chunk)`` for consecutive chunks of ``x`` (array or ``{input: array-like}``).

        Chunks hold ``batch_size`` samples, or ``fixed_batch`` for a fixed-batch model
        (the last one padded; its outputs trimmed to the real samples).
        """
        names = list(outputs) if outputs is not None else self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise UsageError(f"unknown output(s) {unknown}", fix=f"choose among {self.output_names}")
        step = self.fixed_batch or check_batch_size(batch_size)
        feeds = self._feeds(x)
        sizes = {n: len(v) for n, v in feeds.items()}
        if len(set(sizes.values())) > 1:
            raise DataError(f"inputs have different numbers of samples {sizes}", fix="feed the same samples to every input")
        total = next(iter(sizes.values()), 0)
        for start in range(0, total, step):
            chunk, n = {}, 0
            for name, value in feeds.items():
                part = np.ascontiguousarray(value[start : start + step])
                n = len(part)
                self._check_dtype(name, part)
                chunk[name] = _pad_rows(part, step) if self.fixed_batch and n < step else part
            outs = self._run_batch(chunk, names, start, n)
            if self.fixed_batch and n < step:
                outs = [o[:n] if o.ndim and len(o) == step else o for o in outs]
            yield start + n, outs

    def run(self, x, *, batch_size: int = 64, outputs: Sequence[str] | None = None, progress: Progress | None = None) -> list[np.ndarray]:
        """Outputs for all of ``x``, run ``batch_size`` samples at a time and concatenated on axis 0.

        ``progress(done_samples, total_samples)`` is called after each batch.
        """
        names = list(outputs) if outputs is not None else self.output_names
        feeds = self._feeds(x)
        total = len(next(iter(feeds.values()), ()))
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for done, outs in self.batches(feeds, batch_size=batch_size, outputs=names):
            for part, out in zip(parts, outs):
                part.append(out)
            if progress:
                progress(done, total)
        return [np.concatenate(p) if p else np.empty((0,)) for p in parts]

    def run_once(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """One ORT call on ``feeds`` as they are (no batching, padding or checks), e.g. a dry run."""
        return self._sess.run(list(outputs) if outputs is not None else self.output_names, dict(feeds))

    def _check_dtype(self, name: str, part: np.ndarray) -> None:
        want = next(d for n, _, d in self.inputs if n == name)
        if want is not None and part.dtype != want:
            raise DataError(
                f"data is {part.dtype} but model input '{name}' is {want}",
                fix="check the data with onnxprune.data.check_against_model (casts float64 to float32)",
            )

    def _run_batch(self, chunk: dict, names: list[str], start: int, n: int) -> list[np.ndarray]:
        try:
            if not self.io_binding:
                return self._sess.run(names, chunk)
            binding = self._sess.io_binding()
            for name, value in chunk.items():
                binding.bind_cpu_input(name, value)
            for name in names:
                binding.bind_output(name, self.device)
            self._sess.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        except Exception as exc:
            text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            size = len(next(iter(chunk.values()))) if chunk else n
            if "out of memory" in text.lower() or "failed to allocate" in text.lower():
                raise DeviceError(
                    f"{self.device} ran out of memory at batch size {size} ({text})",
                    fix="pass a smaller --batch-size or --device cpu",
                ) from exc
            what = f"input '{self.input_name}'" if len(chunk) == 1 else f"inputs {list(chunk)}"
            raise DataError(
                f"ONNX Runtime failed on samples {start}..{start + n - 1} of {what} ({text})",
                fix="check that --data matches the model input (shape, layout, dtype)",
            ) from exc


def _source(model) -> tuple[object, str]:
    """What ``InferenceSession`` takes for ``model`` (bytes or a path) and how to name it in errors."""
    if isinstance(model, onnx.ModelProto):
        from .tensors import has_lazy

        if has_lazy(model):  # weights left in a > 2 GiB external data file (graph.load_model)
            raise BadModelError(
                "the model's weights stay in its external data file (over 2 GiB), which ONNX Runtime cannot run from memory",
                fix="prune it without --data/--calib-data/--train-data (e.g. --strategy uniform), then evaluate the written model by its path",
            )
        try:
            return model.SerializeToString(), "the model"
        except ValueError as exc:  # protobuf refuses messages over 2 GiB
            raise BadModelError(f"the model is too large to pass in memory ({exc})", fix="save it with external data and pass its path") from exc
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), "the model"
    source = str(model)
    if not Path(source).is_file():
        raise BadModelError(f"model file '{model}' does not exist", fix="check the path")
    return source, f"'{model}'"


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    *,
    device: Device = "auto",
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    optimize: bool = True,
    config: Mapping[str, str] | None = None,
    arena: bool = True,
) -> Session:
    """Open ``model`` (proto, serialized bytes or path) on ``device``; DeviceError if CUDA is asked for and not really used.

    ``providers`` (from :func:`resolve_providers`) skips resolving them again; ``config``: see :func:`session_options`.
    """
    providers = list(providers) if providers is not None else resolve_providers(device)
    source, what = _source(model)
    ort = _ort()
    opts = session_options(threads, optimize=optimize, config=config, arena=arena)
    try:
        sess = ort.InferenceSession(source, opts, providers=providers)
    except Exception as exc:
        raise BadModelError(
            f"ONNX Runtime {ort.__version__} cannot load {what}: {str(exc).splitlines()[0][-200:]}",
            fix="re-export the model with an opset and IR version this onnxruntime supports",
        ) from exc
    session = Session(sess)
    if device == "cuda" and session.provider != CUDA:
        raise _cuda_error(f"the session fell back to {session.provider}")
    if device == "auto" and providers[0] == CUDA and session.provider != CUDA:
        log.warning("CUDA works but this model fell back to %s", session.provider)
    log.debug("session on %s for %s", session.provider, what)
    return session


# --------------------------------------------------------------------------- many models, one device
class Runner:
    """Runs many models (pruned variants, prefixes, suffixes) with one device, batch size and thread count.

    ``run(model, x, outputs)`` may name intermediate tensors: they are added as
    outputs to a copy of the model (:func:`onnxprune.extract.with_outputs`).
    """

    def __init__(self, *, device: Device = "auto", batch_size: int = 64, threads: int | None = None, arena: bool = True):
        self.device = check_device(device)
        self.batch = check_batch_size(batch_size)
        self.threads = threads
        self.arena = bool(arena)
        session_options(threads)  # validate --threads now, not at the first run
        self.providers = resolve_providers(device)

    def session(self, model: onnx.ModelProto, outputs: Sequence[str] | None = None) -> Session:
        """A session of ``model``; ``outputs`` not among its graph outputs are added to a copy first."""
        if outputs is not None:
            have = {o.name for o in model.graph.output}
            missing = [o for o in outputs if o not in have]
            if missing:
                from .extract import with_outputs

                model = with_outputs(model, missing)
        return make_session(model, device=self.device, threads=self.threads, providers=self.providers, arena=self.arena)

    def lean(self, per_sample_bytes: float) -> "Runner":
        """This runner, or one with the batch and arena of :func:`lean_batch` when a chunk would be large."""
        batch, arena = lean_batch(per_sample_bytes, self.batch)
        if batch == self.batch and arena == self.arena:
            return self
        return Runner(device=self.device, batch_size=batch, threads=self.threads, arena=arena)

    def batches(self, model: onnx.ModelProto, x, outputs: Sequence[str] | None = None) -> Iterator[tuple[int, list[np.ndarray]]]:
        """``(samples done, requested outputs)`` chunk by chunk (fixed-batch chunks trimmed to their real samples)."""
        return self.session(model, outputs).batches(x, batch_size=self.batch, outputs=outputs)

    def run(self, model: onnx.ModelProto, x, outputs: Sequence[str] | None = None, *, progress: Progress | None = None) -> list[np.ndarray]:
        """All requested outputs (default: the graph outputs) for all of ``x``, concatenated on axis 0."""
        return self.session(model, outputs).run(x, batch_size=self.batch, outputs=outputs, progress=progress)


# --------------------------------------------------------------------------- memory of one chunk
CHUNK_BYTES = 64 * 2**20  # the largest activation of one chunk (all its samples) stays under this


def lean_batch(per_sample_bytes: float, batch: int, *, chunk_bytes: float = CHUNK_BYTES) -> tuple[int, bool]:
    """``(batch, arena)`` for runs whose largest activation takes ``per_sample_bytes`` per sample.

    ONNX Runtime's working memory for one chunk is a few times its largest activation times the
    samples in the chunk, and its CPU arena keeps that memory (grown in power-of-two steps) for the
    session's life. So that one chunk adds a bounded amount to a run's peak (the overhead beside
    ``--memory-budget``), a chunk whose largest activation would pass ``chunk_bytes`` gets fewer
    samples, ``floor(chunk_bytes / per_sample_bytes)`` (at least 1), and runs without the arena
    (freed tensors go back to the allocator at once). Small models keep ``batch`` and the arena
    (demo ResNet-20: 50 KB per sample, the default 64-sample chunk is 3 MB): their speed is unchanged.
    Example: ResNet-50 at 224 (3.2 MB per sample) -> ``(20, False)``.
    """
    if per_sample_bytes * batch <= chunk_bytes:
        return batch, True
    return max(1, int(chunk_bytes // max(per_sample_bytes, 1))), False


def largest_activation(shapes: Mapping[str, Sequence], itemsize: int = 4) -> int:
    """Bytes per sample of the largest tensor with a batch axis among ``shapes`` (``{name: shape}``; unknown dims skipped)."""
    best = 0
    for shape in shapes.values():
        if shape and len(shape) >= 2 and all(isinstance(d, int) and d > 0 for d in shape[1:]):
            best = max(best, int(np.prod(shape[1:])) * itemsize)
    return best


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Give memory freed by ONNX Runtime and numpy back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap, so after a
    session with large chunks is closed the process's resident size would stay at its high-water mark."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


__all__ = [
    "CHUNK_BYTES", "CPU", "CUDA", "DEVICES", "Runner", "Session", "check_batch_size", "check_device", "data_inputs", "fixed_batch",
    "largest_activation", "lean_batch", "make_session", "release_memory", "resolve_providers", "session_options",
]  # fmt: skip
