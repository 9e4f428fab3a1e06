"""End to end with teeth, on the simulated teacher: make-sample -> precompute (real projection,
sampling, cache) -> train (real loader, student, losses) -> evaluate. The 3D student must beat
its 2D teacher's own pseudo-label mIoU, and the same run with a deliberately broken
correspondence (every point paired with the NEXT camera at the same pixel) must score clearly
lower: a bug that keeps the numbers random (wrong camera, swapped u/v, a loader pairing the wrong
scan) makes this test fail.

The setting is the demo's (4 scenes x 3 keyframes, 64 rays per ring, narrow SPVCNN, 80 epochs x 3
steps, trained on the 2 train scenes, scored on the 2 val scenes); numbers in docs/simulated-teacher.md.
"""

import numpy as np
import pytest

from clip2scene.precompute import pipeline as pipeline_mod
from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
from clip2scene.precompute.teacher.simulated import SimulatedConfig
from clip2scene.train.evaluate import EvalConfig, evaluate
from clip2scene.train.nets import ModelConfig
from clip2scene.train.trainer import TrainConfig, train

EPOCHS, LR, TAU = 80, 0.1, 0.1  # the demo's schedule and student (clip2scene.cli DEMO_*)
SMALL = ModelConfig(arch="spvcnn", channels=(16, 16, 32, 32, 64, 64, 32, 16, 16), blocks_per_stage=1)
TEACHER = TeacherConfig(teacher="simulated", model="simulated", weights="none", image_size=(224, 416))
SIM = SimulatedConfig()  # the default model of errors
SPLIT = "val"  # scans the student never trained on


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    root = tmp_path_factory.mktemp("simteacher") / "root"
    return make_sample(root, SampleConfig(scenes=4, keyframes=3, sweeps=2, lidar_azimuth_steps=64,
                                          image_width=200, image_height=113))  # the demo's sample


def run_pipeline(root, out):
    cache = out / "cache.zarr"
    run_precompute(PrecomputeConfig(dataroot=root, out=cache, version="v1.0-mini", sweeps=3, teacher=TEACHER,
                                    simulated=SIM), progress=False)
    cfg = TrainConfig(cache=str(cache), out=str(out / "run"), epochs=EPOCHS, batch_size=2, lr=LR, tau=TAU, model=SMALL,
                      precise_bn_batches=4)
    ckpt = train(cfg, progress=False)["checkpoint"]
    return evaluate(EvalConfig(checkpoint=ckpt, cache=str(cache), split=SPLIT), progress=False)


@pytest.fixture(scope="module")
def good(sample, tmp_path_factory):
    return run_pipeline(sample, tmp_path_factory.mktemp("good"))


@pytest.mark.slow
def test_student_beats_its_simulated_teacher(good):
    teacher, student = good["teacher_miou_visible"], good["miou"]
    print(f"simulated teacher {teacher:.3f}, student {student:.3f}")
    assert 0.25 < teacher < 0.45  # the calibrated range of the simulated teacher
    assert student > teacher + 0.02, f"student {student:.3f} does not beat its teacher {teacher:.3f}"


@pytest.mark.slow
def test_a_broken_pairing_scores_clearly_lower(good, sample, tmp_path, monkeypatch):
    pairs = pipeline_mod.project_views  # every (point, view) pair of a scan (cache schema 5)

    def next_camera(xyz, ds, scan):  # the bug: right pixel, wrong camera
        point, cams, uv = pairs(xyz, ds, scan)
        return point, ((cams.astype(np.int64) + 1) % len(ds.views(scan))).astype(np.uint8), uv

    monkeypatch.setattr(pipeline_mod, "project_views", next_camera)
    broken = run_pipeline(sample, tmp_path / "broken")
    print(f"correct pairing: student {good['miou']:.3f}; broken pairing: teacher {broken['teacher_miou_visible']:.3f}, "
          f"student {broken['miou']:.3f}")
    assert broken["miou"] < good["miou"] - 0.08, (broken["miou"], good["miou"])
