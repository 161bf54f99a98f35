"""YOLOv8-style detector and segmenter look-alikes, built in torch (no ultralytics).

The layers follow Ultralytics' ``yolov8n.yaml`` / ``yolov8n-seg.yaml`` (depth
0.33; ``width`` 0.25 gives the "n" channel counts 16/32/64/128/256):

* ``Conv``: bias-free Conv2d + BatchNorm2d + SiLU (exported as ``Sigmoid`` + ``Mul``);
* ``C2f``: 1x1 conv, ``chunk(2, 1)`` (a ``Split``), bottlenecks on the last
  chunk, ``Concat`` of every chunk, 1x1 conv;
* ``SPPF``: 1x1 conv, three chained ``MaxPool(5, 1, 2)``, ``Concat``, 1x1 conv;
* neck: nearest ``Upsample`` x2 (a ``Resize``) + ``Concat`` with the backbone,
  strided convs back down (PAN);
* ``Detect``: per scale a box branch (Conv, Conv, Conv2d -> 4*16) and a class
  branch (Conv, Conv, Conv2d -> nc); both concatenated, flattened to
  ``(N, 4*16+nc, A)`` and concatenated over scales; DFL (``Reshape`` to
  ``(N, 4, 16, A)``, ``Transpose``, ``Softmax``, a fixed 1x1 conv with
  ``arange(16)`` weights) and ``dist2bbox`` with anchors; output
  ``(N, 4+nc, A)`` as Ultralytics exports it;
* ``Segment``: ``Detect`` plus a mask-coefficient branch per scale and a
  ``Proto`` branch (Conv, ConvTranspose x2, Conv, Conv -> 32 prototypes);
  outputs ``(N, 4+nc+32, A)`` and ``(N, 32, H/4, W/4)``.

BatchNorm keeps torch's default statistics unless ``randomize_bn`` is applied,
which is what random-init (and many trained) exports look like: every folded
bias is all-zero and exporters deduplicate them.

:func:`export_yolo` exports like ``model.export(format="onnx")``: outputs
``output0`` (and ``output1``), ``metadata_props`` with ``imgsz``, ``stride``,
``names``, ``task``, ``batch``; fixed batch 1 by default, or dynamic batch
and spatial axes (``dynamic=True``); optionally simplified with onnxslim.

Example::

    from models.detector import yolo_detector, export_yolo
    model = yolo_detector(width=0.25, num_classes=8)
    export_yolo(model, "det.onnx", imgsz=64, exporter="legacy")
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["YOLO", "yolo_detector", "yolo_segmenter", "export_yolo", "head_final_convs", "head_final_weights", "init_weights", "STRIDES"]

STRIDES = (8, 16, 32)
REG_MAX = 16


def _ch(c: int, width: float, max_channels: int = 1024) -> int:
    """Ultralytics' ``make_divisible(min(c, max_channels) * width, 8)``."""
    return int(math.ceil(min(c, max_channels) * width / 8) * 8)


def _depth(n: int, depth: float) -> int:
    return max(round(n * depth), 1) if n > 1 else n


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU, 'same' padding."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with 2 convolutions: chunk -> n bottlenecks on the last chunk -> concat all."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over 16 bins, then a fixed conv with weights 0..15."""

    def __init__(self, c1: int = REG_MAX):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def _anchors(feats: list[torch.Tensor], strides=STRIDES, offset: float = 0.5):
    """Anchor centres ``(A, 2)`` and strides ``(A, 1)`` from the feature maps' shapes (traced, so dynamic H, W work)."""
    points, stride_t = [], []
    for f, s in zip(feats, strides):
        h, w = f.shape[2:]
        sx = torch.arange(w, dtype=f.dtype) + offset
        sy = torch.arange(h, dtype=f.dtype) + offset
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((xx, yy), -1).view(-1, 2))
        stride_t.append(torch.full((h * w, 1), float(s), dtype=f.dtype))
    return torch.cat(points), torch.cat(stride_t)


def _dist2bbox(distance, anchor_points):
    lt, rb = distance.chunk(2, 1)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1)


class Detect(nn.Module):
    def __init__(self, nc: int, ch: tuple[int, ...]):
        super().__init__()
        self.nc = nc
        self.no = nc + REG_MAX * 4
        c2, c3 = max(16, ch[0] // 4, REG_MAX * 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * REG_MAX, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(REG_MAX)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        x = [torch.cat((self.cv2[i](xi), self.cv3[i](xi)), 1) for i, xi in enumerate(x)]
        b = x[0].shape[0]
        x_cat = torch.cat([xi.view(b, self.no, -1) for xi in x], 2)
        box, cls = x_cat.split((REG_MAX * 4, self.nc), 1)
        anchors, strides = _anchors(x)
        dbox = _dist2bbox(self.dfl(box), anchors.transpose(0, 1).unsqueeze(0)) * strides.transpose(0, 1)
        return torch.cat((dbox, cls.sigmoid()), 1)


class Proto(nn.Module):
    """Mask prototypes: Conv 3x3, ConvTranspose 2x2 stride 2, Conv 3x3, Conv 1x1 -> ``nm`` maps."""

    def __init__(self, c1: int, c_: int, c2: int):
        super().__init__()
        self.cv1 = Conv(c1, c_, 3)
        self.upsample = nn.ConvTranspose2d(c_, c_, 2, 2, 0, bias=True)
        self.cv2 = Conv(c_, c_, 3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x):
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


class Segment(Detect):
    def __init__(self, nc: int, nm: int, npr: int, ch: tuple[int, ...]):
        super().__init__(nc, ch)
        self.nm = nm
        self.proto = Proto(ch[0], npr, nm)
        c4 = max(ch[0] // 4, nm)
        self.cv4 = nn.ModuleList(nn.Sequential(Conv(x, c4, 3), Conv(c4, c4, 3), nn.Conv2d(c4, nm, 1)) for x in ch)

    def forward(self, x: list[torch.Tensor]):
        p = self.proto(x[0])
        b = p.shape[0]
        mc = torch.cat([self.cv4[i](x[i]).view(b, self.nm, -1) for i in range(len(x))], 2)
        return torch.cat((Detect.forward(self, x), mc), 1), p


class YOLO(nn.Module):
    """YOLOv8 backbone (Conv/C2f/SPPF) + PAN neck (Upsample/Concat/C2f) + Detect or Segment head."""

    def __init__(self, *, num_classes: int = 80, in_channels: int = 3, width: float = 0.25, depth: float = 0.33,
                 task: str = "detect", nm: int = 32, npr: int = 256):
        super().__init__()
        w = lambda c: _ch(c, width)  # noqa: E731
        d = lambda n: _depth(n, depth)  # noqa: E731
        self.b0 = Conv(in_channels, w(64), 3, 2)
        self.b1 = Conv(w(64), w(128), 3, 2)
        self.b2 = C2f(w(128), w(128), d(3), True)
        self.b3 = Conv(w(128), w(256), 3, 2)
        self.b4 = C2f(w(256), w(256), d(6), True)  # P3
        self.b5 = Conv(w(256), w(512), 3, 2)
        self.b6 = C2f(w(512), w(512), d(6), True)  # P4
        self.b7 = Conv(w(512), w(1024), 3, 2)
        self.b8 = C2f(w(1024), w(1024), d(3), True)
        self.b9 = SPPF(w(1024), w(1024), 5)  # P5
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h12 = C2f(w(1024) + w(512), w(512), d(3))
        self.h15 = C2f(w(512) + w(256), w(256), d(3))  # P3 out
        self.h16 = Conv(w(256), w(256), 3, 2)
        self.h18 = C2f(w(256) + w(512), w(512), d(3))  # P4 out
        self.h19 = Conv(w(512), w(512), 3, 2)
        self.h21 = C2f(w(512) + w(1024), w(1024), d(3))  # P5 out
        ch = (w(256), w(512), w(1024))
        self.task = task
        self.head = Detect(num_classes, ch) if task == "detect" else Segment(num_classes, nm, _ch(npr, width), ch)

    def forward(self, x):
        x = self.b2(self.b1(self.b0(x)))
        p3 = self.b4(self.b3(x))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h12 = self.h12(torch.cat((self.up(p5), p4), 1))
        h15 = self.h15(torch.cat((self.up(h12), p3), 1))
        h18 = self.h18(torch.cat((self.h16(h15), h12), 1))
        h21 = self.h21(torch.cat((self.h19(h18), p5), 1))
        return self.head([h15, h18, h21])


def yolo_detector(*, num_classes: int = 80, in_channels: int = 3, width: float = 0.25) -> nn.Module:
    """YOLOv8n-like detector; output ``(N, 4+num_classes, A)`` with ``A = sum(H*W/s**2 for s in 8, 16, 32)``."""
    return YOLO(num_classes=num_classes, in_channels=in_channels, width=width, task="detect")


def yolo_segmenter(*, num_classes: int = 80, in_channels: int = 3, width: float = 0.25) -> nn.Module:
    """YOLOv8n-seg-like: outputs ``(N, 4+num_classes+32, A)`` and prototypes ``(N, 32, H/4, W/4)``."""
    return YOLO(num_classes=num_classes, in_channels=in_channels, width=width, task="segment")


def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Kaiming-normal conv weights (fan-in, ReLU gain), in place; returns ``model``.

    torch's default init shrinks activations by ~3x per layer, so a 60-conv random net
    outputs (almost) constants and equivalence checks lose their power; trained nets
    keep activations O(1), as this init does. BatchNorm is left as it is (default
    statistics keep the all-zero folded biases exporters deduplicate)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.requires_grad:
                fan_in = m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.weight.shape[0] * m.weight[0, 0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
    return model


def head_final_convs(model: YOLO) -> list[nn.Conv2d]:
    """The convs whose outputs are the model's outputs (bias-carrying last convs of every head
    branch, the DFL conv, the proto's last conv): their channels are fixed by the output format."""
    head = model.head
    convs = [seq[-1] for seq in (*head.cv2, *head.cv3)] + [head.dfl.conv]
    if isinstance(head, Segment):
        convs += [seq[-1] for seq in head.cv4] + [head.proto.cv3.conv]
    return convs


def head_final_weights(model: YOLO) -> list:
    """Weights (numpy) of :func:`head_final_convs` as an exporter writes them: BatchNorm folded
    where the conv has one (``w * gamma / sqrt(var + eps)`` per output channel)."""
    bns = {id(m.conv): m.bn for m in model.modules() if isinstance(m, Conv)}
    out = []
    with torch.no_grad():
        for c in head_final_convs(model):
            w = c.weight.detach().clone()
            bn = bns.get(id(c))
            if bn is not None:
                w = w * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)
            out.append(w.numpy())
    return out


def export_yolo(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    imgsz: int | tuple[int, int] = 64,
    exporter: str = "legacy",
    dynamic: bool = False,
    simplify: bool | str = False,
    opset: int | None = None,
) -> Path:
    """Export like Ultralytics' ``model.export(format="onnx")``: input ``images``, outputs
    ``output0`` (``output1`` for segmentation), ``metadata_props`` (``imgsz`` as ``'[64, 64]'``,
    ``stride``, ``task``, ``batch``, ``names``). ``dynamic=False``: fixed batch 1 (Ultralytics'
    default); ``dynamic=True``: symbolic batch, height and width. ``simplify``: ``True`` or
    ``"onnxslim"`` runs onnxslim (as Ultralytics does), ``"onnxsim"`` runs onnx-simplifier.

    ``opset`` defaults to 17 for the legacy exporter and 18 for dynamo: asked for 17 with
    dynamic H, W, torch 2.13's dynamo exporter writes an opset-17 ``Split`` with the
    opset-18 ``num_outputs`` attribute, which ONNX Runtime refuses to load.
    """
    import onnx

    from models.export import _quiet

    path = Path(path)
    if opset is None:
        opset = 18 if exporter == "dynamo" else 17
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    model = model.eval()
    seg = getattr(model, "task", "detect") == "segment"
    outputs = ["output0", "output1"] if seg else ["output0"]
    with _quiet(), torch.no_grad():
        if exporter == "legacy":
            axes = None
            if dynamic:
                axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}}
                if seg:
                    axes["output1"] = {0: "batch", 2: "mask_height", 3: "mask_width"}
            torch.onnx.export(model, (torch.randn(1, 3, h, w),), str(path), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
        elif exporter == "dynamo":
            shapes = None
            x = torch.randn(1, 3, h, w)
            if dynamic:
                # the example batch must lie inside the Dim range (batch 1 would be specialised)
                x = torch.randn(2, 3, h, w)
                hh = torch.export.Dim("hh", min=1, max=64)
                ww = torch.export.Dim("ww", min=1, max=64)
                shapes = ({0: torch.export.Dim("batch", min=2, max=1024), 2: 32 * hh, 3: 32 * ww},)
            prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["images"],
                                     output_names=outputs, dynamic_shapes=shapes, optimize=True, verbose=False, report=False)
            prog.save(str(path))
        else:
            raise ValueError(f"exporter must be 'legacy' or 'dynamo', got {exporter!r}")
    m = onnx.load(str(path))
    if simplify in (True, "onnxslim"):
        import onnxslim

        with _quiet():
            m = onnxslim.slim(m)
    elif simplify == "onnxsim":
        import onnxsim

        with _quiet():
            m, ok = onnxsim.simplify(m)
        if not ok:
            raise RuntimeError("onnxsim could not validate the simplified model")
    elif simplify:
        raise ValueError(f"simplify must be False, True/'onnxslim' or 'onnxsim', got {simplify!r}")
    nc = model.head.nc
    meta = {
        "description": f"onnxprune YOLOv8-style {'segmenter' if seg else 'detector'} look-alike",
        "author": "onnxprune tests",
        "stride": str(max(STRIDES)),
        "task": "segment" if seg else "detect",
        "batch": "1",
        "imgsz": f"[{h}, {w}]",
        "names": str({i: f"class{i}" for i in range(nc)}),
    }
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))
    return path
