"""A tiny M3DDM trained on one clip memorises it: the loss falls, and its outpainting of that clip, through
the real trainer, data pipeline and outpainting pipeline, beats the TELEA-inpainted init in the generated
region.

Slow (about 10 minutes on 2 CPU cores): sampling only beats TELEA once the epsilon error is small at every
noise level. At 1500 steps (loss ~0.011) the samples still carry noise-like error (MAE ~17 against TELEA's
11); at 3000 steps (loss ~0.006) they reach ~9.9.
"""

import jax
import numpy as np
import pytest

from conftest import REPO
from m3ddm_jax import sharding
from m3ddm_jax.configlib import load_config
from m3ddm_jax.data.pipeline import make_dataset
from m3ddm_jax.data.sources import ArrayVideo
from m3ddm_jax.sampling.pipeline import Outpainter
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.training.trainer import build_trainer, data_config
from m3ddm_jax.video.canvas import make_canvas, resize_bilinear_antialias
from m3ddm_jax.video.io import read_video

STEPS = 3000
FPS = 12.0


def one_clip() -> np.ndarray:
    """16 frames of a bundled clip, centre square, 16x16: the ground truth of the outpainting."""
    frames = read_video(REPO / "assets" / "videos" / "caminandes_llama.mp4").frames[:32:2]
    h, w = frames.shape[1:3]
    s = min(h, w)
    square = frames[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.stack([resize_bilinear_antialias(f, (16, 16)) for f in square]).astype(np.uint8)


def config():
    c = load_config(REPO / "configs" / "test_tiny.py")
    c.total_steps = STEPS
    c.optim.update({"lr": 3e-3, "warmup_steps": 20})
    c.model.update({"block_out_channels": (32, 64), "cross_attention_dim": 64})
    # The clip as it is (no crop, stride 1) and masks of the outpainting below's geometry: two opposite
    # bands of half the frame (left+right or top+bottom). Guide frames and CFG dropout keep their defaults.
    c.data.clip.update({"num_frames": 16, "num_global_frames": 16, "fps_range": (FPS, FPS),
                        "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)})
    c.data.masks = {"ratio_range": (0.5, 0.5), "one_side_prob": 0.0, "two_sides_prob": 1.0,
                    "four_sides_prob": 0.0}
    return c


@pytest.mark.slow
def test_tiny_model_overfits_one_clip_and_beats_the_telea_init():
    gt = one_clip()
    cfg = config()
    trainer = build_trainer(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    batches = iter(make_dataset(data_config(cfg, cfg.data.global_batch_size), seed=0, source=[ArrayVideo(gt, FPS)]))
    losses = []
    for _ in range(STEPS):
        batch = next(batches)
        batch.pop("skipped")
        losses.append(float(trainer.step(batch)["loss"]))
    assert np.mean(losses[-200:]) < 0.05 * np.mean(losses[:50]), (losses[:50], losses[-200:])

    # Outpaint the clip's centre (8 of 16 columns) back to a square, with the EMA weights, no guidance.
    source = gt[:, :, 4:12]
    settings = SamplerSettings(steps=25, guidance_scale=1.0, global_guidance_scale=1.0, canvas_mode="native",
                               canvas_size=16, global_size=(16, 16))
    outpainter = Outpainter(trainer.ema_unet(), trainer.codec, cfg.scheduler.to_dict(), settings,
                            devices=jax.devices()[:1])
    result = outpainter.outpaint(source, FPS, 1.0)
    assert result.frames.shape == gt.shape
    canvas = make_canvas(source, result.layout)
    band = canvas.mask.astype(bool)
    assert band.sum() == 16 * 8
    error = lambda frames: np.abs(frames.astype(np.float32) - gt.astype(np.float32))[:, band].mean()
    telea = error(canvas.init)
    print(f"loss {np.mean(losses[:50]):.3f} -> {np.mean(losses[-200:]):.4f}; generated-region MAE "
          f"{error(result.frames):.2f} (TELEA init {telea:.2f}) uint8 levels")
    assert error(result.frames) < telea, (error(result.frames), telea)
