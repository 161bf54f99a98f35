"""The pruning report: what was removed, what it achieved, how it was measured."""

from __future__ import annotations

import json
from collections import Counter
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
    target: float | None  # None when a saved plan decided the channels (strategy "plan")
    strategy: str
    criterion: str
    round_to: int | None  # None with a saved plan
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
    normalizations: tuple[str, ...] = ()  # changes beyond pruning made before analysis (onnxprune.normalize)

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
        plan_file = (self.detail or {}).get("plan_file")
        lat = (self.detail or {}).get("latency") or {}
        goal = f"target -{self.target:.1%}" if self.target is not None else f"set by plan {plan_file or ''}".rstrip()
        if lat.get("target") is not None:
            goal = f"set by the latency target -{lat['target']:.1%}"
        lines = [
            f"MACs {human(self.macs_before)} -> {human(self.macs_after)} "
            f"(-{self.reduction:.1%}, {goal}); FLOPs = 2 x MACs",
            f"Params (Conv/Gemm/MatMul) {human(self.params_before)} -> {human(self.params_after)} "
            f"(-{1 - self.params_after / max(self.params_before, 1):.1%})",
            f"Strategy {self.strategy}, criterion {self.criterion}, "
            + (f"channel counts where the measured time drops (steps of {self.round_to})" if lat.get("target") is not None
               else f"round-to measured (per group, steps of {self.round_to} or 1)" if ((self.detail or {}).get("rounding") or {}).get("mode") == "auto"
               else f"round-to {self.round_to}")
            if self.strategy != "plan"
            else f"Channels kept as listed in plan {plan_file or ''} (no search; --target-flops, --strategy, --criterion and --round-to do not apply)",
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
        ft = (self.detail or {}).get("finetune")
        if ft and ft.get("lr") is not None:  # fine-tuning: how it was set up, and whether it was kept
            how = f"lr {ft['lr']:g}" + (" (pilot)" if ft.get("lr_pilot") else "") + f", normalization {ft.get('normalization')}" + (" (pilot)" if ft.get("normalization_pilot") else "")
            lines.append(f"Fine-tuning: {how}, validation {ft.get('validation') or 'none'}" + (f"; {ft['note']}" if ft.get("note") else ""))
        shapes = (self.detail or {}).get("input_shapes")
        if shapes and shapes.get("source") != "--input-shape":
            dims = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes["shapes"].items())
            lines.append(f"Dynamic input dims from {shapes['source']}: {dims} (override with --input-shape)")
        if self.normalizations:
            kinds = Counter(" ".join(n.split()[:2]) for n in self.normalizations)  # "removed Identity", "folded Cast"
            done = ", ".join(f"{verb} {k} {op}" for (verb, op), k in sorted((tuple(kv.split()), k) for kv, k in kinds.items()))
            lines.append(f"Normalized before pruning (same function): {done} on constants (listed in --report)")
        lines += rounding_lines(self.detail or {})
        lines += latency_lines(self.detail or {})
        if self.provider:
            lines.append(f"Evaluated with ONNX Runtime on {self.provider}")
        return lines


def rounding_lines(detail: Mapping[str, Any]) -> list[str]:
    """What rounding cost (``--round-to auto`` or ``measured``): the rounded vs the unrounded
    (round-to 1) plan from the same data, in MACs, accuracy (with data) and latency."""
    r = detail.get("rounding") or {}
    if r.get("mode") in ("fallback", "global"):
        out = [f"Note: {r['note']}"] if r.get("note") else []
        if "round_to" not in r:
            return out
        n = r.get("narrow_groups", 0)
        on = (f"every group on multiples of {r['round_to']}" if not n else
              f"groups on multiples of {r['round_to']}, {n} narrower one{'s' if n > 1 else ''} of {r['narrow_step']}")
        head = (f"Rounding cost ({on}; --round-to 1 for none): "
                f"MACs -{r['reduction']:.1%} vs -{r['unrounded_reduction']:.1%} unrounded")
        lat = r.get("latency") or {}
        parts = [f"measured latency {-lat['rounded_cut']:+.1%} vs {-lat['unrounded_cut']:+.1%} unrounded"] if "unrounded_cut" in lat else []
        acc = _rounding_accuracy(r)
        parts += [acc] if acc else []
        tail = ["  " + "; ".join(parts)] if parts else []
        if r.get("verdict"):
            tail.append(f"  {r['verdict'][0].upper()}{r['verdict'][1:]}")
        return out + [head] + tail
    if r.get("mode") != "auto":
        return []
    head = (f"Rounding cost ({r['staircase_groups']} groups x{r['staircase_step']}, {r['smooth_groups']} any count): "
            f"MACs -{r['reduction']:.1%} vs -{r['unrounded_reduction']:.1%} unrounded")
    tail = f"  predicted {r['predicted_ms']:.3f} vs {r['unrounded_predicted_ms']:.3f} ms unrounded"
    acc = _rounding_accuracy(r)
    return [head, tail + (f"; {acc}" if acc else "")]


def primary_pair(acc: Mapping[str, Any]) -> tuple[str, float, float] | None:
    """``(metric, rounded, unrounded)`` from ``detail["rounding"]["accuracy"]``: the first of top1,
    agreement, cosine that both plans have (as :meth:`~onnxprune.evaluate.Metrics.primary`), else None."""
    from .evaluate import PRIMARY_METRICS

    for key in PRIMARY_METRICS:
        a, b = (acc.get("rounded") or {}).get(key), (acc.get("unrounded") or {}).get(key)
        if a is not None and b is not None:
            return key, a, b
    return None


def _rounding_accuracy(r: Mapping[str, Any]) -> str | None:
    """``top1 after recovery 89.97% vs 90.41%`` from ``r["accuracy"]`` (with data), else None."""
    acc = r.get("accuracy") or {}
    pair = primary_pair(acc)
    if pair is None:
        return None
    key, a, b = pair
    when = "after recovery" if acc["stage"] == "calibrated" else "pruned"
    return f"{key} {when} {100 * a:.2f}% vs {100 * b:.2f}%" + (" (same plan)" if acc.get("same_plan") else "")


def latency_lines(detail: Mapping[str, Any]) -> list[str]:
    """Measured latency before/after (and, for latency targets, prediction, loop and table) for the summary."""
    lat, out = detail.get("latency") or {}, []
    if lat:
        goal = f", target -{lat['target']:.1%}" if lat.get("target") is not None else f"; MACs -{lat['macs_cut']:.1%}"
        out.append(f"Latency (measured, {lat['settings']}): {lat['original_ms']:.3f} ms -> {lat['pruned_ms']:.3f} ms "
                   f"({-lat['measured_cut']:+.1%}{goal}); " + (f"derived: {lat['derived']}" if lat.get("derived") else f"spread {lat['spread']:.1%}"))
    if lat.get("target") is not None:
        out.append(f"Predicted {lat['predicted_ms']:.3f} ms (-{lat['predicted_cut']:.1%}), error {lat['error']:+.1%} vs measured")
        for it in lat.get("iterations", ()):
            mark = " <- kept" if it["index"] == lat.get("chosen_iteration") else ""
            out.append(f"  loop {it['index']}: allocated for -{it['predicted_target']:.1%} predicted -> measured {-it['measured_cut']:+.1%} "
                       f"({it['original_ms']:.3f} -> {it['measured_ms']:.3f} ms), predicted {it['predicted_ms']:.3f} ms ({it['error']:+.1%}), MACs -{it['macs_cut']:.1%}{mark}")
        if not lat.get("reached"):
            out.append(f"Latency target missed by more than {lat['tolerance']:.1%} after {len(lat.get('iterations', ()))} iterations "
                       f"(the largest predicted cut is -{lat['max_predicted_cut']:.1%}): measure on an idle machine, or lower --target-latency")
        t = lat.get("table") or {}
        if t:
            out.append(f"Latency tables: {t['measured_points']} layer points measured, {t['cached_points']} from cache, {t['seconds']:.1f} s"
                       + (f" ({t['cache']})" if t.get("cache") else ""))
    if detail.get("latency_note"):
        out.append(f"Note: {detail['latency_note']}")
    return out


def short_name(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, cut in the middle so the distinguishing end stays:
    ``short_name("/layers/layers.13/conv1/Conv", 16) == "/….13/conv1/Conv"``. The cut does not sit
    next to a digit (a number is shown whole or not at all) unless the name is nothing but digits."""
    if len(name) <= width:
        return name
    width = max(width, 3)
    head = max(1, (width - 1) // 4)
    tail = width - 1 - head
    if name[-tail].isdigit():  # keep a number whole: widen the end over it (the start gives way), or drop it
        grow = tail
        while grow < len(name) and name[-grow - 1].isdigit():
            grow += 1
        if grow + 1 <= width - 1:
            tail, head = grow + 1, min(head, width - 2 - grow)
        else:
            while tail > 1 and name[-tail].isdigit():
                tail -= 1
    while head > 0 and name[head - 1].isdigit():
        head -= 1
    return name[:head] + "…" + name[len(name) - tail :]


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
