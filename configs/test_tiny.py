"""The demo shrunk for tests: a few steps of a very small model on 16x16 clips of 4 frames."""

import os

from m3ddm_jax.configlib import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
    c.total_steps = 8
    c.log_every = 1
    c.checkpoint_every = 2
    c.keep_checkpoints = 3
    c.optim.warmup_steps = 2
    c.model.block_out_channels = (16, 16)
    c.model.cross_attention_dim = 16
    c.model.temporal_position_dim = 16
    c.model.norm_num_groups = 4
    c.data.global_batch_size = 2
    c.data.clip.num_frames = 4
    c.data.clip.num_global_frames = 2
    c.data.clip.size = (16, 16)
    c.sample.videos = ()  # tests that want samples set them
    c.sample.max_frames = 4
    c.validation.videos = ()  # tests that want validation set them
    c.validation.update({"clips": 2, "timesteps": 2, "max_frames": 4, "frame_size": (16, 16)})
    c.sampler.update({"steps": 2, "canvas_size": 16, "global_size": (16, 16)})
    return c
