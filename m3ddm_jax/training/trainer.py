"""The sharded training setup, built from a config: latent space, UNet, optimiser, state on the mesh and
the compiled step. No flags and no I/O loop (those are m3ddm_jax.train's), so tools and tests can build it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
from flax import nnx
from jax.experimental import multihost_utils

from m3ddm_jax import pretrained, sharding
from m3ddm_jax.data.pipeline import DataConfig
from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule
from m3ddm_jax.models.layers import random_init
from m3ddm_jax.models.pixel_space import PixelSpace, PixelSpaceConfig
from m3ddm_jax.models.unet3d import UNet3DConfig
from m3ddm_jax.training import step as train_step


def build_codec(cfg):
    """The latent space: the SD VAE of a converted weights folder, or the weight-free pixel space."""
    if cfg.latent.kind == "pixel":
        return PixelSpace(PixelSpaceConfig(factor=cfg.latent.factor))
    if cfg.latent.kind == "vae":
        return pretrained.load_model(os.path.join(cfg.latent.weights, pretrained.VAE), dtype=cfg.compute_dtype)
    raise ValueError(f"latent.kind={cfg.latent.kind!r}: expected 'pixel' or 'vae'")


def build_unet(cfg, latent_channels: int):
    """A fresh UNet from config.model, or the UNet of a weights folder (an inflated SD 1.5, a released model)."""
    overrides = {"dtype": cfg.compute_dtype, "remat": cfg.remat}
    if cfg.init.weights:
        return pretrained.load_model(os.path.join(cfg.init.weights, pretrained.UNET), **overrides)
    model_cfg = UNet3DConfig(**{**cfg.model.to_dict(), "in_channels": 2 * latent_channels + 1,
                                "out_channels": latent_channels, **overrides})
    return random_init(pretrained.abstract_model(model_cfg), seed=cfg.seed)


def data_config(cfg) -> DataConfig:
    values = cfg.data.to_dict()
    root = values.pop("root", None)
    values["latent_cache"] = values.get("latent_cache") or None
    if values["latent_cache"]:
        values["sources"] = []
    elif root:
        values["sources"] = [{"kind": "folder", "path": root}]
    if not values.get("sources") and not values.get("latent_cache"):
        raise ValueError("no training data: set --config.data.root=DIR (a folder of videos), data.sources or "
                         "data.latent_cache")
    if values["batch_size"] % jax.process_count():
        raise ValueError(f"data.batch_size={values['batch_size']} (global) does not split over "
                         f"{jax.process_count()} processes")
    values["batch_size"] //= jax.process_count()
    return DataConfig.create(values)


def global_batch(local: dict, mesh) -> dict:
    """Each process's numpy batch -> global arrays sharded over the batch axes of the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
            for k, v in local.items()}


@dataclasses.dataclass
class Trainer:
    """The sharded training setup: state on the mesh and the compiled step."""
    mesh: jax.sharding.Mesh
    state: train_step.TrainState
    state_shardings: object
    codec_state: nnx.State
    step_fn: object
    graphdef: nnx.GraphDef  # of the UNet: nnx.merge(graphdef, params, state.rest)
    codec: object

    def step(self, local_batch: dict) -> dict:
        """One step on this process's batch (numpy); returns the metrics (device arrays)."""
        inputs = {k: local_batch[k] for k in train_step.BATCH_KEYS if k in local_batch}
        self.state, metrics = self.step_fn(self.state, self.codec_state, global_batch(inputs, self.mesh))
        return metrics

    def ema_unet(self) -> nnx.Module:
        """The UNet with the EMA parameters, gathered to this host (a collective: call it on every process)."""
        ema, rest = multihost_utils.process_allgather((self.state.ema, self.state.rest), tiled=True)
        return nnx.merge(self.graphdef, ema, rest)


def build_trainer(cfg, mesh: jax.sharding.Mesh, *, codec=None, unet=None) -> Trainer:
    """`codec` and `unet` replace the configured ones (e.g. random weights of the full-size architecture for
    benchmarks, where no converted folder exists)."""
    rules = [tuple(r) for r in cfg.logical_axis_rules]
    split = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, rules))
    if cfg.data.batch_size % split:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} (global) does not split over the {split} "
                         f"batch shards of mesh {dict(mesh.shape)}; use a multiple of {split}")
    codec = build_codec(cfg) if codec is None else codec
    unet = build_unet(cfg, codec.config.latent_channels) if unet is None else unet
    tx, lr_schedule = train_step.make_optimizer(cfg.optim)
    schedule = NoiseSchedule.from_config(cfg.scheduler.to_dict())
    graphdef, params, rest = nnx.split(unet, nnx.Param, ...)
    codec_graphdef, codec_state = nnx.split(codec)
    init = lambda p, r: train_step.init_state_from(p, r, tx)
    state_sh = sharding.state_shardings(jax.eval_shape(init, params, rest), mesh, rules)
    # The optimiser state is built on the devices, already sharded: never whole on one device.
    state = jax.jit(init, out_shardings=state_sh)(params, rest)
    codec_state = jax.device_put(codec_state, sharding.state_shardings(codec_state, mesh, rules))
    step_fn = jax.jit(
        train_step.make_train_step(graphdef, codec_graphdef, tx, lr_schedule, schedule,
                                   ema_decay=cfg.optim.ema_decay, seed=cfg.seed),
        in_shardings=(state_sh, None, None), out_shardings=(state_sh, None), donate_argnums=0)
    return Trainer(mesh, state, state_sh, codec_state, step_fn, graphdef, codec)
