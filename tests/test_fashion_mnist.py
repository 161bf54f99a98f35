"""Fashion-MNIST reader and the shipped demo files under ``models/demo``."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from models import fashion_mnist as fm

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
# shipped file -> size limit in bytes
LIMITS = {
    "fmnist_vgg11.onnx": 5_000_000,
    "fmnist_resnet20.onnx": 2_000_000,
    "fmnist_mobilenetv2.onnx": 2_000_000,
    "fmnist_val.npz": 2_000_000,
    "fmnist_calib.npz": 1_000_000,
}
REQUIRED = ("fmnist_vgg11.onnx", "fmnist_val.npz", "fmnist_calib.npz")
# the shipped models, each with a sidecar .json of training metadata; listed, not globbed, so that
# outputs a user leaves next to them (fmnist_vgg11.pruned.onnx, *.finetuned.onnx) are not tested
MODELS = ("fmnist_mobilenetv2.onnx", "fmnist_resnet20.onnx", "fmnist_vgg11.onnx")

needs_data = pytest.mark.skipif(
    not (fm.DATA_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


@needs_data
def test_read_real_idx_files():
    images = fm.read_idx_images(fm.DATA_DIR / "t10k-images-idx3-ubyte.gz")
    labels = fm.read_idx_labels(fm.DATA_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == [1000] * 10
    train_labels = fm.read_idx_labels(fm.DATA_DIR / "train-labels-idx1-ubyte.gz")
    assert train_labels.shape == (60_000,)


@needs_data
def test_load_split_layout():
    x, y = fm.load_split("val", n=64)
    assert x.shape == (64, 1, 32, 32) and x.dtype == np.float32
    assert y.shape == (64,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    # 28x28 zero-padded by 2 on every side
    assert not x[:, :, :2].any() and not x[:, :, -2:].any()
    assert not x[:, :, :, :2].any() and not x[:, :, :, -2:].any()
    # val is the tail of the training file
    raw = fm.read_idx_labels(fm.DATA_DIR / "train-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(y, raw[55_000:55_064])
    with pytest.raises(ValueError, match="unknown split"):
        fm.load_split("validation")


def _write_gz(path: Path, data: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


@needs_data
def test_corrupt_copy_is_refused(tmp_path):
    with gzip.open(fm.DATA_DIR / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        data = bytearray(f.read())
    bad_magic = data.copy()
    bad_magic[3] = 0x03  # 2049 -> 2051 (the image magic)
    with pytest.raises(fm.FashionMNISTError, match="magic"):
        fm.read_idx_labels(_write_gz(tmp_path / "magic.gz", bytes(bad_magic)))
    with pytest.raises(fm.FashionMNISTError, match="payload"):
        fm.read_idx_labels(_write_gz(tmp_path / "short.gz", bytes(data[:-10])))
    bad_label = data.copy()
    bad_label[8] = 42
    with pytest.raises(fm.FashionMNISTError, match="out of range"):
        fm.read_idx_labels(_write_gz(tmp_path / "label.gz", bytes(bad_label)))
    (tmp_path / "plain.gz").write_bytes(bytes(data))  # not gzip-compressed
    with pytest.raises(fm.FashionMNISTError, match="gzip"):
        fm.read_idx_labels(tmp_path / "plain.gz")


def test_missing_package_error_says_how_to_install(tmp_path):
    with pytest.raises(fm.FashionMNISTError, match="apt-get install dataset-fashion-mnist"):
        fm.load_split("test", data_dir=tmp_path)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_demo_files_exist_and_fit(name):
    path = DEMO / name
    if not path.exists():
        if name in REQUIRED:
            pytest.fail(f"shipped demo file {path} is missing")
        pytest.skip(f"optional demo file {name} not shipped")
    assert path.stat().st_size <= LIMITS[name], f"{name}: {path.stat().st_size:,} bytes"


def test_demo_data_layout():
    with np.load(DEMO / "fmnist_val.npz", allow_pickle=False) as d:
        assert sorted(d.files) == ["x", "y"]
        x, y = d["x"], d["y"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 32, 32) and y.dtype == np.int64
    assert len(x) == len(y) >= 1000
    assert np.bincount(y, minlength=10).tolist() == [len(y) // 10] * 10
    with np.load(DEMO / "fmnist_calib.npz", allow_pickle=False) as d:
        assert d.files == ["x"]
        assert d["x"].shape == (512, 1, 32, 32) and d["x"].dtype == np.float32


def test_every_shipped_model_is_tested():
    """A model shipped with its sidecar .json must be in MODELS (and every listed model is shipped)."""
    assert sorted(p.with_suffix(".onnx").name for p in DEMO.glob("fmnist_*.json")) == sorted(MODELS)
    assert set(MODELS) <= set(LIMITS)


@pytest.mark.parametrize("name", MODELS)
def test_demo_model_accuracy_matches_documented(name):
    ort = pytest.importorskip("onnxruntime")
    meta = json.loads((DEMO / name).with_suffix(".json").read_text())
    documented = meta["eval"]["fmnist_val.npz"]["acc_ort"]
    assert f"{documented:.2f}" in (DEMO / "README.md").read_text(), "README and sidecar disagree"
    with np.load(DEMO / "fmnist_val.npz", allow_pickle=False) as d:
        x, y = d["x"], d["y"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(DEMO / name), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.shape[1:] == [1, 32, 32] and not isinstance(inp.shape[0], int)  # dynamic batch
    pred = np.concatenate([sess.run(None, {inp.name: x[i:i + 500]})[0].argmax(1)
                           for i in range(0, len(x), 500)])
    acc = 100.0 * float((pred == y).mean())
    assert abs(acc - documented) <= 0.5, f"{name}: {acc:.2f}% vs documented {documented:.2f}%"
