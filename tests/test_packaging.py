"""The wheel alone runs: build it, install it without dependencies into an empty folder put first on the path,
and run `ldmkit demo --quick` from an empty working directory, so that only what the wheel ships is found
(the configs are package data; nothing is read from the repository)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_from_anywhere(tmp_path):
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)]
    r = subprocess.run(build, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("ldmkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ldmkit/configs/demo/mnist_dit.yaml" in names
    assert "ldmkit/configs/imagenet256/dit_xl2.yaml" in names
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    r = subprocess.run(install, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    probe = [sys.executable, "-c", "import ldmkit, sys; print(ldmkit.__file__)"]
    where = subprocess.run(probe, cwd=empty, env=env, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(site)), where  # the wheel's copy, not the repository's
    demo = [sys.executable, "-m", "ldmkit.cli", "demo", "--quick", "--out", "run"]
    r = subprocess.run(demo, cwd=empty, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (empty / "run" / "metrics.json").is_file()
    # a shipped config by its short name, from anywhere
    check = [
        sys.executable,
        "-c",
        "from ldmkit.config import load_config; print(load_config('imagenet256/dit_xl2').name)",
    ]
    r = subprocess.run(check, cwd=empty, env=env, capture_output=True, text=True)
    assert r.stdout.strip() == "imagenet256-dit-xl2", r.stderr[-2000:]
