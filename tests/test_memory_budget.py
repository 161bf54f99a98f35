"""--memory-budget bounds the activations sensitivity caches for suffix runs (its own accounting:
``SensitivityRun.cache_peak_bytes``), and the drops do not depend on it."""

from pathlib import Path

import numpy as np
import onnx

from onnxprune.data import Dataset
from onnxprune.evaluate import Evaluator
from onnxprune.groups import find_groups
from onnxprune.importance import score_units
from onnxprune.runtime import Runner, data_inputs
from onnxprune.sensitivity import _fill_cache, analyze, default_memory_budget_mb

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
BUDGETS_MB = (0, 2, 4, 1024)  # ResNet-20 on 100 samples: a stage-1 tensor is 100 * 8*32*32 * 4 B = 3.1 MiB


def _resnet20(n: int = 100):
    model = onnx.load(str(DEMO / "fmnist_resnet20.onnx"))
    with np.load(DEMO / "fmnist_val.npz") as d:
        return model, d["x"][:n], d["y"][:n]


def test_cached_activations_stay_within_budget_and_drops_do_not_change():
    model, x, y = _resnet20()
    cg = find_groups(model)
    scores = score_units(cg, "l1")
    runs = {}
    for mb in BUDGETS_MB:
        ev = Evaluator.from_original(Dataset(x, y, "test"), model, device="cpu", batch_size=32)
        runs[mb] = analyze(cg, scores, ev, grid=(0.25, 0.75), memory_budget_mb=mb)
    peaks = [runs[mb].cache_peak_bytes for mb in BUDGETS_MB]
    for mb, peak in zip(BUDGETS_MB, peaks):
        assert peak <= mb * 2**20, (mb, peak)
    assert peaks == sorted(peaks), peaks  # a smaller budget never caches more
    assert peaks[0] == 0 and 0 < peaks[1] < peaks[-1], peaks  # the budget really limits the cache
    assert runs[0].suffix_evaluations == 0 and runs[1024].suffix_evaluations > 0
    assert runs[2].evaluations > runs[1024].evaluations  # more windows of the original model
    for mb in BUDGETS_MB[1:]:
        assert runs[mb].curves == runs[0].curves, mb  # identical drops whatever the budget


def test_fill_cache_equals_concatenated_run():
    model, x, _ = _resnet20(70)  # 70 = two full batches of 32 and a partial one
    names = [n.output[0] for n in model.graph.node if n.op_type == "Conv"][:3]
    runner = Runner(device="cpu", batch_size=32)
    inp = data_inputs(model)[0].name
    cache = _fill_cache(runner, model, x, inp, names)
    for name, ref in zip(names, runner.run(model, {inp: x}, names)):
        np.testing.assert_array_equal(cache[name], ref)


def test_default_budget_is_a_bounded_share_of_memory():
    assert 0 < default_memory_budget_mb() <= 4096
