"""The training loop, top to bottom, counted in images (after NVlabs/edm2's training_loop.py).

Every random draw of a step (diffusion time, noise, guidance dropout, flips, VAE posterior noise) comes from
a generator seeded by (seed, step) for the whole global batch, and each process takes its slice; the data
order is a permutation seeded by (seed, epoch). So the run depends only on the config, not on the number of
processes or on where it was interrupted: re-running the same command resumes from the newest checkpoint
and produces the same weights as an uninterrupted run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import distributed
from ..autoencoders import build_autoencoder
from ..checkpoint import (
    latest_checkpoint,
    newest_intact_checkpoint,
    nonfinite_count,
    prune_checkpoints,
    remove_partial_writes,
)
from ..conditioning.build import build_text_encoder, cond_from_batch
from ..config import ConfigError, RunConfig, build, diff_configs, dump_config, load_config, to_dict, validate
from ..data.loader import training_batches
from ..diffusion.objectives import build_objective, training_loss
from ..eval.evaluate import quick_metrics
from ..eval.generate import generate, grid_labels, save_grid
from ..models.registry import build_model, spec_of
from . import parallel
from .logging import RunLogger, check_wandb, plot_loss_curve, print_status, status_line
from .optim import build_optimizer, device_skip
from .signals import StopSignals, TrainingDiverged, TrainingStopped
from .state import EMA, SkipCounter, TrainingState, learning_rate
from .validation import Validator


def step_seed(seed: int, step: int) -> int:
    return (seed * 6_364_136_223_846_793_005 + step * 1_442_695_040_888_963_407 + 1) % (2**63 - 1)


# Keys that do not change the trained weights: a run may resume with other values.
NOT_TRAINING_KEYS = (
    "name",
    "sample.",
    "eval.",
    "data.num_workers",
    "train.total_images",
    "train.log_every_images",
    "train.checkpoint_every_images",
    "train.sample_every_images",
    "train.keep_checkpoints",
    "train.max_nan_skips",
    "train.val_every_images",
    "train.metric_every_images",
    "train.wandb.",
    # how the same step is computed (the results agree to float rounding; docs/distributed.md)
    "train.parallel",
    "train.shard_size",
    "train.activation_checkpointing",
    "train.ac_every",
    "train.async_checkpoint",
    "train.compile",
    "train.optimizer_impl",
)


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
        raise ConfigError(
            f"run directory {run_dir} exists and is not an ldmkit run (no config.yaml); choose another --out"
        )
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


class Every:
    """A hook: fn(images_seen) each time training passes a multiple of `interval` images (never when the interval
    is 0 or None); `forced` hooks also run when training ends or stops (status line, checkpoint)."""

    def __init__(self, interval: int | None, images_seen: int, fn, forced: bool = False):
        self.interval, self.fn, self.forced = interval, fn, forced
        self.next = (images_seen // interval + 1) * interval if interval else None

    def __call__(self, images_seen: int, finishing: bool) -> None:
        if self.next is not None and (images_seen >= self.next or (finishing and self.forced)):
            self.next = (images_seen // self.interval + 1) * self.interval
            self.fn(images_seen)


class StepStats:
    """Loss sums on the device between two status lines (read only at log time: no host sync per step)."""

    def __init__(self, device, images_seen: int):
        self.loss, self.mse, self.n = torch.zeros((), device=device), torch.zeros((), device=device), 0
        self.grad_norm, self.updates = torch.zeros((), device=device), torch.zeros((), device=device)
        self.tick_time, self.tick_images = time.time(), images_seen

    def add(self, terms: dict) -> None:
        self.loss += terms["loss"].detach().sum()
        self.mse += terms["mse"].detach().sum()

    def add_grad_norm(self, norm: torch.Tensor | None) -> None:
        if norm is not None:  # None: a step skipped on the host; a non-finite norm: one skipped on the device
            finite = torch.isfinite(norm.detach())
            self.grad_norm += torch.where(finite, norm.detach().float(), 0.0)
            self.updates += finite

    def record(self, d: distributed.Dist, images_seen: int, step: int, lr: float) -> dict:
        # the gradient norm is already the global one (DDP averaged the gradients): no reduction needed
        grad_norm = (self.grad_norm / self.updates.clamp(min=1)).item()
        totals = distributed.all_reduce_mean(torch.stack([self.loss, self.mse]) / max(self.n, 1), d)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.time() - self.tick_time
        speed = (images_seen - self.tick_images) / max(elapsed, 1e-9)
        mem = torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else peak_rss_gb()
        self.loss.zero_(), self.mse.zero_(), self.grad_norm.zero_(), self.updates.zero_()
        self.n, self.tick_time, self.tick_images = 0, time.time(), images_seen
        return {
            "images": images_seen,
            "step": step,
            "loss": totals[0].item(),
            "mse": totals[1].item(),
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": speed,
            "time": time.time(),
            "memory_gb": mem,
            "processes": d.world_size,
            "device": d.device.type,
            "interval_s": elapsed,
        }


def training_loop(
    cfg: RunConfig,
    run_dir: str | Path,
    allow_config_change: bool = False,
    stop_after_images: int | None = None,
    quiet: bool = False,
) -> Path:
    """Train until cfg.train.total_images (or stop_after_images), checkpointing on the way. Returns run_dir."""
    d = distributed.init_distributed(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    with distributed.lost_process_errors(d, cfg.train.dist_timeout_s):
        return _train(cfg, Path(run_dir), d, allow_config_change, stop_after_images, quiet)


def _train(
    cfg: RunConfig,
    run_dir: Path,
    d: distributed.Dist,
    allow_config_change: bool,
    stop_after_images: int | None,
    quiet: bool,
) -> Path:
    device, tc = d.device, cfg.train
    say = print_status if d.is_main and not quiet else (lambda *_: None)
    micro, rounds = batch_split(tc, d.world_size)
    check_wandb(cfg)
    autoencoder, text_encoder, model, init_report = build_components(cfg, run_dir, device, say)
    # Activation checkpointing, compilation, then DDP or FSDP/HSDP (of the EMA too), from outside the model; the
    # optimizer is built on the parameters as sharded.
    ema = EMA(model, cfg)
    train_model = parallel.parallelize(model, ema, d, tc)
    state = TrainingState(model, ema, build_optimizer(model.parameters(), tc, device.type))
    sharded = tc.parallel in parallel.SHARDED_MODES
    objective = build_objective(cfg)
    extra_pass = spec_of(model).extra_pass(model)  # a backbone's second loss per step (MDT-v2's masked pass)
    # The run folder is written only once the config has built (a bad key or preset leaves nothing behind).
    if d.is_main:
        prepare_run_dir(cfg, run_dir, allow_config_change, True)
        if init_report is not None:
            from ..transfer.init import write_report

            write_report(init_report, cfg.init.source, run_dir)
    distributed.barrier(d)
    last_good = resume(state, cfg, run_dir, d, say)
    if device_skip(state.optimizer):  # skipped steps are counted on the device
        state.skips = SkipCounter(device, state.nan_skips)

    # Data from the stream position the run has reached; the source fixes the classes the model must hold.
    # Training ends on a whole step: a length that is not a multiple of the global batch is rounded up, with a note.
    total = -(-tc.total_images // tc.global_batch) * tc.global_batch
    end = -(-min(total, stop_after_images or total) // tc.global_batch) * tc.global_batch
    if total != tc.total_images:
        say(
            f"note: train.total_images {tc.total_images:,} is not a multiple of the global batch {tc.global_batch}: "
            f"training {total:,} images"
        )
    batches, source = training_batches(cfg, d, micro, rounds, state.images_seen, end)
    check_data_matches_model(cfg, source)
    num_classes = getattr(source, "num_classes", 0) or cfg.model.num_classes
    logger = RunLogger(run_dir, enabled=d.is_main, resume_at=state.images_seen, config=to_dict(cfg))
    say(
        f"{cfg.model.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, "
        f"{d.world_size} process(es) ({tc.parallel}), global batch {tc.global_batch} = {micro} x {d.world_size} "
        f"x {rounds}"
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision in ("bf16", "fp8"))
    stats = StepStats(device, state.images_seen)
    signals = StopSignals(d)  # SIGTERM / SIGINT / SIGUSR1: finish the step, checkpoint, exit

    def check_weights_finite() -> None:
        """A deferred check (at log and checkpoint time, not every step: no host sync per step), over every
        process's shards when sharded."""
        bad = nonfinite_count(parallel.local(list(model.parameters()) + list(state.ema.model.parameters())))
        bad = int(distributed.all_reduce_max(bad.to(device), d).item())
        if bad:
            raise TrainingDiverged(state.images_seen, f"{bad:,} non-finite weights", last_good, run_dir)

    def check_skips() -> None:
        """The device-side count of skipped steps (optimizers that skip on the device), read at status lines and
        checkpoints: the run diverged if the skips in a row ever exceeded train.max_nan_skips."""
        if state.skips is None:
            return
        state.nan_skips, skipped, exceeded_at = state.skips.read()
        if skipped and d.is_main:
            print_status(
                f"non-finite gradients: {skipped} step(s) skipped since the last status line ({state.nan_skips} in a "
                "row now)"
            )
        if exceeded_at >= 0:
            raise TrainingDiverged(
                exceeded_at, f"{tc.max_nan_skips + 1} consecutive steps with non-finite gradients", last_good, run_dir
            )

    def log_status(images: int) -> None:
        check_skips()
        check_weights_finite()
        record = stats.record(d, images, state.step, state.optimizer.param_groups[0]["lr"])
        logger.log(record)
        say(status_line(images, total, record["loss"], record["images_per_s"], record["memory_gb"]))

    pending = None  # a sharded checkpoint still being written (train.async_checkpoint)

    def finish_pending() -> None:
        nonlocal last_good, pending
        if pending is not None:
            last_good, pending = pending.finish(d), None
            if d.is_main:
                prune_checkpoints(run_dir, tc.keep_checkpoints)

    def save_checkpoint(images: int) -> None:
        nonlocal last_good, pending
        check_skips()
        check_weights_finite()  # non-finite weights are never written
        finish_pending()  # the previous asynchronous write counts once it is complete
        written = state.save(run_dir, cfg, d, sharded, tc.async_checkpoint)
        if isinstance(written, Path):
            last_good = written
            if d.is_main:
                prune_checkpoints(run_dir, tc.keep_checkpoints)
        else:
            pending = written
            if not tc.async_checkpoint:
                finish_pending()
        distributed.barrier(d)

    # Hooks, in the order they run after a step. Validation, small-N metrics and grids use the EMA weights on
    # process 0 and write eval.jsonl / samples/.
    hooks = [Every(tc.log_every_images, state.images_seen, log_status, forced=True)]
    hooks += evaluation_hooks(cfg, state, objective, autoencoder, text_encoder, num_classes, d, run_dir, logger)
    hooks.append(Every(tc.checkpoint_every_images, state.images_seen, save_checkpoint, forced=True))

    try:
        while state.images_seen < end:
            # ---- this step's micro-batches (crops and flips were drawn from each sample's seed by the loader).
            micro_batches = [next(batches) for _ in range(rounds)]
            latent_shape = batch_latent_shape(micro_batches[0], autoencoder)  # one bucket per global batch

            # ---- the step's global randomness; this process takes its slices.
            G = tc.global_batch
            gen = torch.Generator(device).manual_seed(step_seed(tc.seed, state.step))
            times = objective.sample_time(G, gen, device)
            noise = torch.randn((G, *latent_shape), generator=gen, device=device)
            posterior_noise = torch.randn((G, *latent_shape), generator=gen, device=device)
            drop = torch.rand(G, generator=gen, device=device) < tc.class_dropout
            # A backbone's extra pass draws its randomness here (MDT-v2: the tokens each sample keeps).
            extra_drawn = extra_pass.draw(G, gen, device) if extra_pass is not None else None
            # Control metadata has its own guidance dropout, drawn independently of the semantic one.
            drop_control = (
                torch.rand(G, generator=gen, device=device) < cfg.conditioning.control_dropout
                if cfg.conditioning.control
                else None
            )

            # ---- forward and backward, micro-batch by micro-batch; DDP syncs gradients on the last one.
            state.optimizer.zero_grad(set_to_none=True)
            for r, batch in enumerate(micro_batches):
                lo = (r * d.world_size + d.rank) * micro
                part = slice(lo, lo + micro)
                if "latent_mean" in batch:  # from the cache: sample the stored posterior
                    mean, std = (
                        batch["latent_mean"].to(device, non_blocking=True),
                        batch["latent_std"].to(device, non_blocking=True),
                    )
                    x0 = autoencoder.latents(mean, std, posterior_noise[part])
                else:
                    x0 = autoencoder.encode(batch["image"].to(device, non_blocking=True), posterior_noise[part])
                cond = cond_from_batch(
                    cfg,
                    batch,
                    text_encoder,
                    drop[part],
                    device,
                    drop_control=None if drop_control is None else drop_control[part],
                    padding_seeds=[step_seed(tc.seed, state.step) + lo + i for i in range(micro)],
                )
                extra = (extra_pass.kwargs(extra_drawn, part),) if extra_pass is not None else ()
                with parallel.gradient_sync(train_model, sync=r == rounds - 1):
                    with autocast:
                        terms = training_loss(objective, train_model, x0, cond, times[part], noise[part], extra)
                    # Sum over this slice, scaled so that DDP's mean over processes is the global-batch mean.
                    (terms["loss"].sum() * d.world_size / G).backward()
                stats.add(terms)
            stats.n += micro * rounds

            # ---- NaN guard (every process agrees on skipping), then the update, lr schedule and EMA.
            stats.add_grad_norm(update(state, cfg, d, run_dir, last_good))
            state.images_seen += G
            state.step += 1

            # ---- status line, evaluation, checkpoint (the last two also at the end and on a stop signal).
            stopping = signals.requested()  # every process agrees
            for hook in hooks:
                hook(state.images_seen, finishing=state.images_seen >= end or stopping)
            if stopping:
                finish_pending()
                raise TrainingStopped(signals.name, state.images_seen, last_good)
        finish_pending()
    finally:
        signals.restore()
        logger.close()
    if d.is_main:
        plot_loss_curve(run_dir)
    return run_dir


def batch_split(tc, world_size: int) -> tuple[int, int]:
    """(micro batch, accumulation rounds): global batch = micro batch x processes x rounds."""
    micro = tc.micro_batch or tc.global_batch // world_size
    if tc.global_batch % (micro * world_size):
        raise ConfigError(
            f"config key 'train.global_batch': {tc.global_batch} is not a multiple of micro batch {micro} "
            f"x {world_size} processes"
        )
    return micro, tc.global_batch // (micro * world_size)


def build_components(cfg: RunConfig, run_dir: Path, device, say):
    """(autoencoder, text encoder or None, model, init report or None) for a run, checked against each other."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    autoencoder = build_autoencoder(cfg.autoencoder, cfg.data.channels).to(device)
    if cfg.data.resolution // autoencoder.downsample != cfg.model.input_size:
        raise ConfigError(
            f"config key 'model.input_size': {cfg.model.input_size} does not match data.resolution "
            f"{cfg.data.resolution} / autoencoder downsampling {autoencoder.downsample}"
        )
    if autoencoder.latent_channels != cfg.model.in_channels:
        raise ConfigError(
            f"config key 'model.in_channels': {cfg.model.in_channels}, but the autoencoder gives "
            f"{autoencoder.latent_channels} latent channels"
        )
    # Captions are encoded on the fly unless the cache holds their embeddings.
    text_encoder = (
        build_text_encoder(cfg, device) if cfg.model.conditioning != "class" and not cfg.data.from_cache else None
    )
    if text_encoder is not None:
        check_text_width(cfg, text_encoder.name, text_encoder.pooled_dim, text_encoder.token_dim)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.conditioning)
    # A new run may start from another model's weights (resolution, dataset or conditioning transfer); every
    # tensor's fate is reported and written to init.json. A run with checkpoints resumes from them instead.
    init_report = None
    if cfg.init.source and latest_checkpoint(run_dir) is None:
        from ..transfer.init import initialize_from

        init_report = initialize_from(model, cfg, log=say)
    return autoencoder, text_encoder, model.to(device), init_report


def resume(state: TrainingState, cfg: RunConfig, run_dir: Path, d: distributed.Dist, say) -> Path | None:
    """Load the newest checkpoint that verifies against its checksum and holds the whole state; newer broken ones
    are reported and left in place (never deleted: they may be wanted for forensics). Returns its path or None."""
    report = print_status if d.is_main else (lambda *_: None)
    if d.is_main:
        for partial in remove_partial_writes(run_dir):
            report(f"removed {partial.name}, a checkpoint write that was interrupted")
    path, saved = newest_intact_checkpoint(run_dir, report=report, tensors=False)  # shards: loaded below
    if path is None:
        return None
    state.load_state_dict(saved, path, d)
    saved_world = saved.get("world_size", d.world_size)
    if cfg.data.name == "shards" and not cfg.data.from_cache and saved_world != d.world_size:
        raise ConfigError(
            f"this run streams shards split over {saved_world} process(es); resume it with {saved_world}, "
            f"not {d.world_size} (or train from the latent cache, which does not depend on the process count)"
        )
    say(f"resumed from {path} at {state.images_seen:,} images")
    return path


def update(
    state: TrainingState, cfg: RunConfig, d: distributed.Dist, run_dir: Path, last_good: Path | None
) -> torch.Tensor | None:
    """Skip the step when any process has non-finite gradients (TrainingDiverged after train.max_nan_skips in a
    row); else clip, set the scheduled lr, step the optimizer and update the EMA. Returns the gradient norm before
    clipping (None when the step was skipped on the host).

    An optimizer that skips on the device (optim.device_skip) decides without a host sync: it reads the 0/1 flag
    optimizer.found_inf, the EMA update is weighted by the same flag and state.skips counts the skipped steps on the
    device (read at status lines and checkpoints). Its non-finite norm is returned, which the statistics skip."""
    tc = cfg.train
    grads = [p.grad for p in state.model.parameters() if p.grad is not None]
    # one fused reduction (over all processes' shards when sharded); NaN/inf if any gradient is
    grad_norm = parallel.full_value(torch.nn.utils.get_total_norm(grads))
    finite = distributed.all_reduce_mean(torch.isfinite(grad_norm).float(), d)
    keep = None  # host-side skipping
    if device_skip(state.optimizer):
        keep = (finite >= 1.0).float()
        state.optimizer.found_inf = 1 - keep
    elif finite.item() < 1.0:
        state.nan_skips += 1
        state.optimizer.zero_grad(set_to_none=True)
        if d.is_main:
            print_status(
                f"non-finite gradients at {state.images_seen:,} images: step skipped ({state.nan_skips} in a row)"
            )
        if state.nan_skips > tc.max_nan_skips:
            raise TrainingDiverged(
                state.images_seen, f"{state.nan_skips} consecutive steps with non-finite gradients", last_good, run_dir
            )
        return None
    else:
        state.nan_skips = 0
    if tc.grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(state.model.parameters(), tc.grad_clip, grad_norm)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(tc, state.images_seen)
    state.optimizer.step()
    state.ema.update(state.model, state.images_seen, keep=keep)
    if keep is not None:
        state.skips.add(1 - keep, state.images_seen, tc.max_nan_skips)
    return grad_norm


def evaluation_hooks(cfg, state, objective, autoencoder, text_encoder, num_classes, d, run_dir, logger) -> list[Every]:
    """Signals for comparing runs while they train, from the EMA weights: the fixed-batch validation loss and
    small-N metrics (eval.jsonl), and sample grids (samples/grid-<images>.png). Process 0 computes them; every
    process runs the hooks, since a sharded EMA is gathered for them."""
    tc, device = cfg.train, d.device
    validator = (
        Validator(cfg, objective, autoencoder, text_encoder, device) if tc.val_every_images and d.is_main else None
    )

    def on_ema(work):
        def hook(images: int) -> None:
            with state.ema.evaluation_model(d, device) as ema:
                if ema is not None:
                    work(ema, images)

        return hook

    def validation(ema, images: int) -> None:
        logger.log({"images": images, **validator.loss(ema)}, file="eval.jsonl")

    def metrics(ema, images: int) -> None:
        found = quick_metrics(ema, cfg, objective, autoencoder, device, run_dir, cfg.eval.train_metric_images)
        logger.log({"images": images, **found}, file="eval.jsonl")

    def grid(ema, images: int) -> None:
        labels, per = grid_labels(cfg, num_classes)
        samples = generate(
            ema, cfg, objective, autoencoder, labels, list(range(len(labels))), device, text_encoder=text_encoder
        )
        logger.image("samples", save_grid(samples, run_dir / "samples" / f"grid-{images:010d}.png", per), images)

    return [
        Every(interval, state.images_seen, on_ema(work))
        for interval, work in (
            (tc.val_every_images, validation),
            (tc.metric_every_images, metrics),
            (tc.sample_every_images, grid),
        )
        if interval
    ]


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
            raise ConfigError(
                f"config key 'model.in_channels': {m.in_channels}, but the cache at {cfg.data.cache} holds "
                f"{shape[0]}-channel latents"
            )
        if m.conditioning == "class" and classes == 0:
            raise ConfigError(
                f"config key 'model.conditioning': the cache at {cfg.data.cache} has no class labels; use pooled_text"
            )
        if m.conditioning != "class":
            text = source.manifest.get("text_encoder")
            if not source.has_text:
                raise ConfigError(
                    f"config key 'text.encoder': the cache at {cfg.data.cache} holds no text embeddings; encode with "
                    "a text encoder"
                )
            check_text_width(cfg, f"cache's {text['name']}", text["pooled_dim"], text["token_dim"])


def check_text_width(cfg, encoder_name: str, pooled_dim: int, token_dim: int) -> None:
    m = cfg.model
    if m.conditioning == "pooled_text" and pooled_dim != m.pooled_dim:
        raise ConfigError(
            f"config key 'model.pooled_dim': {m.pooled_dim}, but the {encoder_name} pooled vectors have {pooled_dim}"
        )
    if m.conditioning == "text" and token_dim != m.context_dim:
        raise ConfigError(
            f"config key 'model.context_dim': {m.context_dim}, but the {encoder_name} tokens have {token_dim}"
        )


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
