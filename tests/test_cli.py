"""End-to-end CLI runs on the shipped trained model and real Fashion-MNIST data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.evaluate import compute_metrics, make_session
from onnxprune.flops import count
from onnxprune.graph import load_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo" / "fmnist_vgg11.onnx"
VAL = ROOT / "models" / "demo" / "fmnist_val.npz"


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_explains_target_and_convention():
    r = cli("--help")
    assert r.returncode == 0
    assert "--target-flops 0.3" in r.stdout and "FLOPs = 2 x MACs" in r.stdout
    r = cli("prune", "--help")
    assert "Fraction of MACs to remove" in r.stdout


def test_analyze_json_matches_counter():
    r = cli("analyze", DEMO, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["total_macs"] == count(load_model(DEMO)).total_macs
    assert "multiply-accumulates" in d["convention"]
    assert sum(l["macs"] for l in d["layers"]) == d["total_macs"]
    assert any(g["prunable"] for g in d["groups"]) and any(not g["prunable"] for g in d["groups"])


def test_analyze_table_lists_groups_and_reasons():
    r = cli("analyze", DEMO)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # reasons wrap at words to fit the terminal
    assert "Channel groups" in text and "blocked: channels reach graph output" in text and "Convention" in text


def _independent_top1(path: Path, limit: int) -> float:
    data = np.load(VAL)
    x, y = data["x"][:limit], data["y"][:limit]
    sess = make_session(onnx.load(str(path)), device="cpu")
    return compute_metrics(sess.run(x), labels=y).top1


def test_main_job_uniform_reports_accuracy_that_matches_independent_eval(tmp_path):
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = cli(DEMO, "--target-flops", "0.3", "--strategy", "uniform", "--data", VAL, "--limit", 600, "--calibrate", 0, "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    assert "MACs" in r.stdout and "target -30.0%" in r.stdout and "top1" in r.stdout
    assert "CPUExecutionProvider" in r.stdout
    d = json.loads(rep.read_text())
    assert d["reduction"] >= 0.3 and d["macs_after"] == count(load_model(out)).total_macs
    assert d["metrics"]["pruned"]["top1"] == pytest.approx(_independent_top1(out, 600), abs=1e-9)
    assert d["metrics"]["original"]["top1"] == pytest.approx(_independent_top1(DEMO, 600), abs=1e-9)
    assert "multiply-accumulates" in d["convention"]
    assert d["provider"] == "CPUExecutionProvider"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_default_output_name_never_overwrites_input(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(DEMO.read_bytes())
    r = cli(src, "--target-flops", "0.2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.pruned.onnx").is_file() and src.read_bytes() == DEMO.read_bytes()
    r = cli(src, "--target-flops", "0.2")
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr


def test_sensitivity_strategy_caches_and_resumes(tmp_path):
    args = [DEMO, "--target-flops", "0.3", "--data", VAL, "--limit", 300, "--grid", "0.25,0.5,0.75", "--cache-dir", tmp_path / "c", "--json"]
    r = cli(*args, "-o", tmp_path / "a.onnx")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["strategy"] == "sensitivity" and first["reduction"] >= 0.3
    assert list((tmp_path / "c").glob("*.sensitivity.json"))
    r = cli(*args, "-o", tmp_path / "b.onnx")
    second = json.loads(r.stdout)
    n_groups = sum(1 for g in second["groups"] if g["blocked_reason"] is None)
    assert second["detail"]["sensitivity_cached_groups"] == n_groups
    assert second["plan"] == first["plan"]


def test_saved_plan_reapplies_to_identical_model(tmp_path):
    r = cli(DEMO, "--target-flops", "0.4", "--criterion", "fpgm", "-o", tmp_path / "a.onnx", "--save-plan", tmp_path / "plan.json")
    assert r.returncode == 0, r.stderr
    r = cli(DEMO, "--target-flops", "0.4", "--plan", tmp_path / "plan.json", "-o", tmp_path / "b.onnx")
    assert r.returncode == 0, r.stderr
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    assert [t.SerializeToString() for t in a.graph.initializer] == [t.SerializeToString() for t in b.graph.initializer]


def test_sensitivity_command_writes_csv_json_and_plot(tmp_path):
    r = cli("sensitivity", DEMO, "--data", VAL, "--limit", 200, "--grid", "0.3,0.6", "--calibrate", 0, "--csv", tmp_path / "s.csv", "--report", tmp_path / "s.json", "--plot", tmp_path / "s.png", "--cache-dir", tmp_path / "c", "--json")
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0] == "group,producer,channels,ratio,drop_points" and len(rows) > 2
    printed, written = json.loads(r.stdout), json.loads((tmp_path / "s.json").read_text())  # --json prints what --report writes
    assert printed == written and written["metric"] == "top1"
    # one unit: the CSV's drop_points are the JSON's, in points (0..100), as in the table and plot
    csv_drops = [float(line.rsplit(",", 1)[1]) for line in rows[1:]]
    assert csv_drops == pytest.approx([row["drop_points"] for row in written["rows"]], abs=1e-4)
    assert max(abs(d) for d in csv_drops) > 1.0  # points, not fractions, on this model at 60%
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    """Disjoint train/eval subsets of the shipped Fashion-MNIST test subset."""
    d = np.load(VAL)
    folder = tmp_path_factory.mktemp("split")
    np.savez(folder / "train.npz", x=d["x"][:1200], y=d["y"][:1200])
    np.savez(folder / "eval.npz", x=d["x"][2000:2500], y=d["y"][2000:2500])
    return folder / "train.npz", folder / "eval.npz"


def test_main_job_with_finetuning_recovers_accuracy(tmp_path, split_data):
    train, ev = split_data
    r = cli(DEMO, "--target-flops", "0.5", "--strategy", "uniform", "--data", ev, "--train-data", train, "--finetune-epochs", 1, "-o", tmp_path / "f.onnx", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "finetuned:" in r.stdout
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["metrics"]["finetuned"]["top1"] > d["metrics"]["pruned"]["top1"] + 0.1
    assert d["metrics"]["finetuned"]["top1"] >= d["metrics"]["calibrated"]["top1"] - 0.02
    assert d["detail"]["finetune"]["distilled"] is True
    # the written model is the fine-tuned one: an independent evaluation agrees
    e = np.load(ev)
    sess = make_session(onnx.load(str(tmp_path / "f.onnx")), device="cpu")
    assert compute_metrics(sess.run(e["x"]), labels=e["y"]).top1 == pytest.approx(d["metrics"]["finetuned"]["top1"])


def test_finetune_command_writes_better_model(tmp_path, split_data):
    train, ev = split_data
    pruned = tmp_path / "p.onnx"
    assert cli(DEMO, "--target-flops", "0.5", "--strategy", "uniform", "-o", pruned).returncode == 0
    r = cli("finetune", pruned, "--data", train, "--val", ev, "--teacher", DEMO, "--epochs", 1, "-o", tmp_path / "ft.onnx")
    assert r.returncode == 0, r.stderr
    assert "Fine-tuning on cpu" in r.stdout
    e = np.load(ev)
    acc = {p: compute_metrics(make_session(onnx.load(str(p)), device="cpu").run(e["x"]), labels=e["y"]).top1 for p in (pruned, tmp_path / "ft.onnx")}
    assert acc[tmp_path / "ft.onnx"] > acc[pruned] + 0.1
    assert pruned.read_bytes() == (tmp_path / "p.onnx").read_bytes()


def test_main_job_calibrates_by_default_and_reports_each_stage(tmp_path):
    calib = ROOT / "models" / "demo" / "fmnist_calib.npz"
    rep = tmp_path / "r.json"
    r = cli(DEMO, "--target-flops", "0.3", "--strategy", "uniform", "--data", VAL, "--limit", 600, "--calib-data", calib, "-o", tmp_path / "c.onnx", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert "calibrated:" in r.stdout
    assert f"Recovery without training: reconstruct on 512 samples of {calib}" in " ".join(r.stdout.split())  # long lines wrap at words
    d = json.loads(rep.read_text())
    assert d["metrics"]["calibrated"]["top1"] > d["metrics"]["pruned"]["top1"] + 0.1
    assert d["detail"]["calibration"]["samples"] == 512 and d["detail"]["calibration"]["source"] == str(calib)
    assert d["detail"]["calibration"]["method"] == "reconstruct"
    assert d["metrics"]["calibrated"]["top1"] == pytest.approx(_independent_top1(tmp_path / "c.onnx", 600))
    r = cli(DEMO, "--target-flops", "0.3", "--strategy", "uniform", "--data", VAL, "--limit", 300, "--calibrate", 0, "-o", tmp_path / "n.onnx", "--json")
    assert "calibrated" not in json.loads(r.stdout)["metrics"]
    # calibrating on the evaluated samples is allowed, and the summary says the estimate is not independent
    r = cli(DEMO, "--target-flops", "0.3", "--strategy", "uniform", "--data", VAL, "--limit", 300, "--calibrate-method", "both", "-o", tmp_path / "b.onnx")
    assert "Recovery without training: both on 300 samples of --data (also evaluated" in " ".join(r.stdout.split())


def test_sensitivity_caches_per_criterion_and_calibration(tmp_path):
    common = ("--data", VAL, "--limit", 100, "--grid", "0.5", "--cache-dir", tmp_path / "c", "--quiet")
    r = cli("sensitivity", DEMO, *common)  # calibrated on the first samples of --data by default
    assert r.returncode == 0, r.stderr
    assert "after calibration (reconstruct, 100 samples)" in r.stdout
    r = cli("sensitivity", DEMO, *common, "--calibrate", 0, "--criterion", "bn")
    assert r.returncode == 0, r.stderr
    assert "without calibration" in r.stdout
    # the demo export folds BN into the convs: say that 'bn' fell back to 'l1'
    assert "criterion 'bn' found no BatchNormalization nodes" in r.stderr
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    stem = Path(DEMO).stem
    assert names == [f"{stem}.bn.sensitivity.json", f"{stem}.l1-cal100-reconstruct.sensitivity.json"]
    # a repeated run is served from its own cache file
    r = cli("sensitivity", DEMO, *common)
    assert "groups from cache" in r.stdout and "(0 groups from cache)" not in r.stdout


def test_bn_criterion_on_folded_export_is_reported(tmp_path):
    r = cli(DEMO, "--target-flops", "0.3", "--criterion", "bn", "-o", tmp_path / "bn.onnx", "--json")
    assert r.returncode == 0, r.stderr
    assert "criterion 'bn' found no BatchNormalization nodes" in r.stderr
    assert "fell back" not in r.stdout  # stdout stays pure JSON
    assert "scored with 'l1'" in json.loads(r.stdout)["detail"]["criterion_note"]


def test_cli_calibration_methods_are_the_apis():
    from onnxprune import api, cli as cli_mod

    assert cli_mod.CALIBRATE_METHODS == api.CALIBRATE_METHODS
    assert api.PruneOptions().calibrate_method == cli_mod.CALIBRATE_METHODS[0]
