"""Noise schedule (training forward process) and inference samplers (PNDM/PLMS, DDIM) in pure JAX."""

from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule
from m3ddm_jax.diffusion.samplers import DDIM, PNDM, DDIMState, PLMSState, make_sampler

__all__ = ["DDIM", "DDIMState", "NoiseSchedule", "PLMSState", "PNDM", "make_sampler"]
