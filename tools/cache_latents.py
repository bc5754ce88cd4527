"""Encode a training config's videos once into a latent cache, then train from it.

    python tools/cache_latents.py --config configs/m3ddm_sd15_256.py --dst /data/latents [--clips_per_video 4]
    python -m m3ddm_jax.train --config configs/m3ddm_sd15_256.py --config.data.latent_cache=/data/latents

Run it on every host of a multi-host job (JAX_* environment as for training): each host encodes its own
shard of the videos.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from m3ddm_jax.training import trainer  # noqa: E402
from m3ddm_jax.data.latent_cache import write_latent_cache  # noqa: E402
from m3ddm_jax.data.pipeline import open_source  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
_DST = flags.DEFINE_string("dst", None, "output cache folder")
_CLIPS = flags.DEFINE_integer("clips_per_video", 1, "clips drawn (and encoded) per video")


def main(argv) -> None:
    del argv
    cfg = _CONFIG.value
    data = trainer.data_config(cfg, per_host_batch_size=1)  # the cache is written clip by clip
    codec = trainer.build_codec(cfg)
    encode = jax.jit(lambda x: codec.encode(x))
    meta = write_latent_cache(_DST.value, open_source(data), lambda x: tuple(map(np.asarray, encode(x))),
                              clip=data.clip, seed=cfg.seed, clips_per_video=_CLIPS.value,
                              shard_index=jax.process_index(), shard_count=jax.process_count())
    print(f"{_DST.value}: {meta['records']} clips written, {len(meta['skipped_videos'])} videos skipped")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "dst"])
    app.run(main)
