"""m3ddm_jax: a JAX/Flax reimplementation of M3DDM video outpainting (Fan et al., ACM MM 2023)."""

__version__ = "0.1.0"
