"""Train M3DDM: `python -m m3ddm_jax.train --config configs/NAME.py [--config.key=value ...] [--workdir DIR]`.

clips (grain) -> masks + CFG dropout -> latents -> DDPM noise -> 3D UNet -> (weighted) epsilon or v MSE ->
sharded AdamW step -> EMA -> orbax checkpoint. Resumes from the newest checkpoint in the workdir that restores, data
position included (a damaged newer one is logged and set aside: m3ddm_jax/training/checkpoint.py). A step whose loss
or gradient is not finite is not applied: `nonfinite='halt'` stops the run at the next log step, `nonfinite='skip'`
goes on but stops after `max_consecutive_skips` skipped steps in a row. Multi-host: set JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID (or the flags); each process feeds its own data shard and one checkpoint is
written.

The config is checked before any work (`check_config`): a missing section or key, a missing weights folder
or held-out clip, bad sampler settings stop the run at start-up with a message naming them. The workdir
gets model/ (the UNet's config, the latent space, the noise schedule) when a run starts, so that
`tools/convert_checkpoint.py export --src WORKDIR --dst OUT` can turn any checkpoint into a weights folder.
In-training samples (`config.sample`: which clips, when) use the EMA parameters and the config's sampler
settings (`config.sampler`, as outpaint / infer / evaluate read them). Validation (`config.validation`,
m3ddm_jax/training/validation.py) scores the run on held-out clips with known ground truth at step 0, every
`validation.every` steps and when training ends: a fixed-draw validation loss, and the EMA model's
outpainting of masked bands against the TELEA fill of the same bands, into metrics.jsonl (rows with
"group": "val") and TensorBoard (val/), its grid to WORKDIR/validation/step_N/grid.png.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from m3ddm_jax import configlib, pretrained, sharding
from m3ddm_jax.data.pipeline import make_dataset
from m3ddm_jax.models.pixel_space import PixelSpaceConfig
from m3ddm_jax.models.unet3d import UNet3DConfig
from m3ddm_jax.sampling.pipeline import Outpainter, canvas_multiple, make_layout
from m3ddm_jax.sampling.schedule import WINDOW
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule
from m3ddm_jax.training import checkpoint, export, objective, samples, validation
from m3ddm_jax.training.metrics_log import MetricsLog
from m3ddm_jax.training.trainer import build_trainer, data_config, data_sources, per_host_batch_size
from m3ddm_jax.video.canvas import NUM_GLOBAL_FRAMES

log = logging.getLogger("m3ddm_jax.train")


# Every key the run reads; sections read as a whole by a dataclass with defaults (data, model) are checked
# there. `sampler` must hold exactly SamplerSettings' fields.
REQUIRED_KEYS = (
    "seed", "workdir", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "compute_dtype", "remat",
    "attention", "nonfinite", "max_consecutive_skips", "compilation_cache", "latent.kind", "latent.factor",
    "latent.weights", "init.weights", "init.temporal_identity", "model", "scheduler", "loss.weighting",
    "loss.snr_gamma", "data.global_batch_size", "data.clip", "optim.lr", "optim.warmup_steps", "optim.decay",
    "optim.end_lr_factor", "optim.b1", "optim.b2", "optim.eps", "optim.weight_decay", "optim.grad_clip",
    "optim.ema_decay", "optim.total_steps", "sample.every", "sample.videos", "sample.max_frames", "sample.ratio",
    "sample.grid_columns", "validation.videos", "validation.every", "validation.clips", "validation.timesteps",
    "validation.seed", "validation.max_frames", "validation.frame_size", "validation.mask_ratio", "sampler", "mesh",
    "logical_axis_rules")
NONFINITE = ("skip", "halt")


def check_config(cfg) -> SamplerSettings:
    """Fails before any work on a config that cannot run to the end; returns its sampler settings."""
    configlib.require(cfg, REQUIRED_KEYS, "configs/demo.py")
    settings = SamplerSettings.from_config(cfg.sampler)
    if cfg.total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {cfg.total_steps}")
    if cfg.nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite={cfg.nonfinite!r}; expected one of {NONFINITE}")
    if cfg.max_consecutive_skips < 1:
        raise ValueError(f"max_consecutive_skips must be >= 1, got {cfg.max_consecutive_skips}")
    if cfg.latent.kind not in ("pixel", "vae"):
        raise ValueError(f"latent.kind={cfg.latent.kind!r}: expected 'pixel' or 'vae'")
    NoiseSchedule.from_config(cfg.scheduler.to_dict())  # prediction type, spacing, zero-SNR rescaling
    if cfg.loss.weighting not in objective.LOSS_WEIGHTINGS:
        raise ValueError(f"loss.weighting={cfg.loss.weighting!r}; expected one of {objective.LOSS_WEIGHTINGS}")
    if cfg.loss.snr_gamma <= 0:
        raise ValueError(f"loss.snr_gamma must be > 0, got {cfg.loss.snr_gamma}")
    if cfg.init.temporal_identity and cfg.init.weights:
        raise ValueError("init.temporal_identity applies to a UNet from scratch; init.weights already sets the "
                         "temporal layers (inflation starts them as the identity)")
    if cfg.latent.kind == "vae" and not cfg.latent.weights:
        raise ValueError("latent.kind='vae' needs latent.weights, a weights folder with the SD VAE")
    for key, folder, sub in (("init.weights", cfg.init.weights, pretrained.UNET),
                             ("latent.weights", cfg.latent.kind == "vae" and cfg.latent.weights, pretrained.VAE)):
        if folder and not os.path.isdir(os.path.join(folder, sub)):
            raise FileNotFoundError(f"{key}={folder!r} is not a weights folder with {sub}/; convert one with "
                                    f"tools/convert_checkpoint.py (see the README)")
    for video in cfg.sample.videos:
        if not os.path.isfile(video):
            raise FileNotFoundError(f"sample.videos: held-out clip {video} does not exist")
    if cfg.sample.videos or cfg.validation.videos:
        settings.check_steps(cfg.scheduler.to_dict())
    if cfg.sample.videos:  # ratio, canvas mode and size at once, on a frame of the training size
        make_layout((256, 256), cfg.sample.ratio, settings.canvas_mode, canvas_size=settings.canvas_size,
                    multiple=sample_canvas_multiple(cfg))
    validation.check(cfg, settings, sample_canvas_multiple(cfg))
    clip = cfg.data.clip
    for frames in (clip.num_frames, clip.num_global_frames):
        objective.chunk_frames(cfg.get("vae_frames_per_call", 0), frames)
    if (clip.num_frames, clip.num_global_frames) != (WINDOW, NUM_GLOBAL_FRAMES):
        log.warning("data.clip has %d frames and %d global frames; the sampler outpaints windows of %d frames with "
                    "%d global frames (M3DDM's shapes), so the samples and validation of this run see temporal "
                    "positions and token counts it never trained on: train on %d and %d for a model to sample",
                    clip.num_frames, clip.num_global_frames, WINDOW, NUM_GLOBAL_FRAMES, WINDOW, NUM_GLOBAL_FRAMES)
    data_sources(cfg)  # the batch split needs the mesh: train() checks it next
    return settings


def sample_canvas_multiple(cfg) -> int:
    """What the canvas sides of the run's samples must be multiples of, from the configs alone."""
    if cfg.latent.kind == "pixel":
        latent = PixelSpaceConfig(factor=cfg.latent.factor)
    else:
        latent = pretrained.read_config(os.path.join(cfg.latent.weights, pretrained.VAE))
    unet = (pretrained.read_config(os.path.join(cfg.init.weights, pretrained.UNET)) if cfg.init.weights
            else UNet3DConfig(**cfg.model.to_dict()))
    return canvas_multiple(unet, latent)


def sample(cfg, settings: SamplerSettings, trainer, workdir: str, step: int) -> None:
    """Outpaints the held-out clips with the EMA parameters (process 0 writes them)."""
    if not cfg.sample.videos:
        return
    unet = trainer.ema_unet()
    if jax.process_index() != 0:
        return
    outpainter = Outpainter(unet, trainer.codec, cfg.scheduler.to_dict(), settings)
    videos = samples.load_videos(cfg.sample.videos, cfg.sample.max_frames)
    grid = samples.write_samples(os.path.join(workdir, "samples", f"step_{step:07d}"), outpainter, videos,
                                 cfg.sample.ratio, cfg.sample.grid_columns)
    log.info("samples of step %d: %s", step, grid)


def validate(cfg, validator: validation.Validator | None, trainer, workdir: str, step: int,
             metrics_log: MetricsLog) -> None:
    """Scores the EMA model on the held-out clips (call it on every process; process 0 computes and writes)."""
    if not cfg.validation.videos:
        return
    unet = trainer.ema_unet()
    if validator is None:
        return
    record = {"step": step, **validator(unet, os.path.join(workdir, validation.FOLDER, f"step_{step:07d}"))}
    metrics_log.write(record, group=validation.GROUP)
    log.info("validation at step %d: loss %.4f, generated-band PSNR %.2f dB (one-step estimate %.2f dB, TELEA "
             "%.2f dB)", step, record["val_loss"], record["val_psnr_generated"], record["estimate_psnr_generated"],
             record["telea_psnr_generated"])


class SkipRun:
    """Consecutive skipped (non-finite) steps. A step's `finite` flag is read once the next step is queued, so
    the host never waits for the step it has just dispatched."""

    def __init__(self):
        self.length, self.last_step, self._pending = 0, 0, None

    def push(self, step: int, finite) -> int:
        """Adds step `step`; returns the run length up to the step before it."""
        pending, self._pending = self._pending, (step, finite)
        return self._count(pending)

    def flush(self) -> int:
        pending, self._pending = self._pending, None
        return self._count(pending)

    def _count(self, pending) -> int:
        if pending is not None:
            self.last_step = pending[0]
            self.length = 0 if bool(pending[1]) else self.length + 1
        return self.length


def nonfinite_error(what: str, step: int, detail: str, last_checkpoint: int | None, remedy: str) -> FloatingPointError:
    """The stop of a run whose steps went non-finite (nonfinite='halt', or too many skipped in a row)."""
    return FloatingPointError(
        f"{what} up to step {step} had a non-finite loss or gradient ({detail}); the last checkpoint is step "
        f"{last_checkpoint}. Lower the learning rate or check the data, {remedy}.")


def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    settings = check_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    data = data_config(cfg, per_host_batch_size(cfg, mesh))  # a batch that does not split fails before any load
    os.makedirs(workdir, exist_ok=True)
    trainer = build_trainer(cfg, mesh)
    data_iter = iter(make_dataset(data, seed=cfg.seed, shard_index=jax.process_index(),
                                  shard_count=jax.process_count()))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, export.CHECKPOINTS), save_every=cfg.checkpoint_every,
                                   keep=cfg.keep_checkpoints)
    restored = ckpt.restore_latest(checkpoint.abstract_like(trainer.state, trainer.state_shardings), data_iter)
    start = restored[0] if restored else 0
    if restored:
        trainer.state = restored[1]
        log.info("resumed from step %d", start)
    elif jax.process_index() == 0:  # a resumed run keeps the model/ its checkpoints were made with
        unet_config = nnx.merge(trainer.graphdef, trainer.state.params, trainer.state.rest).config
        export.write_run_model(workdir, unet_config, trainer.codec, cfg.scheduler.to_dict())
    metrics_log = MetricsLog(workdir, start_step=start, total_steps=cfg.total_steps,
                             write=jax.process_index() == 0)
    config_json = json.loads(cfg.to_json_best_effort())
    validator = (validation.Validator(cfg, trainer.codec, settings)
                 if cfg.validation.videos and jax.process_index() == 0 else None)
    if not start:
        validate(cfg, validator, trainer, workdir, 0, metrics_log)  # step 0: what training improves on

    last, skipped_videos, skip_run = {}, 0, SkipRun()

    def check_skip_run(length: int) -> None:
        if cfg.nonfinite == "skip" and length >= cfg.max_consecutive_skips:
            ckpt.wait()
            total = int(jax.device_get(trainer.state.skipped))
            raise nonfinite_error(f"{length} consecutive steps", skip_run.last_step,
                                  f"{total} in all; they were not applied", ckpt.latest_step(),
                                  f"or raise max_consecutive_skips (now {cfg.max_consecutive_skips})")

    t_last, s_last = time.perf_counter(), start
    for step in range(start, cfg.total_steps):
        batch = next(data_iter)
        skipped_videos += int(np.sum(batch.pop("skipped")))
        metrics = trainer.step(batch)
        done = step + 1
        check_skip_run(skip_run.push(done, metrics["finite"]))
        if done % cfg.log_every == 0 or done == cfg.total_steps:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            last = {"step": done, **{k: float(v) for k, v in metrics.items() if k != "finite"},
                    "steps_per_sec": (done - s_last) / (now - t_last),
                    "skipped_steps": int(jax.device_get(trainer.state.skipped)), "skipped_videos": skipped_videos}
            t_last, s_last = now, done
            metrics_log.write(last)
            if last["skipped_steps"] and cfg.nonfinite == "halt":
                ckpt.wait()
                raise nonfinite_error(f"{last['skipped_steps']} step(s)", done, "they were not applied",
                                      ckpt.latest_step(), "or set nonfinite='skip' to step over such batches")
        metrics_log.advance(done)
        ckpt.save(done, trainer.state, data_iter, config_json, force=done == cfg.total_steps)
        if done == cfg.total_steps or (cfg.sample.every and done % cfg.sample.every == 0):
            sample(cfg, settings, trainer, workdir, done)
        if done == cfg.total_steps or (cfg.validation.every and done % cfg.validation.every == 0):
            validate(cfg, validator, trainer, workdir, done, metrics_log)
    check_skip_run(skip_run.flush())
    ckpt.wait()
    ckpt.close()
    metrics_log.close()
    skipped = int(jax.device_get(trainer.state.skipped))
    log.log(logging.WARNING if skipped else logging.INFO,
            "trained to step %d: %d of %d steps were skipped (non-finite loss or gradient), %d unreadable video(s) "
            "skipped", cfg.total_steps, skipped, cfg.total_steps, skipped_videos)
    return last


def main(argv) -> None:
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every save at INFO
    logging.getLogger("m3ddm_jax").setLevel(logging.INFO)
    args = flags.FLAGS
    cfg = args.config
    if cfg.compilation_cache:
        # A restarted or resumed run (preemption, the resume test) reuses compiled steps from disk.
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    sharding.init_distributed(args.coordinator_address, args.num_processes, args.process_id)
    workdir = args.workdir or cfg.workdir
    if not workdir:
        raise app.UsageError("set --workdir or config.workdir")
    try:
        check_config(cfg)  # train() checks again; here a bad config is one line, not a traceback
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    try:
        train(cfg, workdir)
    except (checkpoint.CheckpointRestoreError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    # Defined here rather than at import: absl flags are global, and evaluate.py and infer.py define --config too.
    config_flags.DEFINE_config_file("config", None, "training config file (get_config())", lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, samples (default: config.workdir)")
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
    flags.mark_flag_as_required("config")
    app.run(main)
