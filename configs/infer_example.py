"""Batch outpainting of many videos (see m3ddm_jax/infer.py). Paths are placeholders; set them on the command
line:

    python -m m3ddm_jax.infer --config configs/infer_example.py \\
        --config.inputs=videos/ --config.weights=weights/m3ddm --config.output_dir=outpainted --config.ratio=9:16

inputs takes one entry or a tuple: a folder, a glob, a .txt list (one path per line) or video files, e.g.
--config.inputs="('videos/', 'more/*.mov', 'list.txt')". Exit status: 0 all done, 1 setup error, 2 some
videos failed (see output_dir/summary.json).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.inputs = ("videos/",)  # folders, globs, .txt lists of paths, video files
    c.output_dir = "outpainted"  # <name>.mp4 per video, status/<name>.json, summary.json
    c.weights = "weights/m3ddm"  # a converted weights folder (tools/convert_checkpoint.py)
    c.ratio = "9:16"  # target aspect ratio, width:height (9:16), width/height or a number
    c.seed = 0  # every video gets this seed: its result is `python -m m3ddm_jax.outpaint VIDEO --seed 0`'s
    c.max_frames = 0  # only the first frames of each video, for quick runs (0: every frame)
    c.compilation_cache = "~/.cache/m3ddm_jax/jax"  # persistent XLA cache; "" disables
    c.sampler = ml_collections.ConfigDict({
        "steps": 50, "scheduler": "pndm",  # pndm | ddim
        "guidance_scale": 2.0, "global_guidance_scale": 4.0,  # official guidance_scale / previous_guidance_scale
        # official: the official square canvas (<= 256 pixels), cropped to the ratio; native: a canvas shaped
        # like the ratio (long side canvas_size, a multiple of 64), composited at the source resolution.
        "canvas_mode": "official", "canvas_size": 256,
        "global_size": (256, 256),  # the size the 16 global frames are resized to (official: 256x256)
        "dtype": "auto",  # UNet compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16
        "windows_per_call": 0,  # most windows per sampler call; 0: the Outpainter's default (4 per local device)
    })
    return c
