"""Video decode and encode with PyAV: RGB uint8 frames in, H.264 mp4 out, audio carried over, atomic writes."""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

import av
import numpy as np

from m3ddm_jax.fileio import atomic_path

# File names that folder inputs (training data, batch inference, evaluation) treat as videos.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
# Audio codecs the mp4 muxer takes as they are; any other audio is re-encoded to AAC.
MP4_AUDIO_COPY = frozenset({"aac", "mp3", "ac3", "eac3", "alac"})

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Video:
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    fps: Fraction
    path: pathlib.Path  # the source file, from which `write_video(audio_from=...)` copies the audio
    has_audio: bool

    @property
    def duration(self) -> float:
        return float(len(self.frames) / self.fps)


def read_video(path: PathLike, *, max_frames: int | None = None) -> Video:
    """Decodes the first video stream of any container FFmpeg opens into RGB frames (the colour matrix and
    range the stream declares are honoured). `max_frames` stops early (previews, tests)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    try:
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise ValueError(f"{path} is not a video FFmpeg can read ({err}); give an mp4/mov/mkv/webm/avi file") from err
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        try:
            decoded = container.decode(stream)
            frames = [f.to_ndarray(format="rgb24") for f in itertools.islice(decoded, max_frames)]
        except av.FFmpegError as err:
            raise ValueError(f"{path}: decoding its video stream failed ({err}); the file may be damaged") from err
        has_audio = bool(container.streams.audio)
    if not frames:
        raise ValueError(f"{path}: its video stream has no decodable frame")
    if not fps:
        raise ValueError(f"{path}: the video stream declares no frame rate")
    return Video(frames=np.stack(frames), fps=Fraction(fps), path=path, has_audio=has_audio)


def write_video(path: PathLike, frames: np.ndarray | Iterable[np.ndarray], fps: float | Fraction, *,
                audio_from: PathLike | Video | None = None, crf: int = 18, preset: str = "medium") -> None:
    """Encodes RGB uint8 frames (N, H, W, 3), or an iterable of (H, W, 3) frames, as H.264 (libx264, yuv420p,
    BT.601 limited range, tagged so) in an mp4 at `fps`.

    Odd sizes gain one edge-replicated row or column (yuv420p needs even sides). The audio of `audio_from`
    (a path or a `Video`) is copied when mp4 can hold it, otherwise re-encoded to AAC, and cut at the video's
    end (to the packet or decoded frame, some tens of ms). The file is written atomically (m3ddm_jax.fileio),
    so a failure never leaves a partial file under `path`.
    """
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    audio_path = audio_from.path if isinstance(audio_from, Video) else audio_from
    if audio_path is not None and not pathlib.Path(audio_path).is_file():
        raise FileNotFoundError(f"audio source not found: {audio_path}")
    rate = Fraction(fps).limit_denominator(1_000_000)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with atomic_path(str(path)) as tmp:
        _encode(tmp, iter(frames), rate, audio_path, crf, preset)


def _encode(tmp: str, frames, rate: Fraction, audio_path, crf: int, preset: str) -> None:
    first = next(frames, None)
    if first is None:
        raise ValueError("write_video got no frames")
    h, w = _check_frame(first).shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(av.open(tmp, "w", format="mp4", container_options={"movflags": "+faststart"}))
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height = w + w % 2, h + h % 2
        video.pix_fmt = "yuv420p"
        video.codec_context.colorspace = av.video.reformatter.Colorspace.ITU601
        video.codec_context.color_range = av.video.reformatter.ColorRange.MPEG
        video.options = {"crf": str(crf), "preset": preset}
        # Every stream must exist before the first packet is muxed, so the audio source is opened first.
        audio = None
        if audio_path is not None:
            src = stack.enter_context(av.open(str(audio_path)))
            if src.streams.audio:
                audio = _add_audio(out, src.streams.audio[0])
        count = 0
        for frame in itertools.chain([first], frames):
            frame = _check_frame(frame, (h, w))
            image = av.VideoFrame.from_ndarray(np.pad(frame, pad, mode="edge"), format="rgb24")
            image = image.reformat(format="yuv420p", dst_colorspace="ITU601", dst_color_range="MPEG")
            image.pts, image.time_base = count, 1 / rate
            out.mux(video.encode(image))
            count += 1
        out.mux(video.encode(None))
        if audio is not None:
            _mux_audio(out, *audio, end=count / rate)


def _add_audio(out, src_stream):
    if src_stream.codec_context.name in MP4_AUDIO_COPY:
        return src_stream, out.add_stream_from_template(src_stream), True
    # AAC takes only standard channel layouts; "Nc" is FFmpeg's default layout for N channels.
    encoder = out.add_stream("aac", rate=src_stream.rate, layout=f"{src_stream.layout.nb_channels}c")
    return src_stream, encoder, False


def _mux_audio(out, src_stream, dst_stream, copy: bool, end: Fraction) -> None:
    """Copies or re-encodes the audio, dropping what starts after `end` seconds (from the stream's start)."""
    start = src_stream.start_time or 0

    def before_end(item) -> bool:
        return item.pts is not None and (item.pts - start) * item.time_base < end

    container = src_stream.container
    if copy:
        for packet in container.demux(src_stream):
            if before_end(packet):  # the demuxer's final flush packet has no pts
                packet.stream = dst_stream
                out.mux(packet)
        return
    for frame in container.decode(src_stream):
        if before_end(frame):
            out.mux(dst_stream.encode(frame))
    out.mux(dst_stream.encode(None))


def _check_frame(frame, hw: tuple[int, int] | None = None) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"write_video needs uint8 RGB frames (H, W, 3), got {frame.dtype} {frame.shape}")
    if hw is not None and frame.shape[:2] != hw:
        raise ValueError(f"write_video: frame of size {frame.shape[:2]} after frames of size {hw}")
    return frame
