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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import PlanError
from .graph import write_text_atomic
from .groups import ChannelGraph

PLAN_VERSION = 1


@dataclass(frozen=True)
class GroupPlan:
    id: str
    producers: tuple[str, ...]
    channels: int
    kept: tuple[int, ...]


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
            groups.append(GroupPlan(g.id, g.producers, g.channels, tuple(sorted(int(pos[u]) for u in kept.tolist()))))
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
        return mask

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "model_signature": self.model_signature, "groups": [asdict(g) for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "plan") -> "PruningPlan":
        try:
            if not isinstance(d, dict) or "groups" not in d:
                raise ValueError("no 'groups' list")
            groups = tuple(
                GroupPlan(str(g["id"]), tuple(str(p) for p in g["producers"]), int(g["channels"]), tuple(int(k) for k in g["kept"]))
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
