"""Clip sampling for training: frame-rate stride, random start, one random resized crop per clip, and the
16 global frames of the whole video.

Rules (the paper's, with the choices the paper leaves open):

* Frame rate: a target fps ~ U(fps_range) (default [1, 30]), capped at the source fps; stride =
  round(source_fps / target) (halves up), at least 1. The fps condition is the effective rate
  source_fps / stride (inference passes video_fps // stride, an integer: the difference is below 1 fps).
* A video too short for that stride takes the largest stride that fits; a video shorter than num_frames
  even at stride 1 raises VideoError (skipped and counted by the pipeline). The start is uniform over the
  positions where the clip fits.
* Crop: torchvision-style random resized crop, the same box for every frame: area ~ U(crop_scale) x frame
  area, aspect ~ log-uniform(crop_ratio) x the output's aspect (1 = no distortion after the resize), 10
  tries, then the largest centred crop of the nearest allowed aspect.
* Global frames: np.linspace(0, N - 1, 16, dtype=int) over the whole video (the official inference choice),
  cut with the clip's crop box and resized like the clip. Inference resizes the full source frame to the
  canvas instead, but with the clip's box a global frame and a clip frame cover the same view, which the
  masking of global frames inside the clip (masks.py) needs: the clip's outpainting mask then hides exactly
  the region the model has to generate.
* Augmentation (off by default, as in the paper; the demo turns it on): per clip, the same for its frames and
  global frames, a left-right mirror with `hflip_prob` and a random permutation of the RGB channels with
  `channel_shuffle_prob`. A model trained on a few videos otherwise learns their colours instead of taking
  the colours of the band from the frame's known region. Drawn after the crop and only when enabled, so a
  config without augmentation draws the same clips as before.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np

from m3ddm_jax.data.decode import VideoError
from m3ddm_jax.data.sources import Video
from m3ddm_jax.video.canvas import LATENT_FACTOR, Box, global_frame_indices


@dataclass(frozen=True)
class ClipConfig:
    num_frames: int = 16
    num_global_frames: int = 16
    size: tuple[int, int] = (256, 256)  # (H, W) of the training frames; multiples of 8 for the latent mask
    fps_range: tuple[float, float] = (1.0, 30.0)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # crop area / frame area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect / output aspect
    hflip_prob: float = 0.0  # augmentation (module docstring): mirror the clip left-right
    channel_shuffle_prob: float = 0.0  # augmentation: permute the clip's RGB channels

    def __post_init__(self):
        # ml_collections and JSON hand over lists; tuples keep the config hashable.
        for name in ("size", "fps_range", "crop_scale", "crop_ratio"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        h, w = self.size
        if h % LATENT_FACTOR or w % LATENT_FACTOR or h <= 0 or w <= 0:
            raise ValueError(f"clip size {self.size} must be positive multiples of {LATENT_FACTOR}")
        if self.num_frames < 1 or self.num_global_frames < 1:
            raise ValueError("num_frames and num_global_frames must be at least 1")
        for name, (lo, hi) in (("fps_range", self.fps_range), ("crop_scale", self.crop_scale),
                               ("crop_ratio", self.crop_ratio)):
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be 0 < low <= high, got {(lo, hi)}")
        if self.crop_scale[1] > 1:
            raise ValueError(f"crop_scale must be at most 1, got {self.crop_scale}")
        for name in ("hflip_prob", "channel_shuffle_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def without_augmentation(self) -> ClipConfig:
        """The same clips, unaugmented (held-out validation)."""
        return dataclasses.replace(self, hflip_prob=0.0, channel_shuffle_prob=0.0)


@dataclass(frozen=True)
class ClipPlan:
    frame_indices: np.ndarray  # (num_frames,) int32, ascending
    stride: int
    fps: float  # the fps condition: source fps / stride


def plan_clip(num_frames: int, source_fps: float, num_clip_frames: int, fps_range: tuple[float, float],
              rng: np.random.Generator) -> ClipPlan:
    """Stride, fps condition and frame indices of a random clip (the rules in the module docstring)."""
    if num_frames < num_clip_frames:
        raise VideoError(f"{num_frames} frames, fewer than the {num_clip_frames} a clip needs")
    target = min(rng.uniform(*fps_range), source_fps)
    stride = max(1, math.floor(source_fps / target + 0.5))
    if num_clip_frames > 1:
        stride = min(stride, (num_frames - 1) // (num_clip_frames - 1))
    span = (num_clip_frames - 1) * stride + 1
    start = int(rng.integers(0, num_frames - span + 1))
    indices = start + stride * np.arange(num_clip_frames, dtype=np.int32)
    return ClipPlan(frame_indices=indices, stride=stride, fps=source_fps / stride)


def random_resized_crop(source_hw: tuple[int, int], output_hw: tuple[int, int], scale: tuple[float, float],
                        ratio: tuple[float, float], rng: np.random.Generator) -> Box:
    """A crop box of the source frame (see the module docstring)."""
    h, w = source_hw
    out_aspect = output_hw[1] / output_hw[0]
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = out_aspect * math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return Box(y0, y0 + ch, x0, x0 + cw)
    aspect = min(max(w / h, out_aspect * ratio[0]), out_aspect * ratio[1])
    if w / h > aspect:
        ch, cw = h, max(1, round(h * aspect))
    else:
        ch, cw = max(1, round(w / aspect)), w
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return Box(y0, y0 + ch, x0, x0 + cw)


def crop_resize(frames: np.ndarray, box: Box, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the `box` of each frame resized to `size` (H, W): area averaging when both
    sides shrink, bilinear otherwise."""
    ch, cw = box.hw
    interpolation = cv2.INTER_AREA if ch >= size[0] and cw >= size[1] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f[box.y0:box.y1, box.x0:box.x1], (size[1], size[0]), interpolation=interpolation)
                     for f in frames])


def augment(frames: np.ndarray, config: ClipConfig, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W, 3) -> the clip's augmentation of all N frames (module docstring)."""
    if config.hflip_prob and rng.random() < config.hflip_prob:
        frames = frames[:, :, ::-1]
    if config.channel_shuffle_prob and rng.random() < config.channel_shuffle_prob:
        frames = frames[..., rng.permutation(3)]
    return np.ascontiguousarray(frames)


def sample_clip(video: Video, config: ClipConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A training clip of `video`: `frames` (F, H, W, 3) uint8, `global_frames` (G, H, W, 3) uint8, `fps`
    float32, and the video frame indices of both (`frame_indices`, `global_indices`, int32)."""
    plan = plan_clip(video.num_frames, video.fps, config.num_frames, config.fps_range, rng)
    box = random_resized_crop((video.height, video.width), config.size, config.crop_scale, config.crop_ratio, rng)
    global_indices = global_frame_indices(video.num_frames, config.num_global_frames).astype(np.int32)
    # A frame needed as both a clip frame and a global frame is decoded and resized once.
    needed, where = np.unique(np.concatenate([plan.frame_indices, global_indices]), return_inverse=True)
    decoded = video.read(needed)
    if decoded.shape[1:3] != (video.height, video.width):  # the crop box is in the header's size
        raise VideoError(f"decoded frames of size {decoded.shape[1:3]}, the header says "
                         f"{(video.height, video.width)}")
    frames = augment(crop_resize(decoded, box, config.size)[where], config, rng)
    return {
        "frames": frames[:config.num_frames],
        "global_frames": frames[config.num_frames:],
        "fps": np.float32(plan.fps),
        "frame_indices": plan.frame_indices,
        "global_indices": global_indices,
    }
