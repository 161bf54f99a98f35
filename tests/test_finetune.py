"""Fine-tuning: raises accuracy on real data, writes weights back, fails clearly."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.errors import DataError, DeviceError, FinetuneError, UsageError  # noqa: E402
from onnxprune.finetune import FinetuneOptions, FinetuneResult, finetune, finetune_ddp_entry  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Two shared cores: torch's default thread pool oversubscribes them badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def export(net: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> onnx.ModelProto:
    export_onnx = pytest.importorskip("models.export").export_onnx
    return load_model(export_onnx(net, path, input_shape=shape, input_name="x", output_name="y"))


def ort_outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def tiny_net(classes: int = 10, channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, classes),
    ).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> onnx.ModelProto:
    return export(tiny_net(), tmp_path_factory.mktemp("tiny") / "tiny.onnx", (2, 3, 8, 8))


def toy_data(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32) * 0.5
    x[:, 0] += y[:, None, None] / 5.0  # a learnable signal
    return x, y.astype(np.int64)


FAST = FinetuneOptions(epochs=1, lr=0.05, batch_size=16, device="cpu")


# --------------------------------------------------------------------------- Fashion-MNIST
def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


def _shrink(model: onnx.ModelProto, keep1: np.ndarray, keep2: np.ndarray) -> onnx.ModelProto:
    """Prune by hand: keep channels ``keep1`` of conv 1 and ``keep2`` of conv 2 (7x7 map -> Gemm)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    t = {x.name: x for x in m.graph.initializer}
    conv1, conv2 = [n for n in m.graph.node if n.op_type == "Conv"]
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")

    def put(name, array):
        t[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))

    a = lambda name: numpy_helper.to_array(t[name])  # noqa: E731
    put(conv1.input[1], a(conv1.input[1])[keep1])
    put(conv1.input[2], a(conv1.input[2])[keep1])
    put(conv2.input[1], a(conv2.input[1])[keep2][:, keep1])
    put(conv2.input[2], a(conv2.input[2])[keep2])
    w = a(gemm.input[1])  # (classes, C*49), channel-major flatten
    put(gemm.input[1], w.reshape(w.shape[0], -1, 49)[:, keep2].reshape(w.shape[0], -1))
    onnx.checker.check_model(m)
    return m


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_finetuning_a_pruned_model_raises_fashion_mnist_accuracy(tmp_path):
    images, labels = _idx(FMNIST / "train-images-idx3-ubyte.gz"), _idx(FMNIST / "train-labels-idx1-ubyte.gz")
    pick = np.random.default_rng(0).permutation(len(images))[:4000]
    x = ((images[pick].astype(np.float32) / 255 - 0.286) / 0.353)[:, None]
    y = labels[pick].astype(np.int64)
    tx, ty, vx, vy = x[:3000], y[:3000], x[3000:], y[3000:]

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 49, 10),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    order = np.random.default_rng(1).permutation(3000)
    for i in range(0, 3000, 64):
        b = order[i : i + 64]
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(tx[b])), torch.from_numpy(ty[b]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    original = export(net.eval(), tmp_path / "fm.onnx", (2, 1, 28, 28))
    w1 = inits(original)[[n for n in original.graph.node if n.op_type == "Conv"][0].input[1]]
    w2 = inits(original)[[n for n in original.graph.node if n.op_type == "Conv"][1].input[1]]
    keep1 = np.sort(np.argsort(-np.abs(w1).sum((1, 2, 3)))[:3])  # 8 -> 3 channels
    keep2 = np.sort(np.argsort(-np.abs(w2[:, keep1]).sum((1, 2, 3)))[:6])  # 16 -> 6 channels
    pruned = _shrink(original, keep1, keep2)
    pruned_bytes = pruned.SerializeToString()

    def acc(model):
        return float((ort_outputs(model, vx).argmax(1) == vy).mean())

    before, orig_acc = acc(pruned), acc(original)
    result = finetune(pruned, tx, ty, val_x=vx, val_y=vy,
                      options=FinetuneOptions(epochs=1, lr=0.05, batch_size=64, seed=0, augment=False, device="cpu"))
    after = acc(result.model)
    assert pruned.SerializeToString() == pruned_bytes
    assert result.stopped_reason is None and result.best_epoch == 1 and result.metric == "top1"
    assert after == pytest.approx(result.best_val, abs=2e-3)  # ORT on the written-back model agrees
    assert result.initial_val == pytest.approx(before, abs=2e-3)
    assert after >= before + 0.25, (orig_acc, before, after)  # measured: 0.73 original, 0.14 pruned, 0.76 tuned
    assert result.seconds < 40
    # distillation from the unpruned model, with labels, also recovers accuracy
    kd = finetune(pruned, tx, ty, val_x=vx, val_y=vy, teacher=original,
                  options=FinetuneOptions(epochs=1, lr=0.05, batch_size=64, augment=True, device="cpu"))
    assert acc(kd.model) >= before + 0.2  # measured: 0.66


# --------------------------------------------------------------------------- behaviour
def test_result_is_a_new_model_with_same_structure(tiny):
    x, y = toy_data()
    original = tiny.SerializeToString()
    events = []
    result = finetune(tiny, x, y, val_x=x[:32], val_y=y[:32], options=FAST, progress=events.append)
    assert isinstance(result, FinetuneResult) and result.device == "cpu"
    assert tiny.SerializeToString() == original
    assert [n.SerializeToString() for n in result.model.graph.node] == [n.SerializeToString() for n in tiny.graph.node]
    assert [t.name for t in result.model.graph.initializer] == [t.name for t in tiny.graph.initializer]
    assert result.model.opset_import == tiny.opset_import
    assert len(result.history) == 1 and {"train_loss", "val", "train_acc", "epoch"} <= set(result.history[0])
    pilot = [e for e in events if e["kind"] in ("pilot_step", "normalization_pilot")]  # normalization="auto" measures both
    assert pilot[-1]["kind"] == "normalization_pilot" and [k for k, _ in result.normalization_pilot] == ["reinsert", "folded"]
    kinds = [e["kind"] for e in events if e not in pilot]
    assert kinds[0] == "start" and kinds[-1] == "epoch" and kinds.count("step") == 4
    step = next(e for e in events if e["kind"] == "step")
    assert {"epoch", "step", "steps", "loss", "acc"} <= set(step)
    json.dumps(result.history)


def test_library_never_prints(tiny, capsys):
    x, y = toy_data()
    finetune(tiny, x, y, options=FAST)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_same_seed_same_weights(tiny):
    x, y = toy_data()
    opts = FinetuneOptions(epochs=2, lr=0.05, batch_size=16, device="cpu", augment=True, seed=3, holdout=0)  # no selection
    a = finetune(tiny, x, y, options=opts).model.SerializeToString()
    b = finetune(tiny, x, y, options=opts).model.SerializeToString()
    assert a == b
    c = finetune(tiny, x, y, options=FinetuneOptions(epochs=2, lr=0.05, batch_size=16, device="cpu", seed=4, holdout=0))
    assert c.model.SerializeToString() != a


def test_best_epoch_weights_are_kept(tiny):
    x, y = toy_data()
    vx, vy = toy_data(32, seed=1)
    result = finetune(tiny, x, y, val_x=vx, val_y=vy, options=FinetuneOptions(epochs=3, lr=0.05, batch_size=16, device="cpu"))
    vals = [result.initial_val] + [h["val"] for h in result.history]
    assert result.best_val == max(vals) and vals.index(result.best_val) == result.best_epoch
    acc = float((ort_outputs(result.model, vx).argmax(1) == vy).mean())
    assert acc == pytest.approx(result.best_val)


def test_label_free_distillation_with_adamw(tiny):
    x, _ = toy_data()
    student = inits(tiny)
    result = finetune(tiny, x, None, val_x=x[:32], teacher=tiny,
                      options=FinetuneOptions(epochs=1, lr=1e-3, batch_size=16, optimizer="adamw", device="cpu"))
    assert result.metric == "agreement" and result.initial_val == 1.0  # the teacher agrees with itself
    assert result.history[0]["train_acc"] is None
    assert set(inits(result.model)) == set(student)


def test_dense_outputs_distill_with_mse(tmp_path):
    class Seg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.dec = torch.nn.ConvTranspose2d(4, 1, 2, stride=2)

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))

    torch.manual_seed(0)
    teacher = export(Seg().eval(), tmp_path / "t.onnx", (2, 3, 8, 8))
    torch.manual_seed(1)
    student = export(Seg().eval(), tmp_path / "s.onnx", (2, 3, 8, 8))
    x, _ = toy_data()
    result = finetune(student, x, None, val_x=x[:32], teacher=teacher,
                      options=FinetuneOptions(epochs=2, lr=0.05, batch_size=16, device="cpu"))
    assert result.metric == "teacher_mse"
    assert result.best_val < result.initial_val


def test_ddp_code_path_with_one_process(tiny, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    x, y = toy_data()
    out = tmp_path / "ddp.onnx"
    result = finetune_ddp_entry(tiny, x, y, out=out, options=FinetuneOptions(epochs=1, lr=0.05, batch_size=16, device="cpu"))
    assert not torch.distributed.is_initialized()
    assert out.exists() and result.stopped_reason is None
    assert inits(load_model(out)).keys() == inits(tiny).keys()


# --------------------------------------------------------------------------- failures
def test_nan_loss_stops_and_keeps_last_good_weights(tiny):
    x, y = toy_data()
    result = finetune(tiny, x, y, options=FinetuneOptions(epochs=2, lr=1e30, batch_size=16, device="cpu", momentum=0.0))
    assert result.stopped_reason is not None and "--lr" in result.stopped_reason
    assert "nan" in result.stopped_reason or "inf" in result.stopped_reason
    assert result.best_epoch == 0 and result.history == ()
    for k, v in inits(result.model).items():
        np.testing.assert_array_equal(v, inits(tiny)[k])


def test_no_labels_and_no_teacher(tiny):
    x, _ = toy_data()
    with pytest.raises(DataError, match="no labels.*--teacher"):
        finetune(tiny, x, None, options=FAST)
    with pytest.raises(DataError, match="validation data has no labels"):
        finetune(tiny, x, toy_data()[1], val_x=x, options=FAST)


def test_teacher_must_match_the_student(tiny, tmp_path):
    x, y = toy_data()
    five = export(tiny_net(classes=5), tmp_path / "five.onnx", (2, 3, 8, 8))
    with pytest.raises(FinetuneError, match="teacher output.*class count"):
        finetune(tiny, x, y, teacher=five, options=FAST)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(tiny)
    old = renamed.graph.input[0].name
    renamed.graph.input[0].name = "image"
    for n in renamed.graph.node:
        n.input[:] = ["image" if i == old else i for i in n.input]
    with pytest.raises(FinetuneError, match="teacher input 'image'.*--teacher"):
        finetune(tiny, x, y, teacher=renamed, options=FAST)
    gray = export(tiny_net(channels=1), tmp_path / "gray.onnx", (2, 1, 8, 8))
    with pytest.raises(FinetuneError, match="teacher input shape"):
        finetune(tiny, x, y, teacher=gray, options=FAST)


def test_unsupported_ops_are_listed():
    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"]), helper.make_node("Einsum", ["v"], ["e"], equation="ij->ij"),
         helper.make_node("Gemm", ["e", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.array([2], np.int64), "k"), numpy_helper.from_array(np.ones((2, 3), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.ones((8, 4), np.float32)
    with pytest.raises(FinetuneError, match="Einsum, TopK"):
        finetune(model, x, np.zeros(8, np.int64), options=FAST)


def test_bad_data_is_refused(tiny):
    x, y = toy_data()
    with pytest.raises(DataError, match=r"expects \['N', 3, 8, 8\]"):
        finetune(tiny, x[:, :2], y, options=FAST)
    with pytest.raises(DataError, match="rank 4"):
        finetune(tiny, x[:, 0], y, options=FAST)
    with pytest.raises(DataError, match="10 classes"):
        finetune(tiny, x, y + 5, options=FAST)
    with pytest.raises(DataError, match="integers"):
        finetune(tiny, x, y.astype(np.float32), options=FAST)
    with pytest.raises(DataError, match="64 samples but 10 labels"):
        finetune(tiny, x, y[:10], options=FAST)
    with pytest.raises(DataError, match="floats"):
        finetune(tiny, (x * 10).astype(np.uint8), y, options=FAST)


def test_options_are_validated():
    with pytest.raises(UsageError, match="--optimizer"):
        FinetuneOptions(optimizer="rmsprop")
    with pytest.raises(UsageError, match="--epochs"):
        FinetuneOptions(epochs=0)
    with pytest.raises(UsageError, match="--device"):
        FinetuneOptions(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_device_error(tiny):
    x, y = toy_data()
    with pytest.raises(DeviceError, match="--device cpu"):
        finetune(tiny, x, y, options=FinetuneOptions(device="cuda"))


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_without_torch_fine_tuning_says_how_to_install():
    code = """
import sys
sys.modules['torch'] = None
import numpy as np
from onnx import helper, TensorProto
import onnxprune, onnxprune.finetune as ft
from onnxprune.errors import MissingDependencyError
g = helper.make_graph([helper.make_node('Relu', ['x'], ['y'])], 'g',
    [helper.make_tensor_value_info('x', TensorProto.FLOAT, [2])], [helper.make_tensor_value_info('y', TensorProto.FLOAT, [2])])
opts = ft.FinetuneOptions(epochs=2)
for call in (lambda: ft.finetune(helper.make_model(g), np.zeros((2, 2), np.float32), np.zeros(2, np.int64), options=opts),
             lambda: __import__('onnxprune.torch_exec')):
    try:
        call()
        print('NO ERROR')
    except MissingDependencyError as e:
        print('OK', e)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("OK fine-tuning needs torch") for line in lines), proc.stdout
    assert "pip install 'onnxprune[finetune]'" in lines[0]


def test_package_imports_without_torch():
    code = """
import importlib, pkgutil, sys, onnxprune
bad = []
for m in pkgutil.iter_modules(onnxprune.__path__):
    if m.name in ('torch_exec', 'torch_ops'):  # the torch-only modules
        continue
    importlib.import_module('onnxprune.' + m.name)
    if 'torch' in sys.modules:
        bad.append(m.name)
        break
print('BAD' if bad else 'CLEAN', bad)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CLEAN"), proc.stdout


def test_torchrun_two_processes_train_one_model(tiny, tmp_path):
    """The documented multi-GPU recipe, run with two CPU processes (gloo): both ranks end
    with the same weights (gradients are averaged), and rank 0 writes the model."""
    onnx.save(tiny, str(tmp_path / "tiny.onnx"))
    x, y = toy_data(n=96)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    (tmp_path / "train_ddp.py").write_text(
        "import hashlib, os, numpy as np, onnx\n"
        "from onnx import numpy_helper\n"
        "from onnxprune.finetune import FinetuneOptions, finetune_ddp_entry\n"
        "d = np.load('train.npz')\n"
        "r = finetune_ddp_entry(onnx.load('tiny.onnx'), d['x'], d['y'], out='tuned.onnx',\n"
        "                       options=FinetuneOptions(epochs=2, lr=0.05, batch_size=16, device='cpu', holdout=0))\n"
        "h = hashlib.sha256(b''.join(numpy_helper.to_array(t).tobytes() for t in r.model.graph.initializer)).hexdigest()\n"
        "open(f\"rank{os.environ['RANK']}.txt\", 'w').write(h)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # one relaunch on a fresh port: on a loaded 2-core machine a rank was once seen aborting at
    # start-up (SIGABRT, 1 run in 4, passing alone right after); a real fault fails both launches
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "train_ddp.py"]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr[-2000:]
    h0, h1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert h0 == h1, "DDP ranks diverged"
    tuned = load_model(tmp_path / "tuned.onnx")
    onnx.checker.check_model(tuned, full_check=True)
    assert [n.SerializeToString() for n in tuned.graph.node] == [n.SerializeToString() for n in tiny.graph.node]
    changed = [k for k, v in inits(tuned).items() if not np.array_equal(v, inits(tiny)[k])]
    assert changed, "training changed no weight"
