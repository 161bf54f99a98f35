"""Pruning plans: which channels each group keeps, as inspectable JSON.

A plan lists, per group, its producer nodes, its channel count and the kept
channel indices in the original numbering (the channel index in the group's
first producer). ``--save-plan`` writes it; ``--plan`` re-applies it, after
checking it matches the model.

Example::

    plan = PruningPlan.from_mask(cg, mask)
    plan.save("plan.json")
    mask = PruningPlan.load("plan.json").to_mask(cg)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import PlanError
from .graph import write_text_atomic
from .groups import ChannelGraph

PLAN_VERSION = 1


@dataclass(frozen=True)
class GroupPlan:
    """One pruned group. ``kept`` is in the numbering of the group's first producer.

    ``kept_by_producer[node]`` / ``removed_by_producer[node]`` list, for every
    node that produces the group's channels, the output channels kept and
    removed in *that node's own* numbering: a producer behind a ``Concat`` or
    ``Split`` has its own indices (the segment offset already applied), and a
    grouped conv lists every channel of each unit (one unit spans the same
    position in every group). With these a plan can be checked or applied
    without onnxprune's analysis: slice each producer's output channels
    (weight axis 0 of a Conv/Gemm), and the matching input channels of its
    consumers.
    """

    id: str
    producers: tuple[str, ...]
    channels: int
    kept: tuple[int, ...]
    kept_by_producer: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    removed_by_producer: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class PruningPlan:
    groups: tuple[GroupPlan, ...]
    model_signature: str = ""

    @staticmethod
    def signature(cg: ChannelGraph) -> str:
        """Hash of the group structure (producers and channel counts)."""
        text = ";".join(f"{','.join(g.producers)}:{g.channels}" for g in cg.groups)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_mask(cls, cg: ChannelGraph, unit_kept: np.ndarray) -> "PruningPlan":
        groups = []
        for g in cg.groups:
            units = np.array(g.units)
            kept = units[unit_kept[units]]
            if len(kept) == g.channels:
                continue
            pos = {u: cid for u, cid in zip(g.units, g.channel_ids)}
            by_kept, by_removed = producer_channels(cg, g, unit_kept)
            groups.append(GroupPlan(g.id, g.producers, g.channels, tuple(sorted(int(pos[u]) for u in kept.tolist())), by_kept, by_removed))
        return cls(tuple(groups), cls.signature(cg))

    def to_mask(self, cg: ChannelGraph) -> np.ndarray:
        """Unit mask for ``cg``; raises :class:`PlanError` naming the group when the plan does not fit."""
        mask = cg.full_mask()
        by_producers = {g.producers: g for g in cg.groups}
        seen = set()
        for gp in self.groups:
            g = by_producers.get(tuple(gp.producers))
            if g is None:
                raise PlanError(
                    f"plan group '{gp.id}' names producers {list(gp.producers)} that form no channel group in this model",
                    fix="re-create the plan for this model with --save-plan (it was made for another model)",
                    node=gp.producers[0] if gp.producers else None,
                )
            if g.id in seen:
                raise PlanError(f"plan lists group '{gp.id}' ({gp.producers[0]}) twice", fix="keep one entry per group")
            seen.add(g.id)
            if gp.channels != g.channels:
                raise PlanError(
                    f"plan group '{gp.id}' ({gp.producers[0]}) says {gp.channels} channels but the model has {g.channels}",
                    fix="re-create the plan for this model with --save-plan",
                    node=gp.producers[0],
                )
            if not g.prunable:
                raise PlanError(
                    f"plan prunes group '{gp.id}' ({gp.producers[0]}), which cannot be pruned: {g.blocked_reason}",
                    fix="remove this group from the plan",
                    node=gp.producers[0],
                )
            kept = list(gp.kept)
            if not kept:
                raise PlanError(f"plan group '{gp.id}' ({gp.producers[0]}) keeps no channels", fix="keep at least one channel")
            if len(set(kept)) != len(kept):
                raise PlanError(f"plan group '{gp.id}' ({gp.producers[0]}) lists a kept channel twice", fix="list each channel once")
            pos = {cid: u for u, cid in zip(g.units, g.channel_ids)}
            bad = [k for k in kept if k not in pos]
            if bad:
                raise PlanError(
                    f"plan group '{gp.id}' ({gp.producers[0]}) keeps channel {bad[0]}, outside 0..{g.channels - 1} or not a unit start",
                    fix="use channel indices listed by 'onnxprune analyze'",
                    node=gp.producers[0],
                )
            units = np.array(g.units)
            mask[units] = False
            mask[[pos[k] for k in kept]] = True
            if gp.kept_by_producer:
                want = producer_channels(cg, g, mask)[0]
                got = {k: tuple(v) for k, v in gp.kept_by_producer.items()}
                if got != want:
                    bad = next(p for p in sorted(set(got) | set(want)) if got.get(p) != want.get(p))
                    raise PlanError(
                        f"plan group '{gp.id}' ({gp.producers[0]}): kept_by_producer for '{bad}' disagrees with 'kept'",
                        fix="edit 'kept' only (kept_by_producer is derived from it), or drop kept_by_producer/removed_by_producer",
                        node=bad,
                    )
        return mask

    def to_dict(self) -> dict:
        groups = [{**asdict(g), "kept_by_producer": {k: list(v) for k, v in g.kept_by_producer.items()},
                   "removed_by_producer": {k: list(v) for k, v in g.removed_by_producer.items()}} for g in self.groups]
        return {"version": PLAN_VERSION, "model_signature": self.model_signature, "groups": groups}


    @classmethod
    def from_dict(cls, d: dict, *, source: str = "plan") -> "PruningPlan":
        try:
            if not isinstance(d, dict) or "groups" not in d:
                raise ValueError("no 'groups' list")
            groups = tuple(
                GroupPlan(
                    str(g["id"]), tuple(str(p) for p in g["producers"]), int(g["channels"]), tuple(int(k) for k in g["kept"]),
                    {str(p): tuple(int(k) for k in v) for p, v in g.get("kept_by_producer", {}).items()},
                    {str(p): tuple(int(k) for k in v) for p, v in g.get("removed_by_producer", {}).items()},
                )
                for g in d["groups"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{source} is not a valid onnxprune plan ({exc})", fix="create one with --save-plan") from None
        return cls(groups, str(d.get("model_signature", "")))

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file '{p}' does not exist", fix="check the --plan path")
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"plan file '{p}' is not valid JSON ({exc})", fix="create one with --save-plan") from None
        return cls.from_dict(d, source=f"plan file '{p}'")


def producer_channels(cg: ChannelGraph, group, unit_kept: np.ndarray) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``(kept, removed)``: for each node producing ``group``'s channels, its output channels kept / removed, in its own numbering."""
    units = np.asarray(group.units, dtype=np.int64)
    atoms = np.nonzero(np.isin(cg.unit_of_atom, units))[0]
    kept: dict[str, list[int]] = {}
    removed: dict[str, list[int]] = {}
    for a in atoms.tolist():
        owner = cg.atom_owner[a]
        if owner.startswith(("input:", "untracked:")):
            continue
        side = kept if unit_kept[cg.unit_of_atom[a]] else removed
        side.setdefault(owner, []).append(int(cg.atom_channel[a]))
        (removed if side is kept else kept).setdefault(owner, [])
    return ({k: tuple(sorted(v)) for k, v in kept.items()}, {k: tuple(sorted(v)) for k, v in removed.items()})
