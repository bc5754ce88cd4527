"""TFDS video datasets without TensorFlow: a builder that turns a video folder into array_record files, and
a training source that reads any such dataset through `tfds.data_source`.

Features: `frames` = `tfds.features.Tensor(shape=(None, None, None, 3), dtype=uint8, encoding="zlib")` (TFDS
needs an encoding for tensors with more than one unknown dimension, and zlib is the lossless one), `fps`
(float32) and `path` (text, the video's path relative to the folder). tensorflow-datasets 4.9 writes and
reads array_record files with numpy alone: `GeneratorBasedBuilder.download_and_prepare` with
`file_format="array_record"` serialises examples through its own protobuf copy, and `tfds.data_source`
decodes them with numpy, so TensorFlow is never imported.

Frames are stored decoded, so a dataset is large (a 10 s 640x360 clip is ~170 MB raw, and zlib saves only
about a fifth on natural video): `short_side` and `max_frames` shrink it at build time.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from m3ddm_jax.data.sources import ArrayVideo, VideoFolderSource
from m3ddm_jax.video.io import read_video

log = logging.getLogger(__name__)

BUILDER_NAME = "m3ddm_video_folder"


@dataclasses.dataclass(eq=False)
class VideoFolderConfig(tfds.core.BuilderConfig):
    """One folder of videos. `name` separates datasets built from different folders in one data_dir."""

    video_dir: str = ""
    manifest: str | None = None
    short_side: int | None = None  # shrink frames whose shorter side is longer (aspect ratio kept)
    max_frames: int | None = None  # keep at most the first max_frames frames of each video


class M3ddmVideoFolder(tfds.core.GeneratorBasedBuilder):
    """Videos of a folder (see `VideoFolderSource`) as decoded frames. Unreadable videos are logged and left
    out; `skipped` lists them after `download_and_prepare`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "frames (uint8, zlib), fps, path."}
    # TFDS 4.9.10 finds the code path of a builder defined in a package through `importlib_resources`, which
    # it does not install on Python >= 3.9; this file's path is what that lookup would return.
    code_path = epath.Path(__file__)

    def __init__(self, *, config: VideoFolderConfig, **kwargs):
        super().__init__(config=config, **kwargs)
        self.skipped: list[str] = []

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Decoded RGB frames of the videos of one folder, with their frame rate.",
            features=tfds.features.FeaturesDict({
                "frames": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib"),
                "fps": np.float32,
                "path": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        config = self.builder_config
        folder = VideoFolderSource(config.video_dir, manifest=config.manifest)
        for index, path in enumerate(folder.paths):
            name = folder.name(index)
            try:
                video = read_video(path, max_frames=config.max_frames)
            except (ValueError, OSError) as err:  # read_video's errors for missing, non-video or damaged files
                log.warning("skipping %s: %s", path, err)
                self.skipped.append(name)
                continue
            yield name, {"frames": _shrink(video.frames, config.short_side), "fps": float(video.fps), "path": name}


def _shrink(frames: np.ndarray, short_side: int | None) -> np.ndarray:
    h, w = frames.shape[1:3]
    if short_side is None or min(h, w) <= short_side:
        return frames
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


def build_video_folder_dataset(video_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
                               name: str = "default", manifest: str | os.PathLike | None = None,
                               short_side: int | None = None, max_frames: int | None = None) -> M3ddmVideoFolder:
    """Writes the videos of `video_dir` as a TFDS dataset (array_record) under `data_dir`; read it back with
    `TfdsVideoSource(f"{BUILDER_NAME}/{name}", data_dir=data_dir)`. TFDS writes into a temporary folder and
    renames it when complete, and a second call with the same name reuses the finished dataset."""
    config = VideoFolderConfig(name=name, video_dir=str(video_dir),
                               manifest=None if manifest is None else str(manifest),
                               short_side=short_side, max_frames=max_frames)
    builder = M3ddmVideoFolder(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


class TfdsVideoSource:
    """A TFDS dataset with a uint8 (N, H, W, 3) frames feature and an fps feature, read through
    `tfds.data_source` (array_record files, no TensorFlow). Items are `ArrayVideo`s; a record whose frames are
    not uint8 RGB raises VideoError (skipped by the pipeline)."""

    def __init__(self, name: str, *, split: str = "train", data_dir: str | os.PathLike | None = None,
                 frames_key: str = "frames", fps_key: str = "fps"):
        self.name, self.split = name, split
        self.frames_key, self.fps_key = frames_key, fps_key
        # download=False: a missing dataset is an error here, never a build with an empty config.
        self._records = tfds.data_source(name, split=split, data_dir=None if data_dir is None else str(data_dir),
                                         download=False)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> ArrayVideo:
        record = self._records[index]
        return ArrayVideo(frames=np.asarray(record[self.frames_key]), fps=float(record[self.fps_key]))

    def __repr__(self) -> str:
        return f"TfdsVideoSource({self.name!r}, split={self.split!r}, {len(self)} videos)"
