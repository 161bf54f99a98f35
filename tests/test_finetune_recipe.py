"""Fine-tuning recipe: re-inserted BatchNorm, the lr pilot, never ending below the start."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.finetune import FinetuneOptions, choose_reinsert, finetune  # noqa: E402
from onnxprune.graph import load_model  # noqa: E402
from onnxprune.torch_exec import OnnxModule  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """3 classes: the channel with the largest mean over the centre 4x4 (learnable by a small CNN)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, 8, 8)).astype(np.float32)
    y = x[:, :, 2:6, 2:6].mean((2, 3)).argmax(1).astype(np.int64)
    x[np.arange(n), y, 2:6, 2:6] += 0.3
    return x, y


def net(trained_steps: int = 0) -> torch.nn.Module:
    """Conv-BN-ReLU x2 + pool + linear; BN statistics far from (0, 1) so a wrong fold shows."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    )
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 3)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-0.5, 0.5)
    if trained_steps:
        x, y = task(512, seed=9)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        m.train()
        for i in range(trained_steps):
            idx = slice((i * 64) % 512, (i * 64) % 512 + 64)
            loss = torch.nn.functional.cross_entropy(m(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return m.eval()


def export(m: torch.nn.Module, path) -> onnx.ModelProto:
    export_onnx = pytest.importorskip("models.export").export_onnx
    model = load_model(export_onnx(m, path, input_shape=(2, 3, 8, 8), input_name="x", output_name="y"))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # the exporter folded BN
    return model


def ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as rt

    sess = rt.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def structure(model: onnx.ModelProto):
    inits = [(t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer]
    return [n.SerializeToString() for n in model.graph.node], inits, [(o.domain, o.version) for o in model.opset_import]


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    return export(net(), tmp_path_factory.mktemp("m") / "net.onnx")


def test_reinserted_bn_leaves_the_function_and_graph_unchanged(folded):
    x, _ = task(96, seed=1)
    mod = OnnxModule(folded, renormalize=True)
    assert len(mod.renorms) == 2  # both hidden convs; nothing on the classifier
    assert mod.init_normalization(torch.from_numpy(x[i : i + 32]) for i in range(0, 96, 32)) == 2
    gammas = torch.cat([m.weight for m in mod.renorms.values()])
    assert float((gammas.detach() - 1).abs().max()) > 0.1  # real statistics, not an identity that would hide a wrong fold
    with torch.no_grad():
        eval_out = mod.eval()(torch.from_numpy(x)).numpy()
    written = mod.state_to_onnx(folded)
    assert structure(written) == structure(folded)
    np.testing.assert_allclose(eval_out, ort(folded, x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ort(written, x), ort(folded, x), rtol=1e-4, atol=1e-4)


def test_bn_is_folded_back_after_real_training_steps(folded):
    x, y = task(256, seed=2)
    mod = OnnxModule(folded, renormalize=True)
    mod.init_normalization([torch.from_numpy(x[:128])])
    before = {k: v.detach().clone() for k, v in mod.renorms.state_dict().items()}
    opt = torch.optim.SGD(list(mod.parameters()), lr=0.1, momentum=0.9)
    mod.train()
    for i in range(8):
        xb, yb = torch.from_numpy(x[i * 32 : (i + 1) * 32]), torch.from_numpy(y[i * 32 : (i + 1) * 32])
        loss = torch.nn.functional.cross_entropy(mod(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mod.renorms.state_dict()
    for k in ("n0.weight", "n0.bias", "n0.running_mean", "n0.running_var"):
        assert not torch.allclose(before[k], after[k]), f"{k} did not change: the test would not see a wrong fold"
    with torch.no_grad():
        want = mod.eval()(torch.from_numpy(x)).numpy()
    written = mod.state_to_onnx(folded)
    assert structure(written) == structure(folded)
    np.testing.assert_allclose(ort(written, x), want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(ort(written, x), ort(folded, x), atol=1e-3)  # training did change the function


def test_finetune_reinsert_writes_the_same_graph_and_improves(tmp_path):
    start = export(net(), tmp_path / "raw.onnx")  # untrained: fine-tuning must help
    x, y = task(1024, seed=3)
    vx, vy = task(256, seed=4)
    res = finetune(start, x, y, val_x=vx, val_y=vy,
                   options=FinetuneOptions(epochs=2, lr=0.05, batch_size=32, device="cpu", normalization="reinsert"))
    assert res.normalization == "reinsert" and res.renormalized == 2 and res.lr == 0.05 and res.lr_pilot == ()
    assert res.best_epoch >= 1 and res.best_val > res.initial_val + 0.1
    assert structure(res.model) == structure(start)
    acc = float((ort(res.model, vx).argmax(1) == vy).mean())
    assert acc == pytest.approx(res.best_val, abs=1 / 256)  # ORT on the folded-back graph = the module's validation
    folded = finetune(start, x, y, val_x=vx, val_y=vy,
                      options=FinetuneOptions(epochs=1, lr=0.05, batch_size=32, device="cpu", normalization="folded"))
    assert folded.normalization == "folded" and folded.renormalized == 0


def test_auto_normalization_depends_on_batch_size_and_is_measured(folded):
    x, y = task(128, seed=5)
    small = finetune(folded, x, y, val_x=x[:32], val_y=y[:32], options=FinetuneOptions(lr=0.01, batch_size=8, device="cpu"))
    assert small.normalization == "folded" and small.normalization_pilot == ()
    big = finetune(folded, x, y, val_x=x[:32], val_y=y[:32], options=FinetuneOptions(lr=0.01, batch_size=32, device="cpu"))
    (k1, v1), (k2, v2) = big.normalization_pilot  # one short run of each at the lr, scored on validation
    assert (k1, k2) == ("reinsert", "folded") and v1 is not None and v2 is not None
    assert big.normalization == ("reinsert" if choose_reinsert(v1, v2, big.metric, 32) else "folded")
    blind = finetune(folded, x, y, options=FinetuneOptions(lr=0.01, batch_size=32, device="cpu", holdout=0))
    assert blind.normalization == "reinsert" and blind.normalization_pilot == ()  # no validation data: nothing to measure on
    fixed = finetune(folded, x, y, val_x=x[:32], val_y=y[:32], options=FinetuneOptions(lr=0.01, batch_size=32, device="cpu", normalization="reinsert"))
    assert fixed.normalization == "reinsert" and fixed.normalization_pilot == ()


def test_normalization_choice_keeps_reinsertion_unless_folded_is_clearly_better():
    assert choose_reinsert(0.80, 0.87, "top1", 600) is False  # the collapsed MobileNetV2: folded +7 points
    assert choose_reinsert(0.923, 0.920, "top1", 600) is True  # the recovered ResNet-20: within noise, re-insert
    assert choose_reinsert(0.90, 0.91, "top1", 600) is True  # +1 point < one standard error (1.2 points at n=600)
    assert choose_reinsert(0.90, 0.91, "top1", 20000) is False  # the same gap on 20k samples is clear
    assert choose_reinsert(None, 0.5, "top1", 600) is False and choose_reinsert(0.5, None, "top1", 600) is True  # a diverged run loses
    assert choose_reinsert(1.0, 0.99, "teacher_mse", 600) is True and choose_reinsert(1.0, 0.9, "teacher_mse", 600) is False


def test_lr_pilot_chooses_by_validation_and_never_a_diverging_candidate(tmp_path):
    start = export(net(), tmp_path / "raw.onnx")
    x, y = task(1024, seed=6)
    vx, vy = task(256, seed=7)
    opts = FinetuneOptions(epochs=1, batch_size=32, device="cpu", lr_candidates=(1e-7, 0.2, 1e30))
    res = finetune(start, x, y, val_x=vx, val_y=vy, options=opts)
    scores = dict(res.lr_pilot)
    assert set(scores) == {1e-7, 0.2, 1e30}
    assert scores[1e30] is None  # diverged: never chosen
    assert scores[0.2] > scores[1e-7] + 0.1 and res.lr == 0.2
    # validation labels that contradict the training labels: learning makes validation worse,
    # so a pilot that chooses on validation (not on training loss) must pick the lr that learns least
    res2 = finetune(start, x, y, val_x=vx, val_y=(vy + 1) % 3, options=opts)
    assert dict(res2.lr_pilot)[1e30] is None and res2.lr == 1e-7
    # the largest candidate winning opens the grid upwards once (3x)
    res3 = finetune(start, x, y, val_x=vx, val_y=vy, options=FinetuneOptions(epochs=1, batch_size=32, device="cpu", lr_candidates=(1e-7, 0.25)))
    assert [lr for lr, _ in res3.lr_pilot] == [1e-7, 0.25, 0.75] and res3.lr in (0.25, 0.75)


def test_never_ends_below_the_start_on_validation(tmp_path):
    good = export(net(trained_steps=60), tmp_path / "good.onnx")
    vx, vy = task(256, seed=8)
    start_acc = float((ort(good, vx).argmax(1) == vy).mean())
    assert start_acc > 0.8
    x, _ = task(512, seed=10)
    wrong = np.random.default_rng(0).integers(0, 3, len(x))  # labels that teach nothing: training can only hurt
    res = finetune(good, x, wrong, val_x=vx, val_y=vy,
                   options=FinetuneOptions(epochs=2, lr=0.05, batch_size=32, device="cpu"))
    assert res.history and all(h["val"] < start_acc for h in res.history)  # every epoch ended below the start
    assert res.best_epoch == 0 and res.best_val == pytest.approx(start_acc, abs=1 / 256)
    assert res.note and "kept the starting weights" in res.note
    assert res.model.SerializeToString() == good.SerializeToString()  # exactly the starting weights


def test_without_val_a_held_out_split_is_used(folded):
    x, y = task(1200, seed=11)
    res = finetune(folded, x, y, options=FinetuneOptions(epochs=1, lr=0.01, batch_size=32, device="cpu", max_steps_per_epoch=5))
    assert res.val_source == "held out 120 of 1200 training samples" and res.metric == "top1" and res.initial_val is not None
    off = finetune(folded, x, y, options=FinetuneOptions(epochs=1, lr=0.01, batch_size=32, device="cpu", holdout=0, max_steps_per_epoch=5))
    assert off.val_source is None and off.metric is None and "no validation data" in off.note
    few = finetune(folded, x[:900], y[:900], options=FinetuneOptions(epochs=1, lr=0.01, batch_size=32, device="cpu", max_steps_per_epoch=5))
    assert few.val_source is None  # 90 held-out samples would be noise: none are held out


def test_cli_flags(tmp_path, folded):
    from click.testing import CliRunner

    from onnxprune.cli import main

    onnx.save(folded, tmp_path / "m.onnx")
    x, y = task(256, seed=12)
    np.savez(tmp_path / "d.npz", x=x[:192], y=y[:192])
    np.savez(tmp_path / "v.npz", x=x[192:], y=y[192:])
    r = CliRunner().invoke(main, ["finetune", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--val", str(tmp_path / "v.npz"),
                                  "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--normalization", "folded", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "chosen by a pilot on validation top1" in r.output and "normalization: folded" in r.output
    tuned = load_model(tmp_path / "m.finetuned.onnx")
    assert structure(tuned) == structure(folded)
    assert all(numpy_helper.to_array(t).dtype == np.float32 for t in tuned.graph.initializer if t.data_type == 1)
    bad = CliRunner().invoke(main, ["finetune", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--epochs", "1",
                                    "--normalization", "sometimes"])
    assert bad.exit_code != 0 and "sometimes" in bad.output


def test_choose_lr_prefers_the_larger_lr_within_noise():
    from onnxprune.finetune import choose_lr

    # scores of a real 30-step pilot (ResNet-20, -30%): 0.5 points apart on 2,000 images is noise (SE 0.65)
    assert choose_lr([(0.001, 0.9075), (0.003, 0.9065), (0.01, 0.9025)], "top1", 2000) == 0.01
    assert choose_lr([(0.001, 0.908), (0.003, 0.909), (0.01, 0.898)], "top1", 2000) == 0.003  # 1.1 points is not
    assert choose_lr([(0.001, 0.9075), (0.01, 0.9025)], "top1", 100_000) == 0.001  # with more data it is
    assert choose_lr([(0.001, 0.5), (0.01, None)], "top1", 2000) == 0.001  # diverged: never
    assert choose_lr([(0.001, None)], "top1", 2000) is None
    assert choose_lr([(0.001, 1.0), (0.01, 1.01), (0.1, 1.5)], "teacher_mse", 10) == 0.01
