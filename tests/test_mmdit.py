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


@pytest.mark.parametrize("qk_norm,max_size,dual", [(False, None, ()), (True, 12, ()), (True, None, (0, 1))])
def test_mmdit_matches_diffusers(qk_norm, max_size, dual):
    """dual: SD3.5-medium's MMDiT-X blocks (diffusers' dual_attention_layers)."""
    ours = randomised(tiny(qk_norm=qk_norm, pos_embed_max_size=max_size, dual_attention_layers=dual)).eval()
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
    ours = randomised(tiny(qk_norm=True, dual_attention_layers=(1,)))
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


def write_official(path, sd: dict, prefix: str = "") -> None:
    """An SD3-style file: the MMDiT's tensors under the official names (ldmkit's), optionally behind the
    all-in-one prefix, beside a VAE tensor and a text-encoder tensor as the released files hold them."""
    from safetensors.torch import save_file

    tensors = {prefix + k: v.contiguous() for k, v in sd.items()}
    if prefix:
        tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
        tensors["text_encoders.clip_l.logit_scale"] = torch.zeros(1)
    save_file(tensors, str(path))


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_official_sd35_medium_weights_convert_as_they_are(tmp_path, prefix):
    """An SD3.5-medium-shaped file (QK RMS norm, MMDiT-X blocks 0-1, 64-wide heads as the official code builds them):
    recognised without options, its architecture read from the weights, SD3's published sampling in the config,
    and the converted model equal to the original."""
    from ldmkit.cli import main
    from ldmkit.transfer.convert import load_any

    official = randomised(tiny(hidden_size=192, num_heads=3, qk_norm=True, dual_attention_layers=(0, 1))).eval()
    sd = official.state_dict()
    assert "y_embedder.mlp.0.weight" in sd and "joint_blocks.0.x_block.attn2.ln_q.weight" in sd  # official names
    write_official(tmp_path / "sd3.5_medium.safetensors", sd, prefix)
    assert main(["convert", str(tmp_path / "sd3.5_medium.safetensors"), "--out", str(tmp_path / "ldmkit.pt")]) == 0
    model, cfg, layout, _ = load_any(tmp_path / "ldmkit.pt")
    assert layout == "ldmkit"
    m = cfg["model"]
    assert (m["depth"], m["hidden_size"], m["num_heads"], m["qk_norm"]) == (3, 192, 3, True)
    assert (m["dual_attention_layers"], m["context_dim"], m["pooled_dim"]) == ([0, 1], 24, 20)
    assert (cfg["diffusion"]["time_shift"], cfg["sample"]["sigma_schedule"], cfg["sample"]["sampler"]) == (
        3.0,
        "sd3",
        "dpmpp",
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_official_sd3_head_count_is_never_guessed(tmp_path):
    """Without QK norm the heads are not in the weights: 64-wide heads (the official rule) when the width is 64 per
    block, else an error asking for --num-heads; then the model loads with the heads given."""
    from ldmkit.cli import main

    model = randomised(tiny(hidden_size=48, num_heads=3)).eval()  # width 48 over 3 blocks: not 64 per block
    write_official(tmp_path / "sd3.safetensors", model.state_dict(), "model.diffusion_model.")
    out = str(tmp_path / "out.pt")
    assert main(["convert", str(tmp_path / "sd3.safetensors"), "--out", out]) == 2
    assert main(["convert", str(tmp_path / "sd3.safetensors"), "--out", out, "--num-heads", "5"]) == 2
    assert main(["convert", str(tmp_path / "sd3.safetensors"), "--out", out, "--num-heads", "3"]) == 0


def test_checkpoints_with_the_old_pooled_embedder_names_still_load():
    model = randomised(tiny())
    sd = model.state_dict()
    old = {k.replace("y_embedder.mlp.", "y_embedder."): v for k, v in sd.items()}
    assert "y_embedder.0.weight" in old
    fresh = tiny()
    fresh.load_state_dict(old)
    assert torch.equal(fresh.y_embedder.mlp[0].weight, sd["y_embedder.mlp.0.weight"])


def test_weights_that_fit_two_backbones_are_refused_not_guessed():
    from ldmkit.models.registry import detect_backbone
    from ldmkit.models.spec import ConversionError

    z = torch.zeros(1)
    both = {"blocks.0.attn.qkv.weight": z, "x_embedder.proj.weight": z, "joint_blocks.0.x_block.attn.qkv.weight": z}
    with pytest.raises(ConversionError, match="ambiguous weights: they fit dit \\(official\\), mmdit \\(official\\)"):
        detect_backbone(both)
