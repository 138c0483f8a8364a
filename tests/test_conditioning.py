"""The paper's conditioning: disentangled semantic path, control embeddings phased in by w(t),
independent dropout, sampling with control values and control guidance."""

import json
import os
import subprocess

import pytest
import torch
from conftest import TINY, randomised, state_of, torchrun_command

from ldmkit.cli import main
from ldmkit.conditioning.cond import Cond
from ldmkit.config import ConfigError, load_config
from ldmkit.models.registry import build_model
from ldmkit.training.loop import training_loop

CONTROL = ["conditioning.control=[original_size, crop_top_left, flip]", "data.hflip=true"]


def dit(*extra):
    cfg = load_config(overrides=TINY + list(extra))
    return build_model(cfg.model, cfg.conditioning), cfg


def test_low_level_control_has_no_effect_where_its_weight_is_zero():
    model, _ = dit(
        *CONTROL, "conditioning.mechanism=disentangled", "conditioning.low_end=0.5", "conditioning.value_scale=0.01"
    )
    randomised(model)
    x, labels = torch.randn(2, 1, 32, 32), torch.tensor([3, 7])

    def run(t, size):
        control = {"original_size": torch.tensor(size), "crop_top_left": torch.zeros(2, 2), "flip": torch.zeros(2, 1)}
        with torch.no_grad():
            return model(x, torch.tensor(t), Cond(class_labels=labels, control=control))

    small, large = [[32.0, 32.0], [32.0, 32.0]], [[900.0, 600.0], [64.0, 300.0]]
    assert torch.equal(run([0.6, 0.9], small), run([0.6, 0.9], large))  # t >= end: low-level weight 0
    assert not torch.allclose(run([0.1, 0.2], small), run([0.1, 0.2], large))  # early enough: it acts
    flip_a = model(
        x,
        torch.tensor([0.9, 0.9]),
        Cond(
            class_labels=labels,
            control={
                "original_size": torch.tensor(small),
                "crop_top_left": torch.zeros(2, 2),
                "flip": torch.zeros(2, 1),
            },
        ),
    )
    flip_b = model(
        x,
        torch.tensor([0.9, 0.9]),
        Cond(
            class_labels=labels,
            control={
                "original_size": torch.tensor(small),
                "crop_top_left": torch.zeros(2, 2),
                "flip": torch.ones(2, 1),
            },
        ),
    )
    assert not torch.allclose(flip_a, flip_b)  # high-level controls act at every noise level (constant schedule)


def test_disentangled_class_goes_through_attention_not_adaln():
    model, _ = dit("conditioning.mechanism=disentangled")
    assert hasattr(model.blocks[0], "cross_attn")
    assert model.semantic_path == "attention"
    randomised(model)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        a, b = (
            model(x, t, Cond(class_labels=torch.tensor([1, 2]))),
            model(x, t, Cond(class_labels=torch.tensor([1, 3]))),
        )
        for block in model.blocks:  # without the cross-attention the class has no way in
            torch.nn.init.zeros_(block.cross_attn.proj.weight), torch.nn.init.zeros_(block.cross_attn.proj.bias)
        c, d = (
            model(x, t, Cond(class_labels=torch.tensor([1, 2]))),
            model(x, t, Cond(class_labels=torch.tensor([1, 3]))),
        )
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    assert torch.equal(c, d)


@pytest.mark.slow
def test_dropout_frequencies_match_their_probabilities(tmp_path, monkeypatch):
    from ldmkit.models.dit import DiT

    seen = []
    forward = DiT.forward

    def recording(self, x, t, cond):
        seen.append((cond.drop_semantic.clone(), cond.drop_control.clone()))
        return forward(self, x, t, cond)

    monkeypatch.setattr(DiT, "forward", recording)
    training_loop(
        load_config(
            overrides=TINY
            + CONTROL
            + [
                "conditioning.mechanism=additive",
                "conditioning.control_dropout=0.3",
                "train.class_dropout=0.1",
                "train.total_images=1024",
                "train.global_batch=64",
            ]
        ),
        tmp_path / "run",
        quiet=True,
    )
    sem, ctrl = torch.cat([s for s, _ in seen]).float(), torch.cat([c for _, c in seen]).float()
    assert len(sem) == 1024
    assert abs(sem.mean() - 0.1) < 0.03
    assert abs(ctrl.mean() - 0.3) < 0.04
    assert abs((sem * ctrl).mean() - sem.mean() * ctrl.mean()) < 0.02  # drawn independently


@pytest.mark.slow
def test_training_and_sampling_with_control_values_and_control_guidance(tmp_path):
    overrides = TINY + CONTROL + ["conditioning.mechanism=disentangled", "train.total_images=64"]
    run = training_loop(load_config(overrides=overrides), tmp_path / "run", quiet=True)
    assert state_of(run)["images_seen"] == 64
    args = ["sample", str(run), "--steps", "2", "--classes", "1,2", "--per-class", "1"]
    assert main(args + ["--grid", str(tmp_path / "a.png")]) == 0
    assert (
        main(
            args
            + [
                "--grid",
                str(tmp_path / "b.png"),
                "--control",
                "flip=1",
                "original_size=512,384",
                "--control-guidance",
                "2",
            ]
        )
        == 0
    )
    assert main(args + ["--grid", str(tmp_path / "c.png"), "--control", "flip=1,2"]) == 2  # flip takes one number
    assert (
        main(
            [
                "eval",
                str(run),
                "--num",
                "4",
                "--steps",
                "2",
                "--metrics",
                "none",
                "--control",
                "flip=1",
                "--control-guidance",
                "2",
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["control"] == ["flip=1"]
    assert metrics["control_guidance_scale"] == 2.0
    assert "ctrlcfg2" in metrics["sample_set"]


def test_impossible_conditioning_combinations_are_config_errors():
    text = [
        "text.encoder=minilm",
        "data.name=shards",
        "data.path=x.tar",
        "model.max_tokens=77",
        "model.context_dim=384",
    ]
    with pytest.raises(ConfigError, match="published backbones embed no control values"):
        dit(*CONTROL)
    with pytest.raises(ConfigError, match="pooled_text sums the caption into adaLN.*use model.conditioning: text"):
        dit("model.conditioning=pooled_text", "conditioning.mechanism=disentangled", *text)
    with pytest.raises(ConfigError, match="mdt has no attention to a class token"):
        dit("model.name=mdt", "model.preset=mDT-v2-tiny/4", "conditioning.mechanism=disentangled")
    with pytest.raises(ConfigError, match="'model.micro_conditions'.*list the control values in conditioning.control"):
        dit(
            "model.name=pixart",
            "model.preset=PixArt-alpha-tiny/4",
            "model.micro_conditions=true",
            "conditioning.mechanism=additive",
        )
    with pytest.raises(ConfigError, match="unknown control 'colour'"):
        load_config(overrides=["conditioning.control=[colour]"])


@pytest.mark.slow
def test_dit_attends_to_padded_caption_tokens(tmp_path):
    from ldmkit.data.shards import write_mnist_caption_shards

    write_mnist_caption_shards(tmp_path / "shards", load_config().data, "held_out", shard_size=100)
    text = TINY + [
        "data.name=shards",
        f"data.path={tmp_path}/shards/mnist-{{00000..00004}}.tar",
        "data.label_field=label",
        "data.crop=none",
        "text.encoder=minilm",
        "text.max_length=16",
        "model.max_tokens=16",
        "model.context_dim=384",
        "model.conditioning=text",
        "conditioning.mechanism=disentangled",
        "conditioning.padding=noisy_replicate",
        "train.total_images=64",
    ]
    straight = training_loop(load_config(overrides=text), tmp_path / "a", quiet=True)
    training_loop(load_config(overrides=text), tmp_path / "b", quiet=True, stop_after_images=32)
    training_loop(load_config(overrides=text), tmp_path / "b", quiet=True)
    a, b = state_of(straight)["model"], state_of(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the padding noise is seeded per sample: resume stays exact
    assert "context_embedder.weight" in a
    assert "blocks.0.cross_attn.kv_linear.weight" in a


@pytest.mark.slow
def test_probe_reports_drift_and_flip_effect(tmp_path):
    run = training_loop(
        load_config(
            overrides=TINY
            + CONTROL
            + ["conditioning.mechanism=disentangled", "train.total_images=64", "eval.classifier_epochs=1"]
        ),
        tmp_path / "run",
        quiet=True,
    )
    assert main(["probe", str(run), "--control", "flip", "--values", "0;1", "--num", "10", "--steps", "2"]) == 0
    out = json.loads((run / "probe-flip.json").read_text())
    assert out["values"] == ["0", "1"]
    assert 0 <= out["label_change_rate"] <= 1
    assert out["feature_drift"] >= 0
    assert -1 <= out["flip_effect"] <= 1
    assert len(out["class_agreement"]) == 2
    assert len(out["mirrored_class_agreement"]) == 2 and all(0 <= a <= 1 for a in out["mirrored_class_agreement"])
    # under torchrun the samples are split over the processes: the same figures
    (run / "probe-flip.json").rename(tmp_path / "one.json")
    torchrun = torchrun_command()
    probe = ["-m", "ldmkit.cli", "probe", str(run), "--control", "flip", "--values", "0;1", "--num-images", "10"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(torchrun + probe + ["--steps", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "probe-flip.json").read_text()) == out
    assert (
        main(["probe", str(run), "--control", "crop_size", "--values", "32,32;16,16", "--num", "4"]) == 2
    )  # not embedded: one-line error
    # adherence: sharpness against the requested original size, the ink box against the requested crop
    for control, values in (("original_size", "16,16;32,32"), ("crop_top_left", "0,0;8,8")):
        assert main(["probe", str(run), "--control", control, "--values", values, "--num", "4", "--steps", "2"]) == 0
    size = json.loads((run / "probe-original_size.json").read_text())
    assert len(size["sharpness"]) == 2 and -1 <= size["size_sharpness_correlation"] <= 1
    crop = json.loads((run / "probe-crop_top_left.json").read_text())
    assert len(crop["crop_iou"]) == len(crop["crop_iou_if_ignored"]) == 2


# ---- the mechanisms on every backbone -------------------------------------------------------------------------
PRESETS = {
    "dit": "DiT-tiny/4",
    "pixart": "PixArt-alpha-tiny/4",
    "mmdit": "mmDiT-tiny/4",
    "unet": "UNet-tiny",
    "mdt": "mDT-v2-tiny/4",
}
# The module each backbone feeds its adaLN / time vector into (hooked to see what that vector depends on).
ADALN_INPUT = {
    "dit": "blocks.0.adaLN_modulation",
    "pixart": "t_block",
    "mmdit": "joint_blocks.0.x_block.adaLN_modulation",
    "unet": "down_blocks.0.resnets.0.time_emb_proj",
    "mdt": "en_inblocks.0.adaLN_modulation",
}
TEXT = [
    "text.encoder=minilm",
    "data.name=shards",
    "data.path=x.tar",
    "text.max_length=16",
    "model.max_tokens=16",
    "model.context_dim=384",
    "model.pooled_dim=384",
]


def backbone(name, conditioning, mechanism, *extra):
    overrides = [
        f"model.name={name}",
        f"model.preset={PRESETS[name]}",
        f"model.conditioning={conditioning}",
        f"conditioning.mechanism={mechanism}",
        *(TEXT if conditioning != "class" else []),
        *extra,
    ]
    if mechanism != "published":
        overrides += ["conditioning.control=[original_size, crop_top_left, flip]"]
    return dit(*overrides)[0]


def adaln_vector(model, name, cond, t=0.5):
    seen = []
    handle = model.get_submodule(ADALN_INPUT[name]).register_forward_hook(
        lambda m, args, out: seen.append(args[0].clone())
    )
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.full((2,), t), cond)
    handle.remove()
    return seen[0], out


def control(size=28.0, flip=0.0):
    return {
        "original_size": torch.full((2, 2), size),
        "crop_top_left": torch.zeros(2, 2),
        "flip": torch.full((2, 1), flip),
    }


CASES = [
    (n, "class", m, path)
    for n, paths in {
        "dit": ("adaln", "adaln", "attention"),
        "pixart": ("attention", "adaln", "attention"),
        "mmdit": ("attention", "adaln", "attention"),
        "unet": ("attention", "adaln", "attention"),
        "mdt": ("adaln", "adaln", None),
    }.items()
    for m, path in zip(("published", "additive", "disentangled"), paths)
    if path
]
CASES += [
    ("mmdit", "text", "published", "adaln"),
    ("mmdit", "text", "disentangled", "attention"),
    ("dit", "pooled_text", "additive", "adaln"),
]


@pytest.mark.parametrize("name,conditioning,mechanism,path", CASES, ids=["-".join(c[:3]) for c in CASES])
def test_the_semantic_condition_reaches_the_adaln_vector_only_on_the_adaln_path(name, conditioning, mechanism, path):
    model = randomised(backbone(name, conditioning, mechanism))
    if conditioning == "class":
        conds = [
            Cond(class_labels=torch.tensor([1, 2]), control=control()),
            Cond(class_labels=torch.tensor([1, 3]), control=control()),
        ]
    else:  # the same tokens, another pooled vector for the second sample
        tokens, pooled = torch.randn(2, 16, 384), torch.randn(2, 384)
        conds = [
            Cond(context=tokens, context_mask=torch.ones(2, 16, dtype=torch.bool), pooled=p, control=control())
            for p in (pooled, torch.stack([pooled[0], -pooled[1]]))
        ]
    (a, out_a), (b, out_b) = adaln_vector(model, name, conds[0]), adaln_vector(model, name, conds[1])
    assert torch.equal(a[0], b[0])
    assert torch.equal(out_a[0], out_b[0])  # the first sample's condition is the same
    if conditioning == "text" and path == "attention":
        assert torch.equal(a, b)
        assert torch.equal(out_a, out_b)  # the pooled vector is not used at all
    else:
        assert torch.equal(a[1], b[1]) == (path == "attention")  # semantic in the adaLN vector iff adaln path
        assert not torch.allclose(out_a[1], out_b[1])  # and it reaches the output either way


@pytest.mark.parametrize("name", ["pixart", "mmdit", "unet"])
def test_low_level_control_is_phased_out_on_every_backbone(name):
    model = randomised(
        backbone(name, "class", "disentangled", "conditioning.low_end=0.5", "conditioning.value_scale=0.01")
    )
    cond = lambda size, flip=0.0: Cond(class_labels=torch.tensor([1, 2]), control=control(size, flip))  # noqa: E731
    late, _ = adaln_vector(model, name, cond(28.0), t=0.7)
    assert torch.equal(late, adaln_vector(model, name, cond(900.0), t=0.7)[0])  # t >= end: weight 0
    assert not torch.allclose(
        adaln_vector(model, name, cond(28.0), t=0.2)[0], adaln_vector(model, name, cond(900.0), t=0.2)[0]
    )
    assert not torch.allclose(
        late, adaln_vector(model, name, cond(28.0, flip=1.0), t=0.7)[0]
    )  # high level: constant weight


@pytest.mark.parametrize(
    "name,mechanism",
    [
        ("pixart", "disentangled"),
        ("mmdit", "disentangled"),
        ("unet", "disentangled"),
        ("unet", "additive"),
        ("mdt", "additive"),
    ],
)
@pytest.mark.slow
def test_every_backbone_trains_and_samples_with_controls_and_control_guidance(tmp_path, name, mechanism):
    overrides = (
        TINY
        + CONTROL
        + [
            f"model.name={name}",
            f"model.preset={PRESETS[name]}",
            f"conditioning.mechanism={mechanism}",
            "train.total_images=32",
            "train.checkpoint_every_images=32",
        ]
    )
    run = training_loop(load_config(overrides=overrides), tmp_path / "run", quiet=True)
    state = state_of(run)
    assert state["images_seen"] == 32
    assert any(k.startswith("control_embedder.embedders.flip") for k in state["model"])
    assert (
        main(
            [
                "sample",
                str(run),
                "--steps",
                "2",
                "--classes",
                "1,2",
                "--per-class",
                "1",
                "--grid",
                str(tmp_path / "g.png"),
                "--control",
                "flip=1",
                "--control-guidance",
                "2",
            ]
        )
        == 0
    )
    assert (tmp_path / "g.png").is_file()
    if name != "mdt":  # diffusers has the published conditioning only: a one-line refusal, nothing written
        assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
        assert not (tmp_path / "hf").exists()
