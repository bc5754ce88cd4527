"""Sample outpaintings of held-out clips during training: an mp4 per clip and one PNG frame grid.

The grid has two rows per clip: the source as it sits in the output frame (the region to generate black),
then the outpainting. Validation (training/validation.py) writes its own grid here too: clips with known
ground truth, four rows each. Samples use the EMA parameters, as an exported model would, and the config's sampler
settings, as outpaint / infer / evaluate would.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import numpy as np

from m3ddm_jax.evaluation import black_bands
from m3ddm_jax.sampling.pipeline import Outpainter, compose_output
from m3ddm_jax.video.canvas import Layout, make_canvas
from m3ddm_jax.video.grid import frame_grid, write_png
from m3ddm_jax.video.io import Video, read_video, write_video

if TYPE_CHECKING:
    from m3ddm_jax.training.validation import HeldOutClip


def load_videos(paths: Sequence[str], max_frames: int) -> list[tuple[str, Video]]:
    return [(os.path.splitext(os.path.basename(p))[0], read_video(p, max_frames=max_frames)) for p in paths]


def _source_in_output(frames: np.ndarray, layout: Layout) -> np.ndarray:
    """The output frames with nothing generated: the source where it is kept, black elsewhere."""
    canvas = make_canvas(frames, layout)
    return compose_output(np.zeros_like(canvas.masked), frames, canvas, layout)


def write_samples(folder: str, outpainter: Outpainter, videos: Sequence[tuple[str, Video]], ratio: str,
                  grid_columns: int) -> str:
    """Outpaints each video to `ratio`; returns the grid's path."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for name, video in videos:
        result = outpainter.outpaint(video.frames, float(video.fps), ratio)
        write_video(os.path.join(folder, f"{name}.mp4"), result.frames, video.fps)
        rows += [_source_in_output(video.frames, result.layout), result.frames]
    path = os.path.join(folder, "grid.png")
    write_png(path, frame_grid(rows, columns=grid_columns))
    return path


def write_validation_grid(path: str, clips: Sequence[HeldOutClip], estimates: Sequence[np.ndarray],
                          results: Sequence[np.ndarray], grid_columns: int) -> str:
    """Five rows per held-out clip: the source with its bands black, their TELEA fill, the model's one-step
    estimate and its result (`estimates`, `results`, one per clip), the ground truth. Returns `path`."""
    rows = []
    for clip, estimate, result in zip(clips, estimates, results, strict=True):
        rows += [black_bands(clip.frames, clip.band), clip.telea, estimate, result, clip.frames]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_png(path, frame_grid(rows, columns=grid_columns))
    return path
