"""glibc malloc tuning (clip2scene.runtime): applied once per process, opt-out by environment."""

import os
import platform
import subprocess
import sys

import pytest

CODE = "from clip2scene.runtime import tune_malloc; print(tune_malloc(), tune_malloc())"


def _run(env_extra: dict) -> str:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_malloc_applies_on_glibc_and_is_idempotent():
    assert _run({"CLIP2SCENE_MALLOC": ""}) == "True True"


def test_tune_malloc_opt_out():
    assert _run({"CLIP2SCENE_MALLOC": "default"}) == "False False"

