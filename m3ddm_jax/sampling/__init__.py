"""Window sampling, the hierarchical coarse-to-fine window plan, and outpainting a whole video."""

from m3ddm_jax.sampling.schedule import (
    Window,
    WindowPlan,
    official_strides,
    plan_windows,
)
from m3ddm_jax.sampling.window import WindowInputs, WindowSampler, combine, guidance_branches
from m3ddm_jax.sampling.pipeline import Draws, Outpainted, Outpainter, make_layout

__all__ = ["Draws", "Outpainted", "Outpainter", "Window", "WindowInputs", "WindowPlan", "WindowSampler", "combine",
           "guidance_branches", "make_layout", "official_strides", "plan_windows"]
