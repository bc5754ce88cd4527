"""The paper's setting: M3DDM initialised from Stable Diffusion 1.5, 16 frames at 256x256, 16 global frames.

Prepare the initial weights and the VAE once (see README):

    python tools/convert_checkpoint.py sd --src SD15_DIR --dst weights/sd15
    python tools/convert_checkpoint.py inflate --src weights/sd15 --dst weights/m3ddm_init

then, on every host of the job:

    python -m m3ddm_jax.train --config configs/m3ddm_sd15_256.py --config.data.root=/data/videos \\
        --workdir runs/m3ddm   # a folder every host sees

and turn any checkpoint of the run into a weights folder (EMA parameters, newest complete step):

    python tools/convert_checkpoint.py export --src runs/m3ddm --dst weights/m3ddm_mine

Defaults shard the 1.3B parameters, their AdamW moments and the EMA over all devices (FSDP, ZeRO-3 style)
and split the batch over the same devices; set mesh.data > 1 for hybrid data x FSDP on many hosts.
"""

import ml_collections

from m3ddm_jax.pretrained import SD15_SCHEDULER_CONFIG
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = ""
    c.total_steps = 100_000
    c.log_every = 50
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.compute_dtype = "bfloat16"
    c.remat = "dots"
    # Frames of each clip per VAE encoder call in the train step and the validation loss (0: all of a clip's
    # frames in one call). The frozen encoder's full-resolution activations, not the UNet's, were a step's
    # largest temporaries: 10 GiB per v5e chip for one clip's 48 frames at 256 x 256 in one call
    # (BENCHMARKS.md "Ahead-of-time compilation").
    c.vae_frames_per_call = 4
    c.attention = "auto"  # the UNet's attention kernel in training (m3ddm_jax/models/attention.py)
    c.nonfinite = "skip"
    # nonfinite='skip' stops after this many skipped steps in a row: skipped steps leave the parameters as they
    # were, so 10 fresh batches failing in a row means the state, not the data, went bad (a lone bad batch
    # skips one step); 10 wasted steps cost little next to a run that trains on nothing.
    c.max_consecutive_skips = 10
    c.compilation_cache = "~/.cache/m3ddm_jax/jax"

    c.latent = ml_collections.ConfigDict({"kind": "vae", "factor": 8, "weights": "weights/sd15"})
    c.init = ml_collections.ConfigDict({"weights": "weights/m3ddm_init",  # the inflated SD 1.5 UNet
                                        "temporal_identity": False})  # only for a UNet from scratch
    c.model = ml_collections.ConfigDict({})  # the architecture comes from init.weights
    c.scheduler = ml_collections.ConfigDict(SD15_SCHEDULER_CONFIG)
    # Loss weighting per clip (m3ddm_jax/training/objective.py): uniform (the paper) | min_snr
    c.loss = ml_collections.ConfigDict({"weighting": "uniform", "snr_gamma": 5.0})

    c.data = ml_collections.ConfigDict({
        "root": "",
        "sources": [],
        "latent_cache": "",
        "global_batch_size": 256,  # over all devices and processes
        "worker_count": 8,
        "clip": {"num_frames": 16, "num_global_frames": 16, "size": (256, 256), "fps_range": (1.0, 30.0),
                 "crop_scale": (0.5, 1.0), "crop_ratio": (3 / 4, 4 / 3)},
        "masks": {},  # the paper's defaults (m3ddm_jax.data.masks.MaskConfig)
    })

    c.optim = ml_collections.ConfigDict({
        "lr": 5e-5, "warmup_steps": 1_000, "decay": "cosine", "end_lr_factor": 0.1, "b1": 0.9, "b2": 0.999,
        "eps": 1e-8, "weight_decay": 0.01, "grad_clip": 1.0, "ema_decay": 0.9999,
    })
    c.optim.total_steps = c.get_ref("total_steps")

    # Held-out clips, e.g. --config.sample.videos="('clip1.mp4', 'clip2.mp4')", outpainted with the EMA weights
    # every `every` steps and at the end; none: no sampling.
    c.sample = ml_collections.ConfigDict({
        "every": 5_000, "videos": (), "max_frames": 64, "ratio": "9:16", "grid_columns": 8,
    })
    # Held-out clips with known ground truth, e.g. --config.validation.videos="('a.mp4', 'b.mp4')": a fixed-draw
    # validation loss and the generated bands' PSNR / SSIM against the TELEA fill (m3ddm_jax/training/
    # validation.py) every `every` steps and at the end; none: no validation.
    c.validation = ml_collections.ConfigDict({
        "videos": (), "every": 5_000, "clips": 8, "timesteps": 10, "seed": 0, "max_frames": 16,
        "frame_size": (256, 256), "mask_ratio": 0.5,
    })
    c.sampler = ml_collections.ConfigDict(SamplerSettings().to_dict())  # the official pipeline's settings

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.logical_axis_rules = DEFAULT_RULES
    return c
