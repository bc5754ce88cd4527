"""The video side of outpainting: decode/encode (io), canvas geometry, masks, global frames, compositing."""

from m3ddm_jax.video.canvas import (Box, CanvasFrames, Layout, NativeLayout, OfficialLayout, composite,
                                    composite_native, crop, get_max_target_size, global_frame_indices,
                                    global_frames, latent_mask, make_canvas, native_layout, official_layout,
                                    parse_ratio, parse_ratios, resize_bilinear_antialias, to_model_range,
                                    to_uint8)
from m3ddm_jax.video.io import Video, read_video, write_video
