"""Edits the analysis records and the rewrite applies.

Each edit names the tensor or node it changes and, for every position along
the pruned axis, the *atom* (channel identity) that position carries. At
rewrite time ``kept(atoms) -> bool mask`` says which positions survive.

Examples: a Conv weight ``[Cout, Cin, kh, kw]`` gets ``SliceTensor(axis=0)``
with its output atoms and ``SliceTensor(axis=1)`` with its input atoms; a
Flatten->Gemm weight ``[K, M]`` with ``K = C*H*W`` gets ``SliceTensor(axis=0)``
whose atoms repeat each channel's atom ``H*W`` times (channel ``c`` owns rows
``c*H*W ... (c+1)*H*W-1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Kept = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class SliceTensor:
    """Keep the positions of constant ``tensor`` along ``axis`` whose atom is kept."""

    tensor: str
    axis: int
    atoms: np.ndarray
    node: str

    def key(self) -> tuple:
        return (self.axis, self.atoms.tobytes())


@dataclass(frozen=True, eq=False)
class SetGroup:
    """Depthwise Conv: ``group`` becomes the number of kept input channels."""

    node: str
    atoms: np.ndarray


@dataclass(frozen=True, eq=False)
class SplitSizes:
    """Split on the channel axis: each output's size becomes its kept count."""

    node: str
    parts: tuple  # tuple[np.ndarray, ...], atoms of each output


@dataclass(frozen=True, eq=False)
class SliceBounds:
    """Slice on the channel axis: new start/end count kept positions before them.

    ``position`` is the index of the channel axis inside the node's ``axes``.
    """

    node: str
    position: int
    atoms: np.ndarray  # atoms of the input along the channel axis
    start: int
    end: int
    starts: tuple = ()  # full starts/ends vectors (folded when computed at run time)
    ends: tuple = ()


@dataclass(frozen=True, eq=False)
class PadChannels:
    """Pad on the channel axis: before/after pad widths become their kept counts."""

    node: str
    axis: int
    rank: int
    before: np.ndarray
    after: np.ndarray
    pads: tuple = ()  # the full pads vector (folded when computed at run time)


@dataclass(frozen=True, eq=False)
class ShapeEntry:
    """A literal in a constant shape vector (Reshape target, Resize sizes, Expand shape).

    The value becomes ``kept(atoms).sum() * factor``.
    """

    tensor: str
    position: int
    atoms: np.ndarray
    factor: int
    node: str


Edit = SliceTensor | SetGroup | SplitSizes | SliceBounds | PadChannels | ShapeEntry


@dataclass(frozen=True, eq=False)
class ComputeMap:
    """Channel atoms of one compute node, for MAC prediction.

    ``macs = spatial * kernel * kept(out_atoms) * kept(in_atoms)`` where
    ``in_atoms`` are the input positions of *one* group (all inputs when
    ``group == 1``); for depthwise convs ``in_atoms`` is ``None`` and the
    per-group input count is ``in_fixed`` (1).
    """

    node: str
    spatial: int
    kernel: int
    out_atoms: np.ndarray
    in_atoms: np.ndarray | None
    in_fixed: int = 1
