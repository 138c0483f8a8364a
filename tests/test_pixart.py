"""PixArt-alpha against diffusers' PixArtTransformer2DModel with the same weights (fp32, max abs diff <= 1e-5),
weight round trips, class conditioning, caption dropout and other grids."""

import pytest
import torch
from conftest import TINY, randomised

from ldmkit.checkpoint import atomic_save, load_checkpoint
from ldmkit.cli import main
from ldmkit.conditioning.cond import Cond
from ldmkit.config import load_config, to_dict
from ldmkit.models.pixart import PixArt
from ldmkit.models.pixart_spec import pixart_diffusers_config, pixart_from_diffusers, pixart_to_diffusers
from ldmkit.models.registry import BACKBONES, build_model

diffusers = pytest.importorskip("diffusers")


def tiny(**kw):
    args = dict(
        input_size=16,
        patch_size=2,
        in_channels=4,
        hidden_size=48,
        depth=2,
        num_heads=3,
        caption_channels=24,
        max_tokens=7,
    )
    return PixArt(**{**args, **kw})


@pytest.mark.parametrize("micro,learn_sigma,size", [(False, True, 16), (True, False, 16), (False, True, 128)])
def test_pixart_matches_diffusers(micro, learn_sigma, size):
    torch.manual_seed(0)
    ours = randomised(tiny(micro_conditions=micro, learn_sigma=learn_sigma, input_size=size)).eval()
    ref = diffusers.PixArtTransformer2DModel(**pixart_diffusers_config(ours)).eval()
    missing, unexpected = ref.load_state_dict(pixart_to_diffusers(ours.state_dict()), strict=False)
    assert not unexpected
    assert all("pos_embed.pos_embed" in k for k in missing), (missing, unexpected)
    B = 3
    x, steps = torch.randn(B, 4, size, size), torch.tensor([0, 417, 999])
    caption, mask = torch.randn(B, 7, 24), torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2]).bool()
    control = {
        "original_size": torch.tensor([[512.0, 768.0], [256.0, 256.0], [1024.0, 640.0]]),
        "target_size": torch.tensor([[16.0, 24.0], [16.0, 16.0], [24.0, 16.0]]),
    }
    added = (
        {
            "resolution": control["original_size"],
            "aspect_ratio": control["target_size"][:, :1] / control["target_size"][:, 1:],
        }
        if micro
        else None
    )
    with torch.no_grad():
        expected = ref(
            x, encoder_hidden_states=caption, encoder_attention_mask=mask, timestep=steps, added_cond_kwargs=added
        ).sample
        got = ours(x, steps / 1000.0, Cond(context=caption, context_mask=mask, control=control))
    assert got.shape == expected.shape == (B, 8 if learn_sigma else 4, size, size)
    assert (got - expected).abs().max().item() <= 1e-5
    if size == 16:  # another grid: both recompute the table with PixArt's base-size scaling
        x2 = torch.randn(B, 4, 16, 24)
        with torch.no_grad():
            expected2 = ref(
                x2, encoder_hidden_states=caption, encoder_attention_mask=mask, timestep=steps, added_cond_kwargs=added
            ).sample
            got2 = ours(x2, steps / 1000.0, Cond(context=caption, context_mask=mask, control=control))
        assert (got2 - expected2).abs().max().item() <= 1e-5


def test_pixart_weights_round_trip_exactly():
    ours = randomised(tiny(micro_conditions=True))
    back = pixart_from_diffusers(pixart_to_diffusers(ours.state_dict()))
    sd = ours.state_dict()
    assert set(back) == set(sd) - {"pos_embed", "y_embedder.y_embedding"}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_pixart_caption_dropout_and_class_conditioning():
    model = randomised(tiny()).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.2, 0.8])
    caption = torch.randn(2, 5, 24)
    null = model.y_embedder.y_embedding[:5].expand(2, -1, -1)
    with torch.no_grad():
        dropped = model(x, t, Cond(context=caption, drop_semantic=torch.tensor([True, False])))
        assert torch.allclose(dropped[0], model(x, t, Cond(context=null))[0], atol=1e-6)
        assert torch.allclose(dropped[1], model(x, t, Cond(context=caption))[1], atol=1e-6)
    classes = randomised(tiny(conditioning="class", num_classes=10)).eval()
    with torch.no_grad():
        a = classes(x, t, Cond(class_labels=torch.tensor([1, 2])))
        b = classes(x, t, Cond(class_labels=torch.tensor([1, 3])))
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="cond.class_labels"):
        classes(x, t, Cond(context=caption))
    fresh = tiny()
    assert fresh(x, t, Cond(context=caption)).abs().max() == 0  # zero-initialised output layer


def test_export_then_convert_reproduces_a_trained_pixart(tmp_path, monkeypatch):
    """A text-conditional PixArt run -> diffusers folder (loads with from_pretrained) -> ldmkit checkpoint:
    the same weights, the same outputs."""
    cfg_overrides = [
        "model.name=pixart",
        "model.preset=PixArt-alpha-tiny/4",
        "model.conditioning=text",
        "model.context_dim=384",
        "model.max_tokens=16",
        "text.encoder=minilm",
        "text.max_length=16",
        "data.name=shards",
        "data.path=unused.tar",
    ]
    cfg = load_config(overrides=TINY + cfg_overrides)
    model = randomised(build_model(cfg.model))
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-0000000128.pt"
    ckpt.parent.mkdir(parents=True)
    atomic_save(
        {"model": model.state_dict(), "ema": model.state_dict(), "config": to_dict(cfg), "images_seen": 128, "step": 8},
        ckpt,
    )
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    # a PixArtAlphaPipeline folder whose text encoder is left out: it runs on ldmkit's caption embeddings
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "hf", tokenizer=None, text_encoder=None, vae=None)
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and type(pipe.scheduler).__name__ == "DDPMScheduler"
    ref = pipe.transformer.eval()
    ours, theirs = BACKBONES["pixart"].diffusers_probe(model.eval(), ref)
    assert (ours - theirs).abs().max() <= 1e-5
    # the model card's diffusers example runs as written (ldmkit's MiniLM encoder makes the caption embeddings)
    card = (tmp_path / "hf" / "README.md").read_text()
    example = card.split("## Use with diffusers\n\n```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path / "hf")
    namespace = {}
    exec(example, namespace)
    assert namespace["images"].shape == (1, 1, 32, 32) and torch.isfinite(namespace["images"]).all()
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")]) == 0
    back = load_checkpoint(tmp_path / "back.pt")
    sd = model.state_dict()
    assert all(torch.equal(back["ema"][k], sd[k]) for k in sd)  # the learned null caption too (ldmkit_extra)
    x, steps, caption = torch.randn(2, 1, 32, 32), torch.tensor([10, 900]), torch.randn(2, 16, 384)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=caption, timestep=steps).sample
        got = model.eval()(x, steps / 1000.0, Cond(context=caption))
    assert (got - expected).abs().max() <= 1e-5
    assert main(["export", str(tmp_path / "back.pt"), "--out", str(tmp_path / "hf2")]) == 0
    # An ldmkit checkpoint converts to the diffusers layout too (through the backbone's spec), as export writes it.
    assert main(["convert", str(tmp_path / "back.pt"), "--to", "diffusers", "--out", str(tmp_path / "hf3")]) == 0
    again = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "hf3").eval()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in again.state_dict().items())
