"""The pruning report: what was removed, what it achieved, how it was measured."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .flops import CONVENTION
from .graph import write_text_atomic


@dataclass(frozen=True)
class GroupRow:
    id: str
    producers: tuple[str, ...]
    channels_before: int
    channels_after: int
    macs_share: float
    blocked_reason: str | None

    @property
    def ratio(self) -> float:
        return 1 - self.channels_after / self.channels_before if self.channels_before else 0.0


@dataclass(frozen=True)
class PruneReport:
    input: str
    output: str | None
    target: float
    strategy: str
    criterion: str
    round_to: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    groups: tuple[GroupRow, ...]
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # stage -> metrics dict
    provider: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    detail: Mapping[str, Any] = field(default_factory=dict)
    plan: Mapping[str, Any] = field(default_factory=dict)
    convention: str = CONVENTION

    @property
    def reduction(self) -> float:
        return 1 - self.macs_after / self.macs_before if self.macs_before else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reduction"] = self.reduction
        d["flops_before"] = 2 * self.macs_before
        d["flops_after"] = 2 * self.macs_after
        d["groups"] = [{**asdict(g), "ratio": g.ratio} for g in self.groups]
        return d

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1, default=_jsonable))

    def summary_lines(self) -> list[str]:
        """Plain-text summary (the CLI prints these; tests read them)."""
        lines = [
            f"MACs {human(self.macs_before)} -> {human(self.macs_after)} "
            f"(-{self.reduction:.1%}, target -{self.target:.1%}); FLOPs = 2 x MACs",
            f"Params (Conv/Gemm/MatMul) {human(self.params_before)} -> {human(self.params_after)} "
            f"(-{1 - self.params_after / max(self.params_before, 1):.1%})",
            f"Strategy {self.strategy}, criterion {self.criterion}, round-to {self.round_to}",
        ]
        for stage, m in self.metrics.items():
            parts = [f"{k} {100 * v:.2f}%" for k, v in m.items() if k in ("top1", "top5", "agreement") and v is not None]
            if "cosine" in m and m["cosine"] is not None and stage != "original":
                parts.append(f"cosine {m['cosine']:.4f}")
            if parts:
                lines.append(f"{stage:>12}: " + ", ".join(parts))
        cal = (self.detail or {}).get("calibration")
        if cal:
            src = cal.get("source")
            where = "samples of --data (also evaluated: pass --calib-data for an independent estimate)" if src == "--data" else f"samples of {src}"
            lines.append(f"Recovery without training: {cal.get('method')} on {cal.get('samples')} {where}")
        if self.provider:
            lines.append(f"Evaluated with ONNX Runtime on {self.provider}")
        return lines


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}" if unit == "G" else f"{n / div:.1f}{unit}"
    return str(int(n))


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)
