"""Bad inputs, faults and interruptions through the real CLI (issue 7).

Every case checks the error policy end to end:

* one line on stderr, ``error: <what is wrong>. To fix: <how, naming the flag>.``,
  no traceback (tracebacks only with ``--debug``);
* exit code 2 for bad usage or input, 1 for internal failures, 130 when interrupted;
* the input files' bytes are unchanged (sha256 before/after);
* nothing new is left in the working folder: no output model, report, plan or
  cache, and no temporary ``.*.tmp`` file.

Most cases run in-process with click's ``CliRunner`` (fast); the signal tests
and one smoke test run ``python -m onnxprune.cli`` in a subprocess.
The exact messages are listed in docs/errors.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "models" / "demo" / "fmnist_val.npz"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- tiny models (onnx.helper, no torch)
def cnn(
    path: Path,
    *,
    channels=(16, 16),
    in_ch: int = 1,
    hw=(32, 32),
    classes: int = 10,
    seed: int = 0,
    external: bool = False,
) -> Path:
    """Conv3x3+ReLU stack -> GlobalAveragePool -> Flatten -> Gemm; ``hw`` entries may be symbolic strings."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, cin = [], [], "x", in_ch
    for k, c in enumerate(channels):
        w = (rng.standard_normal((c, cin, 3, 3)) * np.sqrt(2.0 / (9 * cin))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(np.zeros(c, np.float32), f"b{k}")]
        nodes += [
            helper.make_node("Conv", [prev, f"w{k}", f"b{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}"),
        ]
        prev, cin = f"r{k}", c
    fc = (rng.standard_normal((classes, cin)) / np.sqrt(cin)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc.w"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_ch, *hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def relu_only(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 32, 32])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def conv_to_output(path: Path) -> Path:
    """One Conv whose output is the graph output: its channels cannot be pruned."""
    w = numpy_helper.from_array(np.ones((8, 1, 3, 3), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 32, 32])
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "one_conv", [x], [y], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


# --------------------------------------------------------------------------- harness
def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(autouse=True)
def _keep_sigterm_handler():
    """run_safely installs a SIGTERM handler (main thread); restore pytest's after each test."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder (the cwd, so default outputs and caches land in it) with a model and data."""
    monkeypatch.chdir(tmp_path)
    cnn(tmp_path / "model.onnx")
    d = np.load(DEMO_DATA)
    np.savez(tmp_path / "val.npz", x=d["x"][:64], y=d["y"][:64])
    return tmp_path


def cli(args, *, code: int, match: str, inputs=(), folder: Path | None = None, debug: bool = False) -> str:
    """Run the CLI in-process and check the whole error policy; returns the error line."""
    folder = Path(folder or Path.cwd())
    inputs = [Path(p) for p in inputs]
    before = {p: sha(p) for p in inputs}
    files = listing(folder)
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    err = result.stderr
    assert result.exit_code == code, (result.exit_code, err, result.stdout)
    line = err.strip()
    assert "\n" not in line, f"not one line: {err!r}"
    assert line.startswith("error: " if code == 2 else ("internal error: ", "error: ")), line
    assert "Traceback" not in err or debug
    assert re.search(match, line), f"{match!r} not in {line!r}"
    assert code != 2 or "To fix: " in line, f"no fix in {line!r}"
    for p, h in before.items():
        assert sha(p) == h, f"{p} was modified"
    new = listing(folder) - files
    assert not new, f"left behind: {sorted(new)}"
    return line


def ok(args, *, inputs=()) -> CliRunner:
    inputs = [Path(p) for p in inputs]
    before = {p: sha(p) for p in inputs}
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    for p, h in before.items():
        assert sha(p) == h
    assert not [p for p in Path.cwd().rglob("*.tmp")]
    return result


PRUNE = ["--target-flops", "0.3", "--quiet"]


# --------------------------------------------------------------------------- the model file
def test_missing_model(work):
    cli(["nope.onnx", *PRUNE], code=2, match=r"model file 'nope.onnx' does not exist. To fix: check the path")


def test_missing_model_analyze(work):
    cli(["analyze", "nope.onnx"], code=2, match=r"model file 'nope.onnx' does not exist")


def test_unreadable_model(work):
    model = work / "model.onnx"
    model.chmod(0)
    try:
        try:
            model.read_bytes()
            readable = True  # root (or CAP_DAC_OVERRIDE) reads a mode-000 file: nothing to refuse
        except PermissionError:
            readable = False
        if readable:
            assert IS_ROOT or os.access(model, os.R_OK)
            ok([model, *PRUNE], inputs=[model])
            assert (work / "model.pruned.onnx").is_file()
        else:
            cli([model, *PRUNE], code=2, match=r"model file '.*model.onnx' is not readable. To fix: check its permissions", inputs=[])
    finally:
        model.chmod(0o644)


@pytest.mark.parametrize("arg", [".", "folder.onnx"])
def test_model_is_a_directory(work, arg):
    (work / "folder.onnx").mkdir()
    cli([arg, *PRUNE], code=2, match=rf"'{re.escape(arg)}' is a directory, not a model file. To fix: pass the path of an .onnx file")


@pytest.mark.parametrize("content", [b"hello, I am not a model\n", np.random.default_rng(1).bytes(4096)], ids=["text", "random"])
def test_not_onnx(work, content):
    bad = work / "bad.onnx"
    bad.write_bytes(content)
    cli([bad, *PRUNE], code=2, match=r"is not (a valid ONNX model|an ONNX model)|does not contain an ONNX graph", inputs=[bad])


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_onnx(work, keep):
    data = (work / "model.onnx").read_bytes()
    bad = work / "truncated.onnx"
    bad.write_bytes(data[: int(len(data) * keep)])
    cli([bad, *PRUNE], code=2, match=r"'.*truncated.onnx' (is not a valid ONNX model|fails the ONNX checker|does not contain)", inputs=[bad])


def test_external_data_missing(work):
    m = cnn(work / "ext.onnx", external=True)
    (work / "ext.onnx.data").unlink()
    cli([m, *PRUNE], code=2, match=r"external data file 'ext.onnx.data' for initializer 'w0' is missing. To fix: copy 'ext.onnx.data' next to the model \(into '.+'\)", inputs=[m])


@pytest.mark.parametrize("location", ["../x.data", "/etc/passwd", "sub/../../x.data"])
def test_external_data_outside_folder(work, location):
    m = cnn(work / "ext.onnx", external=True)
    proto = onnx.load(str(m), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, str(m))
    cli([m, *PRUNE], code=2, match=rf"points to external data '{re.escape(location)}' outside the model's folder", inputs=[m, work / "ext.onnx.data"])


def test_external_data_model_prunes(work):
    """The happy path of the same file: external data is read and the pruned model is valid."""
    m = cnn(work / "ext.onnx", external=True)
    ok([m, *PRUNE], inputs=[m, work / "ext.onnx.data"])
    onnx.checker.check_model(str(work / "ext.pruned.onnx"))
    assert (work / "ext.pruned.onnx.data").is_file()  # external data in, external data out
    assert listing(work) == {"model.onnx", "val.npz", "ext.onnx", "ext.onnx.data", "ext.pruned.onnx", "ext.pruned.onnx.data"}


def test_tensor_data_shorter_than_its_dims(work):
    """The ONNX checker refuses too little raw data but not too much; load_model refuses both."""
    proto = onnx.load(str(work / "model.onnx"))
    w0 = next(t for t in proto.graph.initializer if t.name == "w0")
    w0.raw_data = w0.raw_data * 2
    bad = work / "long.onnx"
    onnx.save(proto, str(bad))
    cli([bad, *PRUNE], code=2, match=r"tensor 'w0' of shape \[16, 1, 3, 3\] holds 1152 bytes of data, not 576 \(corrupt or truncated file\). To fix: re-export the model", inputs=[bad])
    w0.raw_data = w0.raw_data[:288]
    onnx.save(proto, str(bad))
    cli([bad, *PRUNE], code=2, match=r"fails the ONNX checker: .*raw_data size \(288 bytes\) is too small for the declared shape and type \(576 bytes required\). To fix: re-export the model", inputs=[bad])


def test_absurd_channel_count_is_refused_not_allocated(work):
    """A malformed input shape (2**31 channels) must not make the analysis allocate gigabytes."""
    proto = onnx.load(str(work / "model.onnx"))
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**31
    bad = work / "huge.onnx"
    onnx.save(proto, str(bad))
    cli([bad, *PRUNE], code=2, match=r"'input:x' has 2,147,483,648 channels, more than onnxprune tracks .*To fix: check the model's input and weight shapes", inputs=[bad])


# --------------------------------------------------------------------------- what the model contains
def test_no_prunable_layers_relu_only(work):
    m = relu_only(work / "relu.onnx")
    cli([m, *PRUNE], code=2, match=r"the model has no Conv, ConvTranspose, Gemm or MatMul with constant weights", inputs=[m])


def test_no_prunable_layers_conv_output(work):
    m = conv_to_output(work / "one.onnx")
    cli([m, *PRUNE], code=2, match=r"no channel group can be pruned \(channels reach graph output 'y'\). To fix: run 'onnxprune analyze MODEL'", inputs=[m])


def test_all_groups_excluded(work):
    m = work / "model.onnx"
    cli([m, *PRUNE, "--exclude", "*"], code=2, match=r"no channel group can be pruned \(node '.*' is excluded \(--exclude\)\).*check --exclude", inputs=[m])


def test_dynamic_spatial_dims_need_input_shape(work):
    m = cnn(work / "dyn.onnx", hw=("H", "W"))
    cli([m, *PRUNE], code=2, match=r"input 'x' has dynamic dims \['\?', 1, '\?', '\?'\].*To fix: pass --input-shape x:1x1xHxW with the real sizes", inputs=[m])
    ok([m, *PRUNE, "--input-shape", "x:1x1x32x32"], inputs=[m])


@pytest.mark.parametrize(
    "spec, match",
    [
        ("x:1x1xax32", r"malformed --input-shape 'x:1x1xax32'. To fix: write it as NAME:DIMS"),
        ("1x1x32x32", r"malformed --input-shape '1x1x32x32'"),
        ("x:1x1x0x32", r"malformed --input-shape 'x:1x1x0x32'"),
        ("x:1x1x32", r"--input-shape for 'x' has 3 dims but the input has rank 4"),
        ("y:1x1x32x32", r"--input-shape names 'y', which is not a model input. To fix: use one of: x"),
    ],
)
def test_malformed_input_shape(work, spec, match):
    m = cnn(work / "dyn.onnx", hw=("H", "W"))
    cli([m, *PRUNE, "--input-shape", spec], code=2, match=match, inputs=[m])


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("value", ["0", "1", "-0.1", "1.5"])
def test_target_flops_out_of_range(work, value):
    m = work / "model.onnx"
    cli(
        [m, "--target-flops", value, "--quiet"],
        code=2,
        match=rf"--target-flops must be the fraction of MACs to remove, strictly between 0 and 1; got {float(value)}",
        inputs=[m],
    )


def test_target_flops_unreachable(work):
    m = work / "model.onnx"
    line = cli(
        [m, "--target-flops", "0.99", "--round-to", "8", "--quiet"],
        code=2,
        match=r"target of removing 99.0% of the MACs is unreachable: at most \d+\.\d% can be removed.*To fix: lower --target-flops to at most 0\.\d{3}",
        inputs=[m],
    )
    # the suggested target is reachable
    at_most = re.search(r"at most (0\.\d{3}), lower", line).group(1)
    ok([m, "--target-flops", at_most, "--round-to", "8", "--quiet"], inputs=[m])


@pytest.mark.parametrize(
    "args, match",
    [
        (["model.onnx", "--target-flops", "lots"], r"^error: Invalid value for '--target-flops': 'lots' is not a valid float. To fix: see '.*prune --help'.$"),
        (["model.onnx"], r"^error: Missing option '--target-flops' or '--target-latency' \(the fraction of MACs or of measured latency to remove\). To fix: pass e.g. --target-flops 0.3 or --target-latency 0.3, or --plan PLAN to apply a saved plan.$"),
        (["model.onnx", "--target-flops", "0.3", "--strategy", "best"], r"^error: Invalid value for '--strategy': 'best' is not one of 'auto', 'uniform', 'sensitivity', 'cost-aware'"),
        (["model.onnx", "--target-flops", "0.3", "--bogus"], r"^error: No such option '--bogus'"),
    ],
)
def test_click_usage_errors_are_one_line(work, args, match):
    cli(args, code=2, match=match, inputs=[work / "model.onnx"])


# --------------------------------------------------------------------------- outputs
def test_output_is_the_input(work):
    m = work / "model.onnx"
    cli([m, *PRUNE, "-o", m], code=2, match=r"output '.*model.onnx' is the input model. To fix: choose another name with -o/--output", inputs=[m])
    cli([m, *PRUNE, "-o", "./sub/../model.onnx"], code=2, match=r"is the input model", inputs=[m])


def test_output_folder_missing(work):
    m = work / "model.onnx"
    cli([m, *PRUNE, "-o", "missing/out.onnx"], code=2, match=r"output folder 'missing' does not exist. To fix: create it first \(mkdir -p missing\)", inputs=[m])


def test_output_folder_read_only(work):
    m = work / "model.onnx"
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root writes anywhere: the run succeeds and writes atomically
            assert IS_ROOT
            ok([m, *PRUNE, "-o", ro / "out.onnx"], inputs=[m])
            assert listing(ro) == {"out.onnx"}
            onnx.checker.check_model(str(ro / "out.onnx"))
        else:
            cli([m, *PRUNE, "-o", ro / "out.onnx"], code=2, match=r"output folder '.*ro' is not writable. To fix: choose a writable folder with -o/--output", inputs=[m])
    finally:
        ro.chmod(0o755)


def test_existing_output_needs_force(work):
    m = work / "model.onnx"
    out = work / "out.onnx"
    out.write_bytes(b"precious")
    cli([m, *PRUNE, "-o", out], code=2, match=r"output '.*out.onnx' already exists. To fix: pass --force to overwrite it", inputs=[m, out])
    ok([m, *PRUNE, "-o", out, "--force"], inputs=[m])
    onnx.checker.check_model(str(out))
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # like a plain open(), not mkstemp's 0600
    assert listing(work) == {"model.onnx", "val.npz", "out.onnx"}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_report_and_plan_folders_checked_before_work(work):
    m = work / "model.onnx"
    cli([m, *PRUNE, "--report", "nowhere/r.json"], code=2, match=r"output folder 'nowhere' does not exist", inputs=[m])
    cli([m, *PRUNE, "--save-plan", "nowhere/p.json"], code=2, match=r"output folder 'nowhere' does not exist", inputs=[m])


def test_cache_dir_is_a_file(work):
    m, data = work / "model.onnx", work / "val.npz"
    (work / "cachefile").write_text("x")
    cli(
        [m, *PRUNE, "--data", data, "--strategy", "sensitivity", "--cache-dir", "cachefile", "--grid", "0.5"],
        code=2,
        match=r"cannot create the cache folder 'cachefile' \(File exists\). To fix: pass --cache-dir a writable folder",
        inputs=[m, data, work / "cachefile"],
    )


def test_uniform_run_creates_no_cache_folder(work):
    ok(["model.onnx", *PRUNE, "--data", "val.npz", "--strategy", "uniform"])
    assert listing(work) == {"model.onnx", "val.npz", "model.pruned.onnx"}


# --------------------------------------------------------------------------- data
def _data_case(work, make, match, *, extra=()):
    m = work / "model.onnx"
    data = make(work)
    inputs = [m] + ([data] if Path(data).exists() else [])
    return cli([m, *PRUNE, "--strategy", "uniform", "--data", data, *extra], code=2, match=match, inputs=inputs)


def _save(work, name, **arrays):
    np.savez(work / name, **arrays)
    return work / name


def _xy(n=64):
    d = np.load(DEMO_DATA)
    return d["x"][:n].copy(), d["y"][:n].copy()


def test_data_missing(work):
    _data_case(work, lambda w: w / "nope.npz", r"data '.*nope.npz' does not exist \(neither a file, a folder, nor a 'module:function' hook\). To fix: check the --data path")


@pytest.mark.parametrize("how", ["truncated", "text", "no_x"])
def test_data_corrupt(work, how):
    def make(w):
        p = w / "bad.npz"
        if how == "truncated":
            p.write_bytes((w / "val.npz").read_bytes()[:3000])
        elif how == "text":
            p.write_text("x,y\n1,2\n")
        else:
            np.savez(p, images=_xy()[0])
        return p

    match = {
        "truncated": r"'.*bad.npz' is a corrupt .npz file \(BadZipFile",
        "text": r"'.*bad.npz' is not an .npz file \(not a zip archive\)",
        "no_x": r"'.*bad.npz' has no array 'x' \(it has: images\)",
    }[how]
    _data_case(work, make, match)


def test_data_channels_last(work):
    x, y = _xy()
    _data_case(
        work,
        lambda w: _save(w, "nhwc.npz", x=x.transpose(0, 2, 3, 1), y=y),
        r"has shape \(64, 32, 32, 1\) but model input 'x' expects \[\?, 1, 32, 32\] \(data looks channels-last NHWC, model wants NCHW\). To fix: transpose the data: x = x.transpose\(0, 3, 1, 2\)",
    )


def test_data_wrong_dtype(work):
    x, y = _xy()
    _data_case(work, lambda w: _save(w, "int.npz", x=(x * 255).astype(np.int64), y=y), r"is int64 but model input 'x' is float32. To fix: save x as float32")


def test_data_label_count_mismatch(work):
    x, y = _xy()
    _data_case(work, lambda w: _save(w, "count.npz", x=x, y=y[:50]), r"labels y from '.*count.npz' have 50 entries but x has 64 samples")


@pytest.mark.parametrize("bad, match", [(12, r"label 12 is out of range for a model with 10 outputs"), (-1, r"contain a negative label \(-1 at index 3\)")])
def test_data_labels_out_of_range(work, bad, match):
    x, y = _xy()
    y[3] = bad
    _data_case(work, lambda w: _save(w, "range.npz", x=x, y=y), match)


def test_data_nan(work):
    x, y = _xy()
    x[5, 0, 3, 3] = np.nan
    _data_case(work, lambda w: _save(w, "nan.npz", x=x, y=y), r"inputs x from '.*nan.npz' contain NaN or Inf values \(first in sample 5\)")


def test_data_pickled_object_array_refused(work):
    def make(w):
        p = w / "obj.npz"
        np.savez(p, x=np.array([object()] * 3, dtype=object))
        return p

    _data_case(work, make, r"holds Python objects \(a pickled array\), which onnxprune refuses to load")


def test_strategy_sensitivity_needs_data(work):
    m = work / "model.onnx"
    cli([m, *PRUNE, "--strategy", "sensitivity"], code=2, match=r"--strategy sensitivity measures accuracy and needs data. To fix: pass --data DATA", inputs=[m])
    cli(["sensitivity", m], code=2, match=r"sensitivity analysis measures accuracy and needs data. To fix: pass --data DATA", inputs=[m])


# --------------------------------------------------------------------------- plans
def test_plan_for_another_model(work):
    a, b = work / "model.onnx", cnn(work / "other.onnx", channels=(24, 8), seed=3)
    ok([a, *PRUNE, "--save-plan", "plan.json", "-o", "a.out.onnx"], inputs=[a])
    cli([b, *PRUNE, "--plan", "plan.json"], code=2, match=r"plan group 'g\d+' (\(conv\d\) says 16 channels but the model has (8|24)|names producers).*To fix: re-create the plan for this model with --save-plan", inputs=[b, work / "plan.json"])


def test_plan_for_a_renamed_model(work):
    """Same shapes, other node names: the plan's producers form no group here."""
    proto = onnx.load(str(work / "model.onnx"))
    for n in proto.graph.node:
        n.name = "other_" + n.name
    onnx.save(proto, str(work / "renamed.onnx"))
    ok(["model.onnx", *PRUNE, "--save-plan", "plan.json", "-o", "a.out.onnx"])
    cli(["renamed.onnx", *PRUNE, "--plan", "plan.json"], code=2, match=r"plan group 'g\d+' names producers \['conv\d'\] that form no channel group in this model", inputs=[work / "renamed.onnx", work / "plan.json"])


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"groups": [', r"plan file 'plan.json' is not valid JSON \(Expecting value"),
        ('{"version": 1}', r"plan file 'plan.json' is not a valid onnxprune plan \(no 'groups' list\)"),
        ('{"groups": [{"id": "g0"}]}', r"plan file 'plan.json' is not a valid onnxprune plan \('producers'\)"),
        ('{"groups": [{"id": "g0", "producers": ["conv0"], "channels": 16, "kept": [99]}]}', r"keeps channel 99, outside 0..15"),
        ('{"groups": [{"id": "g0", "producers": ["conv0"], "channels": 16, "kept": []}]}', r"keeps no channels"),
        ("[1, 2]", r"is not a valid onnxprune plan"),
        ("\udcff", r"plan file 'plan.json' is not valid JSON"),
    ],
)
def test_malformed_plan(work, text, match):
    p = work / "plan.json"
    if text == "\udcff":
        p.write_bytes(b"\xff\xfe\x00garbage")
    else:
        p.write_text(text)
    cli(["model.onnx", *PRUNE, "--plan", p.name], code=2, match=match + r".*To fix: ", inputs=[work / "model.onnx", p])


def test_plan_missing(work):
    cli(["model.onnx", *PRUNE, "--plan", "nope.json"], code=2, match=r"plan file 'nope.json' does not exist. To fix: check the --plan path")


# --------------------------------------------------------------------------- device
def test_device_cuda_without_cuda(work):
    from onnxprune.evaluate import _cuda_probe

    works, _ = _cuda_probe()
    args = ["model.onnx", *PRUNE, "--strategy", "uniform", "--data", "val.npz", "--device", "cuda"]
    if works:  # a machine with a real GPU: the run uses it
        ok(args)
        return
    cli(args, code=2, match=r"CUDA was requested but ONNX Runtime could not load the CUDA provider \(.+\). To fix: use --device cpu", inputs=[work / "model.onnx", work / "val.npz"])


# --------------------------------------------------------------------------- internal errors and --debug
def test_internal_error_is_exit_1_one_line(work, monkeypatch):
    import onnxprune.api

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(onnxprune.api, "apply_mask", boom)
    cli(["model.onnx", *PRUNE], code=1, match=r"^internal error: RuntimeError: simulated bug \(run with --debug for details and report it\)$", inputs=[work / "model.onnx"])


def test_verification_error_is_exit_1(work, monkeypatch):
    import onnxprune.api
    from onnxprune.errors import VerificationError

    def bad(*a, **k):
        raise VerificationError("pruned model differs from the plan", fix="report this bug")

    monkeypatch.setattr(onnxprune.api, "apply_mask", bad)
    cli(["model.onnx", *PRUNE], code=1, match=r"^error: pruned model differs from the plan. To fix: report this bug.$", inputs=[work / "model.onnx"])


def test_traceback_only_with_debug(work):
    result = CliRunner().invoke(main, ["nope.onnx", *PRUNE, "--debug"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: model file 'nope.onnx' does not exist")
    result = CliRunner().invoke(main, ["nope.onnx", *PRUNE])
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- atomic writes (in-process fault injection)
@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, external):
    """KeyboardInterrupt while the output is renamed into place: no output, no temp file, old file intact."""
    import onnxprune.graph as graph
    from onnxprune.graph import save_model

    model = onnx.load(str(cnn(tmp_path / "m.onnx")))
    old = tmp_path / "out.onnx"
    old.write_bytes(b"previous output")
    files = listing(tmp_path)
    real_replace = os.replace
    calls = []

    def interrupted(src, dst):
        calls.append(dst)
        if Path(dst).name == "out.onnx":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(graph.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, old, external_data=external)
    assert calls
    assert old.read_bytes() == b"previous output"
    assert listing(tmp_path) == files, sorted(listing(tmp_path) - files)


def test_failed_write_is_one_line_output_error(tmp_path, monkeypatch):
    """OSError while writing (disk full, EIO) becomes an OutputError; the temp file is removed."""
    import errno

    from onnxprune.errors import OutputError
    from onnxprune.graph import write_bytes_atomic

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputError, match=r"cannot write '.*out.json' \(No space left on device\). To fix: check free disk space"):
        write_bytes_atomic(tmp_path / "out.json", b"{}")
    assert listing(tmp_path) == set()


# --------------------------------------------------------------------------- subprocess: real process, real signals
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_subprocess_error_line_and_exit_code(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    h = sha(bad)
    r = subprocess.run([sys.executable, "-m", "onnxprune.cli", str(bad), "--target-flops", "0.3"], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: '{bad}' is not a valid ONNX model") and "To fix:" in r.stderr
    assert sha(bad) == h and listing(tmp_path) == {"bad.onnx"}


@pytest.fixture(scope="module")
def sens_case(tmp_path_factory):
    """A model and data for which sensitivity analysis takes a few seconds (several groups, ~0.5 s each)."""
    folder = tmp_path_factory.mktemp("signals")
    cnn(folder / "big.onnx", channels=(32, 32, 48, 48, 64))
    d = np.load(DEMO_DATA)
    np.savez(folder / "val.npz", x=d["x"][:400], y=d["y"][:400])
    return folder


def _sens_cmd(folder: Path, cache: str) -> list[str]:
    return [
        sys.executable, "-m", "onnxprune.cli", str(folder / "big.onnx"), "--target-flops", "0.3",
        "--strategy", "sensitivity", "--data", str(folder / "val.npz"), "--cache-dir", cache,
        "-o", "out.onnx", "--report", "report.json", "--save-plan", "plan.json", "--json",
    ]  # fmt: skip


def _interrupt(folder: Path, workdir: Path, sig: int, cache: str) -> subprocess.CompletedProcess:
    """Start a sensitivity run, wait until it has cached a first group, then send ``sig``."""
    cmd = _sens_cmd(folder, cache)
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps that
    # (so would a user's `nohup ... &`); give the child the default disposition so the test works anywhere
    proc = subprocess.Popen(cmd, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    cache_file = workdir / cache / "big.l1.sensitivity.json"
    deadline = time.monotonic() + 90
    while not cache_file.exists():
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "no cache file after 90 s"
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _no_tables(files: set[str]) -> set[str]:
    """``files`` without the latency-table cache files (``cache/latency-*.json``, complete JSON written atomically)."""
    return {f for f in files if not re.match(r"cache/latency-[a-z0-9]+-b\d+-t\d+-[0-9a-f]+\.json$", f)}

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_interrupts_cleanly_and_cache_resumes(sens_case, tmp_path, sig):
    inputs = [sens_case / "big.onnx", sens_case / "val.npz"]
    before = {p: sha(p) for p in inputs}
    r = _interrupt(sens_case, tmp_path, sig, "cache")
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert r.stderr.strip() == "interrupted: no output was written (partial files were removed)"
    assert r.stdout == ""
    # no model, report, plan, temp file; the measured layer times of --round-to auto may be kept in --cache-dir
    assert _no_tables(listing(tmp_path)) == {"cache", "cache/big.l1.sensitivity.json"}
    cached = json.loads((tmp_path / "cache" / "big.l1.sensitivity.json").read_text())
    assert len(cached["drops"]) >= 1
    assert all(sha(p) == h for p, h in before.items())
    if sig != signal.SIGTERM:
        return
    # rerun: the groups measured before the interruption come from the cache
    r2 = subprocess.run(_sens_cmd(sens_case, "cache"), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert r2.returncode == 0, r2.stderr
    report = json.loads(r2.stdout)
    assert report["detail"]["sensitivity_cached_groups"] >= len(cached["drops"]) >= 1
    assert _no_tables(listing(tmp_path)) == {"cache", "cache/big.l1.sensitivity.json", "out.onnx", "report.json", "plan.json"}
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    assert all(sha(p) == h for p, h in before.items())
