"""What a newcomer hits first (issue 14): checks before work, flags named, one unit, 80 columns, pipes, plots.

"Before work" is observed, not assumed: a recorder wraps ``api.build_evaluator`` (the real one still runs;
it makes the reference run on the data), and runs whose stderr is not a terminal print progress lines per stage
(``reference: 64/64 (100%), 0s``), so an error that arrives before any model run leaves a single line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
RESNET, VAL = DEMO / "fmnist_resnet20.onnx", DEMO / "fmnist_val.npz"
FAST = ["--data", str(VAL), "--limit", "64"]
TRUNCATED = re.compile(r"\d…|…\d")


def run_cli(*args, cwd: Path, env: dict | None = None, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)
    return r, time.monotonic() - t


@pytest.fixture
def sessions(monkeypatch):
    """Records each evaluator built on the data (the reference run that starts all measuring) while the CLI
    runs in-process; the real function does the work. (ORT sessions are no measure: shape inference makes a
    dry-run session on one zero sample before any check.)"""
    from onnxprune import api

    made = []
    real = api.build_evaluator

    def recording(*a, **k):
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(api, "build_evaluator", recording)
    return made


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused_before_work(args, sessions, match: str) -> str:
    """Run in-process; the run must fail with one line (no progress line: no stage started), exit 2, no session."""
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    line = r.stderr.strip()
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert "\n" not in line and line.startswith("error: ") and "To fix: " in line, r.stderr
    assert re.search(match, line), (match, line)
    assert not sessions, "a model was run before the error"
    return line


# --------------------------------------------------------------------------- check before working
def test_missing_matplotlib_is_reported_before_any_work(tmp_path):
    fake = tmp_path / "no_mpl"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib (simulated)')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}
    for args in (["sensitivity", RESNET, *FAST, "--plot", "s.png"], [RESNET, "--target-flops", "0.3", *FAST, "--plot", "p.png"]):
        r, seconds = run_cli(*args, cwd=tmp_path, env=env)
        assert r.returncode == 2, r.stderr
        # one line and no progress line: no stage (reference run, sensitivity) started
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: --plot needs matplotlib"), r.stderr
        assert "pip install 'onnxprune[plot]'" in r.stderr and "leave out --plot" in r.stderr
        assert seconds < 30, seconds  # the run itself takes longer than the start-up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_mpl"]  # no plot, model, or cache folder


@pytest.mark.parametrize(
    "args, match",
    [
        (["sensitivity", RESNET, *FAST, "--csv", "missing/s.csv"], r"output folder 'missing' does not exist. To fix: create it first \(mkdir -p missing\)"),
        (["sensitivity", RESNET, *FAST, "--report", "missing/s.json"], r"output folder 'missing' does not exist"),
        (["sensitivity", RESNET, *FAST, "--plot", "missing/s.png"], r"output folder 'missing' does not exist"),
        (["sensitivity", RESNET, *FAST, "--csv", "."], r"output '.' is a directory. To fix: give a file name with --csv\.$"),
        (["sensitivity", RESNET, *FAST, "--plot", "."], r"To fix: give a file name with --plot\.$"),
        ([RESNET, "--target-flops", "0.3", *FAST, "--plot", "missing/p.png"], r"output folder 'missing' does not exist"),
        ([RESNET, "--target-flops", "0.3", *FAST, "--report", "."], r"To fix: give a file name with --report\.$"),
    ],
    ids=["sens-csv", "sens-report", "sens-plot", "sens-csv-dir", "sens-plot-dir", "main-plot", "main-report-dir"],
)
def test_output_paths_are_checked_before_any_work(work, sessions, args, match):
    refused_before_work(args, sessions, match)
    assert list(work.iterdir()) == []


def test_unreachable_target_with_data_is_reported_before_sensitivity(work, sessions):
    line = refused_before_work(
        [RESNET, "--target-flops", "0.95", "--round-to", "16", *FAST], sessions, r"target of removing 95.0% of the MACs is unreachable"
    )
    assert "--round-to 16" in line and "lower --target-flops to at most" in line
    assert list(work.iterdir()) == []


def test_calib_data_errors_name_calib_data(work, sessions):
    x = np.load(VAL)["x"][:32]
    np.savez(work / "nhwc.npz", x=x.transpose(0, 2, 3, 1))
    for args in ([RESNET, "--target-flops", "0.3", *FAST, "--calib-data", "nhwc.npz"], ["sensitivity", RESNET, *FAST, "--calib-data", "nhwc.npz"]):
        line = refused_before_work(args, sessions, r"^error: data from --calib-data 'nhwc.npz' has shape \(32, 32, 32, 1\)")
        assert "the calibration samples" not in line
    line = refused_before_work([RESNET, "--target-flops", "0.3", *FAST, "--calib-data", "nope.npz"], sessions, r"data 'nope.npz' does not exist")
    assert "check the --calib-data path" in line and "--data " not in line


def test_sensitivity_json_alone_says_how_to_fix(work):
    r = CliRunner().invoke(main, ["sensitivity", "--json"])
    assert r.exit_code == 2
    assert re.fullmatch(r"error: Missing argument 'MODEL'. To fix: see '.*sensitivity --help'.", r.stderr.strip()), r.stderr


# --------------------------------------------------------------------------- --plan reports what it did
def test_plan_decides_and_the_summary_says_so(work):
    r = CliRunner().invoke(main, [str(RESNET), "--target-flops", "0.3", "--round-to", "8", "--save-plan", "plan.json", "-o", "a.onnx", "--quiet"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(main, [str(RESNET), "--plan", "plan.json", "-o", "b.onnx", "--report", "r.json", "--quiet"])  # no --target-flops
    assert r.exit_code == 0, r.stderr
    assert "set by plan plan.json" in r.stdout and "target -" not in r.stdout and not re.search(r"round-to \d", r.stdout)
    assert "Channels kept as listed in plan plan.json" in r.stdout
    rep = json.loads((work / "r.json").read_text())
    assert rep["strategy"] == "plan" and rep["target"] is None and rep["round_to"] is None and rep["detail"]["plan_file"] == "plan.json"
    r = CliRunner().invoke(main, [str(RESNET), "--target-flops", "0.9", "--plan", "plan.json", "-o", "c.onnx", "--quiet"])
    assert r.exit_code == 0, r.stderr
    assert "--target-flops 0.9 is ignored" in r.stderr and "-90.0%" not in r.stdout
    assert (work / "b.onnx").read_bytes() == (work / "c.onnx").read_bytes()


def test_missing_target_mentions_plan(work):
    r = CliRunner().invoke(main, [str(RESNET), "--quiet"])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: Missing option '--target-flops' or '--target-latency' (the fraction of MACs or of measured latency to remove). To fix: pass e.g. --target-flops 0.3 or --target-latency 0.3, or --plan PLAN to apply a saved plan."


# --------------------------------------------------------------------------- 80 columns, pipes
def test_80_columns_never_truncate_numbers_and_pipes_get_progress_lines(tmp_path):
    env = {"COLUMNS": "80"}
    r, _ = run_cli("sensitivity", RESNET, *FAST, "--calibrate", 0, "--cache-dir", "c", "--report", "s.json", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert not TRUNCATED.search(r.stdout), r.stdout
    assert max(map(len, r.stdout.splitlines())) <= 80, r.stdout
    # every number of the table is whole: it equals the measured drop in points
    doc = json.loads((tmp_path / "s.json").read_text())
    table = {}
    for line in r.stdout.splitlines():
        m = re.match(r"(g\d+)\s+\S+\s+(\d+)((?:\s+-?\d+\.\d)+)\s*$", line)
        if m:
            table[m.group(1)] = [float(v) for v in m.group(3).split()]
    assert len(table) == len({row["group"] for row in doc["rows"]}) == 12
    for row in doc["rows"]:
        assert table[row["group"]][doc["ratios"].index(row["ratio"])] == pytest.approx(row["drop_points"], abs=0.051)
    # stderr is a pipe: progress comes as lines while the run goes, not a live bar
    assert re.search(r"^reference: 64/64 \(100%\), \d+s$", r.stderr, re.M), r.stderr
    assert re.search(r"^sensitivity: 108/108 \(100%\), \d+s$", r.stderr, re.M), r.stderr

    r, _ = run_cli(RESNET, "--target-flops", "0.3", *FAST, "--calibrate", 0, "--cache-dir", "c", "-o", "p.onnx", "--plot", "p.png", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert not TRUNCATED.search(r.stdout), r.stdout
    assert max(map(len, r.stdout.splitlines())) <= 80, r.stdout
    assert "MACs touched: share of the model's MACs" in r.stdout  # the column is explained
    # reasons wrap at words (names keep the width that tells them apart, so the note may get one word a line)
    assert re.search(r"^g12\s+/fc/Gemm\s+10\s+10\s+0%\s+0\.0%\s+channels(?: reach)?\s*$", r.stdout, re.M), r.stdout
    assert re.search(r"^\s+(?:reach )?graph(?: output)?\s*$", r.stdout, re.M), r.stdout
    producers = re.findall(r"^g\d+\s+(\S+)", r.stdout, re.M)
    assert len(set(producers)) == len(producers), producers  # shortened names still tell the groups apart
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- plots
class _G:
    def __init__(self, k: int):
        self.id, self.producers, self.macs_share = f"g{k}", (f"/layers/layers.{k}/conv1/Conv",), 0.05


def _curves(n: int):
    from onnxprune.allocate import SensitivityCurves

    ratios = (0.25, 0.5, 0.75)
    return SensitivityCurves("top1", 0.9, ratios, {f"g{k}": tuple(0.01 * k * r for r in ratios) for k in range(n)})


@pytest.mark.parametrize("n", [5, 11, 12, 30])
def test_sensitivity_picture_has_distinct_colours_or_a_heatmap(n):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnxprune.plots import HEATMAP_GROUPS, _draw_sensitivity

    fig, ax = plt.subplots()
    _draw_sensitivity(ax, [_G(k) for k in range(n)], _curves(n), {f"g{k}": 0.5 for k in range(n)})
    if n >= HEATMAP_GROUPS:
        assert ax.images and ax.images[0].get_array().shape == (n, 3)
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert "s.3/conv1/Conv (5% MACs)" in labels[3]  # the node name's distinguishing end and its MACs share
        assert all("% MACs)" in t for t in labels)
    else:
        curves = [l for l in ax.lines if len(l.get_xdata()) == 3]
        assert len(curves) == n and len({matplotlib.colors.to_hex(l.get_color()) for l in curves}) == n  # no colour repeats
        legend = ax.get_legend()
        assert legend is not None and legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1  # beside the axes
    plt.close(fig)


def test_sensitivity_plot_title_says_whether_calibrated(tmp_path):
    import matplotlib.pyplot as plt

    from onnxprune import plots

    titles = []
    orig = plots._save
    plots_save = lambda fig, path, plt_: (titles.append(fig.axes[0].get_title()), orig(fig, path, plt_))  # noqa: E731
    try:
        plots._save = plots_save
        plots.sensitivity_png([_G(0)], _curves(1), tmp_path / "a.png", calibration="after calibration (reconstruct, 512 samples)")
        plots.sensitivity_png([_G(0)], _curves(1), tmp_path / "b.png", calibration="without calibration")
    finally:
        plots._save = orig
    assert "after calibration (reconstruct, 512 samples)" in titles[0] and "without calibration" in titles[1]
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    plt.close("all")


def test_short_names_keep_the_distinguishing_end():
    from onnxprune.report import short_name

    assert short_name("/layers/layers.13/conv1/Conv", 16) == "/….13/conv1/Conv"
    for name in ("/layers/layers.13/conv1/Conv", "/features/features.10/Conv", "a1234567890b", "/fc/Gemm"):
        for width in range(3, 30):
            s = short_name(name, width)
            assert len(s) <= max(width, 3) and not TRUNCATED.search(s), (name, width, s)
            assert s == name or "…" in s


# --------------------------------------------------------------------------- one unit per quantity
def test_finetune_prints_accuracy_in_percent_everywhere(work):
    d = np.load(VAL)
    np.savez(work / "train.npz", x=d["x"][:128], y=d["y"][:128])
    np.savez(work / "v.npz", x=d["x"][2000:2064], y=d["y"][2000:2064])
    r = CliRunner().invoke(main, [str(RESNET), "--target-flops", "0.3", "--strategy", "uniform", "-o", "p.onnx", "--quiet"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(main, ["finetune", "p.onnx", "--data", "train.npz", "--val", "v.npz", "--epochs", "1", "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    m = re.search(r"validation top1: (\S+) before, (\S+) best", r.stdout)
    assert m and all(re.fullmatch(r"\d{1,3}\.\d\dpercent", v.replace("%", "percent")) for v in m.groups()), r.stdout
