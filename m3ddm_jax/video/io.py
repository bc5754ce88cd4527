"""Video decode and encode with PyAV: RGB uint8 frames in, H.264 mp4 out, audio carried over, atomic writes."""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Iterator

import av
import numpy as np

from m3ddm_jax.fileio import atomic_path

# File names that folder inputs (training data, batch inference, evaluation) treat as videos.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
# Audio codecs the mp4 muxer takes as they are; any other audio is re-encoded to AAC.
MP4_AUDIO_COPY = frozenset({"aac", "mp3", "ac3", "eac3", "alac"})

# A frame count estimated from the duration (webm, mkv: no frame index) may be off by a few frames; a stream
# that ends at most this many frames short of such an estimate is complete. An indexed count (mp4, mov) is exact.
TAIL_TOLERANCE = 3
# Deterministic encoding: one x264 thread (its output depends on its thread count, which it takes from the
# machine's CPUs); no macroblock-tree rate control (with it, even single-threaded, 6 of 11 rewrites of the same
# 4 noise frames in one process differed from the first; without it 0 of 160 writes of four clips); no library
# versions in the container (Lavf's encoder tag).
X264_OPTIONS = {"threads": "1", "x264-params": "mbtree=0"}
BITEXACT = {"fflags": "+bitexact"}

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Video:
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    fps: Fraction
    path: pathlib.Path  # the source file, from which `write_video(audio_from=...)` copies the audio
    has_audio: bool
    declared_frames: int | None = None  # what the container declares (None: it declares neither count nor duration)
    truncation: str | None = None  # why the file is cut short (fewer frames decode than declared), else None

    @property
    def duration(self) -> float:
        return float(len(self.frames) / self.fps)

    @property
    def truncated(self) -> bool:
        return self.truncation is not None


def declared_frame_count(container, stream) -> tuple[int | None, bool]:
    """(frames the container declares for `stream`, whether that count is exact): the frame index's count,
    else duration x rate (an estimate), else (None, False)."""
    if stream.frames:
        return stream.frames, True
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return None, False
    return (int(round(seconds * float(rate))) if rate else None), False


def decode_frames(container, stream, path: PathLike) -> Iterator[av.VideoFrame]:
    """The frames of `stream` from the demuxer's position on. A file cut short ends in a partial packet, which
    the decoder rejects: there decoding ends (with the frames before it) instead of failing, and `truncation`
    tells. A damaged packet inside the file still raises."""
    size = os.path.getsize(path)
    for packet in container.demux(stream):
        if packet.size and packet.is_corrupt and packet.pos is not None and packet.pos + packet.size >= size:
            yield from stream.decode(None)  # flush the frames the decoder still holds
            return
        yield from packet.decode()


def truncation(path: PathLike, declared: tuple[int | None, bool], decoded: int,
               wanted: int | None = None) -> str | None:
    """The one diagnosis of a file cut short (an interrupted download or copy): a message if fewer frames
    decode than the container declares (`declared` as `declared_frame_count` gives it) or, with `wanted`,
    than the first `wanted` of them; else None."""
    count, exact = declared
    if count is None or decoded >= min(count, wanted or count) - (0 if exact else TAIL_TOLERANCE):
        return None
    return (f"{path} is truncated: its container declares {count} frames but only {decoded} decode; the file was "
            f"probably cut short (an interrupted download or copy)")


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
        declared = declared_frame_count(container, stream)
        try:
            decoded = decode_frames(container, stream, path)
            frames = [f.to_ndarray(format="rgb24") for f in itertools.islice(decoded, max_frames)]
        except av.FFmpegError as err:
            raise ValueError(f"{path}: decoding its video stream failed ({err}); the file may be damaged") from err
        has_audio = bool(container.streams.audio)
    if not frames:
        raise ValueError(f"{path}: its video stream has no decodable frame"
                         + (f" ({cut})" if (cut := truncation(path, declared, 0)) else ""))
    if not fps:
        raise ValueError(f"{path}: the video stream declares no frame rate")
    return Video(frames=np.stack(frames), fps=Fraction(fps), path=path, has_audio=has_audio,
                 declared_frames=declared[0], truncation=truncation(path, declared, len(frames), max_frames))


def check_output_file(path: PathLike, flag: str = "output") -> None:
    """Fails at once, naming `flag`, where an output file could not be written: before any work, not after."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give a file path (such as {path / 'out.mp4'}) or "
                                f"remove the folder")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: its folder {path.parent} does not exist")


def write_video(path: PathLike, frames: np.ndarray | Iterable[np.ndarray], fps: float | Fraction, *,
                audio_from: PathLike | Video | None = None, crf: int = 18, preset: str = "medium") -> None:
    """Encodes RGB uint8 frames (N, H, W, 3), or an iterable of (H, W, 3) frames, as H.264 (libx264, yuv420p,
    BT.601 limited range, tagged so) in an mp4 at `fps`.

    Odd sizes gain one edge-replicated row or column (yuv420p needs even sides). The audio of `audio_from`
    (a path or a `Video`) is copied when mp4 can hold it, otherwise re-encoded to AAC, and cut at the video's
    end (to the packet or decoded frame, some tens of ms). The file is written atomically (m3ddm_jax.fileio),
    so a failure never leaves a partial file under `path`. The same frames give the same bytes on any machine
    with the same FFmpeg and x264 (one encoder thread, no version tags).
    """
    path = pathlib.Path(path)
    check_output_file(path)
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
        out = stack.enter_context(av.open(tmp, "w", format="mp4",
                                          container_options={"movflags": "+faststart", **BITEXACT}))
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height = w + w % 2, h + h % 2
        video.pix_fmt = "yuv420p"
        video.codec_context.colorspace = av.video.reformatter.Colorspace.ITU601
        video.codec_context.color_range = av.video.reformatter.ColorRange.MPEG
        video.codec_context.thread_count = int(X264_OPTIONS["threads"])
        video.options = {"crf": str(crf), "preset": preset, **X264_OPTIONS}
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
