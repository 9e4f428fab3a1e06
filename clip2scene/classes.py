"""Class sets shared by both stages: prompt class names and evaluation class names.

Pure Python (no torch), so `storage/`, `precompute/` and `train/` can all import it.
Prompt names are verbatim from the CLIP2Scene release (method.md section 2); evaluation
label ids are 1..C with 0 = ignore.
"""

from __future__ import annotations

from clip2scene.errors import ConfigError

# nuScenes-lidarseg 16 evaluation classes, in label order 1..16 (0 = ignore).
NUSCENES_CLASSES: tuple[str, ...] = (
    "barrier", "bicycle", "bus", "car", "construction vehicle", "motorcycle", "pedestrian",
    "traffic_cone", "trailer", "truck", "driveable surface", "other_flat", "sidewalk", "terrain",
    "manmade", "vegetation",
)

CLASS_SETS: dict[str, tuple[str, ...]] = {
    "nuscenes": NUSCENES_CLASSES,
}


def get_class_set(name: str) -> tuple[str, ...]:
    """Return the prompt class names of a named class set; ConfigError names the bad value."""
    try:
        return CLASS_SETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown class set {name!r}; known: {', '.join(sorted(CLASS_SETS))}"
        ) from None
