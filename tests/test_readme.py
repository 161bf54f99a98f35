"""Following the README in order works: its main command, then the tests of the demo folder.

The main command writes ``models/demo/fmnist_vgg11.pruned.onnx`` next to the
shipped models; the tests must not trip over it (issue 14). The command is
read from the README's first ``bash`` block and run in a temporary tree laid
out like the repository (paths in the README are relative to its root), so the
real demo folder is never touched.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxprune.flops import count
from tests.test_fashion_mnist import MODELS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# what the demo tests need, at the same relative paths as in the repository
MIRROR = ("pyproject.toml", "models/__init__.py", "models/fashion_mnist.py", "tests/conftest.py", "tests/test_fashion_mnist.py")


def readme_main_command() -> list[str]:
    """The ``onnxprune`` line of the README's first bash block, as arguments."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no bash block"
    lines = [ln for ln in block.group(1).splitlines() if ln.startswith("onnxprune ")]
    assert len(lines) == 1, f"expected one onnxprune command in the first bash block, got {lines}"
    return shlex.split(lines[0])


def readme_output() -> str:
    """The file the README says the main command writes."""
    m = re.search(r"writes `([^`]+\.onnx)`", README.read_text())
    assert m, "README.md does not say which file the main command writes"
    return m.group(1)


def _onnxprune_executable() -> str:
    """The console script that ``pip install -e .`` put next to this Python."""
    exe = shutil.which("onnxprune", path=str(Path(sys.executable).parent)) or shutil.which("onnxprune")
    assert exe, "the onnxprune command is not installed: run pip install -e ."
    return exe


def _mirror(tmp: Path) -> Path:
    for rel in MIRROR:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp / rel)
    shutil.copytree(ROOT / "models" / "demo", tmp / "models" / "demo")
    return tmp


@pytest.mark.slow
def test_readme_main_command_then_demo_tests(tmp_path):
    tree = _mirror(tmp_path)
    argv = readme_main_command()
    assert argv[0] == "onnxprune" and "--target-flops" in argv
    main = subprocess.run([_onnxprune_executable(), *argv[1:]], cwd=tree, capture_output=True, text=True, timeout=600)
    assert main.returncode == 0, f"README main command failed:\n{main.stdout[-3000:]}\n{main.stderr[-3000:]}"
    out = tree / readme_output()
    assert out.is_file(), f"{readme_output()} was not written; output:\n{main.stdout[-2000:]}"
    src = tree / next(a for a in argv[1:] if a.endswith(".onnx"))
    target = float(argv[argv.index("--target-flops") + 1])
    assert count(onnx.load(str(out))).total_macs <= (1 - target) * count(onnx.load(str(src))).total_macs
    # what `onnxprune finetune models/demo/fmnist_vgg11.pruned.onnx ...` writes by default (not run:
    # it needs training data); the demo tests must ignore it as well
    shutil.copy2(out, out.with_name(out.name.replace(".pruned.onnx", ".pruned.finetuned.onnx")))

    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_fashion_mnist.py"],
        cwd=tree, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert tests.returncode == 0, f"demo tests failed after the README command:\n{tests.stdout[-4000:]}\n{tests.stderr[-2000:]}"
    for name in MODELS:  # the accuracy tests really ran, on the models of the temporary tree
        assert f"test_demo_model_accuracy_matches_documented[{name}] PASSED" in tests.stdout, tests.stdout[-3000:]
    assert str(tree) in tests.stdout, "pytest did not run in the temporary tree"


def test_default_outputs_are_git_ignored():
    """The main command's and finetune's default outputs, and the sensitivity cache, stay out of git."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["models/demo/fmnist_vgg11.pruned.onnx", "models/demo/fmnist_vgg11.pruned.finetuned.onnx", ".onnxprune-cache/x.json"]
    res = subprocess.run([git, "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert res.stdout.split() == paths, res.stdout + res.stderr
