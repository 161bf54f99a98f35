"""Evaluation and calibration data: ``.npz`` files, image folders, Python hooks.

:func:`load_dataset` turns a ``--data`` spec into a :class:`Dataset`:

* ``data.npz`` with an array ``x`` (inputs, batch axis first) and optionally
  ``y`` (integer class labels), read with ``allow_pickle=False``; a bare
  ``.npy`` file is read as ``x`` without labels;
* ``images/`` with one subfolder per class (labels are the indices of the
  sorted folder names, as in torchvision's ``ImageFolder``); a folder holding
  only images gives an unlabeled dataset. Needs Pillow;
* ``module:function`` or ``path/to/hook.py:function``: user code (explicit
  opt-in) returning an iterable of ``(inputs, labels_or_None)`` batches.

:func:`check_against_model` then checks the data against the model's input
(rank, fixed dims, NCHW vs NHWC, dtype) and labels against its classes.
Every problem is a one-line :class:`~onnxprune.errors.DataError`.

Example: ``ds = load_dataset("val.npz", limit=512)``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import math
import re
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

from .errors import DataError, UsageError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_NPZ_FIX = (
    "save inputs as 'x' and labels as 'y': np.savez('data.npz', x=x.astype(np.float32), y=y.astype(np.int64)),"
    " then pass --data data.npz"
)
_HOOK_RE = re.compile(r"^(?P<target>.+):(?P<func>[A-Za-z_]\w*)$")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Inputs ``x`` (samples on axis 0), optional int64 labels ``y``, and where they came from."""

    x: np.ndarray
    y: np.ndarray | None
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.ndim == 0:
            raise DataError(
                f"data from {self.source} must be an array with a sample axis", fix="pass x with shape (N, ...)"
            )
        if self.y is not None and (self.y.ndim != 1 or len(self.y) != len(self.x)):
            raise DataError(
                f"data from {self.source} has {len(self.x)} samples but labels of shape {tuple(self.y.shape)}",
                fix="give one integer label per sample",
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Yield ``(x[i:i+b], y[i:i+b] or None)`` slices (views, not copies)."""
        if int(batch_size) < 1:
            raise UsageError(f"batch size {batch_size} is not positive", fix="pass --batch-size 1 or more")
        for i in range(0, len(self), int(batch_size)):
            yield self.x[i : i + batch_size], None if self.y is None else self.y[i : i + batch_size]


@dataclass(frozen=True)
class ImageOptions:
    """How image files become an NCHW float32 array.

    Per image: resize so the shorter side is ``size`` (bilinear), center-crop to
    ``crop`` x ``crop``, then ``value = (pixel * scale - mean[c]) / std[c]``.
    ``mean``/``std`` are in the output channel order (BGR when ``channel_order='bgr'``).
    """

    size: int | None = None
    crop: int | None = None
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    channel_order: Literal["rgb", "bgr"] = "rgb"
    scale: float = 1 / 255
    grayscale: bool = False

    def __post_init__(self) -> None:
        for name, flag in (("size", "--image-size"), ("crop", "--crop")):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise UsageError(f"image {name} {v!r} is not a positive integer", fix=f"pass {flag} N with N >= 1")
        if self.channel_order not in ("rgb", "bgr"):
            raise UsageError(f"unknown channel order {self.channel_order!r}", fix="pass --channel-order rgb or bgr")
        for name in ("mean", "std"):
            self._per_channel(name)
        if any(s == 0 for s in self.std):
            raise UsageError(f"--std {tuple(self.std)} contains 0", fix="give non-zero standard deviations")

    def _per_channel(self, name: str) -> np.ndarray:
        vals = np.asarray(getattr(self, name), dtype=np.float32).reshape(-1)
        channels = 1 if self.grayscale else 3
        if self.grayscale and vals.size == 3 and np.all(vals == vals[0]):
            vals = vals[:1]
        if vals.size not in (1, channels):
            raise UsageError(
                f"--{name} has {vals.size} values but images have {channels} channel(s)",
                fix=f"give 1 or {channels} values to --{name}",
            )
        return vals


# --------------------------------------------------------------------------- entry point
@contextlib.contextmanager
def naming_flag(flag: str) -> Iterator[None]:
    """Data errors raised inside name ``flag`` (``--calib-data``, ``--train-data``) where they say ``--data``,
    so the fix points at the option the user actually passed."""
    try:
        yield
    except (DataError, UsageError) as exc:
        if flag == "--data" or "--data" not in f"{exc.message} {exc.fix or ''}":
            raise
        fix = exc.fix.replace("--data", flag) if exc.fix else None
        raise type(exc)(exc.message.replace("--data", flag), fix=fix, node=exc.node) from None


def load_dataset(
    spec: str,
    *,
    limit: int | None = None,
    image_options: ImageOptions | None = None,
    progress: Progress | None = None,
    flag: str = "--data",
) -> Dataset:
    """Load ``spec`` (npz/npy file, image folder, or ``module:function`` hook); keep the first ``limit`` samples.

    Image folders are ordered round-robin over classes so a ``limit`` keeps
    every class. ``progress(done, total)`` is called while images are decoded.
    ``flag`` is the option that named ``spec``: errors name it and suggest it.
    """
    with naming_flag(flag):
        ds = _load_dataset(spec, limit=limit, image_options=image_options, progress=progress)
    return ds if flag == "--data" else replace(ds, source=f"{flag} {ds.source}")


def _load_dataset(spec: str, *, limit: int | None, image_options: ImageOptions | None, progress: Progress | None) -> Dataset:
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise UsageError(
            f"--limit {limit} is not a positive number of samples", fix="pass --limit 1 or more, or leave it out"
        )
    path = Path(spec)
    if path.is_dir():
        x, y = _load_images(path, image_options or ImageOptions(), limit, progress)
    elif path.is_file():
        x, y = _load_array_file(path)
    elif _HOOK_RE.match(spec):
        x, y = _load_hook(spec, limit)
    else:
        raise DataError(
            f"data '{spec}' does not exist (neither a file, a folder, nor a 'module:function' hook)",
            fix="check the --data path: an .npz with x (and y), a folder of class subfolders, or module:function",
        )
    if limit is not None and limit < len(x):  # copy so the full arrays can be freed
        x, y = x[:limit].copy(), None if y is None else y[:limit].copy()
    ds = _finalize(x, y, f"'{spec}'")
    log.info("loaded %d samples of shape %s from %s", len(ds), ds.x.shape[1:], spec)
    return ds


def _finalize(x: np.ndarray, y: np.ndarray | None, source: str) -> Dataset:
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise DataError(f"inputs x from {source} have dtype {x.dtype}, not a numeric type", fix=_NPZ_FIX)
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(
            f"data from {source} is empty (0 samples)",
            fix="pass --data with at least one sample and a --limit of 1 or more",
        )
    if x.dtype.kind == "f":
        step = max(1, (1 << 22) // max(1, x[0].size))
        for i in range(0, len(x), step):
            bad = ~np.isfinite(x[i : i + step])
            if bad.any():
                first = i + int(np.argwhere(bad)[0][0])
                raise DataError(
                    f"inputs x from {source} contain NaN or Inf values (first in sample {first})",
                    fix="clean the data (e.g. drop those samples or use np.nan_to_num) before passing it with --data",
                )
    return Dataset(x=x, y=None if y is None else _check_labels(np.asarray(y), len(x), source), source=source)


def _check_labels(y: np.ndarray, n: int, source: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot?)" if y.ndim == 2 else ""
        raise DataError(
            f"labels y from {source} have shape {tuple(y.shape)}{hint}, expected one class index per sample",
            fix="save 1-D integer labels, e.g. y = onehot.argmax(1)",
        )
    if len(y) != n:
        raise DataError(
            f"labels y from {source} have {len(y)} entries but x has {n} samples",
            fix="save exactly one label per sample in y",
        )
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"labels y from {source} are not integers (y[{i}] = {float(y[i])})",
                fix="save integer class indices, e.g. y.astype(np.int64)",
            )
    elif y.dtype.kind not in "iu":
        raise DataError(
            f"labels y from {source} have dtype {y.dtype}, not integer class indices",
            fix="save integer class indices, e.g. y.astype(np.int64)",
        )
    if y.size and y.min() < 0:
        i = int(np.argmin(y))
        raise DataError(
            f"labels y from {source} contain a negative label ({y[i]:g} at index {i})",
            fix="use 0-based class indices; drop unlabeled samples",
        )
    return y.astype(np.int64)


# --------------------------------------------------------------------------- npz / npy
def _read_npy(f, size: int, where: str) -> np.ndarray:
    """Read one .npy stream, trusting nothing: no pickles, header must match ``size`` bytes."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = reader(f)
    if dtype.hasobject:
        raise DataError(
            f"{where} holds Python objects (a pickled array), which onnxprune refuses to load",
            fix="save plain numeric arrays, e.g. np.savez('data.npz', x=np.asarray(x, np.float32))",
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if size - f.tell() != nbytes:
        raise ValueError(f"header says {shape} {dtype} ({nbytes} bytes) but {size - f.tell()} bytes follow")
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        k = f.readinto(view[got:])
        if not k:
            raise ValueError("data is truncated")
        got += k
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _load_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with path.open("rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        try:
            with path.open("rb") as f:
                return _read_npy(f, path.stat().st_size, f"'{path}'"), None
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"'{path}' is a corrupt .npy file ({exc})", fix=_NPZ_FIX) from exc
    if not magic.startswith(b"PK"):
        raise DataError(f"'{path}' is not an .npz file (not a zip archive)", fix=_NPZ_FIX)
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            if "x" not in members:
                have = ", ".join(sorted(members)) or "no arrays"
                raise DataError(f"'{path}' has no array 'x' (it has: {have})", fix=_NPZ_FIX)
            arrays = {}
            for key in ("x", "y"):
                if key in members:
                    info = zf.getinfo(members[key])
                    with zf.open(info) as f:
                        arrays[key] = _read_npy(f, info.file_size, f"array '{key}' in '{path}'")
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise DataError(
            f"'{path}' is a corrupt .npz file ({type(exc).__name__}: {str(exc)[:160]})", fix=_NPZ_FIX
        ) from exc
    return arrays["x"], arrays.get("y")


# --------------------------------------------------------------------------- hooks
def _import_hook(spec: str) -> Callable:
    m = _HOOK_RE.match(spec)
    target, func = m["target"], m["func"]
    fix = "pass --data module:function (importable from the current folder) or path/to/file.py:function"
    added = []
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise DataError(f"hook file '{file}' does not exist", fix=fix)
            stem = re.sub(r"\W", "_", file.stem)
            name = f"onnxprune_hook_{stem}_{abs(hash(str(file.resolve())))}"
            mspec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[name] = module
            added.append(str(file.resolve().parent))
            sys.path.insert(0, added[0])
            try:
                mspec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                added.append(str(Path.cwd()))
                sys.path.insert(0, added[0])
            module = importlib.import_module(target)
    except DataError:
        raise
    except BaseException as exc:  # user code: SyntaxError, ImportError, SystemExit...
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise DataError(
            f"cannot import data hook '{target}' ({type(exc).__name__}: {str(exc)[:160]})", fix=fix
        ) from exc
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise DataError(
            f"data hook '{target}' has no function '{func}'",
            fix=f"define {func}() in {target} or name another function after ':'",
        )
    return fn


def _load_hook(spec: str, limit: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Call the hook (with ``limit=`` if it takes it) and concatenate its batches up to ``limit`` samples."""
    fn = _import_hook(spec)
    where = f"data hook '{spec}'"
    fix = "make the hook return or yield (inputs, labels) pairs of numpy arrays; labels may be None"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        result = fn(limit=limit) if "limit" in params else fn()
    except Exception as exc:
        raise DataError(f"{where} raised {type(exc).__name__}: {str(exc)[:160]}", fix="fix the hook") from exc
    if isinstance(result, np.ndarray) or (
        isinstance(result, tuple) and len(result) == 2 and hasattr(result[0], "__array__")
    ):
        raise DataError(
            f"{where} returned a single array or pair, not an iterable of batches",
            fix="return [(x, y)] or yield batches",
        )
    if result is None or isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise DataError(
            f"{where} returned {type(result).__name__}, not an iterable of (inputs, labels) batches", fix=fix
        )
    xs, ys, count = [], [], 0
    it = iter(result)
    try:
        while limit is None or count < limit:
            try:
                batch = next(it)
            except StopIteration:
                break
            x, y = _check_batch(batch, len(xs), where, fix, xs, ys)
            xs.append(x)
            ys.append(y)
            count += len(x)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{where} raised {type(exc).__name__} while iterating: {str(exc)[:160]}", fix="fix the hook"
        ) from exc
    finally:
        close = getattr(it, "close", None)
        if callable(close):
            close()
    if not xs:
        raise DataError(f"{where} yielded no batches (empty dataset)", fix="make the hook yield at least one batch")
    x = np.concatenate(xs)
    return x, None if ys[0] is None else np.concatenate(ys)


def _check_batch(batch, i: int, where: str, fix: str, xs: list, ys: list) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DataError(f"batch {i} from {where} is a {type(batch).__name__}, not an (inputs, labels) pair", fix=fix)
    try:
        x = np.asarray(batch[0])
        y = None if batch[1] is None else np.asarray(batch[1])
    except Exception as exc:  # e.g. a torch tensor that requires grad
        raise DataError(
            f"batch {i} from {where} cannot be converted to numpy ({exc})",
            fix=fix + " (torch: t.detach().cpu().numpy())",
        ) from exc
    if x.dtype.kind not in "biuf" or x.ndim == 0:
        raise DataError(
            f"batch {i} from {where} has inputs of type {type(batch[0]).__name__} (dtype {x.dtype}, shape {x.shape}),"
            " not a numeric array with a batch axis",
            fix=fix,
        )
    if y is not None and (y.dtype.kind not in "biuf" or y.ndim == 0 or len(y) != len(x)):
        raise DataError(
            f"batch {i} from {where} has {len(x)} inputs but labels of type {type(batch[1]).__name__} shape {y.shape}",
            fix=fix,
        )
    if xs and x.shape[1:] != xs[0].shape[1:]:
        raise DataError(
            f"batch {i} from {where} has inputs of shape {x.shape} but batch 0 had {xs[0].shape}",
            fix="yield batches of one sample shape",
        )
    if ys and (y is None) != (ys[0] is None):
        raise DataError(
            f"batch {i} from {where} {'lacks' if y is None else 'has'} labels unlike batch 0",
            fix="yield labels for every batch or for none",
        )
    return x, y


# --------------------------------------------------------------------------- images
def _require_pillow():
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(
            "reading an image folder needs Pillow, which is not installed",
            fix="pip install pillow (or pip install 'onnxprune[images]'), or convert the images to an .npz with x and y",
        ) from exc
    return Image


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _list_images(root: Path) -> list[tuple[Path, int | None]]:
    """Files with labels: sorted class subfolders, interleaved round-robin; or unlabeled top-level images."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        return [(p, None) for p in _image_files(root)]
    names = [c.name for c in classes]
    if all(n.isdigit() for n in names) and names != sorted(names, key=int):
        log.warning(
            "class folders in %s are numbers sorted as text (%s...): label i is the i-th name in that order",
            root,
            ", ".join(names[:4]),
        )
    per_class = [_image_files(c) for c in classes]
    for c, files in zip(classes, per_class):
        if not files:
            log.warning("class folder %s holds no images; its label index is kept", c)
    out = []
    for k in range(max(map(len, per_class), default=0)):
        out.extend((files[k], label) for label, files in enumerate(per_class) if k < len(files))
    return out


def _prepare_image(img, opts: ImageOptions, Image) -> np.ndarray:
    img = img.convert("L" if opts.grayscale else "RGB")
    if opts.size:
        w, h = img.size
        short, long_ = (w, h) if w <= h else (h, w)
        new_long = int(opts.size * long_ / short)
        img = img.resize((opts.size, new_long) if w <= h else (new_long, opts.size), Image.BILINEAR)
    if opts.crop:
        w, h = img.size
        if opts.crop > w or opts.crop > h:
            raise ValueError(f"image is {w}x{h}, smaller than the {opts.crop}x{opts.crop} crop")
        left, top = int(round((w - opts.crop) / 2.0)), int(round((h - opts.crop) / 2.0))
        img = img.crop((left, top, left + opts.crop, top + opts.crop))
    arr = np.asarray(img, dtype=np.float32) * np.float32(opts.scale)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if opts.channel_order == "bgr":
        arr = arr[:, :, ::-1]
    arr = (arr - opts._per_channel("mean")) / opts._per_channel("std")
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def _load_images(root: Path, opts: ImageOptions, limit: int | None, progress: Progress | None):
    Image = _require_pillow()
    files = _list_images(root)[:limit]
    if not files:
        raise DataError(
            f"image folder '{root}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
            fix="pass --data a folder with one subfolder of images per class",
        )
    xs = []
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:
                xs.append(_prepare_image(img, opts, Image))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"cannot read image '{path}' ({type(exc).__name__}: {str(exc)[:120]})",
                fix="remove or repair the file; set --image-size/--crop so every image ends up the same size",
            ) from exc
        if xs[0].shape != xs[-1].shape:
            raise DataError(
                f"image '{path}' becomes {xs[-1].shape[1:]} but '{files[0][0]}' became {xs[0].shape[1:]}",
                fix="pass --image-size and --crop so all images end up the same size",
            )
        if progress:
            progress(i + 1, len(files))
    labeled = files[0][1] is not None
    return np.stack(xs), np.array([lab for _, lab in files], dtype=np.int64) if labeled else None


# --------------------------------------------------------------------------- model fit
def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_against_model(
    ds: Dataset, input_shape: tuple, input_dtype: np.dtype, *, input_name: str, num_classes: int | None, flag: str = "--data"
) -> Dataset:
    """Check ``ds`` fits the model input (rank, fixed dims after the batch axis, dtype) and class count.

    Returns ``ds`` itself, or a copy with float64 inputs cast to float32 when the model wants float32.
    ``flag`` is the option the data came from; the fixes name it.
    """
    with naming_flag(flag):
        return _check_against_model(ds, input_shape, input_dtype, input_name=input_name, num_classes=num_classes)


def _check_against_model(ds: Dataset, input_shape: tuple, input_dtype: np.dtype, *, input_name: str, num_classes: int | None) -> Dataset:
    want, have, src = tuple(input_shape), tuple(ds.x.shape), ds.source
    if len(want) != len(have):
        raise DataError(
            f"data from {src} has shape {have} (rank {len(have)})"
            f" but model input '{input_name}' expects rank {len(want)} {_fmt(want)}",
            fix="reshape the data to the model's layout (samples first) or pass a matching --data",
        )
    bad = [i for i in range(1, len(want)) if want[i] is not None and want[i] != have[i]]
    if bad:
        msg = f"data from {src} has shape {have} but model input '{input_name}' expects {_fmt(want)}"
        if len(want) == 4 and _fits(want, (have[0], have[3], have[1], have[2])):
            raise DataError(
                msg + " (data looks channels-last NHWC, model wants NCHW)",
                fix="transpose the data: x = x.transpose(0, 3, 1, 2)",
            )
        if len(want) == 4 and _fits(want, (have[0], have[2], have[3], have[1])):
            raise DataError(
                msg + " (data looks channels-first NCHW, model wants NHWC)",
                fix="transpose the data: x = x.transpose(0, 2, 3, 1)",
            )
        i = bad[0]
        raise DataError(
            msg + f" (dim {i} is {have[i]}, the model wants {want[i]})",
            fix="resize the data (for image folders: --image-size/--crop) or pass --data matching the model input",
        )
    dtype = np.dtype(input_dtype)
    if ds.x.dtype != dtype:
        if not (ds.x.dtype == np.float64 and dtype == np.float32):
            raise DataError(
                f"data from {src} is {ds.x.dtype} but model input '{input_name}' is {dtype}",
                fix=f"save x as {dtype} (normalized as during training), e.g. x.astype(np.{dtype.name})",
            )
        ds = replace(ds, x=ds.x.astype(np.float32))
    if num_classes is not None and ds.y is not None and len(ds.y) and int(ds.y.max()) >= num_classes:
        top = int(ds.y.max())
        raise DataError(
            f"label {top} is out of range for a model with {num_classes} outputs (data from {src})",
            fix="use 0-based class indices in the model's output order, or pass --data for this model",
        )
    return ds


def _fits(want: tuple, shape: tuple) -> bool:
    return all(w is None or w == s for w, s in zip(want[1:], shape[1:]))
