"""Benchmark: the sharded train step of a training config (what `python -m m3ddm_jax.train` runs per step).

Reports compile time, median step time, examples/s, analytic FLOPs per step and MFU. Model FLOPs are the
matmuls and convolutions of the step traced without rematerialisation (forward + backward, VAE encoding of
the batch included); hardware FLOPs count the traced step as configured, recomputation included (HFU).
The peak is the device's dense bfloat16 matmul peak from PEAK_TFLOPS, or --peak_tflops.

One batch is drawn from the config's data pipeline over a synthetic video (random frames, real clip, mask
and dropout sampling) and fed every step, so the figure is the device step, not the input pipeline.

    python bench/train_step.py --config configs/test_tiny.py
    python bench/train_step.py --config configs/demo.py
    python bench/train_step.py --config configs/m3ddm_sd15_256.py --random_init --config.data.global_batch_size=1 \\
        --config.data.worker_count=0                                          # full size, GPU/TPU
    python bench/train_step.py --config configs/m3ddm_sd15_256.py --random_init --inputs latents ...
    python bench/train_step.py --config configs/m3ddm_sd15_256.py --flops_only --config.data.global_batch_size=1
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from m3ddm_jax import pretrained, sharding  # noqa: E402
from m3ddm_jax.data.pipeline import make_dataset  # noqa: E402
from m3ddm_jax.data.sources import ArrayVideo  # noqa: E402
from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule  # noqa: E402
from m3ddm_jax.flops import count_flops  # noqa: E402
from m3ddm_jax.jitting import Static  # noqa: E402
from m3ddm_jax.models.layers import random_init  # noqa: E402
from m3ddm_jax.models.unet3d import UNet3DConfig  # noqa: E402
from m3ddm_jax.models.vae import VAEConfig  # noqa: E402
from m3ddm_jax.training import step as train_step  # noqa: E402
from m3ddm_jax.training.trainer import build_codec, build_trainer, data_config, global_batch  # noqa: E402
from report import report  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (get_config())")
_ITERS = flags.DEFINE_integer("iters", 10, "timed steps (after one warm-up step)")
_RANDOM_INIT = flags.DEFINE_bool("random_init", False, "random weights instead of init.weights and the VAE "
                                 "folder: the config's model, or the released architecture if it names none")
_INPUTS = flags.DEFINE_enum("inputs", "pixels", ["pixels", "latents"],
                            "pixels: frames encoded in the step; latents: a latent-cache batch (no VAE encoder)")
_PEAK = flags.DEFINE_float("peak_tflops", None, "device peak TFLOP/s for MFU (default: PEAK_TFLOPS)")
_FLOPS_ONLY = flags.DEFINE_bool("flops_only", False, "count the step's FLOPs on shape-only models (no weights, "
                                 "nothing run): the full-size figures on any machine")
_JSON = flags.DEFINE_string("json", None, "also write the result here")

# Dense bfloat16 matmul peak per device, TFLOP/s (vendor figures).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}


def device_peak(kind: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def benchmark_models(cfg, abstract: bool):
    """Random-weight (or, if `abstract`, shape-only) codec and UNet of the config's architecture, with no
    weights folder: the config's model, or the released architecture if it names none."""
    make = pretrained.abstract_model if abstract else (
        lambda c: random_init(pretrained.abstract_model(c), seed=cfg.seed))
    codec = make(VAEConfig(dtype=cfg.compute_dtype)) if cfg.latent.kind == "vae" else build_codec(cfg)
    c = codec.config.latent_channels
    unet_cfg = UNet3DConfig(**{**cfg.model.to_dict(), "in_channels": 2 * c + 1, "out_channels": c,
                               "dtype": cfg.compute_dtype, "remat": cfg.remat})
    return codec, make(unet_cfg)


def synthetic_batch(cfg, codec, inputs: str) -> dict:
    """One global batch from the config's pipeline over a random video; as a latent-cache batch if asked."""
    clip = cfg.data.clip
    h, w = clip.size
    frames = np.random.default_rng(0).integers(0, 256, (2 * clip.num_frames, h, w, 3), np.uint8)
    batch = next(iter(make_dataset(data_config(_with_source(cfg), cfg.data.global_batch_size), seed=cfg.seed,
                                   source=[ArrayVideo(frames, 30.0)])))
    batch = {k: batch[k] for k in train_step.BATCH_KEYS if k in batch}
    if inputs == "latents":
        f = codec.config.downsample_factor
        rng = np.random.default_rng(1)
        for key, n in (("latent", clip.num_frames), ("global_latent", clip.num_global_frames)):
            shape = (len(batch["fps"]), n, h // f, w // f, codec.config.latent_channels)
            batch[f"{key}_mean"] = rng.standard_normal(shape, np.float32)
            batch[f"{key}_std"] = np.full(shape, 0.01, np.float32)
        del batch["frames"], batch["global_frames"]
    return batch


def _with_source(cfg):
    """data_config() insists on a source; the synthetic video replaces it, decoded in this process."""
    cfg = cfg.copy_and_resolve_references()
    cfg.data.root, cfg.data.latent_cache, cfg.data.worker_count = "/synthetic", "", 0
    return cfg


def step_flops(cfg, unet_config: UNet3DConfig, codec, state, codec_state, batch) -> tuple[int, int]:
    """(model, hardware) FLOPs of one train step: without and with the configured rematerialisation."""
    tx, lr_schedule = train_step.make_optimizer(cfg.optim)
    schedule = NoiseSchedule.from_config(cfg.scheduler.to_dict())

    def count(remat: str) -> int:
        graphdef = nnx.split(pretrained.abstract_model(dataclasses.replace(unet_config, remat=remat)),
                             nnx.Param, ...)[0]
        spec = train_step.StepSpec(graphdef, nnx.split(codec)[0], tx, lr_schedule, schedule,
                                   ema_decay=cfg.optim.ema_decay, seed=cfg.seed)
        return count_flops(functools.partial(train_step.train_step, Static(spec)), state, codec_state, batch)

    hw = count(unet_config.remat)
    return (count("none") if unet_config.remat != "none" else hw), hw


def main(argv) -> None:
    del argv
    cfg = _CONFIG.value
    dev = jax.devices()[0]
    peak = _PEAK.value or device_peak(dev.device_kind)
    result = {"dtype": cfg.compute_dtype, "remat": cfg.remat, "inputs": _INPUTS.value,
              "shape": f"B={cfg.data.global_batch_size} F={cfg.data.clip.num_frames} {tuple(cfg.data.clip.size)} "
                       f"g={cfg.data.clip.num_global_frames}"}

    if _FLOPS_ONLY.value:
        codec, unet = benchmark_models(cfg, abstract=True)
        batch = synthetic_batch(cfg, codec, _INPUTS.value)
        tx, _ = train_step.make_optimizer(cfg.optim)
        _, params, rest = nnx.split(unet, nnx.Param, ...)
        state = jax.eval_shape(lambda p, r: train_step.init_state_from(p, r, tx), params, rest)
        model_flops, hw_flops = step_flops(cfg, unet.config, codec, state, nnx.state(codec), batch)
        result.update(params=sum(x.size for x in jax.tree.leaves(params)),
                      model_gflops_per_step=round(model_flops / 1e9, 3), hw_gflops_per_step=round(hw_flops / 1e9, 3))
        report(result, _JSON.value)
        return

    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    codec, unet = benchmark_models(cfg, abstract=False) if _RANDOM_INIT.value else (None, None)
    trainer = build_trainer(cfg, mesh, codec=codec, unet=unet)
    batch = global_batch(synthetic_batch(cfg, trainer.codec, _INPUTS.value), mesh)
    t0 = time.perf_counter()
    compiled = trainer.step_fn.lower(trainer.state, trainer.codec_state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(trainer.state, trainer.codec_state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_ITERS.value):
        t0 = time.perf_counter()
        state, metrics = compiled(state, trainer.codec_state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)

    abstract = jax.eval_shape(lambda s: s, state)
    unet_config = nnx.merge(trainer.graphdef, abstract.params, abstract.rest).config
    model_flops, hw_flops = step_flops(cfg, unet_config, trainer.codec, abstract, trainer.codec_state, batch)
    per_device = lambda flops: flops / median / jax.device_count()
    result.update({
        "device": f"{dev.platform}:{dev.device_kind} x{jax.device_count()}", "mesh": dict(mesh.shape),
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "compile_s": round(compile_s, 2), "median_step_s": round(median, 5),
        "examples_per_s": round(len(batch["fps"]) / median, 3),
        "model_gflops_per_step": round(model_flops / 1e9, 3), "hw_gflops_per_step": round(hw_flops / 1e9, 3),
        "tflops_per_s_per_device": _digits(per_device(model_flops) / 1e12), "peak_tflops": peak,
        "mfu": _digits(per_device(model_flops) / (peak * 1e12)) if peak else None,
        "hfu": _digits(per_device(hw_flops) / (peak * 1e12)) if peak else None,
    })
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        result["peak_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    report(result, _JSON.value)


def _digits(x: float) -> float:
    """4 significant digits (a tiny CPU MFU must not round to 0)."""
    return float(f"{x:.4g}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
