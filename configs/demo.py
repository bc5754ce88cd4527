"""The embedded default: a tiny M3DDM trained on CPU in minutes on the bundled clips (assets/videos and
assets/videos_train).

No downloaded weights: the latent space is the weight-free pixel space (space-to-depth by 2), and the UNet
starts from random initialisation. The run ends by writing sample outpaintings of held-out clips. Then:

    python -m m3ddm_jax.train --config configs/demo.py
    python tools/convert_checkpoint.py export --src workdir/demo --dst out/demo_model
    python -m m3ddm_jax.outpaint VIDEO.mp4 --ratio 9:16 --output OUT.mp4 --weights out/demo_model \
        --mode native --canvas-size 32 --global-size 32x32 --steps 25
"""

import os

import ml_collections

from m3ddm_jax.pretrained import SD15_SCHEDULER_CONFIG
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.sharding import DEFAULT_RULES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = os.path.join(REPO, "workdir", "demo")
    # 160: README command 1 within 10 minutes on 2 cores with a cold compile cache (8.4 min measured; 300 steps
    # took 12.2 min warm for a validation loss of 0.277 against 0.294: BENCHMARKS.md "Demo recipe search")
    c.total_steps = 160
    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.compute_dtype = "float32"
    c.remat = "none"  # none | full | dots (save matmul outputs, recompute the rest)
    c.vae_frames_per_call = 0  # frames of a clip per latent-encoder call (0: all; see configs/m3ddm_sd15_256.py)
    c.attention = "auto"  # the UNet's attention kernel in training (m3ddm_jax/models/attention.py)
    c.nonfinite = "skip"  # skip (count and go on) | halt
    # nonfinite='skip' stops after this many skipped steps in a row: skipped steps leave the parameters as they
    # were, so 10 fresh batches failing in a row means the state, not the data, went bad (a lone bad batch
    # skips one step); 10 wasted steps cost little next to a run that trains on nothing.
    c.max_consecutive_skips = 10
    c.compilation_cache = "~/.cache/m3ddm_jax/jax"  # persistent XLA cache; "" disables

    # scaling_factor (pixel space only; a VAE folder carries its own): latents are pixels in [-1, 1] times it.
    # 2.5: the clips' pixels have std ~0.4, so the latents get about the unit variance the noise schedule and
    # v-prediction assume (BENCHMARKS.md "Demo recipe search").
    c.latent = ml_collections.ConfigDict({"kind": "pixel", "factor": 2, "weights": "", "scaling_factor": 2.5})
    c.init = ml_collections.ConfigDict({"weights": ""})  # a weights folder (e.g. an inflated SD 1.5) or random
    # A random UNet's temporal convs and fps conditioning start as the identity (as inflation starts them)
    c.init.temporal_identity = True  # (the demo recipe: BENCHMARKS.md "Demo recipe search")
    c.model = ml_collections.ConfigDict({
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock3D", "DownBlockP3D"),
        "up_block_types": ("UpBlockP3D", "CrossAttnUpBlock3D"),
        "layers_per_block": 1,
        "attention_heads": 2,
        "norm_num_groups": 8,
        "cross_attention_dim": 64,
        "temporal_position_dim": 32,
    })
    # The noise schedule (m3ddm_jax/diffusion/noise_schedule.py; exported with the model, read by the samplers)
    # The demo's recipe (BENCHMARKS.md "Demo recipe search"): v-prediction, zero terminal SNR, trailing timesteps.
    c.scheduler = ml_collections.ConfigDict({**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction",
                                             "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})
    # Loss weighting per clip (m3ddm_jax/training/objective.py): uniform (the paper) | min_snr. Uniform v loss
    # weights the x0 error by 1 + SNR: min_snr's min(SNR, 5) would leave the noisiest steps, where the band is
    # made from the condition alone, almost untrained.
    c.loss = ml_collections.ConfigDict({"weighting": "uniform", "snr_gamma": 5.0})

    c.data = ml_collections.ConfigDict({
        "root": "",  # --config.data.root=DIR trains on every video under DIR instead
        "sources": [{"kind": "folder", "path": os.path.join(REPO, "assets", "videos"),
                     "manifest": os.path.join(REPO, "assets", "videos", "train.txt")},
                    {"kind": "folder", "path": os.path.join(REPO, "assets", "videos_train")}],
        "latent_cache": "",  # a folder written by tools/cache_latents.py: train from it instead
        "global_batch_size": 4,  # over all devices and processes; each process loads its part
        "worker_count": 0,
        # 16 frames and 16 global frames: the sampler's window (a model trained on shorter clips meets
        # untrained temporal positions when it samples). Mirrored and colour-permuted clips: four videos
        # are few, and a model that learns their colours paints them into every band.
        "clip": {"num_frames": 16, "num_global_frames": 16, "size": (32, 32), "fps_range": (1.0, 30.0),
                 "crop_scale": (0.5, 1.0), "crop_ratio": (3 / 4, 4 / 3), "hflip_prob": 0.5,
                 "channel_shuffle_prob": 0.5},
        "masks": {},
    })

    c.optim = ml_collections.ConfigDict({
        "lr": 1e-3, "warmup_steps": 20, "decay": "cosine", "end_lr_factor": 0.1, "b1": 0.9, "b2": 0.99,
        "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.99,
    })
    c.optim.total_steps = c.get_ref("total_steps")

    # What to sample and when: a held-out clip (not in the training manifest), outpainted to 9:16 with the
    # EMA weights at the end of training; how: the sampler settings below.
    c.sample = ml_collections.ConfigDict({
        "every": 0,  # also every N steps; 0: only when training ends
        "videos": (os.path.join(REPO, "assets", "videos", "stream_of_water.mp4"),),  # () skips sampling
        "max_frames": 32, "ratio": "9:16", "grid_columns": 8,
    })
    # Held-out validation (m3ddm_jax/training/validation.py), at step 0, every N steps and at the end: the
    # epsilon loss on fixed draws (`clips` clips x `timesteps` noise levels per video, from `seed`), and the EMA
    # model's outpainting of the first `max_frames` frames at `frame_size` (H, W) with bands of
    # mask_ratio x W / 2 pixels generated on each side, scored against the ground truth and the TELEA fill.
    c.validation = ml_collections.ConfigDict({
        "videos": (os.path.join(REPO, "assets", "videos", "stream_of_water.mp4"),),  # () turns validation off
        "every": 0, "clips": 4, "timesteps": 8, "seed": 0, "max_frames": 16, "frame_size": (32, 32),
        "mask_ratio": 0.5,
    })
    # The sampler settings of every outpainting (m3ddm_jax/sampling/settings.py: the official values but these).
    c.sampler = ml_collections.ConfigDict(SamplerSettings(
        steps=25, canvas_mode="native", canvas_size=32, global_size=(32, 32)).to_dict())

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = DEFAULT_RULES
    return c
