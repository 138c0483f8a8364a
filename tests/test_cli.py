"""The command line: help texts, one-line errors with no traceback, sampling and conversion."""

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_config
from PIL import Image

from ldmkit.cli import build_parser, main
from ldmkit.config import load_config, to_dict
from ldmkit.training.loop import training_loop


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {
        "train",
        "recipe",
        "encode",
        "mnist-shards",
        "reference",
        "report",
        "probe",
        "sample",
        "eval",
        "demo",
        "convert",
        "export",
        "presets",
        "consolidate",
        "plan",
    }
    for name in commands:
        assert main([name, "--help"]) == 0
        assert "usage: ldmkit " + name in capsys.readouterr().out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ldmkit.cli", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_bad_config_key_is_one_line_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  learning_rate: 1\n")
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "unknown config key 'train.learning_rate'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_dataset_folder_is_one_line_error(tmp_path):
    r = run_cli(
        "train",
        "configs/demo/mnist_dit.yaml",
        "--set",
        "data.name=image_folder",
        "--set",
        f"data.path={tmp_path}/nope",
        "--out",
        str(tmp_path / "run"),
    )
    assert r.returncode == 2
    assert "dataset folder not found" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_sample_and_eval_a_run(tmp_path):
    run = training_loop(tiny_config("train.total_images=32"), tmp_path / "run", quiet=True)
    assert (
        main(
            [
                "sample",
                str(run),
                "--classes",
                "3,7",
                "--per-class",
                "2",
                "--steps",
                "2",
                "--grid",
                str(tmp_path / "g.png"),
                "--out",
                str(tmp_path / "imgs"),
            ]
        )
        == 0
    )
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (2 * 33 + 1, 2 * 33 + 1)
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == [
        "000000_class3.png",
        "000001_class3.png",
        "000002_class7.png",
        "000003_class7.png",
    ]
    assert (
        main(["sample", str(run), "--classes", "1,2", "--num", "6", "--steps", "1", "--out", str(tmp_path / "six")])
        == 0
    )
    written = sorted(p.name for p in (tmp_path / "six").iterdir())
    assert len(written) == 7
    assert written[-1] == "grid.png"  # with --out the grid goes beside the images, not over the run's grids
    assert not list((run / "samples").glob("sample-*.png"))
    assert main(["sample", str(run), "--classes", "12"]) == 2
    assert main(["sample", str(tmp_path / "nothing-here")]) == 2


def test_convert_official_layout_to_ldmkit_and_diffusers(tmp_path, capsys):
    import json

    from ldmkit.models.dit import DiT

    official = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        for p in official.parameters():
            p.normal_(0, 0.1)
    torch.save(official.state_dict(), tmp_path / "DiT-test.pt")
    assert (
        main(["convert", str(tmp_path / "DiT-test.pt"), "--num-heads", "2", "--out", str(tmp_path / "model.pt")]) == 0
    )
    state = torch.load(tmp_path / "model.pt", weights_only=False)
    assert state["config"]["model"]["hidden_size"] == 64
    assert state["config"]["model"]["timestep_freq_shift"] == 0.0
    for k, v in official.state_dict().items():
        assert torch.equal(state["ema"][k], v)
    assert main(["convert", str(tmp_path / "model.pt"), "--to", "diffusers", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    # official DiT embeds timesteps with freq shift 0, diffusers with 1: the export measures and says what it costs
    note = json.loads((tmp_path / "hf" / "ldmkit.json").read_text())
    assert any("freq shift 1, this model with 0" in n for n in note["notes"])
    assert note["diffusers_output_gap"] > 1e-4
    assert f"by up to {note['diffusers_output_gap']:.3g}" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=False)
    # the export wrote the run's config beside it (ldmkit_config.yaml): loading it back restores the same model
    assert back["config"] == state["config"]
    for k, v in official.state_dict().items():
        assert torch.equal(back["ema"][k], v), k
    # a plain diffusers folder (no ldmkit config): diffusers' convention, so outputs match diffusers
    (tmp_path / "hf" / "ldmkit_config.yaml").unlink()
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "plain.pt")]) == 0
    plain = torch.load(tmp_path / "plain.pt", weights_only=False)
    assert plain["config"]["model"]["timestep_freq_shift"] == 1.0
    assert all(torch.equal(plain["ema"][k], v) for k, v in official.state_dict().items())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["convert", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "x.pt")]) == 2


@pytest.mark.slow
def test_eval_a_folder_of_images(tmp_path, capsys):
    """`ldmkit eval FOLDER --ref FOLDER`: FD-EffNetLite0 of two image folders; identical folders give ~0."""
    import json

    from ldmkit.data.datasets import mnist_digits
    from ldmkit.eval.generate import save_images

    images, labels = mnist_digits(32)
    save_images(images[::250][:20], tmp_path / "a", list(range(20)), labels[::250][:20])
    save_images(images[1::250][:20], tmp_path / "b", list(range(20)))
    save_images(images[::250][:20], tmp_path / "a_copy", list(range(20)))
    assert main(["eval", str(tmp_path / "a"), "--ref", str(tmp_path / "b"), "--json", str(tmp_path / "ab.json")]) == 0
    assert (
        main(["eval", str(tmp_path / "a"), "--ref", str(tmp_path / "a_copy"), "--json", str(tmp_path / "aa.json")]) == 0
    )
    ab, aa = (json.loads((tmp_path / f).read_text()) for f in ("ab.json", "aa.json"))
    assert ab["num_images"] == 20
    assert ab["fd_reference_count"] == 20
    assert ab["fd_effnetlite0"] > 1.0
    assert abs(aa["fd_effnetlite0"]) < 1e-3
    assert main(["eval", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_version_and_one_grammar_for_run_commands(tmp_path, capsys):
    """--version; sample, eval, probe and export take --config/--set (and a --device) on the run's config."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip().startswith("ldmkit ")
    run = training_loop(tiny_config("train.total_images=16", "train.global_batch=16"), tmp_path / "run", quiet=True)
    # --set changes the recorded config for this command only: a bad key is named, a good one is used
    assert main(["sample", str(run), "--set", "sample.nope=1"]) == 2
    assert "unknown config key 'sample.nope'" in capsys.readouterr().err
    grid = tmp_path / "g.png"
    assert main(["sample", str(run), "--set", "sample.per_class=1", "--steps", "1", "--grid", str(grid)]) == 0
    assert Image.open(grid).size == (33 + 1, 10 * 33 + 1)  # 10 classes x 1 per class: one column
    # --config replaces the recorded config (the same model): here it points sampling at 3 images per class
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**to_dict(load_config(run / "config.yaml")), "sample": {"per_class": 3}}))
    assert main(["sample", str(run), "--config", str(other), "--steps", "1", "--grid", str(grid)]) == 0
    assert Image.open(grid).size == (3 * 33 + 1, 10 * 33 + 1)
    # bf16 autocast for the denoiser (CPU autocast here; the same code path as on a GPU)
    assert main(["sample", str(run), "--set", "sample.precision=bf16", "--steps", "1", "--grid", str(grid)]) == 0
    if not torch.cuda.is_available():
        assert main(["sample", str(run), "--device", "cuda"]) == 2
        assert "--device: 'cuda', but no GPU is visible here" in capsys.readouterr().err
    for command in (["eval", str(run)], ["probe", str(run), "--control", "flip", "--values", "0;1"]):
        assert main([*command, "--set", "sample.nope=1"]) == 2
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--set", "sample.nope=1"]) == 2
    assert not (tmp_path / "hf").exists()
