"""Tests for onnxprune.evaluate: providers, batched sessions, metrics, Evaluator (real ORT sessions)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.data import Dataset
from onnxprune.errors import BadModelError, DataError, DeviceError, UsageError
from onnxprune.evaluate import CPU, CUDA, Evaluator, Metrics, Session, compute_metrics, make_session, resolve_providers


def tiny_cnn(*, batch=None, seed=0, classes=10, scale=1.0) -> onnx.ModelProto:
    """Conv(3->4, 3x3, pad 1) -> GlobalAveragePool -> Flatten -> Gemm(4->classes), input [batch, 3, 8, 8]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * scale).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((classes, 4)).astype(np.float32), "fw"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "fb"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], axis=1, name="flat"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch or "N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch or "N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _x(n=10, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def _cuda_really_loads() -> bool:
    """Independent oracle: does a plain ORT session asked for CUDA actually keep it?"""
    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(tiny_cnn().SerializeToString(), providers=[CUDA, CPU])
        return sess.get_providers()[0] == CUDA
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(3)


# --------------------------------------------------------------------------- providers
def test_resolve_providers_cpu_and_bad_device():
    assert resolve_providers("cpu") == [CPU]
    with pytest.raises(UsageError, match="--device auto, cuda or cpu"):
        resolve_providers("gpu")


def test_cuda_request_matches_what_ort_really_does():
    if _cuda_really_loads():
        s = make_session(tiny_cnn(), device="cuda", threads=1)
        assert s.provider == CUDA and s.device == "cuda" and s.io_binding
        assert resolve_providers("auto")[0] == CUDA
        np.testing.assert_allclose(
            s.run(_x())[0], make_session(tiny_cnn(), device="cpu").run(_x())[0], rtol=1e-3, atol=1e-4
        )
    else:
        with pytest.raises(DeviceError) as info:
            make_session(tiny_cnn(), device="cuda")
        text = str(info.value)
        assert text.startswith("CUDA was requested but ONNX Runtime could not load the CUDA provider (")
        assert "--device cpu" in text and "\n" not in text
        with pytest.raises(DeviceError):
            resolve_providers("cuda")
        assert resolve_providers("auto") == [CPU]
        s = make_session(tiny_cnn(), device="auto", threads=1)
        assert s.provider == CPU and s.device == "cpu" and not s.io_binding


# --------------------------------------------------------------------------- sessions
def test_session_reports_cpu_and_model_io(tmp_path):
    model = tiny_cnn()
    s = make_session(model, device="cpu", threads=1)
    assert (
        (s.provider, s.device)
        == (CPU, "cpu")
        == (ort.InferenceSession(model.SerializeToString(), providers=[CPU]).get_providers()[0], "cpu")
    )
    assert s.input_name == "input" and s.output_names == ["logits"]
    assert s.input_shape == (None, 3, 8, 8) and s.input_dtype == np.float32
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (model.SerializeToString(), str(path), path):
        assert make_session(source, device="cpu", threads=1).output_names == ["logits"]


def test_batched_run_equals_full_batch_run_and_reports_progress():
    s = make_session(tiny_cnn(), device="cpu", threads=1)
    x = _x(10)
    (full,) = s.run(x, batch_size=100)
    calls = []
    (batched,) = s.run(x, batch_size=3, progress=lambda d, t: calls.append((d, t)))
    assert full.shape == (10, 10)
    np.testing.assert_allclose(batched, full, rtol=1e-5, atol=1e-6)
    assert calls == [(3, 10), (6, 10), (9, 10), (10, 10)]
    assert s.run(x, outputs=["logits"])[0].shape == (10, 10)


def test_io_binding_path_gives_same_outputs():
    model = tiny_cnn()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    bound = Session(ort.InferenceSession(model.SerializeToString(), opts, providers=[CPU]), io_binding=True)
    plain = make_session(model, device="cpu", threads=1)
    assert bound.io_binding and not plain.io_binding
    np.testing.assert_allclose(bound.run(_x(7), batch_size=2)[0], plain.run(_x(7))[0], rtol=1e-5, atol=1e-6)


def test_fixed_batch_model_is_padded_and_trimmed():
    fixed = make_session(tiny_cnn(batch=4), device="cpu", threads=1)
    assert fixed.input_shape == (4, 3, 8, 8)
    out = fixed.run(_x(6), batch_size=64)[0]
    ref = make_session(tiny_cnn(), device="cpu", threads=1).run(_x(6))[0]
    assert out.shape == (6, 10)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_session_errors():
    s = make_session(tiny_cnn(), device="cpu", threads=1)
    with pytest.raises(UsageError, match="unknown output"):
        s.run(_x(2), outputs=["nope"])
    with pytest.raises(UsageError, match="--batch-size"):
        s.run(_x(2), batch_size=0)
    with pytest.raises(DataError, match="float64 but model input 'input' is float32"):
        s.run(_x(2).astype(np.float64))
    with pytest.raises(DataError, match=r"ONNX Runtime failed on samples 0\.\.1 of input 'input'"):
        s.run(np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(UsageError, match="--threads"):
        make_session(tiny_cnn(), device="cpu", threads=0)
    with pytest.raises(BadModelError, match="cannot load the model"):
        make_session(b"definitely not onnx", device="cpu")
    with pytest.raises(BadModelError, match="does not exist"):
        make_session("/nonexistent/model.onnx", device="cpu")


# --------------------------------------------------------------------------- metrics
def test_top1_top5_exact_with_ties():
    out = np.zeros((4, 7), np.float32)
    out[0, 2] = 1  # label 2 -> top1
    out[1, [0, 1, 2, 3, 4, 5]] = [6, 5, 4, 3, 2, 1]  # label 5 is 6th -> miss top5; label 4 -> hit
    out[2] = 0  # all tied: argmax 0, top5 = classes 0..4
    out[3, 6] = 1  # label 3 among ties after class 6 -> top5 hit
    m = compute_metrics(out, labels=np.array([2, 5, 4, 3]))
    assert m.top1 == 0.25 and m.top5 == 0.75 and m.n == 4
    assert compute_metrics(out, labels=[2, 0, 0, 6]).top1 == 1.0
    assert compute_metrics(out[:, :5], labels=[2, 4, 0, 0]).top5 is None  # <= 5 classes: top5 says nothing
    assert m.primary() == ("top1", 0.25)
    with pytest.raises(DataError, match="3 labels for 4 outputs"):
        compute_metrics(out, labels=[0, 1, 2])


def test_agreement_cosine_rel_error_exact():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    m = compute_metrics(a, reference=b)
    assert m.agreement == 0.75  # argmax 0,0,0,0 vs 1,0,0,0
    assert m.cosine == 0.5  # per sample 0, 1, 1 (both zero), 0 (one zero)
    assert m.rel_error == pytest.approx(math.sqrt(5) / math.sqrt(10))  # ||a-b||^2 = 5, ||b||^2 = 10
    assert m.primary() == ("agreement", 0.75)
    same = compute_metrics(b, reference=b)
    assert (same.agreement, same.cosine, same.rel_error) == (1.0, 1.0, 0.0)


def test_non_classifier_and_multi_output_metrics():
    a = np.ones((2, 2, 3, 3))
    m = compute_metrics(a, reference=-a, labels=[0, 1])
    assert m.top1 is None and m.agreement is None and m.cosine == -1.0 and m.rel_error == 2.0
    assert m.primary() == ("cosine", -1.0)
    outs = [np.array([[3.0, 0.0]]), np.array([[0.0, 4.0]])]
    refs = [np.array([[3.0, 0.0]]), np.array([[0.0, 0.0]])]
    two = compute_metrics(outs, reference=refs)
    assert two.cosine == pytest.approx(3 / 5) and two.rel_error == pytest.approx(4 / 3) and two.agreement == 1.0
    assert set(two.to_dict()) == {"top1", "top5", "agreement", "cosine", "rel_error", "n"}
    with pytest.raises(DataError, match="reference has"):
        compute_metrics(outs, reference=refs[:1])
    with pytest.raises(UsageError, match="no metric"):
        Metrics(n=3).primary()


# --------------------------------------------------------------------------- evaluator
def test_evaluator_agreement_without_labels():
    ds = Dataset(x=_x(12).astype(np.float64), y=None, source="test")
    calls = []
    ev = Evaluator.from_original(
        ds, tiny_cnn(), device="cpu", batch_size=5, threads=1, progress=lambda d, t: calls.append(d)
    )
    assert ev.dataset.x.dtype == np.float32 and calls == [5, 10, 12]
    assert len(ev.reference_outputs) == 1 and not ev.reference_outputs[0].flags.writeable
    same = ev.evaluate(tiny_cnn())
    assert same.primary() == ("agreement", 1.0) and same.cosine == pytest.approx(1.0) and same.rel_error < 1e-6
    other = ev.evaluate(tiny_cnn(seed=7))
    assert other.n == 12 and other.cosine < 0.999 and other.rel_error > 0.01
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.batch_size = 3


def test_evaluator_with_labels_and_checks():
    x = _x(8)
    logits = make_session(tiny_cnn(), device="cpu", threads=1).run(x)[0]
    ds = Dataset(x=x, y=np.array([0, 1, 2, 3, 4, 5, 6, 7]), source="test")
    ev = Evaluator.from_original(ds, tiny_cnn(), device="cpu", threads=1)
    m = ev.evaluate(tiny_cnn())
    assert m.top1 == float(np.mean(logits.argmax(1) == ds.y)) and m.primary()[0] == "top1"
    bad = Dataset(x=x, y=np.array([0, 1, 2, 3, 4, 5, 6, 12]), source="test")
    with pytest.raises(DataError, match="^label 12 is out of range for a model with 10 outputs"):
        Evaluator.from_original(bad, tiny_cnn(), device="cpu", threads=1)
    with pytest.raises(DataError, match="NHWC"):
        Evaluator.from_original(
            Dataset(x=np.zeros((2, 8, 8, 3), np.float32), y=None, source="t"), tiny_cnn(), device="cpu"
        )
    with pytest.raises(DataError, match="reference outputs have"):
        Evaluator(ds, reference_outputs=[logits[:3]], device="cpu")
    with pytest.raises(UsageError, match="--batch-size"):
        Evaluator(ds, batch_size=0)
