"""Score models' outputs, run with :mod:`onnxprune.runtime`.

* :func:`compute_metrics` and :class:`Metrics`: top-1/top-5 with labels, and
  fidelity to a reference model's outputs without labels.
* :class:`Evaluator`: one dataset, reference outputs computed once, one
  session per evaluated model (fixed-batch models padded by the runtime).

Sessions, providers and batching live in :mod:`onnxprune.runtime`; the names
``CPU``, ``CUDA``, ``Session``, ``make_session`` and ``resolve_providers``
stay importable from here.

Example::

    ev = Evaluator.from_original(load_dataset("val.npz"), "model.onnx")
    ev.evaluate(pruned_model).primary()   # ('top1', 0.912)
"""

from __future__ import annotations

import functools
import logging
from dataclasses import KW_ONLY, asdict, dataclass

import numpy as np

from .data import Dataset, check_against_model
from .errors import DataError, UnsupportedModelError, UsageError
from .runtime import CPU, CUDA, Device, Progress, Session, _cuda_probe, check_batch_size, check_device, make_session, resolve_providers

log = logging.getLogger(__name__)

__all__ = [
    "CPU", "CUDA", "Evaluator", "Metrics", "Session", "compute_metrics", "make_session", "resolve_providers", "_cuda_probe",
]  # fmt: skip


# --------------------------------------------------------------------------- metrics
PRIMARY_METRICS = ("top1", "agreement", "cosine")  # the metric to optimize: the first one present


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
        for name in PRIMARY_METRICS:
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
        check_batch_size(self.batch_size)
        check_device(self.device)
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
        if len(session.inputs) != 1:
            raise UnsupportedModelError(
                f"the model has {len(session.inputs)} inputs ({', '.join(n for n, _, _ in session.inputs)}); evaluation needs exactly one",
                fix="export the model with a single image input",
            )
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
