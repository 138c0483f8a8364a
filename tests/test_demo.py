"""`ldmkit demo --quick`: the demo's whole path in seconds; outputs exist and are well-formed."""
import json

import yaml
from PIL import Image

from ldmkit.cli import main


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    for name in ("samples.png", "loss.png", "config.yaml", "report.md", "metrics.json", "digit_classifier.pt", "log.jsonl"):
        assert (out / name).is_file(), name
    grid = Image.open(out / "samples.png")
    assert grid.size == (2 * 33 + 1, 10 * 33 + 1)  # one row per class, 2 per row in quick mode
    assert Image.open(out / "loss.png").size[0] > 300
    assert list((out / "checkpoints").glob("ckpt-*.pt"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["class_agreement"] <= 1 and metrics["fd_effnetlite0"] > 0 and metrics["num_images"] == 40
    report = (out / "report.md").read_text()
    assert "FD-EffNetLite0" in report and "| FID" not in report and "![samples](samples.png)" in report
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["preset"] == "DiT-tiny/4"
