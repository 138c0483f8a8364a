"""The LDM/SDXL UNet against diffusers' UNet2DConditionModel with the same weights (fp32, max abs diff
<= 1e-5), weight round trips, class tokens and SDXL micro-conditioning."""

import pytest
import torch
from conftest import randomised

from ldmkit.conditioning.cond import Cond
from ldmkit.models.registry import BACKBONES
from ldmkit.models.unet import UNet
from ldmkit.models.unet_spec import unet_diffusers_config, unet_from_diffusers, unet_to_diffusers

diffusers = pytest.importorskip("diffusers")


LDM_LIKE = dict(
    block_out_channels=(16, 32, 48),
    layers_per_block=2,
    transformer_depth=(0, 1, 1),
    num_heads=1,
    context_dim=12,
    norm_groups=4,
)
SDXL_LIKE = dict(
    block_out_channels=(16, 32, 48),
    layers_per_block=2,
    transformer_depth=(0, 1, 2),
    head_channels=8,
    context_dim=12,
    norm_groups=4,
    linear_projection=True,
    micro_conditions=True,
    pooled_dim=10,
    micro_embed_dim=8,
)


@pytest.mark.parametrize("arch", [LDM_LIKE, SDXL_LIKE], ids=["ldm", "sdxl"])
def test_unet_matches_diffusers(arch):
    ours = randomised(UNet(input_size=16, in_channels=4, conditioning="text", **arch)).eval()
    ref = diffusers.UNet2DConditionModel(**unet_diffusers_config(ours)).eval()
    ref.load_state_dict(unet_to_diffusers(ours.state_dict()), strict=True)
    B = 3
    x, steps = torch.randn(B, 4, 16, 16), torch.tensor([0, 417, 999])
    context, mask = torch.randn(B, 5, 12), torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1] * 4 + [0]]).bool()
    control = {
        "original_size": torch.tensor([[512.0, 768.0], [256.0, 256.0], [1024.0, 640.0]]),
        "crop_top_left": torch.tensor([[0.0, 12.0], [3.0, 0.0], [0.0, 0.0]]),
        "target_size": torch.tensor([[128.0, 128.0], [128.0, 128.0], [96.0, 160.0]]),
    }
    pooled = torch.randn(B, 10)
    added = None
    if arch.get("micro_conditions"):
        added = {
            "text_embeds": pooled,
            "time_ids": torch.cat([control[k] for k in ("original_size", "crop_top_left", "target_size")], dim=1),
        }
    with torch.no_grad():
        expected = ref(
            x, steps, encoder_hidden_states=context, encoder_attention_mask=mask, added_cond_kwargs=added
        ).sample
        got = ours(x, steps / 1000.0, Cond(context=context, context_mask=mask, pooled=pooled, control=control))
    assert got.shape == expected.shape == (B, 4, 16, 16)
    assert (got - expected).abs().max().item() <= 1e-5


def test_unet_round_trip_and_class_tokens():
    ours = randomised(UNet(input_size=16, in_channels=4, conditioning="class", num_classes=10, **LDM_LIKE)).eval()
    sd = ours.state_dict()
    back = unet_from_diffusers(unet_to_diffusers(sd))
    assert set(back) == set(sd) - {"class_embedder.embedding_table.weight"}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        a, b = ours(x, t, Cond(class_labels=torch.tensor([1, 2]))), ours(x, t, Cond(class_labels=torch.tensor([1, 3])))
        # the class enters as one cross-attention token: the diffusers UNet given that token agrees
        ref = diffusers.UNet2DConditionModel(**unet_diffusers_config(ours)).eval()
        ref.load_state_dict(unet_to_diffusers(sd))
        token = ours.class_embedder(torch.tensor([1, 2]))[:, None]
        expected = ref(x, t * 1000, encoder_hidden_states=token).sample
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    assert (a - expected).abs().max() <= 1e-5
    fresh = UNet(input_size=16, in_channels=4, **LDM_LIKE)
    assert fresh(x, t, Cond(class_labels=torch.tensor([1, 2]))).abs().max() == 0  # zero-initialised output convolution
    with pytest.raises(ValueError, match="multiples of 4"):
        ours(torch.randn(1, 4, 18, 16), t[:1], Cond(class_labels=torch.tensor([1])))


@pytest.mark.slow
def test_export_then_convert_reproduces_an_sdxl_like_unet(tmp_path):
    """Export a text UNet with micro-conditioning (an SDXL-like preset), load it with from_pretrained, and
    import it back: same weights, same outputs; a UNet that matches no preset is a clear error."""
    from conftest import TINY

    from ldmkit.checkpoint import atomic_save, load_checkpoint
    from ldmkit.cli import main
    from ldmkit.config import load_config, to_dict
    from ldmkit.models.registry import build_model

    cfg = load_config(
        overrides=TINY
        + [
            "model.name=unet",
            "model.preset=UNet-S",
            "model.conditioning=text",
            "model.context_dim=384",
            "model.micro_conditions=true",
            "model.pooled_dim=384",
            "model.learn_sigma=false",
            "text.encoder=minilm",
            "text.max_length=16",
            "model.max_tokens=16",
            "data.name=shards",
            "data.path=x.tar",
        ]
    )
    model = randomised(build_model(cfg.model), scale=0.05).eval()
    atomic_save(
        {"model": model.state_dict(), "ema": model.state_dict(), "config": to_dict(cfg), "images_seen": 0, "step": 0},
        tmp_path / "m.pt",
    )
    assert main(["export", str(tmp_path / "m.pt"), "--out", str(tmp_path / "hf")]) == 0
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "hf", vae=None, **dict.fromkeys(text_parts))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and type(pipe.scheduler).__name__ == "DDPMScheduler"
    ref = pipe.unet.eval()
    ours, theirs = BACKBONES["unet"].diffusers_probe(model, ref)
    assert (ours - theirs).abs().max() <= 1e-5
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")]) == 0
    back = load_checkpoint(tmp_path / "back.pt")
    assert back["config"]["model"]["preset"] == "UNet-S"
    assert back["config"]["model"]["micro_conditions"] is True
    assert all(torch.equal(back["ema"][k], v) for k, v in model.state_dict().items())
    x, steps, context, pooled = (
        torch.randn(2, 1, 32, 32),
        torch.tensor([5, 700]),
        torch.randn(2, 16, 384),
        torch.randn(2, 384),
    )
    control = {k: torch.tensor([[64.0, 64.0], [32.0, 48.0]]) for k in ("original_size", "crop_top_left", "target_size")}
    time_ids = torch.cat([control[k] for k in ("original_size", "crop_top_left", "target_size")], dim=1)
    with torch.no_grad():
        expected = ref(
            x, steps, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        got = model(x, steps / 1000, Cond(context=context, pooled=pooled, control=control))
    assert (got - expected).abs().max() <= 1e-5
    odd = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=8,
        sample_size=8,
    )
    odd.save_pretrained(tmp_path / "odd")
    assert main(["convert", str(tmp_path / "odd"), "--out", str(tmp_path / "odd.pt")]) == 2
