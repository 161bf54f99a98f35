"""Shared test setup: the repo root is importable so tests can use ``models``."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory):
    """``zoo_export(name, exporter, width=0.5) -> Path``: each zoo model exported once per session.

    BN statistics are randomized (seeded) so outputs do not vanish.
    """
    from models.export import export_onnx
    from models.zoo import build

    folder = tmp_path_factory.mktemp("zoo")
    cache: dict = {}

    def get(name: str, exporter: str = "legacy", width: float = 0.5):
        key = (name, exporter, width)
        if key not in cache:
            model, shape = build(name, width=width)
            cache[key] = export_onnx(model, folder / f"{name}_{exporter}_{width}.onnx", input_shape=shape, exporter=exporter)
        return cache[key]

    return get
