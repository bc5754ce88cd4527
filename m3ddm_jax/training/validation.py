"""Held-out validation during training: a validation loss on fixed draws, and the EMA model's outpainting of
clips whose ground truth is known, scored against it and against the TELEA fill of the same bands.

On held-out clips (`config.validation.videos`, videos the run does not train on), every `every` steps and
when training ends:

* Validation loss (`val_loss`): the epsilon MSE (objective.noise_error: the paper's loss whatever the run's
  prediction type and loss weighting) on a fixed set. Per video, `clips` clips drawn once from `seed` by the
  training clip, mask and guide-frame sampler (the training distribution), CFG dropout off; each clip at
  `timesteps` noise levels spread evenly over the schedule, t_j = floor((j + 1/2) T / timesteps), with
  noise drawn once from `seed`. The same draws at every step and in every run of the same clip config, so
  the figure compares across steps and runs (runs with another zero-terminal-SNR setting have other noise
  levels at the same t).
* Outpainting (`val_psnr_generated`, `val_ssim_generated`): evaluate's band protocol (m3ddm_jax.evaluation):
  the first `max_frames` frames resized to `frame_size`, bands of round(mask_ratio W / 2) pixels generated
  on both sides, the centre kept, the model's result scored by PSNR and SSIM in the generated bands; next
  to it the TELEA fill of the same bands (`telea_psnr_generated`, `telea_ssim_generated`). The canvas is
  the frame itself (a native canvas of long side max(frame_size)), so the condition is exactly the
  black-banded ground truth and the TELEA fill is the sampler's init; the other sampler settings are the
  run's (`config.sampler`).
* The model's one-step estimate (`estimate_psnr_generated`, `estimate_ssim_generated`): the same outpainting
  in one DDIM step from pure noise at the last training timestep, conditional branch only: the model's x0
  prediction from the condition alone, the mean of what it samples (exactly so for v-prediction with zero
  terminal SNR). A sample from a calibrated model lies ~3 dB under its mean, so a sample PSNR far under
  the estimate's points at the sampler, an estimate under the TELEA fill at the model.

The model is the EMA one, as exported and sampled. The metrics go to metrics.jsonl and TensorBoard (group
`val`); a frame grid (rows per clip: the source with its bands black, the TELEA fill, the one-step estimate,
the model's result, the ground truth) to WORKDIR/validation/step_N/grid.png. One process computes and writes
(train.py).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax import evaluation
from m3ddm_jax import jitting
from m3ddm_jax.data.clips import ClipConfig
from m3ddm_jax.data.masks import MaskConfig
from m3ddm_jax.data.pipeline import VideoExamples
from m3ddm_jax.data.sources import FileVideo
from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule
from m3ddm_jax.sampling.pipeline import Outpainter, make_layout
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.training import objective, samples
from m3ddm_jax.training.step import BATCH_KEYS
from m3ddm_jax.video.io import read_video

FOLDER = "validation"
GROUP = "val"  # TensorBoard group of the metrics


def estimate_sampler(scheduler_config: dict, settings: SamplerSettings) -> tuple[dict, SamplerSettings]:
    """The scheduler config and sampler settings of the one-step estimate (module docstring): one DDIM step
    from the last training timestep (trailing spacing), conditional branch only."""
    return ({**scheduler_config, "timestep_spacing": "trailing"},
            settings.replace(scheduler="ddim", steps=1, strength=1.0, guidance_scale=1.0, global_guidance_scale=1.0))


@dataclasses.dataclass(frozen=True)
class HeldOutClip:
    """One held-out clip at the protocol's size, with its bands and the TELEA baseline's result."""
    name: str
    frames: np.ndarray  # (N, H, W, 3) uint8: the ground truth
    fps: float
    band: int
    telea: np.ndarray  # (N, H, W, 3) uint8
    telea_scores: dict[str, float]


def settings_for(cfg, settings: SamplerSettings) -> SamplerSettings:
    """The run's sampler settings on the protocol's canvas: the frame itself."""
    return settings.replace(canvas_mode="native", canvas_size=max(cfg.validation.frame_size))


def check(cfg, settings: SamplerSettings, multiple: int) -> None:
    """Start-up checks of config.validation (the held-out clips exist, the protocol's canvas is the frame)."""
    v = cfg.validation
    for video in v.videos:
        if not os.path.isfile(video):
            raise FileNotFoundError(f"validation.videos: held-out clip {video} does not exist")
    if min(v.clips, v.timesteps, v.max_frames) < 1 or v.every < 0:
        raise ValueError(f"validation.clips, .timesteps and .max_frames must be >= 1 and .every >= 0; got {v.clips}, "
                         f"{v.timesteps}, {v.max_frames}, {v.every}")
    if not v.videos:
        return
    h, w = v.frame_size
    band = evaluation.band_width(w, v.mask_ratio)
    canvas = settings_for(cfg, settings)
    fix = f"use sides that are multiples of {multiple}"
    try:
        layout = make_layout((h, w - 2 * band), w / h, "native", canvas_size=canvas.canvas_size, multiple=multiple)
    except ValueError as err:
        raise ValueError(f"validation.frame_size={tuple(v.frame_size)}: {err}; {fix}") from err
    if layout.canvas_hw != (h, w):
        raise ValueError(f"validation.frame_size={tuple(v.frame_size)}: the protocol's canvas would be "
                         f"{layout.canvas_hw}, not the frame; {fix}")


class Validator:
    """The fixed validation set of a run and its evaluation of a UNet (see the module docstring)."""

    def __init__(self, cfg, codec, settings: SamplerSettings):
        v = cfg.validation
        self.cfg, self.codec = cfg, codec
        self.scheduler_config = cfg.scheduler.to_dict()
        self.settings = settings_for(cfg, settings)
        self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        self.clips = [self._held_out(path) for path in v.videos]
        self.batches = [self._loss_batch(path, i) for i, path in enumerate(v.videos)]
        t = self.schedule.num_train_timesteps
        self.timesteps = ((np.arange(v.timesteps) + 0.5) * t / v.timesteps).astype(np.int32)

    def _held_out(self, path: str) -> HeldOutClip:
        v = self.cfg.validation
        video = read_video(path, max_frames=v.max_frames)
        frames = evaluation.prepare(video.frames, tuple(v.frame_size))
        band = evaluation.band_width(frames.shape[2], v.mask_ratio)
        telea = evaluation.telea_bands(frames, band)
        return HeldOutClip(os.path.splitext(os.path.basename(path))[0], frames, float(video.fps), band, telea,
                           evaluation.image_scores(telea, frames, band))

    def _loss_batch(self, path: str, index: int) -> dict[str, np.ndarray]:
        """`clips` clips of one video from the training sampler (seeded per clip), unaugmented, CFG dropout off."""
        v, data = self.cfg.validation, self.cfg.data
        examples = VideoExamples([FileVideo.open(path)], range(1),
                                 ClipConfig(**data.clip.to_dict()).without_augmentation(),
                                 MaskConfig(**data.masks.to_dict()), max_consecutive_skips=0)
        drawn = [examples(0, np.random.default_rng([v.seed, index, i])) for i in range(v.clips)]
        batch = {k: np.stack([e[k] for e in drawn]) for k in BATCH_KEYS if k in drawn[0]}
        batch["drop_local"] = np.zeros_like(batch["drop_local"])
        batch["drop_global"] = np.zeros_like(batch["drop_global"])
        return batch

    def loss(self, unet: nnx.Module) -> float:
        graphdef, state = nnx.split(unet)
        codec_graphdef, codec_state = nnx.split(self.codec)
        static = jitting.Static((graphdef, codec_graphdef, self.schedule, self.cfg.get("vae_frames_per_call", 0)))
        errors = [_noise_errors(static, state, codec_state, batch,
                                jax.random.fold_in(jax.random.key(self.cfg.validation.seed), i), self.timesteps)
                  for i, batch in enumerate(self.batches)]
        return float(np.mean([np.mean(e) for e in errors]))

    def __call__(self, unet: nnx.Module, folder: str | None = None) -> dict[str, float]:
        """The metrics of `unet` (float means over the held-out clips); with `folder`, the frame grid there."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        record = {"val_loss": self.loss(unet)}
        samplers = {"val": Outpainter(unet, self.codec, self.scheduler_config, self.settings),
                    "estimate": Outpainter(unet, self.codec, *estimate_sampler(self.scheduler_config, self.settings))}
        results = {name: [evaluation.outpaint_bands(outpainter, clip.frames, clip.fps, clip.band,
                                                    evaluation.video_key(self.settings.seed, clip.name))
                          for clip in self.clips] for name, outpainter in samplers.items()}
        scores = {name: [evaluation.image_scores(r, clip.frames, clip.band) for r, clip in zip(rs, self.clips)]
                  for name, rs in results.items()}
        scores["telea"] = [c.telea_scores for c in self.clips]
        for prefix, rows in scores.items():
            for metric in ("psnr_generated", "ssim_generated"):
                record[f"{prefix}_{metric}"] = float(np.mean([r[metric] for r in rows]))
        if folder is not None:
            samples.write_validation_grid(os.path.join(folder, "grid.png"), self.clips, results["estimate"],
                                          results["val"], self.cfg.sample.grid_columns)
        record.update(val_seconds=time.perf_counter() - t0, val_cpu_seconds=time.process_time() - cpu0)
        return record


@jitting.model_jit
def _noise_errors(static, state, codec_state, batch, key, timesteps):
    """(timesteps, clips) noise MSE of the fixed draws for static (UNet graphdef, codec graphdef, schedule, VAE
    frames per call, as in the train step): inputs and noise from `key`, one pass per t."""
    graphdef, codec_graphdef, schedule, frames_per_call = static.value
    unet, codec = nnx.merge(graphdef, state), nnx.merge(codec_graphdef, codec_state)
    k_inputs, k_noise = jax.random.split(key)
    inputs = objective.unet_inputs(codec, batch, k_inputs, frames_per_call)
    x0 = inputs["x0"]

    def one(j):
        noise = jax.random.normal(jax.random.fold_in(k_noise, j), x0.shape, jnp.float32)
        t = jnp.full((x0.shape[0],), timesteps[j])
        return objective.noise_error(unet, schedule, inputs, batch["fps"], t, noise)

    return jax.lax.map(one, jnp.arange(len(timesteps)))
