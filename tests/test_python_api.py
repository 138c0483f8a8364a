"""The Python API: docs/python.md's example runs as written, and the pipeline's arguments are checked."""

import os
import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"


@pytest.mark.slow
def test_the_documented_example_runs(tmp_path, monkeypatch):
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # the example's own asserts must hold
    assert (tmp_path / "runs" / "api-example" / "three.png").is_file()
    assert (tmp_path / "runs" / "api-example" / "hf" / "ldmkit_config.yaml").is_file()
    assert 0 <= namespace["metrics"]["class_agreement"] <= 1


@pytest.mark.slow
def test_pipeline_calls(tmp_path, monkeypatch):
    from conftest import tiny_config

    import ldmkit
    import ldmkit.api

    run = ldmkit.train(tiny_config("train.total_images=16", "train.global_batch=16"), out=tmp_path / "run")
    pipe = ldmkit.load(run, device="cpu")
    a = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=3, output_type="pt")
    b = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=3, output_type="pt")
    assert torch.equal(a, b)  # seeded per image
    seen = {}
    real = ldmkit.api.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ldmkit.api, "generate", spy)
    away = pipe(class_labels=[1, 2], negative_class_labels=[5], num_inference_steps=2, guidance_scale=3)
    assert len(away) == 2
    assert away[0].size == (32, 32)  # PIL images
    assert seen["negative_labels"].tolist() == [5, 5]  # one negative class for every image
    with pytest.raises(ValueError, match="class-conditional: give class_labels"):
        pipe(prompt="a digit")
    with pytest.raises(ValueError, match="negative_class_labels: 1 or 2 ids"):
        pipe(class_labels=[1, 2], negative_class_labels=[5, 6, 7])
    pipe(class_labels=[1], num_inference_steps=2, guidance_schedule="linear", guidance_interval=[0.1, 0.9])
    assert seen["negative_labels"] is None
    with pytest.raises(ValueError, match="unknown config key 'sample.guidance_shedule'"):
        pipe(class_labels=[1], guidance_shedule="linear")
    with pytest.raises(ValueError, match="sample.guidance_interval"):
        pipe(class_labels=[1], guidance_interval=[0.9, 0.1])
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], output_type="np")
    assert pipe.to("cpu") is pipe
    assert os.path.basename(str(pipe.source)) == "run"


def test_load_falls_back_to_foreign_weights(tmp_path):
    """ldmkit.load on an official DiT .pt (no ldmkit config inside): the backbone and architecture are read from the
    weights and the DiT recipe is used, here with a pixel-space autoencoder so that it runs offline."""
    import ldmkit
    from ldmkit.models.dit import DiT

    official = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    torch.save(official.state_dict(), tmp_path / "DiT-test.pt")
    offline = ["autoencoder.name=identity", "autoencoder.layout=null", "data.channels=1"]
    pipe = ldmkit.load(tmp_path / "DiT-test.pt", device="cpu", overrides=offline)
    assert pipe.cfg.model.hidden_size == 64
    assert pipe.cfg.model.timestep_freq_shift == 0.0  # the official convention
    assert all(torch.equal(v, official.state_dict()[k]) for k, v in pipe.model.state_dict().items())
    assert pipe(class_labels=[1], num_inference_steps=2, output_type="pt").shape == (1, 4, 8, 8)
