"""benchmarks/provenance.py: the header every results file starts with."""

from __future__ import annotations

import re
import subprocess

import pytest

from benchmarks import provenance


def test_header_states_command_commit_machine_and_versions():
    prov = provenance.start(script="benchmarks/calibration.py", argv=["--quick", "--out", "/tmp/a b.md"])
    lines = prov.header(load_end=1.5)
    text = "\n".join(lines)
    assert lines[0] == "- Command: `python benchmarks/calibration.py --quick --out '/tmp/a b.md'`"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=provenance.ROOT, capture_output=True, text=True).stdout.strip()
    if head:
        assert re.search(rf"commit `{head}(\+dirty)?`", text)
    assert "logical cores" in text and "shared with other jobs" in text
    assert "at the end" in text and "1.50 at the end" in text
    assert re.search(r"`--round-to auto` starts at (8|16)", text)
    for lib in ("Python", "numpy", "onnx", "onnxruntime"):
        assert f"{lib} " in text
    assert re.search(r"Date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)


def test_dirty_flag_follows_git_status():
    commit = provenance.source_commit()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=provenance.ROOT, capture_output=True, text=True)
    if dirty.returncode != 0:
        pytest.skip("not a git checkout")
    assert commit.endswith("+dirty") == bool(dirty.stdout.strip())


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "sub" / "r.md"
    provenance.write_atomic(out, "old\n")
    provenance.write_atomic(out, "new\n")
    assert out.read_text() == "new\n"
    assert [p.name for p in out.parent.iterdir()] == ["r.md"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    out = tmp_path / "r.md"
    out.write_text("old\n")
    with pytest.raises(TypeError):
        provenance.write_atomic(out, None)  # type: ignore[arg-type]
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]


def test_write_atomic_keeps_permissions(tmp_path):
    out = tmp_path / "r.md"
    out.write_text("old\n")
    out.chmod(0o640)
    provenance.write_atomic(out, "new\n")
    assert out.stat().st_mode & 0o777 == 0o640
    fresh = provenance.write_atomic(tmp_path / "new.md", "x\n")
    (tmp_path / "plain.md").write_text("x\n")  # what a plain open() gives under this umask (not mkstemp's 0600)
    assert fresh.stat().st_mode & 0o777 == (tmp_path / "plain.md").stat().st_mode & 0o777


# results files whose scripts write the provenance header and were regenerated with it
HEADED = ("calibration.md", "strategies.md", "prunable_share.md", "analyze_speed.md", "scale.md")


def _readme_results_files() -> set[str]:
    text = (provenance.ROOT / "README.md").read_text()
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`([\w.-]+\.md)`", section))


def test_readme_results_name_existing_files():
    named = _readme_results_files()
    assert named, "README.md's Results section names no results file"
    missing = sorted(n for n in named if not (provenance.ROOT / "benchmarks" / "results" / n).is_file())
    assert not missing, f"README.md's Results section names files that benchmarks/results/ lacks: {missing}"


@pytest.mark.parametrize("name", HEADED)
def test_results_file_starts_with_provenance(name):
    text = (provenance.ROOT / "benchmarks" / "results" / name).read_text()
    head = text.split("\n\n", 2)[1]  # the block after the title
    for key in ("- Command: `python benchmarks/", "- Source: commit `", "- Date: ", "- Machine: ", "- Versions: "):
        assert key in head, f"{name}: no '{key}' line in its header; regenerate it with its script"
