"""Memory-lean loading, rewriting and saving (target: peak memory <= 2x the model).

* :func:`write_inline` writes exactly ``SerializeToString``'s bytes, one tensor
  at a time; a skeleton plus the initializers is the model;
* ``save_model`` round-trips inline and with external data, leaving no
  temporary files;
* lazy loading keeps large external initializers on disk; pruning a lazily
  loaded model gives the same scores, weights and outputs as pruning it in
  memory, and the result saves both ways;
* lazy tensors are read only from files ``load_model`` validated, and onnx /
  ONNX Runtime refuse them instead of reading a wrong file;
* ``find_groups`` does not copy a model whose nodes are named; the output of
  ``apply_mask`` shares nothing with its input: mutating either afterwards
  leaves the other intact;
* large files are parsed and checked one tensor at a time with the same
  verdicts as ``onnx.load`` + the path checker (byte flips, truncations,
  structural mutations);
* pruning and saving a 64 MB model stay within measured memory bounds.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune.graph as graph_mod
import onnxprune.tensors as tensors_mod
from onnxprune.errors import BadModelError, OnnxPruneError
from onnxprune.graph import GraphIndex, load_model, proto_size, save_model
from onnxprune.groups import find_groups
from onnxprune.importance import score_units
from onnxprune.rewrite import apply_mask
from onnxprune.tensors import InlinePlan, is_lazy, materialize, skeleton, write_inline
from oracle import random_mask, run


def build(*, seed: int = 0, named: bool = True, width: int = 1) -> onnx.ModelProto:
    """Conv-Conv-Flatten-Gemm(transB)-MatMul(+bias)-Gemm, with metadata, doc strings and a Constant node."""
    rng = np.random.default_rng(seed)
    c1, c2, h, f = 12 * width, 16 * width, 40 * width, 24 * width

    def w(*shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) or 1)).astype(np.float32))

    inits = {
        "conv1.w": w(c1, 3, 3, 3), "conv1.b": w(c1), "conv2.w": w(c2, c1, 3, 3), "conv2.b": w(c2),
        "fc1.w": w(h, c2 * 16), "fc1.b": w(h), "mm.w": w(h, f), "mm.b": w(f), "fc2.w": w(f, 10), "fc2.b": w(10),
    }  # fmt: skip
    for name, t in inits.items():
        t.name = name
    inits["conv2.w"].doc_string = "a documented weight"
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.w", "fc1.b"], ["f1"], name="fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["r3"], name="relu3"),
        helper.make_node("MatMul", ["r3", "mm.w"], ["m1"], name="mm"),
        helper.make_node("Add", ["m1", "mm.b"], ["m2"], name="mm_bias"),
        helper.make_node("Constant", [], ["half"], name="half", value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("Mul", ["m2", "half"], ["m3"], name="scale"),
        helper.make_node("Relu", ["m3"], ["r4"], name="relu4"),
        helper.make_node("Gemm", ["r4", "fc2.w", "fc2.b"], ["logits"], name="fc2"),
    ]
    if not named:
        for n in nodes:
            n.name = ""
    graph = helper.make_graph(
        nodes,
        "memtest",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=list(inits.values()),
        doc_string="graph doc",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8, producer_name="test_memory", doc_string="model doc")
    helper.set_model_props(model, {"author": "tests", "purpose": "memory"})
    onnx.checker.check_model(model)
    return model


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=0)
    return path


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: np.array(numpy_helper.to_array(t)) for t in materialize(model).graph.initializer}


X = np.random.default_rng(7).standard_normal((4, 3, 8, 8)).astype(np.float32)


@pytest.fixture
def lazy_everything(monkeypatch):
    """Every external tensor becomes lazy, and slicing reads a few rows at a time."""
    monkeypatch.setattr(graph_mod, "LAZY_MIN_BYTES", 0)
    monkeypatch.setattr(tensors_mod, "BLOCK_BYTES", 512)


# --------------------------------------------------------------------------- streamed serialization
def test_write_inline_writes_serialize_to_string():
    m = build()
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])  # float_data, not raw_data
    m.graph.initializer.append(typed)
    m.graph.initializer.append(numpy_helper.from_array(np.arange(5, dtype=np.int64), "ints"))
    m.graph.value_info.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, ["N", 12, 8, 8]))
    buf = io.BytesIO()
    write_inline(m, buf)
    assert buf.getvalue() == m.SerializeToString()
    assert InlinePlan(m).size == proto_size(m) == m.ByteSize()


def test_skeleton_plus_initializers_is_the_model():
    m = build()
    s = skeleton(m)
    assert len(s.graph.initializer) == 0 and len(s.graph.node) == len(m.graph.node)
    s.graph.initializer.extend(m.graph.initializer)
    assert s.SerializeToString() == m.SerializeToString()


def test_save_model_inline_and_external_round_trip(tmp_path):
    m = build()
    save_model(m, tmp_path / "in.onnx")
    assert (tmp_path / "in.onnx").read_bytes() == m.SerializeToString()
    save_model(m, tmp_path / "ext.onnx", external_data=True)
    onnx.checker.check_model(str(tmp_path / "ext.onnx"))
    back = onnx.load(str(tmp_path / "ext.onnx"))
    assert arrays(back).keys() == arrays(m).keys()
    assert all(np.array_equal(arrays(back)[k], v) for k, v in arrays(m).items())
    assert next(t for t in back.graph.initializer if t.name == "conv2.w").doc_string == "a documented weight"
    assert np.array_equal(run(back, X)[0], run(m, X)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "in.onnx"]  # no temporary files


# --------------------------------------------------------------------------- lazy tensors
def test_lazy_load_keeps_weights_on_disk(tmp_path, lazy_everything):
    path = save_external(build(), tmp_path / "m.onnx")
    eager = load_model(path, lazy=False)
    lazy = load_model(path, lazy=True)
    assert all(is_lazy(t) and not t.HasField("raw_data") for t in lazy.graph.initializer)
    assert not any(is_lazy(t) for t in eager.graph.initializer)
    w = GraphIndex(lazy).const("fc1.w")
    assert isinstance(w, np.memmap) and not w.flags.writeable
    assert np.array_equal(w, GraphIndex(eager).const("fc1.w"))
    assert all(np.array_equal(arrays(lazy)[k], v) for k, v in arrays(eager).items())
    assert np.array_equal(run(materialize(lazy), X)[0], run(eager, X)[0])


def test_lazy_is_chosen_by_size(tmp_path, monkeypatch):
    path = save_external(build(), tmp_path / "m.onnx")
    assert not any(is_lazy(t) for t in load_model(path).graph.initializer)  # small: read into memory
    monkeypatch.setattr(graph_mod, "LAZY_THRESHOLD", 1024)
    monkeypatch.setattr(graph_mod, "LAZY_MIN_BYTES", 1024)
    m = load_model(path)
    assert {t.name for t in m.graph.initializer if is_lazy(t)} == {"conv1.w", "conv2.w", "fc1.w", "mm.w"}  # >= 1 KiB stay on disk
    assert all(t.HasField("raw_data") for t in m.graph.initializer if not is_lazy(t))


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm"])
def test_pruning_a_lazy_model_equals_pruning_it_in_memory(tmp_path, lazy_everything, criterion):
    path = save_external(build(seed=1), tmp_path / "m.onnx")
    cg_e, cg_l = find_groups(load_model(path, lazy=False)), find_groups(load_model(path, lazy=True))
    s_e, s_l = score_units(cg_e, criterion), score_units(cg_l, criterion)
    assert np.array_equal(s_e, s_l)
    for seed in range(3):
        mask = random_mask(cg_e, np.random.default_rng(seed))
        assert not mask.all()
        p_e, p_l = apply_mask(cg_e, mask), apply_mask(cg_l, mask)
        assert [t.name for t in p_e.graph.initializer] == [t.name for t in p_l.graph.initializer]
        a_e, a_l = arrays(p_e), arrays(p_l)
        assert all(np.array_equal(a_l[k], v) and a_l[k].dtype == v.dtype for k, v in a_e.items())
        assert np.array_equal(run(materialize(p_l), X)[0], run(p_e, X)[0])
    untouched = {t.name for t in p_l.graph.initializer if is_lazy(t)}
    assert "fc2.b" in untouched  # a tensor no edit touches stays a reference to the input's file
    assert not any(is_lazy(t) for t in p_l.graph.initializer if t.name in ("fc1.w", "conv2.w"))


def test_lazy_pruned_model_saves_both_ways(tmp_path, lazy_everything):
    path = save_external(build(seed=2), tmp_path / "m.onnx")
    cg = find_groups(load_model(path, lazy=True))
    mask = random_mask(cg, np.random.default_rng(0))
    pruned = apply_mask(cg, mask)
    want = run(materialize(pruned), X)[0]
    out = save_model(pruned, tmp_path / "p.onnx")  # lazy tensors: external data by default
    assert (tmp_path / "p.onnx.data").is_file()
    onnx.checker.check_model(str(out))
    assert np.array_equal(run(onnx.load(str(out)), X)[0], want)
    inline = save_model(pruned, tmp_path / "q.onnx", external_data=False)
    assert not (tmp_path / "q.onnx.data").exists()
    assert np.array_equal(run(onnx.load(str(inline)), X)[0], want)
    again = save_model(load_model(out, lazy=True), tmp_path / "r.onnx")  # lazy in, lazy copy out
    assert np.array_equal(run(onnx.load(str(again)), X)[0], want)


def test_lazy_tensors_are_read_only_from_validated_files(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(16, dtype=np.float32).tobytes())
    m = build()
    t = next(t for t in m.graph.initializer if t.name == "fc2.b")
    t.ClearField("raw_data")
    tensors_mod.set_external(t, str(secret), 0, 40)  # an absolute location nobody validated
    assert is_lazy(t)
    with pytest.raises(BadModelError, match="which onnxprune did not load"):
        GraphIndex(m).const("fc2.b")
    with pytest.raises(OnnxPruneError):
        find_groups(m)


def test_lazy_models_fail_loudly_elsewhere(tmp_path, lazy_everything):
    """onnx and ONNX Runtime refuse absolute locations: a lazy model never reads a wrong file."""
    import onnxruntime as ort

    lazy = load_model(save_external(build(), tmp_path / "m.onnx"), lazy=True)
    with pytest.raises(Exception, match="(?i)absolute"):
        numpy_helper.to_array(lazy.graph.initializer[0])
    with pytest.raises(Exception, match="(?i)absolute"):
        ort.InferenceSession(lazy.SerializeToString(), providers=["CPUExecutionProvider"])


def test_lazy_load_checks_tensor_sizes(tmp_path, lazy_everything):
    path = save_external(build(), tmp_path / "m.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.name == "fc1.w")
    for e in t.external_data:
        if e.key == "length":
            e.value = str(int(e.value) - 4)
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(BadModelError, match=r"tensor 'fc1.w' of shape \[40, 256\] holds 40956 bytes of data, not 40960"):
        load_model(path, lazy=True)


def test_dry_run_feeds_weights_as_zeros(tmp_path, lazy_everything):
    """The ONNX Runtime dry run for shapes needs no weight in memory (lazy ones included)."""
    lazy = load_model(save_external(build(), tmp_path / "m.onnx"), lazy=True)
    want = {"c1": (1, 12, 8, 8), "c2": (1, 16, 4, 4), "f1": (1, 40), "m3": (1, 24), "logits": (1, 10)}
    assert graph_mod._ort_shapes(lazy, list(want)) == want
    assert graph_mod._ort_shapes(lazy, ["c2"], {"x": [2, 3, 8, 8]}) == {"c2": (2, 16, 4, 4)}
    shapes = graph_mod.infer_shapes(lazy, input_shapes={"x": [2, 3, 8, 8]}, need=["c2"])
    assert shapes["c2"] == (2, 16, 4, 4) and shapes["fc1.w"] == (40, 256)


# --------------------------------------------------------------------------- lean loading of large files
def _verdict(path: Path, *, lean: bool, monkeypatch) -> tuple:
    monkeypatch.setattr(graph_mod, "LEAN_LOAD_BYTES", 0 if lean else 1 << 62)
    try:
        return ("ok", load_model(path).SerializeToString())
    except OnnxPruneError as exc:  # the protobuf parser's own words for a corrupt file may differ
        return ("error", re.sub(r"\(DecodeError: .*\)\. To fix", "(DecodeError). To fix", str(exc)))


def test_lean_load_gives_the_same_model_and_errors(tmp_path, monkeypatch):
    """Parsing field by field + checking tensor by tensor == onnx.load + check_model(path), on valid and broken files."""
    from test_fuzz import MUTATIONS, mutate, random_model

    rng = np.random.default_rng(0)
    files = []
    for seed in range(3):
        data = build(seed=seed).SerializeToString()
        files.append(data)
        for i in range(60):
            buf = bytearray(data)
            if i % 4 == 3:
                buf = buf[: int(rng.integers(0, len(buf)))]
            else:
                for _ in range(int(rng.integers(1, 6))):
                    buf[int(rng.integers(0, len(buf)))] ^= 1 << int(rng.integers(8))
            files.append(bytes(buf))
    for kind in MUTATIONS:
        r = np.random.default_rng(MUTATIONS.index(kind))
        for seed in (3, 5):
            try:
                files.append(mutate(random_model(seed), r, kind).SerializeToString())
            except Exception:  # noqa: BLE001 - protobuf refused to serialize the mutant
                pass
    path = tmp_path / "m.onnx"
    outcomes = {"ok": 0, "error": 0}
    for data in files:
        path.write_bytes(data)
        normal = _verdict(path, lean=False, monkeypatch=monkeypatch)
        assert _verdict(path, lean=True, monkeypatch=monkeypatch) == normal
        outcomes[normal[0]] += 1
    assert outcomes["ok"] > 50 and outcomes["error"] > 50


def test_lean_load_checks_large_tensors(tmp_path, monkeypatch):
    """A large initializer is checked on its own: too little raw data is still the checker's error."""
    m = build()
    t = next(t for t in m.graph.initializer if t.name == "fc1.w")
    t.raw_data = t.raw_data[:100]
    path = tmp_path / "bad.onnx"
    path.write_bytes(m.SerializeToString())
    monkeypatch.setattr(graph_mod, "LEAN_LOAD_BYTES", 0)
    with pytest.raises(BadModelError, match=r"fails the ONNX checker: .*raw_data size \(100 bytes\) is too small"):
        load_model(path)


def test_lean_load_leaves_text_formats_to_onnx(tmp_path, monkeypatch):
    """Only binary files are parsed field by field; a text file gets the usual verdict."""
    path = tmp_path / "m.textproto"
    onnx.save(build(), str(path), format="textproto")
    assert _verdict(path, lean=True, monkeypatch=monkeypatch) == _verdict(path, lean=False, monkeypatch=monkeypatch)


# --------------------------------------------------------------------------- sharing and mutation
def test_find_groups_copies_only_unnamed_models():
    named = build()
    assert find_groups(named).model is named
    unnamed = build(named=False)
    before = unnamed.SerializeToString()
    cg = find_groups(unnamed)
    assert cg.model is not unnamed and all(n.name for n in cg.model.graph.node)
    assert unnamed.SerializeToString() == before


@pytest.mark.parametrize("lazy", [False, True])
def test_apply_mask_output_and_input_are_independent(tmp_path, lazy_everything, lazy):
    model = load_model(save_external(build(seed=3), tmp_path / "m.onnx"), lazy=lazy)
    before = model.SerializeToString()
    cg = find_groups(model)
    mask = random_mask(cg, np.random.default_rng(1))
    pruned = apply_mask(cg, mask)
    snapshot = pruned.SerializeToString()
    want = run(materialize(pruned), X)[0]
    # mutate the output in every way: the input is untouched
    for t in pruned.graph.initializer:
        if not is_lazy(t):
            t.raw_data = b"\0" * len(t.raw_data)
        del t.dims[:]
    for n in pruned.graph.node:
        n.name, n.op_type = "x", "Identity"
    del pruned.graph.input[:]
    pruned.metadata_props[0].value = "changed"
    assert model.SerializeToString() == before
    # mutate the input: a fresh output is unaffected by what happened to the first
    pruned2 = apply_mask(cg, mask)
    assert pruned2.SerializeToString() == snapshot
    for t in model.graph.initializer:
        if not is_lazy(t):
            t.raw_data = b"\0" * len(t.raw_data)
    model.graph.node[0].name = "renamed"
    assert pruned2.SerializeToString() == snapshot
    assert np.array_equal(run(materialize(pruned2), X)[0], want)


# --------------------------------------------------------------------------- measured memory
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def _peak_mib(fn) -> float:
    """Peak resident memory above the current level while ``fn`` runs (Linux: VmHWM reset via clear_refs)."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_pruning_and_saving_stay_within_memory_bounds(tmp_path):
    """A 64 MB model: apply_mask costs about the pruned model, saving about one tensor (not a full copy)."""
    model = build(width=16)  # 13 MB of weights (fc1.w: 640 x 4096 floats)
    for k in range(12):  # 48 MB the graph does not read: apply_mask must not copy them, save_model streams them
        model.graph.initializer.append(numpy_helper.from_array(np.full((1024, 1024), k, np.float32), f"extra{k}"))
    size_mib = sum(len(t.raw_data) for t in model.graph.initializer) / 2**20
    assert size_mib > 50
    try:
        _peak_mib(lambda: None)
    except OSError:
        pytest.skip("cannot reset the peak memory counter here")
    save_peak = _peak_mib(lambda: save_model(model, tmp_path / "m.onnx"))
    assert save_peak < 0.35 * size_mib, f"inline save used {save_peak:.0f} MiB for a {size_mib:.0f} MiB model"
    ext_peak = _peak_mib(lambda: save_model(model, tmp_path / "e.onnx", external_data=True))
    assert ext_peak < 0.35 * size_mib, f"external save used {ext_peak:.0f} MiB for a {size_mib:.0f} MiB model"
    cg = find_groups(model)
    assert cg.model is model
    mask = cg.full_mask()
    for g in cg.prunable_groups:
        mask[list(g.units)[: g.channels // 4]] = False
    out = {}
    apply_peak = _peak_mib(lambda: out.setdefault("p", apply_mask(cg, mask)))
    pruned_mib = sum(len(t.raw_data) for t in out["p"].graph.initializer) / 2**20
    assert apply_peak < pruned_mib + 0.35 * size_mib, f"apply_mask used {apply_peak:.0f} MiB for a {pruned_mib:.0f} MiB result"


def test_evaluating_a_lazy_model_says_what_to_do(tmp_path, lazy_everything):
    from onnxprune.errors import BadModelError
    from onnxprune.evaluate import make_session

    lazy = load_model(save_external(build(), tmp_path / "m.onnx"), lazy=True)
    with pytest.raises(BadModelError, match="external data file") as e:
        make_session(lazy)
    assert "without --data" in e.value.fix
