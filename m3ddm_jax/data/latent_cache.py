"""A cache of VAE latents, written once so that training skips decoding and VAE encoding.

The clip choice (stride, start, crop) is fixed at write time: `clips_per_video` clips per video, each drawn
with `np.random.default_rng([seed, video_index, clip_number])`. Masks and CFG dropout stay random: the
pipeline samples them per step from the stored clip geometry. The latents are of the unmasked frames, so
the trainer forms masked conditions in latent space (see m3ddm_jax.training.objective).

Layout of a cache folder, one pair of files per writer shard (host):

    latents-SSSSS-of-NNNNN.array_record   one record per clip
    latents-SSSSS-of-NNNNN.json           the shard's metadata, written last: a shard is complete if it exists

A record is an uncompressed `.npz` (numpy's format, read with allow_pickle=False) of:

    latent_mean, latent_std                 (F, H/8, W/8, C)  posterior of the clip frames
    global_latent_mean, global_latent_std   (G, H/8, W/8, C)  posterior of the global frames
    fps float32, frame_indices (F,) int32, global_indices (G,) int32, index int64 (the source video)

Mean and std are the unscaled outputs of `encode` (`AutoencoderKL.encode`): the trainer draws
mean + std * eps and multiplies by the scaling factor (0.18215 for SD), as for on-the-fly encoding. They are
stored as `dtype` (float16 by default, a relative error below 1e-3) and read back as float32.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import logging
import os
import re
from typing import Callable

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from m3ddm_jax.data.clips import ClipConfig, sample_clip
from m3ddm_jax.data.decode import VideoError
from m3ddm_jax.data.sources import shard_indices
from m3ddm_jax.fileio import atomic_path, write_text
from m3ddm_jax.video.canvas import to_model_range

log = logging.getLogger(__name__)

FORMAT = "m3ddm_latent_cache"
VERSION = 1
_SHARD = re.compile(r"latents-(\d{5})-of-(\d{5})\.json$")

EncodeFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _shard_name(shard_index: int, shard_count: int) -> str:
    return f"latents-{shard_index:05d}-of-{shard_count:05d}"


def write_latent_cache(path: str | os.PathLike, source, encode: EncodeFn, *, clip: ClipConfig, seed: int,
                       clips_per_video: int = 1, shard_index: int = 0, shard_count: int = 1,
                       dtype: str = "float16") -> dict:
    """Encodes clips of this shard's videos of `source` into `path` and returns the shard's metadata.

    `encode(images)` takes (N, H, W, 3) float32 in [-1, 1] (the F clip frames then the G global frames of
    one clip) and returns the posterior (mean, std), each (N, H/8, W/8, C). Unusable videos are skipped and
    listed in the metadata. Both files are written under temporary names and renamed when complete.
    """
    os.makedirs(path, exist_ok=True)
    base = os.path.join(path, _shard_name(shard_index, shard_count))
    records, skipped = 0, []
    with atomic_path(base + ".array_record") as tmp:
        writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: cheap random access
        try:
            for index in shard_indices(len(source), shard_index, shard_count):
                try:
                    video = source[index]
                    clips = [sample_clip(video, clip, np.random.default_rng([seed, index, k]))
                             for k in range(clips_per_video)]
                except VideoError as err:
                    log.warning("latent cache: skipping video %d: %s", index, err)
                    skipped.append(index)
                    continue
                for example in clips:
                    writer.write(_encode_record(example, index, encode, clip.num_frames, dtype))
                    records += 1
        finally:
            writer.close()
    metadata = {"format": FORMAT, "version": VERSION, "shard_index": shard_index, "shard_count": shard_count,
                "records": records, "skipped_videos": skipped, "seed": seed, "clips_per_video": clips_per_video,
                "dtype": dtype, "clip": dataclasses.asdict(clip)}
    write_text(base + ".json", json.dumps(metadata, indent=1))
    return metadata


def _encode_record(example: dict, index: int, encode: EncodeFn, num_frames: int, dtype: str) -> bytes:
    images = to_model_range(np.concatenate([example["frames"], example["global_frames"]]))
    mean, std = (np.asarray(x, dtype) for x in encode(images))
    buffer = io.BytesIO()
    np.savez(buffer, latent_mean=mean[:num_frames], latent_std=std[:num_frames],
             global_latent_mean=mean[num_frames:], global_latent_std=std[num_frames:], fps=example["fps"],
             frame_indices=example["frame_indices"], global_indices=example["global_indices"],
             index=np.int64(index))
    return buffer.getvalue()


class LatentCacheSource:
    """The records of a complete latent cache (all writer shards), as dicts of float32 latents and the clip
    fields (see the module docstring). `clip` is the ClipConfig the cache was written with."""

    def __init__(self, path: str | os.PathLike):
        metas = []
        for name in sorted(glob.glob(os.path.join(glob.escape(str(path)), "latents-*-of-*.json"))):
            if _SHARD.search(name):
                with open(name) as f:
                    metas.append(json.load(f))
        if not metas:
            raise FileNotFoundError(f"{path} holds no complete latent cache shard (latents-*-of-*.json)")
        count = metas[0]["shard_count"]
        found = {m["shard_index"] for m in metas if m["shard_count"] == count}
        if any(m.get("format") != FORMAT or m.get("version") != VERSION for m in metas):
            raise ValueError(f"{path}: not a version-{VERSION} {FORMAT} folder")
        if len(metas) != count or found != set(range(count)):
            raise ValueError(f"{path}: incomplete latent cache, shards {sorted(found)} of {count} are written; "
                             f"finish the missing writer shards or remove stray files")
        if len({json.dumps(m["clip"], sort_keys=True) for m in metas}) != 1:
            raise ValueError(f"{path}: shards were written with different clip settings")
        self.clip = ClipConfig(**metas[0]["clip"])
        self.metadata = metas
        paths = [os.path.join(str(path), _shard_name(m["shard_index"], count) + ".array_record") for m in metas]
        self._records = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self._records[index]), allow_pickle=False) as data:
            record = {key: data[key] for key in data.files}
        for key in ("latent_mean", "latent_std", "global_latent_mean", "global_latent_std"):
            record[key] = record[key].astype(np.float32)
        return record

    def __repr__(self) -> str:
        return f"LatentCacheSource({len(self)} clips, clip={self.clip})"
