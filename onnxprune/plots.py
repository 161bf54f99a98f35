"""PNG pictures (matplotlib, the ``plot`` extra): presentation only, no pruning logic.

* :func:`sensitivity_png`: each group's accuracy drop (points) against the ratio
  of its channels removed. Up to ``HEATMAP_GROUPS - 1`` groups as curves with
  distinct colours and the legend beside the axes; from ``HEATMAP_GROUPS`` on as a
  heatmap (group x ratio), rows labelled by short node name and MACs touched.
  ``chosen`` marks the ratio the allocation picked on each curve/row.
* :func:`prune_png`: what the main command did: channels per group before and
  after, MACs per layer before and after, and (sensitivity runs) the curves with
  the chosen ratios. Titles say whether calibration was used.

Example::

    require_matplotlib("--plot")  # before any work: fails in milliseconds, not after the run
    sensitivity_png(groups, curves, "sens.png", calibration="after calibration (reconstruct, 512 samples)")
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import MissingDependencyError
from .graph import atomic_path
from .report import short_name

HEATMAP_GROUPS = 12  # from this many curves on, colours repeat and a legend covers them: draw a heatmap
LABEL_WIDTH = 24  # characters of a node name in axis labels


def require_matplotlib(flag: str = "--plot") -> None:
    """Raise :class:`MissingDependencyError` now when matplotlib cannot be imported (call before any work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"{flag} needs matplotlib, which cannot be imported ({exc})",
            fix=f"pip install 'onnxprune[plot]' (or pip install matplotlib), or leave out {flag}",
        ) from None


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def group_label(producer: str, macs_share: float, width: int = LABEL_WIDTH) -> str:
    """``'/….13/conv1/Conv (12% MACs)'``: a short node name and the share of MACs the group touches."""
    return f"{short_name(producer, width)} ({100 * macs_share:.0f}% MACs)"


def _drops_points(curves, gid: str) -> np.ndarray:
    return 100 * np.asarray(curves.drops[gid], dtype=float)


def _draw_sensitivity(ax, groups: Sequence, curves, chosen: Mapping[str, float] | None) -> None:
    """Curves or heatmap of ``groups`` (objects with ``id``, ``producers``, ``macs_share``) on ``ax``."""
    groups = [g for g in groups if g.id in curves.drops]
    ratios = np.asarray(curves.ratios, dtype=float)
    fig = ax.figure
    if len(groups) >= HEATMAP_GROUPS:
        data = np.array([_drops_points(curves, g.id) for g in groups])
        vmax = max(1.0, float(np.nanmax(np.abs(data)))) if data.size else 1.0
        im = ax.imshow(data, aspect="auto", cmap="RdYlGn_r", vmin=min(0.0, float(np.nanmin(data))), vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(ratios)), [f"{r:.0%}" for r in ratios])
        ax.set_yticks(range(len(groups)), [group_label(g.producers[0], g.macs_share) for g in groups], fontsize=7)
        fig.colorbar(im, ax=ax, label=f"{curves.metric} drop (points)")
        if chosen:
            ys = [k for k, g in enumerate(groups) if g.id in chosen]
            # ratio 0 (group kept whole) sits on the left edge of the first column
            xs = [float(np.interp(chosen[groups[k].id], [0.0, *ratios], [-0.5, *range(len(ratios))])) for k in ys]
            ax.scatter(xs, ys, marker="D", s=22, facecolors="none", edgecolors="black", linewidths=1.2, label="chosen ratio")
            ax.legend(loc="upper left", bbox_to_anchor=(0, -0.08), fontsize=7, frameon=False)
        ax.set_xlabel("ratio of the group's channels removed")
        return
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"]
    colours = [tab20(k) for k in range(20)] if len(groups) > 10 else [f"C{k}" for k in range(10)]  # never repeated
    for k, g in enumerate(groups):
        d = _drops_points(curves, g.id)
        ax.plot(ratios, d, marker=".", color=colours[k], label=group_label(g.producers[0], g.macs_share))
        if chosen and g.id in chosen:
            r = chosen[g.id]
            ax.plot([r], [float(np.interp(r, [0.0, *ratios], [0.0, *d]))], marker="D", markersize=6, markerfacecolor="none", markeredgecolor=colours[k], markeredgewidth=1.5)
    if chosen:
        ax.plot([], [], marker="D", linestyle="none", markerfacecolor="none", markeredgecolor="black", label="chosen ratio")
    ax.set_xlabel("ratio of the group's channels removed")
    ax.set_ylabel(f"{curves.metric} drop (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the axes, never over the curves


def sensitivity_png(groups: Sequence, curves, path: str | Path, *, calibration: str, chosen: Mapping[str, float] | None = None) -> None:
    """Write the sensitivity picture of ``groups`` to ``path`` (atomically). ``calibration`` goes into the title,
    e.g. ``"without calibration"``."""
    plt = _pyplot()
    groups = [g for g in groups if g.id in curves.drops]
    heat = len(groups) >= HEATMAP_GROUPS
    fig, ax = plt.subplots(figsize=(9, max(4.5, 0.22 * len(groups) + 1.5)) if heat else (11, 5))
    ax.set_title(
        f"{curves.metric} drop per channel group pruned alone, {calibration}\n(baseline {curves.metric} {100 * curves.baseline:.2f}%)",
        fontsize=10,
    )
    _draw_sensitivity(ax, groups, curves, chosen)
    _save(fig, path, plt)


def prune_png(report, layers_before: Sequence, layers_after: Mapping[str, int], path: str | Path, *, groups: Sequence | None = None, curves=None) -> None:
    """The main command's picture: kept channels per group (before/after) and MACs per layer (before/after);
    with ``curves`` (sensitivity runs) also the drop curves with the ratio chosen for each group.

    ``layers_before``: the original's per-layer costs (``name``, ``macs``); ``layers_after``: node name -> MACs in
    the pruned model. ``groups``: the channel groups (``id``, ``producers``, ``macs_share``) the curves belong to."""
    plt = _pyplot()
    rows = [g for g in report.groups if g.blocked_reason is None]
    n_panels = 3 if curves is not None else 2
    fig, axes = plt.subplots(n_panels, 1, figsize=(11, 4.2 * n_panels))
    cal = (report.detail or {}).get("calibration")
    how = f"calibrated: {cal.get('method')} on {cal.get('samples')} samples" if cal else "no calibration"
    goal = f"target -{report.target:.0%}" if report.target is not None else "from a saved plan"
    fig.suptitle(f"{Path(report.input).name}: MACs -{report.reduction:.1%} ({goal}), {report.strategy}; {how}", fontsize=11)

    ax = axes[0]
    x = np.arange(len(rows))
    ax.bar(x, [g.channels_before for g in rows], color="0.8", label="channels before")
    ax.bar(x, [g.channels_after for g in rows], color="C0", label="kept")
    ax.set_xticks(x, [group_label(g.producers[0], g.macs_share) for g in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title("Channels per prunable group (MACs: share of the model's MACs in the layers the group touches)", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1]
    layers = [l for l in layers_before if l.macs]
    x = np.arange(len(layers))
    ax.bar(x, [l.macs / 1e6 for l in layers], color="0.8", label="MACs before")
    ax.bar(x, [layers_after.get(l.name, 0) / 1e6 for l in layers], color="C1", label="after")
    ax.set_xticks(x, [short_name(l.name, LABEL_WIDTH) for l in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MMACs")
    ax.set_title("MACs per layer", fontsize=9)
    ax.legend(fontsize=8)

    if curves is not None:
        chosen = {g.id: g.ratio for g in report.groups}
        detail = report.detail or {}
        measured = "after calibration" if detail.get("sensitivity_calibrated") else "without calibration"
        axes[2].set_title(f"Sensitivity (measured {measured}) and the ratio chosen for each group", fontsize=9)
        _draw_sensitivity(axes[2], groups if groups is not None else rows, curves, chosen)
    _save(fig, path, plt)


def _save(fig, path: str | Path, plt) -> None:
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
