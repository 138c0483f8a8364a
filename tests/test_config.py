from pathlib import Path

import pytest

from ldmkit.config import ConfigError, RunConfig, build, dump_config, load_config, parse_override, to_dict


def test_defaults_and_overrides():
    cfg = load_config(
        overrides=[
            "train.lr=3e-4",
            "train.betas=[0.9, 0.95]",
            "train.grad_clip=null",
            "model.preset=DiT-B/4",
            "train.total_images=1e6",
        ]
    )
    assert cfg.train.lr == 3e-4
    assert cfg.train.betas == [0.9, 0.95]
    assert cfg.train.grad_clip is None
    assert cfg.model.preset == "DiT-B/4"
    assert cfg.train.total_images == 1_000_000
    assert isinstance(cfg.train.total_images, int)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("bogus.x=1", "unknown config key 'bogus'"),
        ("train.lr=fast", "config key 'train.lr': expected float"),
        ("train.total_images=1.5", "config key 'train.total_images': expected int"),
        ("train.compile=3", "config key 'train.compile': expected bool"),
        ("train.betas=0.9", "config key 'train.betas': expected a list"),
        ("diffusion.objective=score", "config key 'diffusion.objective'"),
        ("train", "not of the form key.sub=value"),
    ],
)
def test_bad_keys_and_types_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  preset: DiT-S/2\n  deptth: 3\n")
    with pytest.raises(ConfigError, match="'model.deptth'"):
        load_config(nested)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="sample.sampler"):
        load_config(overrides=["diffusion.objective=flow", "model.learn_sigma=false"])
    with pytest.raises(ConfigError, match="learn_sigma"):
        load_config(overrides=["diffusion.objective=flow", "sample.sampler=euler"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["train.lr=0.002", "sample.classes=[1, 2]"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert build(RunConfig, to_dict(cfg)) == cfg


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted(p for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml") if p.parent.name != "recipes")
    assert configs, "no configs found"
    for path in configs:
        load_config(path)
    with pytest.raises(ConfigError, match="is a recipe .*: run it with `ldmkit recipe"):
        load_config(Path(__file__).parents[1] / "configs" / "recipes" / "in1k_256_to_512.yaml")


def test_override_values_are_yaml():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=some text") == (["a"], "some text")


def test_base_inheritance_merges_sections_and_replaces_values(tmp_path):
    from ldmkit.config import ConfigError, load_config

    (tmp_path / "a.yaml").write_text("name: a\ntrain:\n  lr: 0.5\n  betas: [0.1, 0.2]\nsample:\n  steps: 7\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nname: b\ntrain:\n  betas: [0.9, 0.95]\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\nsample:\n  steps: 9\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.global_batch=8"])
    assert cfg.name == "b"  # from the nearer base
    assert cfg.train.lr == 0.5  # a section key the child does not give: kept from the base
    assert cfg.train.betas == [0.9, 0.95]  # a list is replaced, not merged
    assert cfg.sample.steps == 9  # the child wins
    assert cfg.train.global_batch == 8  # --set still applies last
    (tmp_path / "loop1.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop1.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop1.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="its base missing.yaml was not found"):
        load_config(tmp_path / "orphan.yaml")


def test_shipped_512_configs_are_short_diffs_of_their_256_configs():
    from ldmkit.config import diff_configs, load_config, to_dict

    root = Path(__file__).resolve().parents[1] / "configs"
    for data in ("imagenet", "cc12m"):
        text = (root / f"{data}512" / "proposed_xl2.yaml").read_text()
        assert f"base: ../{data}256/proposed_xl2.yaml" in text
        changed = diff_configs(
            to_dict(load_config(root / f"{data}256" / "proposed_xl2.yaml")),
            to_dict(load_config(root / f"{data}512" / "proposed_xl2.yaml")),
        )
        assert {"model.input_size", "data.resolution", "diffusion.shift_base_resolution"} <= set(changed), changed
        assert len(changed) <= 8, changed
