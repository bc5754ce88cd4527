"""The train-step benchmark: runs a config's step and accounts FLOPs as MFU conventions ask."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import REPO, load_config, subprocess_env

CONFIG = "test_tiny"


def loss_forward_flops(name: str) -> int:
    """Analytic FLOPs (m3ddm_jax/flops.py) of one forward pass of the training loss at the config's batch
    shapes, on a shape-only model built from the config here, not by the benchmark."""
    from m3ddm_jax import pretrained
    from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule
    from m3ddm_jax.flops import count_flops
    from m3ddm_jax.models.unet3d import UNet3DConfig
    from m3ddm_jax.training import objective
    from m3ddm_jax.training.trainer import build_codec

    cfg = load_config(name)
    codec = build_codec(cfg)
    c = codec.config.latent_channels
    unet = pretrained.abstract_model(UNet3DConfig(**{**cfg.model.to_dict(), "in_channels": 2 * c + 1,
                                                     "out_channels": c, "dtype": cfg.compute_dtype}))
    b, clip = cfg.data.global_batch_size, cfg.data.clip
    frames = lambda n: jax.ShapeDtypeStruct((b, n, *clip.size, 3), jnp.uint8)
    flags = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bool_)
    batch = {"frames": frames(clip.num_frames), "global_frames": frames(clip.num_global_frames),
             "fps": jax.ShapeDtypeStruct((b,), jnp.float32), "mask": jax.ShapeDtypeStruct((b, *clip.size), jnp.uint8),
             "given": flags(b, clip.num_frames), "global_masked": flags(b, clip.num_global_frames),
             "drop_local": flags(b), "drop_global": flags(b)}
    inputs = jax.eval_shape(lambda bt: objective.unet_inputs(codec, bt, jax.random.key(0)), batch)
    schedule = NoiseSchedule.from_config(cfg.scheduler.to_dict())
    graphdef, state = nnx.split(unet)
    forward = lambda st, i, fps: objective.loss(nnx.merge(graphdef, st), schedule, i, fps, jax.random.key(1))
    return count_flops(forward, state, inputs, batch["fps"])


def test_train_step_bench_counts_model_flops_without_recomputation(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), f"--config={REPO / 'configs' / f'{CONFIG}.py'}",
           "--config.remat=full", "--iters=2", "--peak_tflops=1.0", f"--json={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["remat"] == "full" and r["inputs"] == "pixels" and r["shape"].startswith("B=2 F=4 ")
    # Model FLOPs of a step: the loss's forward and its gradient. The gradient of each matmul and conv is two
    # of the same size (inputs and weights), less where no input gradient is needed (the first conv's), so a
    # step is just under three forwards (the JSON rounds to 1e-3 GFLOPs).
    forward = loss_forward_flops(CONFIG) / 1e9
    assert 2.8 * forward < r["model_gflops_per_step"] <= 3.0 * forward + 5e-4
    # Full remat recomputes the forward pass inside the backward one: hardware FLOPs exceed model FLOPs,
    # by less than one extra forward.
    assert r["model_gflops_per_step"] < r["hw_gflops_per_step"] <= r["model_gflops_per_step"] + 1.0 * forward
    # MFU against the independent figure: 3 forwards per step on a 1 TFLOP/s peak, one device.
    assert r["mfu"] == pytest.approx(3 * forward / 1e3 / r["median_step_s"], rel=0.07)
    assert r["examples_per_s"] == pytest.approx(2 / r["median_step_s"], rel=0.02)
