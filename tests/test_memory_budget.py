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


# ---- recovery: the activations kept between layers and the sampled targets obey the budget too


def _pruned_resnet20(n: int):
    from onnxprune import allocate
    from onnxprune.rewrite import apply_mask

    model, x, _ = _resnet20(n)
    cg = find_groups(model)
    scores = score_units(cg, "l1")
    mask = allocate.MaskBuilder(cg, scores).mask(allocate.uniform(cg, scores, target=0.3, round_to=1).keep)
    return cg, mask, apply_mask(cg, mask), x


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_stream_keeps_resident_activations_within_budget_and_spills_the_rest(tmp_path):
    import tempfile

    from onnxprune.activations import Spilled, Stream

    model, x, _ = _resnet20(100)
    runner = Runner(device="cpu", batch_size=32)
    wanted = [n.input[0] for n in model.graph.node if n.op_type == "Conv"][1:12]
    inp = data_inputs(model)[0].name
    refs = dict(zip(wanted, runner.run(model, {inp: x}, wanted)))
    one_batch = max(32 * v[0].nbytes for v in refs.values())  # a float32 batch: what the float16 check may add
    budget = 2**20  # a stage-1 tensor of 100 samples is 3.1 MiB: most of the cache has to go to disk
    tempfile.tempdir = str(tmp_path)  # the spill folder lands here, so the test can see it go
    try:
        with Stream(runner, model, x, budget_bytes=budget) as s:
            for t in wanted:
                got = s.get(model, [t])[t]
                assert got.shape == refs[t].shape
                assert _rel(np.asarray(got, dtype=np.float32), refs[t]) <= 2e-3, t  # float16 in memory, exact on disk
                assert s.nbytes() <= budget + one_batch, (t, s.nbytes())
            assert s.peak_bytes <= budget + one_batch, s.peak_bytes
            assert s.spilled_peak_bytes > budget  # what did not fit went to files, not to memory
            assert any(isinstance(v, Spilled) for v in s.cache.values())
            assert any(tmp_path.iterdir())
        assert not any(tmp_path.iterdir())  # close() removed the spill folder
        big = Stream(runner, model, x, budget_bytes=2**30)
        with Stream(runner, model, x, budget_bytes=0) as zero:
            for t in wanted:
                want = np.asarray(big.get(model, [t])[t])
                assert _rel(want, refs[t]) <= 1e-5  # segments vs one run: rounding only
                np.testing.assert_array_equal(np.asarray(zero.get(model, [t])[t]), want)  # all on disk, float32: identical
                assert zero.nbytes() == 0  # budget 0: nothing stays resident
            assert zero.spilled_peak_bytes > 0 and zero.peak_bytes == 0
        assert big.spilled_peak_bytes == 0 and big.peak_bytes > budget
    finally:
        tempfile.tempdir = None


def test_spilled_array_reads_back_what_was_written(tmp_path):
    from onnxprune.activations import Spilled

    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(k, 3, 4)).astype(np.float32) for k in (5, 7, 2)]
    s = Spilled(str(tmp_path), np.float32, (3, 4))
    for p in parts:
        s.append(p)
    whole = np.concatenate(parts)
    assert s.shape == whole.shape and s.nbytes == 0 and s.disk_bytes == whole.nbytes
    np.testing.assert_array_equal(s[3:11], whole[3:11])
    np.testing.assert_array_equal(np.asarray(s), whole)
    s.close()
    assert not any(tmp_path.iterdir())


def test_reconstruction_obeys_the_memory_budget_and_barely_changes():
    """A stage that ignored the budget would hold the whole activation cache in memory and write nothing to disk."""
    from onnxprune.reconstruct import Reconstructor
    from onnxprune.runtime import Runner as R

    cg, mask, pruned, x = _pruned_resnet20(200)
    full = Reconstructor(cg, x, rows=1024, memory_budget_mb=1024).recover(mask, pruned)
    small_rec = Reconstructor(cg, x, rows=1024, memory_budget_mb=2)
    small = small_rec.recover(mask, pruned)
    assert small_rec.target_budget + small_rec.memory_budget == 2 * 2**20  # targets a quarter, activations the rest
    one_batch = 64 * 16 * 28 * 28 * 4 / 2**20  # largest activation of one batch: what one segment may add
    assert full.spill_peak_mb == 0 and full.cache_peak_mb > 2  # unbounded need: more than the small budget
    assert small.cache_peak_mb <= small_rec.memory_budget / 2**20 + one_batch, small.cache_peak_mb
    assert small.spill_peak_mb > 0  # the rest went to spill files (removed after recover)
    x_new = _resnet20(300)[1][200:]
    runner = R(device="cpu", batch_size=64)
    a, b = runner.run(small.model, x_new)[0], runner.run(full.model, x_new)[0]
    assert _rel(a, b) <= 2e-2  # float16 for what stayed in memory, exact for what was spilled


def test_recovery_and_pipeline_pass_the_budget_on():
    from onnxprune.api import make_calibrator
    from onnxprune.recovery import make_recovery

    model, x, _ = _resnet20(64)
    cg = find_groups(model)
    for rec in (make_recovery(cg, x, "reconstruct", memory_budget_mb=8), make_calibrator(cg, x, "reconstruct", memory_budget_mb=8)):
        assert rec.target_budget + rec.memory_budget == 8 * 2**20
    rec = make_calibrator(cg, x, "reconstruct")  # None: the default budget, as for sensitivity
    assert abs(rec.target_budget + rec.memory_budget - default_memory_budget_mb() * 2**20) < 2**20 * 64


def test_large_activations_get_small_chunks_without_the_arena():
    from onnxprune.runtime import CHUNK_BYTES, largest_activation, lean_batch

    assert lean_batch(16 * 28 * 28 * 4, 64) == (64, True)  # demo ResNet-20: unchanged
    assert lean_batch(64 * 112 * 112 * 4, 64) == (CHUNK_BYTES // (64 * 112 * 112 * 4), False)  # ResNet-50 at 224: 20
    assert lean_batch(10**9, 64) == (1, False)
    assert largest_activation({"a": (None, 16, 28, 28), "b": (None, 10), "c": ("n", 3, "h")}) == 16 * 28 * 28 * 4
    runner = Runner(device="cpu", batch_size=64)
    assert runner.lean(16 * 28 * 28 * 4) is runner
    lean = runner.lean(64 * 112 * 112 * 4)
    assert lean.batch == 20 and not lean.arena


def test_spill_on_a_full_disk_names_the_file_and_the_fix(tmp_path):
    import pytest

    from onnxprune.activations import Spilled
    from onnxprune.errors import OutputError

    s = Spilled(str(tmp_path), np.float32, (64, 64))
    s.file.close()
    s.file = open("/dev/full", "r+b", buffering=0)  # a real device whose writes fail with ENOSPC
    with pytest.raises(OutputError, match="spill file") as info:
        s.append(np.ones((4, 64, 64), np.float32))
    assert "--memory-budget" in str(info.value) and s.rows == 0
