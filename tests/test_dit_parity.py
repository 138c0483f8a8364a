"""ldmkit's DiT against diffusers' DiTTransformer2DModel with the same weights (fp32, max abs diff <= 1e-5),
and weight round trips through the converters."""

import pytest
import torch
from conftest import randomised

from ldmkit.conditioning.cond import Cond
from ldmkit.models import dit_spec as ck
from ldmkit.models.dit import DiT
from ldmkit.transfer.checkpoints import read_weights

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("learn_sigma,patch", [(True, 2), (False, 4)])
def test_dit_matches_diffusers(learn_sigma, patch):
    ours = randomised(
        DiT(
            input_size=16,
            patch_size=patch,
            in_channels=4,
            hidden_size=64,
            depth=3,
            num_heads=4,
            num_classes=10,
            learn_sigma=learn_sigma,
            timestep_freq_shift=1,
        )
    ).eval()
    arch = ck.dit_arch_from_state_dict(ours.state_dict(), num_heads=4)
    ref = diffusers.DiTTransformer2DModel(**ck.diffusers_config(arch)).eval()
    missing, unexpected = ref.load_state_dict(ck.ldmkit_to_diffusers(ours.state_dict()), strict=False)
    assert not unexpected
    assert all("pos_embed.pos_embed" in k for k in missing)
    x = torch.randn(3, 4, 16, 16)
    steps = torch.tensor([0, 417, 999])
    labels = torch.tensor([1, 5, 9])
    with torch.no_grad():
        expected = ref(x, timestep=steps, class_labels=labels).sample
        got = ours(x, steps / 1000.0, Cond(class_labels=labels))
    assert got.shape == expected.shape == (3, 8 if learn_sigma else 4, 16, 16)
    assert (got - expected).abs().max().item() <= 1e-5


def test_official_freq_shift_differs_from_diffusers():
    """The two timestep conventions are really different: the setting matters."""
    a = randomised(
        DiT(
            input_size=8,
            patch_size=2,
            in_channels=4,
            hidden_size=64,
            depth=1,
            num_heads=4,
            num_classes=10,
            timestep_freq_shift=0,
        )
    )
    b = DiT(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        depth=1,
        num_heads=4,
        num_classes=10,
        timestep_freq_shift=1,
    )
    b.load_state_dict(a.state_dict())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7]), Cond(class_labels=torch.tensor([1, 2]))
    assert (a(x, t, c) - b(x, t, c)).abs().max() > 1e-3


def test_convert_round_trip_is_exact(tmp_path):
    ours = randomised(
        DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    )
    sd = ours.state_dict()
    arch = ck.dit_arch_from_state_dict(sd, num_heads=4)
    ck.write_diffusers(sd, arch, tmp_path / "exported")
    back, layout, _, folder_config = read_weights(tmp_path / "exported")
    assert layout == "diffusers"
    assert folder_config["sample_size"] == 16
    restored = ck.diffusers_to_ldmkit(back)
    for k, v in sd.items():
        if k == "pos_embed":
            continue  # a fixed table, rebuilt from the architecture
        assert torch.equal(restored[k], v), k
    loaded = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "exported")
    assert loaded.config.num_layers == 2
    assert loaded.config.norm_eps == 1e-6


def test_arch_inference_of_official_layout():
    """The head count is not in a DiT's weights: it is read from the published size of that width and depth (DiT-S
    here), and a width/depth pair no published size has is an error asking for it, never a guess."""
    sd = DiT(
        input_size=32, patch_size=4, in_channels=4, hidden_size=384, depth=12, num_heads=6, num_classes=1000
    ).state_dict()
    arch = ck.dit_arch_from_state_dict(sd)
    assert arch == dict(
        hidden_size=384,
        in_channels=4,
        patch_size=4,
        depth=12,
        num_heads=6,
        num_classes=1000,
        learn_sigma=True,
        input_size=32,
    )
    shallow = {k: v for k, v in sd.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < 2}
    with pytest.raises(ck.ConversionError, match="width 384 with 2 blocks is no published DiT size.*--num-heads"):
        ck.dit_arch_from_state_dict(shallow)
    assert ck.dit_arch_from_state_dict(shallow, num_heads=12)["num_heads"] == 12
    with pytest.raises(ck.ConversionError, match="5 heads do not divide the width 384"):
        ck.dit_arch_from_state_dict(shallow, num_heads=5)
    with pytest.raises(ck.ConversionError, match="x_embedder"):
        ck.dit_arch_from_state_dict({"foo": torch.zeros(1)})


def test_dit_takes_other_grids_and_pooled_text():
    from ldmkit.conditioning.cond import Cond
    from ldmkit.models.dit import DiT
    from ldmkit.models.layers import get_2d_sincos_pos_embed

    torch.manual_seed(0)
    model = DiT(
        input_size=16,
        patch_size=4,
        in_channels=3,
        hidden_size=32,
        depth=1,
        num_heads=2,
        learn_sigma=False,
        conditioning="pooled_text",
        pooled_dim=12,
    )
    for block in model.blocks:  # leave adaLN-Zero so the output depends on the input
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    pooled, t = torch.randn(2, 12), torch.rand(2)
    out = model(torch.randn(2, 3, 16, 24), t, Cond(pooled=pooled))
    assert out.shape == (2, 3, 16, 24)
    # a 4x6 grid gets the sin-cos table of that grid; the square training grid keeps the stored one
    assert torch.allclose(model.pos_embed_for(4, 6)[0], torch.from_numpy(get_2d_sincos_pos_embed(32, (4, 6))).float())
    assert model.pos_embed_for(4, 4) is model.pos_embed
    dropped = model.text_embedder(pooled, torch.tensor([True, False]))
    assert torch.allclose(dropped[0], model.text_embedder(torch.zeros(1, 12))[0])  # learned null, zero at init
    assert torch.allclose(dropped[1], model.text_embedder(pooled[1:])[0])
    with pytest.raises(ValueError, match="cond.pooled"):
        model(torch.randn(1, 3, 16, 16), t[:1], Cond(class_labels=torch.tensor([0])))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(1, 3, 16, 18), t[:1], Cond(pooled=pooled[:1]))
