"""Training data: video sources (folders, TFDS via `m3ddm_jax.data.tfds_video`), clip sampling, masks and CFG
dropout, the grain pipeline, and the VAE latent cache."""

from m3ddm_jax.data.clips import ClipConfig, ClipPlan, crop_resize, plan_clip, random_resized_crop, sample_clip
from m3ddm_jax.data.decode import VideoError, VideoInfo, probe, read_frames
from m3ddm_jax.data.latent_cache import LatentCacheSource, write_latent_cache
from m3ddm_jax.data.masks import (MaskConfig, Outpaint, global_in_clip, sample_guides,
                                  sample_masks, sample_outpaint)
from m3ddm_jax.data.pipeline import DataConfig, make_dataset, open_source
from m3ddm_jax.data.sources import (ArrayVideo, ConcatSource, FileVideo, Video, VideoFolderSource, read_manifest,
                                    shard_indices)
