"""`ldmkit export` writes a complete diffusers pipeline folder: it loads with DiffusionPipeline.from_pretrained, its
denoiser computes what ldmkit's does, its scheduler walks ldmkit's chain, and its card says what the run is.
(The PixArt, mmDiT and UNet exports are tested beside their backbones.)"""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, randomised, save_tiny_vae

from ldmkit.checkpoint import atomic_save
from ldmkit.cli import main
from ldmkit.config import load_config, to_dict
from ldmkit.models.registry import BACKBONES, build_model

diffusers = pytest.importorskip("diffusers")


def tiny_run(root: Path, overrides: list[str], metrics: dict | None = None):
    """A run folder holding one checkpoint of a randomised tiny model (and metrics.json when given)."""
    cfg = load_config(overrides=TINY + overrides)
    model = randomised(build_model(cfg.model)).eval()
    (root / "checkpoints").mkdir(parents=True)
    state = {"model": model.state_dict(), "ema": model.state_dict(), "config": to_dict(cfg), "images_seen": 128}
    atomic_save({**state, "step": 8}, root / "checkpoints" / "ckpt-0000000128.pt")
    if metrics:
        (root / "metrics.json").write_text(json.dumps(metrics))
    return cfg, model


def latent_dit(vae: Path, *extra: str) -> list[str]:
    return [
        "model.in_channels=4",
        "model.input_size=8",
        "data.channels=3",
        "data.resolution=16",
        "autoencoder.name=kl",
        f"autoencoder.path={vae}",
        *extra,
    ]


def test_dit_export_is_a_diffusers_pipeline_that_samples_as_ldmkit_does(tmp_path):
    import ldmkit
    from ldmkit.diffusion.objectives import build_objective
    from ldmkit.diffusion.samplers import sample_ddpm

    vae = save_tiny_vae(tmp_path / "vae")
    overrides = latent_dit(
        vae, "model.timestep_freq_shift=1", "sample.sampler=ddim", "sample.respacing=leading", "sample.steps=4"
    )
    cfg, model = tiny_run(tmp_path / "run", overrides, {"class_agreement": 0.5, "fd_effnetlite0": 12.5})
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    index = json.loads((tmp_path / "hf" / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["scheduler"][1] == "DDIMScheduler"
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "hf")
    assert type(pipe).__name__ == "DiTPipeline"
    ours, theirs = BACKBONES["dit"].diffusers_probe(model, pipe.transformer)
    assert (ours - theirs).abs().max() <= 1e-5

    # The whole pipeline against ldmkit's DDIM chain and decoder, from the same noise.
    with torch.no_grad():
        images = pipe(
            class_labels=[3],
            num_inference_steps=4,
            guidance_scale=1,
            generator=torch.Generator().manual_seed(7),
            output_type="pt",
        ).images
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
        labels = torch.tensor([3])
        from ldmkit.conditioning.cond import Cond

        latents = sample_ddpm(
            lambda x, t: model(x, t, Cond(class_labels=labels)), build_objective(cfg), x, [None], 4, "leading", "ddim"
        )
        expected = ((ldmkit.load(tmp_path / "hf", device="cpu").autoencoder.decode(latents) + 1) / 2).clamp(0, 1)
    assert images.shape == expected.shape == (1, 3, 16, 16) and expected.std() > 1e-3
    assert (torch.as_tensor(images) - expected).abs().max() <= 1e-4

    record = json.loads((tmp_path / "hf" / "ldmkit.json").read_text())
    assert record["diffusers_output_gap"] <= 1e-5 and record["sampler_gap"]["default"] <= 1e-5
    assert record["images_seen"] == 128 and record["metrics"]["class_agreement"] == 0.5
    card = (tmp_path / "hf" / "README.md").read_text()
    for expected_text in ("library_name: diffusers", "| images seen | 128 |", "- fd_effnetlite0: 12.5", "DiTPipeline"):
        assert expected_text in card
    assert "guidance_scale=1" in card  # 10 classes: DiTPipeline's null class 1000 does not exist
    # ldmkit loads the folder back with the pipeline's own VAE, wherever the folder moves.
    (tmp_path / "hf").rename(tmp_path / "moved")
    (tmp_path / "vae").rename(tmp_path / "gone")
    back = ldmkit.load(tmp_path / "moved", device="cpu")
    assert all(torch.equal(back.model.state_dict()[k], v) for k, v in model.state_dict().items())
    assert back.autoencoder.scaling_factor == pytest.approx(0.18215)


def test_export_schedulers_follow_the_objective_and_sampler(tmp_path, capsys):
    """DDPM sampling with learned variance, a flow run, official DiT timesteps and a pixel-space run: each export
    names its scheduler, and what diffusers cannot reproduce is measured and written down."""
    vae = save_tiny_vae(tmp_path / "vae")
    _, model = tiny_run(tmp_path / "ddpm", latent_dit(vae))  # DiT's defaults: DDPM sampler, freq shift 0
    assert main(["export", str(tmp_path / "ddpm"), "--out", str(tmp_path / "hf-ddpm")]) == 0
    assert "differ from ldmkit's by up to" in capsys.readouterr().err
    record = json.loads((tmp_path / "hf-ddpm" / "ldmkit.json").read_text())
    assert record["scheduler"] == "DDPMScheduler" and record["sampler_gap"]["default"] is None
    assert record["diffusers_output_gap"] > 1e-3
    assert any("freq shift 1" in note for note in record["notes"])
    assert any("fixed_small" in note for note in record["notes"])
    scheduler = json.loads((tmp_path / "hf-ddpm" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["variance_type"] == "fixed_small" and scheduler["timestep_spacing"] == "linspace"

    flow = ["diffusion.objective=flow", "model.learn_sigma=false", "sample.sampler=euler", "diffusion.time_shift=3"]
    tiny_run(tmp_path / "flow", flow)
    assert main(["export", str(tmp_path / "flow"), "--out", str(tmp_path / "hf-flow")]) == 0
    record = json.loads((tmp_path / "hf-flow" / "ldmkit.json").read_text())
    assert record["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    # diffusers' default flow grid is not ldmkit's; the sigmas the card gives make it so
    assert record["sampler_gap"]["default"] > 1e-3 and record["sampler_gap"]["sigmas"] <= 1e-5
    assert json.loads((tmp_path / "hf-flow" / "model_index.json").read_text())["vae"] == [None, None]
    assert any("scale_model_input" in note for note in record["notes"])
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "hf-flow", vae=None)
    assert pipe.scheduler.config.shift == 3

    mdt = ["model.name=mdt", "model.preset=mDT-v2-tiny/4"]
    tiny_run(tmp_path / "mdt", mdt)
    assert main(["export", str(tmp_path / "mdt"), "--out", str(tmp_path / "hf-mdt")]) == 2
    assert "diffusers has no MDT model" in capsys.readouterr().err
    assert not (tmp_path / "hf-mdt").exists()


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_a_dpm_solver_run_exports_diffusers_dpm_solver(objective):
    """DPM-Solver++ runs get DPMSolverMultistepScheduler, whose chain is ldmkit's."""
    from conftest import tiny_config

    from ldmkit.transfer.pipeline import diffusers_scheduler, sampler_gap

    extra = ["sample.sampler=dpmpp", "sample.solver_order=3", "sample.steps=12", "sample.respacing=linspace"]
    if objective == "flow":
        extra += ["diffusion.objective=flow", "model.learn_sigma=false", "diffusion.time_shift=3"]
    cfg = tiny_config(*extra)
    scheduler, notes = diffusers_scheduler(cfg, passes_variance=False)
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler" and scheduler.config.solver_order == 3
    gap = sampler_gap(cfg, scheduler, passes_variance=False)
    if objective == "ddpm":
        assert gap <= 1e-5 and not notes
    else:  # the same noise levels, but diffusers hands the model whole timesteps (int(1000 sigma)): a small gap
        assert scheduler.config.flow_shift == 3 and 0 < gap < 1e-2 and "whole timesteps" in notes[0]
