"""The grain input pipeline of training: sources -> per-host shard -> seeded shuffle -> epochs -> clip
sampling, masks and CFG flags -> batches, optionally in worker processes, with a checkpointable iterator.

    ds = make_dataset(config, seed=0, shard_index=jax.process_index(), shard_count=jax.process_count())
    it = iter(ds)
    batch = next(it)            # dict of numpy arrays, leading axis config.per_host_batch_size
    state = it.get_state()      # save with the model checkpoint; it.set_state(state) resumes exactly

Every example is a pure function of (seed, shard, position), and the batch sequence is the same for any
worker count. A resumed iterator yields the same batches as an uninterrupted one; grain's state records
the position of each worker, so resume with the same `worker_count`.

A video that cannot make a clip (unreadable, damaged, too short) is replaced by another video of the shard
drawn from the same example's generator; `skipped` counts these replacements per example, so the trainer
can log `batch["skipped"].sum()`. Every batch is full, so hosts stay in step.

Batch keys from videos, B = per_host_batch_size, F = clip.num_frames, G = clip.num_global_frames, (H, W) = clip.size:

    frames (B, F, H, W, 3) uint8, global_frames (B, G, H, W, 3) uint8, fps (B,) float32,
    frame_indices (B, F) int32, global_indices (B, G) int32 (video frame numbers),
    mask (B, H, W) uint8, latent_mask (B, H/8, W/8) uint8 (1 = generate), given (B, F) bool,
    global_masked (B, G) bool, drop_local (B,) bool, drop_global (B,) bool, index (B,) int64 (source item),
    skipped (B,) int32.

From a latent cache (`latent_cache` set), `frames` and `global_frames` are replaced by latent_mean,
latent_std (B, F, H/8, W/8, C) and global_latent_mean, global_latent_std (B, G, H/8, W/8, C) float32.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import grain
import numpy as np
from absl import flags

from m3ddm_jax.data.clips import ClipConfig, sample_clip
from m3ddm_jax.data.decode import SEEK_GAP, VideoError
from m3ddm_jax.data.latent_cache import LatentCacheSource
from m3ddm_jax.data.masks import MaskConfig, global_in_clip, sample_masks
from m3ddm_jax.data.sources import ConcatSource, VideoFolderSource, shard_indices
from m3ddm_jax.video.canvas import LATENT_FACTOR

log = logging.getLogger(__name__)

_GRAIN_PROFILING_FLAG = "grain_enable_multiprocess_worker_profiling"


def _default_grain_profiling_flag() -> None:
    """Works around grain 0.2.18 (google/grain#1355, fixed upstream after that release; delete with it):
    starting worker processes, grain reads its absl flag --grain_enable_multiprocess_worker_profiling, which
    raises in a program that never parsed absl flags (pytest, a notebook, a script without absl.app). Give that
    one flag its default, as the upstream fix does. The command line stays the entry points' business: no
    other flag is touched and the flags are not marked parsed; where they are parsed this does nothing."""
    if not flags.FLAGS.is_parsed() and _GRAIN_PROFILING_FLAG in flags.FLAGS:
        flags.FLAGS[_GRAIN_PROFILING_FLAG].present = True


@dataclass(frozen=True)
class DataConfig:
    # Each source is a mapping: {"kind": "folder", "path": DIR, "manifest": FILE (optional)} or
    # {"kind": "tfds", "name": NAME, "split": "train", "data_dir": DIR (optional)}. Several are concatenated.
    sources: tuple[Mapping[str, Any], ...] = ()
    latent_cache: str | None = None  # a folder written by write_latent_cache: train from it instead
    clip: ClipConfig = field(default_factory=ClipConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    per_host_batch_size: int = 8  # this process's part of the global batch (training.trainer splits it)
    shuffle: bool = True
    num_epochs: int | None = None  # None repeats forever (each epoch reshuffled and re-cropped)
    worker_count: int = 0  # grain worker processes; 0 decodes in threads of the training process
    worker_buffer_size: int = 1  # batches each worker keeps ready
    read_threads: int = 2  # threads making batches (per worker process)
    read_buffer_size: int = 2  # batches made ahead (per worker process)
    seek_gap: int = SEEK_GAP
    max_consecutive_skips: int = 100  # more bad videos in a row than this is a data problem: raise

    @classmethod
    def create(cls, config: DataConfig | Mapping[str, Any]) -> DataConfig:
        """From a DataConfig, a dict, or an ml_collections ConfigDict (nested `clip` and `masks` dicts)."""
        if isinstance(config, cls):
            return config
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown data config fields {sorted(unknown)}")
        for name, kind in (("clip", ClipConfig), ("masks", MaskConfig)):
            if isinstance(values.get(name), Mapping):  # to_dict() above turned nested ConfigDicts into dicts
                values[name] = kind(**values[name])
        values["sources"] = tuple(dict(s) for s in values.get("sources", ()))
        return cls(**values)


def open_source(config: DataConfig):
    """The configured video sources as one random-access source, or the latent cache."""
    if config.latent_cache:
        return LatentCacheSource(config.latent_cache)
    if not config.sources:
        raise ValueError("the data config names no source: set data.sources or data.latent_cache")
    sources = []
    for spec in config.sources:
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind == "folder":
            sources.append(VideoFolderSource(spec.pop("path"), seek_gap=config.seek_gap, **spec))
        elif kind == "tfds":
            from m3ddm_jax.data.tfds_video import TfdsVideoSource  # imports tensorflow_datasets: only if used

            sources.append(TfdsVideoSource(spec.pop("name"), **spec))
        else:
            raise ValueError(f"source kind must be 'folder' or 'tfds', got {kind!r} in {spec}")
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


class VideoExamples:
    """(source index, generator) -> one training example from a video (the batch keys above, unbatched)."""

    def __init__(self, source, shard: range, clip: ClipConfig, masks: MaskConfig, max_consecutive_skips: int):
        self.source, self.shard, self.clip, self.masks = source, shard, clip, masks
        self.max_consecutive_skips = max_consecutive_skips

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        skipped = 0
        while True:
            try:
                example = sample_clip(self.source[index], self.clip, rng)
                break
            except VideoError as err:
                log.warning("skipping video %d of %r: %s", index, self.source, err)
                skipped += 1
                if skipped > self.max_consecutive_skips:
                    raise RuntimeError(f"{skipped} videos in a row could not make a clip (the last: {err}); "
                                       f"check the data and the clip settings") from err
                index = self.shard[int(rng.integers(len(self.shard)))]
        example.update(_masks(self.masks, rng, example, self.clip.size))
        example["index"] = np.int64(index)
        example["skipped"] = np.int32(skipped)
        return example


class CachedExamples:
    """(cache index, generator) -> one training example from the latent cache."""

    def __init__(self, source: LatentCacheSource, masks: MaskConfig):
        self.source, self.masks = source, masks

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        example = self.source[index]
        example.update(_masks(self.masks, rng, example, self.source.clip.size))
        example["skipped"] = np.int32(0)
        return example


def _masks(config: MaskConfig, rng, example, size) -> dict[str, np.ndarray]:
    return sample_masks(config, rng, height=size[0], width=size[1], num_frames=len(example["frame_indices"]),
                        in_clip=global_in_clip(example["global_indices"], example["frame_indices"]))


def batch_spec(config: DataConfig | Mapping[str, Any], batch_size: int, *, latent_channels: int = 4,
               latent_factor: int = LATENT_FACTOR) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every key of a batch of `batch_size` examples of `config`'s clips (a process's batch, or
    the global one the train step sees): the batch contract above, in
    code (what ahead-of-time compilation feeds the train step). A latent cache's latents are
    (H / latent_factor, W / latent_factor, latent_channels), as the codec that wrote it makes them."""
    config = DataConfig.create(config)
    b, clip = batch_size, config.clip
    f, g, (h, w) = clip.num_frames, clip.num_global_frames, clip.size
    spec = {"fps": ((b,), np.float32), "frame_indices": ((b, f), np.int32), "global_indices": ((b, g), np.int32),
            "mask": ((b, h, w), np.uint8), "latent_mask": ((b, h // LATENT_FACTOR, w // LATENT_FACTOR), np.uint8),
            "given": ((b, f), np.bool_), "global_masked": ((b, g), np.bool_), "drop_local": ((b,), np.bool_),
            "drop_global": ((b,), np.bool_), "index": ((b,), np.int64), "skipped": ((b,), np.int32)}
    if config.latent_cache:
        hw = (h // latent_factor, w // latent_factor, latent_channels)
        for key, n in (("latent", f), ("global_latent", g)):
            spec[f"{key}_mean"] = spec[f"{key}_std"] = ((b, n, *hw), np.float32)
    else:
        spec["frames"], spec["global_frames"] = ((b, f, h, w, 3), np.uint8), ((b, g, h, w, 3), np.uint8)
    return {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}


def make_dataset(config: DataConfig | Mapping[str, Any], *, seed: int, shard_index: int = 0,
                 shard_count: int = 1, source=None) -> grain.IterDataset:
    """The batched training dataset of one host. `iter()` it for a checkpointable iterator.

    `shard_index`/`shard_count` (usually jax.process_index()/process_count()) split the source items
    between hosts without overlap, the same number each. `source` overrides the configured sources (any
    object with `__len__` and a `__getitem__` returning `Video`s).
    """
    config = DataConfig.create(config)
    source = open_source(config) if source is None else source
    shard = shard_indices(len(source), shard_index, shard_count)
    # Hosts draw different crops and masks for their k-th examples; shuffle and crops use separate streams.
    shuffle_seed, example_seed = (int(s) for s in np.random.SeedSequence([seed, shard_index]).generate_state(2))
    if isinstance(source, LatentCacheSource):
        if (source.clip.size, source.clip.num_frames) != (tuple(config.clip.size), config.clip.num_frames):
            raise ValueError(f"the latent cache holds clips of {source.clip.num_frames} frames of size "
                             f"{source.clip.size}, the config asks for {config.clip.num_frames} of "
                             f"{config.clip.size}")
        make_example = CachedExamples(source, config.masks)
    else:
        make_example = VideoExamples(source, shard, config.clip, config.masks, config.max_consecutive_skips)
    ds = grain.MapDataset.source(shard)
    if config.shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat(config.num_epochs).random_map(make_example, seed=example_seed)
    # Batched before the workers split the stream, so each worker makes whole batches and the sequence of
    # batches does not depend on the worker count.
    ds = ds.batch(config.per_host_batch_size, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.read_buffer_size))
    if config.worker_count > 0:
        _default_grain_profiling_flag()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                         per_worker_buffer_size=config.worker_buffer_size))
    return ds
