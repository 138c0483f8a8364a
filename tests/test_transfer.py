"""Transfer (issue 7): positional-embedding resampling, noise-schedule shift with resolution, and
starting a run from another model's weights with a reported rule for every tensor."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, state_of

import ldmkit.data
from ldmkit.config import ConfigError, load_config
from ldmkit.diffusion.objectives import build_objective
from ldmkit.diffusion.schedules import ddpm_betas, shift_log_snr
from ldmkit.models.layers import get_2d_sincos_pos_embed, grid_positions
from ldmkit.models.registry import build_model
from ldmkit.training.loop import training_loop
from ldmkit.transfer.init import InitError, plan_and_apply
from ldmkit.transfer.resample import RESAMPLE_MODES, resample_learned, resample_relative_bias, sincos_table


@pytest.mark.parametrize("mode", RESAMPLE_MODES)
def test_every_resampling_mode_is_the_identity_on_the_same_grid(mode):
    assert np.array_equal(grid_positions(7, 7, mode), np.arange(7))
    assert torch.allclose(
        sincos_table(64, (8, 8), (8, 8), mode)[0], torch.from_numpy(get_2d_sincos_pos_embed(64, 8)).float()
    )
    table = torch.randn(1, 36, 5)
    assert torch.equal(resample_learned(table, (6, 6), (6, 6), mode), table)
    bias = torch.randn(11 * 11 + 3, 4)
    assert torch.equal(resample_relative_bias(bias, 6, 6, mode, extra_rows=3), bias)


def test_rectified_keeps_the_grids_extent_and_the_others_do_not():
    old, new = 8, 16
    rect, interp, extra = (grid_positions(new, old, m) for m in ("rectified", "interpolate", "extrapolate"))
    # cell i of the new grid covers [p - h, p + h] with h = half a new cell in old units; the extents coincide
    half = 0.5 * old / new
    assert rect[0] - half == pytest.approx(-0.5)
    assert rect[-1] + half == pytest.approx(old - 0.5)
    assert rect.mean() == pytest.approx((old - 1) / 2)  # the centre stays the centre
    # interpolate starts at the first cell's centre: its extent and centre shift by half a new cell
    assert interp[0] == 0
    assert interp[0] - half > -0.5
    assert interp.mean() == pytest.approx((old - 1) / 2 + half)
    assert extra[-1] == new - 1  # positions never seen in training
    # a learned table linear in position: rectified resampling keeps its mean (the centre), interpolation shifts it
    rows = torch.arange(old, dtype=torch.float32)
    table = (rows[:, None] + 10 * rows[None, :]).reshape(1, old * old, 1)
    for mode, keeps in (("rectified", True), ("interpolate", False)):
        out = resample_learned(table, (old, old), (new, new), mode)
        assert out.shape == (1, new * new, 1)
        assert (abs(out.mean() - table.mean()) < 1e-4) == keeps
    grown = resample_relative_bias(torch.randn((2 * old - 1) ** 2 + 3, 2), old, new, "rectified", extra_rows=3)
    assert grown.shape == ((2 * new - 1) ** 2 + 3, 2)


def test_the_noise_shift_is_the_identity_at_the_base_resolution_and_adds_noise_at_twice_it():
    betas = ddpm_betas("linear", 1000)
    assert np.array_equal(shift_log_snr(betas, 1.0), betas) or np.allclose(
        shift_log_snr(betas, 1.0), betas, rtol=1e-9, atol=1e-12
    )
    acp, shifted = np.cumprod(1 - betas), np.cumprod(1 - shift_log_snr(betas, 2.0))
    log_snr = lambda a: np.log(a) - np.log1p(-a)  # noqa: E731
    assert np.allclose(log_snr(shifted) - log_snr(acp), -2 * math.log(2), atol=1e-6)  # the documented shift, every step
    base = ["diffusion.shift_base_resolution=32"]
    same = build_objective(load_config(overrides=TINY + base + ["diffusion.objective=ddpm"]))
    assert np.allclose(same.schedule.betas, betas)
    double = build_objective(
        load_config(overrides=TINY + base + ["diffusion.objective=ddpm", "data.resolution=64", "model.input_size=64"])
    )
    assert np.allclose(double.schedule.alphas_cumprod, shifted)
    flow = build_objective(
        load_config(
            overrides=TINY
            + base
            + [
                "diffusion.objective=flow",
                "model.learn_sigma=false",
                "sample.sampler=euler",
                "data.resolution=64",
                "model.input_size=64",
            ]
        )
    )
    assert flow.time_shift == 2.0  # t' = 2t / (1 + t): more noise at every t in (0, 1)
    with pytest.raises(ConfigError, match="shift_base_resolution"):
        load_config(overrides=["diffusion.shift_base_resolution=0"])


def _checkpoint(path, cfg, model):
    torch.save(
        {
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "config": __import__("ldmkit.config", fromlist=["to_dict"]).to_dict(cfg),
            "images_seen": 0,
            "step": 0,
        },
        path,
    )


def test_imagenet22k_classes_are_remapped_to_their_1k_rows_by_wordnet_id():
    from ldmkit.data.datasets import read_class_index

    source_cfg = load_config(overrides=TINY + ["model.num_classes=21841", "data.class_index=imagenet22k"])
    source = build_model(source_cfg.model)
    target_cfg = load_config(
        overrides=TINY + ["model.num_classes=1000", "data.class_index=imagenet1k", "init.class_map=wnid"]
    )
    target = build_model(target_cfg.model)
    fresh = target.y_embedder.embedding_table.weight.detach().clone()
    sd = {k: v + 1.0 for k, v in source.state_dict().items()}  # tell source values from fresh ones
    report = plan_and_apply(
        target, sd, __import__("ldmkit.config", fromlist=["to_dict"]).to_dict(source_cfg), target_cfg
    )
    old, new = sd["y_embedder.embedding_table.weight"], target.y_embedder.embedding_table.weight
    i22k, i1k = read_class_index("imagenet22k"), read_class_index("imagenet1k")
    # the shipped 1k -> 22k mapping (data for users and other tools) is the one the wnid lists give
    shipped = [
        line.split("\t")
        for line in (Path(ldmkit.data.__file__).parent / "index" / "imagenet1k_to_22k.tsv").read_text().splitlines()
        if line and not line.startswith("#")
    ][1:]
    assert [(int(a), w, b) for a, w, b in shipped] == [
        (row, wnid, str(i22k.get(wnid, "-"))) for wnid, row in i1k.items()
    ]
    for id_1k, wnid, id_22k in shipped:
        if id_22k != "-":
            assert torch.equal(new[int(id_1k)], old[int(id_22k)])
        else:  # n04399382, teddy bear, is not in the fall-2011 22k release: it starts fresh
            assert wnid == "n04399382"
            assert torch.equal(new[int(id_1k)], fresh[int(id_1k)])
    assert torch.equal(new[-1], old[-1])  # the null class
    entry = next(e for e in report if e["tensor"] == "y_embedder.embedding_table.weight")
    assert entry["action"] == "remapped"
    assert "999 of 1000" in entry["why"]
    assert entry["source_shape"] == [21842, 64]
    with pytest.raises(InitError, match="set init.class_map: wnid"):
        plan_and_apply(
            build_model(target_cfg.model), sd, None, load_config(overrides=TINY + ["model.num_classes=1000"])
        )


@pytest.mark.slow
def test_a_run_starts_from_a_lower_resolution_run_and_reports_every_tensor(tmp_path):
    small = training_loop(
        load_config(overrides=TINY + ["model.input_size=16", "data.resolution=16", "train.total_images=32"]),
        tmp_path / "small",
        quiet=True,
    )
    big = TINY + [
        "train.total_images=32",
        "model.pos_embed_base_size=16",
        "model.pos_embed_resample=rectified",
        f"init.source={small}",
    ]
    run = training_loop(load_config(overrides=big), tmp_path / "big", quiet=True)
    report = json.loads((run / "init.json").read_text())["tensors"]
    model_keys = set(state_of(run)["model"])
    assert {e["tensor"] for e in report} == model_keys  # every tensor has an entry
    actions = {e["tensor"]: e["action"] for e in report}
    assert actions.pop("pos_embed") == "recomputed"
    assert set(actions.values()) == {"loaded"}
    # `ldmkit report` shows where each run's weights came from and its transfer settings
    from ldmkit.eval.compare import run_summary

    rows = {r["folder"]: r for r in (run_summary(small), run_summary(run))}
    assert (rows[str(small)]["init"], rows[str(small)]["positions"], rows[str(small)]["noise_shift"]) == ("-", "-", "-")
    assert (rows[str(run)]["init"], rows[str(run)]["positions"]) == (str(small), "rectified from 16")
    # a mismatch no rule covers is an error naming the tensor
    with pytest.raises(
        InitError, match=r"'x_embedder.proj.weight' has shape \[64, 1, 4, 4\] in the source and \[96, 1, 4, 4\] here"
    ):
        training_loop(
            load_config(overrides=big + ["model.hidden_size=96", "model.num_heads=3"]), tmp_path / "other", quiet=True
        )


@pytest.mark.slow
def test_mdt_learned_tables_and_relative_biases_are_resampled(tmp_path):
    mdt = ["model.name=mdt", "model.preset=mDT-v2-tiny/4"]
    small = training_loop(
        load_config(overrides=TINY + mdt + ["model.input_size=16", "data.resolution=16", "train.total_images=32"]),
        tmp_path / "small",
        quiet=True,
    )
    run = training_loop(
        load_config(
            overrides=TINY + mdt + ["train.total_images=32", f"init.source={small}", "init.pos_embed=rectified"]
        ),
        tmp_path / "big",
        quiet=True,
    )
    report = {e["tensor"]: e for e in json.loads((run / "init.json").read_text())["tensors"]}
    assert report["pos_embed"]["action"] == "resampled"
    assert report["pos_embed"]["source_shape"][1] == 16
    assert report["en_inblocks.0.attn.rel_pos_bias.relative_position_bias_table"]["action"] == "resampled"
    assert report["en_inblocks.0.attn.rel_pos_bias.relative_position_index"]["action"] == "recomputed"


@pytest.mark.slow
def test_class_to_text_transfer_replaces_the_class_embedder(tmp_path):
    from ldmkit.data.shards import write_mnist_caption_shards

    classes = training_loop(
        load_config(overrides=TINY + ["conditioning.mechanism=disentangled", "train.total_images=32"]),
        tmp_path / "class",
        quiet=True,
    )
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
        "train.total_images=32",
        f"init.source={classes}",
    ]
    with pytest.raises(InitError, match="'context_embedder.weight' of this model is not in the source"):
        training_loop(load_config(overrides=text), tmp_path / "refused", quiet=True)
    run = training_loop(load_config(overrides=text + ["init.semantic=replace"]), tmp_path / "text", quiet=True)
    report = {e["tensor"]: e["action"] for e in json.loads((run / "init.json").read_text())["tensors"]}
    assert report["y_embedder.embedding_table.weight"] == "dropped"
    assert report["context_embedder.weight"] == "fresh"
    assert report["blocks.0.cross_attn.kv_linear.weight"] == "loaded"  # the attention path is kept


@pytest.mark.parametrize(
    "name,preset", [("dit", "DiT-tiny/4"), ("pixart", "PixArt-alpha-tiny/4"), ("mmdit", "mmDiT-tiny/4")]
)
def test_fixed_tables_measure_positions_on_the_base_grid(name, preset):
    from ldmkit.models.layers import sincos_2d

    arch = TINY + [f"model.name={name}", f"model.preset={preset}"]
    default = build_model(load_config(overrides=arch).model).pos_embed
    same = build_model(
        load_config(overrides=arch + ["model.pos_embed_base_size=32", "model.pos_embed_resample=rectified"]).model
    ).pos_embed
    assert torch.allclose(same, default, atol=1e-6)  # the base grid is the model's own: the published table
    moved = build_model(
        load_config(overrides=arch + ["model.pos_embed_base_size=16", "model.pos_embed_resample=rectified"]).model
    )
    positions = grid_positions(8, 4, "rectified")  # 8x8 tokens measured on the 4x4 grid of a 16-pixel input
    expected = torch.from_numpy(sincos_2d(64, positions, positions)).float()
    assert torch.allclose(moved.pos_embed[0], expected, atol=1e-6)
    with pytest.raises(ConfigError, match="unet has no fixed positional table"):
        build_model(
            load_config(
                overrides=TINY + ["model.name=unet", "model.preset=UNet-tiny", "model.pos_embed_base_size=16"]
            ).model
        )


RECIPES = sorted(__import__("pathlib").Path(__file__).resolve().parents[1].glob("configs/recipes/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_transition_is_covered_by_the_init_rules(path, tmp_path):
    """Each stage of the shipped recipes, at the tiny size of its backbone, starts from the previous stage's weights."""
    from ldmkit.config import to_dict
    from ldmkit.training.recipe import read_recipe, stage_configs

    stages = stage_configs(read_recipe(path), tmp_path, ["model.preset=mmDiT-tiny/2"])
    previous = None
    for name, cfg, _ in stages:
        model = build_model(cfg.model, cfg.conditioning)
        if previous is not None:
            report = plan_and_apply(model, previous[1].state_dict(), to_dict(previous[0]), cfg)
            assert {e["action"] for e in report} <= {"loaded", "recomputed", "remapped", "fresh", "dropped"}
            assert sum(e["action"] == "loaded" for e in report) > 0.9 * len(report)  # the backbone carries over
        previous = (cfg, model)


@pytest.mark.slow
def test_a_recipe_resumes_at_the_right_stage(tmp_path):
    import yaml

    from ldmkit.checkpoint import latest_checkpoint
    from ldmkit.training.recipe import run_recipe

    base = {
        "name": "digits",
        "model": {"preset": "DiT-tiny/4", "in_channels": 1, "num_classes": 10},
        "train": {"global_batch": 16, "total_images": 64, "log_every_images": 32, "checkpoint_every_images": 32},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    recipe = {
        "name": "two-stages",
        "stages": [
            {
                "name": "small",
                "config": str(tmp_path / "base.yaml"),
                "set": ["model.input_size=16", "data.resolution=16", "data.crop=random_resized"],
            },
            {
                "name": "large",
                "config": str(tmp_path / "base.yaml"),
                "init": "small",
                "set": [
                    "model.pos_embed_base_size=16",
                    "model.pos_embed_resample=rectified",
                    "diffusion.shift_base_resolution=16",
                ],
            },
        ],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "runs"
    # an interrupted first stage
    small_cfg = load_config(
        tmp_path / "base.yaml", ["model.input_size=16", "data.resolution=16", "data.crop=random_resized"]
    )
    training_loop(small_cfg, out / "small", quiet=True, stop_after_images=32)
    logged = []
    run_recipe(tmp_path / "recipe.yaml", out, log=logged.append)
    assert logged == [
        "stage 1/2 small: training in " + str(out / "small"),
        "stage 2/2 large: training in " + str(out / "large"),
    ]
    assert state_of(out / "small")["images_seen"] == 64
    assert state_of(out / "large")["images_seen"] == 64
    init = json.loads((out / "large" / "init.json").read_text())
    assert init["source"] == str(out / "small")
    # crop strategy per stage: each stage trained with its own
    crops = {
        stage: yaml.safe_load((out / stage / "config.yaml").read_text())["data"]["crop"] for stage in ("small", "large")
    }
    assert crops == {"small": "random_resized", "large": "center"}
    last = latest_checkpoint(out / "large").stat().st_mtime
    logged.clear()
    run_recipe(tmp_path / "recipe.yaml", out, log=logged.append)  # everything done: nothing trains again
    assert all(line.endswith(")") and ": done (" in line for line in logged)
    assert latest_checkpoint(out / "large").stat().st_mtime == last
    bad = dict(recipe, stages=[dict(recipe["stages"][1], init="nowhere")])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="init 'nowhere' is neither an earlier stage nor an existing path"):
        run_recipe(tmp_path / "bad.yaml", out)


@pytest.mark.slow
def test_init_from_imported_weights_official_and_diffusers(tmp_path):
    from ldmkit.cli import main

    run = training_loop(load_config(overrides=TINY + ["train.total_images=32"]), tmp_path / "src", quiet=True)
    ema = state_of(run)["ema"]
    torch.save(ema, tmp_path / "official.pt")  # facebookresearch/DiT's layout: a bare state dict with the same names
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    for source in (tmp_path / "official.pt", tmp_path / "hf"):
        out = training_loop(
            load_config(overrides=TINY + ["train.total_images=16", f"init.source={source}"]),
            tmp_path / f"from-{source.stem}",
            quiet=True,
        )
        report = {e["tensor"]: e["action"] for e in json.loads((out / "init.json").read_text())["tensors"]}
        assert len(report) == len(ema)
        assert report.pop("pos_embed") == ("loaded" if source.suffix else "recomputed")
        assert set(report.values()) == {"loaded"}
    demo = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "demo" / "mnist_dit.yaml")
    assert main(["train", demo, "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # refused before the run folder is written
