"""`ldmkit demo --quick`: the demo's whole path in seconds; outputs exist and are well-formed."""

import json

import pytest
import yaml
from PIL import Image

from ldmkit.cli import main


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    for name in (
        "samples.png",
        "loss.png",
        "config.yaml",
        "report.md",
        "metrics.json",
        "digit_classifier.pt",
        "log.jsonl",
    ):
        assert (out / name).is_file(), name
    grid = Image.open(out / "samples.png")
    assert grid.size == (2 * 33 + 1, 10 * 33 + 1)  # one row per class, 2 per row in quick mode
    assert Image.open(out / "loss.png").size[0] > 300
    assert list((out / "checkpoints").glob("ckpt-*.pt"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["class_agreement"] <= 1
    assert metrics["fd_effnetlite0"] > 0
    assert metrics["num_images"] == 40
    report = (out / "report.md").read_text()
    assert "FD-EffNetLite0" in report
    assert "| FID" not in report
    assert "![samples](samples.png)" in report
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["preset"] == "DiT-tiny/4"


@pytest.mark.slow
def test_text_demo_quick_end_to_end_and_prompts(tmp_path):
    """configs/demo/mnist_text_dit.yaml: shards written, captions embedded by MiniLM into the cache,
    a pooled-text DiT trained from the cache, sampled from prompts."""
    out = tmp_path / "run"
    args = [
        "demo",
        "--quick",
        "--config",
        "configs/demo/mnist_text_dit.yaml",
        "--out",
        str(out),
        "--set",
        "data.held_out=500",
        "--set",
        f"data.path={tmp_path}/shards/mnist-{{00000..00008}}.tar",
        "--set",
        f"data.cache={tmp_path}/cache",
        "--set",
        "eval.fd_effnet=false",
    ]
    assert main(args) == 0
    assert len(list((tmp_path / "shards").glob("mnist-*.tar"))) == 9
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["count"] == 4500
    assert manifest["text_encoder"]["kind"] == "minilm"
    assert Image.open(out / "samples.png").size == (2 * 33 + 1, 10 * 33 + 1)
    assert 0 <= json.loads((out / "metrics.json").read_text())["class_agreement"] <= 1
    grid = tmp_path / "prompts.png"
    assert (
        main(
            [
                "sample",
                str(out),
                "--prompt",
                "a handwritten digit three",
                "--prompt",
                "a handwritten digit eight",
                "--per-class",
                "3",
                "--steps",
                "2",
                "--grid",
                str(grid),
            ]
        )
        == 0
    )
    assert Image.open(grid).size == (3 * 33 + 1, 2 * 33 + 1)
