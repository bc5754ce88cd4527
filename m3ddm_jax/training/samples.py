"""Sample outpaintings of held-out clips during training: an mp4 per clip and one PNG frame grid.

The grid has two rows per clip: the source as it sits in the output frame (the region to generate black),
then the outpainting. Samples use the EMA parameters, as an exported model would.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from m3ddm_jax.sampling.pipeline import Outpainter
from m3ddm_jax.video.grid import frame_grid, write_png
from m3ddm_jax.video.io import Video, read_video, write_video


def load_videos(paths: Sequence[str], max_frames: int) -> list[tuple[str, Video]]:
    return [(os.path.splitext(os.path.basename(p))[0], read_video(p, max_frames=max_frames)) for p in paths]


def _source_in_output(frames: np.ndarray, output_hw: tuple[int, int], box) -> np.ndarray:
    out = np.zeros((len(frames), *output_hw, 3), np.uint8)
    out[:, box.y0:box.y1, box.x0:box.x1] = frames
    return out


def write_samples(folder: str, outpainter: Outpainter, videos: Sequence[tuple[str, Video]], cfg) -> str:
    """Outpaints each video to `cfg.ratio` (native canvas, long side `cfg.canvas_long_side`); returns the
    grid's path."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for name, video in videos:
        result = outpainter.outpaint(video.frames, float(video.fps), cfg.ratio, mode="native", key=cfg.seed,
                                     canvas_long_side=cfg.canvas_long_side, global_hw=tuple(cfg.global_hw))
        write_video(os.path.join(folder, f"{name}.mp4"), result.frames, video.fps)
        rows += [_source_in_output(video.frames, result.layout.output_hw, result.layout.output_box), result.frames]
    path = os.path.join(folder, "grid.png")
    write_png(path, frame_grid(rows, columns=cfg.grid_columns))
    return path
