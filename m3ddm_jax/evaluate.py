"""The video-outpainting benchmark: `python -m m3ddm_jax.evaluate --config configs/eval_davis.py
[--config.key=value ...]`.

Protocol (horizontal outpainting, as in the paper's DAVIS / YouTube-VOS tables):
* Videos: `config.videos` is a DAVIS-style folder (one sub-folder of JPEG/PNG frames per video, frames in
  name order) or a folder of video files; a video is named by its sub-folder or file stem. The first
  `max_frames` frames (0: all) are used, resized to `frame_size` (H, W) with area averaging, or, with
  frame_size=(), kept at their size less a last row / column on an odd side (outputs have even sides).
* Mask ratio r (`mask_ratios`, default 0.25 and 0.66): r is the fraction of the frame width to generate,
  split equally into a left and a right band of b = round(r * W / 2) pixels each (2b ~ r W within a pixel).
  The known region is the centre W - 2b columns of the ground truth; the masked input is the ground truth
  with both bands blacked out, at the original frame size.
* Generation (`weights`: a weights folder, converted or exported from a training run; `sampler`: the sampler
  settings, m3ddm_jax/sampling/settings.py): the Outpainter only extends to an aspect ratio, so it
  gets the known centre crop (H, W - 2b) and the target ratio W:H. With canvas_mode='native' the output is
  H x W with the known pixels pasted back unchanged at their place, which is the masked-input task: where
  the canvas equals the frame size (e.g. 256x256 at canvas_size=256) its condition is exactly the
  black-banded ground truth, otherwise that frame resized. canvas_mode='official' works where its
  cropped square canvas comes out at the frame size (256x256 frames). The global frames come from the crop
  too, so no ground truth leaks in. Or (`predictions`): score other methods' results, read from
  predictions/<ratio>/<video> (<ratio> written as in the tables: 0.25, 0.66), prepared like the ground
  truth and scored as they are (known region included).
* Metrics, per frame and then averaged over the frames of a video, then over videos (each video counts
  once): PSNR and SSIM (m3ddm_jax.metrics; frames in [0, 1]) over the whole frame and over the generated
  bands only (`*_generated`); LPIPS (AlexNet, frames in [-1, 1]) over the whole frame. FVD (frames in
  [0, 1]): one clip of 16 uniformly spaced frames per video (metrics.fvd.clip_indices; videos shorter than
  16 frames are left out of FVD), I3D logits, Fréchet distance between the ground-truth and the generated
  clip sets. Each ratio is reported on its own, and the 'average' row is the mean of the ratios' rows.
  PSNR is +inf for identical frames (JSON: Infinity).
* Baseline: the TELEA init, each frame's bands filled by OpenCV's TELEA inpainting from the known centre (what
  the sampler starts from where the canvas is the frame size), scored the same way (no FVD), for the same
  videos and bands: the report's `telea` rows.
* LPIPS and FVD need weight files (metrics.lpips_lin + metrics.alexnet, metrics.i3d; see
  m3ddm_jax.metrics.weights); with an empty path the metric is skipped and the report says so.

Output folder: per_video/<video>/<ratio>.json (scores, the TELEA baseline's and I3D features) is written
as each (video, ratio) finishes; a later run with the same settings skips it (resume). per_video/<video>/
status.json records the video's latest attempt (m3ddm_jax.jobs: 'ok', or 'error' and the reason); a video that
fails (unreadable, wrong sizes, missing prediction, ...) is logged, recorded there and listed in the report,
and retried on the next run. Finally results.json and results.md (one table: a row per ratio and the average,
then the same for the TELEA baseline). Writes are atomic.

Multi-host: with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set on every host (a shared
output folder), the videos are split by jax.process_index() (m3ddm_jax.jobs, as infer's; runs started
separately on one output folder split them with lock files); process 0 writes the tables once every host has
finished its share. Within a host the Outpainter spreads each video's windows over the local devices. The
exit status is 1 on a setup error (config, paths), else 0; failed videos are listed in the report.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Callable

import cv2
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from m3ddm_jax import configlib, fileio, jobs, sharding
from m3ddm_jax.evaluation import (TELEA, Scorer, Source, band_width, list_videos, markdown, outpaint_bands, prepare,
                                  ratio_key, read_frames, summarize, telea_bands, video_key)
from m3ddm_jax.pretrained import check_weights_folder, read_scheduler_config
from m3ddm_jax.sampling.pipeline import Outpainter
from m3ddm_jax.sampling.settings import SamplerSettings

PER_VIDEO, STATUS_FILE = "per_video", "status.json"


def settings_of(cfg, sampler: SamplerSettings) -> dict:
    """What a cached per-video result depends on: a cached file with other settings is recomputed."""
    source = ({"predictions": cfg.predictions} if cfg.predictions else
              {"weights": cfg.weights, "fps_of_frame_folders": cfg.fps, **sampler.to_dict()})
    settings = {"videos": cfg.videos, "frame_size": list(cfg.frame_size), "max_frames": cfg.max_frames,
                "lpips": [cfg.metrics.lpips_lin, cfg.metrics.alexnet], "i3d": cfg.metrics.i3d, **source}
    return json.loads(json.dumps(settings))


def _cached(path: pathlib.Path, settings: dict) -> dict | None:
    record = jobs.read_status(path)
    return record if record.get("settings") == settings and TELEA in record else None


REQUIRED_KEYS = ("videos", "output_dir", "weights", "predictions", "mask_ratios", "frame_size", "max_frames", "fps",
                 "save_outputs", "sampler", "metrics.lpips_lin", "metrics.alexnet", "metrics.i3d", "metrics.batch")


def check_config(cfg) -> SamplerSettings:
    """Fails fast, before any video or model is read, on a config that cannot work; returns its sampler
    settings."""
    configlib.require(cfg, REQUIRED_KEYS, "configs/eval_davis.py")
    settings = SamplerSettings.from_config(cfg.sampler)
    if bool(cfg.weights) == bool(cfg.predictions):
        raise ValueError("set exactly one of --config.weights=DIR (outpaint with a converted checkpoint) and "
                         "--config.predictions=DIR (score results of another method)")
    if not cfg.output_dir:
        raise ValueError("set --config.output_dir=DIR")
    if not cfg.mask_ratios or not all(0 < r < 1 for r in cfg.mask_ratios):
        raise ValueError(f"mask_ratios {tuple(cfg.mask_ratios)} must be fractions of the width in (0, 1)")
    if cfg.frame_size and (len(cfg.frame_size) != 2 or any(s < 2 or s % 2 for s in cfg.frame_size)):
        raise ValueError(f"frame_size {tuple(cfg.frame_size)} must be () or an even (height, width)")
    for field in ("lpips_lin", "alexnet", "i3d"):
        path = cfg.metrics[field]
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"metrics.{field}: weight file {path} does not exist; give its path, or set "
                                    f"--config.metrics.{field}='' to skip the metric")
    if bool(cfg.metrics.lpips_lin) != bool(cfg.metrics.alexnet):
        raise ValueError("LPIPS needs both metrics.lpips_lin (lpips alex.pth) and metrics.alexnet (torchvision "
                         "AlexNet); set both, or neither to skip LPIPS")
    if cfg.weights:
        settings.check_steps(read_scheduler_config(check_weights_folder(cfg.weights)))
    else:
        keys = [ratio_key(r) for r in cfg.mask_ratios]
        missing = [k for k in keys if not os.path.isdir(os.path.join(cfg.predictions, k))]
        if missing:
            raise FileNotFoundError(f"predictions folder {cfg.predictions} has no sub-folder {', '.join(missing)}; it "
                                    f"should hold one sub-folder of results per mask ratio ({', '.join(keys)})")
    return settings


class _Generator:
    """Produces the result frames of one video at one ratio: the Outpainter (loaded on first use, so a
    fully cached run loads no model) or the predictions folder."""

    def __init__(self, cfg, settings: SamplerSettings):
        self.cfg, self.settings = cfg, settings
        self._outpainter = None
        self._predictions = {}

    def __call__(self, name: str, frames: np.ndarray, fps: float, ratio: float, band: int,
                 progress: Callable[[int, int], None]) -> np.ndarray:
        cfg = self.cfg
        if cfg.predictions:
            return self._prediction(name, ratio, frames.shape)
        if self._outpainter is None:
            self._outpainter = Outpainter.from_folder(cfg.weights, self.settings)
        return outpaint_bands(self._outpainter, frames, fps, band, video_key(self.settings.seed, name), progress)

    def _prediction(self, name: str, ratio: float, shape: tuple) -> np.ndarray:
        key = ratio_key(ratio)
        if key not in self._predictions:
            folder = os.path.join(self.cfg.predictions, key)
            self._predictions[key] = {s.name: s for s in list_videos(folder, f"predictions folder for ratio {key}")}
        source = self._predictions[key].get(name)
        if source is None:
            raise FileNotFoundError(f"no prediction for video {name!r} in {self.cfg.predictions}/{key}")
        frames = prepare(read_frames(source, self.cfg.max_frames, self.cfg.fps)[0], self.cfg.frame_size)
        if frames.shape != shape:
            raise ValueError(f"{source.path}: {frames.shape[0]} frames of {frames.shape[1]}x{frames.shape[2]} "
                             f"(after preparation), but the ground truth has {shape[0]} of {shape[1]}x{shape[2]}")
        return frames


def _save_frames(folder: pathlib.Path, frames: np.ndarray) -> None:
    """Lossless PNG frames, in the layout `predictions` reads, so saved outputs can be re-scored."""
    with fileio.atomic_dir(str(folder), overwrite=True) as tmp:
        for i, frame in enumerate(frames):
            cv2.imwrite(os.path.join(tmp, f"{i:05d}.png"), frame[..., ::-1])


def _score_video(cfg, src: Source, ratios: list[float], folder: pathlib.Path, settings: dict, scorer: Scorer,
                 generate: _Generator, bar: tqdm) -> dict:
    """Scores one video at `ratios`, writing each ratio's record as soon as it is complete."""
    frames, fps = read_frames(src, cfg.max_frames, cfg.fps)
    frames = prepare(frames, cfg.frame_size)
    real = scorer.clip_features(frames)
    for n, r in enumerate(ratios):
        t0 = time.perf_counter()
        band = band_width(frames.shape[2], r)
        at = f"{src.name} @ {r:g} ({n + 1}/{len(ratios)} ratios)"
        result = generate(src.name, frames, fps, r, band,
                          lambda done, total: bar.set_postfix_str(f"{at}: {done}/{total} window-steps"))
        record = {"video": src.name, "mask_ratio": r, "frames": len(frames), "size": list(frames.shape[1:3]),
                  "band": band, "settings": settings, **scorer.frame_scores(result, frames, band),
                  TELEA: scorer.frame_scores(telea_bands(frames, band), frames, band)}
        if real is not None:
            record["i3d"] = {"real": real, "fake": scorer.clip_features(result)}
        if cfg.save_outputs:
            _save_frames(pathlib.Path(cfg.output_dir) / "outputs" / ratio_key(r) / src.name, result)
        record["seconds"] = time.perf_counter() - t0
        fileio.write_text(str(folder / f"{ratio_key(r)}.json"), json.dumps(record))
    return {"mask_ratios": ratios}


def evaluate(cfg) -> dict | None:
    """Runs (or resumes) the protocol; returns the results on process 0 (None on the others)."""
    sampler = check_config(cfg)
    sources = {src.name: src for src in list_videos(cfg.videos)}
    ratios = [float(r) for r in cfg.mask_ratios]
    settings = settings_of(cfg, sampler)
    out = pathlib.Path(cfg.output_dir)
    scorer = Scorer(cfg)
    generate = _Generator(cfg, sampler)

    def todo(name: str) -> list[float]:
        """The ratios of a video without a result of these settings."""
        return [r for r in ratios if _cached(out / PER_VIDEO / name / f"{ratio_key(r)}.json", settings) is None]

    jobs.run(list(sources),
             lambda name, _, bar: _score_video(cfg, sources[name], todo(name), out / PER_VIDEO / name, settings,
                                               scorer, generate, bar),
             status_path=lambda name: out / PER_VIDEO / name / STATUS_FILE, finished=lambda name: not todo(name),
             record=lambda name: {"video": name}, desc="evaluate", unit="video", verb="score")
    if jax.process_index() != 0:
        return None
    return _write_report(out, list(sources), ratios, settings, scorer.skipped)


def _write_report(out: pathlib.Path, names: list[str], ratios: list[float], settings: dict,
                  skipped: dict[str, str]) -> dict:
    per_video, failed = {}, {}
    for name in names:
        folder = out / PER_VIDEO / name
        records = {ratio_key(r): _cached(folder / f"{ratio_key(r)}.json", settings) for r in ratios}
        if all(records.values()):
            per_video[name] = records
        else:
            failed[name] = jobs.read_status(folder / STATUS_FILE).get("error", "no result (its run did not finish)")
    results = summarize(per_video, failed, ratios, skipped, settings)
    fileio.write_text(str(out / "results.json"), json.dumps(results, indent=2))
    fileio.write_text(str(out / "results.md"), markdown(results))
    return results


def main(argv) -> int:
    del argv
    logging.getLogger("jax").setLevel(logging.WARNING)  # absl's INFO default would show backend probing
    logging.getLogger("m3ddm_jax").setLevel(logging.INFO)
    sharding.init_distributed()
    code, results = jobs.main(lambda: evaluate(flags.FLAGS.config))
    if results is not None:
        print(markdown(results))
    return code


if __name__ == "__main__":
    # Defined here rather than at import: absl flags are global, and train.py and infer.py define --config too.
    config_flags.DEFINE_config_file("config", None, "evaluation config file (get_config())", lock_config=True)
    flags.mark_flag_as_required("config")
    app.run(main)
