"""Class sets shared by both stages: prompt class names, evaluation classes and their mapping.

Pure Python (no torch), so `storage/`, `precompute/` and `train/` can all import it.

* Prompt class sets (`CLASS_SETS`, `get_class_set`): the names CLIP is prompted with, verbatim
  from the CLIP2Scene release (method.md section 2): ``nuscenes`` (16), ``semantickitti`` (19),
  ``cityscapes`` (19), ``scannet`` (20), and ``all``, the ordered union of those four (in that
  order, first occurrence wins: 52 names), as the release's ``prompt_engineering.py`` builds
  multi-set prompts.
* Evaluation label spaces (`EVAL_CLASSES`, `get_eval_classes`): label ids are 1..K in the order
  of the tuple, 0 = ignore. ``nuscenes``: nuScenes-lidarseg 16 classes; ``semantickitti``: the
  standard 19-class learning map (spelled as the prompt names, i.e. ``"other vehicle"`` for the
  yaml's ``other-vehicle``); ``scannet``: the 20 ScanNet classes (NYU40 ids 1-12, 14, 16, 24,
  28, 33, 34, 36, 39 in that order).
* `prompt_to_eval(prompt_set, eval_set)`: for each prompt class, the evaluation label it is
  counted as (0 = none), so that a prediction ``argmax over prompt classes`` can be scored in
  an evaluation label space. Built by class NAME from the tables below: a prompt name that is an
  evaluation class maps to itself; otherwise the explicit table entry applies. ``all`` uses the
  union of the tables, which therefore must agree on names shared by several sets (checked at
  import).

Judgement calls in the tables (the nuScenes rules are from the nuScenes annotator instructions
and the lidarseg class definitions; SemanticKITTI from its learning map):

* Riders belong to their vehicle in nuScenes ("if there is a rider, include the rider in the
  box" for bicycle and motorcycle), so SemanticKITTI ``bicyclist``/``motorcyclist`` map to
  ``bicycle``/``motorcycle``, and Cityscapes ``rider`` (vehicle unknown) to ``bicycle``, the
  typical ridden vehicle, not to ``pedestrian``. Towards SemanticKITTI, ``rider`` is
  ``bicyclist``.
* Static man-made structure is one nuScenes class, ``manmade`` (buildings, walls, fences, guard
  rails, poles, traffic signs and lights): ``building``, ``wall``, ``fence``, ``pole``,
  ``traffic light``, ``traffic sign`` and ScanNet's facade parts ``wall``, ``door``, ``window``
  map there. nuScenes ``barrier`` is a *temporary* traffic barrier (movable object), so no
  permanent-structure prompt maps to it.
* ``road`` and SemanticKITTI ``parking`` map to ``driveable surface``: nuScenes defines it as
  every surface a car can drive on regardless of traffic rules, which includes parking areas
  (``other_flat`` is for traffic islands, delimiters, rail tracks, water). SemanticKITTI
  ``other ground`` (traffic islands, other ground that is not road/sidewalk/terrain) is
  ``other_flat``.
* ``trunk`` is part of a tree: nuScenes ``vegetation``.
* SemanticKITTI ``other vehicle`` folds in bus and on-rails vehicles (learning map 13 bus, 16
  on-rails -> other-vehicle); bus is its named member, so it maps to ``bus``. Cityscapes
  ``train`` (trams, trains) has no nuScenes class; the on-road public-transport vehicles in
  nuScenes are buses, so ``train`` -> ``bus`` too (and -> ``other vehicle`` for SemanticKITTI,
  exactly its learning map).
* nuScenes -> SemanticKITTI: ``bus``, ``construction vehicle``, ``trailer`` -> ``other
  vehicle``; ``driveable surface`` -> ``road``; ``other_flat`` -> ``other ground``; ``manmade``
  -> ``building`` (its dominant part); ``barrier`` -> ``fence`` (SemanticKITTI's separation
  structures, incl. crash barriers); ``traffic_cone`` -> none (SemanticKITTI labels cones
  ``other-object``, outside the 19). Cityscapes ``traffic light`` -> ``traffic sign`` (no
  traffic-light class; the closest pole-mounted signalling object); ``wall`` -> ``building``
  (mostly building walls in street scenes; this also keeps ScanNet's ``wall`` consistent).
* No counterpart (0): ``sky``; towards nuScenes and SemanticKITTI every ScanNet class but the
  facade parts; towards ScanNet every outdoor class but ``wall``. nuScenes classes no
  Cityscapes prompt reaches: barrier, construction vehicle, traffic_cone, trailer, other_flat;
  none SemanticKITTI reaches: barrier, construction vehicle, traffic_cone, trailer.
"""

from __future__ import annotations

from collections.abc import Mapping

from clip2scene.errors import ConfigError

# nuScenes-lidarseg 16 evaluation classes, in label order 1..16 (0 = ignore).
NUSCENES_CLASSES: tuple[str, ...] = (
    "barrier", "bicycle", "bus", "car", "construction vehicle", "motorcycle", "pedestrian",
    "traffic_cone", "trailer", "truck", "driveable surface", "other_flat", "sidewalk", "terrain",
    "manmade", "vegetation",
)

# Fine category name -> evaluation class name (nuScenes-lidarseg challenge); absent = ignore (0).
FINE_TO_COARSE: dict[str, str] = {
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "movable_object.barrier": "barrier",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction vehicle",
    "vehicle.motorcycle": "motorcycle",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
    "flat.driveable_surface": "driveable surface",
    "flat.other": "other_flat",
    "flat.sidewalk": "sidewalk",
    "flat.terrain": "terrain",
    "static.manmade": "manmade",
    "static.vegetation": "vegetation",
}

# (name, description) of the 32 nuScenes-lidarseg classes, in official `index` order 0..31.
NUSCENES_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("noise", "Any lidar return that does not correspond to a physical object, such as dust, vapor, noise, fog, raindrops, smoke and reflections."),
    ("animal", "All animals, e.g. cats, rats, dogs, deer, birds."),
    ("human.pedestrian.adult", "Adult subcategory."),
    ("human.pedestrian.child", "Child subcategory."),
    ("human.pedestrian.construction_worker", "Construction worker"),
    ("human.pedestrian.personal_mobility", "A small electric or self-propelled vehicle, e.g. skateboard, segway, or scooters, on which the person typically travels in a upright position."),
    ("human.pedestrian.police_officer", "Police officer."),
    ("human.pedestrian.stroller", "Strollers."),
    ("human.pedestrian.wheelchair", "Wheelchairs."),
    ("movable_object.barrier", "Temporary road barrier placed in the scene in order to redirect traffic."),
    ("movable_object.debris", "Movable object that is left on the driveable surface that is too large to be driven over safely."),
    ("movable_object.pushable_pullable", "Objects that a pedestrian may push or pull."),
    ("movable_object.trafficcone", "All types of traffic cone."),
    ("static_object.bicycle_rack", "Area or device intended to park or secure the bicycles in a row."),
    ("vehicle.bicycle", "Human or electric powered 2-wheeled vehicle designed to travel at lower speeds."),
    ("vehicle.bus.bendy", "Bendy bus subcategory. Annotate each section of the bendy bus individually."),
    ("vehicle.bus.rigid", "Rigid bus subcategory."),
    ("vehicle.car", "Vehicle designed primarily for personal use, e.g. sedans, hatch-backs, wagons, vans, mini-vans, SUVs and jeeps."),
    ("vehicle.construction", "Vehicles primarily designed for construction."),
    ("vehicle.emergency.ambulance", "All types of ambulances."),
    ("vehicle.emergency.police", "All types of police vehicles including police bicycles and motorcycles."),
    ("vehicle.motorcycle", "Gasoline or electric powered 2-wheeled vehicle designed to move rapidly."),
    ("vehicle.trailer", "Any vehicle trailer, both for trucks, cars and bikes."),
    ("vehicle.truck", "Vehicles primarily designed to haul cargo including pick-ups, lorrys, trucks and semi-tractors."),
    ("flat.driveable_surface", "All paved or unpaved surfaces that a car can drive on with no concern of traffic rules."),
    ("flat.other", "All other forms of horizontal ground-level structures that do not belong to any of driveable_surface, curb, sidewalk and terrain."),
    ("flat.sidewalk", "Sidewalk, pedestrian walkways, bike paths, etc."),
    ("flat.terrain", "Natural horizontal surfaces such as ground level horizontal vegetation (< 20 cm tall), grass, rolling hills, soil, sand and gravel."),
    ("static.manmade", "Includes man-made structures but not limited to: buildings, walls, guard rails, fences, poles, drainages, hydrants, flags, banners, street signs, electric circuit boxes, traffic lights, parking meters and stairs with more than 3 steps."),
    ("static.other", "Points in the background that are not distinguishable, or objects that do not match any of the above labels."),
    ("static.vegetation", "Any vegetation in the frame that is higher than the ground, including bushes, plants, potted plants, trees, etc."),
    ("vehicle.ego", "The vehicle on which the cameras, radar and lidar are mounted, that is sometimes visible at the bottom of the image."),
)
NUSCENES_CATEGORY_INDEX: dict[str, int] = {name: i for i, (name, _) in enumerate(NUSCENES_CATEGORIES)}

# Fine category index -> RGB used to render (the nuScenes devkit's lidarseg colour map).
NUSCENES_CATEGORY_COLOURS: dict[int, tuple[int, int, int]] = dict(enumerate([
    (0, 0, 0), (70, 130, 180), (0, 0, 230), (135, 206, 235), (100, 149, 237), (219, 112, 147),
    (0, 0, 128), (240, 128, 128), (138, 43, 226), (112, 128, 144), (210, 105, 30), (105, 105, 105),
    (47, 79, 79), (188, 143, 143), (220, 20, 60), (255, 127, 80), (255, 69, 0), (255, 158, 0),
    (233, 150, 70), (255, 83, 0), (255, 215, 0), (255, 61, 99), (255, 140, 0), (255, 99, 71),
    (0, 207, 191), (175, 0, 75), (75, 0, 75), (112, 180, 60), (222, 184, 135), (255, 228, 196),
    (0, 175, 0), (255, 240, 245),
]))

# SemanticKITTI 19 classes, in learning-map label order 1..19 (prompt spelling).
SEMANTICKITTI_CLASSES: tuple[str, ...] = (
    "car", "bicycle", "motorcycle", "truck", "other vehicle", "person", "bicyclist",
    "motorcyclist", "road", "parking", "sidewalk", "other ground", "building", "fence",
    "vegetation", "trunk", "terrain", "pole", "traffic sign",
)

# Cityscapes 19 standard evaluation classes (train ids 0..18 order); a prompt set only.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# ScanNet 20 classes, in label order 1..20 (NYU40 ids 1-12, 14, 16, 24, 28, 33, 34, 36, 39).
SCANNET_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
    "bathtub", "other furniture",
)


def _ordered_union(*sets: tuple[str, ...]) -> tuple[str, ...]:
    """Names of all sets in order, each once (first occurrence wins)."""
    return tuple(dict.fromkeys(name for s in sets for name in s))


# 52 names: 16 nuScenes + 12 new from SemanticKITTI + 5 from Cityscapes + 19 from ScanNet.
ALL_CLASSES: tuple[str, ...] = _ordered_union(NUSCENES_CLASSES, SEMANTICKITTI_CLASSES, CITYSCAPES_CLASSES,
                                              SCANNET_CLASSES)

CLASS_SETS: dict[str, tuple[str, ...]] = {
    "nuscenes": NUSCENES_CLASSES,
    "semantickitti": SEMANTICKITTI_CLASSES,
    "cityscapes": CITYSCAPES_CLASSES,
    "scannet": SCANNET_CLASSES,
    "all": ALL_CLASSES,
}

# Evaluation label spaces: label of EVAL_CLASSES[name][i] is i + 1; 0 = ignore.
EVAL_CLASSES: dict[str, tuple[str, ...]] = {
    "nuscenes": NUSCENES_CLASSES,
    "semantickitti": SEMANTICKITTI_CLASSES,
    "scannet": SCANNET_CLASSES,
}

_INDOOR_NONE = ("floor", "cabinet", "bed", "chair", "sofa", "table", "bookshelf", "picture", "counter",
                "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub",
                "other furniture")

# ---------------------------------------------------------------------------------------------
# Mapping tables: prompt class name -> evaluation class name (None = counts as no class).
# Each table lists every name of its prompt set (see the module docstring for the reasons).
# ---------------------------------------------------------------------------------------------

TO_NUSCENES: dict[str, dict[str, str | None]] = {
    "semantickitti": {
        "car": "car",
        "bicycle": "bicycle",
        "motorcycle": "motorcycle",
        "truck": "truck",
        "other vehicle": "bus",              # SemanticKITTI other-vehicle = bus + on-rails + other
        "person": "pedestrian",
        "bicyclist": "bicycle",              # nuScenes: rider included in the bicycle
        "motorcyclist": "motorcycle",        # nuScenes: rider included in the motorcycle
        "road": "driveable surface",
        "parking": "driveable surface",      # drivable regardless of traffic rules
        "sidewalk": "sidewalk",
        "other ground": "other_flat",        # traffic islands, delimiters
        "building": "manmade",
        "fence": "manmade",
        "vegetation": "vegetation",
        "trunk": "vegetation",
        "terrain": "terrain",
        "pole": "manmade",
        "traffic sign": "manmade",
    },
    "cityscapes": {
        "road": "driveable surface",
        "sidewalk": "sidewalk",
        "building": "manmade",
        "wall": "manmade",
        "fence": "manmade",
        "pole": "manmade",
        "traffic light": "manmade",
        "traffic sign": "manmade",
        "vegetation": "vegetation",
        "terrain": "terrain",
        "sky": None,
        "person": "pedestrian",
        "rider": "bicycle",                  # nuScenes: riders belong to their two-wheeler
        "car": "car",
        "truck": "truck",
        "bus": "bus",
        "train": "bus",                      # no rail class in nuScenes
        "motorcycle": "motorcycle",
        "bicycle": "bicycle",
    },
    "scannet": {
        "wall": "manmade",
        "door": "manmade",
        "window": "manmade",
        **{name: None for name in _INDOOR_NONE},
    },
}

TO_SEMANTICKITTI: dict[str, dict[str, str | None]] = {
    "nuscenes": {
        "barrier": "fence",
        "bicycle": "bicycle",
        "bus": "other vehicle",
        "car": "car",
        "construction vehicle": "other vehicle",
        "motorcycle": "motorcycle",
        "pedestrian": "person",
        "traffic_cone": None,                # SemanticKITTI other-object, outside the 19
        "trailer": "other vehicle",
        "truck": "truck",
        "driveable surface": "road",
        "other_flat": "other ground",
        "sidewalk": "sidewalk",
        "terrain": "terrain",
        "manmade": "building",
        "vegetation": "vegetation",
    },
    "cityscapes": {
        "road": "road",
        "sidewalk": "sidewalk",
        "building": "building",
        "wall": "building",
        "fence": "fence",
        "pole": "pole",
        "traffic light": "traffic sign",
        "traffic sign": "traffic sign",
        "vegetation": "vegetation",
        "terrain": "terrain",
        "sky": None,
        "person": "person",
        "rider": "bicyclist",
        "car": "car",
        "truck": "truck",
        "bus": "other vehicle",
        "train": "other vehicle",            # learning map: on-rails -> other-vehicle
        "motorcycle": "motorcycle",
        "bicycle": "bicycle",
    },
    "scannet": {
        "wall": "building",
        "door": "building",
        "window": "building",
        **{name: None for name in _INDOOR_NONE},
    },
}

TO_SCANNET: dict[str, dict[str, str | None]] = {
    "nuscenes": {name: None for name in NUSCENES_CLASSES},
    "semantickitti": {name: None for name in SEMANTICKITTI_CLASSES},
    "cityscapes": {**{name: None for name in CITYSCAPES_CLASSES}, "wall": "wall"},
}

MAPPING_TABLES: dict[str, dict[str, dict[str, str | None]]] = {
    "nuscenes": TO_NUSCENES,
    "semantickitti": TO_SEMANTICKITTI,
    "scannet": TO_SCANNET,
}


def _name_map(eval_set: str, tables: Mapping[str, Mapping[str, str | None]]) -> dict[str, str | None]:
    """One name -> evaluation name map per evaluation set: identity on its own classes, then the
    tables; raises ValueError when two tables (or a table and the identity) disagree on a name."""
    eval_names = EVAL_CLASSES[eval_set]
    merged: dict[str, str | None] = {name: name for name in eval_names}
    for prompt_set, table in tables.items():
        if set(table) != set(CLASS_SETS[prompt_set]):
            raise ValueError(f"mapping {prompt_set}->{eval_set} does not list exactly the {prompt_set} names")
        for name, target in table.items():
            if target is not None and target not in eval_names:
                raise ValueError(f"mapping {prompt_set}->{eval_set}: {target!r} is not a {eval_set} class")
            if name in merged and merged[name] != target:
                raise ValueError(f"mapping {prompt_set}->{eval_set}: {name!r} -> {target!r} disagrees with "
                                 f"{merged[name]!r} from another table")
            merged[name] = target
    missing = set(ALL_CLASSES) - set(merged)
    if missing:
        raise ValueError(f"no mapping to {eval_set} for {sorted(missing)}")
    return merged


_NAME_MAPS: dict[str, dict[str, str | None]] = {e: _name_map(e, MAPPING_TABLES[e]) for e in EVAL_CLASSES}


def get_class_set(name: str) -> tuple[str, ...]:
    """Return the prompt class names of a named class set; ConfigError names the bad value."""
    try:
        return CLASS_SETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown class set {name!r}; known: {', '.join(sorted(CLASS_SETS))}"
        ) from None


def get_eval_classes(name: str) -> tuple[str, ...]:
    """Return the evaluation class names (label i + 1 for index i) of a named label space."""
    try:
        return EVAL_CLASSES[name]
    except KeyError:
        raise ConfigError(
            f"unknown evaluation label space {name!r}; known: {', '.join(sorted(EVAL_CLASSES))}"
        ) from None


def prompt_to_eval(prompt_set: str, eval_set: str) -> tuple[int, ...]:
    """Evaluation label of every prompt class: ``out[i]`` for ``get_class_set(prompt_set)[i]``.

    Args:
        prompt_set: a `CLASS_SETS` name (``nuscenes``, ``semantickitti``, ``cityscapes``,
            ``scannet``, ``all``).
        eval_set: an `EVAL_CLASSES` name (``nuscenes``, ``semantickitti``, ``scannet``).

    Returns:
        Tuple of len(prompt classes) ints in 0..K (K = len(EVAL_CLASSES[eval_set])): the 1-based
        evaluation label the prompt class counts as, 0 when it counts as none (e.g. ``sky``).
        The identity 1..K when ``prompt_set == eval_set``. Use as a lookup table on predicted
        prompt indices: ``label = table[argmax]``.

    Raises:
        ConfigError: unknown prompt set or evaluation label space.
    """
    names = get_class_set(prompt_set)
    eval_names = get_eval_classes(eval_set)
    label = {name: i + 1 for i, name in enumerate(eval_names)}
    mapping = _NAME_MAPS[eval_set]
    return tuple(0 if mapping[n] is None else label[mapping[n]] for n in names)
