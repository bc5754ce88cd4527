"""The benchmark protocol (see m3ddm_jax/evaluate.py for the whole of it): which videos, how their frames are
read and prepared, the mask ratios' side bands, each video's random draws, the model's result on the bands and
the TELEA baseline's."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zlib
from fractions import Fraction
from typing import Callable

import cv2
import jax
import numpy as np

from m3ddm_jax.sampling.pipeline import Outpainter
from m3ddm_jax.video.canvas import telea_fill
from m3ddm_jax.video.io import VIDEO_EXTENSIONS, read_video

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    path: pathlib.Path  # a folder of frames or a video file


def list_videos(root: str | os.PathLike, what: str = "videos folder") -> list[Source]:
    """The videos of a folder, by name: sub-folders (frames) and video files; other files are ignored."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {root} does not exist; give a DAVIS-style folder (one sub-folder of "
                                f"JPEG/PNG frames per video) or a folder of video files")
    sources = {}
    for entry in sorted(root.iterdir()):
        if not (entry.is_dir() or entry.suffix.lower() in VIDEO_EXTENSIONS):
            continue
        name = entry.name if entry.is_dir() else entry.stem
        if name in sources:
            raise ValueError(f"{what} {root}: {sources[name].path.name} and {entry.name} are both video {name!r}; "
                             f"keep one")
        sources[name] = Source(name, entry)
    if not sources:
        raise ValueError(f"no videos in {what} {root}: expected sub-folders of JPEG/PNG frames or video files "
                         f"({', '.join(VIDEO_EXTENSIONS)})")
    return list(sources.values())


def read_frames(source: Source, max_frames: int, default_fps: float) -> tuple[np.ndarray, float]:
    """(N, H, W, 3) uint8 RGB frames and the frame rate (a frame folder has none: `default_fps`)."""
    if not source.path.is_dir():
        video = read_video(source.path, max_frames=max_frames or None)
        if video.truncated:  # scores over part of a ground-truth video would not be comparable: listed as failed
            raise ValueError(f"{video.truncation}; a benchmark video must be complete")
        return video.frames, float(video.fps)
    files = sorted(p for p in source.path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)[:max_frames or None]
    if not files:
        raise ValueError(f"{source.path}: no JPEG/PNG frames in this video folder")
    frames = []
    for path in files:
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise ValueError(f"{path}: not an image OpenCV can read")
        if frames and frame.shape != frames[0].shape:
            raise ValueError(f"{path}: a {frame.shape[0]}x{frame.shape[1]} frame after "
                             f"{frames[0].shape[0]}x{frames[0].shape[1]} frames; all frames of video "
                             f"{source.path} must have one size")
        frames.append(frame[..., ::-1])
    return np.stack(frames), default_fps


def prepare(frames: np.ndarray, frame_size: tuple[int, ...]) -> np.ndarray:
    """Frames at the protocol size: resized to `frame_size` (H, W), or cropped to even sides."""
    if frame_size:
        h, w = frame_size
        if frames.shape[1:3] == (h, w):
            return frames
        return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
    h, w = frames.shape[1:3]
    return frames[:, :h - h % 2, :w - w % 2]


def band_width(width: int, ratio: float) -> int:
    """Pixels generated on each side for mask ratio `ratio` of a frame `width` pixels wide."""
    band = round(ratio * width / 2)
    if band < 1 or width - 2 * band < 1:
        raise ValueError(f"mask ratio {ratio} of a {width}-pixel-wide frame leaves bands of {band} pixels and a "
                         f"{width - 2 * band}-pixel known region; both must be at least 1 pixel")
    return band


def generated_mask(hw: tuple[int, int], band: int) -> np.ndarray:
    """(H, W) bool, True on the two generated side bands."""
    mask = np.zeros(hw, bool)
    mask[:, :band] = mask[:, hw[1] - band:] = True
    return mask


def ratio_key(ratio: float) -> str:
    return f"{ratio:g}"


def video_key(seed: int, name: str) -> jax.Array:
    """Each video its own draws, from the seed and its name: a result does not depend on the other videos."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def outpaint_bands(outpainter: Outpainter, frames: np.ndarray, fps: float, band: int, key: jax.Array,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The model's result for one video: its known centre (H, W - 2 band) outpainted back to W:H."""
    h, w = frames.shape[1:3]
    out = outpainter.outpaint(frames[:, :, band:w - band], fps, Fraction(w, h), key=key, progress=progress).frames
    if out.shape != frames.shape:
        raise ValueError(f"canvas_mode={outpainter.settings.canvas_mode!r} gives {out.shape[1]}x{out.shape[2]} "
                         f"frames for a {h}x{w} video; use canvas_mode='native' (or 256x256 frames for 'official')")
    return out


def telea_bands(frames: np.ndarray, band: int) -> np.ndarray:
    """The TELEA baseline for one video: its bands filled by OpenCV's TELEA inpainting from the known centre,
    at the frame size. It is the init the sampler starts from where the canvas is the frame size (the
    official canvas's fill: m3ddm_jax.video.canvas.telea_fill)."""
    return telea_fill(black_bands(frames, band), generated_mask(frames.shape[1:3], band))


def black_bands(frames: np.ndarray, band: int) -> np.ndarray:
    """(N, H, W, 3) uint8 frames with their two generated side bands of `band` pixels set to black."""
    return np.where(generated_mask(frames.shape[1:3], band)[None, :, :, None], 0, frames).astype(np.uint8)
