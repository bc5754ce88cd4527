"""Train state, optimiser and the jitted, sharded train step.

Parameters are float32 masters; the UNet computes in its config's dtype (bfloat16 on accelerators). The
step is pure: state in, state out (donated), with its randomness folded from (seed, step), so a resumed run
draws exactly what an uninterrupted one would. A non-finite loss or gradient leaves params, optimiser
state and EMA untouched and is counted; the host loop decides whether to go on or halt.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule
from m3ddm_jax.jitting import Static
from m3ddm_jax.training import objective


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: nnx.State  # trainable UNet parameters (float32)
    rest: nnx.State  # the UNet's other state: the global encoder's BatchNorm statistics, kept frozen
    opt_state: Any
    ema: nnx.State
    skipped: jax.Array  # steps whose loss or gradient was not finite


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup to cfg.lr, then 'constant', 'cosine' or 'linear' decay to cfg.lr * cfg.end_lr_factor."""
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.end_lr_factor
    decay = {"constant": optax.constant_schedule(cfg.lr),
             "cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_factor),
             "linear": optax.linear_schedule(cfg.lr, end, decay_steps)}
    if cfg.decay not in decay:
        raise ValueError(f"optim.decay={cfg.decay!r}: expected one of {sorted(decay)}")
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else None
    if warmup is None:
        return decay[cfg.decay]
    return optax.join_schedules([warmup, decay[cfg.decay]], [cfg.warmup_steps])


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; biases and norm parameters (1-D) get no weight decay."""
    schedule = learning_rate_schedule(cfg)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 mask=decay_mask))
    return tx, schedule


# What the step reads from a data batch (the objective's batch contract); other keys stay on the host.
BATCH_KEYS = ("frames", "global_frames", "fps", "mask", "given", "global_masked", "drop_local", "drop_global",
              "latent_mean", "latent_std", "global_latent_mean", "global_latent_std")


def init_state_from(params: nnx.State, rest: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    """The state at step 0 for `nnx.split(unet, nnx.Param, ...)`; jit it with out_shardings to build the
    optimiser state directly on the devices."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params), skipped=jnp.zeros((), jnp.int32))


def ema_decay(decay: float, step: jax.Array | int) -> jax.Array:
    """The EMA decay of the update made after `step` updates, diffusers' EMAModel schedule (its default, without
    use_ema_warmup): 0 at the first update, so the average starts from the first trained parameters, then
    min(decay, (1 + step) / (10 + step)). A constant decay from the initialisation would keep decay**n of the
    random weights after n steps (5 % after the demo's 300 steps at 0.99)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.where(step < 1, 0.0, jnp.minimum(decay, (1.0 + step) / (10.0 + step)))


def _where(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


class StepSpec(NamedTuple):
    """What the train step is made of besides arrays: the static argument of `train_step`."""

    graphdef: nnx.GraphDef  # of the UNet: nnx.merge(graphdef, params, state.rest)
    codec_graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    schedule: NoiseSchedule
    ema_decay: float
    seed: int
    loss_weighting: str = "uniform"  # and snr_gamma: the loss weight per clip (objective.loss_weights)
    snr_gamma: float = 5.0
    vae_frames_per_call: int = 0  # frames of each clip per VAE encoder call (objective.encode_frames)


def train_step(spec: Static, state: TrainState, codec_state: nnx.State, batch: dict):
    """(state, codec_state, batch) -> (state, metrics) for `spec` (a Static StepSpec). Jit it with
    jitting.model_jit and the state's shardings (trainer.build_train_program)."""
    s: StepSpec = spec.value
    key = jax.random.fold_in(jax.random.key(s.seed), state.step)
    k_inputs, k_loss = jax.random.split(key)
    codec = nnx.merge(s.codec_graphdef, codec_state)
    inputs = objective.unet_inputs(codec, batch, k_inputs, s.vae_frames_per_call)

    def loss_fn(params):
        unet = nnx.merge(s.graphdef, params, state.rest)
        return objective.loss(unet, s.schedule, inputs, batch["fps"], k_loss, weighting=s.loss_weighting,
                              snr_gamma=s.snr_gamma)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(s.ema_decay, state.step)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    new = TrainState(step=state.step + 1, params=_where(finite, params, state.params), rest=state.rest,
                     opt_state=_where(finite, opt_state, state.opt_state), ema=_where(finite, ema, state.ema),
                     skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": s.lr_schedule(state.step),
               "finite": finite}
    return new, metrics
