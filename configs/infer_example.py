"""Batch outpainting of many videos (see m3ddm_jax/infer.py). Paths are placeholders; set them on the command
line:

    python -m m3ddm_jax.infer --config configs/infer_example.py \\
        --config.inputs=videos/ --config.weights=weights/m3ddm --config.output_dir=outpainted --config.ratio=9:16

inputs takes one entry or a tuple: a folder, a glob, a .txt list (one path per line) or video files, e.g.
--config.inputs="('videos/', 'more/*.mov', 'list.txt')". Exit status: 0 all done, 1 setup error, 2 some
videos failed (see output_dir/summary.json).
"""

import ml_collections

from m3ddm_jax.sampling.settings import SamplerSettings


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.inputs = ("videos/",)  # folders, globs, .txt lists of paths, video files
    c.output_dir = "outpainted"  # <name>.mp4 per video, status/<name>.json, summary.json
    c.weights = "weights/m3ddm"  # a converted weights folder (tools/convert_checkpoint.py)
    c.ratio = "9:16"  # target aspect ratio, width:height (9:16), width/height or a number
    c.max_frames = 0  # only the first frames of each video, for quick runs (0: every frame)
    c.compilation_cache = "~/.cache/m3ddm_jax/jax"  # persistent XLA cache; "" disables
    # The official pipeline's sampler settings (m3ddm_jax/sampling/settings.py). Every video gets the seed
    # sampler.seed: its result is `python -m m3ddm_jax.outpaint VIDEO` with the same settings.
    c.sampler = ml_collections.ConfigDict(SamplerSettings().to_dict())
    return c
