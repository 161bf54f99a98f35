"""Where the sizes of dynamic input dims come from.

Analysis and MAC counting need concrete spatial sizes. An input whose dims
after the batch axis are symbolic (``dynamic=True`` exports) gets them, in
this order:

1. ``--input-shape NAME:DIMS`` (explicit; always wins);
2. the model's ``metadata_props``: Ultralytics writes ``imgsz`` (``"[640, 640]"``
   or ``"640"``); ``input_shape``/``image_size`` are read the same way;
3. the data passed with ``--data`` (its sample shape).

:func:`resolve` returns the shapes and says which source was used, so the
report can state it. Example::

    shapes = resolve(model)            # InputShapes(shapes={'images': (1, 3, 640, 640)}, source="metadata 'imgsz'")
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import onnx

from .errors import DataError
from .graph import graph_inputs

#: metadata_props keys read for the spatial size, in order.
METADATA_KEYS = ("imgsz", "input_shape", "image_size")


@dataclass(frozen=True)
class InputShapes:
    """Shapes for the model's data inputs (``None``: the model's own are enough) and where they came from."""

    shapes: Mapping[str, tuple[int, ...]] | None
    source: str


def _dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]


def dynamic_inputs(model: onnx.ModelProto) -> list[tuple[str, list[int | None]]]:
    """Data inputs with a symbolic dim after the batch axis, with their dims."""
    out = []
    for vi in graph_inputs(model):
        d = _dims(vi)
        if d is not None and len(d) >= 2 and any(x is None for x in d[1:]):
            out.append((vi.name, d))
    return out


def _parse_size(text: str) -> tuple[int, ...] | None:
    """``"[640, 640]"``, ``"(640, 480)"``, ``"640"``, ``"640x480"`` -> ints; None if not a size."""
    text = text.strip()
    try:
        v = json.loads(text.replace("(", "[").replace(")", "]"))
    except ValueError:
        v = [int(p) for p in re.split(r"[x,\s]+", text) if p.isdigit()] if re.fullmatch(r"[\dx,\s]+", text) else None
    if isinstance(v, int):
        v = [v, v]
    if not isinstance(v, list) or not v or not all(isinstance(e, int) and e > 0 for e in v):
        return None
    return tuple(v)


def from_metadata(model: onnx.ModelProto) -> InputShapes | None:
    """Shapes for the dynamic inputs from ``metadata_props``, or None when the file has none that fit."""
    dyn = dynamic_inputs(model)
    if not dyn:
        return None
    props = {p.key: p.value for p in model.metadata_props}
    for key in METADATA_KEYS:
        if key not in props:
            continue
        size = _parse_size(props[key])
        if size is None:
            continue
        shapes = {}
        for name, dims in dyn:
            spatial = len(dims) - 2
            if spatial < 1 or dims[1] is None or len(size) not in (1, spatial, len(dims) - 1, len(dims)):
                return None
            if len(size) == len(dims):
                full = list(size)
            elif len(size) == len(dims) - 1:
                full = [1, *size]
            else:
                hw = list(size) * spatial if len(size) == 1 else list(size)
                full = [1, dims[1], *hw]
            full[0] = 1
            if any(d is not None and d != f for d, f in zip(dims[1:], full[1:])):
                return None  # metadata that contradicts the file's own dims: not ours to trust
            shapes[name] = tuple(int(x) for x in full)
        return InputShapes(shapes, f"metadata '{key}'")
    return None


def metadata_shapes(model: onnx.ModelProto) -> Mapping[str, tuple[int, ...]] | None:
    """Shapes from :func:`from_metadata`, or None: the fallback of analysis and MAC counting."""
    meta = from_metadata(model)
    return meta.shapes if meta is not None else None


def resolve(
    model: onnx.ModelProto,
    *,
    explicit: Mapping[str, Sequence[int]] | None = None,
    data_shape: Sequence[int] | None = None,
    data_flag: str = "--data",
) -> InputShapes:
    """Input shapes for analysis: explicit, else metadata, else ``data_shape`` (one sample batch's shape).

    When both metadata and data give a size and they disagree, raises
    :class:`DataError` naming both.
    """
    if explicit:
        return InputShapes({k: tuple(int(d) for d in v) for k, v in explicit.items()}, "--input-shape")
    dyn = dynamic_inputs(model)
    if not dyn:
        return InputShapes(None, "model")
    meta = from_metadata(model)
    if meta is not None and data_shape is not None and len(dyn) == 1:
        name = dyn[0][0]
        want = tuple(meta.shapes[name][1:])
        got = tuple(int(d) for d in data_shape[1:])
        if want != got:
            raise DataError(
                f"the model's {meta.source} says input '{name}' is {'x'.join(map(str, want))} per sample, "
                f"but {data_flag} has samples of {'x'.join(map(str, got))}",
                fix=f"resize the data to {'x'.join(map(str, want))}, or pass --input-shape {name}:1x{'x'.join(map(str, got))} to override the metadata",
            )
    if meta is not None:
        return meta
    if data_shape is not None and len(dyn) == 1:
        name, dims = dyn[0]
        if len(data_shape) == len(dims):
            return InputShapes({name: (1, *(int(d) for d in data_shape[1:]))}, data_flag)
    return InputShapes(None, "model")
