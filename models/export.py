"""Export torch models to ONNX with a symbolic batch axis, quietly.

Example::

    from models.zoo import build
    from models.export import export_onnx
    model, shape = build("resnet20")
    export_onnx(model, tmp_path / "r20.onnx", input_shape=shape, exporter="dynamo")

``exporter="legacy"`` uses the TorchScript exporter (``dynamo=False``,
``dynamic_axes``); ``exporter="dynamo"`` uses ``torch.export`` with a
``Dim("batch", min=2)`` and an example batch of at least 2 (batch 1 would be
specialised to a constant; the exported graph still runs at batch 1).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

EXPORTERS = ("legacy", "dynamo")

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export", "onnxscript", "torch.fx")


@contextlib.contextmanager
def _quiet():
    """Silence warnings, chatty loggers and stdout/stderr prints of the exporters."""
    saved = {}
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield buf
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int] = (1, 3, 32, 32),
    exporter: str = "legacy",
    opset: int = 17,
    input_name: str = "input",
    output_name: str = "logits",
) -> Path:
    """Write ``model`` (put in eval mode) to ``path`` as ONNX with a dynamic batch axis; return the path.

    The dynamo exporter may write a higher opset than asked (it writes 18 when
    asked for 17 on torch 2.x).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    model = model.eval()
    x = torch.randn(*input_shape)
    with _quiet() as log, torch.no_grad():
        try:
            if exporter == "legacy":
                torch.onnx.export(
                    model,
                    (x,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                    do_constant_folding=True,
                )
            else:
                batch = torch.export.Dim("batch", min=2, max=4096)
                # the example must lie inside the Dim range; batch 1 would be specialised
                xd = torch.randn(max(2, int(input_shape[0])), *input_shape[1:])
                prog = torch.onnx.export(
                    model,
                    (xd,),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_shapes=({0: batch},),
                    optimize=True,
                    verbose=False,
                    report=False,
                )
                prog.save(str(path))
        except Exception as exc:
            root = exc
            while root.__cause__ is not None:
                root = root.__cause__
            raise RuntimeError(
                f"{exporter} export of {type(model).__name__} failed: {type(root).__name__}: {str(root)[:500]}"
            ) from exc
    return path
