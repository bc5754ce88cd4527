"""m3ddm_jax: a JAX/Flax reimplementation of M3DDM video outpainting (Fan et al., ACM MM 2023)."""

from m3ddm_jax import platforms as _platforms

__version__ = "0.1.0"

_platforms.default_to_cpu()  # before any backend starts: no libtpu noise on machines without a TPU
