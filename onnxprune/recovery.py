"""Recovery without training: one small protocol, several methods.

*Recovery* is the stage between pruning and (optional) fine-tuning. Every
method implements the same two steps: **fit** on unlabeled samples of the
original model (the constructor: ``make_recovery(cg, x, method)``), then
**apply** to a pruned model made from the same analysis
(``recover(mask, pruned)``, returning a result whose ``.model`` is a new
model; neither input changes). ``transform()`` packages the second step as
``fn(pruned, mask) -> model`` for :func:`onnxprune.sensitivity.analyze`. The
pipeline (:func:`onnxprune.api.prune`), the CLI and the sensitivity analysis
call only this protocol.

Methods (``METHODS``, the default first):

* ``reconstruct``: least-squares re-fit of the layers that lost inputs
  (:class:`onnxprune.reconstruct.Reconstructor`; options ``mode``, ``scope``,
  ``rows``, ``ridge`` pass through ``make_recovery``).
* ``both`` / ``affine`` / ``bias``: the *calibration* family,
  moment matching folded into the weights (:class:`onnxprune.calibrate.Calibrator`).

"Calibrate" names only that family; the stage is "recovery" (the CLI's
``--calibrate``/``--calibrate-method`` flags remain as aliases of
``--recover``/``--recovery-method``).

Example::

    rec = make_recovery(cg, x_calib, "reconstruct")
    model = rec.recover(mask, apply_mask(cg, mask)).model
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np
import onnx

from .errors import UsageError
from .groups import ChannelGraph

METHODS = ("reconstruct", "both", "affine", "bias")
Progress = Callable[[int, int], None]


@runtime_checkable
class Recovery(Protocol):
    """Fitted on samples ``x`` of ``cg.model``; applies to pruned models of the same analysis."""

    method: str
    x: np.ndarray

    def recover(self, mask: np.ndarray, pruned: onnx.ModelProto, *, progress: Progress | None = None):
        """A result with ``.model`` (new ModelProto), ``.method``, ``.samples``, ``.seconds`` and ``.summary()``."""
        ...

    def transform(self) -> Callable[[onnx.ModelProto, np.ndarray], onnx.ModelProto]:
        """``fn(pruned, mask) -> recovered model``."""
        ...


def make_recovery(
    cg: ChannelGraph,
    x: np.ndarray,
    method: str = METHODS[0],
    *,
    batch_size: int = 64,
    device: str = "cpu",
    threads: int | None = None,
    progress: Progress | None = None,
    memory_budget_mb: float | None = None,
    **options,
) -> Recovery:
    """The :class:`Recovery` for ``method``, fitted on ``x``. ``options`` go to the method's class
    (e.g. ``mode="blockwise"`` for reconstruct, ``affine_outputs=False`` for the calibration family).
    ``memory_budget_mb`` (``--memory-budget``; None: the class's default) bounds what reconstruction
    keeps between layers; the calibration family bounds its cache per call (``calibrate(memory_budget_mb=)``)."""
    if method not in METHODS:
        raise UsageError(f"unknown recovery method '{method}'", fix="use --recovery-method " + ", ".join(METHODS))
    if method == "reconstruct":
        from .reconstruct import Reconstructor

        if memory_budget_mb is not None:
            options.setdefault("memory_budget_mb", memory_budget_mb)
        return Reconstructor(cg, x, batch_size=batch_size, device=device, threads=threads, **options)
    from .calibrate import Calibrator

    return Calibrator(cg, x, method=method, batch_size=batch_size, device=device, threads=threads, progress=progress, **options)


__all__ = ["METHODS", "Recovery", "make_recovery"]
