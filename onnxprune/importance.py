"""Channel importance criteria: one score per unit, higher = more important.

For each compute node, a criterion scores every *output* position of its
weight (Conv ``W[j]``, Gemm row/column ``j``); scores are divided by their
mean over that node so nodes of different scale are comparable, averaged over
the positions that carry the same unit, and summed over the nodes of a group
(a residual unit gets the sum of its convs' normalized scores).

* ``l1``: ``sum |W[j]|``; ``l2``: ``||W[j]||_2``.
* ``fpgm``: ``sum_k ||W[j] - W[k]||_2``, the distance to the other filters
  (filters near the geometric median are redundant, He et al. 2019).
* ``bn``: ``|gamma_j|`` of BatchNormalization nodes on the group's channels;
  groups without such a node fall back to ``l1`` (logged).
* ``random``: uniform noise (seeded), a baseline.
* ``recon``: by how well the consumers' outputs can be rebuilt without the
  channel: greedy removal with least-squares refit of the kept inputs, on
  sampled rows of unlabeled samples ``data`` (:mod:`onnxprune.recon_criterion`;
  ThiNet's greedy without refit is ``rule="thinet"`` there). Needs ``data``;
  groups without a usable consumer fall back to ``l1``.

Example: ``scores = score_units(cg, "l1")``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from .errors import UsageError
from .graph import GraphIndex, attr
from .groups import ChannelGraph
from .tensors import release_freed_memory

log = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "fpgm", "bn", "random", "recon")
DATA_CRITERIA = ("recon",)  # need samples (score_units(..., data=x))


def _out_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return 1  # MatMul


def _weight_rows(w: np.ndarray, axis: int) -> np.ndarray:
    """``[positions, rest]`` view (a copy only when ``axis`` is not leading), in the weight's dtype."""
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _row_norms(w: np.ndarray, axis: int, p: int, chunk: int = 1 << 20) -> np.ndarray:
    """L1/L2 norm of each position along ``axis``, in float64, a few MB at a time.

    No full copy of the weight is made (not even a transposed one when
    ``axis`` is not leading), so a memory-mapped weight is read block by
    block. Row ``j`` is ``moveaxis(w, axis, 0)[j]`` flattened, as in
    :func:`_weight_rows`.
    """
    moved = np.moveaxis(w, axis, 0)  # a view
    n = moved.shape[0]
    out = np.zeros(n)
    step = max(1, chunk // max(1, w.size // max(1, n)))
    for i in range(0, n, step):
        r = np.asarray(moved[i : i + step], dtype=np.float64).reshape(min(step, n - i), -1)
        out[i : i + step] = np.abs(r, out=r).sum(axis=1) if p == 1 else np.square(r, out=r).sum(axis=1)
    return out if p == 1 else np.sqrt(out)


def _position_scores(w: np.ndarray, axis: int, criterion: str) -> np.ndarray:
    if criterion == "l1":
        return _row_norms(w, axis, 1)
    if criterion == "l2":
        return _row_norms(w, axis, 2)
    if criterion == "fpgm":
        rows = _weight_rows(w, axis).astype(np.float64)
        sq = (rows**2).sum(axis=1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)
        return np.sqrt(d2).sum(axis=1)
    raise UsageError(f"unknown criterion '{criterion}'", fix=f"use one of {', '.join(CRITERIA)} with --criterion")


def _accumulate(cg: ChannelGraph, acc: np.ndarray, seen: np.ndarray, atoms: np.ndarray, scores: np.ndarray) -> None:
    mean = scores.mean()
    if mean <= 0 or not np.isfinite(mean):
        norm = np.zeros_like(scores)
    else:
        norm = scores / mean
    units = cg.unit_of_atom[atoms]
    sums = np.zeros(cg.n_units)
    counts = np.zeros(cg.n_units)
    np.add.at(sums, units, norm)
    np.add.at(counts, units, 1)
    hit = counts > 0
    acc[hit] += sums[hit] / counts[hit]
    seen[hit] = True


def _weight_scores(cg: ChannelGraph, criterion: str) -> tuple[np.ndarray, np.ndarray]:
    index = GraphIndex(cg.model)
    nodes = {n.name: n for n in cg.model.graph.node}
    acc = np.zeros(cg.n_units)
    seen = np.zeros(cg.n_units, dtype=bool)
    for c in cg.compute:
        node = nodes[c.node]
        w = index.const(node.input[1])
        if w is None:
            continue
        axis = _out_axis(node)
        if w.ndim <= axis or w.shape[axis] != len(c.out_atoms):
            continue
        _accumulate(cg, acc, seen, c.out_atoms, _position_scores(w, axis, criterion))
        del w  # a lazy weight is unmapped before the next one is read
    release_freed_memory()
    return acc, seen


def _bn_scores(cg: ChannelGraph) -> tuple[np.ndarray, np.ndarray]:
    index = GraphIndex(cg.model)
    acc = np.zeros(cg.n_units)
    seen = np.zeros(cg.n_units, dtype=bool)
    for node in cg.model.graph.node:
        if node.op_type != "BatchNormalization" or node.input[0] not in cg.tensor_maps:
            continue
        gamma = index.const(node.input[1])
        _, atoms = cg.tensor_maps[node.input[0]]
        if gamma is None or len(gamma) != len(atoms):
            continue
        _accumulate(cg, acc, seen, atoms, np.abs(gamma.astype(np.float64)))
    return acc, seen


def score_units(cg: ChannelGraph, criterion: str = "l1", *, seed: int = 0, data: np.ndarray | None = None, device: str = "cpu") -> np.ndarray:
    """Importance of every unit (array of length ``cg.n_units``); ``data``: unlabeled samples, for ``recon``."""
    criterion = criterion.lower()
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion '{criterion}'", fix=f"use one of {', '.join(CRITERIA)} with --criterion")
    if criterion == "recon":
        if data is None or len(data) < 2:
            raise UsageError("criterion recon chooses channels from samples, and none were given", fix="pass --data or --calib-data, or use --criterion l1")
        from .recon_criterion import recon_scores

        return recon_scores(cg, data, _weight_scores(cg, "l1")[0], seed=seed, device=device)
    if criterion == "random":
        return np.random.default_rng(seed).random(cg.n_units)
    if criterion == "bn":
        bn, seen = _bn_scores(cg)
        l1, _ = _weight_scores(cg, "l1")
        missing = [g.id for g in cg.prunable_groups if not seen[list(g.units)].all()]
        if missing:
            log.info("criterion bn: no BatchNormalization on groups %s; using l1 there", ", ".join(missing))
        out = bn.copy()
        for g in cg.prunable_groups:
            u = list(g.units)
            if not seen[u].all():
                out[u] = l1[u]
        return out
    scores, _ = _weight_scores(cg, criterion)
    return scores


def mask_from_counts(cg: ChannelGraph, scores: np.ndarray, keep: dict[str, int]) -> np.ndarray:
    """Unit mask keeping, in each prunable group named in ``keep``, its ``keep[id]`` best units.

    Ties are broken by channel order, so the result is deterministic.
    """
    from .allocate import MaskBuilder

    return MaskBuilder(cg, scores).mask(keep)
