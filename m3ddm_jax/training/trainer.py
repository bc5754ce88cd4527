"""The sharded training setup, built from a config: latent space, UNet, optimiser, state on the mesh and
the compiled step. No flags and no I/O loop (those are m3ddm_jax.train's), so tools and tests can build it.

`build_train_program` is the step as shapes: the jitted step, the state, codec and batch with their
shardings, from real or shape-only models alike. `build_trainer` puts real arrays behind it (what
`python -m m3ddm_jax.train` runs); `tools/aot_compile.py` compiles the same program for a TPU slice.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import jax
from flax import nnx
from jax.experimental import multihost_utils

from m3ddm_jax import jitting, pretrained, sharding
from m3ddm_jax.convert import inflate
from m3ddm_jax.data.clips import ClipConfig
from m3ddm_jax.data.pipeline import DataConfig, batch_spec
from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule
from m3ddm_jax.models.attention import resolve_attention
from m3ddm_jax.models.layers import random_init
from m3ddm_jax.models.pixel_space import PixelSpace, PixelSpaceConfig
from m3ddm_jax.models.unet3d import UNet3DConfig
from m3ddm_jax.training import step as train_step
from m3ddm_jax.training.checkpoint import abstract_like


def build_codec(cfg):
    """The latent space: the SD VAE of a converted weights folder, or the weight-free pixel space."""
    if cfg.latent.kind == "pixel":
        return PixelSpace(PixelSpaceConfig(factor=cfg.latent.factor, scaling_factor=cfg.latent.scaling_factor))
    if cfg.latent.kind == "vae":
        return pretrained.load_model(os.path.join(cfg.latent.weights, pretrained.VAE), dtype=cfg.compute_dtype)
    raise ValueError(f"latent.kind={cfg.latent.kind!r}: expected 'pixel' or 'vae'")


def unet_overrides(cfg, platform: str | None = None) -> dict:
    """The UNet config fields a training config sets: compute dtype, remat and its attention kernel. With
    `platform` ('tpu' when compiling for a slice from a CPU host) 'auto' becomes that platform's kernel;
    without, the model resolves it on the backend it runs on."""
    overrides = {"dtype": cfg.compute_dtype, "remat": cfg.remat}
    attention = cfg.get("attention")
    if attention:
        overrides["attention_impl"] = resolve_attention(attention, platform) if platform else attention
    return overrides


def fresh_unet_config(cfg, latent_channels: int, overrides: dict) -> UNet3DConfig:
    """The UNet of config.model for a latent space of `latent_channels` (no weights folder)."""
    return UNet3DConfig(**{**cfg.model.to_dict(), "in_channels": 2 * latent_channels + 1,
                           "out_channels": latent_channels, **overrides})


def build_unet(cfg, latent_channels: int):
    """A fresh UNet from config.model, or the UNet of a weights folder (an inflated SD 1.5, a released model).
    With init.temporal_identity a fresh UNet's temporal layers start as the identity (inflate.identity_start)."""
    overrides = unet_overrides(cfg)
    if cfg.init.weights:
        return pretrained.load_model(os.path.join(cfg.init.weights, pretrained.UNET), **overrides)
    unet = random_init(pretrained.abstract_model(fresh_unet_config(cfg, latent_channels, overrides)), seed=cfg.seed)
    return inflate.identity_start(unet) if cfg.init.temporal_identity else unet


def data_sources(cfg) -> dict:
    """The config's training data as DataConfig fields (sources, latent_cache); none is an error."""
    data = cfg.data.to_dict()
    cache, root, sources = data.get("latent_cache") or None, data.get("root"), data.get("sources")
    if cache:
        return {"sources": [], "latent_cache": cache}
    if root:
        return {"sources": [{"kind": "folder", "path": root}], "latent_cache": None}
    if sources:
        return {"sources": list(sources), "latent_cache": None}
    raise ValueError("no training data: set --config.data.root=DIR (a folder of videos), data.sources or "
                     "data.latent_cache")


def data_config(cfg, per_host_batch_size: int) -> DataConfig:
    """The pipeline's config of one process, which loads `per_host_batch_size` examples a step (see
    per_host_batch_size)."""
    values = {k: v for k, v in cfg.data.to_dict().items() if k not in ("root", "global_batch_size")}
    return DataConfig.create({**values, **data_sources(cfg), "per_host_batch_size": per_host_batch_size})


def step_batch_spec(cfg, codec_config) -> dict[str, tuple[tuple[int, ...], object]]:
    """(shape, dtype) of each array the step reads from a global batch of the config (the pipeline's batch
    contract, restricted to train_step.BATCH_KEYS)."""
    data = DataConfig(clip=ClipConfig(**cfg.data.clip.to_dict()), latent_cache=cfg.data.latent_cache or None)
    spec = batch_spec(data, cfg.data.global_batch_size, latent_channels=codec_config.latent_channels,
                      latent_factor=codec_config.downsample_factor)
    return {k: v for k, v in spec.items() if k in train_step.BATCH_KEYS}


def global_batch(local: dict, mesh, rules=sharding.DEFAULT_RULES) -> dict:
    """Each process's numpy batch -> global arrays sharded over the batch axes of the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim, rules), v)
            for k, v in local.items()}


@dataclasses.dataclass
class TrainProgram:
    """The train step of a config on a mesh, before any array exists.

    `step_fn(state, codec_state, batch) -> (state, metrics)` is jitted with the state's shardings, donates
    the state and is traced under the mesh (sharding.MeshBound). `abstract_*` are ShapeDtypeStructs carrying
    those shardings: `step_fn.lower` on them compiles the step for the mesh's devices (a TPU slice's, ahead
    of time) without any weights.
    """
    mesh: jax.sharding.Mesh
    rules: list
    graphdef: nnx.GraphDef  # of the UNet: nnx.merge(graphdef, params, state.rest)
    init_fn: Callable  # (params, rest) -> the TrainState at step 0, laid out on the mesh
    step_fn: Callable
    state_shardings: object
    codec_shardings: object
    batch_shardings: dict
    abstract_state: train_step.TrainState
    abstract_codec_state: nnx.State
    abstract_batch: dict


def mesh_processes(mesh: jax.sharding.Mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


def batch_shards(cfg, mesh: jax.sharding.Mesh) -> int:
    """How many shards the config's logical-axis rules split a global batch into on `mesh`: a multiple of the
    mesh's processes, since each process loads examples of its own (data.pipeline shards the sources)."""
    shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, [tuple(r) for r in cfg.logical_axis_rules]))
    if shards % mesh_processes(mesh):
        raise ValueError(f"the batch is split {shards} ways on mesh {dict(mesh.shape)} (logical_axis_rules' "
                         f"'batch' axes), which does not give each of its {mesh_processes(mesh)} processes a part "
                         f"of its own; put the batch on mesh axes that span the processes (mesh.data, mesh.fsdp)")
    return shards


def per_host_batch_size(cfg, mesh: jax.sharding.Mesh) -> int:
    """The one check of data.global_batch_size: it splits into equal parts over the batch shards of `mesh`.
    Returns a process's part."""
    size, shards = cfg.data.global_batch_size, batch_shards(cfg, mesh)
    if size % shards:
        raise ValueError(f"data.global_batch_size={size} does not split over the {shards} batch shards of mesh "
                         f"{dict(mesh.shape)}; use a multiple of {shards} (e.g. "
                         f"--config.data.global_batch_size={shards * -(-size // shards)})")
    return size // mesh_processes(mesh)


def build_train_program(cfg, mesh: jax.sharding.Mesh, codec, unet) -> TrainProgram:
    """The config's step on `mesh` at its global batch (data.global_batch_size) for the given codec and UNet, which
    may be shape-only (nnx.eval_shape): mesh and logical-axis rules, remat and dtype (in the UNet's
    config), optimiser, EMA, donation."""
    rules = [tuple(r) for r in cfg.logical_axis_rules]
    per_host_batch_size(cfg, mesh)
    tx, lr_schedule = train_step.make_optimizer(cfg.optim)
    schedule = NoiseSchedule.from_config(cfg.scheduler.to_dict())
    graphdef, params, rest = nnx.split(unet, nnx.Param, ...)
    codec_graphdef, codec_state = nnx.split(codec)
    sharding.log_unsplit({"unet": params, "codec": codec_state}, mesh, rules)
    init = lambda p, r: train_step.init_state_from(p, r, tx)
    abstract_state = jax.eval_shape(init, params, rest)
    state_sh = sharding.state_shardings(abstract_state, mesh, rules)
    codec_sh = sharding.state_shardings(codec_state, mesh, rules)
    spec = step_batch_spec(cfg, codec.config)
    batch_sh = {k: sharding.batch_sharding(mesh, len(shape), rules) for k, (shape, _) in spec.items()}
    step_spec = train_step.StepSpec(graphdef, codec_graphdef, tx, lr_schedule, schedule,
                                    ema_decay=cfg.optim.ema_decay, seed=cfg.seed,
                                    loss_weighting=cfg.loss.weighting, snr_gamma=cfg.loss.snr_gamma,
                                    vae_frames_per_call=cfg.get("vae_frames_per_call", 0))
    jitted = jitting.model_jit(train_step.train_step, in_shardings=(state_sh, codec_sh, batch_sh),
                               out_shardings=(state_sh, None), donate_argnums=1)  # 1: the state
    step_fn = sharding.MeshBound(jitting.Bound(jitted, jitting.Static(step_spec)), mesh)
    return TrainProgram(
        mesh=mesh, rules=rules, graphdef=graphdef,
        # The optimiser state is built on the devices, already sharded: never whole on one device.
        init_fn=jax.jit(init, out_shardings=state_sh), step_fn=step_fn, state_shardings=state_sh,
        codec_shardings=codec_sh, batch_shardings=batch_sh,
        abstract_state=abstract_like(abstract_state, state_sh),
        abstract_codec_state=abstract_like(jax.eval_shape(lambda s: s, codec_state), codec_sh),
        abstract_batch={k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh[k])
                        for k, (shape, dtype) in spec.items()})


@dataclasses.dataclass
class Trainer:
    """The sharded training setup: a TrainProgram with the state, codec and step on the mesh."""
    program: TrainProgram
    state: train_step.TrainState
    codec_state: nnx.State
    codec: object

    mesh = property(lambda self: self.program.mesh)
    state_shardings = property(lambda self: self.program.state_shardings)
    step_fn = property(lambda self: self.program.step_fn)
    graphdef = property(lambda self: self.program.graphdef)

    def step(self, local_batch: dict) -> dict:
        """One step on this process's batch (numpy); returns the metrics (device arrays)."""
        batch = {k: jax.make_array_from_process_local_data(s, local_batch[k])
                 for k, s in self.program.batch_shardings.items()}
        self.state, metrics = self.step_fn(self.state, self.codec_state, batch)
        return metrics

    def ema_unet(self) -> nnx.Module:
        """The UNet with the EMA parameters, gathered to this host (a collective: call it on every process)."""
        ema, rest = multihost_utils.process_allgather((self.state.ema, self.state.rest), tiled=True)
        return nnx.merge(self.graphdef, ema, rest)


def build_trainer(cfg, mesh: jax.sharding.Mesh, *, codec=None, unet=None) -> Trainer:
    """`codec` and `unet` replace the configured ones (e.g. random weights of the full-size architecture for
    benchmarks, where no converted folder exists)."""
    codec = build_codec(cfg) if codec is None else codec
    unet = build_unet(cfg, codec.config.latent_channels) if unet is None else unet
    program = build_train_program(cfg, mesh, codec, unet)
    _, params, rest = nnx.split(unet, nnx.Param, ...)
    state = program.init_fn(params, rest)
    codec_state = jax.device_put(nnx.state(codec), program.codec_shardings)
    return Trainer(program, state, codec_state, codec)
