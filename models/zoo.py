"""Reference torch architectures for tests and benchmarks.

Every constructor takes keyword-only ``num_classes=10, in_channels=3,
width=1.0``; ``width`` multiplies every channel count (rounded, at least 1;
grouped convolutions round to a multiple of their group count).

``ZOO[name] = (constructor, default_input_shape)`` with the batch axis
included, e.g. ``ZOO["vgg16_bn"] == (vgg16_bn, (1, 3, 32, 32))``.

BatchNorm layers start with the identity statistics torch gives them; call
:func:`randomize_bn` in tests so exported graphs have non-trivial folded
weights and outputs do not vanish::

    model = randomize_bn(ZOO["resnet20"][0](), seed=0).eval()
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZOO", "build", "randomize_bn"]


def _ch(c: int, width: float, multiple: int = 1) -> int:
    """``c * width`` rounded to a positive multiple of ``multiple``."""
    v = max(1, int(round(c * width / multiple))) * multiple
    return v


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running stats and affine params (in place); returns ``model``.

    mean ~ U(-0.5, 0.5), var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ U(-0.25, 0.25).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.5)
    return model


def _cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()
    )


# --------------------------------------------------------------------------- VGG
_VGG_CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR VGG: Conv3x3(pad 1)+BN+ReLU stacks, MaxPool 2x2, flatten, one Linear head."""

    def __init__(self, cfg: list, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = _ch(v, width)
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg11_bn(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return VGG(_VGG_CFG["vgg11"], num_classes=num_classes, in_channels=in_channels, width=width)


def vgg16_bn(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return VGG(_VGG_CFG["vgg16"], num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- CIFAR ResNet
class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample ``x[:, :, ::2, ::2]`` and zero-pad the channel axis."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.lo = (cout - cin) // 2
        self.hi = cout - cin - self.lo

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.lo, self.hi))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _PadShortcut(cin, cout) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: 16/32/64 channels, BasicBlocks, option-A shortcuts, GAP + Linear."""

    def __init__(self, depth: int, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        n = (depth - 2) // 6
        widths = [_ch(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks = []
        c = widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(c, w, stride))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet20(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels, width=width)


def resnet56(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return CifarResNet(56, num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- ResNet-50 (ImageNet)
class Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck: stride on the 3x3 conv, projection shortcut when shapes change."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c = _ch(64, width)
        self.conv1 = nn.Conv2d(in_channels, c, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            p = _ch(planes, width)
            layer = []
            for i in range(blocks):
                layer.append(Bottleneck(c, p, stride if i == 0 else 1))
                c = p * Bottleneck.expansion
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(*, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """ImageNet ResNet-50 (default 1000 classes, input 3x224x224)."""
    return ResNet50(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_cbr(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            _cbr(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetV2Small(nn.Module):
    # (expansion, channels, repeats, first stride)
    CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2))

    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c = _ch(32, width)
        layers: list[nn.Module] = [_cbr(in_channels, c, 3, 1, act=nn.ReLU6)]
        for t, ch, n, s in self.CFG:
            out = _ch(ch, width)
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        last = _ch(256, width)
        layers.append(_cbr(c, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.mean((2, 3)))


def mobilenetv2_small(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return MobileNetV2Small(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- DenseNet
class _DenseLayer(nn.Module):
    """BN -> ReLU -> Conv1x1 (bottleneck) -> BN -> ReLU -> Conv3x3, output concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        mid = 4 * growth
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2))


class DenseNetSmall(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, width: float, growth: int = 12, layers=(3, 3, 3)):
        super().__init__()
        k = _ch(growth, width)
        c = 2 * k
        mods: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)]
        for b, n in enumerate(layers):
            for _ in range(n):
                mods.append(_DenseLayer(c, k))
                c += k
            if b != len(layers) - 1:
                out = c // 2
                mods.append(_Transition(c, out))
                c = out
        mods += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.fc(torch.flatten(x, 1))


def densenet_small(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return DenseNetSmall(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- SE net
class SqueezeExcite(nn.Module):
    """GAP -> Conv1x1 -> ReLU -> Conv1x1 -> Sigmoid -> Mul with the input."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        mid = max(1, c // reduction)
        self.fc1 = nn.Conv2d(c, mid, 1)
        self.fc2 = nn.Conv2d(mid, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class _SEBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _cbr(cin, cout, 3, stride, act=nn.SiLU)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.se = SqueezeExcite(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.se(self.conv2(self.conv1(x)))
        return F.silu(out + (x if self.proj is None else self.proj(x)))


class SENet(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c = _ch(16, width)
        mods: list[nn.Module] = [_cbr(in_channels, c, 3, 1, act=nn.SiLU)]
        for ch, s in ((16, 1), (32, 2), (64, 2)):
            out = _ch(ch, width)
            mods.append(_SEBlock(c, out, s))
            c = out
        self.features = nn.Sequential(*mods)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def se_net(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return SENet(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- small test nets
class _ResNeXtBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            _cbr(cin, mid, 1),
            _cbr(mid, mid, 3, stride, groups=groups),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + (x if self.proj is None else self.proj(x)))


class ResNeXtSmall(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, width: float, groups: int = 4):
        super().__init__()
        c = _ch(16, width)
        mods: list[nn.Module] = [_cbr(in_channels, c, 3)]
        for mid, out, s in ((16, 32, 1), (32, 64, 2), (32, 64, 1)):
            m, o = _ch(mid, width, groups), _ch(out, width)
            mods.append(_ResNeXtBlock(c, m, o, s, groups))
            c = o
        self.features = nn.Sequential(*mods)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def resnext_small(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Grouped 3x3 convs (groups=4) in bottleneck blocks with projection shortcuts."""
    return ResNeXtSmall(num_classes=num_classes, in_channels=in_channels, width=width)


class _Inception(nn.Module):
    """Parallel 1x1 / 1x1->3x3 / 1x1->5x5 / maxpool->1x1 branches concatenated on channels."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.b1 = _cbr(cin, c1, 1)
        self.b3 = nn.Sequential(_cbr(cin, c3r, 1), _cbr(c3r, c3, 3))
        self.b5 = nn.Sequential(_cbr(cin, c5r, 1), _cbr(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), _cbr(cin, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class InceptionSmall(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        w = lambda c: _ch(c, width)  # noqa: E731
        c = w(32)
        self.stem = nn.Sequential(_cbr(in_channels, c, 3), nn.MaxPool2d(2, 2))
        self.inc1 = _Inception(c, w(16), w(16), w(24), w(8), w(8), w(8))
        c = self.inc1.out_channels
        self.inc2 = _Inception(c, w(24), w(16), w(32), w(8), w(16), w(16))
        c = self.inc2.out_channels
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.inc2(self.inc1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def inception_small(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return InceptionSmall(num_classes=num_classes, in_channels=in_channels, width=width)


class FCHeadNet(nn.Module):
    """Convs, then flatten (not GAP) of a C x 8 x 8 map -> Linear -> ReLU -> Linear -> Linear."""

    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c1, c2 = _ch(16, width), _ch(32, width)
        self.features = nn.Sequential(
            _cbr(in_channels, c1, 3), nn.MaxPool2d(2, 2), _cbr(c1, c2, 3), nn.MaxPool2d(2, 2)
        )
        h1, h2 = _ch(64, width), _ch(32, width)
        self.fc1 = nn.Linear(c2 * 8 * 8, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc3(self.fc2(F.relu(self.fc1(x))))


def fc_head_net(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Expects 32x32 inputs (the flatten size is fixed)."""
    return FCHeadNet(num_classes=num_classes, in_channels=in_channels, width=width)


class SegDecoder(nn.Module):
    """U-Net-like: strided encoder, ConvTranspose + Upsample/interpolate decoder, Concat skips."""

    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c1, c2, c3 = _ch(16, width), _ch(32, width), _ch(64, width)
        self.enc1 = _cbr(in_channels, c1, 3)
        self.enc2 = _cbr(c1, c2, 3, 2)
        self.enc3 = _cbr(c2, c3, 3, 2)
        self.bottleneck = _cbr(c3, c3, 3)
        self.up3 = nn.ConvTranspose2d(c3, c2, 2, 2)
        self.dec2 = _cbr(c2 + c2, c2, 3)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1 = _cbr(c2 + c1, c1, 3)
        self.dec0 = _cbr(c1, c1, 3)
        self.head = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.bottleneck(self.enc3(e2))
        d2 = self.dec2(torch.cat([self.up3(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up2(d2), e1], 1))
        # a second path through F.interpolate: down then back up (bilinear)
        d0 = self.dec0(F.interpolate(F.max_pool2d(d1, 2), scale_factor=2, mode="bilinear", align_corners=False))
        return self.head(d0 + d1)


def seg_decoder(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Outputs ``num_classes`` maps at input resolution (H and W divisible by 4)."""
    return SegDecoder(num_classes=num_classes, in_channels=in_channels, width=width)


class SplitNet(nn.Module):
    """``torch.chunk`` (equal halves) and ``torch.split`` (uneven) on the channel axis, re-concatenated."""

    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c = _ch(32, width, 2)
        self.stem = _cbr(in_channels, c, 3)
        h = c // 2
        self.a = _cbr(h, h, 3)
        self.b = nn.Sequential(_cbr(h, h, 1), _cbr(h, h, 3))
        self.mid = _cbr(c, c, 3, 2)
        self.s1 = max(1, c // 4)
        self.c = _cbr(self.s1, self.s1, 3)
        self.d = _cbr(c - self.s1, c - self.s1, 3)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        xa, xb = torch.chunk(x, 2, dim=1)
        x = self.mid(torch.cat([self.a(xa), self.b(xb)], 1))
        xc, xd = torch.split(x, [self.s1, x.shape[1] - self.s1], dim=1)
        x = torch.cat([self.c(xc), self.d(xd)], 1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def split_net(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return SplitNet(num_classes=num_classes, in_channels=in_channels, width=width)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet shuffle: reshape to (N, g, C/g, H, W), swap axes 1 and 2, reshape back."""
    n, c, h, w = x.shape
    x = x.reshape(n, groups, c // groups, h, w).transpose(1, 2)
    return x.reshape(n, c, h, w)


class ShuffleNetBlock(nn.Module):
    """Grouped 1x1 -> channel shuffle -> depthwise 3x3 -> grouped 1x1, residual; shuffle must block pruning."""

    def __init__(self, *, num_classes: int, in_channels: int, width: float, groups: int = 4):
        super().__init__()
        self.groups = groups
        c = _ch(32, width, groups)
        self.stem = _cbr(in_channels, c, 3, 2)
        self.gconv1 = _cbr(c, c, 1, groups=groups)
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.gconv2 = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups, bias=False), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        out = channel_shuffle(self.gconv1(x), self.groups)
        out = self.gconv2(self.dw(out))
        x = F.relu(x + out)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def shuffle_net_block(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return ShuffleNetBlock(num_classes=num_classes, in_channels=in_channels, width=width)


class PlainCNN(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, width: float):
        super().__init__()
        c1, c2, c3 = _ch(8, width), _ch(16, width), _ch(16, width)
        self.features = nn.Sequential(_cbr(in_channels, c1, 3), _cbr(c1, c2, 3, 2), _cbr(c2, c3, 3, 2))
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def plain_cnn(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Tiny conv-bn-relu x3 + GAP + Linear (default input 1x3x16x16)."""
    return PlainCNN(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- registry
_CIFAR = (1, 3, 32, 32)
ZOO: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "vgg11_bn": (vgg11_bn, _CIFAR),
    "vgg16_bn": (vgg16_bn, _CIFAR),
    "resnet20": (resnet20, _CIFAR),
    "resnet56": (resnet56, _CIFAR),
    "resnet50": (resnet50, (1, 3, 224, 224)),
    "mobilenetv2_small": (mobilenetv2_small, _CIFAR),
    "densenet_small": (densenet_small, _CIFAR),
    "se_net": (se_net, _CIFAR),
    "resnext_small": (resnext_small, _CIFAR),
    "inception_small": (inception_small, _CIFAR),
    "fc_head_net": (fc_head_net, _CIFAR),
    "seg_decoder": (seg_decoder, _CIFAR),
    "split_net": (split_net, _CIFAR),
    "shuffle_net_block": (shuffle_net_block, _CIFAR),
    "plain_cnn": (plain_cnn, (1, 3, 16, 16)),
}


def build(name: str, *, seed: int | None = 0, **kwargs) -> tuple[nn.Module, tuple[int, ...]]:
    """``(model in eval mode, default input shape)``; with ``seed`` set, weights are seeded
    and BN stats randomized via :func:`randomize_bn`. ``kwargs`` go to the constructor.

    Example: ``model, shape = build("resnet20", width=0.5)``.
    """
    if name not in ZOO:
        raise KeyError(f"unknown zoo model '{name}'; known: {', '.join(ZOO)}")
    ctor, shape = ZOO[name]
    if seed is not None:
        torch.manual_seed(seed)
    model = ctor(**kwargs)
    if seed is not None:
        randomize_bn(model, seed)
    if "in_channels" in kwargs:
        shape = (shape[0], kwargs["in_channels"], *shape[2:])
    return model.eval(), shape
