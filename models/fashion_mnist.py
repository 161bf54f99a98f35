"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, as model-ready arrays.

The package installs the original IDX files (gzip-compressed) under
``/usr/share/datasets/fashion-mnist/``. This module parses them with gzip + numpy
(no torchvision, no downloads) and turns them into the layout the demo models take:

* ``x``: float32, shape ``(N, 1, 32, 32)``, values in ``[0, 1]`` (pixel / 255).
  The 28x28 images are **zero-padded by 2 pixels on every side to 32x32**, so that
  CIFAR-style architectures (five 2x poolings / stride-2 stages) apply unchanged.
  Fashion-MNIST backgrounds are 0, so the padding is just more background.
  No mean/std normalisation: the exported models take ``[0, 1]`` pixels directly.
* ``y``: int64 class ids in ``0..9`` (see :data:`CLASSES`).

Splits: ``train`` = first 55,000 images of the training file, ``val`` = its last
5,000, ``test`` = the 10,000 ``t10k`` images.

Examples::

    x, y = load_split("val", n=1000)          # first 1000 validation images
    python -m models.fashion_mnist --out /tmp/fmnist --train 5000 --val 1000
    python -m models.fashion_mnist --out models/demo --demo   # the shipped demo sets
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABEL_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
PAD = 2  # 28 + 2 * 2 = 32
N_TRAIN_FILE = 60_000
N_VAL = 5_000
SPLITS = ("train", "val", "test")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMNISTError(RuntimeError):
    """The IDX files are missing or malformed."""


def _read_gz(path: Path) -> bytes:
    if not path.is_file():
        raise FashionMNISTError(
            f"Fashion-MNIST file not found: {path}. Install Debian's package with "
            "`sudo apt-get install dataset-fashion-mnist`, or pass data_dir= pointing "
            "at a folder with the four *-ubyte.gz files."
        )
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exc:
        raise FashionMNISTError(f"{path} is not a readable gzip file: {exc}") from exc


def _header(data: bytes, path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    need = 4 * (1 + ndim)
    if len(data) < need:
        raise FashionMNISTError(f"{path}: truncated IDX header ({len(data)} bytes)")
    fields = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    if int(fields[0]) != magic:
        raise FashionMNISTError(
            f"{path}: bad IDX magic number {int(fields[0])} (0x{int(fields[0]):08x}), "
            f"expected {magic} (0x{magic:08x}); the file is corrupt or not this kind of IDX file"
        )
    dims = tuple(int(d) for d in fields[1:])
    if len(data) != need + int(np.prod(dims)):
        raise FashionMNISTError(
            f"{path}: header says {dims} but the payload has {len(data) - need} bytes"
        )
    return dims


def read_idx_images(path: str | Path) -> np.ndarray:
    """Parse an IDX3 image file (``.gz``) into a uint8 array of shape ``(N, rows, cols)``."""
    path = Path(path)
    data = _read_gz(path)
    dims = _header(data, path, IMAGE_MAGIC, 3)
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(dims)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Parse an IDX1 label file (``.gz``) into a uint8 array of shape ``(N,)``."""
    path = Path(path)
    data = _read_gz(path)
    dims = _header(data, path, LABEL_MAGIC, 1)
    labels = np.frombuffer(data, dtype=np.uint8, offset=8).reshape(dims)
    if labels.size and labels.max() > 9:
        raise FashionMNISTError(f"{path}: label {int(labels.max())} out of range 0..9")
    return labels


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 1, 32, 32)`` in ``[0, 1]``, zero-padded by 2."""
    x = np.zeros((images.shape[0], 1, images.shape[1] + 2 * PAD, images.shape[2] + 2 * PAD),
                 dtype=np.float32)
    x[:, 0, PAD:-PAD, PAD:-PAD] = images.astype(np.float32) / 255.0
    return x


def load_split(name: str, *, n: int | None = None,
               data_dir: str | Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x, y)`` for ``name`` in ``train``/``val``/``test``; ``n`` keeps the first ``n``.

    ``x`` is float32 ``(N, 1, 32, 32)`` in ``[0, 1]``; ``y`` is int64 ``(N,)``.
    Example: ``x, y = load_split("test", n=256)``.
    """
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
    img_file, lbl_file = _FILES["test" if name == "test" else "train"]
    images = read_idx_images(Path(data_dir) / img_file)
    labels = read_idx_labels(Path(data_dir) / lbl_file)
    if images.shape[0] != labels.shape[0]:
        raise FashionMNISTError(
            f"{img_file} has {images.shape[0]} images but {lbl_file} has {labels.shape[0]} labels"
        )
    if name != "test":
        cut = images.shape[0] - N_VAL
        sl = slice(0, cut) if name == "train" else slice(cut, None)
        images, labels = images[sl], labels[sl]
    if n is not None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        images, labels = images[:n], labels[:n]
    return to_model_input(images), labels.astype(np.int64)


def balanced_subset(y: np.ndarray, per_class: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``per_class`` random samples of every class in ``y``."""
    rng = np.random.default_rng(seed)
    idx = []
    for c in range(10):
        members = np.flatnonzero(y == c)
        if members.size < per_class:
            raise ValueError(f"class {c} has only {members.size} samples, need {per_class}")
        idx.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(idx))


def write_demo_sets(out_dir: str | Path, *, per_class: int = 250, n_calib: int = 512,
                    seed: int = 0, data_dir: str | Path = DATA_DIR) -> tuple[Path, Path]:
    """Write the shipped demo data sets into ``out_dir``; return their paths.

    * ``fmnist_val.npz``: ``per_class`` random images of every class from the **test**
      split (t10k), with labels (``x``, ``y``), sorted by test index.
    * ``fmnist_calib.npz``: ``n_calib`` random **unlabeled** images (``x`` only) from the
      train split, for calibration / agreement checks.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x, y = load_split("test", data_dir=data_dir)
    idx = balanced_subset(y, per_class, seed=seed)
    val_path = out_dir / "fmnist_val.npz"
    np.savez_compressed(val_path, x=x[idx], y=y[idx])
    x, _ = load_split("train", data_dir=data_dir)
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n_calib, replace=False))
    calib_path = out_dir / "fmnist_calib.npz"
    np.savez_compressed(calib_path, x=x[idx])
    return val_path, calib_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m models.fashion_mnist",
        description="Write Fashion-MNIST splits as .npz (x float32 (N,1,32,32) in [0,1], "
                    "28x28 zero-padded to 32x32; y int64).",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--train", type=int, default=None, metavar="N", help="keep first N train images")
    p.add_argument("--val", type=int, default=None, metavar="N", help="keep first N val images")
    p.add_argument("--test", type=int, default=None, metavar="N", help="keep first N test images")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder with the IDX .gz files")
    p.add_argument("--demo", action="store_true",
                   help="write the demo sets instead: fmnist_val.npz (balanced test subset, "
                        "labeled) and fmnist_calib.npz (unlabeled train images)")
    p.add_argument("--per-class", type=int, default=250, help="--demo: val images per class")
    p.add_argument("--calib", type=int, default=512, help="--demo: number of calibration images")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.demo:
        try:
            paths = write_demo_sets(args.out, per_class=args.per_class, n_calib=args.calib,
                                    data_dir=args.data_dir)
        except FashionMNISTError as exc:
            raise SystemExit(f"error: {exc}") from None
        for path in paths:
            print(f"{path}: {path.stat().st_size:,} bytes")
        return
    for split, n in (("train", args.train), ("val", args.val), ("test", args.test)):
        try:
            x, y = load_split(split, n=n, data_dir=args.data_dir)
        except FashionMNISTError as exc:
            raise SystemExit(f"error: {exc}") from None
        path = args.out / f"fmnist_{split}.npz"
        np.savez_compressed(path, x=x, y=y)
        print(f"{path}: x {x.shape} {x.dtype}, y {y.shape} {y.dtype}")


if __name__ == "__main__":
    main()
