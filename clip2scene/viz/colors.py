"""Class colour maps for the three evaluation label spaces, and palettes for free-text queries.

Every palette is a (K + 1, 3) uint8 RGB array indexed by evaluation label: row 0 is the ignore
label (`IGNORE_COLOUR`, mid grey, visible both on camera images and on a white background),
row k is the colour of class k (``clip2scene.classes.EVAL_CLASSES[name][k - 1]``).

* nuScenes-lidarseg (16 classes): the official devkit colour map is defined on the 32 fine
  classes (``nuscenes.utils.color_map.get_colormap``, reproduced in
  `clip2scene.classes.NUSCENES_CATEGORY_COLOURS`). Each of the 16 challenge classes takes the
  colour of the fine class named in `NUSCENES_FINE_SOURCE` (a fine class that maps to it in
  `clip2scene.classes.FINE_TO_COARSE`; for the merged classes the most common one:
  ``bus`` = ``vehicle.bus.rigid``, ``pedestrian`` = ``human.pedestrian.adult``), so a picture of
  coarse labels looks like the devkit's fine-label renders.
* SemanticKITTI (19 classes): ``color_map`` of the official ``semantic-kitti.yaml`` (stored
  there as BGR, converted to RGB here), taken at the raw id each learning-map class comes from
  (car = 10, bicycle = 11, ..., traffic-sign = 81; see `SEMANTICKITTI_RAW_ID`).
* ScanNet (20 classes): the ScanNet benchmark's NYU40 palette (``create_color_palette`` in
  ``BenchmarkScripts/util.py``) at the 20 benchmark ids 1-12, 14, 16, 24, 28, 33, 34, 36, 39.

Any other list of class names (a test cache, free-text queries) gets `distinct_colours`.

    from clip2scene.viz.colors import palette_for, colour_points
    pal = palette_for(cache.eval_class_names)    # (K + 1, 3) uint8
    rgb = colour_points(labels, pal)             # (n, 3) float in [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clip2scene.classes import (EVAL_CLASSES, FINE_TO_COARSE, NUSCENES_CATEGORY_COLOURS, NUSCENES_CATEGORY_INDEX, NUSCENES_CLASSES,
                                SCANNET_CLASSES, SEMANTICKITTI_CLASSES)

__all__ = [
    "IGNORE_COLOUR",
    "UNSEEN_COLOUR",
    "NUSCENES_FINE_SOURCE",
    "NUSCENES_COLOURS",
    "SEMANTICKITTI_RAW_ID",
    "SEMANTICKITTI_COLOURS",
    "SCANNET_NYU40_ID",
    "SCANNET_COLOURS",
    "PALETTES",
    "palette",
    "palette_for",
    "distinct_colours",
    "colour_points",
]

RGB = tuple[int, int, int]

IGNORE_COLOUR: RGB = (128, 128, 128)  # label 0 (ignore / unlabelled), every label space
UNSEEN_COLOUR: RGB = (215, 215, 215)  # points a colouring does not cover (e.g. no camera sees them)

# Coarse nuScenes-lidarseg class -> the fine devkit class whose colour it takes.
NUSCENES_FINE_SOURCE: dict[str, str] = {
    "barrier": "movable_object.barrier",  # (112, 128, 144) slate grey
    "bicycle": "vehicle.bicycle",  # (220, 20, 60) crimson
    "bus": "vehicle.bus.rigid",  # (255, 69, 0) orange-red (bendy bus is coral)
    "car": "vehicle.car",  # (255, 158, 0) orange
    "construction vehicle": "vehicle.construction",  # (233, 150, 70) dark salmon
    "motorcycle": "vehicle.motorcycle",  # (255, 61, 99) red
    "pedestrian": "human.pedestrian.adult",  # (0, 0, 230) blue
    "traffic_cone": "movable_object.trafficcone",  # (47, 79, 79) dark slate grey
    "trailer": "vehicle.trailer",  # (255, 140, 0) dark orange
    "truck": "vehicle.truck",  # (255, 99, 71) tomato
    "driveable surface": "flat.driveable_surface",  # (0, 207, 191) turquoise
    "other_flat": "flat.other",  # (175, 0, 75)
    "sidewalk": "flat.sidewalk",  # (75, 0, 75)
    "terrain": "flat.terrain",  # (112, 180, 60)
    "manmade": "static.manmade",  # (222, 184, 135) burlywood
    "vegetation": "static.vegetation",  # (0, 175, 0) green
}


def _nuscenes_colours() -> tuple[RGB, ...]:
    out = []
    for name in NUSCENES_CLASSES:
        fine = NUSCENES_FINE_SOURCE[name]
        if FINE_TO_COARSE.get(fine) != name:  # the source must be one of the class's own members
            raise ValueError(f"colour source {fine!r} of {name!r} maps to {FINE_TO_COARSE.get(fine)!r}")
        out.append(tuple(int(v) for v in NUSCENES_CATEGORY_COLOURS[NUSCENES_CATEGORY_INDEX[fine]]))
    return tuple(out)


NUSCENES_COLOURS: tuple[RGB, ...] = _nuscenes_colours()

# SemanticKITTI learning-map class -> (raw semantic id in semantic-kitti.yaml, its color_map BGR).
SEMANTICKITTI_RAW_ID: dict[str, tuple[int, RGB]] = {
    "car": (10, (245, 150, 100)),
    "bicycle": (11, (245, 230, 100)),
    "motorcycle": (15, (150, 60, 30)),
    "truck": (18, (180, 30, 80)),
    "other vehicle": (20, (255, 0, 0)),
    "person": (30, (30, 30, 255)),
    "bicyclist": (31, (200, 40, 255)),
    "motorcyclist": (32, (90, 30, 150)),
    "road": (40, (255, 0, 255)),
    "parking": (44, (255, 150, 255)),
    "sidewalk": (48, (75, 0, 75)),
    "other ground": (49, (75, 0, 175)),
    "building": (50, (0, 200, 255)),
    "fence": (51, (50, 120, 255)),
    "vegetation": (70, (0, 175, 0)),
    "trunk": (71, (0, 60, 135)),
    "terrain": (72, (80, 240, 150)),
    "pole": (80, (150, 240, 255)),
    "traffic sign": (81, (0, 0, 255)),
}
SEMANTICKITTI_COLOURS: tuple[RGB, ...] = tuple(
    (bgr[2], bgr[1], bgr[0]) for _, bgr in (SEMANTICKITTI_RAW_ID[n] for n in SEMANTICKITTI_CLASSES))

# ScanNet benchmark class -> (NYU40 id, RGB of the benchmark palette at that id).
SCANNET_NYU40_ID: dict[str, tuple[int, RGB]] = {
    "wall": (1, (174, 199, 232)),
    "floor": (2, (152, 223, 138)),
    "cabinet": (3, (31, 119, 180)),
    "bed": (4, (255, 187, 120)),
    "chair": (5, (188, 189, 34)),
    "sofa": (6, (140, 86, 75)),
    "table": (7, (255, 152, 150)),
    "door": (8, (214, 39, 40)),
    "window": (9, (197, 176, 213)),
    "bookshelf": (10, (148, 103, 189)),
    "picture": (11, (196, 156, 148)),
    "counter": (12, (23, 190, 207)),
    "desk": (14, (247, 182, 210)),
    "curtain": (16, (219, 219, 141)),
    "refrigerator": (24, (255, 127, 14)),
    "shower curtain": (28, (158, 218, 229)),
    "toilet": (33, (44, 160, 44)),
    "sink": (34, (112, 128, 144)),
    "bathtub": (36, (227, 119, 194)),
    "other furniture": (39, (82, 84, 163)),
}
SCANNET_COLOURS: tuple[RGB, ...] = tuple(SCANNET_NYU40_ID[n][1] for n in SCANNET_CLASSES)

# Evaluation label space name -> class colours in label order 1..K.
PALETTES: dict[str, tuple[RGB, ...]] = {
    "nuscenes": NUSCENES_COLOURS,
    "semantickitti": SEMANTICKITTI_COLOURS,
    "scannet": SCANNET_COLOURS,
}
assert all(len(PALETTES[k]) == len(EVAL_CLASSES[k]) for k in PALETTES)

# Fallback qualitative colours (matplotlib tab10 then the odd entries of tab20, no greys).
_DISTINCT: tuple[RGB, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
    (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229),
)


def distinct_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB, pairwise distinct, deterministic: the first 18 from a fixed qualitative
    list, then evenly spaced hues (golden-ratio steps) for more."""
    out = [_DISTINCT[i] for i in range(min(n, len(_DISTINCT)))]
    import colorsys

    i = 0
    while len(out) < n:
        h = (0.13 + 0.618033988749895 * i) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.9 if i % 2 else 0.7)
        rgb = (int(round(255 * r)), int(round(255 * g)), int(round(255 * b)))
        if rgb not in out and rgb != IGNORE_COLOUR:
            out.append(rgb)
        i += 1
    return np.asarray(out, dtype=np.uint8).reshape(n, 3)


def palette(name: str) -> np.ndarray:
    """(K + 1, 3) uint8 palette of a named evaluation label space (row 0 = ignore)."""
    try:
        colours = PALETTES[name]
    except KeyError:
        raise KeyError(f"no palette for {name!r}; known: {', '.join(sorted(PALETTES))}") from None
    return np.asarray((IGNORE_COLOUR, *colours), dtype=np.uint8)


def palette_for(class_names: Sequence[str]) -> np.ndarray:
    """(K + 1, 3) uint8 palette for evaluation classes 1..K named `class_names`: the official
    palette when the names are exactly a known label space, else `distinct_colours`."""
    names = tuple(class_names)
    for key, eval_names in EVAL_CLASSES.items():
        if names == tuple(eval_names):
            return palette(key)
    return np.concatenate([np.asarray([IGNORE_COLOUR], np.uint8), distinct_colours(len(names))])


def colour_points(labels: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """Colours of labelled points: labels (n,) int in 0..K, pal (K + 1, 3) uint8 -> (n, 3) float64
    RGB in [0, 1]. Labels outside 0..K raise ValueError."""
    labels = np.asarray(labels).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(pal)):
        raise ValueError(f"labels must lie in 0..{len(pal) - 1}")
    return pal[labels].astype(np.float64) / 255.0
