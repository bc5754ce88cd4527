"""Batch outpainting shrunk for tests and smoke runs: the bundled clips, 3 frames each, 2 sampling steps on a
64-pixel native canvas, with the tiny converted fixture weights (README "Outpainting a video" writes out/m3ddm_tiny):

    python -m m3ddm_jax.infer --config configs/infer_tiny.py
"""

import os

from m3ddm_jax.configlib import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = load_config(os.path.join(REPO, "configs", "infer_example.py"))
    c.inputs = (os.path.join(REPO, "assets", "videos"),)
    c.output_dir = os.path.join(REPO, "workdir", "infer_tiny")
    c.weights = os.path.join(REPO, "out", "m3ddm_tiny")
    c.max_frames = 3
    c.compilation_cache = ""  # tests share theirs through JAX_COMPILATION_CACHE_DIR
    c.sampler.steps = 2
    c.sampler.canvas_mode = "native"
    c.sampler.canvas_size = 64
    c.sampler.global_size = (64, 64)
    return c
