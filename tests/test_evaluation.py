"""Evaluation at scale: sample sets identical on 1 and 2 processes and resumable, the Inception-v3 path end to
end with randomly initialised weights of the standard layout, reference statistics, ADM's .npz layout,
KID / precision-recall / density-coverage."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import TINY, torchrun_command
from PIL import Image

from ldmkit.cli import main
from ldmkit.config import load_config
from ldmkit.eval.features import FeatureWeightsMissing, InceptionV3Features, random_inception_weights
from ldmkit.eval.metrics import density_coverage, kernel_inception_distance, precision_recall
from ldmkit.eval.reference import compute_reference, load_reference, save_reference
from ldmkit.training.loop import training_loop


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    return training_loop(load_config(overrides=TINY + ["train.total_images=64"]), out, quiet=True)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth")


@pytest.mark.slow
def test_sample_set_is_identical_on_one_and_two_processes(run, tmp_path):
    assert (
        main(["eval", str(run), "--num", "12", "--steps", "2", "--samples", str(tmp_path / "one"), "--metrics", "none"])
        == 0
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = torchrun_command() + [
        "-m",
        "ldmkit.cli",
        "eval",
        str(run),
        "--num-images",
        "12",
        "--steps",
        "2",
        "--samples",
        str(tmp_path / "two"),
        "--json",
        str(tmp_path / "two.json"),
        "--metrics",
        "none",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for i in range(12):
        assert (tmp_path / "one" / "images" / f"{i:06d}.png").read_bytes() == (
            tmp_path / "two" / "images" / f"{i:06d}.png"
        ).read_bytes()
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert one["arr_0"].shape == (12, 32, 32, 3)
    assert np.array_equal(one["arr_0"], two["arr_0"])
    assert one["arr_1"].tolist() == [i % 10 for i in range(12)]
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2
    # `sample` splits its images over the processes the same way: the same files, and one grid from process 0
    sample = ["-m", "ldmkit.cli", "sample", str(run), "--classes", "1,4,7", "--per-class", "2", "--steps", "2"]
    assert main(sample[2:] + ["--out", str(tmp_path / "sample-one")]) == 0
    done = subprocess.run(cmd[:7] + sample + ["--out", str(tmp_path / "sample-two")], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "sample-one").iterdir())
    assert len(files) == 7 and files == sorted(p.name for p in (tmp_path / "sample-two").iterdir())
    for name in files:
        assert (tmp_path / "sample-one" / name).read_bytes() == (tmp_path / "sample-two" / name).read_bytes()


def test_interrupted_sample_set_resumes_without_duplicates(run, tmp_path):
    from ldmkit.eval.evaluate import load_generator
    from ldmkit.eval.sampleset import sample_labels, write_sample_set

    cfg, model, objective, ae, _ = load_generator(run)
    labels = sample_labels(10, 10)
    args = dict(labels=labels, steps=2)
    assert (
        write_sample_set(
            tmp_path / "s", model, cfg, objective, ae, 10, 4, "cpu", rank=0, world_size=3, log=print, **args
        )
        == 4
    )  # batch 0 only
    first = (tmp_path / "s" / "images" / "000000.png").stat().st_mtime_ns
    assert (
        write_sample_set(tmp_path / "s", model, cfg, objective, ae, 10, 4, "cpu", log=print, **args) == 6
    )  # the rest, not batch 0
    assert (tmp_path / "s" / "images" / "000000.png").stat().st_mtime_ns == first
    assert sorted(p.name for p in (tmp_path / "s" / "images").iterdir()) == [f"{i:06d}.png" for i in range(10)]
    write_sample_set(tmp_path / "full", model, cfg, objective, ae, 10, 4, "cpu", log=print, **args)
    assert all(
        (tmp_path / "s" / "images" / f"{i:06d}.png").read_bytes()
        == (tmp_path / "full" / "images" / f"{i:06d}.png").read_bytes()
        for i in range(10)
    )


@pytest.mark.slow
def test_inception_path_end_to_end_with_random_weights_of_the_standard_layout(run, inception, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(real / f"{i}.png")
    assert (
        main(
            [
                "reference",
                str(real),
                "--out",
                str(tmp_path / "ref.npz"),
                "--weights",
                str(inception),
                "--resolution",
                "32",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                str(run),
                "--num",
                "20",
                "--steps",
                "2",
                "--fid",
                str(tmp_path / "ref.npz"),
                "--inception-weights",
                str(inception),
                "--metrics",
                "fid",
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("fid", "kid", "precision", "recall", "density", "coverage"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fid"] > 0
    assert metrics["fid_reference_count"] == 24
    assert metrics["kid_subset_size"] == 20
    before = set((run / "eval").iterdir())
    assert (
        main(
            [
                "eval",
                str(run),
                "--num",
                "30",
                "--steps",
                "2",
                "--fid",
                str(tmp_path / "ref.npz"),
                "--inception-weights",
                str(tmp_path / "missing.pth"),
            ]
        )
        == 2
    )  # one-line error naming the file ...
    assert set((run / "eval").iterdir()) == before  # ... before any sampling
    # against the statistics of its own images, the same sample set scores ~0
    assert (
        main(
            [
                "reference",
                metrics["sample_set"] + "/images",
                "--out",
                str(tmp_path / "self.npz"),
                "--weights",
                str(inception),
                "--resolution",
                "32",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                str(run),
                "--num",
                "20",
                "--steps",
                "2",
                "--fid",
                str(tmp_path / "self.npz"),
                "--inception-weights",
                str(inception),
                "--metrics",
                "fid",
                "--json",
                str(tmp_path / "self.json"),
            ]
        )
        == 0
    )
    self_fid = json.loads((tmp_path / "self.json").read_text())["fid"]
    assert abs(self_fid) < 1e-3 * metrics["fid"]


def test_missing_inception_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("LDMKIT_INCEPTION_WEIGHTS", str(tmp_path / "nowhere.pth"))
    with pytest.raises(FeatureWeightsMissing, match="nowhere.pth.*weights-inception-2015-12-05-6726825d.pth"):
        InceptionV3Features()


@pytest.mark.slow
def test_reference_round_trip_and_adm_layout(inception, tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "batch.npz", images)  # ADM's sample batches: arr_0 only
    net = InceptionV3Features(str(inception))
    ref = compute_reference(str(tmp_path / "batch.npz"), net, 32)
    back = load_reference(save_reference(ref, tmp_path / "ref.npz"))
    assert back["count"] == 16
    assert back["extractor"] == "InceptionV3"
    assert np.allclose(back["mu"], ref["mu"])
    assert np.allclose(back["sigma"], ref["sigma"])
    assert np.allclose(back["features"], ref["features"], atol=1e-4)
    # ADM's reference batch: arr_0 images with mu / sigma (and spatial mu_s / sigma_s)
    mu, sigma = rng.normal(size=2048), np.eye(2048) * 0.5
    np.savez(
        tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:7], sigma_s=np.eye(7)
    )
    adm = load_reference(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    assert np.array_equal(adm["mu"], mu)
    assert np.array_equal(adm["sigma"], sigma)
    assert adm["count"] == 16
    assert adm["resolution"] == 32


def test_kid_precision_recall_density_coverage_behave():
    rng = np.random.default_rng(0)
    a, b, far = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), rng.normal(loc=3, size=(400, 8))
    same, apart = kernel_inception_distance(a, b, subsets=20), kernel_inception_distance(far, b, subsets=20)
    assert abs(same["kid"]) < 0.05 < apart["kid"]
    pr_same, pr_far = precision_recall(a, b), precision_recall(far, b)
    assert pr_same["precision"] > 0.6
    assert pr_same["recall"] > 0.6
    assert pr_far["precision"] < 0.05
    dc = density_coverage(a, b)
    assert 0.8 < dc["density"] < 1.2
    assert dc["coverage"] > 0.9
    assert density_coverage(far, b)["coverage"] < 0.05


@pytest.mark.slow
def test_validation_loss_and_small_metric_during_training_leave_the_weights_alone(tmp_path):
    plain = training_loop(load_config(overrides=TINY), tmp_path / "plain", quiet=True)
    watched = training_loop(
        load_config(
            overrides=TINY
            + [
                "train.val_every_images=64",
                "train.metric_every_images=128",
                "eval.val_batch=16",
                "eval.train_metric_images=20",
                "eval.classifier_epochs=1",
            ]
        ),
        tmp_path / "watched",
        quiet=True,
    )
    from conftest import state_of

    a, b = state_of(plain)["model"], state_of(watched)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (watched / "eval.jsonl").read_text().splitlines()]
    losses = [r for r in records if "val_loss" in r]
    assert [r["images"] for r in losses] == [64, 128]
    assert set(losses[0]["val_loss"]) == {
        "0.1",
        "0.3",
        "0.5",
        "0.7",
        "0.9",
    }
    assert losses[1]["val_loss_mean"] < losses[0]["val_loss_mean"]  # the EMA model improves on the fixed batch
    metric = next(r for r in records if "class_agreement" in r)
    assert metric["images"] == 128
    assert metric["metric_images"] == 20
    assert metric["fd_effnetlite0"] > 0
    assert not (plain / "eval.jsonl").exists()


@pytest.mark.slow
def test_report_compares_runs_with_a_guidance_sweep(tmp_path):
    import csv

    common = TINY + ["eval.classifier_epochs=1", "train.val_every_images=64", "eval.val_batch=8"]
    a = training_loop(load_config(overrides=common + ["name=small-lr", "train.lr=0.0005"]), tmp_path / "a", quiet=True)
    b = training_loop(load_config(overrides=common + ["name=big-lr", "train.lr=0.002"]), tmp_path / "b", quiet=True)
    assert (
        main(["eval", str(a), "--num", "10", "--steps", "2", "--metrics", "classifier", "--sweep-guidance", "1,3"]) == 0
    )
    sweep = json.loads((a / "eval" / "sweep.json").read_text())
    assert [p["guidance_scale"] for p in sweep] == [1.0, 3.0]
    assert all("class_agreement" in p for p in sweep)
    assert main(["eval", str(b), "--num", "10", "--steps", "2", "--metrics", "classifier"]) == 0
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "rep" / "comparison.csv")))
    assert [r["run"] for r in rows] == ["small-lr", "big-lr"]
    assert rows[0]["images_seen"] == "128"
    assert float(rows[1]["cpu_hours"]) > 0
    assert rows[0]["class_agreement"] == ""
    assert 0 <= float(rows[1]["class_agreement"]) <= 1  # a's metrics.json holds no single eval
    table = (tmp_path / "rep" / "comparison.md").read_text()
    assert "| small-lr |" in table
    assert "lr" in table.splitlines()[2]
    for plot in ("loss.png", "val_loss.png", "guidance_sweep_class_agreement.png"):
        assert (tmp_path / "rep" / plot).is_file(), plot


@pytest.mark.parametrize("source", ["cache", "shards"])
@pytest.mark.slow
def test_validation_loss_from_the_cache_and_from_shards(tmp_path, source):
    from ldmkit.data.shards import write_mnist_caption_shards
    from ldmkit.training.encode import encode_dataset

    extra = ["train.val_every_images=64", "eval.val_batch=8"]
    if source == "cache":
        extra += [f"data.cache={tmp_path / 'cache'}", "data.encode_chunk=5000"]
        encode_dataset(load_config(overrides=TINY + extra), log=lambda *a: None)
        extra.append("data.from_cache=true")
    else:
        write_mnist_caption_shards(tmp_path / "shards", load_config().data, "held_out", shard_size=100)
        extra += [
            "data.name=shards",
            f"data.path={tmp_path}/shards/mnist-{{00000..00004}}.tar",
            "data.label_field=label",
            "data.crop=none",
        ]
    run = training_loop(load_config(overrides=TINY + extra), tmp_path / "run", quiet=True)
    losses = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["images"] for r in losses] == [64, 128]
    assert all(np.isfinite(r["val_loss_mean"]) for r in losses)


@pytest.mark.slow
def test_eval_of_image_folders_as_torch_fidelity_users_expect(inception, tmp_path, capsys):
    """`ldmkit eval DIR_A --ref DIR_B|REF.npz --fid`: RGB by default, FID honoured, metrics beside the images."""
    from ldmkit.data.datasets import mnist_digits
    from ldmkit.eval.generate import save_images

    images, labels = mnist_digits(32)
    save_images(images[:24], tmp_path / "a", list(range(24)), labels[:24])
    save_images(images[:24], tmp_path / "a_copy", list(range(24)))
    save_images(images[100:124], tmp_path / "b", list(range(24)))
    weights = ["--inception-weights", str(inception)]
    assert main(["eval", str(tmp_path / "a"), "--ref", str(tmp_path / "a_copy"), "--fid", *weights]) == 0
    same = json.loads((tmp_path / "a" / "metrics.json").read_text())  # written next to the images
    assert same["channels"] == 3
    assert same["resolution"] == 32
    assert abs(same["fid"]) < 1e-6
    assert abs(same["fd_effnetlite0"]) < 1e-3
    assert main(["eval", str(tmp_path / "b"), "--ref", str(tmp_path / "a"), "--fid", *weights]) == 0
    other = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert other["fd_effnetlite0"] > 1.0
    assert other["fid_reference_count"] == 24  # (random Inception weights: FID itself is near 0 here)
    # statistics of the reference folder in a .npz give the same FID
    ref_cmd = ["reference", str(tmp_path / "a"), "--out", str(tmp_path / "a.npz"), "--resolution", "32"]
    assert main([*ref_cmd, "--weights", str(inception)]) == 0
    out = tmp_path / "npz.json"
    assert main(["eval", str(tmp_path / "b"), "--fid", str(tmp_path / "a.npz"), *weights, "--json", str(out)]) == 0
    from_npz = json.loads(out.read_text())
    assert abs(from_npz["fid"] - other["fid"]) <= 1e-6 * max(1.0, other["fid"])
    assert "fd_effnetlite0" not in from_npz  # statistics only: no images for FD-EffNetLite0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "b")]) == 2
    assert "give --ref" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "b"), "--ref", str(tmp_path / "a.npz")]) == 2
    assert "add --fid" in capsys.readouterr().err


def test_report_legends_name_what_differs_between_runs(tmp_path):
    from ldmkit.config import to_dict
    from ldmkit.eval.compare import legend_labels

    a = to_dict(load_config(overrides=TINY))
    b = to_dict(load_config(overrides=TINY + ["train.lr=0.00042"]))
    labels = legend_labels([tmp_path / "base", tmp_path / "lr-high"], [a, b])
    assert labels == [f"base (train.lr={a['train']['lr']})", "lr-high (train.lr=0.00042)"]
    assert legend_labels([tmp_path / "only"], [a]) == ["only"]


def test_guidance_settings_reach_eval_sweeps_sample_and_the_report(run, tmp_path, monkeypatch):
    """Every sampling setting beyond sampler/steps/scale/seed names its own sample set and is recorded in the
    metrics, the sweep and the comparison report; the CLI's negative class and bf16 reach the sampler."""
    from ldmkit.eval.compare import write_comparison

    common = ["--num", "4", "--steps", "2", "--metrics", "none"]
    settings = ["--negative-class", "3", "--set", "sample.guidance_schedule=power_cosine"]
    assert main(["eval", str(run), *common, *settings, "--precision", "bf16"]) == 0
    folders = sorted((run / "eval").glob("samples-n4-*"))
    assert len(folders) == 1 and len(folders[0].name.split("-")) == 6  # ...-seed0-<hash of the settings>
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert manifest["sampling"] == {"schedule": "power_cosine^4", "negative_class": 3}
    assert main(["eval", str(run), *common, "--sweep-guidance", "1.5,3", *settings]) == 0
    sweep = json.loads((run / "eval" / "sweep.json").read_text())
    assert [p["guidance_scale"] for p in sweep] == [1.5, 3.0]
    assert all(p["sampling"]["negative_class"] == 3 for p in sweep)
    (run / "metrics.json").write_text(json.dumps(sweep[1]))
    write_comparison([run], tmp_path / "report")
    assert "schedule=power_cosine^4; negative_class=3" in (tmp_path / "report" / "comparison.md").read_text()
    import ldmkit.eval.generate as generate

    seen, real = [], generate.guided
    monkeypatch.setattr(generate, "guided", lambda *a: seen.append(a) or real(*a))
    sample = ["sample", str(run), "--classes", "1", "--per-class", "2", "--steps", "2", "--guidance", "3"]
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)  # the wiring, not the compiler
    assert main([*sample, "--negative-class", "3", "--set", "sample.guided_channels=1", "--compile"]) == 0
    assert len(compiled) == 1
    model, cond, guidance, negative = seen[-1]
    assert negative.class_labels.tolist() == [3, 3]
    assert (guidance.scale, guidance.channels) == (3.0, 1)
    assert main([*sample, "--negative-prompt", "a cat"]) == 2  # a class run takes a negative class, not a prompt
