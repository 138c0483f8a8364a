"""The training loop, top to bottom, counted in images (after NVlabs/edm2's training_loop.py).

Every random draw of a step (diffusion time, noise, guidance dropout, flips, VAE posterior noise) comes from
a generator seeded by (seed, step) for the whole global batch, and each process takes its slice; the data
order is a permutation seeded by (seed, epoch). So the run depends only on the config, not on the number of
processes or on where it was interrupted: re-running the same command resumes from the newest checkpoint
and produces the same weights as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch

from ..autoencoders import build_autoencoder
from ..config import ConfigError, RunConfig, build, diff_configs, dump_config, load_config, to_dict, validate
from ..conditioning.build import build_text_encoder, cond_from_batch
from ..data.loader import training_batches
from ..diffusion.objectives import build_objective, training_loss
from ..eval.evaluate import quick_metrics
from ..eval.generate import generate, grid_labels, save_grid
from ..models.registry import build_model, spec_of
from .. import distributed
from . import parallel
from .optim import build_optimizer
from .validation import Validator
from .logging import RunLogger, plot_loss_curve, print_status, status_line
from ..checkpoint import (
    atomic_save, checkpoint_path, latest_checkpoint, load_weights, newest_intact_checkpoint, nonfinite_count,
    prune_checkpoints, remove_partial_writes,
)
from .signals import StopSignals, TrainingDiverged, TrainingStopped


def step_seed(seed: int, step: int) -> int:
    return (seed * 6_364_136_223_846_793_005 + step * 1_442_695_040_888_963_407 + 1) % (2**63 - 1)


# Keys that do not change the trained weights: a run may resume with other values.
NOT_TRAINING_KEYS = ("name", "sample.", "eval.", "data.num_workers", "train.total_images", "train.log_every_images",
                     "train.checkpoint_every_images", "train.sample_every_images", "train.keep_checkpoints", "train.max_nan_skips",
                     "train.val_every_images", "train.metric_every_images")


def prepare_run_dir(cfg: RunConfig, run_dir: Path, allow_config_change: bool, is_main: bool) -> None:
    """Create the run folder, or check that an existing one belongs to this config (then it resumes)."""
    config_file = run_dir / "config.yaml"
    previous = load_config(config_file) if config_file.exists() else checkpoint_config(run_dir)
    if previous is not None:
        changed = [k for k in diff_configs(to_dict(previous), to_dict(cfg)) if not k.startswith(NOT_TRAINING_KEYS)]
        # A folder without checkpoints holds no training to protect (e.g. a start that failed on bad data).
        if changed and not allow_config_change and latest_checkpoint(run_dir) is not None:
            raise ConfigError(
                f"run directory {run_dir} holds a run of a different config (differs at: {', '.join(changed[:5])}); "
                "use another --out, or --resume to continue it with the new config"
            )
    elif run_dir.exists() and any(run_dir.iterdir()) and not allow_config_change:
        raise ConfigError(f"run directory {run_dir} exists and is not an ldmkit run (no config.yaml); choose another --out")
    if is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        dump_config(cfg, config_file)


def checkpoint_config(run_dir: Path) -> RunConfig | None:
    """The config embedded in a run folder's newest intact checkpoint (for a folder whose config.yaml was lost)."""
    if latest_checkpoint(run_dir) is None:
        return None
    path, state = newest_intact_checkpoint(run_dir, require=("config",))
    cfg = build(RunConfig, state["config"])
    validate(cfg)
    print_status(f"{run_dir}/config.yaml is missing: using the config recorded in {path.name}")
    return cfg


def ema_beta(cfg, images_seen: int) -> float:
    t = cfg.train
    if t.ema_halflife_images is None:
        return t.ema_decay
    halflife = t.ema_halflife_images
    if t.ema_rampup is not None:
        halflife = min(halflife, images_seen * t.ema_rampup)
    return 0.5 ** (t.global_batch / max(halflife, 1e-8))


def training_loop(cfg: RunConfig, run_dir: str | Path, allow_config_change: bool = False, stop_after_images: int | None = None,
                  quiet: bool = False) -> Path:
    """Train until cfg.train.total_images (or stop_after_images), checkpointing on the way. Returns run_dir."""
    d = distributed.init_distributed(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    with distributed.lost_process_errors(d, cfg.train.dist_timeout_s):
        return _train(cfg, Path(run_dir), d, allow_config_change, stop_after_images, quiet)


def _train(cfg: RunConfig, run_dir: Path, d: distributed.Dist, allow_config_change: bool, stop_after_images: int | None,
           quiet: bool) -> Path:
    device, tc = d.device, cfg.train
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32
        torch.backends.cudnn.allow_tf32 = tc.tf32
    # Batch arithmetic: global batch = micro batch x processes x accumulation rounds.
    micro = tc.micro_batch or tc.global_batch // d.world_size
    if tc.global_batch % (micro * d.world_size):
        raise ConfigError(f"config key 'train.global_batch': {tc.global_batch} is not a multiple of micro batch {micro} x {d.world_size} processes")
    rounds = tc.global_batch // (micro * d.world_size)


    # Autoencoder, text encoder, model, EMA, optimizer, objective.
    autoencoder = build_autoencoder(cfg.autoencoder, cfg.data.channels).to(device)
    if cfg.data.resolution // autoencoder.downsample != cfg.model.input_size:
        raise ConfigError(
            f"config key 'model.input_size': {cfg.model.input_size} does not match data.resolution {cfg.data.resolution} / autoencoder downsampling {autoencoder.downsample}"
        )
    if autoencoder.latent_channels != cfg.model.in_channels:
        raise ConfigError(f"config key 'model.in_channels': {cfg.model.in_channels}, but the autoencoder gives {autoencoder.latent_channels} latent channels")
    # Captions are encoded on the fly unless the cache holds their embeddings.
    text_encoder = build_text_encoder(cfg, device) if cfg.model.conditioning != "class" and not cfg.data.from_cache else None
    if text_encoder is not None:
        check_text_width(cfg, text_encoder.name, text_encoder.pooled_dim, text_encoder.token_dim)
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, cfg.conditioning)
    # A new run may start from another model's weights (resolution, dataset or conditioning transfer); every
    # tensor's fate is reported and written to init.json. A run with checkpoints resumes from them instead.
    init_report = None
    if cfg.init.source and latest_checkpoint(run_dir) is None:
        from ..transfer.init import initialize_from

        init_report = initialize_from(model, cfg, log=print_status if d.is_main and not quiet else (lambda *_: None))
    model = model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = build_optimizer(model.parameters(), tc)
    objective = build_objective(cfg)
    extra_pass = spec_of(model).extra_pass(model)  # a backbone's second loss per step (MDT-v2's masked pass)
    # The run folder is written only once the config has built (a bad key or preset leaves nothing behind).
    if d.is_main:
        prepare_run_dir(cfg, run_dir, allow_config_change, True)
        if init_report is not None:
            from ..transfer.init import write_report

            write_report(init_report, cfg.init.source, run_dir)
    distributed.barrier(d)

    # Resume from the newest checkpoint, if any.
    images_seen, step, nan_skips = 0, 0, 0
    # The newest checkpoint that verifies against its checksum and holds the whole state; newer broken ones are
    # reported and left in place (never deleted: they may be wanted for forensics).
    report = print_status if d.is_main else (lambda *_: None)
    if d.is_main:
        for partial in remove_partial_writes(run_dir):
            report(f"removed {partial.name}, a checkpoint write that was interrupted")
    resume_from, state = newest_intact_checkpoint(run_dir, report=report)
    if resume_from is not None:
        load_weights(model, state["model"], f"checkpoint {resume_from}")
        load_weights(ema, state["ema"], f"checkpoint {resume_from}")
        optimizer.load_state_dict(state["optimizer"])
        images_seen, step, nan_skips = state["images_seen"], state["step"], state.get("nan_skips", 0)
        torch.set_rng_state(state["rng"]["torch"])
        saved_world = state.get("world_size", d.world_size)
        if cfg.data.name == "shards" and not cfg.data.from_cache and saved_world != d.world_size:
            raise ConfigError(f"this run streams shards split over {saved_world} process(es); resume it with {saved_world}, "
                              f"not {d.world_size} (or train from the latent cache, which does not depend on the process count)")
        if d.is_main and not quiet:
            print_status(f"resumed from {resume_from} at {images_seen:,} images")
    # Data from the stream position the run has reached; the source fixes the classes the model must hold.
    # Training ends on a whole step: a length that is not a multiple of the global batch is rounded up, with a note.
    total = -(-tc.total_images // tc.global_batch) * tc.global_batch
    end = min(total, stop_after_images or total)
    end = -(-end // tc.global_batch) * tc.global_batch
    if total != tc.total_images and d.is_main and not quiet:
        print_status(f"note: train.total_images {tc.total_images:,} is not a multiple of the global batch {tc.global_batch}: "
                     f"training {total:,} images")
    batches, source = training_batches(cfg, d, micro, rounds, images_seen, end)
    check_data_matches_model(cfg, source)
    num_classes = getattr(source, "num_classes", 0) or cfg.model.num_classes
    train_model = parallel.parallelize(model, d, compile=tc.compile)
    logger = RunLogger(run_dir, enabled=d.is_main, resume_at=images_seen)
    if d.is_main and not quiet:
        n_params = sum(p.numel() for p in model.parameters())
        print_status(f"{cfg.model.preset}: {n_params / 1e6:.2f}M parameters on {device}, {d.world_size} process(es), "
                     f"global batch {tc.global_batch} = {micro} x {d.world_size} x {rounds}")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    stat_loss, stat_mse, stat_n = torch.zeros((), device=device), torch.zeros((), device=device), 0
    tick_time, tick_images = time.time(), images_seen
    next_log = (images_seen // tc.log_every_images + 1) * tc.log_every_images
    next_ckpt = (images_seen // tc.checkpoint_every_images + 1) * tc.checkpoint_every_images
    next_grid = (images_seen // tc.sample_every_images + 1) * tc.sample_every_images if tc.sample_every_images else None
    next_val = (images_seen // tc.val_every_images + 1) * tc.val_every_images if tc.val_every_images else None
    next_metric = (images_seen // tc.metric_every_images + 1) * tc.metric_every_images if tc.metric_every_images else None
    validator = Validator(cfg, objective, autoencoder, text_encoder, device) if next_val is not None and d.is_main else None
    signals = StopSignals(d)  # SIGTERM / SIGINT / SIGUSR1: finish the step, checkpoint, exit
    last_good = resume_from

    def check_weights_finite() -> None:
        """A deferred check (at log and checkpoint time, not every step: no host sync per step)."""
        bad = int(nonfinite_count(list(model.parameters()) + list(ema.parameters())).item())
        if bad:
            raise TrainingDiverged(images_seen, f"{bad:,} non-finite weights", last_good, run_dir)

    try:
        while images_seen < end:
            # ---- this step's micro-batches (crops and flips were drawn from each sample's seed by the loader).
            micro_batches = [next(batches) for _ in range(rounds)]
            latent_shape = batch_latent_shape(micro_batches[0], autoencoder)  # one bucket per global batch

            # ---- the step's global randomness; this process takes its slices.
            gen = torch.Generator(device).manual_seed(step_seed(tc.seed, step))
            times = objective.sample_time(tc.global_batch, gen, device)
            noise = torch.randn((tc.global_batch, *latent_shape), generator=gen, device=device)
            posterior_noise = torch.randn((tc.global_batch, *latent_shape), generator=gen, device=device)
            drop = torch.rand(tc.global_batch, generator=gen, device=device) < tc.class_dropout
            # A backbone's extra pass draws its randomness here (MDT-v2: the tokens each sample keeps).
            extra_drawn = extra_pass.draw(tc.global_batch, gen, device) if extra_pass is not None else None
            # Control metadata has its own guidance dropout, drawn independently of the semantic one.
            drop_control = torch.rand(tc.global_batch, generator=gen, device=device) < cfg.conditioning.control_dropout if cfg.conditioning.control else None

            optimizer.zero_grad(set_to_none=True)
            for r, batch in enumerate(micro_batches):
                lo = (r * d.world_size + d.rank) * micro
                part = slice(lo, lo + micro)
                if "latent_mean" in batch:  # from the cache: sample the stored posterior
                    mean, std = batch["latent_mean"].to(device, non_blocking=True), batch["latent_std"].to(device, non_blocking=True)
                    x0 = autoencoder.latents(mean, std, posterior_noise[part])
                else:
                    x0 = autoencoder.encode(batch["image"].to(device, non_blocking=True), posterior_noise[part])
                cond = cond_from_batch(cfg, batch, text_encoder, drop[part], device, drop_control=None if drop_control is None else drop_control[part],
                                       padding_seeds=[step_seed(tc.seed, step) + lo + i for i in range(micro)])
                sync = r == rounds - 1 or d.world_size == 1
                ctx = train_model.no_sync() if (d.world_size > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    extra = (extra_pass.kwargs(extra_drawn, part),) if extra_pass is not None else ()
                    with autocast:
                        terms = training_loss(objective, train_model, x0, cond, times[part], noise[part], extra)
                    # Sum over this slice, scaled so that DDP's mean over processes is the global-batch mean.
                    loss = terms["loss"].sum() * d.world_size / tc.global_batch
                    loss.backward()
                stat_loss += terms["loss"].detach().sum()
                stat_mse += terms["mse"].detach().sum()
            stat_n += micro * rounds

            # ---- NaN guard: every process agrees on skipping the update.
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)  # one fused reduction; NaN/inf if any gradient is
            finite = distributed.all_reduce_mean(torch.isfinite(grad_norm).float(), d)
            if finite.item() < 1.0:
                nan_skips += 1
                optimizer.zero_grad(set_to_none=True)
                if d.is_main:
                    print_status(f"non-finite gradients at {images_seen:,} images: step skipped ({nan_skips} in a row)")
                if nan_skips > tc.max_nan_skips:
                    raise TrainingDiverged(images_seen, f"{nan_skips} consecutive steps with non-finite gradients", last_good, run_dir)
            else:
                nan_skips = 0
                if tc.grad_clip is not None:
                    torch.nn.utils.clip_grads_with_norm_(model.parameters(), tc.grad_clip, grad_norm)
                lr = tc.lr * min(1.0, (images_seen + tc.global_batch) / tc.warmup_images) if tc.warmup_images else tc.lr
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                beta = ema_beta(cfg, images_seen)
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - beta)
            images_seen += tc.global_batch
            step += 1
            stopping = signals.requested()  # every process agrees

            # ---- status line and logs.
            if images_seen >= next_log or images_seen >= end or stopping:
                check_weights_finite()
                next_log = (images_seen // tc.log_every_images + 1) * tc.log_every_images
                totals = distributed.all_reduce_mean(torch.stack([stat_loss, stat_mse]) / max(stat_n, 1), d)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.time() - tick_time
                speed = (images_seen - tick_images) / max(elapsed, 1e-9)
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_gb()
                record = {"images": images_seen, "step": step, "loss": totals[0].item(), "mse": totals[1].item(),
                          "lr": optimizer.param_groups[0]["lr"], "images_per_s": speed, "time": time.time()}
                record.update(memory_gb=mem, processes=d.world_size, device=device.type, interval_s=elapsed)
                logger.log(record)
                if d.is_main and not quiet:
                    print_status(status_line(images_seen, total, record["loss"], speed, mem))
                stat_loss.zero_(), stat_mse.zero_()
                stat_n, tick_time, tick_images = 0, time.time(), images_seen

            # ---- signals for comparing runs while they train (process 0, EMA weights): eval.jsonl.
            if validator is not None and images_seen >= next_val:
                next_val = (images_seen // tc.val_every_images + 1) * tc.val_every_images
                logger.log({"images": images_seen, **validator.loss(ema)}, file="eval.jsonl")
            if next_metric is not None and images_seen >= next_metric and d.is_main:
                next_metric = (images_seen // tc.metric_every_images + 1) * tc.metric_every_images
                logger.log({"images": images_seen, **quick_metrics(ema, cfg, objective, autoencoder, device, run_dir, cfg.eval.train_metric_images)},
                           file="eval.jsonl")

            # ---- periodic sample grid from the EMA weights.
            if next_grid is not None and images_seen >= next_grid and d.is_main:
                next_grid = (images_seen // tc.sample_every_images + 1) * tc.sample_every_images
                labels, per = grid_labels(cfg, num_classes)
                images = generate(ema, cfg, objective, autoencoder, labels, list(range(len(labels))), device, text_encoder=text_encoder)
                save_grid(images, run_dir / "samples" / f"grid-{images_seen:010d}.png", per)

            # ---- checkpoint (also at the end and on a stop signal); non-finite weights are never written.
            if images_seen >= next_ckpt or images_seen >= end or stopping:
                next_ckpt = (images_seen // tc.checkpoint_every_images + 1) * tc.checkpoint_every_images
                check_weights_finite()
                if d.is_main:
                    state = {
                        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "images_seen": images_seen, "step": step, "nan_skips": nan_skips,
                        # The lr schedule is a pure function of images_seen (warm-up, then constant).
                        "lr_schedule": {"base_lr": tc.lr, "warmup_images": tc.warmup_images},
                        # Where the data stream continues: images seen (indexed sets, cache); shard streams also
                        # need the process count, since each process reads its own shards.
                        "data_position": images_seen, "world_size": d.world_size, "rng": {"torch": torch.get_rng_state()},
                        "config": to_dict(cfg),
                    }
                    atomic_save(state, checkpoint_path(run_dir, images_seen))
                    prune_checkpoints(run_dir, tc.keep_checkpoints)
                last_good = checkpoint_path(run_dir, images_seen)
                distributed.barrier(d)
            if stopping:
                raise TrainingStopped(signals.name, images_seen, last_good)
    finally:
        signals.restore()
        logger.close()
    if d.is_main:
        plot_loss_curve(run_dir)
    return run_dir


def batch_latent_shape(batch: dict, autoencoder) -> tuple[int, int, int]:
    """(C, h, w) of the latents of a micro-batch: cached latents, or images / the autoencoder's downsampling."""
    if "latent_mean" in batch:
        return tuple(batch["latent_mean"].shape[1:])
    _, _, H, W = batch["image"].shape
    return (autoencoder.latent_channels, H // autoencoder.downsample, W // autoencoder.downsample)


def check_data_matches_model(cfg, source) -> None:
    """One-line errors when the data cannot feed the configured model."""
    m = cfg.model
    classes = getattr(source, "num_classes", 0)
    if m.conditioning == "class" and classes > m.num_classes:
        raise ConfigError(f"config key 'model.num_classes': the data has {classes} classes, the model {m.num_classes}")
    if cfg.data.from_cache:
        shape = source.manifest["latent_shape"]
        if shape[0] != m.in_channels:
            raise ConfigError(f"config key 'model.in_channels': {m.in_channels}, but the cache at {cfg.data.cache} holds {shape[0]}-channel latents")
        if m.conditioning == "class" and classes == 0:
            raise ConfigError(f"config key 'model.conditioning': the cache at {cfg.data.cache} has no class labels; use pooled_text")
        if m.conditioning != "class":
            text = source.manifest.get("text_encoder")
            if not source.has_text:
                raise ConfigError(f"config key 'text.encoder': the cache at {cfg.data.cache} holds no text embeddings; encode with a text encoder")
            check_text_width(cfg, f"cache's {text['name']}", text["pooled_dim"], text["token_dim"])


def check_text_width(cfg, encoder_name: str, pooled_dim: int, token_dim: int) -> None:
    m = cfg.model
    if m.conditioning == "pooled_text" and pooled_dim != m.pooled_dim:
        raise ConfigError(f"config key 'model.pooled_dim': {m.pooled_dim}, but the {encoder_name} pooled vectors have {pooled_dim}")
    if m.conditioning == "text" and token_dim != m.context_dim:
        raise ConfigError(f"config key 'model.context_dim': {m.context_dim}, but the {encoder_name} tokens have {token_dim}")


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
