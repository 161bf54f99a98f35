"""Sensitivity analysis: the suffix shortcut measures exactly what full-model evaluation measures.

The drops compared must be non-zero, or equal drops prove nothing: the
trained demo models are measured on labeled Fashion-MNIST images (top-1
drops), random-weight zoo models through their outputs' cosine similarity,
a continuous metric, rather than top-1 agreement (random classifiers barely
change their arg-max: 0 of 63 drops of densenet_small were non-zero).
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.data import Dataset
from onnxprune.evaluate import Evaluator
from onnxprune.groups import find_groups
from onnxprune.importance import score_units
from onnxprune.sensitivity import analyze

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
GRID = (0.25, 0.5, 0.75)


def _run(model, x, y=None, *, suffix: bool):
    cg = find_groups(model)
    ev = Evaluator.from_original(Dataset(x, y, "test"), model, device="cpu", batch_size=50)
    return analyze(cg, score_units(cg, "l1"), ev, grid=GRID, suffix=suffix)


def _random_input(model, n: int) -> np.ndarray:
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(0).standard_normal((n, *shape[1:])).astype(np.float32)


def _compare(fast, full, *, atol: float, rtol: float = 0.0) -> np.ndarray:
    """Assert the two runs agree group by group; return all drops of the full run."""
    assert fast.suffix_evaluations > 0, "the suffix path must actually be used"
    assert full.suffix_evaluations == 0
    assert fast.curves.metric == full.curves.metric
    assert fast.curves.drops.keys() == full.curves.drops.keys()
    for gid, drops in full.curves.drops.items():
        np.testing.assert_allclose(fast.curves.drops[gid], drops, atol=atol, rtol=rtol, err_msg=gid)
    return np.array(list(full.curves.drops.values()))


@pytest.mark.parametrize("name", ["fmnist_vgg11", "fmnist_resnet20", "fmnist_mobilenetv2"])
def test_suffix_drops_equal_full_model_drops_on_trained_models(name):
    n = 100
    model = onnx.load(str(DEMO / f"{name}.onnx"))
    with np.load(DEMO / "fmnist_val.npz") as d:
        x, y = d["x"][:n], d["y"][:n]
    fast, full = _run(model, x, y, suffix=True), _run(model, x, y, suffix=False)
    assert full.curves.metric == "top1"
    # top-1 is a count over n samples: allow one near-tie flipping between float orderings
    drops = _compare(fast, full, atol=1.0 / n + 1e-9)
    # measured: 22/24 (VGG-11), 36/36 (ResNet-20), 35/36 (MobileNetV2) drops are non-zero
    assert (drops != 0).mean() >= 0.8, drops


def as_dense_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its [N, K] logits unsqueezed to [N, K, 1]: no longer a classifier's output,
    so drops are measured by cosine similarity. The head stays blocked (it reaches the output)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0]
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "dense_axes"))
    m.graph.node.append(helper.make_node("Unsqueeze", [out.name, "dense_axes"], ["dense_out"], name="as_dense"))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("dense_out", out.type.tensor_type.elem_type, None))
    return m


@pytest.mark.parametrize(
    "name,exporter",
    [
        ("densenet_small", "legacy"),
        ("se_net", "legacy"),
        ("split_net", "dynamo"),
        ("inception_small", "legacy"),
        ("fc_head_net", "legacy"),
    ],
)
def test_suffix_drops_equal_full_model_drops_by_cosine(zoo_export, name, exporter):
    model = as_dense_output(onnx.load(str(zoo_export(name, exporter, 0.5))))
    x = _random_input(model, 16)
    fast, full = _run(model, x, suffix=True), _run(model, x, suffix=False)
    assert full.curves.metric == "cosine"
    # a continuous metric: the two ways agree to float rounding (measured: relative 1e-7)
    drops = _compare(fast, full, atol=1e-9, rtol=1e-4)
    # measured: 89% (densenet_small, se_net) to 100% of the drops exceed 1e-6
    assert (drops > 1e-6).mean() >= 0.8, drops


def test_suffix_matches_on_dense_prediction_cosine(zoo_export):
    """Segmentation outputs use cosine similarity, a continuous metric: the two ways agree tightly."""
    model = onnx.load(str(zoo_export("seg_decoder", "legacy", 0.5)))
    x = _random_input(model, 16)
    fast, full = _run(model, x, suffix=True), _run(model, x, suffix=False)
    assert full.curves.metric == "cosine"
    drops = _compare(fast, full, atol=1e-9, rtol=1e-4)
    assert (drops > 1e-6).mean() >= 0.8, drops  # measured: 21 of 21
