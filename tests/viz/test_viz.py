"""Pictures end to end: a synthetic nuScenes sample, a real precompute with the tiny random
teacher, a one-epoch tiny student (and a fine-tuned one), then every picture of clip2scene.viz.

Each PNG is decoded and checked for its exact pixel size (layout in inches x dpi), for being
far from blank (pixel spread, many distinct colours), and, where it is cheap, for content: the
official nuScenes class colours appear, the same call gives the same bytes.
"""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clip2scene.errors import CacheError, ConfigError, DataError
from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
from clip2scene.classes import NUSCENES_CATEGORY_COLOURS as CLASS_COLOURS, NUSCENES_CATEGORY_INDEX as CATEGORY_INDEX
from clip2scene.samples.nuscenes import SampleConfig, make_sample
from clip2scene.storage import open_cache
from clip2scene.train.evaluate import EvalConfig, evaluate
from clip2scene.train.finetune import FinetuneConfig, finetune
from clip2scene.train.trainer import TrainConfig, train
from clip2scene.viz import colors
from clip2scene.viz.figures import png_size
from clip2scene.viz.plot import PANEL_SIZE, MARGINS, confusion_from_eval, plot_confusion, plot_run
from clip2scene.viz.query import QueryError, heat_figure_size, labels_figure_size, query_scan, read_points_file
from clip2scene.viz.show import bev_figure_size, camera_figure_size, render_scan, scan_index

from tests.train.test_trainer import TINY

TEACHER = TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(64, 112))
IMAGE_W, IMAGE_H = 400, 225  # SampleConfig default camera size


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Sample (2 scenes x 1 keyframe: one train, one val scan), cache, distilled and fine-tuned runs.

    Single-threaded like every test (conftest's autouse fixture is function-scoped and does not
    cover this module fixture): spconv's CPU kernels crawl when their threads compete."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_world(tmp_path_factory.mktemp("viz"))
    finally:
        torch.set_num_threads(threads)


def _build_world(base):
    root = make_sample(base / "root", SampleConfig(scenes=2, keyframes=1, sweeps=1))
    cache = base / "cache.zarr"
    run_precompute(PrecomputeConfig(dataroot=root, out=cache, version="v1.0-mini", sweeps=2, teacher=TEACHER),
                   progress=False)
    run = base / "run"
    train(TrainConfig(cache=str(cache), out=str(run), epochs=1, batch_size=1, lr=0.05, model=TINY,
                      precise_bn_batches=1), progress=False)
    evaluate(EvalConfig(checkpoint=str(run / "checkpoint.pt"), cache=str(cache), split="val"), progress=False)
    ft = base / "ft"
    finetune(FinetuneConfig(cache=str(cache), out=str(ft), checkpoint=str(run / "checkpoint.pt"), epochs=1,
                            batch_size=1, precise_bn_batches=1, eval_split="val"), progress=False)
    return dict(base=base, root=root, cache=cache, run=run, ckpt=run / "checkpoint.pt", ft=ft / "checkpoint.pt",
                ft_run=ft)


def load_png(path, size=None) -> np.ndarray:
    """Decode a PNG (PIL), check its size, and that it is far from blank: (H, W, 3) uint8."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        rgb = np.asarray(im.convert("RGB"))
    if size is not None:
        assert (rgb.shape[1], rgb.shape[0]) == size, (path, rgb.shape)
    assert rgb.std() > 15, f"{path} looks blank (pixel std {rgb.std():.1f})"
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    distinct = len(np.unique(packed))
    assert distinct > 30, f"{path} has only {distinct} colours"
    return rgb


def has_colour(rgb: np.ndarray, colour) -> int:
    """Number of pixels of exactly this RGB colour."""
    return int((rgb == np.asarray(colour, np.uint8)).all(axis=2).sum())


# ------------------------------------------------------------------------------------ colours
def test_colour_maps():
    nus = colors.palette("nuscenes")
    assert nus.shape == (17, 3) and tuple(nus[0]) == colors.IGNORE_COLOUR
    car = colors.NUSCENES_COLOURS[3]
    assert car == CLASS_COLOURS[CATEGORY_INDEX["vehicle.car"]] == (255, 158, 0)
    assert colors.NUSCENES_COLOURS[10] == CLASS_COLOURS[CATEGORY_INDEX["flat.driveable_surface"]]
    kitti = colors.palette("semantickitti")
    assert kitti.shape == (20, 3) and tuple(kitti[1]) == (100, 150, 245) and tuple(kitti[9]) == (255, 0, 255)
    scannet = colors.palette("scannet")
    assert scannet.shape == (21, 3) and tuple(scannet[1]) == (174, 199, 232) and tuple(scannet[20]) == (82, 84, 163)
    for pal in (nus, kitti, scannet):
        assert len({tuple(c) for c in pal[1:]}) == len(pal) - 1  # classes tell apart
    np.testing.assert_array_equal(colors.palette_for(["road", "car", "tree"])[1:], colors.distinct_colours(3))
    many = colors.distinct_colours(40)
    assert len({tuple(c) for c in many}) == 40
    np.testing.assert_allclose(colors.colour_points(np.array([0, 4]), nus), nus[[0, 4]] / 255.0)
    with pytest.raises(ValueError):
        colors.colour_points(np.array([17]), nus)


# ------------------------------------------------------------------------------------ show
def test_render_scan_cameras_and_bev(world, tmp_path):
    paths = render_scan(world["cache"], 1, tmp_path, checkpoint=world["ckpt"])
    names = [p.name for p in paths]
    assert names == [f"scan0001_{c}.png" for c in ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK",
                                                   "CAM_BACK_LEFT", "CAM_FRONT_LEFT")] + ["scan0001_bev.png"]
    cam_size = png_size(*camera_figure_size(3, IMAGE_W, IMAGE_H, 16))
    road = colors.NUSCENES_COLOURS[10]
    road_pixels = 0
    for p in paths[:-1]:
        road_pixels += has_colour(load_png(p, cam_size), road)
    assert road_pixels > 50  # ground-truth driveable surface drawn in its official colour
    bev = load_png(paths[-1], png_size(*bev_figure_size(3)))
    assert has_colour(bev, road) > 50 and has_colour(bev, colors.NUSCENES_COLOURS[14]) > 20  # road, manmade
    assert has_colour(bev, colors.UNSEEN_COLOUR) > 20  # teacher panel: points no camera sees


def test_render_is_deterministic_and_skips_missing_images(world, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="clip2scene.viz.show"):
        a = render_scan(world["cache"], 0, tmp_path / "a", dataroot=tmp_path / "missing")
    assert [p.name for p in a] == ["scan0000_bev.png"]  # (a) skipped, (b) still drawn
    assert "skipping the camera pictures" in caplog.text
    load_png(a[0], png_size(*bev_figure_size(2)))  # teacher + ground truth
    b = render_scan(open_cache(world["cache"]), 0, tmp_path / "b", dataroot=tmp_path / "missing")
    assert a[0].read_bytes() == b[0].read_bytes()


def test_render_fine_tuned_checkpoint_and_token(world, tmp_path):
    cache = open_cache(world["cache"])
    i = scan_index(cache, str(cache.token[1]))
    assert i == 1
    paths = render_scan(cache, i, tmp_path, checkpoint=world["ft"], dataroot=tmp_path / "none")
    load_png(paths[-1], png_size(*bev_figure_size(3)))
    with pytest.raises(ConfigError, match="out of range"):
        render_scan(cache, 5, tmp_path)
    with pytest.raises(ConfigError, match="no scan with token"):
        scan_index(cache, "nope")


def test_render_refuses_a_checkpoint_of_other_classes(world, tmp_path):
    ckpt = torch.load(world["ckpt"], weights_only=False)
    ckpt["class_names"] = list(reversed(ckpt["class_names"]))
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(CacheError, match="class names differ"):
        render_scan(world["cache"], 0, tmp_path, checkpoint=tmp_path / "other.pt")


# ------------------------------------------------------------------------------------ plot
def _plot_size(panels: int):
    w = panels * (MARGINS["left"] + PANEL_SIZE[0] + MARGINS["right"])
    return png_size(w, MARGINS["bottom"] + PANEL_SIZE[1] + MARGINS["top"])


def test_plot_run_and_confusion(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    # a longer history so that smoothing kicks in, plus an eval history
    rng = np.random.default_rng(0)
    with (run / "metrics.jsonl").open("a") as f:
        for step in range(2, 121):
            scr = 3.0 * np.exp(-step / 40) + 0.2 * rng.random()
            f.write(json.dumps(dict(step=step, epoch=1 + step // 30, loss=scr + 0.3, scr=scr, ssr=0.3)) + "\n")
    (run / "eval_history.jsonl").write_text("".join(json.dumps(dict(epoch=e, miou=0.1 * e)) + "\n" for e in (1, 2, 3)))
    png = plot_run(run)
    assert png == run / "training_curves.png"
    load_png(png, _plot_size(2))
    # the fine-tuning run: ce + lovasz terms, no step field, result.json mIoU
    load_png(plot_run(world["ft_run"], tmp_path / "ft.png"), _plot_size(2))
    with pytest.raises(ConfigError, match="no metrics file"):
        plot_run(tmp_path)

    conf = confusion_from_eval(world["run"] / "eval_val.json", tmp_path / "confusion.png")
    load_png(conf)
    m = np.diag(np.arange(1, 4) * 10) + 1
    out = plot_confusion(m, ["road", "car", "tree"], tmp_path / "c3.png")
    big = plot_confusion(np.pad(m, ((1, 0), (1, 0))), ["road", "car", "tree"], tmp_path / "c4.png")
    assert load_png(out).shape == load_png(big).shape  # the ignore row/column is dropped
    with pytest.raises(ConfigError, match="does not fit"):
        plot_confusion(np.eye(5), ["a", "b"], tmp_path / "bad.png")


def test_plot_draws_the_validation_history(tmp_path):
    from clip2scene.viz.plot import _miou_points

    rows = [dict(step=3, epoch=1, metric="miou", split="val", miou=0.25, teacher_miou=0.5),
            dict(step=6, epoch=2, metric="miou", split="val", miou=0.5, teacher_miou=0.75),
            dict(step=9, epoch=3, metric="teacher_miou", split="val", teacher_miou=0.75)]  # a resume on a cache without labels
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _miou_points(tmp_path, None) == [("validation (val, miou)", [1.0, 2.0], [25.0, 50.0]),
                                            ("validation (val, teacher_miou)", [3.0], [75.0])]


# ------------------------------------------------------------------------------------ query
def test_query_on_a_cached_scan(world, tmp_path):
    r = query_scan(world["ckpt"], ["a car", "a tree", "the road"], cache=world["cache"], index=1, labels=True,
                   out_dir=tmp_path, top_k=5)
    saved = json.loads((tmp_path / "query.json").read_text())
    assert saved["texts"] == ["a car", "a tree", "the road"] and r["json"] == str(tmp_path / "query.json")
    scan = open_cache(world["cache"]).read_scan(1)
    assert saved["points_scored"] == len(scan.xyz) and saved["points_shown"] == int((scan.sweep == 0).sum())
    for q in saved["queries"]:
        load_png(q["png"], png_size(*heat_figure_size()))
        scores = [t["score"] for t in q["top_k"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        assert -1.0 <= q["score_min"] <= q["score_mean"] <= q["score_max"] <= 1.0
        assert q["score_max"] == pytest.approx(scores[0])
        top = q["top_k"][0]
        np.testing.assert_allclose(top["xyz"], scan.xyz[top["index"]], rtol=1e-6)
        assert scan.sweep[top["index"]] == 0
    load_png(saved["labels_png"], png_size(*labels_figure_size()))
    assert sum(saved["label_counts"].values()) == saved["points_shown"]


def test_query_on_raw_lidar_files(world, tmp_path):
    pcd = sorted((world["root"] / "samples" / "LIDAR_TOP").glob("*.pcd.bin"))[0]
    a = query_scan(world["ckpt"], ["a car"], points_file=pcd, out_dir=tmp_path / "nus", top_k=3)
    assert a["source"]["format"] == "nuscenes" and a["points_scored"] == pcd.stat().st_size // 20
    load_png(a["queries"][0]["png"], png_size(*heat_figure_size()))
    # the same scan as a KITTI .bin (intensity already in 0..1) scores the same
    pts = np.fromfile(pcd, dtype=np.float32).reshape(-1, 5)
    kitti = tmp_path / "000000.bin"
    np.concatenate([pts[:, :3], pts[:, 3:4] / 255.0], axis=1).astype(np.float32).tofile(kitti)
    b = query_scan(world["ckpt"], ["a car"], points_file=kitti, out_dir=tmp_path / "kitti", top_k=3)
    assert b["source"]["format"] == "kitti"
    assert [t["index"] for t in b["queries"][0]["top_k"]] == [t["index"] for t in a["queries"][0]["top_k"]]
    np.testing.assert_allclose(b["queries"][0]["score_max"], a["queries"][0]["score_max"], atol=1e-5)
    xyz, feat, fmt = read_points_file(pcd)
    assert fmt == "nuscenes" and feat.max() <= 1.0 and xyz.shape == (len(pts), 3)
    (tmp_path / "bad.pcd.bin").write_bytes(b"\0" * 21)
    with pytest.raises(DataError, match="multiple of 20"):
        read_points_file(tmp_path / "bad.pcd.bin")
    with pytest.raises(ConfigError, match="exactly one"):
        query_scan(world["ckpt"], ["a car"], cache=world["cache"], points_file=pcd, out_dir=tmp_path)


def test_query_refuses_another_text_tower(world, tmp_path):
    ckpt = torch.load(world["ckpt"], weights_only=False)
    other = dict(ckpt, teacher=dict(ckpt["teacher"], weights_sha256="ab" * 32))
    torch.save(other, tmp_path / "other_weights.pt")
    with pytest.raises(QueryError, match="sha256"):
        query_scan(tmp_path / "other_weights.pt", ["a car"], cache=world["cache"], out_dir=tmp_path)
    moved = dict(ckpt, text_embeddings=torch.roll(ckpt["text_embeddings"], 1, dims=0))
    torch.save(moved, tmp_path / "moved.pt")
    with pytest.raises(QueryError, match="does not reproduce"):
        query_scan(tmp_path / "moved.pt", ["a car"], cache=world["cache"], out_dir=tmp_path)
    with pytest.raises(ConfigError, match="no text-space features"):
        query_scan(world["ft"], ["a car"], cache=world["cache"], out_dir=tmp_path)


# ------------------------------------------------------------------------------------ commands
def test_commands(world, tmp_path):
    import typer

    from clip2scene.viz import commands

    app = typer.Typer()
    app.command("show")(commands.show)
    app.command("plot")(commands.plot)
    app.command("query")(commands.query)
    runner = CliRunner()
    res = runner.invoke(app, ["show", "--cache", str(world["cache"]), "--token", str(open_cache(world["cache"]).token[0]),
                              "--out", str(tmp_path / "show"), "--dataroot", str(tmp_path / "none")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "show" / "scan0000_bev.png").is_file()
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    res = runner.invoke(app, ["plot", str(run)])
    assert res.exit_code == 0, res.output
    assert (run / "training_curves.png").is_file() and (run / "confusion_val.png").is_file()
    res = runner.invoke(app, ["query", "a car", "--checkpoint", str(world["ckpt"]), "--cache", str(world["cache"]),
                              "--out", str(tmp_path / "q"), "--top-k", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "q" / "query.json").read_text())["texts"] == ["a car"]
    res = runner.invoke(app, ["show", "--cache", str(tmp_path / "missing.zarr")])
    assert res.exit_code == 2 and "cache not found" in res.output
    res = runner.invoke(app, ["plot", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "error: no metrics file" in res.output


def test_cli_evaluate_writes_confusion_png(tmp_path):
    """`clip2scene evaluate` writes confusion_<split>.png beside its JSON."""
    from PIL import Image
    from typer.testing import CliRunner

    from clip2scene.cli import app
    from tests.train.test_trainer import TINY, write_cache
    from clip2scene.train.trainer import TrainConfig, train

    cache = write_cache(tmp_path / "c.zarr")
    train(TrainConfig(cache=str(cache), out=str(tmp_path / "run"), epochs=1, batch_size=2, model=TINY), progress=False)
    r = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--cache", str(cache)])
    assert r.exit_code == 0, r.output
    png = tmp_path / "run" / "confusion_val.png"
    assert png.exists() and "confusion matrix:" in r.output
    with Image.open(png) as im:
        assert im.size[0] > 200 and im.size[1] > 200
