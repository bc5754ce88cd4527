"""The video-outpainting benchmark (`python -m m3ddm_jax.evaluate`, whose module doc gives the protocol):
protocol (videos, frames, mask bands, the model's and TELEA's results), scoring (metrics over a video) and
report (the results table)."""

from m3ddm_jax.evaluation.protocol import (Source, band_width, black_bands, generated_mask, list_videos,
                                           outpaint_bands, prepare, ratio_key, read_frames, telea_bands,
                                           video_key)
from m3ddm_jax.evaluation.report import IMAGE_METRICS, TABLE, TELEA, markdown, summarize
from m3ddm_jax.evaluation.scoring import Scorer, image_scores

__all__ = ["IMAGE_METRICS", "TABLE", "TELEA", "Scorer", "Source", "band_width", "black_bands", "generated_mask",
           "image_scores", "list_videos", "markdown", "outpaint_bands", "prepare", "ratio_key", "read_frames",
           "summarize", "telea_bands", "video_key"]
