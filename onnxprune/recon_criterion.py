"""Choose channels by reconstruction: the ``recon`` importance criterion.

A channel is unimportant when the outputs of the layers that read it
(*consumers*) can be rebuilt without it. Both rules below work on the same
statistics as :mod:`onnxprune.reconstruct`: per consumer, the Gram
``Gx = [A, 1]^T [A, 1]`` of sampled input rows (features ``(channel, tap)``;
one pass of the original model over unlabeled samples) and the weight as a
``[features, outputs]`` matrix ``W`` (bias last). A unit may own several
features of a consumer (taps, or ``Flatten -> Gemm`` positions); a residual
group has many consumers, whose costs are each divided by the consumer's
output energy ``tr(W^T Gx W)`` and summed.

* ``rule="ls"`` (default; the reconstruction objective of He et al., ICCV
  2017, solved greedily instead of by LASSO): removing unit ``u`` (features
  ``f``) while the kept inputs are re-fitted by least squares raises the
  squared output error by ``tr(W_f^T (H_ff)^-1 W_f)`` with ``H = (Gx +
  ridge)^-1`` over the kept features (the optimal-brain-surgeon identity for a
  linear layer). The cheapest unit is removed, ``W`` and ``H`` are updated
  (``W -= H_:f (H_ff)^-1 W_f``, ``H -= H_:f (H_ff)^-1 H_f:``), and so on.
* ``rule="thinet"`` (Luo et al., ICCV 2017): no refit. Removing a set ``T``
  changes the output by ``sum_{c in T} z_c`` (``z_c``: channel ``c``'s
  contribution), of energy ``1_T^T M 1_T`` with ``M[c, c'] = sum_{k, k'}
  Gx[(c,k), (c',k')] * Gw[(c,k), (c',k')]``, ``Gw = W W^T``; greedily remove the
  unit adding least (``2 * sum_{t in T} M[t, u] + M[u, u]``).

The removal order is the ranking: a unit's score is its position in that
order divided by the group size (the last removed scores 1), so keeping the
best ``k`` of a group is the greedy choice for every ``k``. Consumers that are
grouped convolutions or cannot be described (:func:`onnxprune.layerfit.describe`)
are ignored; groups left without a consumer fall back to ``l1`` (logged).
Cost of ``ls``: per group and removed unit, one rank-``|f|`` update of
``F x F`` matrices per consumer: fine for CIFAR-size layers, slow for
ImageNet-size ones (thousands of features).

Example: ``scores = score_units(cg, "recon", data=x_calib)``.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .extract import prefix
from .graph import GraphIndex, attr
from .groups import ChannelGraph
from .layerfit import Layer, Normal, describe, input_rows
from .runtime import Runner

log = logging.getLogger(__name__)


def _weight_matrix(node, w: np.ndarray) -> np.ndarray:
    """The weight as ``[features, outputs]`` in the input-row feature order (Gemm's ``alpha`` included)."""
    if node.op_type == "Conv":
        wm = w.reshape(w.shape[0], -1).T
    elif node.op_type == "Gemm":
        wm = float(attr(node, "alpha", 1.0)) * (w.T if int(attr(node, "transB", 0)) else w)  # [K, M]
    else:  # MatMul [K, N]
        wm = w
    return wm.astype(np.float64)


def _consumers(cg: ChannelGraph, index: GraphIndex) -> list[tuple[Layer, np.ndarray, np.ndarray]]:
    """``(layer, weight [F, O], input atom of each feature)`` of every group-1 consumer with tracked inputs."""
    nodes = {n.name: n for n in cg.model.graph.node}
    out = []
    for cm in cg.compute:
        node = nodes[cm.node]
        if cm.in_atoms is None or node.op_type not in ("Conv", "Gemm", "MatMul") or int(attr(node, "group", 1)) != 1:
            continue
        w = index.const(node.input[1])
        layer = describe(node, w, cg.shapes, target=node.output[0], target_axis=1, target_keep=None)
        if isinstance(layer, str):
            continue
        taps = int(np.prod(w.shape[2:])) if node.op_type == "Conv" else 1
        out.append((layer, _weight_matrix(node, w), np.repeat(cm.in_atoms, taps) if taps > 1 else cm.in_atoms))
    return out


def _statistics(cg: ChannelGraph, x: np.ndarray, *, rows: int, batch_size: int, device: str, seed: int):
    """Per consumer: ``(layer, Wm [F+1, O] (bias last), Gram of [A, 1] (F+1 square), input atoms per feature)``."""
    index = GraphIndex(cg.model)
    nodes = {n.name: n for n in cg.model.graph.node}
    cons = _consumers(cg, index)
    n = len(x)
    picks = []
    for k, (layer, _, _) in enumerate(cons):
        p = layer.positions
        kk = min(p, math.ceil(rows / n))
        rng = np.random.default_rng([seed, k])
        picks.append(np.tile(np.arange(p), (n, 1)) if kk == p else np.stack([rng.choice(p, kk, replace=False) for _ in range(n)]))
    names = list(dict.fromkeys(layer.x for layer, _, _ in cons))
    eqs = [Normal() for _ in cons]
    runner = Runner(device=device, batch_size=batch_size)
    start = 0
    for done, vals in runner.batches(prefix(cg.model, names), x, names):
        v = dict(zip(names, vals))
        for (layer, _, _), pk, eq in zip(cons, picks, eqs):
            a = input_rows(layer, v[layer.x], pk[start:done])
            eq.add(a, np.zeros((1, a.shape[1], 1), np.float32))
        start = done
    out = []
    for (layer, wm, atoms), eq in zip(cons, eqs):
        node = nodes[layer.node]
        bias = np.zeros(wm.shape[1])
        b = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if b is not None and b.size == wm.shape[1]:
            bias = b.astype(np.float64).reshape(-1) * (float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0)
        out.append((layer, np.vstack([wm, bias[None]]), eq.gram[0], atoms))
    return out


def _group_features(cg: ChannelGraph, atoms: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{group id: (feature indices, unit position of each)}`` for the features of one consumer."""
    pos = {}
    for g in cg.prunable_groups:
        for i, u in enumerate(g.units):
            pos[int(u)] = (g.id, i)
    out: dict[str, tuple[list, list]] = {}
    for f, u in enumerate(cg.unit_of_atom[atoms]):
        hit = pos.get(int(u))
        if hit:
            out.setdefault(hit[0], ([], []))[0].append(f)
            out[hit[0]][1].append(hit[1])
    return {g: (np.array(f), np.array(p)) for g, (f, p) in out.items()}


def channel_energy(cg: ChannelGraph, x: np.ndarray, *, rows: int = 4096, batch_size: int = 64, device: str = "cpu", seed: int = 0) -> dict[str, np.ndarray]:
    """Per prunable group, ThiNet's ``M`` over its units (see the module docstring), summed over its consumers."""
    sizes = {g.id: len(g.units) for g in cg.prunable_groups}
    out = {gid: np.zeros((s, s)) for gid, s in sizes.items()}
    for _, wm, gram, atoms in _statistics(cg, x, rows=rows, batch_size=batch_size, device=device, seed=seed):
        w = wm[:-1]
        m = gram[:-1, :-1] * (w @ w.T)  # feature-level M
        total = float(m.sum())
        if not total > 0:
            continue
        for gid, (feats, pos) in _group_features(cg, atoms).items():
            onehot = np.zeros((len(feats), sizes[gid]))
            onehot[np.arange(len(feats)), pos] = 1.0
            out[gid] += onehot.T @ m[np.ix_(feats, feats)] @ onehot / total
    return out


def ls_order(consumers: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]], n_units: int, ridge: float = 1e-3) -> np.ndarray:
    """Greedy removal order with least-squares refit of the remaining inputs (optimal-brain-surgeon updates).

    ``consumers``: ``(W [F+1, O], Gram [F+1, F+1], features of each unit)``. Removing unit ``u``
    (features ``f``) from a consumer whose kept inputs are re-fitted raises its squared output error by
    ``tr(W_f^T (H_ff)^-1 W_f)`` with ``H = (Gram + ridge)^-1`` over the kept features; then
    ``W -= H_:f (H_ff)^-1 W_f`` and ``H -= H_:f (H_ff)^-1 H_f:``. Costs are divided by each consumer's
    output energy ``tr(W^T Gram W)`` and summed; the cheapest unit goes first.
    """
    state = []
    for w, gram, feats in consumers:
        energy = float(np.einsum("fo,fo->", w, gram @ w))
        if not energy > 0:
            continue
        g = gram.copy()
        f = len(g) - 1
        g[np.arange(f), np.arange(f)] += ridge * max(float(np.mean(np.diag(gram)[:-1])), 1e-12)
        state.append([w.copy(), np.linalg.pinv(g, hermitian=True), feats, energy])
    removed = np.zeros(n_units, dtype=bool)
    order = []
    for _ in range(n_units):
        cost = np.zeros(n_units)
        left = np.flatnonzero(~removed)
        for w, h, feats, energy in state:
            sizes = {len(feats[u]) for u in left}
            if len(sizes) == 1 and 0 not in sizes:  # every unit owns as many features: one batched solve
                f = np.stack([feats[u] for u in left])  # (U, t)
                hff = h[f[:, :, None], f[:, None, :]] + 1e-12 * np.eye(f.shape[1])
                wf = w[f]  # (U, t, O)
                cost[left] += np.einsum("uto,uto->u", wf, np.linalg.solve(hff, wf)) / energy
                continue
            for u in left:
                f = feats[u]
                if len(f):
                    cost[u] += float(np.einsum("fo,fo->", w[f], np.linalg.solve(h[np.ix_(f, f)] + 1e-12 * np.eye(len(f)), w[f]))) / energy
        cost[removed] = np.inf
        u = int(np.argmin(cost))
        order.append(u)
        removed[u] = True
        for st in state:
            w, h, feats, _ = st
            f = feats[u]
            if not len(f):
                continue
            s = np.linalg.inv(h[np.ix_(f, f)] + 1e-12 * np.eye(len(f)))
            hf = h[:, f]
            st[0] = w - hf @ (s @ w[f])
            st[1] = h - hf @ s @ hf.T
            st[0][f] = 0.0
    return np.array(order, dtype=np.int64)


def ls_orders(cg: ChannelGraph, x: np.ndarray, *, rows: int = 4096, batch_size: int = 64, device: str = "cpu", seed: int = 0) -> dict[str, np.ndarray]:
    """Per prunable group, :func:`ls_order` over all its consumers."""
    per_group: dict[str, list] = {}
    for _, wm, gram, atoms in _statistics(cg, x, rows=rows, batch_size=batch_size, device=device, seed=seed):
        for gid, (feats, pos) in _group_features(cg, atoms).items():
            n = len(cg.group(gid).units)
            unit_feats = [feats[pos == i] for i in range(n)]
            per_group.setdefault(gid, []).append((wm, gram, unit_feats))
    return {gid: ls_order(cons, len(cg.group(gid).units)) for gid, cons in per_group.items()}


def greedy_order(m: np.ndarray) -> np.ndarray:
    """Units in ThiNet's greedy removal order (first = removed first)."""
    n = len(m)
    removed = np.zeros(n, dtype=bool)
    cross = np.zeros(n)
    order = []
    diag = np.diag(m).copy()
    for _ in range(n):
        cost = np.where(removed, np.inf, 2 * cross + diag)
        u = int(np.argmin(cost))
        order.append(u)
        removed[u] = True
        cross += m[u]
    return np.array(order, dtype=np.int64)


def recon_scores(cg: ChannelGraph, x: np.ndarray, fallback: np.ndarray, *, rule: str = "ls", **kwargs) -> np.ndarray:
    """Scores of every unit: greedy removal rank within its group (``rule``: ``"ls"`` with least-squares
    refit, or ``"thinet"``); ``fallback`` (e.g. l1) where a group has no usable consumer."""
    if rule == "thinet":
        orders = {gid: greedy_order(m) for gid, m in channel_energy(cg, x, **kwargs).items() if np.any(m)}
    else:
        orders = ls_orders(cg, x, **kwargs)
    scores = fallback.copy()
    missing = []
    for g in cg.prunable_groups:
        order = orders.get(g.id)
        if order is None:
            missing.append(g.id)
            continue
        units = np.asarray(g.units)
        scores[units[order]] = (np.arange(len(order)) + 1) / len(order)
    if missing:
        log.info("criterion recon: no consumer to rebuild for groups %s; using l1 there", ", ".join(missing))
    return scores


__all__ = ["channel_energy", "greedy_order", "ls_order", "ls_orders", "recon_scores"]
