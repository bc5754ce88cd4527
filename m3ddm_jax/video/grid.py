"""Frame grids: a few frames of several videos side by side in one PNG, for people to look at."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from m3ddm_jax.fileio import atomic_path


def frame_grid(videos: Sequence[np.ndarray], columns: int = 6, pad: int = 2) -> np.ndarray:
    """One row per video (N, H, W, 3) uint8: `columns` frames evenly spaced over it. Videos of different sizes
    are scaled to the first one's height."""
    height = videos[0].shape[1]
    rows = []
    for video in videos:
        picks = video[np.linspace(0, len(video) - 1, min(columns, len(video))).round().astype(int)]
        width = round(video.shape[2] * height / video.shape[1])
        cells = [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) if f.shape[0] != height else f
                 for f in picks]
        row = np.full((height, len(cells) * (width + pad) - pad, 3), 255, np.uint8)
        for i, cell in enumerate(cells):
            row[:, i * (width + pad): i * (width + pad) + width] = cell
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    grid = np.full((len(rows) * (height + pad) - pad, width, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        grid[i * (height + pad): i * (height + pad) + height, : row.shape[1]] = row
    return grid


def write_png(path: str, image: np.ndarray) -> None:
    """Writes an RGB uint8 image atomically."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
