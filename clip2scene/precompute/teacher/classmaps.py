"""Per-pixel class maps written by `make-sample` beside the official dataset layout.

The synthetic samples know, for every camera pixel, which surface it shows. `make-sample` stores
that ground truth next to each image, under one extra top-level folder of the dataroot,
`clip2scene-classmaps/`, mirroring the image's relative path, so the official folders
(nuScenes `samples/`, `sweeps/`, tables ...) stay exactly as the real datasets have them:

    <root>/samples/CAM_FRONT/<name>.jpg                                  (the image)
    <root>/clip2scene-classmaps/samples/CAM_FRONT/<name>.label.png       uint8, evaluation label
    <root>/clip2scene-classmaps/samples/CAM_FRONT/<name>.depth.png       uint16, centimetres
    <root>/clip2scene-classmaps/samples/CAM_FRONT/<name>.instance.png    uint16, object id + 1

- label: the dataset's evaluation label (nuScenes-lidarseg 1..16 in `clip2scene.classes`
  order); 0 = nothing to evaluate (sky, ignored classes).
- depth: ray length in centimetres, 0 = no surface (sky); clipped at 65535 (655 m).
- instance: the world object's id + 1; 0 = ground or sky (stuff).

PNG (not npz) because the sample must be byte-identical for a given seed. Only the simulated
teacher (`clip2scene.precompute.teacher.simulated`) reads these maps; real datasets have none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clip2scene.errors import DataError

CLASSMAP_DIR = "clip2scene-classmaps"
_SUFFIXES = ("label", "depth", "instance")


@dataclass(frozen=True)
class ClassMap:
    """One image's ground truth: label (H, W) uint8, depth (H, W) float32 metres (inf = none),
    instance (H, W) int32 (-1 = stuff/sky)."""

    label: np.ndarray
    depth: np.ndarray
    instance: np.ndarray


def _stem_paths(folder: Path, rel: Path) -> dict[str, Path]:
    base = folder / CLASSMAP_DIR / rel
    stem = base.name[: -len(base.suffix)] if base.suffix else base.name
    return {k: base.with_name(f"{stem}.{k}.png") for k in _SUFFIXES}


def write_class_map(root: str | Path, image_relpath: str | Path, label: np.ndarray, depth: np.ndarray,
                    instance: np.ndarray) -> None:
    """Write the class map of the image at `root/image_relpath` (see the module docstring).

    label (H, W) uint8 evaluation labels of the dataset's own label space; depth (H, W) float
    metres (inf/nan = none); instance (H, W) integer object ids (< 0 = none)."""
    paths = _stem_paths(Path(root), Path(image_relpath))
    paths["label"].parent.mkdir(parents=True, exist_ok=True)
    d = np.where(np.isfinite(depth), np.rint(np.asarray(depth, np.float64) * 100.0), 0.0)
    inst = np.asarray(instance, np.int64) + 1
    Image.fromarray(np.ascontiguousarray(label, np.uint8)).save(paths["label"], format="PNG")
    Image.fromarray(np.clip(d, 0, 65535).astype(np.uint16)).save(paths["depth"], format="PNG")
    Image.fromarray(np.clip(inst, 0, 65535).astype(np.uint16)).save(paths["instance"], format="PNG")


def find_class_map_root(image: str | Path) -> Path | None:
    """The nearest ancestor folder of `image` that holds a `clip2scene-classmaps/` folder, or None."""
    for folder in Path(image).resolve().parents:
        if (folder / CLASSMAP_DIR).is_dir():
            return folder
    return None


def read_class_map(image: str | Path, width: int, height: int) -> ClassMap:
    """The class map of the camera image at path `image`, (height, width) as the image.

    DataError (naming the file) when the dataroot has no class maps (real data: only samples
    written by `clip2scene make-sample` carry them), a map is missing, or its size differs."""
    image = Path(image)
    root = find_class_map_root(image)
    if root is None:
        raise DataError(f"{image}: no per-pixel class maps ({CLASSMAP_DIR}/ beside the dataset): the simulated "
                        "teacher only runs on samples written by `clip2scene make-sample`")
    paths = _stem_paths(root, image.resolve().relative_to(root))
    arrays = {}
    for key, path in paths.items():
        try:
            with Image.open(path) as im:
                arrays[key] = np.asarray(im)
        except FileNotFoundError:
            raise DataError(f"class map not found: {path} (for {image})") from None
        except OSError as e:
            raise DataError(f"{path}: cannot decode class map ({e})") from None
        if arrays[key].shape != (height, width):
            raise DataError(f"{path}: class map is {arrays[key].shape[1]}x{arrays[key].shape[0]}, "
                            f"the image is {width}x{height}")
    depth = arrays["depth"].astype(np.float32) / 100.0
    depth[arrays["depth"] == 0] = np.inf
    return ClassMap(label=arrays["label"].astype(np.uint8), depth=depth,
                    instance=arrays["instance"].astype(np.int32) - 1)
