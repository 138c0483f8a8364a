"""mmDiT against diffusers' SD3Transformer2DModel with the same weights (fp32, max abs diff <= 1e-5),
weight round trips, class conditioning and guidance dropout."""

import pytest
import torch
from conftest import randomised

from ldmkit.conditioning.cond import Cond
from ldmkit.diffusion.samplers import flow_sigmas, sample_flow
from ldmkit.models.mmdit import MMDiT
from ldmkit.models.mmdit_spec import mmdit_diffusers_config, mmdit_from_diffusers, mmdit_to_diffusers
from ldmkit.models.registry import BACKBONES

diffusers = pytest.importorskip("diffusers")


def tiny(**kw):
    args = dict(
        input_size=16, patch_size=2, in_channels=4, hidden_size=48, depth=3, num_heads=3, context_dim=24, pooled_dim=20
    )
    return MMDiT(**{**args, **kw})


@pytest.mark.parametrize("qk_norm,max_size", [(False, None), (True, 12)])
def test_mmdit_matches_diffusers(qk_norm, max_size):
    ours = randomised(tiny(qk_norm=qk_norm, pos_embed_max_size=max_size)).eval()
    ref = diffusers.SD3Transformer2DModel(**mmdit_diffusers_config(ours)).eval()
    missing, unexpected = ref.load_state_dict(mmdit_to_diffusers(ours.state_dict()), strict=True)
    B = 3
    sigmas = torch.tensor([0.0, 0.42, 1.0])
    context, pooled = torch.randn(B, 7, 24), torch.randn(B, 20)
    sizes = [(16, 16)] + ([(16, 22), (24, 20)] if max_size else [])
    for h, w in sizes:
        x = torch.randn(B, 4, h, w)
        with torch.no_grad():
            expected = ref(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigmas * 1000).sample
            got = ours(x, sigmas, Cond(context=context, pooled=pooled))
        assert got.shape == expected.shape == (B, 4, h, w)
        assert (got - expected).abs().max().item() <= 1e-5, (h, w)


def test_mmdit_weights_round_trip_exactly():
    ours = randomised(tiny(qk_norm=True))
    sd = ours.state_dict()
    back = mmdit_from_diffusers(mmdit_to_diffusers(sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_mmdit_dropout_and_class_conditioning():
    model = randomised(tiny()).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.9])
    context, pooled = torch.randn(2, 5, 24), torch.randn(2, 20)
    with torch.no_grad():
        dropped = model(x, t, Cond(context=context, pooled=pooled, drop_semantic=torch.tensor([True, False])))
        zeros = model(x, t, Cond(context=torch.zeros_like(context), pooled=torch.zeros_like(pooled)))
        plain = model(x, t, Cond(context=context, pooled=pooled))
    assert torch.allclose(dropped[0], zeros[0], atol=1e-6)
    assert torch.allclose(dropped[1], plain[1], atol=1e-6)
    classes = randomised(tiny(conditioning="class", num_classes=10)).eval()
    with torch.no_grad():
        a, b = (
            classes(x, t, Cond(class_labels=torch.tensor([1, 2]))),
            classes(x, t, Cond(class_labels=torch.tensor([1, 3]))),
        )
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    assert tiny()(x, t, Cond(context=context, pooled=pooled)).abs().max() == 0  # adaLN-Zero and a zero output layer
    with pytest.raises(ValueError, match="cond.context"):
        model(x, t, Cond(class_labels=torch.tensor([1, 2])))


def test_export_then_convert_reproduces_an_mmdit(tmp_path):
    from conftest import TINY

    from ldmkit.checkpoint import atomic_save, load_checkpoint
    from ldmkit.cli import main
    from ldmkit.config import load_config, to_dict
    from ldmkit.models.registry import build_model

    cfg = load_config(
        overrides=TINY
        + [
            "model.name=mmdit",
            "model.preset=mmDiT-tiny/4",
            "model.conditioning=text",
            "model.context_dim=384",
            "model.pooled_dim=384",
            "model.qk_norm=true",
            "diffusion.objective=flow",
            "model.learn_sigma=false",
            "sample.sampler=euler",
            "text.encoder=minilm",
            "data.name=shards",
            "data.path=unused.tar",
        ]
    )
    model = randomised(build_model(cfg.model)).eval()
    ckpt = tmp_path / "model.pt"
    atomic_save(
        {"model": model.state_dict(), "ema": model.state_dict(), "config": to_dict(cfg), "images_seen": 0, "step": 0},
        ckpt,
    )
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "hf", vae=None, **dict.fromkeys(text_parts))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    ref = pipe.transformer.eval()
    ours, theirs = BACKBONES["mmdit"].diffusers_probe(model, ref)
    assert (ours - theirs).abs().max() <= 1e-5
    # The pipeline's flow chain, given ldmkit's noise levels, is ldmkit's Euler sampler.
    context, pooled = torch.randn(1, 9, 384), torch.randn(1, 384)
    with torch.no_grad():
        latents = pipe(
            prompt_embeds=context,
            pooled_prompt_embeds=pooled,
            sigmas=[1 - k / 3 for k in range(3)],
            guidance_scale=1,
            generator=torch.Generator().manual_seed(5),
            output_type="latent",
        ).images
        noise = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(5))
        expected = sample_flow(lambda x, t: model(x, t, Cond(context=context, pooled=pooled)), noise, flow_sigmas(3))
    assert (latents - expected).abs().max() <= 1e-5 and expected.std() > 1e-3
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")]) == 0
    back = load_checkpoint(tmp_path / "back.pt")
    assert all(torch.equal(back["ema"][k], v) for k, v in model.state_dict().items())
    assert back["config"]["model"]["qk_norm"] is True
    assert back["config"]["model"]["name"] == "mmdit"
    x, sigmas, context, pooled = (
        torch.randn(2, 1, 32, 32),
        torch.tensor([0.1, 0.8]),
        torch.randn(2, 9, 384),
        torch.randn(2, 384),
    )
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigmas * 1000).sample
        got = model(x, sigmas, Cond(context=context, pooled=pooled))
    assert (got - expected).abs().max() <= 1e-5
