"""Sensitivity analysis: the suffix shortcut measures exactly what full-model evaluation measures."""

import numpy as np
import onnx
import pytest

from onnxprune.data import Dataset
from onnxprune.evaluate import Evaluator
from onnxprune.groups import find_groups
from onnxprune.importance import score_units
from onnxprune.sensitivity import analyze

N = 48
GRID = (0.25, 0.5, 0.75)


def _run(path, *, suffix: bool, n: int = N):
    model = onnx.load(str(path))
    cg = find_groups(model)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal((n, *shape[1:])).astype(np.float32)
    ev = Evaluator.from_original(Dataset(x, None, "random"), model, device="cpu", batch_size=16)
    return analyze(cg, score_units(cg, "l1"), ev, grid=GRID, suffix=suffix)


@pytest.mark.parametrize(
    "name,exporter",
    [
        ("resnet20", "legacy"),
        ("densenet_small", "legacy"),
        ("mobilenetv2_small", "dynamo"),
        ("se_net", "legacy"),
        ("split_net", "dynamo"),
        ("inception_small", "legacy"),
        ("fc_head_net", "legacy"),
    ],
)
def test_suffix_drops_equal_full_model_drops(zoo_export, name, exporter):
    path = zoo_export(name, exporter, 0.5)
    fast, full = _run(path, suffix=True), _run(path, suffix=False)
    assert fast.suffix_evaluations > 0, "the suffix path must actually be used"
    assert full.suffix_evaluations == 0
    assert fast.curves.drops.keys() == full.curves.drops.keys()
    for gid, drops in full.curves.drops.items():
        # agreement is a count over N samples: allow one near-tie flipping between float orderings
        np.testing.assert_allclose(fast.curves.drops[gid], drops, atol=1.0 / N + 1e-9, err_msg=gid)


def test_suffix_matches_on_dense_prediction_cosine(zoo_export):
    """Segmentation outputs use cosine similarity, a continuous metric: the two ways agree tightly."""
    path = zoo_export("seg_decoder", "legacy", 0.5)
    fast, full = _run(path, suffix=True, n=16), _run(path, suffix=False, n=16)
    assert fast.curves.metric == full.curves.metric == "cosine"
    assert fast.suffix_evaluations > 0
    for gid, drops in full.curves.drops.items():
        np.testing.assert_allclose(fast.curves.drops[gid], drops, atol=1e-5, err_msg=gid)
    assert any(max(d) > 1e-4 for d in full.curves.drops.values()), "pruning must change the outputs"
