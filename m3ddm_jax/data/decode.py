"""Partial video decoding for training: probe a file's length and rate, then decode only the frames a clip
and its global frames need (seeking over long gaps, stopping after the last one).

`m3ddm_jax.video.read_video` decodes a whole file for inference; training reads 32 frames out of videos
that may be hours long, so it needs this cheaper path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import av
import numpy as np

from m3ddm_jax.video.io import TAIL_TOLERANCE, decode_frames, declared_frame_count, truncation

# A gap (in frames) beyond which decoding jumps with a seek to the keyframe before the next wanted frame
# instead of decoding through. x264's default keyframe interval is 250, so a seek costs up to ~250 decoded
# frames: seeking over shorter gaps would rarely save work.
SEEK_GAP = 250


class VideoError(ValueError):
    """A video that cannot make a training example: unreadable, damaged, or too short."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def _open(path: str | os.PathLike):
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise VideoError(f"{path}: not a video FFmpeg can open ({err})") from err
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream")
    return container


def _stream_info(path, container) -> VideoInfo:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise VideoError(f"{path}: the video stream declares no frame rate")
    fps = float(rate)
    num_frames, _ = declared_frame_count(container, stream)  # estimated from the duration without a frame index
    if num_frames is None:
        raise VideoError(f"{path}: the container gives neither a frame count nor a duration")
    if num_frames < 1 or not stream.codec_context.width:
        raise VideoError(f"{path}: empty video stream")
    return VideoInfo(num_frames=num_frames, fps=fps, height=stream.codec_context.height,
                     width=stream.codec_context.width)


def probe(path: str | os.PathLike) -> VideoInfo:
    """Frame count, frame rate and size from the container headers (no decoding)."""
    container = _open(path)
    with container:
        try:
            return _stream_info(path, container)
        except av.FFmpegError as err:
            raise VideoError(f"{path}: cannot read the stream headers ({err})") from err


def read_frames(path: str | os.PathLike, indices: Sequence[int], *, seek_gap: int = SEEK_GAP) -> np.ndarray:
    """The frames at `indices` (any order, repeats allowed) as (len(indices), H, W, 3) uint8 RGB.

    Frame i is the frame whose timestamp rounds to i / fps, or the next one where the stream has a gap
    (exactly the i-th decoded frame of a constant-rate stream). Decoding starts at the keyframe before the
    first wanted frame and ends at the last one; gaps longer than `seek_gap` frames are seeked over.
    Raises VideoError for damaged files.
    """
    wanted = sorted(set(int(i) for i in indices))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"read_frames needs non-negative frame indices, got {list(indices)[:8]}")
    container = _open(path)
    with container:
        declared = declared_frame_count(container, container.streams.video[0])
        try:
            got, end, end_image = _decode(container, wanted, seek_gap, path)
        except (av.FFmpegError, VideoError) as err:
            raise VideoError(f"{path}: decoding failed ({err}); the file may be damaged") from err
    missing = [i for i in wanted if i not in got]  # all after the stream's end
    if missing:
        # A stream a few frames short of its length (an estimate, or timestamps that round) gets its tail filled
        # with its last frame; a clip past the decodable end of a file cut short is rejected (the pipeline skips
        # and counts it) with read_video's diagnosis.
        if end_image is None or missing[-1] - end > TAIL_TOLERANCE:
            raise VideoError(truncation(path, declared, end + 1, missing[-1] + 1) or
                             f"{path}: the stream ends at frame {end}, before frame {missing[-1]}; its header "
                             f"over-states its length")
        got.update({i: end_image for i in missing})
    return np.stack([got[int(i)] for i in indices])


def _decode(container, wanted: list[int], seek_gap: int, path):
    """-> ({index: RGB frame} for the wanted frames reached, the last decoded index, and its RGB frame if the
    stream ended before the last wanted frame)."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate)
    start = stream.start_time or 0
    time_base = stream.time_base
    got: dict[int, np.ndarray] = {}
    decoder = None
    seeked = False
    last, frame, image = -1, None, None  # the newest decoded frame: its index, itself, its RGB array once made
    for target in wanted:
        if last < target and (decoder is None or target - last > seek_gap):
            if target > seek_gap:
                # backward=True lands on the keyframe at or before the target time.
                container.seek(start + int(target / fps / time_base), stream=stream, backward=True)
                seeked = True
            decoder = decode_frames(container, stream, path)
        while last < target:
            next_frame = next(decoder, None)
            if next_frame is None:
                return got, last, None if frame is None else frame.to_ndarray(format="rgb24")
            frame = next_frame
            if frame.pts is None:
                if seeked:
                    raise VideoError("frames without timestamps cannot be located after a seek")
                last += 1
            else:
                last = int(np.floor(float((frame.pts - start) * time_base) * fps + 0.5))
            image = None
        if image is None:
            image = frame.to_ndarray(format="rgb24")
        got[target] = image
    return got, last, None
