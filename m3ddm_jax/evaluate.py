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
as each (video, ratio) finishes; a later run with the same settings skips it (resume). A video that fails
(unreadable, wrong sizes, missing prediction, ...) is logged, recorded in per_video/<video>/error.json and listed in the
report; it is retried on the next run. Finally results.json and results.md (one table: a row per ratio and
the average, then the same for the TELEA baseline). Writes are atomic.

Multi-host: with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set on every host (a shared
output folder), the videos are split by jax.process_index(); process 0 writes the tables once every host
has finished its share. Within a host the Outpainter spreads each video's windows over the local devices.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
import time
import zlib
from fractions import Fraction
from typing import Callable

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from m3ddm_jax import configlib, fileio, metrics, sharding
from m3ddm_jax.outpaint import check_weights_folder
from m3ddm_jax.sampling.pipeline import Outpainter
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.video.canvas import telea_fill
from m3ddm_jax.video.io import VIDEO_EXTENSIONS, read_video

log = logging.getLogger("m3ddm_jax.evaluate")

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGE_METRICS = ("psnr", "ssim", "psnr_generated", "ssim_generated", "lpips")
TABLE = (("psnr", "PSNR", 2), ("ssim", "SSIM", 4), ("psnr_generated", "PSNR gen.", 2),
         ("ssim_generated", "SSIM gen.", 4), ("lpips", "LPIPS", 4), ("fvd", "FVD", 1))
PER_VIDEO, ERROR_FILE = "per_video", "error.json"
TELEA = "telea"  # a record's and the report's scores of the TELEA baseline (telea_bands) on the same bands


# ------------------------------------------------------------------------------------------------ inputs


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    path: pathlib.Path  # a folder of frames or a video file


def list_videos(root: str | os.PathLike, what: str = "videos folder") -> list[Source]:
    """The videos of a folder, by name: sub-folders (frames) and video files; other files are ignored."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {root} does not exist; give a DAVIS-style folder (one sub-folder of "
                                f"JPEG/PNG frames per video) or a folder of video files")
    sources = {}
    for entry in sorted(root.iterdir()):
        if not (entry.is_dir() or entry.suffix.lower() in VIDEO_EXTENSIONS):
            continue
        name = entry.name if entry.is_dir() else entry.stem
        if name in sources:
            raise ValueError(f"{what} {root}: {sources[name].path.name} and {entry.name} are both video {name!r}; "
                             f"keep one")
        sources[name] = Source(name, entry)
    if not sources:
        raise ValueError(f"no videos in {what} {root}: expected sub-folders of JPEG/PNG frames or video files "
                         f"({', '.join(VIDEO_EXTENSIONS)})")
    return list(sources.values())


def read_frames(source: Source, max_frames: int, default_fps: float) -> tuple[np.ndarray, float]:
    """(N, H, W, 3) uint8 RGB frames and the frame rate (a frame folder has none: `default_fps`)."""
    if not source.path.is_dir():
        video = read_video(source.path, max_frames=max_frames or None)
        if video.truncated:  # scores over part of a ground-truth video would not be comparable: listed as failed
            raise ValueError(f"{video.truncation}; a benchmark video must be complete")
        return video.frames, float(video.fps)
    files = sorted(p for p in source.path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)[:max_frames or None]
    if not files:
        raise ValueError(f"{source.path}: no JPEG/PNG frames in this video folder")
    frames = []
    for path in files:
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise ValueError(f"{path}: not an image OpenCV can read")
        if frames and frame.shape != frames[0].shape:
            raise ValueError(f"{path}: a {frame.shape[0]}x{frame.shape[1]} frame after "
                             f"{frames[0].shape[0]}x{frames[0].shape[1]} frames; all frames of video "
                             f"{source.path} must have one size")
        frames.append(frame[..., ::-1])
    return np.stack(frames), default_fps


def prepare(frames: np.ndarray, frame_size: tuple[int, ...]) -> np.ndarray:
    """Frames at the protocol size: resized to `frame_size` (H, W), or cropped to even sides."""
    if frame_size:
        h, w = frame_size
        if frames.shape[1:3] == (h, w):
            return frames
        return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
    h, w = frames.shape[1:3]
    return frames[:, :h - h % 2, :w - w % 2]


def band_width(width: int, ratio: float) -> int:
    """Pixels generated on each side for mask ratio `ratio` of a frame `width` pixels wide."""
    band = round(ratio * width / 2)
    if band < 1 or width - 2 * band < 1:
        raise ValueError(f"mask ratio {ratio} of a {width}-pixel-wide frame leaves bands of {band} pixels and a "
                         f"{width - 2 * band}-pixel known region; both must be at least 1 pixel")
    return band


def generated_mask(hw: tuple[int, int], band: int) -> np.ndarray:
    """(H, W) bool, True on the two generated side bands."""
    mask = np.zeros(hw, bool)
    mask[:, :band] = mask[:, hw[1] - band:] = True
    return mask


def ratio_key(ratio: float) -> str:
    return f"{ratio:g}"


def video_key(seed: int, name: str) -> jax.Array:
    """Each video its own draws, from the seed and its name: a result does not depend on the other videos."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def outpaint_bands(outpainter: Outpainter, frames: np.ndarray, fps: float, band: int, key: jax.Array,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The model's result for one video: its known centre (H, W - 2 band) outpainted back to W:H."""
    h, w = frames.shape[1:3]
    out = outpainter.outpaint(frames[:, :, band:w - band], fps, Fraction(w, h), key=key, progress=progress).frames
    if out.shape != frames.shape:
        raise ValueError(f"canvas_mode={outpainter.settings.canvas_mode!r} gives {out.shape[1]}x{out.shape[2]} "
                         f"frames for a {h}x{w} video; use canvas_mode='native' (or 256x256 frames for 'official')")
    return out


def telea_bands(frames: np.ndarray, band: int) -> np.ndarray:
    """The TELEA baseline for one video: its bands filled by OpenCV's TELEA inpainting from the known centre,
    at the frame size. It is the init the sampler starts from where the canvas is the frame size (the
    official canvas's fill: m3ddm_jax.video.canvas.telea_fill)."""
    return telea_fill(black_bands(frames, band), generated_mask(frames.shape[1:3], band))


def black_bands(frames: np.ndarray, band: int) -> np.ndarray:
    """(N, H, W, 3) uint8 frames with their two generated side bands of `band` pixels set to black."""
    return np.where(generated_mask(frames.shape[1:3], band)[None, :, :, None], 0, frames).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- scoring


@jax.jit
def _image_scores(pred, target, mask):
    """uint8 frames (n, H, W, 3) -> per-frame PSNR / SSIM, whole frame and generated region."""
    p, t = pred.astype(jnp.float32) / 255, target.astype(jnp.float32) / 255
    return {"psnr": metrics.psnr(p, t), "ssim": metrics.ssim(p, t),
            "psnr_generated": metrics.psnr(p, t, mask), "ssim_generated": metrics.ssim(p, t, mask)}


@nnx.jit
def _lpips_scores(model, pred, target):
    to_signed = lambda x: x.astype(jnp.float32) / 255 * 2 - 1
    return model(to_signed(pred), to_signed(target))


class Scorer:
    """The metric networks (None when skipped) and the per-frame scoring of one video at one ratio."""

    def __init__(self, cfg):
        m = cfg.metrics
        self.batch = m.batch
        self.skipped = {}
        self.lpips = self.i3d = None
        if m.lpips_lin and m.alexnet:
            self.lpips = metrics.load_lpips(m.lpips_lin, m.alexnet)
        else:
            self.skipped["lpips"] = "no weight files (metrics.lpips_lin and metrics.alexnet are not both set)"
        if m.i3d:
            self.i3d = metrics.load_i3d(m.i3d)
        else:
            self.skipped["fvd"] = "no I3D weight file (metrics.i3d is empty)"

    def frame_scores(self, pred: np.ndarray, target: np.ndarray, band: int) -> dict[str, float]:
        """Mean over frames of each image metric."""
        scores = image_scores(pred, target, band, batch=self.batch)
        if self.lpips is not None:
            lpips = _chunked(lambda p, t: {"lpips": _lpips_scores(self.lpips, p, t)}, pred, target, batch=self.batch)
            scores["lpips"] = float(np.mean(lpips["lpips"]))
        return scores

    def clip_features(self, frames: np.ndarray) -> list[float] | None:
        """I3D logits of the video's 16-frame FVD clip; None without I3D or for a shorter video."""
        if self.i3d is None or len(frames) < metrics.CLIP_FRAMES:
            return None
        clip = frames[metrics.clip_indices(len(frames))][None].astype(np.float32) / 255
        return np.asarray(metrics.video_features(self.i3d, clip))[0].tolist()


def image_scores(pred: np.ndarray, target: np.ndarray, band: int, *, batch: int = 8) -> dict[str, float]:
    """PSNR and SSIM of uint8 frames (n, H, W, 3), over the whole frame and over the generated bands of
    `band` pixels (`*_generated`), each the mean over frames."""
    mask = generated_mask(target.shape[1:3], band)
    scores = _chunked(lambda p, t: _image_scores(p, t, mask), pred, target, batch=batch)
    return {k: float(np.mean(v)) for k, v in scores.items()}


def _chunked(fn, pred: np.ndarray, target: np.ndarray, *, batch: int) -> dict[str, np.ndarray]:
    """fn over frames in chunks of `batch` (the last one zero-padded, so one shape compiles)."""
    out = {}
    for s in range(0, len(pred), batch):
        p, t = pred[s:s + batch], target[s:s + batch]
        pad = [(0, batch - len(p))] + [(0, 0)] * 3
        for k, v in fn(np.pad(p, pad), np.pad(t, pad)).items():
            out.setdefault(k, []).append(np.asarray(v)[:len(p)])
    return {k: np.concatenate(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- results


def settings_of(cfg, sampler: SamplerSettings) -> dict:
    """What a cached per-video result depends on: a cached file with other settings is recomputed."""
    source = ({"predictions": cfg.predictions} if cfg.predictions else
              {"weights": cfg.weights, "fps_of_frame_folders": cfg.fps, **sampler.to_dict()})
    settings = {"videos": cfg.videos, "frame_size": list(cfg.frame_size), "max_frames": cfg.max_frames,
                "lpips": [cfg.metrics.lpips_lin, cfg.metrics.alexnet], "i3d": cfg.metrics.i3d, **source}
    return json.loads(json.dumps(settings))


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cached(path: pathlib.Path, settings: dict) -> dict | None:
    record = _read_json(path)
    return record if record is not None and record.get("settings") == settings and TELEA in record else None


def _image_means(records: list[dict]) -> dict[str, float]:
    return {metric: float(np.mean([rec[metric] for rec in records])) for metric in IMAGE_METRICS
            if records and metric in records[0]}


def _average(rows: dict[str, dict]) -> dict[str, float]:
    return {metric: float(np.mean([row[metric] for row in rows.values()])) for metric, *_ in TABLE
            if all(metric in row for row in rows.values())}


def summarize(per_video: dict[str, dict[str, dict]], failed: dict[str, str], ratios: list[float],
              skipped: dict[str, str], settings: dict) -> dict:
    """The report: per-ratio means over videos, FVD per ratio, their average over ratios; and the same image
    metrics of the TELEA baseline on the same bands (`telea`)."""
    rows, telea, notes = {}, {}, dict(skipped)
    for r in ratios:
        key = ratio_key(r)
        records = [per_video[name][key] for name in sorted(per_video)]
        row = {"videos": len(records), **_image_means(records)}
        telea[key] = {"videos": len(records), **_image_means([rec[TELEA] for rec in records])}
        if "fvd" not in skipped:
            pairs = [rec["i3d"] for rec in records if rec.get("i3d")]
            if len(pairs) >= 2:
                row["fvd"] = metrics.frechet_distance(np.array([p["real"] for p in pairs]),
                                                      np.array([p["fake"] for p in pairs]))
                row["fvd_videos"] = len(pairs)
            else:
                notes["fvd"] = f"needs at least 2 videos of >= {metrics.CLIP_FRAMES} frames; {len(pairs)} scored"
        rows[key] = row
    protocol = {"mask_ratios": ratios, "band": "round(ratio * width / 2) pixels per side",
                "ranges": {"psnr, ssim, fvd": "[0, 1]", "lpips": "[-1, 1]"},
                "means": "per video over frames, then over videos; average: over ratios"}
    return {"protocol": protocol,
            "settings": settings, "ratios": rows, "average": _average(rows),
            TELEA: {"ratios": telea, "average": _average(telea)}, "skipped_metrics": notes,
            "videos": sorted(per_video), "failed_videos": failed,
            "per_video": {name: {k: {**{m: v for m, v in rec.items() if m in IMAGE_METRICS}, TELEA: rec[TELEA]}
                                 for k, rec in per_video[name].items()} for name in sorted(per_video)}}


def markdown(results: dict) -> str:
    def cell(row, metric, digits):
        if metric not in row:
            return "—"
        value = row[metric]  # rounding first, + 0.0: a numerically negative zero (FVD -1e-12) prints as 0
        return "inf" if math.isinf(value) else f"{round(value, digits) + 0.0:.{digits}f}"

    columns = [c for c in TABLE if any(c[0] in row for row in results["ratios"].values())]
    s = results["settings"]
    of = f"predictions {s['predictions']}" if "predictions" in s else f"weights {s['weights']} ({s['steps']} steps)"
    size = "x".join(map(str, s["frame_size"])) or "source-size"
    lines = ["# Outpainting evaluation", "",
             f"{of} on {s['videos']}: {len(results['videos'])} videos scored, {len(results['failed_videos'])} "
             f"failed; {size} frames. Horizontal outpainting: mask ratio r generates round(r W / 2) pixels on each "
             f"side. PSNR, SSIM, FVD on [0, 1], LPIPS on [-1, 1]; 'gen.' = the generated bands only. 'TELEA "
             f"init': the same bands filled by OpenCV's TELEA inpainting (what the sampler starts from).", "",
             "| mask ratio | videos | " + " | ".join(c[1] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    telea = results[TELEA]
    for key, row in [*results["ratios"].items(), ("average", results["average"]),
                     *((f"{k} TELEA init", v) for k, v in telea["ratios"].items()),
                     ("average TELEA init", telea["average"])]:
        videos = row.get("videos", "")
        lines.append(f"| {key} | {videos} | " + " | ".join(cell(row, m, d) for m, _, d in columns) + " |")
    if results["skipped_metrics"]:
        lines += ["", "Not reported:"] + [f"- {m.upper()}: {why}" for m, why in results["skipped_metrics"].items()]
    if results["failed_videos"]:
        lines += ["", "Failed videos (left out):"] + [f"- {n}: {e}" for n, e in results["failed_videos"].items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ runner


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
        check_weights_folder(cfg.weights)
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
                 generate: _Generator, bar: tqdm) -> None:
    """Scores one video at `ratios`, writing each ratio's record as soon as it is complete."""
    frames, fps = read_frames(src, cfg.max_frames, cfg.fps)
    frames = prepare(frames, cfg.frame_size)
    real = scorer.clip_features(frames)
    for r in ratios:
        t0 = time.perf_counter()
        band = band_width(frames.shape[2], r)
        result = generate(src.name, frames, fps, r, band,
                          lambda done, total: bar.set_postfix_str(f"{src.name} @ {r:g}: {done}/{total} window-steps"))
        record = {"video": src.name, "mask_ratio": r, "frames": len(frames), "size": list(frames.shape[1:3]),
                  "band": band, "settings": settings, **scorer.frame_scores(result, frames, band),
                  TELEA: scorer.frame_scores(telea_bands(frames, band), frames, band)}
        if real is not None:
            record["i3d"] = {"real": real, "fake": scorer.clip_features(result)}
        if cfg.save_outputs:
            _save_frames(pathlib.Path(cfg.output_dir) / "outputs" / ratio_key(r) / src.name, result)
        record["seconds"] = time.perf_counter() - t0
        fileio.write_text(str(folder / f"{ratio_key(r)}.json"), json.dumps(record))
        bar.update()


def evaluate(cfg) -> dict | None:
    """Runs (or resumes) the protocol; returns the results on process 0 (None on the others)."""
    sampler = check_config(cfg)
    sources = list_videos(cfg.videos)
    ratios = [float(r) for r in cfg.mask_ratios]
    settings = settings_of(cfg, sampler)
    out = pathlib.Path(cfg.output_dir)
    scorer = Scorer(cfg)
    generate = _Generator(cfg, sampler)
    share = sources[jax.process_index()::jax.process_count()]
    pending = [(src, [r for r in ratios if _cached(out / PER_VIDEO / src.name / f"{ratio_key(r)}.json",
                                                    settings) is None]) for src in share]
    pending = [(src, rs) for src, rs in pending if rs]
    log.info("%d of %d videos to score on this host (%d cached)", len(pending), len(share), len(share) - len(pending))
    with tqdm(total=sum(len(rs) for _, rs in pending), desc="evaluate", unit="run", file=sys.stderr) as bar:
        for src, todo in pending:
            bar.set_postfix_str(src.name)
            folder = out / PER_VIDEO / src.name
            os.makedirs(folder, exist_ok=True)
            done = bar.n
            try:
                _score_video(cfg, src, todo, folder, settings, scorer, generate, bar)
                (folder / ERROR_FILE).unlink(missing_ok=True)
            except Exception as err:  # one bad video must not stop the benchmark; it is reported
                log.exception("video %s failed; skipped", src.name)
                fileio.write_text(str(folder / ERROR_FILE), json.dumps({"video": src.name, "error": str(err)}))
                bar.update(done + len(todo) - bar.n)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("m3ddm_jax.evaluate: every host has scored its videos")
    if jax.process_index() != 0:
        return None
    return _write_report(out, sources, ratios, settings, scorer.skipped)


def _write_report(out: pathlib.Path, sources: list[Source], ratios: list[float], settings: dict,
                  skipped: dict[str, str]) -> dict:
    per_video, failed = {}, {}
    for src in sources:
        folder = out / PER_VIDEO / src.name
        records = {ratio_key(r): _cached(folder / f"{ratio_key(r)}.json", settings) for r in ratios}
        if all(records.values()):
            per_video[src.name] = records
        else:
            error = _read_json(folder / ERROR_FILE)
            failed[src.name] = error["error"] if error else "no result (its run did not finish)"
    results = summarize(per_video, failed, ratios, skipped, settings)
    fileio.write_text(str(out / "results.json"), json.dumps(results, indent=2))
    fileio.write_text(str(out / "results.md"), markdown(results))
    return results


def main(argv) -> None:
    del argv
    logging.getLogger("jax").setLevel(logging.WARNING)  # absl's INFO default would show backend probing
    logging.getLogger("m3ddm_jax").setLevel(logging.INFO)
    sharding.init_distributed()
    try:
        results = evaluate(flags.FLAGS.config)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if results is not None:
        print(markdown(results))


if __name__ == "__main__":
    # Defined here rather than at import: absl flags are global, and train.py and infer.py define --config too.
    config_flags.DEFINE_config_file("config", None, "evaluation config file (get_config())", lock_config=True)
    flags.mark_flag_as_required("config")
    app.run(main)
