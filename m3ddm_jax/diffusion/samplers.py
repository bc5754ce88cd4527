"""Inference samplers: static per-call coefficient tables (numpy, built once from the schedule and the
step count) plus a small pytree state, so that a whole denoising loop can be one `jax.lax.scan` inside
`jax.jit` with a traced call index.

Every sampler offers
  timesteps       the t given to the UNet at call i (int64 array, one entry per call),
  start_timestep  the noise level of the starting latent; M3DDM starts from add_noise(x0, noise, t) with it,
  init_state(sample, key=None) -> state,
  step(state, sample, eps, i) -> (state, prev_sample): the pure update after call i with the UNet's
                  prediction (noise, or v: the schedule's prediction_type; the coefficient tables take it in).

`strength` s in (0, 1] starts partway, as img2img does: of the n timesteps the sampler keeps the last
floor(s·n) (diffusers' img2img rule; the step size stays that of n steps) and runs its loop over them (PNDM:
its warm-up, and the M3DDM quirk, on the kept ones), so M3DDM's start latent, the noised TELEA-inpainted
init, keeps more of the init. s = 1 is the usual full loop.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule

# PLMS weights of [eps_i, ets[0], ets[1], ets[2]] (ets = stored predictions, newest first) for call
# i = 0, 1, 2, 3 and >= 4. Call 0 is a plain step; call 1 averages with eps_0 and re-steps from the stored
# sample (the warm-up that replaces PRK); then Adams-Bashforth of order 2, 3, 4.
_PLMS_WEIGHTS = np.array(
    [
        [1, 0, 0, 0],
        [1 / 2, 1 / 2, 0, 0],
        [3 / 2, -1 / 2, 0, 0],
        [23 / 12, -16 / 12, 5 / 12, 0],
        [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ],
    np.float32,
)


class PLMSState(NamedTuple):
    ets: jax.Array  # (3, *sample.shape) float32: the last stored noise predictions, newest first
    sample: jax.Array  # float32: the input sample of call 0, which call 1 steps from again


@dataclasses.dataclass(frozen=True, eq=False)
class PNDM:
    """diffusers' PNDMScheduler with skip_prk_steps (PLMS only), as a pure function of the call index.

    `m3ddm_quirk=True` reproduces the official M3DDM pipeline: diffusers' list for n steps is
    [t_1, t_2, t_2, t_3, ..., t_n] (e.g. [901, 801, 801, 701, ..., 1]); the official loop drops its first
    entry and starts from add_noise(x0, noise, t_2), so its call 1 (t_2 again) is PLMS's warm-up call and
    re-steps the stored sample with the t_2 + k -> t_2 coefficients (k = T // n) although that sample sits
    at t_2. n calls. `m3ddm_quirk=False` is the usual SD loop over the whole list (n + 1 calls).
    """

    timesteps: np.ndarray
    sample_coef: np.ndarray
    eps_coef: np.ndarray
    eps_weights: np.ndarray  # (calls, 4) rows of _PLMS_WEIGHTS

    @classmethod
    def create(cls, schedule: NoiseSchedule, num_inference_steps: int, m3ddm_quirk: bool = True,
               strength: float = 1.0) -> PNDM:
        t = _strength_timesteps(schedule, num_inference_steps, strength)
        if m3ddm_quirk and len(t) < 2:
            raise ValueError(f"the M3DDM PNDM loop needs at least 2 timesteps; {num_inference_steps} steps at "
                             f"strength {strength} keep {len(t)}")
        plms = np.concatenate([t[:1], t[1:2], t[1:]])  # diffusers' list: the second timestep twice
        calls = plms[1:] if m3ddm_quirk else plms
        k = schedule.num_train_timesteps // num_inference_steps
        i = np.arange(len(calls))
        # PLMS's rule, applied to whatever t arrives: call 1 steps t + k -> t, every other call t -> t - k.
        cur = np.where(i == 1, calls + k, calls)
        a, b, _ = schedule.ddim_update(cur, cur - k)
        return cls(calls, a, b, _PLMS_WEIGHTS[np.minimum(i, 4)])

    @property
    def start_timestep(self) -> int:
        return int(self.timesteps[0])

    def init_state(self, sample: jax.Array, key: jax.Array | None = None) -> PLMSState:
        del key  # deterministic; the argument keeps one loop usable for every sampler
        return PLMSState(jnp.zeros((3,) + sample.shape, jnp.float32), jnp.zeros(sample.shape, jnp.float32))

    def step(self, state: PLMSState, sample: jax.Array, eps: jax.Array, i: jax.Array | int):
        i = jnp.asarray(i)
        eps = eps.astype(jnp.float32)
        w = jnp.asarray(self.eps_weights)[i]
        # Elementwise products, not a dot: TPUs would run a float32 dot at reduced precision by default.
        combined = w[0] * eps + (w[1:].reshape((3,) + (1,) * eps.ndim) * state.ets).sum(0)
        base = jnp.where(i == 1, state.sample, sample)
        prev = jnp.asarray(self.sample_coef)[i] * base + jnp.asarray(self.eps_coef)[i] * combined
        # The warm-up call's prediction is not stored; call 0 stores its input sample.
        ets = jnp.where(i == 1, state.ets, jnp.concatenate([eps[None], state.ets[:-1]]))
        stored = jnp.where(i == 0, sample, state.sample).astype(jnp.float32)
        return PLMSState(ets, stored), prev.astype(sample.dtype)


class DDIMState(NamedTuple):
    key: jax.Array | None  # drawn from for eta > 0 when step() is not given the noise


@dataclasses.dataclass(frozen=True, eq=False)
class DDIM:
    """diffusers' DDIMScheduler (no clipping): n calls at the schedule's inference timesteps.
    eta = 0 is deterministic; eta > 0 adds eta-scaled posterior noise, drawn from the state's key or
    given to step()."""

    timesteps: np.ndarray
    sample_coef: np.ndarray
    eps_coef: np.ndarray
    noise_std: np.ndarray
    eta: float

    @classmethod
    def create(cls, schedule: NoiseSchedule, num_inference_steps: int, eta: float = 0.0,
               strength: float = 1.0) -> DDIM:
        t = _strength_timesteps(schedule, num_inference_steps, strength)
        k = schedule.num_train_timesteps // num_inference_steps
        return cls(t, *schedule.ddim_update(t, t - k, eta), float(eta))

    @property
    def start_timestep(self) -> int:
        return int(self.timesteps[0])

    def init_state(self, sample: jax.Array, key: jax.Array | None = None) -> DDIMState:
        del sample
        return DDIMState(key)

    def step(self, state: DDIMState, sample: jax.Array, eps: jax.Array, i: jax.Array | int, noise=None):
        i = jnp.asarray(i)
        prev = jnp.asarray(self.sample_coef)[i] * sample + jnp.asarray(self.eps_coef)[i] * eps.astype(jnp.float32)
        if self.eta > 0:
            if noise is None:
                if state.key is None:
                    raise ValueError("DDIM with eta > 0 needs a key in init_state() or the noise in step()")
                key, sub = jax.random.split(state.key)
                noise = jax.random.normal(sub, sample.shape, jnp.float32)
                state = DDIMState(key)
            prev = prev + jnp.asarray(self.noise_std)[i] * noise
        return state, prev.astype(sample.dtype)


def _strength_timesteps(schedule: NoiseSchedule, num_inference_steps: int, strength: float) -> np.ndarray:
    """The last floor(strength·n) of the n inference timesteps (diffusers' img2img rule)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    t = schedule.inference_timesteps(num_inference_steps)
    keep = int(num_inference_steps * strength)
    if keep < 1:
        raise ValueError(f"strength {strength} of {num_inference_steps} steps keeps no step")
    return t[num_inference_steps - keep:]


def make_sampler(
    kind: str, schedule: NoiseSchedule, num_inference_steps: int, *, m3ddm_quirk: bool = True, eta: float = 0.0,
    strength: float = 1.0,
) -> PNDM | DDIM:
    """kind 'pndm' (m3ddm_quirk applies) or 'ddim' (eta applies), starting at `strength`."""
    if kind == "pndm":
        return PNDM.create(schedule, num_inference_steps, m3ddm_quirk, strength)
    if kind == "ddim":
        return DDIM.create(schedule, num_inference_steps, eta, strength)
    raise ValueError(f"unknown sampler {kind!r} (use 'pndm' or 'ddim')")
