"""Safe by default: no code runs from a weights file, nothing non-finite is saved, resume finds the good state,
stop signals checkpoint first, bad input is one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY, free_port, state_of, tiny_config
from PIL import Image

from ldmkit.checkpoint import (
    UnsafeFileError,
    atomic_save,
    checksum_path,
    latest_checkpoint,
    list_checkpoints,
    load_file,
    newest_intact_checkpoint,
)
from ldmkit.cli import main
from ldmkit.training.loop import training_loop


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line_error(capsys, code, expected=2):
    """The error: stderr's last line (status lines may precede it), and no traceback anywhere."""
    err = capsys.readouterr().err.strip()
    assert code == expected, err
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("ldmkit ")
    assert "error" in last, err
    return last


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    return training_loop(
        tiny_config("train.total_images=32", "train.checkpoint_every_images=16"), root / "run", quiet=True
    )


@pytest.fixture
def poisoned(trained, tmp_path):
    """Every kind of weights file a user may be handed, each with a pickled payload."""
    marker = tmp_path / "marker"
    evil = Payload(marker)
    state = dict(state_of(trained), payload=evil)
    files = {"marker": marker}
    files["ckpt"] = tmp_path / "evil.pt"
    atomic_save(state, files["ckpt"])  # with a correct checksum: only the unpickling guard stands in the way
    run = tmp_path / "evil-run"
    shutil.copytree(trained, run)
    for path in list_checkpoints(run):
        atomic_save(state, path)
    files["run"] = run
    files["official"] = tmp_path / "DiT-official.pt"
    torch.save(dict(state["ema"], payload=evil), files["official"])
    files["bin_folder"] = tmp_path / "diffusers-dit"
    files["bin_folder"].mkdir()
    (files["bin_folder"] / "config.json").write_text(
        json.dumps({"_class_name": "DiTTransformer2DModel", "sample_size": 32})
    )
    torch.save(
        {"transformer_blocks.0.attn1.to_q.weight": torch.zeros(2, 2), "payload": evil},
        files["bin_folder"] / "diffusion_pytorch_model.bin",
    )
    files["inception"] = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save({"payload": evil}, files["inception"])
    # The payload is real: full unpickling runs it.
    torch.load(files["inception"], weights_only=False)
    assert marker.exists()
    marker.unlink()
    return files


@pytest.mark.slow
def test_a_pickled_payload_runs_through_no_user_facing_path(poisoned, tmp_path, capsys):
    f, marker = poisoned, poisoned["marker"]
    config = tmp_path / "c.yaml"
    config.write_text("name: victim\n")
    sets = [a for o in TINY for a in ("--set", o)]
    calls = {
        "sample FILE": ["sample", str(f["ckpt"]), "--steps", "1"],
        "sample RUN": ["sample", str(f["run"]), "--steps", "1"],
        "train --init (ldmkit)": ["train", str(config), "--out", str(tmp_path / "a"), "--init", str(f["ckpt"])] + sets,
        "train --init (run)": ["train", str(config), "--out", str(tmp_path / "b"), "--init", str(f["run"])] + sets,
        "train --init (official .pt)": [
            "train",
            str(config),
            "--out",
            str(tmp_path / "c"),
            "--init",
            str(f["official"]),
        ]
        + sets,
        "convert .pt": ["convert", str(f["official"]), "--out", str(tmp_path / "d.pt")],
        "convert .bin folder": ["convert", str(f["bin_folder"]), "--out", str(tmp_path / "e.pt")],
        "resume": ["train", str(f["run"])],
        "export": ["export", str(f["run"]), "--out", str(tmp_path / "f")],
        "eval": ["eval", str(f["ckpt"]), "--num", "2", "--metrics", "none"],
        "report": ["report", str(f["run"]), "--out", str(tmp_path / "g")],
        "probe": ["probe", str(f["run"]), "--control", "flip", "--values", "0;1", "--num", "1"],
        "reference --weights": [
            "reference",
            str(tmp_path),
            "--out",
            str(tmp_path / "h.npz"),
            "--weights",
            str(f["inception"]),
        ],
    }
    for name, argv in calls.items():
        err = one_line_error(capsys, main(argv))
        assert not marker.exists(), f"{name} ran the payload"
        assert "full unpickling" in err or "no usable checkpoint" in err, f"{name}: {err}"
    # The Python API's loaders: the EfficientNet-Lite0 and Inception weights, any weights file.
    from ldmkit.eval.features import EffNetLite0Features, InceptionV3Features

    for load in (
        lambda: EffNetLite0Features(str(f["inception"])),
        lambda: InceptionV3Features(str(f["inception"])),
        lambda: load_file(f["ckpt"]),
    ):
        with pytest.raises(UnsafeFileError, match="full unpickling"):
            load()
        assert not marker.exists()


def test_trust_pickle_is_an_explicit_loud_opt_in(trained, tmp_path, capsys):
    import argparse

    # A published training script's checkpoint with its argparse arguments loads safely (a plain container).
    sd = state_of(trained)["ema"]
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "dit-train.pt")
    assert main(["convert", str(tmp_path / "dit-train.pt"), "--out", str(tmp_path / "a.pt")]) == 0
    # An object of another class is refused by default and read only with --trust-pickle, with a warning.
    torch.save({"model": sd, "extra": Image.new("L", (1, 1))}, tmp_path / "old.pt")
    one_line_error(capsys, main(["convert", str(tmp_path / "old.pt"), "--out", str(tmp_path / "b.pt")]))
    assert main(["convert", str(tmp_path / "old.pt"), "--out", str(tmp_path / "b.pt"), "--trust-pickle"]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert load_file(tmp_path / "b.pt")["ema"].keys() == sd.keys()  # the rewritten file is plain weights


@pytest.mark.slow
def test_divergence_saves_nothing_non_finite_and_names_the_last_good_checkpoint(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("name: diverge\n")
    sets = [a for o in TINY + ["train.checkpoint_every_images=32", "train.keep_checkpoints=1"] for a in ("--set", o)]
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--stop-after", "64"] + sets) == 0
    capsys.readouterr()
    # A huge learning rate: the first update makes the weights enormous, the next forward pass non-finite.
    err = one_line_error(
        capsys, main(["train", str(run), "--resume", "--set", "train.lr=1e30", "--set", "train.max_nan_skips=0"])
    )
    assert "training diverged at 80 images (1 consecutive steps with non-finite gradients)" in err
    assert "ckpt-0000000064.pt" in err
    assert f"ldmkit train {run} --resume --set train.lr=" in err
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-0000000064.pt"]  # the good one was not pruned
    # Sampling refuses non-finite weights and a non-finite guidance scale.
    bad = dict(state_of(run))
    bad["ema"] = {k: v * float("nan") for k, v in bad["ema"].items()}
    atomic_save(bad, tmp_path / "nan.pt")
    assert "non-finite" in one_line_error(capsys, main(["sample", str(tmp_path / "nan.pt"), "--steps", "1"]))
    assert "finite number" in one_line_error(capsys, main(["sample", str(run), "--guidance", "nan"]))


@pytest.mark.slow
def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """Weights an update made non-finite (gradients fine) stop the run at the next log or checkpoint."""
    import ldmkit.training.loop as loop
    from ldmkit.training.signals import TrainingDiverged

    build = loop.build_optimizer

    def poisoning_optimizer(params, tc, *args):
        optimizer = build(params, tc, *args)
        step = optimizer.step

        def poisoned_step(*args, **kwargs):
            out = step(*args, **kwargs)
            if optimizer.state and next(iter(optimizer.state.values()))["step"] >= 5:  # from the 5th update on
                next(p for g in optimizer.param_groups for p in g["params"]).data.fill_(float("inf"))
            return out

        optimizer.step = poisoned_step
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", poisoning_optimizer)
    cfg = tiny_config(
        "train.total_images=160",
        "train.checkpoint_every_images=32",
        "train.log_every_images=64",
        "train.keep_checkpoints=1",
    )
    with pytest.raises(TrainingDiverged, match=r"at 96 images \([\d,]+ non-finite weights\).*ckpt-0000000064\.pt"):
        training_loop(cfg, tmp_path / "run", quiet=True)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt-0000000064.pt"]
    assert all(torch.isfinite(v).all() for k in ("model", "ema") for v in state_of(tmp_path / "run")[k].values())


@pytest.mark.slow
def test_resume_skips_a_corrupt_truncated_or_incomplete_newest_checkpoint(tmp_path, capsys):
    cfg = tiny_config("train.total_images=96", "train.checkpoint_every_images=32", "train.keep_checkpoints=5")
    straight = training_loop(cfg, tmp_path / "straight", quiet=True)
    run = tmp_path / "run"
    training_loop(cfg, run, stop_after_images=64, quiet=True)
    newest = list_checkpoints(run)[-1]
    assert newest.name == "ckpt-0000000064.pt"
    good_bytes = newest.read_bytes()
    damage = {
        "truncated": lambda: newest.write_bytes(good_bytes[: len(good_bytes) // 2]),
        "flipped byte": lambda: newest.write_bytes(
            good_bytes[:-100] + bytes([good_bytes[-100] ^ 1]) + good_bytes[-99:]
        ),
        "garbage": lambda: newest.write_bytes(b"not a checkpoint"),
    }
    for name, spoil in damage.items():
        spoil()
        path, state = newest_intact_checkpoint(run, report=print)
        assert path.name == "ckpt-0000000032.pt", name
        assert "corrupt or incomplete" in capsys.readouterr().out, name
    # A checkpoint without a checksum (an older ldmkit) that lacks part of the state is skipped too.
    state = state_of(tmp_path / "straight")
    del state["optimizer"]
    atomic_save(state, newest)
    checksum_path(newest).unlink()
    path, _ = newest_intact_checkpoint(run, report=print)
    assert path.name == "ckpt-0000000032.pt"
    assert "lacks 'optimizer'" in capsys.readouterr().out
    partial = run / "checkpoints" / "ckpt-0000000080.pt.tmp"  # a write a kill interrupted (another interval)
    partial.write_bytes(b"half a checkpoint")
    # The run resumes from the intact one and ends exactly where an uninterrupted run does.
    training_loop(cfg, run, quiet=True)
    assert state_of(run)["images_seen"] == 96
    assert not partial.exists()
    for key in ("model", "ema"):
        for name, value in state_of(straight)[key].items():
            assert torch.equal(value, state_of(run)[key][name]), f"{key}.{name}"


@pytest.mark.slow
def test_a_run_folder_without_config_yaml_resumes_from_its_checkpoint(tmp_path, capsys):
    run = training_loop(tiny_config("train.total_images=64"), tmp_path / "run", stop_after_images=32, quiet=True)
    (run / "config.yaml").unlink()
    assert main(["train", str(run)]) == 0
    assert "config.yaml is missing: using the config recorded in ckpt-0000000032.pt" in capsys.readouterr().err
    assert state_of(run)["images_seen"] == 64
    assert (run / "config.yaml").is_file()


def _train_command(config, out, *extra):
    cmd = [sys.executable, "-m", "ldmkit.cli", "train", str(config), "--out", str(out)]
    for o in TINY + list(extra):
        cmd += ["--set", o]
    return cmd


@pytest.mark.slow
def test_a_stop_signal_checkpoints_the_step_and_the_resumed_run_is_exact(tmp_path):
    # SIGTERM end to end; SIGUSR1 and SIGINT take the same handler (test_every_stop_signal_is_noted_and_a_second_
    # ctrl_c_interrupts_at_once)
    sig = signal.SIGTERM
    config = tmp_path / "c.yaml"
    config.write_text("name: preempted\n")
    extra = ["train.total_images=4000", "train.checkpoint_every_images=100000", "train.log_every_images=16"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        _train_command(config, tmp_path / "stopped", *extra),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "stopped" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert err.strip().splitlines()[-1].startswith("ldmkit train: stopped by " + signal.Signals(sig).name)
    stopped_at = state_of(tmp_path / "stopped")["images_seen"]
    assert 0 < stopped_at < 4000
    assert stopped_at % 16 == 0  # the interrupted step, not a checkpoint interval
    records = [json.loads(line)["images"] for line in log.read_text().splitlines()]
    assert records[-1] == stopped_at
    assert (
        subprocess.run(_train_command(config, tmp_path / "stopped", *extra), env=env, capture_output=True).returncode
        == 0
    )
    assert (
        subprocess.run(_train_command(config, tmp_path / "straight", *extra), env=env, capture_output=True).returncode
        == 0
    )
    a, b = state_of(tmp_path / "straight"), state_of(tmp_path / "stopped")
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name}"
    records = [json.loads(line)["images"] for line in log.read_text().splitlines()]
    assert records == sorted(set(records)), "log.jsonl must stay monotonic after a resume"


@pytest.mark.slow
def test_every_stop_signal_is_noted_and_a_second_ctrl_c_interrupts_at_once():
    from ldmkit.distributed import Dist
    from ldmkit.training.signals import STOP_SIGNALS, StopSignals

    for sig in STOP_SIGNALS:
        signals = StopSignals(Dist())
        try:
            os.kill(os.getpid(), sig)
            assert signals.requested() and signals.name == signal.Signals(sig).name
        finally:
            signals.restore()
    assert set(STOP_SIGNALS) == {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
    signals = StopSignals(Dist())
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: noted, the step goes on
        assert signals.requested()
        assert signals.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
            time.sleep(1)
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_log_records_past_the_resumed_checkpoint_are_dropped(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ldmkit.eval.report import read_log

    cfg = tiny_config("train.total_images=128", "train.log_every_images=16", "train.checkpoint_every_images=64")
    run = training_loop(cfg, tmp_path / "run", stop_after_images=96, quiet=True)
    # What a kill after the logs of 80 and 96 images and before their checkpoint leaves: no checkpoint at 96.
    for path in (run / "checkpoints").glob("ckpt-0000000096.pt*"):
        path.unlink()
    with open(run / "log.jsonl", "a") as f:  # and a line cut short
        f.write('{"images": 112, "lo')
    training_loop(cfg, run, quiet=True)
    images = [r["images"] for r in read_log(run)]
    assert images == list(range(16, 129, 16))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == list(range(16, 129, 16)), steps  # the events of 80 and 96 from the first attempt are purged


def _ddp_worker(rank, port, run_dir, timeout_s, action, parallel="ddp"):
    """One process of a two-process gloo run; process 1 does `action` to itself before its 5th step."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    if rank == 1:
        import ldmkit.training.loop as loop

        original, done = loop.step_seed, []

        def step_seed_then_act(seed, step):
            if step == 4 and not done:  # while drawing the randomness of the 5th step
                done.append(True)
                os.kill(os.getpid(), action)
            return original(seed, step)

        loop.step_seed = step_seed_then_act
    overrides = TINY + ["train.total_images=100000", "train.log_every_images=16", f"train.dist_timeout_s={timeout_s}"]
    overrides.append(f"train.parallel={parallel}")
    sys.exit(
        main(
            ["train", str(run_dir / "c.yaml"), "--out", str(run_dir / "run")]
            + [a for o in overrides for a in ("--set", o)]
        )
    )


def _two_processes(tmp_path, timeout_s, action, parallel="ddp"):
    import multiprocessing

    (tmp_path / "c.yaml").write_text("name: two\n")
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    args = (port, tmp_path, timeout_s, action, parallel)
    procs = [ctx.Process(target=_ddp_worker, args=(rank, *args)) for rank in (0, 1)]
    for p in procs:
        p.start()
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_frozen_process_ends_a_two_process_run_within_the_timeout(tmp_path, parallel):
    # Process 1 freezes after a few steps, as a hung GPU or a stopped node would.
    procs = _two_processes(tmp_path, 10, signal.SIGSTOP, parallel)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _is_stopped(procs[1].pid):
            time.sleep(0.1)
        assert _is_stopped(procs[1].pid), "process 1 should have frozen itself"
        frozen_at = time.time()
        procs[0].join(timeout=60)
        waited = time.time() - frozen_at
        assert procs[0].exitcode is not None, "process 0 still hangs a minute after the other froze"
        assert procs[0].exitcode == 2
        assert waited < 10 + 30  # the one-line LostProcess error
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path, parallel):
    procs = _two_processes(tmp_path, 60, signal.SIGTERM, parallel)
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [75, 75]
    images = state_of(tmp_path / "run")["images_seen"]
    assert images == 5 * 16  # the step during which the signal came, checkpointed (sharded: by every process)
    suffix = ".dcp" if parallel == "fsdp" else ".pt"
    assert latest_checkpoint(tmp_path / "run").name == f"ckpt-{images:010d}{suffix}"


def _is_stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


# ------------------------------------------------------------------ bad input: one line, exit 2
@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    cfg = tiny_config(
        "train.total_images=16", "diffusion.objective=flow", "model.learn_sigma=false", "sample.sampler=euler"
    )
    return training_loop(cfg, root / "run", quiet=True)


@pytest.mark.slow
def test_every_bad_input_is_one_line_and_changes_nothing(trained, flow_run, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("name: bad\n")
    sets = [a for o in TINY for a in ("--set", o)]
    (tmp_path / "a-file").write_text("keep me")

    def train(*overrides, out="run"):
        return (
            ["train", str(config), "--out", str(tmp_path / out)] + sets + [a for o in overrides for a in ("--set", o)]
        )

    cases = {
        "sampler of another objective": (["sample", str(flow_run), "--sampler", "ddpm"], "does not apply to the flow"),
        "negative images": (["eval", str(trained), "--num-images", "-5"], "positive whole number"),
        "zero images": (["eval", str(trained), "--num-images", "0"], "positive whole number"),
        "negative steps": (["sample", str(trained), "--steps", "-3"], "positive whole number"),
        "zero steps": (["sample", str(trained), "--steps", "0"], "positive whole number"),
        "nan guidance": (["sample", str(trained), "--guidance", "nan"], "finite number"),
        "negative stop-after": (["train", str(config), "--stop-after", "-1"], "positive whole number"),
        "negative micro batch": (train("train.micro_batch=-4"), "'train.micro_batch': must be > 0"),
        "zero checkpoint interval": (train("train.checkpoint_every_images=0"), "'train.checkpoint_every_images'"),
        "zero log interval": (train("train.log_every_images=0"), "'train.log_every_images'"),
        "held out beyond the data": (train("data.held_out=6000"), "data.held_out"),
        "cuda without a GPU": (train("train.device=cuda"), "no GPU is visible"),
        "--out is a file": (train(out="a-file"), "is an existing file"),
        "sample --out is a file": (["sample", str(trained), "--out", str(tmp_path / "a-file")], "is an existing file"),
        "ema decay 2": (train("train.ema_decay=2.0"), "'train.ema_decay': must be in [0, 1)"),
        "dropout 1.5": (train("train.class_dropout=1.5"), "'train.class_dropout': must be in [0, 1]"),
        "keep no checkpoints": (train("train.keep_checkpoints=0"), "'train.keep_checkpoints'"),
        "infinite lr": (train("train.lr=.inf"), "'train.lr': must be a finite number"),
        "run name with a path": (train("name=../../x"), "not a plain folder name"),
        "pipe without allow_shell": (
            train(
                "data.name=shards", "data.path=pipe:echo hi", "model.conditioning=pooled_text", "text.encoder=minilm"
            ),
            "allow_shell",
        ),
        "too few DDPM steps": (train("diffusion.num_timesteps=2"), "'diffusion.num_timesteps'"),
        "heads that do not divide the width": (train("model.num_heads=7"), "config section 'model'"),
        "class list with a word": (["sample", str(trained), "--classes", "1,x"], "--classes: expected comma-separated"),
        "class out of range": (["sample", str(trained), "--classes", "99"], "out of range"),
        "control on a run without controls": (["sample", str(trained), "--control", "flip=1"], "embeds no control"),
        "a config that is not YAML mapping": (["train", str(tmp_path / "a-file")], "must hold a mapping"),
        "a text file as weights": (
            ["convert", str(config), "--out", str(tmp_path / "w.pt")],
            "not a readable weights file",
        ),
        "export onto a file": (["export", str(trained), "--out", str(tmp_path / "a-file")], "is an existing file"),
        "shards onto a file": (["mnist-shards", str(tmp_path / "a-file")], "is an existing file"),
        "guidance sweep with a word": (["eval", str(trained), "--sweep-guidance", "1,x"], "--sweep-guidance"),
        "unknown metric": (["eval", str(trained), "--metrics", "fid,bogus"], "unknown bogus"),
        "missing config file": (["train", str(tmp_path / "nope.yaml")], "config file not found"),
        "unknown key": (train("train.learning_rate=1"), "unknown config key 'train.learning_rate'"),
        "a word for a number": (train("train.lr=abc"), "'train.lr': expected float"),
    }
    for name, (argv, expected) in cases.items():
        err = one_line_error(capsys, main(argv))
        assert expected in err, f"{name}: {err}"
    assert (tmp_path / "a-file").read_text() == "keep me"
    assert not (tmp_path / "run" / "checkpoints").exists() or not list_checkpoints(tmp_path / "run")
    assert not (tmp_path.parent / "x").exists()


def test_an_unexpected_error_is_one_line_with_a_hint(monkeypatch, capsys):
    import ldmkit.cli

    def broken(args):
        raise RuntimeError("something\nunforeseen")

    monkeypatch.setitem(ldmkit.cli.COMMANDS, "presets", broken)
    err = one_line_error(capsys, main(["presets"]), expected=1)
    assert "RuntimeError: something unforeseen" in err
    assert "LDMKIT_DEBUG=1" in err
    monkeypatch.setenv("LDMKIT_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["presets"])


@pytest.mark.slow
def test_total_images_off_the_batch_is_rounded_with_a_note(tmp_path, capsys):
    from ldmkit.training.logging import status_line

    training_loop(tiny_config("train.total_images=70"), tmp_path / "run")
    assert (
        "train.total_images 70 is not a multiple of the global batch 16: training 80 images" in capsys.readouterr().err
    )
    assert state_of(tmp_path / "run")["images_seen"] == 80
    assert "eta 00:00:00" in status_line(80, 80, 1.0, 10.0, None)
    assert "eta 2d 00:00:00" in status_line(0, 172_800, 1.0, 1.0, None)


# ------------------------------------------------------------------ images
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from ldmkit.data.transforms import load_image

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # PIL reads it as 16-bit
    for channels in (1, 3):
        image, converted = load_image(tmp_path / "deep.png", channels)
        values = np.asarray(image.convert("L"), dtype=np.float64)
        assert converted is not None
        assert np.abs(values - ramp / 257.0).max() <= 0.5 + 1e-9
        assert (values == 255).mean() < 0.01  # PIL's own convert makes 99% of it white


def test_images_below_min_side_are_skipped_and_counted(tmp_path):
    from ldmkit.config import load_config
    from ldmkit.data.datasets import build_dataset

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / c / "ok.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "a" / "dot.png")
    Image.new("RGB", (15, 64)).save(tmp_path / "b" / "thin.png")
    cfg = load_config(overrides=["data.name=image_folder", f"data.path={tmp_path}", "data.channels=3"])
    assert cfg.data.min_side is None
    assert cfg.data.min_side_px == 16  # half of the 32-pixel resolution
    dataset = build_dataset(cfg.data, "train")
    seen = [dataset[(i, 0)]["image"].shape for i in range(len(dataset))]
    assert all(tuple(s) == (3, 32, 32) for s in seen)
    assert dataset.skipped.get("too small", 0) == 2
