"""The training loop: exact resume (also after a real SIGKILL), DDP equivalence, refusals that lose nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY, free_port, state_of, tiny_config, torchrun_command

from ldmkit.checkpoint import CheckpointError
from ldmkit.config import ConfigError
from ldmkit.data.loader import batch_indices
from ldmkit.training.loop import training_loop


def assert_same_weights(a, b, atol=0.0):
    for key in ("model", "ema"):
        for name, value in a[key].items():
            if atol == 0.0:
                assert torch.equal(value, b[key][name]), f"{key}.{name} differs"
            else:
                assert torch.allclose(value, b[key][name], atol=atol, rtol=0), (
                    f"{key}.{name} differs by {(value - b[key][name]).abs().max()}"
                )


@pytest.mark.slow
def test_loss_falls_and_outputs_exist(tmp_path):
    cfg = tiny_config(
        "train.total_images=1024",
        "train.log_every_images=128",
        "train.checkpoint_every_images=512",
        "train.sample_every_images=512",
    )
    run = training_loop(cfg, tmp_path / "run", quiet=True)
    import json

    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[-1]["images"] == 1024
    assert len(records) == 8
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [
        "ckpt-0000000512.pt",
        "ckpt-0000000512.pt.sha256",
        "ckpt-0000001024.pt",
        "ckpt-0000001024.pt.sha256",
    ]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["grid-0000000512.png", "grid-0000001024.png"]
    assert all(r["memory_gb"] > 0 and r["images_per_s"] > 0 and r["grad_norm"] > 0 for r in records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for scalar in ("loss", "mse", "lr", "grad_norm", "images_per_s", "memory_gb"):
        assert scalar in tags["scalars"], scalar
    assert "time" not in tags["scalars"]  # a wall-clock stamp is not a curve
    assert [e.step for e in events.Images("samples")] == [512, 1024]  # the sample grids
    assert "config/text_summary" in tags["tensors"]  # the resolved config, as text


@pytest.mark.slow
def test_bf16_autocast_trains(tmp_path):
    run = training_loop(tiny_config("train.precision=bf16", "train.total_images=64"), tmp_path / "run", quiet=True)
    state = state_of(run)
    assert state["images_seen"] == 64
    assert all(
        v.dtype == torch.float32 and torch.isfinite(v).all() for v in state["model"].values()
    )  # master weights stay fp32


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    from ldmkit.conditioning.cond import Cond
    from ldmkit.models.dit import DiT
    from ldmkit.training.parallel import compile_blocks

    torch.manual_seed(0)
    eager = DiT(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=10,
        learn_sigma=False,
    )
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0, 0.1)
    compiled = DiT(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=10,
        learn_sigma=False,
    )
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    x, t, c = torch.randn(2, 1, 8, 8), torch.rand(2), Cond(class_labels=torch.tensor([1, 2]))
    assert torch.allclose(compiled(x, t, c), eager(x, t, c), atol=1e-5)


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    cfg = tiny_config()
    straight = training_loop(cfg, tmp_path / "straight", quiet=True)
    split = tmp_path / "split"
    training_loop(cfg, split, stop_after_images=64, quiet=True)
    assert state_of(split)["images_seen"] == 64
    training_loop(cfg, split, quiet=True)  # the same call again resumes
    assert state_of(split)["images_seen"] == 128
    assert_same_weights(state_of(straight), state_of(split))


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    """A real kill in the middle of a run, then the same command again."""
    config = tmp_path / "c.yaml"
    config.write_text("name: kill\n")

    def command(out):
        cmd = [sys.executable, "-m", "ldmkit.cli", "train", str(config), "--out", str(tmp_path / out)]
        for o in TINY + ["train.total_images=800", "train.checkpoint_every_images=80", "train.keep_checkpoints=20"]:
            cmd += ["--set", o]
        return cmd

    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same threads for both runs: the same float reductions
    proc = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "killed" / "checkpoints").glob("ckpt-*.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = state_of(tmp_path / "killed")["images_seen"]
    assert 0 < partial < 800, "the kill should land mid-run"
    assert subprocess.run(command("killed"), env=env, capture_output=True).returncode == 0
    assert subprocess.run(command("straight"), env=env, capture_output=True).returncode == 0
    assert state_of(tmp_path / "killed")["images_seen"] == 800
    assert_same_weights(state_of(tmp_path / "straight"), state_of(tmp_path / "killed"))


def _ddp_worker(rank, world, port, run_dir, overrides):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    training_loop(tiny_config(*overrides), run_dir, quiet=True)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    overrides = ["train.micro_batch=4"]  # 1 process: 4 accumulation rounds; 2 processes: 2 rounds each
    single = training_loop(tiny_config(*overrides), tmp_path / "single", quiet=True)
    port = free_port()
    mp.start_processes(
        _ddp_worker, args=(2, port, str(tmp_path / "ddp"), overrides), nprocs=2, join=True, start_method="fork"
    )
    assert_same_weights(state_of(single), state_of(tmp_path / "ddp"), atol=2e-6)


@pytest.mark.slow
def test_data_workers_give_the_same_run(tmp_path):
    a = training_loop(tiny_config("train.total_images=64"), tmp_path / "a", quiet=True)
    b = training_loop(tiny_config("train.total_images=64", "data.num_workers=2"), tmp_path / "b", quiet=True)
    assert_same_weights(state_of(a), state_of(b))


@pytest.mark.slow
def test_torchrun_launch_equals_one_process(tmp_path):
    """The documented launch: torchrun --nproc_per_node 2 -m ldmkit.cli train CONFIG (gloo on the CPU)."""
    config = tmp_path / "c.yaml"
    config.write_text("name: torchrun\n")
    sets = [a for o in TINY + ["train.total_images=64", "train.micro_batch=8"] for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = torchrun_command()
    r = subprocess.run(
        torchrun + ["-m", "ldmkit.cli", "train", str(config), "--out", str(tmp_path / "ddp")] + sets,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "ldmkit.cli", "train", str(config), "--out", str(tmp_path / "one")] + sets,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(state_of(tmp_path / "one"), state_of(tmp_path / "ddp"), atol=2e-6)


def test_ema_half_life_and_warmup():
    from ldmkit.training.state import ema_beta

    cfg = tiny_config("train.ema_halflife_images=1000", "train.ema_rampup=0.5", "train.global_batch=10")
    # after one half-life of images the old EMA keeps half its weight
    assert abs(ema_beta(cfg, 10**6) ** (1000 / 10) - 0.5) < 1e-9
    # ramp-up: early on the half-life is images_seen * rampup (here 50 images at 100 seen)
    assert abs(ema_beta(cfg, 100) ** (50 / 10) - 0.5) < 1e-9
    assert ema_beta(cfg, 0) == 0.0  # the EMA starts as a copy
    assert ema_beta(tiny_config(), 10**6) == 0.9999  # DiT's per-step decay when no half-life is set


@pytest.mark.slow
def test_learning_rate_warms_up_linearly(tmp_path):
    import json

    run = training_loop(
        tiny_config("train.warmup_images=64", "train.lr=0.001", "train.total_images=128"), tmp_path / "run", quiet=True
    )
    lrs = [json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.0005, 0.001, 0.001, 0.001])  # logged every 32 images


def test_global_batch_must_divide(tmp_path):
    with pytest.raises(ConfigError, match="global_batch"):
        training_loop(tiny_config("train.micro_batch=5"), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_batch_indices_cover_each_epoch_once():
    idx = batch_indices(10, seed=3, start=0, count=20)
    assert sorted(idx[:10]) == list(range(10))
    assert sorted(idx[10:]) == list(range(10))
    assert list(batch_indices(10, 3, 7, 6)) == list(idx[7:13])


@pytest.mark.slow
def test_refuses_run_dir_of_another_config(tmp_path):
    training_loop(tiny_config("train.total_images=32"), tmp_path / "run", quiet=True)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="differs at: train.lr"):
        training_loop(tiny_config("train.total_images=32", "train.lr=0.5"), tmp_path / "run", quiet=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    # a longer run, or other sampling/eval/logging settings, is the same training: it resumes
    training_loop(
        tiny_config(
            "train.total_images=48", "sample.guidance_scale=4", "eval.num_images=7", "train.log_every_images=16"
        ),
        tmp_path / "run",
        quiet=True,
    )
    assert state_of(tmp_path / "run")["images_seen"] == 48


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    training_loop(tiny_config("train.total_images=32"), tmp_path / "run", quiet=True)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        training_loop(
            tiny_config("train.total_images=64", "model.hidden_size=32"),
            tmp_path / "run",
            allow_config_change=True,
            quiet=True,
        )


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["for_loop", "fused"])  # the host-side guard, and the step skipped on the device
def test_nan_guard_stops_a_diverging_run(tmp_path, impl):
    from ldmkit.training.signals import TrainingDiverged

    overrides = ("train.lr=1e30", "train.total_images=320", "train.max_nan_skips=1", "train.grad_clip=null")
    with pytest.raises(TrainingDiverged, match="diverged at [0-9]+ images \\(2 consecutive steps with non-finite"):
        training_loop(tiny_config(*overrides, f"train.optimizer_impl={impl}"), tmp_path / "run", quiet=True)


@pytest.mark.slow
def test_a_failed_start_does_not_block_the_corrected_config(tmp_path):
    from ldmkit.data.datasets import DataError

    with pytest.raises(DataError, match="no latent cache"):
        training_loop(
            tiny_config("data.from_cache=true", f"data.cache={tmp_path / 'missing'}"), tmp_path / "run", quiet=True
        )
    run = training_loop(tiny_config("train.total_images=32"), tmp_path / "run", quiet=True)  # no checkpoint to protect
    assert state_of(run)["images_seen"] == 32


@pytest.mark.slow
def test_weights_and_biases_logging(tmp_path, monkeypatch, capsys):
    """train.wandb: the run's scalars and grids go to wandb (a stand-in module records the calls); a resumed run
    continues the same wandb run; without the package, one line before anything is written."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw))
    fake.log = lambda data, step: calls.append(("log", step, sorted(data)))
    fake.finish = lambda: calls.append(("finish",))
    fake.Image = lambda pixels: ("image", pixels.shape)
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_config(
        "train.total_images=64",
        "train.log_every_images=32",
        "train.sample_every_images=64",
        "train.wandb={project: ldmkit-tests, mode: offline}",
    )
    run = training_loop(cfg, tmp_path / "run", stop_after_images=32, quiet=True)
    init = calls[0]
    assert init[0] == "init"
    assert init[1]["project"] == "ldmkit-tests"
    assert init[1]["mode"] == "offline"
    assert init[1]["id"] == "abc123"
    assert init[1]["config"]["train"]["wandb"]["project"] == "ldmkit-tests"
    logged = [c for c in calls if c[0] == "log"]
    assert logged[0][1] == 32
    assert "grad_norm" in logged[0][2]
    assert "loss" in logged[0][2]
    assert calls[-1] == ("finish",)
    calls.clear()
    training_loop(cfg, run, quiet=True)  # resumes: the same wandb run id, then the grid at 64 images
    assert calls[0][1]["id"] == "abc123"
    assert ("log", 64, ["samples"]) in calls
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="needs the wandb package"):
        training_loop(cfg, tmp_path / "other", quiet=True)
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_fp8_training_converts_the_block_linears_and_follows_bf16(tmp_path, monkeypatch):
    """train.precision fp8 (torchao float8 training, run here on the CPU's float8 matmuls): the blocks' Linear layers
    become Float8Linear, the rest stays, the losses follow a bf16 run of the same seed, and the checkpoint is plain
    fp32 weights that sample without torchao."""
    pytest.importorskip("torchao")
    import ldmkit.training.parallel as parallel
    from ldmkit.eval.evaluate import load_generator

    converted = []
    real = parallel.apply_float8
    monkeypatch.setattr(parallel, "apply_float8", lambda model: converted.append(real(model)) or converted[-1])
    losses = {}
    for precision in ("bf16", "fp8"):
        cfg = tiny_config(f"train.precision={precision}", "train.total_images=64", "train.log_every_images=16")
        run = training_loop(cfg, tmp_path / precision, quiet=True)
        losses[precision] = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert converted == [2 * 4]  # 2 blocks x (qkv, proj, fc1, fc2); the adaLN, embedders and final layer stay
    assert len(losses["fp8"]) == len(losses["bf16"]) == 4
    for a, b in zip(losses["fp8"], losses["bf16"]):
        assert abs(a - b) <= 0.05 * abs(b)
    assert losses["fp8"] != losses["bf16"]  # float8 matmuls, not bf16 ones
    cfg, model, *_ = load_generator(tmp_path / "fp8")
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ConfigError, match="fp8 needs torchao"):
        monkeypatch.setitem(sys.modules, "torchao.float8", None)
        real(torch.nn.Linear(16, 16))
