"""More reference architectures (look-alikes of torchvision/timm models), for coverage benchmarks.

Same conventions as :mod:`models.zoo`: keyword-only ``num_classes=10,
in_channels=3, width=1.0`` constructors, ``EXTRA[name] = (constructor,
default_input_shape)``. :func:`build` builds any model of ``models.zoo.ZOO``,
of ``EXTRA`` or the YOLO look-alikes of :mod:`models.detector` (``ALL``).

* ``mobilenetv3_small``: inverted residuals with hardswish, squeeze-excite
  gated by hardsigmoid, 3x3 and 5x5 depthwise convs;
* ``efficientnet_small``: MBConv blocks (expand, depthwise, SE with SiLU,
  project), SiLU everywhere, residuals;
* ``convnext_small``: patchify stem, blocks of depthwise 7x7 -> LayerNorm over
  channels (channels-last) -> Linear x4 -> GELU -> Linear (``MatMul``) ->
  layer scale -> residual; downsampling with a channels-first LayerNorm
  written out (mean/var over axis 1) and a 2x2 stride-2 conv;
* ``fcn_small``: FCN-style segmentation: strided backbone, 3x3 head, 1x1
  classifier, bilinear upsampling to the input size;
* ``vit_small``: patch-embedding conv, class token, position embedding, two
  pre-norm transformer blocks (qkv Linear, multi-head attention with
  Reshape/Transpose/MatMul/Softmax, MLP), class-token head.

Example::

    from models.zoo_extra import build
    model, shape = build("convnext_small", seed=0, randomize=False)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.detector import yolo_detector, yolo_segmenter
from models.zoo import ZOO, _ch, randomize_bn

__all__ = ["EXTRA", "ALL", "build"]


def _make_div(v: float, d: int = 8) -> int:
    return max(d, int(v + d / 2) // d * d)


# --------------------------------------------------------------------------- MobileNetV3
class _SE(nn.Module):
    """Squeeze-excite: GAP -> 1x1 conv -> act -> 1x1 conv -> gate -> scale the input."""

    def __init__(self, c: int, mid: int, act: type[nn.Module] = nn.ReLU, gate: type[nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(c, mid, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(mid, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


def _cba(cin, cout, k=1, s=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class _V3Block(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, s):
        super().__init__()
        layers = []
        if exp != cin:
            layers.append(_cba(cin, exp, 1, act=act))
        layers.append(_cba(exp, exp, k, s, groups=exp, act=act))
        if se:
            layers.append(_SE(exp, _make_div(exp // 4)))
        layers.append(_cba(exp, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y


class MobileNetV3Small(nn.Module):
    # kernel, expansion, out, SE, activation, stride (torchvision mobilenet_v3_small, first 8 blocks)
    CFG = [
        (3, 16, 16, True, nn.ReLU, 2),
        (3, 72, 24, False, nn.ReLU, 2),
        (3, 88, 24, False, nn.ReLU, 1),
        (5, 96, 40, True, nn.Hardswish, 2),
        (5, 240, 40, True, nn.Hardswish, 1),
        (5, 120, 48, True, nn.Hardswish, 1),
        (5, 144, 48, True, nn.Hardswish, 1),
    ]

    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c = _make_div(16 * width)
        layers: list[nn.Module] = [_cba(in_channels, c, 3, 2, act=nn.Hardswish)]
        for k, e, o, se, act, s in self.CFG:
            e, o = _make_div(e * width), _make_div(o * width)
            layers.append(_V3Block(c, k, e, o, se, act, s))
            c = o
        last = 6 * c
        layers.append(_cba(c, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(last, 256), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def mobilenetv3_small(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return MobileNetV3Small(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- EfficientNet
class _MBConv(nn.Module):
    def __init__(self, cin, cout, k, s, expand):
        super().__init__()
        mid = cin * expand
        layers = []
        if expand != 1:
            layers.append(_cba(cin, mid, 1, act=nn.SiLU))
        layers += [_cba(mid, mid, k, s, groups=mid, act=nn.SiLU), _SE(mid, max(1, cin // 4), act=nn.SiLU, gate=nn.Sigmoid), _cba(mid, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y


class EfficientNetSmall(nn.Module):
    # expansion, channels, repeats, stride, kernel (EfficientNet-B0, first 5 stages)
    CFG = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 2, 2, 3), (6, 112, 1, 1, 5)]

    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c = _make_div(32 * width)
        layers: list[nn.Module] = [_cba(in_channels, c, 3, 2, act=nn.SiLU)]
        for t, ch, n, s, k in self.CFG:
            out = _make_div(ch * width)
            for i in range(n):
                layers.append(_MBConv(c, out, k, s if i == 0 else 1, t))
                c = out
        last = _make_div(320 * width)
        layers.append(_cba(c, last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def efficientnet_small(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return EfficientNetSmall(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- ConvNeXt
class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor, written out (as ConvNeXt's channels_first LN)."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _ConvNeXtBlock(nn.Module):
    def __init__(self, c: int, scale: float = 1e-6):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(scale * torch.ones(c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtSmall(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, width: float, depths=(2, 2, 2), dims=(48, 96, 192)):
        super().__init__()
        dims = [_ch(d, width) for d in dims]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, 4), LayerNorm2d(dims[0]))
        stages = []
        for i, (n, d) in enumerate(zip(depths, dims)):
            mods: list[nn.Module] = []
            if i > 0:
                mods += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
            # layer scale 1.0 (a trained model's scale is far from the 1e-6 init, which would hide the blocks)
            mods += [_ConvNeXtBlock(d, scale=1.0) for _ in range(n)]
            stages.append(nn.Sequential(*mods))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean((2, 3))))


def convnext_small(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return ConvNeXtSmall(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- FCN
class FCNSmall(nn.Module):
    """Backbone to stride 8, FCN head (3x3 conv-BN-ReLU, dropout, 1x1 classifier), bilinear upsampling to the input size."""

    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c1, c2, c3, c4 = (_ch(c, width) for c in (32, 64, 128, 256))
        self.backbone = nn.Sequential(
            _cba(in_channels, c1, 3, 2), _cba(c1, c1, 3),
            _cba(c1, c2, 3, 2), _cba(c2, c2, 3),
            _cba(c2, c3, 3, 2), _cba(c3, c4, 3),
        )
        mid = c4 // 4
        self.head = nn.Sequential(_cba(c4, mid, 3), nn.Dropout(0.1), nn.Conv2d(mid, num_classes, 1))

    def forward(self, x):
        size = x.shape[-2:]
        y = self.head(self.backbone(x))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


def fcn_small(*, num_classes: int = 21, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return FCNSmall(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- ViT
class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(y)


class _ViTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.n1 = nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.n2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class ViTSmall(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, width: float, patch: int = 4, depth: int = 2, heads: int = 4, img: int = 32):
        super().__init__()
        d = _ch(96, width, heads)
        self.embed = nn.Conv2d(in_channels, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[_ViTBlock(d, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_small(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Expects 32x32 inputs (the position embedding is fixed)."""
    return ViTSmall(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- registry
_CIFAR = (1, 3, 32, 32)
EXTRA: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "yolo_detector": (yolo_detector, (1, 3, 64, 64)),
    "yolo_segmenter": (yolo_segmenter, (1, 3, 64, 64)),
    "mobilenetv3_small": (mobilenetv3_small, (1, 3, 64, 64)),
    "efficientnet_small": (efficientnet_small, (1, 3, 64, 64)),
    "convnext_small": (convnext_small, (1, 3, 64, 64)),
    "fcn_small": (fcn_small, (1, 3, 64, 64)),
    "vit_small": (vit_small, _CIFAR),
}
ALL = {**ZOO, **EXTRA}


def build(name: str, *, seed: int = 0, randomize: bool = False, **kwargs) -> tuple[nn.Module, tuple[int, ...]]:
    """``(model in eval mode, default input shape)`` for any name in ``ALL``; weights seeded.

    BatchNorm keeps its default statistics unless ``randomize`` (see
    :func:`models.zoo.randomize_bn`): default statistics are what random-init
    exports (and many trained ones, for some constants) look like.
    """
    if name not in ALL:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(ALL)}")
    ctor, shape = ALL[name]
    torch.manual_seed(seed)
    model = ctor(**kwargs)
    if randomize:
        randomize_bn(model, seed)
    if "in_channels" in kwargs:
        shape = (shape[0], kwargs["in_channels"], *shape[2:])
    return model.eval(), shape


# --------------------------------------------------------------------------- ResNet-18 and VGG-16 (224) look-alikes
# (appended for benchmarks/latency_target.py; registered in EXTRA/ALL below)
class _BasicBlock(nn.Module):
    """torchvision's BasicBlock: 3x3-3x3 with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.short = None if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + (x if self.short is None else self.short(x)))


class ResNet18(nn.Module):
    """ImageNet ResNet-18: 7x7/2 stem, 3x3/2 max pool, stages of 2 BasicBlocks (64..512), GAP, FC."""

    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c = _ch(64, width)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        for i, planes in enumerate((64, 128, 256, 512)):
            out = _ch(planes, width)
            layers += [_BasicBlock(c, out, 1 if i == 0 else 2), _BasicBlock(out, out, 1)]
            c = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def resnet18(*, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return ResNet18(num_classes=num_classes, in_channels=in_channels, width=width)


class VGG16ImageNet(nn.Module):
    """ImageNet VGG-16: the 13 convs of CIFAR VGG-16, then Flatten -> FC 4096 -> FC 4096 -> FC classes
    (FC widths scale with ``width``; ``img`` is the input size the first FC is built for)."""

    def __init__(self, *, num_classes: int, in_channels: int, width: float, img: int = 224):
        super().__init__()
        from models.zoo import _VGG_CFG

        layers: list[nn.Module] = []
        c = in_channels
        for v in _VGG_CFG["vgg16"]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = _ch(v, width)
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        fc = _ch(4096, width)
        side = img // 32
        self.classifier = nn.Sequential(nn.Linear(c * side * side, fc), nn.ReLU(inplace=True), nn.Linear(fc, fc), nn.ReLU(inplace=True), nn.Linear(fc, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_224(*, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, img: int = 224) -> nn.Module:
    return VGG16ImageNet(num_classes=num_classes, in_channels=in_channels, width=width, img=img)


EXTRA.update({"resnet18": (resnet18, (1, 3, 224, 224)), "vgg16_224": (vgg16_224, (1, 3, 224, 224))})
ALL.update(EXTRA)
