"""Tests for onnxprune.data: npz/npy files, hooks, image folders, and fitting data to a model."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import zipfile

import numpy as np
import pytest

from onnxprune.data import Dataset, ImageOptions, check_against_model, load_dataset
from onnxprune.errors import DataError, UsageError

HAVE_PIL = importlib.util.find_spec("PIL") is not None
RNG = np.random.default_rng(0)


def _npz(tmp_path, name="data.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _data_error(spec, match, **kw) -> str:
    with pytest.raises(DataError, match=match) as info:
        load_dataset(spec, **kw)
    text = str(info.value)
    assert "\n" not in text and "To fix:" in text
    return text


# --------------------------------------------------------------------------- npz happy paths
def test_npz_roundtrip_limit_and_batches(tmp_path):
    x = RNG.standard_normal((10, 3, 4, 4)).astype(np.float32)
    y = np.arange(10) % 3
    spec = _npz(tmp_path, x=x, y=y)
    ds = load_dataset(spec)
    assert len(ds) == 10 and ds.source == f"'{spec}'"
    np.testing.assert_array_equal(ds.x, x)
    assert ds.y.dtype == np.int64 and ds.y.tolist() == y.tolist()
    sizes = [(len(bx), len(by)) for bx, by in ds.batches(3)]
    assert sizes == [(3, 3), (3, 3), (3, 3), (1, 1)]
    small = load_dataset(spec, limit=4)
    np.testing.assert_array_equal(small.x, x[:4])
    assert small.y.tolist() == y[:4].tolist()
    assert load_dataset(spec, limit=1000).x.shape[0] == 10
    with pytest.raises(UsageError, match="--batch-size"):
        next(ds.batches(0))


def test_npz_without_labels_npy_and_lenient_labels(tmp_path):
    x = RNG.standard_normal((5, 2)).astype(np.float32)
    assert load_dataset(_npz(tmp_path, x=x)).y is None
    np.save(tmp_path / "x.npy", x)
    ds = load_dataset(str(tmp_path / "x.npy"))
    assert ds.y is None and np.array_equal(ds.x, x)
    ds = load_dataset(_npz(tmp_path, "f.npz", x=x, y=np.array([[0.0], [1.0], [2.0], [1.0], [0.0]])))
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [0, 1, 2, 1, 0]


# --------------------------------------------------------------------------- npz errors
def test_missing_file(tmp_path):
    text = _data_error(str(tmp_path / "nope.npz"), "does not exist")
    assert "nope.npz" in text and "--data" in text
    _data_error("no_such_thing", "does not exist")


def test_not_a_zip(tmp_path):
    (tmp_path / "data.npz").write_text("hello, not numpy")
    text = _data_error(str(tmp_path / "data.npz"), "not an .npz file")
    assert "data.npz" in text and "np.savez" in text


def test_corrupt_npz(tmp_path):
    spec = _npz(tmp_path, x=np.ones((100, 10), np.float32))
    raw = pathlib.Path(spec).read_bytes()
    pathlib.Path(spec).write_bytes(raw[: len(raw) // 2])
    _data_error(spec, "corrupt .npz")


def test_npz_header_cannot_force_a_huge_allocation(tmp_path):
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000,), }"
    header += b" " * (118 - len(header)) + b"\n"
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 16)
    text = _data_error(str(path), "corrupt .npz")
    assert "bomb.npz" in text


def test_missing_x_lists_arrays(tmp_path):
    spec = _npz(tmp_path, images=np.ones((2, 2)), labels=np.zeros(2))
    text = _data_error(spec, "has no array 'x'")
    assert "images, labels" in text and "x=" in text


class _Evil:
    """Unpickling this would create a marker file: the loader must never unpickle."""

    marker: pathlib.Path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_object_arrays_are_refused(tmp_path):
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    spec = _npz(tmp_path, x=np.array([evil, evil], dtype=object))
    assert not evil.marker.exists()
    text = _data_error(spec, "pickled")
    assert "array 'x'" in text and not evil.marker.exists()
    spec = _npz(tmp_path, "y.npz", x=np.ones((2, 2), np.float32), y=np.array([evil, 1], dtype=object))
    assert "array 'y'" in _data_error(spec, "pickled")
    assert not evil.marker.exists()


@pytest.mark.parametrize(
    ("y", "match"),
    [
        (np.arange(9), "9 entries but x has 10 samples"),
        (np.full(10, 0.5), r"not integers \(y\[0\] = "),
        (np.array(["a"] * 10), "not integer class indices"),
        (np.array([0, 1, -1, 2, 0, 1, 2, 0, 1, 2]), r"negative label \(-1 at index 2\)"),
        (np.eye(10, 3), "one-hot"),
    ],
)
def test_bad_labels(tmp_path, y, match):
    spec = _npz(tmp_path, x=np.ones((10, 3), np.float32), y=y)
    assert "labels y" in _data_error(spec, match)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs(tmp_path, bad):
    x = np.ones((6, 2, 2), np.float32)
    x[3, 1, 0] = bad
    text = _data_error(_npz(tmp_path, x=x), "NaN or Inf")
    assert "sample 3" in text


def test_empty_and_bad_limit(tmp_path):
    text = _data_error(_npz(tmp_path, x=np.ones((0, 3), np.float32)), "empty")
    assert "--limit" in text
    spec = _npz(tmp_path, "ok.npz", x=np.ones((3, 3), np.float32))
    with pytest.raises(UsageError, match="--limit"):
        load_dataset(spec, limit=0)


def test_dataset_rejects_inconsistent_labels():
    with pytest.raises(DataError, match="3 samples"):
        Dataset(x=np.ones((3, 2)), y=np.zeros(2, np.int64), source="test")


# --------------------------------------------------------------------------- hooks
def _hook(tmp_path, body: str, name="hook.py") -> pathlib.Path:
    path = tmp_path / name
    path.write_text("import numpy as np\n" + body)
    return path


def test_file_hook_stops_at_limit_on_infinite_generator(tmp_path):
    path = _hook(
        tmp_path,
        "def batches():\n"
        "    i = 0\n"
        "    while True:\n"
        "        yield np.full((4, 2), i, np.float32), np.arange(4) + i\n"
        "        i += 4\n",
    )
    ds = load_dataset(f"{path}:batches", limit=6)
    assert ds.x.shape == (6, 2) and ds.x[:, 0].tolist() == [0, 0, 0, 0, 4, 4]
    assert ds.y.tolist() == [0, 1, 2, 3, 4, 5]


def test_module_hook_from_cwd_gets_limit_and_may_be_unlabeled(tmp_path, monkeypatch):
    _hook(
        tmp_path,
        "def load(limit=None):\n"
        "    assert limit == 3\n"
        "    return [(np.ones((2, 5)), None), (np.zeros((2, 5)), None)]\n",
        name="onnxprune_test_hook_mod.py",
    )
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("onnxprune_test_hook_mod:load", limit=3)
    assert ds.y is None and ds.x.shape == (3, 5)
    assert "onnxprune_test_hook_mod" in sys.modules
    monkeypatch.delitem(sys.modules, "onnxprune_test_hook_mod")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("def f():\n    return None\n", "returned NoneType"),
        ("def f():\n    return 42\n", "returned int"),
        ("def f():\n    return np.ones((3, 2)), np.zeros(3)\n", "single array or pair"),
        ("def f():\n    yield np.ones((3, 2))\n", "batch 0 .* not an \\(inputs, labels\\) pair"),
        ("def f():\n    yield ['a', 'b'], None\n", "batch 0 .* not a numeric array"),
        ("def f():\n    yield np.ones((3, 2)), [0, 1]\n", "batch 0 .* 3 inputs but labels"),
        ("def f():\n    yield np.ones((3, 2)), None\n    yield np.ones((3, 4)), None\n", "batch 1 .* shape \\(3, 4\\)"),
        (
            "def f():\n    yield np.ones((3, 2)), None\n    yield np.ones((3, 2)), np.zeros(3)\n",
            "batch 1 .* has labels unlike",
        ),
        (
            "def f():\n    yield np.ones((3, 2)), None\n    raise ValueError('disk gone')\n",
            "raised ValueError while iterating: disk gone",
        ),
        ("def f():\n    raise KeyError('nope')\n", "raised KeyError"),
        ("def f():\n    return iter([])\n", "yielded no batches"),
        ("def f():\n    yield np.full((2, 2), np.nan), None\n", "NaN or Inf"),
    ],
)
def test_hook_wrong_types(tmp_path, body, match):
    path = _hook(tmp_path, body)
    text = _data_error(f"{path}:f", match)
    assert "hook" in text or "NaN" in text


def test_hook_import_failures(tmp_path):
    assert "--data" in _data_error(f"{tmp_path / 'missing.py'}:f", "hook file .* does not exist")
    text = _data_error("onnxprune_no_such_module_xyz:load", "cannot import data hook")
    assert "No module named" in text
    path = _hook(tmp_path, "raise RuntimeError('boom at import')\n", name="bad.py")
    assert "boom at import" in _data_error(f"{path}:f", "cannot import data hook")
    path = _hook(tmp_path, "def g():\n    pass\n", name="nofunc.py")
    _data_error(f"{path}:f", "has no function 'f'")


# --------------------------------------------------------------------------- image folders
def _image_folder(root: pathlib.Path, colors: dict[str, list[tuple]], size=(10, 8)) -> pathlib.Path:
    from PIL import Image

    for cls, cols in colors.items():
        (root / cls).mkdir(parents=True)
        for i, c in enumerate(cols):
            Image.new("RGB", size, c).save(root / cls / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    if not HAVE_PIL:
        _data_error(str(tmp_path), "pip install pillow")
        return
    root = _image_folder(tmp_path / "imgs", {"dog": [(0, 0, 255), (10, 20, 30)], "cat": [(255, 0, 0)] * 3})
    opts = ImageOptions(size=6, crop=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    ds = load_dataset(str(root), image_options=opts)
    assert ds.x.shape == (5, 3, 4, 4) and ds.x.dtype == np.float32
    assert ds.y.tolist() == [0, 1, 0, 1, 0]  # cat=0, dog=1, round-robin over classes
    expect = (np.array([255, 0, 0]) / 255 - 0.5) / np.array([0.25, 0.5, 1.0])
    np.testing.assert_allclose(ds.x[0, :, 2, 1], expect, rtol=1e-6)
    # bgr, limit keeps both classes
    bgr = load_dataset(str(root), limit=2, image_options=ImageOptions(channel_order="bgr"))
    assert bgr.y.tolist() == [0, 1] and bgr.x.shape == (2, 3, 8, 10)
    np.testing.assert_allclose(bgr.x[1, :, 0, 0], np.array([255, 0, 0]) / 255, rtol=1e-6)
    gray = load_dataset(str(root), image_options=ImageOptions(grayscale=True, scale=1.0))
    assert gray.x.shape == (5, 1, 8, 10) and gray.x[0, 0, 0, 0] == pytest.approx(76, abs=1)


def test_image_folder_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    if not HAVE_PIL:
        _data_error(str(tmp_path / "empty"), "pip install pillow")
        return
    _data_error(str(tmp_path / "empty"), "holds no images")
    root = _image_folder(tmp_path / "mixed", {"a": [(1, 2, 3)]})
    from PIL import Image

    Image.new("RGB", (5, 5)).save(root / "a" / "small.png")
    assert "--image-size" in _data_error(str(root), "became")
    assert load_dataset(str(root), image_options=ImageOptions(size=4, crop=4)).x.shape == (2, 3, 4, 4)
    with pytest.raises(DataError, match="smaller than the 6x6 crop"):
        load_dataset(str(root), image_options=ImageOptions(crop=6))
    (root / "a" / "broken.png").write_bytes(b"not a png")
    assert "broken.png" in _data_error(str(root), "cannot read image")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (3, 3)).save(flat / "one.jpg")
    assert load_dataset(str(flat)).y is None
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow not installed
    text = _data_error(str(flat), "needs Pillow")
    assert "pip install pillow" in text


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"crop": 0}, "--crop"),
        ({"size": -3}, "--image-size"),
        ({"channel_order": "rbg"}, "--channel-order"),
        ({"mean": (0.1, 0.2)}, "--mean has 2 values"),
        ({"std": (1, 0, 1)}, "contains 0"),
        ({"grayscale": True, "mean": (0.1, 0.2, 0.3)}, "1 channel"),
    ],
)
def test_image_options_validation(kw, match):
    with pytest.raises(UsageError, match=match):
        ImageOptions(**kw)


# --------------------------------------------------------------------------- check_against_model
def _ds(shape, dtype=np.float32, y=None) -> Dataset:
    return Dataset(x=np.zeros(shape, dtype), y=None if y is None else np.asarray(y, np.int64), source="'d.npz'")


def _fit(ds, shape=(None, 3, 32, 32), dtype=np.float32, num_classes=10):
    return check_against_model(ds, shape, np.dtype(dtype), input_name="input", num_classes=num_classes)


def test_check_accepts_and_casts():
    ds = _ds((4, 3, 32, 32), y=[0, 9, 1, 2])
    assert _fit(ds) is ds
    assert _fit(ds, shape=(None, 3, None, None)) is ds
    wide = _ds((4, 3, 32, 32), np.float64)
    cast = _fit(wide)
    assert cast.x.dtype == np.float32 and wide.x.dtype == np.float64


def test_check_errors():
    with pytest.raises(DataError, match=r"\(rank 3\) but model input 'input' expects rank 4 \[\?, 3, 32, 32\]"):
        _fit(_ds((4, 32, 32)))
    with pytest.raises(DataError, match=r"NHWC.*transpose\(0, 3, 1, 2\)"):
        _fit(_ds((4, 32, 32, 3)))
    with pytest.raises(DataError, match=r"channels-first NCHW.*transpose\(0, 2, 3, 1\)"):
        _fit(_ds((4, 3, 32, 32)), shape=(None, 32, 32, 3))
    with pytest.raises(DataError, match=r"dim 2 is 28, the model wants 32.*--image-size"):
        _fit(_ds((4, 3, 28, 28)))
    with pytest.raises(DataError, match=r"d.npz' is uint8 but model input 'input' is float32"):
        _fit(_ds((4, 3, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"^label 12 is out of range for a model with 10 outputs"):
        _fit(_ds((3, 3, 32, 32), y=[1, 12, 3]))
    assert _fit(_ds((3, 3, 32, 32), y=[1, 12, 3]), num_classes=None).y.tolist() == [1, 12, 3]
