"""The benchmark shrunk for tests and smoke runs: the bundled clips, 16 frames at 64x128, 2 sampling steps on a
64x128 canvas, with the tiny converted fixture weights (README "Outpainting a video" writes out/m3ddm_tiny):

    python -m m3ddm_jax.evaluate --config configs/eval_tiny.py
"""

import os

from m3ddm_jax.configlib import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = load_config(os.path.join(REPO, "configs", "eval_davis.py"))
    c.videos = os.path.join(REPO, "assets", "videos")
    c.output_dir = os.path.join(REPO, "workdir", "eval_tiny")
    c.weights = os.path.join(REPO, "out", "m3ddm_tiny")
    c.frame_size = (64, 128)
    c.max_frames = 16
    c.sampler.steps = 2
    c.sampler.canvas_size = 128
    c.sampler.global_size = (64, 64)
    c.metrics.batch = 4
    return c
