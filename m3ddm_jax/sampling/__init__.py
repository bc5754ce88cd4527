"""Window sampling and the hierarchical coarse-to-fine window plan."""

from m3ddm_jax.sampling.schedule import (
    Window,
    WindowPlan,
    global_frame_indices,
    official_strides,
    plan_windows,
)

__all__ = ["Window", "WindowPlan", "global_frame_indices", "official_strides", "plan_windows"]
