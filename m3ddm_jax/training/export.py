"""A training run -> a weights folder that outpaint, infer and evaluate load with one call.

A run folder (`python -m m3ddm_jax.train --workdir RUN_DIR`) holds what a weights folder needs in two places:

    RUN_DIR/model/         written when the run starts: unet/config.json (the architecture, without
                           parameters), vae/ (the latent space it trains in, with its weights: the SD VAE,
                           or the weight-free pixel space) and scheduler/ (the noise schedule)
    RUN_DIR/checkpoints/   orbax checkpoints: the UNet's raw and EMA parameters at each saved step (and the
                           optimiser state, which export never reads)

`export` joins them. It reads only the chosen parameter subtree and the UNet's non-trainable state from the
checkpoint, straight into host numpy arrays: no device, no optimiser state, and whatever mesh or number of
processes wrote it. The arrays go into the model and out to safetensors without a second copy, and the
folder appears only when it is complete (pretrained.save_weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from m3ddm_jax import pretrained
from m3ddm_jax.convert.mapping import CheckpointMismatchError
from m3ddm_jax.models.unet3d import UNet3DConfig
from m3ddm_jax.models.vae import LatentCodec

MODEL, CHECKPOINTS = "model", "checkpoints"
STATE = "state"  # the train state's item in a checkpoint (training/checkpoint.py)
PARAMS = {"ema": "ema", "raw": "params"}  # --params choice -> the TrainState field it reads
REST = "rest"  # the UNet's non-trainable state (the global encoder's frozen BatchNorm statistics)
# Config fields that choose how a model runs, not what it computes: a run's model/ (and so an export) leaves
# them at their defaults, to be chosen by whoever loads it (training ran in bfloat16 with remat, say).
RUNTIME_FIELDS = ("dtype", "attention_impl", "remat")


def _runtime_defaults(config) -> dict:
    defaults = type(config)()
    return {f: getattr(defaults, f) for f in RUNTIME_FIELDS if hasattr(config, f)}


def write_run_model(run_dir: str, unet_config: UNet3DConfig, codec: LatentCodec, scheduler_config: dict) -> None:
    """Writes RUN_DIR/model (atomically, replacing an older one): everything but the UNet's parameters."""
    pretrained.save_weights(os.path.join(run_dir, MODEL),
                            unet_config=dataclasses.replace(unet_config, **_runtime_defaults(unet_config)),
                            vae=pretrained.reconfigure(codec, **_runtime_defaults(codec.config)),
                            scheduler_config=scheduler_config, overwrite=True)


@contextlib.contextmanager
def _orbax_quiet():
    """Orbax warns on every read-only open ('Given directory is read only', 'Metadata file does not exist' for
    a state saved without it): expected when reading a finished run, and alarming in a CLI's output."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_only_manager(run_dir: str) -> ocp.CheckpointManager:
    with _orbax_quiet():
        return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, CHECKPOINTS)),
                                     options=ocp.CheckpointManagerOptions(read_only=True))


def checkpoint_steps(run_dir: str) -> tuple[list[int], list[int]]:
    """(complete steps, steps whose save was interrupted) of a run folder, each sorted."""
    folder = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(folder):
        return [], []
    complete = sorted(_read_only_manager(run_dir).all_steps())
    # Orbax writes a step to '<step>.orbax-checkpoint-tmp-<time>' and renames it when every process is done.
    partial = {int(m.group(1)) for m in map(re.compile(r"(\d+)\.orbax-checkpoint-tmp").match, os.listdir(folder)) if m}
    return complete, sorted(partial - set(complete))


def choose_step(run_dir: str, step: int | None) -> int:
    """`step`, or the newest complete step, after checking that it can be exported."""
    complete, partial = checkpoint_steps(run_dir)
    if step is None:
        if complete:
            return complete[-1]
        found = f" (only interrupted saves: steps {partial})" if partial else ""
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint{found}; give the --workdir of a training "
                                f"run that has saved at least once (its checkpoints are in RUN_DIR/{CHECKPOINTS})")
    if step in complete:
        return step
    if step in partial:
        raise ValueError(f"checkpoint step {step} of {run_dir} is incomplete (its save was interrupted); complete "
                         f"steps: {complete or 'none'}")
    raise ValueError(f"{run_dir} has no checkpoint of step {step}; complete steps: {complete or 'none'}")


def _tuples(value):
    """JSON lists back to the tuples that config files write."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def run_config(run_dir: str, step: int) -> ml_collections.ConfigDict:
    """The config the run saved (as JSON) with checkpoint `step`."""
    with _orbax_quiet():
        saved = _read_only_manager(run_dir).restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(_tuples(saved["config"]))


def _flat_shapes(tree) -> dict[str, tuple]:
    """'conv_in.bias' -> shape for an nnx.State of arrays or the checkpoint's metadata tree (whose Variable
    leaves end in 'value')."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out[".".join(keys[:-1] if keys[-1] == "value" else keys)] = tuple(leaf.shape)
    return out


def _check_matches(what: str, stored, expected) -> None:
    stored, expected = _flat_shapes(stored), _flat_shapes(expected)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = [(k, stored[k], expected[k]) for k in sorted(expected) if k in stored and stored[k] != expected[k]]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched,
                                      hint=f"The run's {MODEL}/unet/config.json does not describe this checkpoint.")


def restore_unet(run_dir: str, step: int, params: str = "ema") -> nnx.Module:
    """The run's UNet with the parameters of checkpoint `step` ('ema' or 'raw'), as host numpy arrays."""
    if params not in PARAMS:
        raise ValueError(f"params={params!r}; expected one of {sorted(PARAMS)}")
    config = pretrained.read_config(os.path.join(run_dir, MODEL, pretrained.UNET))
    graphdef, abstract_params, abstract_rest = nnx.split(pretrained.abstract_model(config), nnx.Param, ...)
    path = os.path.join(os.path.abspath(run_dir), CHECKPOINTS, str(step), STATE)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    unreadable = f"checkpoint {path} cannot be read; it is incomplete or damaged, export another step (--step)"
    try:
        with _orbax_quiet():
            stored = checkpointer.metadata(path).item_metadata
    except (OSError, ValueError) as err:
        raise ValueError(f"{unreadable} ({type(err).__name__}: {err})") from err
    if stored is None or PARAMS[params] not in stored.keys():
        raise ValueError(f"{unreadable} (no {PARAMS[params]} parameters in its metadata)")
    stored_params, stored_rest = stored[PARAMS[params]], stored[REST] if REST in stored.keys() else {}
    _check_matches(f"{path} ({PARAMS[params]})", stored_params, abstract_params)
    _check_matches(f"{path} ({REST})", stored_rest, abstract_rest)
    item = {PARAMS[params]: abstract_params, REST: abstract_rest}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                         partial_restore=True))
    except (OSError, ValueError) as err:
        raise ValueError(f"{unreadable} ({type(err).__name__}: {err})") from err
    return nnx.merge(graphdef, restored[PARAMS[params]], restored[REST])


def export(run_dir: str, dst: str, *, step: int | None = None, params: str = "ema", overwrite: bool = False) -> dict:
    """Writes the weights folder `dst` from checkpoint `step` (default: the newest complete one) of the run in
    `run_dir`; returns its report (also written as dst/conversion.json)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir} does not exist; give the --workdir of a training run")
    model = os.path.join(run_dir, MODEL)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"{model} is missing: {run_dir} is not a training run folder (python -m "
                                f"m3ddm_jax.train writes it when a run starts)")
    if os.path.exists(dst) and not overwrite:  # before the restore, which may take minutes
        raise FileExistsError(f"{os.path.abspath(dst)} already exists; pass --overwrite to replace it")
    step = choose_step(run_dir, step)
    unet = restore_unet(run_dir, step, params)
    codec = pretrained.load_model(os.path.join(model, pretrained.VAE))
    scheduler_config = pretrained.read_scheduler_config(model)
    report = {"kind": "export", "run": os.path.abspath(run_dir), "step": step, "params": params,
              "unet_values": sum(x.size for x in jax.tree.leaves(nnx.state(unet))),
              "latent_space": type(codec).__name__}
    pretrained.save_weights(dst, unet=unet, vae=codec, scheduler_config=scheduler_config, report=report,
                            overwrite=overwrite)
    return report
