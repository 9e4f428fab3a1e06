"""Caches on an object store: precompute, info, verify, train and evaluate against a real S3 API
(moto's server, started on loopback by the test), addressed as s3:// URLs + --storage-option."""

import json

import pytest
from typer.testing import CliRunner

from clip2scene.cli import app


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    mp = pytest.MonkeyPatch()
    for k, v in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1").items():
        mp.setenv(k, v)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("team")
    yield ["--storage-option", f"client_kwargs.endpoint_url={endpoint}"]
    server.stop()
    mp.undo()


@pytest.mark.slow
def test_precompute_train_evaluate_on_s3(s3, tmp_path):
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    root = make_sample(tmp_path / "root", SampleConfig(scenes=2, keyframes=2, sweeps=1, image_width=160, image_height=90))
    url = "s3://team/caches/sample.zarr"
    run = CliRunner().invoke
    r = run(app, ["precompute", "--dataroot", str(root), "--version", "v1.0-mini", "--out", url, "--sweeps", "2",
                  "--clip-model", "clip2scene-tiny", "--clip-weights", "none", "--image-size", "64x112",
                  "--block-size", "2"] + s3)
    assert r.exit_code == 0, r.output
    r = run(app, ["cache", "info", url, "--json"] + s3)
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout[r.stdout.index("{"):])
    assert info["meta"]["num_scans"] == 4 and info["meta"]["num_blocks"] == 2 and info["stored_bytes"] > 0
    r = run(app, ["cache", "verify", url] + s3)
    assert r.exit_code == 0 and "every file matches" in r.output, r.output
    r = run(app, ["train", "--cache", url, "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2",
                  "--channels", "8,8,16,16,32,32,16,8,8", "--precise-bn-batches", "1"] + s3)
    assert r.exit_code == 0, r.output
    r = run(app, ["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--cache", url] + s3)
    assert r.exit_code == 0 and "mIoU" in r.output, r.output
    # a second precompute of the same cache while it is "being written" is refused on S3 too
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3[1].split("=", 1)[1]})
    fs.pipe("team/caches/sample.zarr/writer.lock", json.dumps(dict(host="elsewhere", pid=1, user="bob",
                                                                    since="now", id="x")).encode())
    r = run(app, ["precompute", "--dataroot", str(root), "--version", "v1.0-mini", "--out", url, "--overwrite",
                  "--clip-model", "clip2scene-tiny", "--clip-weights", "none", "--image-size", "64x112"] + s3)
    assert r.exit_code == 2 and "being written by bob@elsewhere" in r.stderr, r.output
    r = run(app, ["cache", "info", "s3://team/nothing.zarr"] + s3)
    assert r.exit_code == 2 and "cache not found: s3://team/nothing.zarr" in r.stderr
