"""Tests of the prompt class sets, evaluation label spaces and their mapping (clip2scene.classes)."""

from __future__ import annotations

import pytest

from clip2scene import classes as cl
from clip2scene.classes import (
    ALL_CLASSES,
    CITYSCAPES_CLASSES,
    CLASS_SETS,
    EVAL_CLASSES,
    NUSCENES_CLASSES,
    SCANNET_CLASSES,
    SEMANTICKITTI_CLASSES,
    get_class_set,
    get_eval_classes,
    prompt_to_eval,
)
from clip2scene.errors import ConfigError

# nuScenes evaluation classes that no prompt of a set can predict (no counterpart there).
UNREACHABLE_NUSCENES = {
    "all": set(),
    "nuscenes": set(),
    "cityscapes": {"barrier", "construction vehicle", "traffic_cone", "trailer", "other_flat"},
    "semantickitti": {"barrier", "construction vehicle", "traffic_cone", "trailer"},
}


def _mapped(prompt_set: str, eval_set: str) -> dict[str, str | None]:
    """prompt name -> evaluation name (None for label 0), through prompt_to_eval."""
    eval_names = EVAL_CLASSES[eval_set]
    return {name: (eval_names[lab - 1] if lab else None)
            for name, lab in zip(CLASS_SETS[prompt_set], prompt_to_eval(prompt_set, eval_set))}


def test_set_sizes_and_verbatim_names():
    assert len(NUSCENES_CLASSES) == 16
    assert len(SEMANTICKITTI_CLASSES) == 19
    assert len(CITYSCAPES_CLASSES) == 19
    assert len(SCANNET_CLASSES) == 20
    assert NUSCENES_CLASSES[7] == "traffic_cone" and NUSCENES_CLASSES[10] == "driveable surface"
    assert SEMANTICKITTI_CLASSES[4] == "other vehicle" and SEMANTICKITTI_CLASSES[-1] == "traffic sign"
    assert CITYSCAPES_CLASSES[10] == "sky" and CITYSCAPES_CLASSES[-1] == "bicycle"
    assert SCANNET_CLASSES[15] == "shower curtain" and SCANNET_CLASSES[-1] == "other furniture"
    for name, names in CLASS_SETS.items():
        assert len(set(names)) == len(names), name
        assert get_class_set(name) is names


def test_all_is_ordered_union_without_duplicates():
    assert len(ALL_CLASSES) == len(set(ALL_CLASSES)) == 52
    for s in (NUSCENES_CLASSES, SEMANTICKITTI_CLASSES, CITYSCAPES_CLASSES, SCANNET_CLASSES):
        assert set(s) <= set(ALL_CLASSES)
    assert ALL_CLASSES[:16] == NUSCENES_CLASSES  # nuScenes first, in its order
    # first occurrence wins: 'car' and 'bicycle' keep their nuScenes position
    assert ALL_CLASSES.index("car") == 3 and ALL_CLASSES.index("bicycle") == 1
    assert ALL_CLASSES[16] == "other vehicle"  # first new SemanticKITTI name
    assert ALL_CLASSES.index("wall") < ALL_CLASSES.index("floor")  # Cityscapes before ScanNet
    expected = []
    for s in (NUSCENES_CLASSES, SEMANTICKITTI_CLASSES, CITYSCAPES_CLASSES, SCANNET_CLASSES):
        expected += [n for n in s if n not in expected]
    assert ALL_CLASSES == tuple(expected)


def test_eval_label_spaces():
    assert set(EVAL_CLASSES) == {"nuscenes", "semantickitti", "scannet"}
    assert EVAL_CLASSES["nuscenes"] == NUSCENES_CLASSES
    assert len(EVAL_CLASSES["semantickitti"]) == 19 and len(EVAL_CLASSES["scannet"]) == 20
    assert get_eval_classes("scannet")[12] == "desk"  # NYU40 id 14 is label 13


@pytest.mark.parametrize("name", ["nuscenes", "semantickitti", "scannet"])
def test_identity_when_sets_equal(name):
    assert prompt_to_eval(name, name) == tuple(range(1, len(EVAL_CLASSES[name]) + 1))


@pytest.mark.parametrize("prompt_set", sorted(CLASS_SETS))
@pytest.mark.parametrize("eval_set", sorted(EVAL_CLASSES))
def test_every_label_in_range(prompt_set, eval_set):
    table = prompt_to_eval(prompt_set, eval_set)
    assert len(table) == len(CLASS_SETS[prompt_set])
    assert all(isinstance(x, int) and 0 <= x <= len(EVAL_CLASSES[eval_set]) for x in table)
    # a prompt name that is an evaluation class always maps to itself
    for name, target in _mapped(prompt_set, eval_set).items():
        if name in EVAL_CLASSES[eval_set]:
            assert target == name


def test_semantickitti_to_nuscenes_entries():
    m = _mapped("semantickitti", "nuscenes")
    assert m["person"] == "pedestrian"
    assert m["bicyclist"] == "bicycle" and m["motorcyclist"] == "motorcycle"
    assert m["road"] == "driveable surface" and m["parking"] == "driveable surface"
    assert m["other ground"] == "other_flat"
    assert m["trunk"] == "vegetation"
    assert m["other vehicle"] == "bus"
    assert m["building"] == m["fence"] == m["pole"] == m["traffic sign"] == "manmade"
    assert m["car"] == "car" and m["sidewalk"] == "sidewalk"


def test_cityscapes_to_nuscenes_entries():
    m = _mapped("cityscapes", "nuscenes")
    assert m["sky"] is None
    assert m["person"] == "pedestrian" and m["rider"] == "bicycle"
    for name in ("building", "wall", "fence", "pole", "traffic light", "traffic sign"):
        assert m[name] == "manmade", name
    assert m["road"] == "driveable surface" and m["terrain"] == "terrain"
    assert m["train"] == "bus" and m["bus"] == "bus"


def test_scannet_to_outdoor_entries():
    m = _mapped("scannet", "nuscenes")
    assert m["wall"] == m["door"] == m["window"] == "manmade"
    assert all(m[n] is None for n in ("floor", "chair", "toilet", "other furniture", "sofa"))
    k = _mapped("scannet", "semantickitti")
    assert k["wall"] == "building" and k["bed"] is None


def test_to_semantickitti_entries():
    n = _mapped("nuscenes", "semantickitti")
    assert n["pedestrian"] == "person"
    assert n["bus"] == n["trailer"] == n["construction vehicle"] == "other vehicle"
    assert n["driveable surface"] == "road" and n["other_flat"] == "other ground"
    assert n["manmade"] == "building" and n["barrier"] == "fence" and n["traffic_cone"] is None
    c = _mapped("cityscapes", "semantickitti")
    assert c["rider"] == "bicyclist" and c["traffic light"] == "traffic sign"
    assert c["train"] == "other vehicle" and c["sky"] is None and c["wall"] == "building"


def test_to_scannet_entries():
    assert set(prompt_to_eval("nuscenes", "scannet")) == {0}
    assert set(prompt_to_eval("semantickitti", "scannet")) == {0}
    c = _mapped("cityscapes", "scannet")
    assert c["wall"] == "wall" and c["building"] is None and c["person"] is None
    a = _mapped("all", "scannet")
    assert all(a[n] == n for n in SCANNET_CLASSES)
    assert {n for n, t in a.items() if t is not None} == set(SCANNET_CLASSES)


@pytest.mark.parametrize("source", ["semantickitti", "cityscapes", "scannet", "nuscenes"])
@pytest.mark.parametrize("eval_set", ["nuscenes", "semantickitti", "scannet"])
def test_all_agrees_with_each_source_set(source, eval_set):
    """'all' is derived from the per-set tables: the same name maps the same way."""
    a = _mapped("all", eval_set)
    s = _mapped(source, eval_set)
    assert all(a[name] == target for name, target in s.items())


def test_tables_are_explicit_and_complete():
    for eval_set, tables in cl.MAPPING_TABLES.items():
        assert set(tables) | {eval_set} == {"nuscenes", "semantickitti", "cityscapes", "scannet"}
        for prompt_set, table in tables.items():
            assert set(table) == set(CLASS_SETS[prompt_set]), (prompt_set, eval_set)
            assert all(t is None or t in EVAL_CLASSES[eval_set] for t in table.values())


@pytest.mark.parametrize("prompt_set", ["all", "nuscenes", "cityscapes", "semantickitti"])
def test_nuscenes_classes_reachable(prompt_set):
    reached = {t for t in _mapped(prompt_set, "nuscenes").values() if t is not None}
    assert reached == set(NUSCENES_CLASSES) - UNREACHABLE_NUSCENES[prompt_set]


def test_all_reaches_every_eval_class():
    for eval_set, names in EVAL_CLASSES.items():
        assert {t for t in _mapped("all", eval_set).values() if t is not None} == set(names)


def test_unknown_names_raise_config_error():
    with pytest.raises(ConfigError, match="kitti"):
        prompt_to_eval("kitti", "nuscenes")
    with pytest.raises(ConfigError, match="cityscapes"):
        prompt_to_eval("nuscenes", "cityscapes")  # a prompt set, not an evaluation label space
    with pytest.raises(ConfigError):
        get_class_set("ade20k")
    with pytest.raises(ConfigError):
        get_eval_classes("waymo")
