"""Plans round-trip through JSON and are validated; criteria rank channels sensibly."""

import json

import numpy as np
import onnx
import pytest

from onnxprune.errors import PlanError
from onnxprune.groups import find_groups
from onnxprune.importance import CRITERIA, mask_from_counts, score_units
from onnxprune.plan import PruningPlan
from oracle import random_mask


@pytest.fixture(scope="module")
def cg(zoo_export):
    return find_groups(onnx.load(str(zoo_export("resnet20", "legacy", 0.5))))


def test_plan_round_trip(cg, tmp_path):
    mask = random_mask(cg, np.random.default_rng(0))
    plan = PruningPlan.from_mask(cg, mask)
    plan.save(tmp_path / "p.json")
    again = PruningPlan.load(tmp_path / "p.json")
    assert np.array_equal(again.to_mask(cg), mask)
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["groups"] and all(set(g) == {"id", "producers", "channels", "kept", "kept_by_producer", "removed_by_producer"} for g in d["groups"])


@pytest.mark.parametrize(
    "edit, phrase",
    [
        (lambda g: g.update(producers=["nope"]), "form no channel group"),
        (lambda g: g.update(channels=g["channels"] + 1), "channels but the model has"),
        (lambda g: g.update(kept=[10_000]), "outside"),
        (lambda g: g.update(kept=[0, 0]), "twice"),
        (lambda g: g.update(kept=[]), "keeps no channels"),
    ],
)
def test_plan_mismatch_errors_name_the_group(cg, edit, phrase):
    mask = random_mask(cg, np.random.default_rng(1))
    d = PruningPlan.from_mask(cg, mask).to_dict()
    edit(d["groups"][0])
    with pytest.raises(PlanError, match=phrase) as e:
        PruningPlan.from_dict(d).to_mask(cg)
    assert d["groups"][0]["id"] in str(e.value)


def test_plan_for_blocked_group_is_refused(cg):
    blocked = next(g for g in cg.groups if not g.prunable)
    d = {"groups": [{"id": blocked.id, "producers": list(blocked.producers), "channels": blocked.channels, "kept": [0]}]}
    with pytest.raises(PlanError, match="cannot be pruned"):
        PruningPlan.from_dict(d).to_mask(cg)


def test_malformed_plan_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        PruningPlan.load(p)
    p.write_text(json.dumps({"groups": [{"id": 1}]}))
    with pytest.raises(PlanError, match="not a valid onnxprune plan"):
        PruningPlan.load(p)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criteria_give_finite_scores_for_every_prunable_unit(cg, criterion):
    from onnxprune.importance import DATA_CRITERIA

    data = None
    if criterion in DATA_CRITERIA:  # recon chooses from samples
        dims = [d.dim_value for d in cg.model.graph.input[0].type.tensor_type.shape.dim][1:]
        data = np.random.default_rng(0).normal(size=(16, *dims)).astype(np.float32)
    s = score_units(cg, criterion, data=data)
    assert s.shape == (cg.n_units,)
    units = [u for g in cg.prunable_groups for u in g.units]
    assert np.isfinite(s[units]).all()


def test_l1_keeps_the_largest_filters():
    """A conv whose filter norms are known: L1 keeps the biggest ones."""
    from onnx import TensorProto, helper, numpy_helper

    w1 = np.zeros((8, 1, 1, 1), np.float32)
    w1[:, 0, 0, 0] = [5, 1, 7, 2, 8, 3, 6, 4]
    w2 = np.ones((4, 8, 1, 1), np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"), helper.make_node("Conv", ["a", "w2"], ["y"], name="c2")],
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    cg = find_groups(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))
    grp = next(g for g in cg.groups if g.producers == ("c1",))
    mask = mask_from_counts(cg, score_units(cg, "l1"), {grp.id: 4})
    kept = sorted(c for u, c in zip(grp.units, grp.channel_ids) if mask[u])
    assert kept == [0, 2, 4, 6]  # norms 5, 7, 8, 6
