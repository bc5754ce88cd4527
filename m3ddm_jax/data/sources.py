"""Training video sources: random-access (grain `RandomAccessDataSource`-style: `__len__`, `__getitem__`)
collections whose items are `Video`s, handles that know their length, rate and size and decode any frames.

Items are opened lazily: `source[i]` reads only headers (a file) or one record (TFDS, see `tfds_video`),
and the clip sampler then asks for the 32 or so frames it needs. Opening or reading a bad video raises
`VideoError`, which the pipeline counts and skips.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from m3ddm_jax.data.decode import SEEK_GAP, VideoError, VideoInfo, probe, read_frames
from m3ddm_jax.video.io import VIDEO_EXTENSIONS



class Video(Protocol):
    num_frames: int
    fps: float
    height: int
    width: int

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), H, W, 3) uint8 RGB frames."""


@dataclass(frozen=True)
class ArrayVideo:
    """A video held in memory as (N, H, W, 3) uint8 frames."""

    frames: np.ndarray
    fps: float

    def __post_init__(self):
        frames = self.frames
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
            raise VideoError(f"frames must be non-empty uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
        if not self.fps > 0:
            raise VideoError(f"fps must be positive, got {self.fps}")

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]

    def read(self, indices: Sequence[int]) -> np.ndarray:
        return self.frames[np.asarray(indices, dtype=np.int64)]


@dataclass(frozen=True)
class FileVideo:
    """A video file, probed on creation and decoded partially on `read`."""

    path: str
    info: VideoInfo
    seek_gap: int = SEEK_GAP

    @classmethod
    def open(cls, path: str | os.PathLike, seek_gap: int = SEEK_GAP) -> "FileVideo":
        return cls(path=str(path), info=probe(path), seek_gap=seek_gap)

    num_frames = property(lambda self: self.info.num_frames)
    fps = property(lambda self: self.info.fps)
    height = property(lambda self: self.info.height)
    width = property(lambda self: self.info.width)

    def read(self, indices: Sequence[int]) -> np.ndarray:
        return read_frames(self.path, indices, seek_gap=self.seek_gap)


def shard_indices(length: int, shard_index: int, shard_count: int) -> range:
    """The items of one shard (host): every shard_count-th from shard_index, the remainder of length /
    shard_count left out so that all shards have the same number of items (hosts must step together)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    per_shard = length // shard_count
    if per_shard == 0:
        raise ValueError(f"{length} items cannot be split over {shard_count} shards")
    return range(shard_index, per_shard * shard_count, shard_count)


def read_manifest(manifest: str | os.PathLike) -> list[str]:
    """Video paths listed in a manifest: one path per line, or JSON lines with a "path" field. Blank lines
    and lines starting with '#' are ignored."""
    paths = []
    for number, line in enumerate(pathlib.Path(manifest).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                line = json.loads(line)["path"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{manifest}:{number}: a JSON line needs a \"path\" string ({err})") from err
        paths.append(line)
    return paths


class VideoFolderSource:
    """The videos under `root` (recursive, sorted, hidden files skipped), or those a manifest lists (paths
    relative to `root` unless absolute). Items are `FileVideo`s.

    The order is deterministic, so every host of a multi-host run sees the same list and shards it alike.
    """

    def __init__(self, root: str | os.PathLike, *, manifest: str | os.PathLike | None = None,
                 extensions: Sequence[str] = VIDEO_EXTENSIONS, seek_gap: int = SEEK_GAP):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist")
        if manifest is not None:
            self.paths = [self.root / p for p in read_manifest(manifest)]
        else:
            suffixes = {e.lower() for e in extensions}
            self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in suffixes
                                and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        if not self.paths:
            raise ValueError(f"no videos ({', '.join(extensions)}) under {self.root}"
                             + (f" listed in {manifest}" if manifest is not None else ""))
        self.seek_gap = seek_gap

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> FileVideo:
        return FileVideo.open(self.paths[index], self.seek_gap)

    def name(self, index: int) -> str:
        """The path of item `index` relative to the root (a stable key)."""
        path = self.paths[index]
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def __repr__(self) -> str:
        return f"VideoFolderSource({str(self.root)!r}, {len(self)} videos)"


class ConcatSource:
    """Several sources as one, indexed one after the other."""

    def __init__(self, sources: Sequence):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.sources = list(sources)
        self._starts = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        which = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.sources[which][index - int(self._starts[which])]

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources!r})"
