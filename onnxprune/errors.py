"""One exception family for onnxprune.

Every error names the thing that is wrong (a file, node, tensor, group or
option) and how to fix it, in one line, so the CLI can print it as is::

    raise BadModelError("model.onnx is not an ONNX model", fix="pass an .onnx file")

``exit_code`` is what the CLI exits with: 2 for bad usage or input, 1 for
internal failures (a verification that failed is a bug in onnxprune).
"""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class. ``str(err)`` is a single line: the problem, then the fix."""

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None, node: str | None = None):
        self.message = message
        self.fix = fix
        self.node = node
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.message.strip().replace("\n", " ")
        if self.fix:
            text = f"{text.rstrip('.')}. To fix: {self.fix.strip().rstrip('.')}."
        return text


class BadModelError(OnnxPruneError):
    """The model file is missing, unreadable, not ONNX, or malformed."""


class ShapeError(OnnxPruneError):
    """Shapes needed for counting or pruning cannot be determined."""


class UnsupportedModelError(OnnxPruneError):
    """The model holds nothing onnxprune can prune or count."""


class UsageError(OnnxPruneError):
    """An option has a bad value or options contradict each other."""


class TargetError(OnnxPruneError):
    """The requested reduction cannot be reached."""


class PlanError(OnnxPruneError):
    """A pruning plan does not match the model it is applied to."""


class DataError(OnnxPruneError):
    """Evaluation or training data is missing, corrupt or does not fit the model."""


class DeviceError(OnnxPruneError):
    """The requested execution device is not available."""


class OutputError(OnnxPruneError):
    """An output path cannot be written (exists, equals the input, read-only...)."""


class MissingDependencyError(OnnxPruneError):
    """An optional dependency (torch, matplotlib) is not installed."""


class FinetuneError(OnnxPruneError):
    """Fine-tuning cannot run on this model or data."""


class VerificationError(OnnxPruneError):
    """An internal consistency check failed: this is a bug in onnxprune."""

    exit_code = 1
