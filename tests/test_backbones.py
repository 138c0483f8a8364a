"""Every backbone trains on the embedded data through the one training loop, and its loss falls; every
shipped config loads and builds."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY

from ldmkit.config import ConfigError, load_config
from ldmkit.models.registry import build_model
from ldmkit.training.encode import encode_dataset
from ldmkit.training.loop import training_loop

CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].glob("configs/**/*.yaml") if p.parent.name != "recipes")
SHORT = [
    "data.resolution=16",
    "model.input_size=16",
    "train.total_images=2400",
    "train.global_batch=16",
    "train.log_every_images=400",
    "train.checkpoint_every_images=2400",
    "train.lr=0.002",
    "diffusion.objective=flow",
    "model.learn_sigma=false",
    "sample.sampler=euler",
]


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.name=dit", "model.preset=DiT-tiny/4"],
        ["model.name=pixart", "model.preset=PixArt-alpha-tiny/4", "model.conditioning=class"],
        ["model.name=mmdit", "model.preset=mmDiT-tiny/4", "model.conditioning=class"],
        ["model.name=unet", "model.preset=UNet-tiny", "model.conditioning=class"],
        ["model.name=mdt", "model.preset=mDT-v2-tiny/4", "model.mask_ratio=0.3"],
    ],
    ids=["dit-class", "pixart-class", "mmdit-class", "unet-class", "mdt-class"],
)
@pytest.mark.slow
def test_backbone_trains_on_the_digits(tmp_path, overrides):
    run = training_loop(load_config(overrides=TINY + SHORT + overrides), tmp_path / "run", quiet=True)
    curve = losses(run)
    assert len(curve) == 6
    assert curve[-1] < 0.8 * curve[0], curve  # 150 steps


@pytest.mark.parametrize(
    "backbone",
    [
        ["model.name=pixart", "model.preset=PixArt-alpha-tiny/4"],
        ["model.name=mmdit", "model.preset=mmDiT-tiny/4", "model.pooled_dim=384"],
        ["model.name=unet", "model.preset=UNet-tiny"],
    ],
    ids=["pixart", "mmdit", "unet"],
)
@pytest.mark.slow
def test_text_backbone_trains_on_captions_from_the_cache(tmp_path, backbone):
    from ldmkit.data.shards import write_mnist_caption_shards

    write_mnist_caption_shards(tmp_path / "shards", load_config().data, "held_out", shard_size=100)
    text = [
        "data.name=shards",
        f"data.path={tmp_path}/shards/mnist-{{00000..00004}}.tar",
        "data.label_field=label",
        "data.crop=none",
        f"data.cache={tmp_path / 'cache'}",
        "data.from_cache=true",
        "text.encoder=minilm",
        "text.max_length=16",
        "model.context_dim=384",
        "model.max_tokens=16",
    ]
    cfg = load_config(overrides=TINY + SHORT + text + backbone + ["model.conditioning=text"])
    encode_dataset(cfg, log=lambda *a: None)
    curve = losses(training_loop(cfg, tmp_path / "run", quiet=True))
    assert curve[-1] < 0.8 * curve[0], curve
    with pytest.raises(ConfigError, match="model.context_dim"):
        training_loop(
            load_config(
                overrides=TINY + SHORT + text + backbone + ["model.conditioning=text", "model.context_dim=512"]
            ),
            tmp_path / "run2",
            quiet=True,
        )


def test_impossible_conditioning_is_a_config_error():
    with pytest.raises(ConfigError, match="pixart takes class .* text .*, not pooled_text"):
        build_model(
            load_config(
                overrides=[
                    "model.name=pixart",
                    "model.preset=PixArt-alpha-tiny/2",
                    "model.conditioning=pooled_text",
                    "text.encoder=minilm",
                    "data.name=shards",
                    "data.path=x.tar",
                ]
            ).model
        )
    with pytest.raises(ConfigError, match="mdt takes class .* pooled_text .*, not text"):
        build_model(
            load_config(
                overrides=[
                    "model.name=mdt",
                    "model.preset=mDT-v2-tiny/4",
                    "model.conditioning=text",
                    "text.encoder=minilm",
                    "data.name=shards",
                    "data.path=x.tar",
                ]
            ).model
        )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_build(path):
    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.conditioning)
    assert sum(p.numel() for p in model.parameters()) > 0
    if path.stem.startswith("proposed"):  # the paper's model: control embedded, semantic only through attention
        assert model.semantic_path == "attention"
        assert set(model.control_embedder.keys) == set(cfg.conditioning.control)
        assert not hasattr(model, "y_embedder")
        assert cfg.conditioning.mechanism == "disentangled"


@pytest.mark.parametrize("preset", ["DiT-tiny/4", "PixArt-alpha-tiny/4", "mmDiT-tiny/4", "UNet-tiny", "mDT-v2-tiny/4"])
def test_every_backbone_exposes_its_repeated_blocks_for_compilation(preset):
    from ldmkit.models.registry import backbone_of_preset
    from ldmkit.training.parallel import compile_blocks, repeated_blocks

    model = build_model(
        load_config(overrides=[f"model.name={backbone_of_preset(preset)}", f"model.preset={preset}"]).model
    )
    blocks = repeated_blocks(model)
    # every parameter outside the repeated blocks belongs to the embedders and the output layer
    inside = {id(p) for b in blocks for p in b.parameters()}
    share = sum(p.numel() for p in model.parameters() if id(p) in inside) / sum(p.numel() for p in model.parameters())
    assert len(blocks) >= 2
    assert share > 0.5
    compile_blocks(model)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)


def test_presets_answer_to_the_papers_names():
    from ldmkit.models.registry import backbone_of_preset

    for preset, backbone in (
        ("UNet/LDM", "unet"),
        ("DiT-XL/2", "dit"),
        ("mDT-v2-XL/2", "mdt"),
        ("PixArt-α-XL/2", "pixart"),
        ("mmDiT-XL/2", "mmdit"),
    ):
        assert backbone_of_preset(preset) == backbone
        with torch.device("meta"):
            build_model(load_config(overrides=[f"model.name={backbone}", f"model.preset={preset}"]).model)


@pytest.mark.parametrize(
    "override, backbone, users",
    [
        ("model.micro_conditions=true", "dit", "pixart, unet"),
        ("model.qk_norm=true", "pixart", "mmdit"),
        ("model.mask_ratio=0.3", "dit", "mdt"),
        ("model.timestep_freq_shift=1", "mmdit", "dit"),
    ],
)
def test_a_model_key_the_backbone_does_not_use_is_refused(override, backbone, users):
    preset = {"dit": "DiT-tiny/2", "pixart": "PixArt-alpha-tiny/2", "mmdit": "mmDiT-tiny/2"}[backbone]
    cfg = load_config(overrides=[f"model.name={backbone}", f"model.preset={preset}", override])
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}': {backbone} does not use it \\(it applies to {users}\\)"):
        build_model(cfg.model, cfg.conditioning)
