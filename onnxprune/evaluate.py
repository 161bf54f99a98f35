"""Run models with ONNX Runtime and score their outputs.

* :func:`resolve_providers` / :func:`make_session`: CUDA only when it really
  loads (``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` even where the
  CUDA libraries are missing and then silently runs on CPU; we check the
  providers a session really got), else CPU.
* :class:`Session`: batched runs over axis 0; I/O binding on CUDA.
* :func:`compute_metrics` and :class:`Metrics`: top-1/top-5 with labels, and
  fidelity to a reference model's outputs without labels.
* :class:`Evaluator`: one dataset, reference outputs computed once, one
  session per evaluated model.

Example::

    ev = Evaluator.from_original(load_dataset("val.npz"), "model.onnx")
    ev.evaluate(pruned_model).primary()   # ('top1', 0.912)
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import onnx

from .data import Dataset, check_against_model
from .errors import BadModelError, DataError, DeviceError, UnsupportedModelError, UsageError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Device = Literal["auto", "cuda", "cpu"]
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(bool)": np.bool_,
}  # fmt: skip


# --------------------------------------------------------------------------- providers
def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors only: keep ORT's warnings off the user's terminal
    return ort


def _options(threads: int | None):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        if isinstance(threads, bool) or int(threads) < 1:
            raise UsageError(
                f"--threads {threads} is not a positive number", fix="pass --threads 1 or more, or leave it out"
            )
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
    opts = _options(1)
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


def resolve_providers(device: Device) -> list[str]:
    """ORT providers for ``device``: 'cpu', 'cuda' (DeviceError if CUDA does not really load) or 'auto'."""
    if device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"unknown device {device!r}", fix="pass --device auto, cuda or cpu")
    if device == "cpu":
        return [CPU]
    ok, reason = _cuda_probe()
    if ok:
        log.info("running ONNX Runtime on CUDA")
        return [CUDA, CPU]
    if device == "cuda":
        raise _cuda_error(reason)
    log.info("running ONNX Runtime on CPU (CUDA unavailable: %s)", reason)
    return [CPU]


# --------------------------------------------------------------------------- sessions
class Session:
    """A single-input ORT session that runs arrays of any length in batches.

    ``provider`` is the provider the session really uses, ``device`` is 'cuda'
    or 'cpu'. With ``io_binding`` (default on CUDA) inputs and outputs go
    through ORT's I/O binding instead of ``InferenceSession.run``.
    """

    def __init__(self, session, *, io_binding: bool | None = None):
        self._sess = session
        self.provider: str = session.get_providers()[0]
        self.device: str = "cuda" if self.provider == CUDA else "cpu"
        self.io_binding = self.device == "cuda" if io_binding is None else bool(io_binding)
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise UnsupportedModelError(
                f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); evaluation needs exactly one",
                fix="export the model with a single image input",
            )
        arg = inputs[0]
        self.input_name: str = arg.name
        self.input_shape: tuple = tuple(d if isinstance(d, int) and d > 0 else None for d in (arg.shape or []))
        self.input_dtype = np.dtype(_ORT_TYPES[arg.type]) if arg.type in _ORT_TYPES else None
        self.output_names: list[str] = [o.name for o in session.get_outputs()]

    def __repr__(self) -> str:
        return f"Session(input={self.input_name!r}, outputs={self.output_names}, provider={self.provider!r})"

    def run(
        self,
        x: np.ndarray,
        *,
        batch_size: int = 64,
        outputs: Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> list[np.ndarray]:
        """Outputs for all of ``x``, run ``batch_size`` samples at a time and concatenated on axis 0.

        A model with a fixed batch dim B runs B at a time; the last batch is zero-padded and trimmed.
        ``progress(done_samples, total_samples)`` is called after each batch.
        """
        names = list(outputs) if outputs is not None else self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise UsageError(f"unknown output(s) {unknown}", fix=f"choose among {self.output_names}")
        if int(batch_size) < 1:
            raise UsageError(f"batch size {batch_size} is not positive", fix="pass --batch-size 1 or more")
        x = np.asarray(x)
        if self.input_dtype is not None and x.dtype != self.input_dtype:
            raise DataError(
                f"data is {x.dtype} but model input '{self.input_name}' is {self.input_dtype}",
                fix="check the data with onnxprune.data.check_against_model (casts float64 to float32)",
            )
        fixed = self.input_shape[0] if self.input_shape else None
        step = fixed or int(batch_size)
        total, parts = len(x), [[] for _ in names]
        for start in range(0, total, step):
            chunk = np.ascontiguousarray(x[start : start + step])
            n = len(chunk)
            if fixed and n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
            for part, out in zip(parts, self._run_batch(chunk, names, start)):
                part.append(out[:n] if fixed else out)
            if progress:
                progress(min(start + step, total), total)
        return [np.concatenate(p) if p else np.empty((0,)) for p in parts]

    def _run_batch(self, chunk: np.ndarray, names: list[str], start: int) -> list[np.ndarray]:
        try:
            if not self.io_binding:
                return self._sess.run(names, {self.input_name: chunk})
            binding = self._sess.io_binding()
            binding.bind_cpu_input(self.input_name, chunk)
            for name in names:
                binding.bind_output(name, self.device)
            self._sess.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        except Exception as exc:
            text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if "out of memory" in text.lower() or "failed to allocate" in text.lower():
                raise DeviceError(
                    f"{self.device} ran out of memory at batch size {len(chunk)} ({text})",
                    fix="pass a smaller --batch-size or --device cpu",
                ) from exc
            raise DataError(
                f"ONNX Runtime failed on samples {start}..{start + len(chunk) - 1} of input '{self.input_name}' ({text})",
                fix="check that --data matches the model input (shape, layout, dtype)",
            ) from exc


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike, *, device: Device = "auto", threads: int | None = None
) -> Session:
    """Open ``model`` (proto, serialized bytes or path) on ``device``; DeviceError if CUDA is asked for and not really used."""
    providers = resolve_providers(device)
    ort = _ort()
    if isinstance(model, onnx.ModelProto):
        from .tensors import has_lazy

        if has_lazy(model):  # weights left in a > 2 GiB external data file (graph.load_model)
            raise BadModelError(
                "the model's weights stay in its external data file (over 2 GiB), which ONNX Runtime cannot run from memory",
                fix="prune it without --data/--calib-data/--train-data (e.g. --strategy uniform), then evaluate the written model by its path",
            )
        try:
            source, what = model.SerializeToString(), "the model"
        except ValueError as exc:  # protobuf refuses messages over 2 GiB
            raise BadModelError(
                f"the model is too large to pass in memory ({exc})", fix="save it with external data and pass its path"
            ) from exc
    elif isinstance(model, (bytes, bytearray)):
        source, what = bytes(model), "the model"
    else:
        source, what = str(model), f"'{model}'"
        if not Path(source).is_file():
            raise BadModelError(f"model file {what} does not exist", fix="check the path")
    opts = _options(threads)
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


# --------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Metrics:
    """Scores of one model on one dataset (fractions in [0, 1]; None when not measurable).

    * ``top1``/``top5``: share of samples whose label is the arg-max / among the
      5 highest scores (ties go to the lower class index, as ``argmax``);
      ``top5`` only for more than 5 classes.
    * ``agreement``: share of samples whose arg-max equals the reference model's.
    * ``cosine``: mean over samples of ``<a_i, b_i> / (|a_i| |b_i|)``, a_i all
      outputs of sample i flattened (1 when both are zero, 0 when one is).
    * ``rel_error``: ``||a - b|| / ||b||`` over all outputs of all samples.
    """

    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None
    cosine: float | None = None
    rel_error: float | None = None
    n: int = 0

    def primary(self) -> tuple[str, float]:
        """The metric to optimize: top1 with labels, else agreement (classifiers), else cosine."""
        for name in ("top1", "agreement", "cosine"):
            value = getattr(self, name)
            if value is not None:
                return name, value
        raise UsageError(
            "no metric could be computed: the data has no labels and there is no reference output",
            fix="pass --data with labels y, or evaluate against the original model",
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _as_list(outputs) -> list[np.ndarray]:
    return [np.asarray(outputs)] if isinstance(outputs, np.ndarray) else [np.asarray(o) for o in outputs]


def compute_metrics(outputs, *, labels=None, reference=None) -> Metrics:
    """Metrics for ``outputs`` (one array or a list, samples on axis 0) given labels and/or reference outputs.

    Example: ``compute_metrics(np.array([[0.1, 0.9]]), labels=np.array([1])).top1 == 1.0``.
    """
    outs = _as_list(outputs)
    head, n = outs[0], len(outs[0]) if outs[0].ndim else 0
    if n == 0:
        raise DataError("no outputs to score (0 samples)", fix="pass --data with at least one sample")
    classifier = head.ndim == 2
    scores: dict = {"n": n}
    if labels is not None and classifier:
        y = np.asarray(labels).reshape(-1)
        if len(y) != n:
            raise DataError(f"{len(y)} labels for {n} outputs", fix="give one label per sample")
        scores["top1"] = float(np.mean(head.argmax(1) == y))
        if head.shape[1] > 5:
            top = np.argsort(-head, axis=1, kind="stable")[:, :5]
            scores["top5"] = float(np.mean((top == y[:, None]).any(1)))
    elif labels is not None:
        log.debug("labels ignored: output '%s' has rank %d, not a classifier", head.shape, head.ndim)
    if reference is not None:
        refs = _as_list(reference)
        if [r.shape for r in refs] != [o.shape for o in outs]:
            raise DataError(
                f"outputs have shapes {[o.shape for o in outs]} but the reference has {[r.shape for r in refs]}",
                fix="compare models with the same outputs on the same data",
            )
        if classifier:
            scores["agreement"] = float(np.mean(head.argmax(1) == refs[0].argmax(1)))
        scores.update(_fidelity(outs, refs, n))
    if not all(np.isfinite(v) for k, v in scores.items() if k != "n"):
        log.warning("non-finite metrics %s: the model outputs contain NaN or Inf", scores)
    return Metrics(**scores)


def _fidelity(outs: list[np.ndarray], refs: list[np.ndarray], n: int) -> dict:
    cos_sum, diff2, ref2 = 0.0, 0.0, 0.0
    step = max(1, (1 << 22) // max(1, sum(o[0].size for o in outs)))
    for i in range(0, n, step):
        a = np.concatenate([o[i : i + step].reshape(len(o[i : i + step]), -1) for o in outs], axis=1).astype(np.float64)
        b = np.concatenate([r[i : i + step].reshape(len(r[i : i + step]), -1) for r in refs], axis=1).astype(np.float64)
        aa, bb = (a * a).sum(1), (b * b).sum(1)
        both = np.sqrt(aa * bb)  # one sqrt of the product: exact for proportional vectors
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(
                both > 0, (a * b).sum(1) / np.where(both > 0, both, 1), np.where((aa == 0) & (bb == 0), 1.0, 0.0)
            )
        cos = np.clip(cos, -1.0, 1.0)
        cos_sum += float(cos.sum())
        diff2 += float(((a - b) ** 2).sum())
        ref2 += float((b**2).sum())
    diff, ref = np.sqrt(diff2), np.sqrt(ref2)
    rel = diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))
    return {"cosine": cos_sum / n, "rel_error": float(rel)}


# --------------------------------------------------------------------------- evaluator
@dataclass(frozen=True, eq=False)
class Evaluator:
    """Scores models on one dataset; reference outputs (from the original model) are computed once.

    Build with :meth:`from_original` so ``agreement``/``cosine`` work without labels.
    """

    dataset: Dataset
    _: KW_ONLY
    reference_outputs: tuple[np.ndarray, ...] | None = None
    device: Device = "auto"
    batch_size: int = 64
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or int(self.batch_size) < 1:
            raise UsageError(f"batch size {self.batch_size} is not positive", fix="pass --batch-size 1 or more")
        if self.device not in ("auto", "cuda", "cpu"):
            raise UsageError(f"unknown device {self.device!r}", fix="pass --device auto, cuda or cpu")
        if self.reference_outputs is not None:
            refs = tuple(r.view() for r in _as_list(self.reference_outputs))
            for r in refs:
                r.flags.writeable = False  # a read-only view: the caller's arrays keep their flags
            if any(len(r) != len(self.dataset) for r in refs):
                raise DataError(
                    f"reference outputs have {[len(r) for r in refs]} samples but the dataset has {len(self.dataset)}",
                    fix="compute reference outputs on the same data (Evaluator.from_original)",
                )
            object.__setattr__(self, "reference_outputs", refs)

    @classmethod
    def from_original(
        cls,
        dataset: Dataset,
        original_model,
        *,
        device: Device = "auto",
        batch_size: int = 64,
        threads: int | None = None,
        progress: Progress | None = None,
    ) -> Evaluator:
        """Check ``dataset`` against ``original_model``'s input and record its outputs as the reference."""
        session = make_session(original_model, device=device, threads=threads)
        dtype = session.input_dtype if session.input_dtype is not None else dataset.x.dtype
        fit = functools.partial(check_against_model, input_name=session.input_name)
        dataset = fit(dataset, session.input_shape, dtype, num_classes=None)
        outs = session.run(dataset.x, batch_size=batch_size, progress=progress)
        if outs[0].ndim == 2:
            dataset = fit(dataset, session.input_shape, dtype, num_classes=outs[0].shape[1])
        return cls(dataset, reference_outputs=outs, device=device, batch_size=batch_size, threads=threads)

    def outputs(self, model, *, progress: Progress | None = None) -> list[np.ndarray]:
        """All outputs of ``model`` (proto, bytes or path) on the dataset, in one session."""
        session = make_session(model, device=self.device, threads=self.threads)
        return session.run(self.dataset.x, batch_size=self.batch_size, progress=progress)

    def evaluate(self, model, *, progress: Progress | None = None) -> Metrics:
        """Metrics of ``model`` on the dataset (labels and reference outputs when present)."""
        outs = self.outputs(model, progress=progress)
        return compute_metrics(outs, labels=self.dataset.y, reference=self.reference_outputs)
