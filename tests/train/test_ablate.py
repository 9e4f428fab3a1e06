"""The ablation runner: every Table 3 row the cache supports trains, evaluates, and lands in one table."""

import json

import pytest

from clip2scene.train.ablate import ablation_rows, run_ablation
from clip2scene.train.trainer import TrainConfig
from tests.helpers import TINY, write_cache


def test_rows_follow_cached_sweeps():
    names = [r.name for r in ablation_rows(3)]
    assert "1 sweep" in names and "3 sweeps" in names and "5 sweeps" not in names
    assert {"SCR only, 1 sweep", "without SSR", "without S3", "KL instead of SCR"} <= set(names)
    assert names[:2] == ["full: SCR + SSR + S3 (views: border)", "views: mean"]
    assert next(r for r in ablation_rows(1) if r.name == "views: mean").changes == {"views": "mean"}
    assert [r.name for r in ablation_rows(1, views="mean")][:2] == ["full: SCR + SSR + S3 (views: mean)", "views: border"]
    kl = next(r for r in ablation_rows(1) if r.name == "KL instead of SCR")
    assert kl.changes["scr_weight"] == 0 and kl.changes["kl_weight"] == 1


@pytest.mark.slow
def test_run_ablation_writes_one_table(value_cache, tmp_path):
    cache = value_cache
    base = TrainConfig(cache=str(cache), out=str(tmp_path / "base"), epochs=2, batch_size=2, lr=0.05, model=TINY,
                       precise_bn_batches=2)
    results = run_ablation(base, tmp_path / "abl", prompt_caches={"cityscapes": str(cache)}, progress=False)
    rows = [r["row"] for r in results]
    assert rows[:2] == ["full: SCR + SSR + S3 (views: border)", "views: mean"] and "prompts: cityscapes" in rows and "1 sweep" in rows
    assert all(r["miou"] is None or 0.0 <= r["miou"] <= 1.0 for r in results)
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert table.count("\n") == len(results) + 2 and "| KL instead of SCR |" in table
    assert len(json.loads((tmp_path / "abl" / "ablation.json").read_text())) == len(results)
    assert (tmp_path / "abl" / "without_ssr" / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_compare_teachers_writes_one_table(value_cache, tmp_path):
    from clip2scene.errors import CacheError
    from clip2scene.train.ablate import run_teacher_comparison

    a = value_cache
    b = write_cache(tmp_path / "b.zarr", sha="cd" * 32)
    base = TrainConfig(cache=str(a), out=str(tmp_path / "base"), epochs=1, batch_size=2, lr=0.05, model=TINY,
                       precise_bn_batches=0)
    rows = run_teacher_comparison(base, {"maskclip": str(a), "other weights": str(b)}, tmp_path / "cmp", progress=False)
    assert [r["row"] for r in rows] == ["maskclip", "other weights"]
    assert all(0.0 <= r["teacher_miou_visible"] <= 1.0 and (r["miou"] is None or 0.0 <= r["miou"] <= 1.0) for r in rows)
    assert rows[0]["variant"] == "maskclip" and rows[0]["random_weights"] and not rows[1]["random_weights"]
    table = (tmp_path / "cmp" / "teachers.md").read_text()
    assert table.count("\n") == 4 and "| other weights |" in table and "teacher mIoU" in table
    assert (tmp_path / "cmp" / "other_weights" / "checkpoint.pt").is_file()
    fewer = write_cache(tmp_path / "few.zarr", splits=("train", "val"))
    with pytest.raises(CacheError, match="other scans"):
        run_teacher_comparison(base, {"a": str(a), "few": str(fewer)}, tmp_path / "x", progress=False)
