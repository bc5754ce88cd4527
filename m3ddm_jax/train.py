"""Train M3DDM: `python -m m3ddm_jax.train --config configs/NAME.py [--config.key=value ...] [--workdir DIR]`.

clips (grain) -> masks + CFG dropout -> latents -> DDPM noise -> 3D UNet -> epsilon MSE -> sharded AdamW
step -> EMA -> orbax checkpoint. Resumes from the newest complete checkpoint in the workdir, data position
included. Multi-host: set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (or the flags); each
process feeds its own data shard and one checkpoint is written.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from m3ddm_jax import sharding
from m3ddm_jax.data.pipeline import make_dataset
from m3ddm_jax.sampling.pipeline import Outpainter
from m3ddm_jax.training import checkpoint, samples
from m3ddm_jax.training.metrics_log import MetricsLog
from m3ddm_jax.training.trainer import build_trainer, data_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (get_config())", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, samples (default: config.workdir)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")

log = logging.getLogger("m3ddm_jax.train")


def sample(cfg, trainer, workdir: str, step: int) -> None:
    """Outpaints the held-out clips with the EMA parameters (process 0 writes them)."""
    if not cfg.sample.videos:
        return
    unet = trainer.ema_unet()
    if jax.process_index() != 0:
        return
    outpainter = Outpainter(unet, trainer.codec, cfg.scheduler.to_dict(), steps=cfg.sample.steps,
                            guidance_scale=cfg.sample.guidance_scale,
                            global_guidance_scale=cfg.sample.global_guidance_scale)
    videos = samples.load_videos(cfg.sample.videos, cfg.sample.max_frames)
    grid = samples.write_samples(os.path.join(workdir, "samples", f"step_{step:07d}"), outpainter, videos,
                                 cfg.sample)
    log.info("samples of step %d: %s", step, grid)


def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    os.makedirs(workdir, exist_ok=True)
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh.to_dict()))
    data_iter = iter(make_dataset(data_config(cfg), seed=cfg.seed, shard_index=jax.process_index(),
                                  shard_count=jax.process_count()))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=cfg.checkpoint_every,
                                   keep=cfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        trainer.state = ckpt.restore(start, checkpoint.abstract_like(trainer.state, trainer.state_shardings),
                                     data_iter)
        log.info("resumed from step %d", start)
    metrics_log = MetricsLog(workdir, start_step=start, total_steps=cfg.total_steps,
                             write=jax.process_index() == 0)
    config_json = json.loads(cfg.to_json_best_effort())

    last, skipped_videos = {}, 0
    t_last, s_last = time.perf_counter(), start
    for step in range(start, cfg.total_steps):
        batch = next(data_iter)
        skipped_videos += int(np.sum(batch.pop("skipped")))
        metrics = trainer.step(batch)
        done = step + 1
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
                raise FloatingPointError(
                    f"{last['skipped_steps']} step(s) up to step {done} had a non-finite loss or gradient (they "
                    f"were not applied); the last checkpoint is step {ckpt.latest_step()}. Lower the learning "
                    f"rate or check the data, or set nonfinite='skip' to step over such batches.")
        metrics_log.advance(done)
        ckpt.save(done, trainer.state, data_iter, config_json, force=done == cfg.total_steps)
        if done == cfg.total_steps or (cfg.sample.every and done % cfg.sample.every == 0):
            sample(cfg, trainer, workdir, done)
    ckpt.wait()
    ckpt.close()
    metrics_log.close()
    return last


def main(argv) -> None:
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every save at INFO
    logging.getLogger("m3ddm_jax").setLevel(logging.INFO)
    cfg = _CONFIG.value
    if cfg.compilation_cache:
        # A restarted or resumed run (preemption, the resume test) reuses compiled steps from disk.
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    sharding.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    workdir = _WORKDIR.value or cfg.workdir
    if not workdir:
        raise app.UsageError("set --workdir or config.workdir")
    train(cfg, workdir)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
