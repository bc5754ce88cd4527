"""Batch outpainting: `python -m m3ddm_jax.infer --config configs/infer_example.py [--config.key=value ...]`.

Inputs (`config.inputs`, one entry or a tuple of entries, each one of):
* a folder: its video files (extensions VIDEO_EXTENSIONS, not recursive);
* a glob (`clips/**/*.mp4`): every file it matches, taken as a video;
* a text file (`.txt`): one video path per line; relative paths are relative to the list's folder; blank
  lines and lines starting with '#' are ignored;
* anything else: a video path. A missing one fails at its turn, like any other bad video.
The videos are sorted by name (the file stem); two inputs with the same name are a config error, since both
would write <name>.mp4. Setup errors (config, weights, an input list that gives no video) stop before any
work, with exit status 1.

Each video is outpainted as `python -m m3ddm_jax.outpaint VIDEO` would with the same sampler settings
(`config.sampler`, m3ddm_jax/sampling/settings.py; every video gets the same seed, so a result depends only
on its video), and written, with its audio, to output_dir/<name>.mp4. `max_frames` (0: all) keeps only the
first frames, for quick runs.

Output folder:
* <name>.mp4: written atomically, so a file under that name is always complete, and the same video with the
  same settings gives the same file. A later run skips every video whose mp4 exists (resume); delete an
  output to redo it. An output path taken by a folder fails its video before any outpainting.
* status/<name>.json: the latest attempt at the video: status 'ok' (frames, sizes, seconds, timings, and
  `truncated`: the input was cut short, so fewer frames decoded than its container declares, and those were
  outpainted, with a warning) or 'error' (the reason), and which process and host did it.
* status/<name>.lock: while a run outpaints the video. Runs started separately on one output folder split the
  videos this way: each claims a video before outpainting it and leaves a claimed one to its holder. A lock
  whose process died is taken over (fileio.claim).
* summary.json (written by process 0 of each run, from the status files, so the last run to finish writes it
  for the whole batch): the done, skipped (already finished before the run), failed and truncated videos,
  those still in progress in another run, the failures' reasons, the frames outpainted and frames per second
  (wall clock of the run, model loading and compilation included).

One bad video (missing, not a video, no frames, a size the canvas cannot take, ...) is logged, recorded in
its status file and skipped; the batch goes on, and the exit status is 2 if any video failed (0 when every
video is done or was already finished). Failed videos are retried by the next run.

Multi-host: with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set on every host and a shared
output folder, the sorted videos are split by jax.process_index() (video i goes to process i mod P), so
every video is handled by exactly one host. Within a host the Outpainter spreads each video's window batches
over the local devices. The hosts then gather every video's outcome; each process exits 2 if any video of
the batch failed, and process 0 writes the summary.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import pathlib
import sys
import time
from typing import Sequence

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from m3ddm_jax import configlib, fileio, jobs, sharding
from m3ddm_jax.outpaint import check_layout
from m3ddm_jax.pretrained import check_weights_folder, read_scheduler_config
from m3ddm_jax.sampling.pipeline import Outpainter
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.video.io import VIDEO_EXTENSIONS, check_output_file, read_video, write_video

log = logging.getLogger("m3ddm_jax.infer")

LIST_EXTENSION = ".txt"
STATUS_DIR, SUMMARY_FILE = "status", "summary.json"
EXIT_SETUP_ERROR, EXIT_VIDEOS_FAILED = jobs.EXIT_SETUP_ERROR, jobs.EXIT_ITEMS_FAILED


@dataclasses.dataclass(frozen=True)
class Item:
    name: str  # the output is <name>.mp4
    path: pathlib.Path


# ------------------------------------------------------------------------------------------------ inputs


def list_inputs(inputs: str | Sequence[str]) -> list[Item]:
    """The videos that `inputs` names (see the module doc), sorted by name, each path once."""
    entries = [inputs] if isinstance(inputs, str) else list(inputs)
    paths = [p for entry in entries for p in _expand(entry)]
    by_name: dict[str, Item] = {}
    for path in paths:
        path = pathlib.Path(os.path.abspath(path))
        item = by_name.setdefault(path.stem, Item(path.stem, path))
        if item.path != path:
            raise ValueError(f"inputs {item.path} and {path} would both be written as {path.stem}.mp4; rename "
                             f"one, or run them in separate batches")
    if not by_name:
        raise ValueError(f"inputs {entries!r} name no video; give video files, folders of videos, globs or "
                         f"{LIST_EXTENSION} lists")
    return [by_name[name] for name in sorted(by_name)]


def _expand(entry: str) -> list[str]:
    entry = os.path.expanduser(entry)
    if any(c in entry for c in "*?["):
        matches = sorted(p for p in glob.glob(entry, recursive=True) if not os.path.isdir(p))
        if not matches:
            raise FileNotFoundError(f"input glob {entry!r} matches no file")
        return matches
    if os.path.isdir(entry):
        found = sorted(os.path.join(entry, f) for f in os.listdir(entry)
                       if f.lower().endswith(VIDEO_EXTENSIONS) and os.path.isfile(os.path.join(entry, f)))
        if not found:
            raise ValueError(f"input folder {entry} holds no video file ({', '.join(VIDEO_EXTENSIONS)})")
        return found
    if entry.lower().endswith(LIST_EXTENSION):
        if not os.path.isfile(entry):
            raise FileNotFoundError(f"input list {entry} does not exist")
        base = os.path.dirname(entry)
        with open(entry) as f:
            lines = [line.strip() for line in f]
        return [os.path.join(base, os.path.expanduser(line)) for line in lines if line and not line.startswith("#")]
    return [entry]


# ------------------------------------------------------------------------------------------------ runner


REQUIRED_KEYS = ("inputs", "output_dir", "weights", "ratio", "max_frames", "compilation_cache", "sampler")


def check_config(cfg) -> SamplerSettings:
    """Fails fast, before any video or model is read, on a config that cannot work; returns its sampler
    settings."""
    configlib.require(cfg, REQUIRED_KEYS, "configs/infer_example.py")
    settings = SamplerSettings.from_config(cfg.sampler)
    if not cfg.output_dir:
        raise ValueError("set --config.output_dir=DIR")
    if cfg.max_frames < 0:
        raise ValueError(f"max_frames must be >= 0 (0: every frame), got {cfg.max_frames}")
    settings.check_steps(read_scheduler_config(check_weights_folder(cfg.weights)))
    # Ratio, canvas mode and canvas size at once, on a frame of the training size.
    check_layout(cfg.weights, (256, 256), cfg.ratio, settings)
    return settings


def output_path(cfg, item: Item) -> pathlib.Path:
    return pathlib.Path(cfg.output_dir) / f"{item.name}.mp4"


def status_path(cfg, name: str) -> pathlib.Path:
    return pathlib.Path(cfg.output_dir) / STATUS_DIR / f"{name}.json"


def _outpaint_video(cfg, outpainter: Outpainter, item: Item) -> dict:
    """Outpaints one video and writes its mp4; returns the 'ok' status fields."""
    t0 = time.perf_counter()
    video = read_video(item.path, max_frames=cfg.max_frames or None)
    check_layout(cfg.weights, video.frames.shape[1:3], cfg.ratio, outpainter.settings)
    if video.truncated:
        log.warning("%s; outpainting the %d frames that decode", video.truncation, len(video.frames))
    with tqdm(desc=item.name, unit="step", leave=False, file=sys.stderr) as steps:
        def progress(done: int, total: int) -> None:
            steps.total = total
            steps.update(done - steps.n)

        result = outpainter.outpaint(video.frames, video.fps, cfg.ratio, progress=progress)
    write_video(output_path(cfg, item), result.frames, video.fps, audio_from=video if video.has_audio else None)
    return {"frames": len(result.frames), "fps": float(video.fps), "source_size": list(video.frames.shape[1:3]),
            "output_size": list(result.frames.shape[1:3]), "timings": result.timings, "truncated": video.truncated,
            "declared_frames": video.declared_frames,
            "frames_per_second": len(result.frames) / (time.perf_counter() - t0)}


def infer(cfg) -> dict:
    """Runs (or resumes) the batch; returns the summary of the run (process 0 also writes it)."""
    t_start = time.perf_counter()
    settings = check_config(cfg)
    items = {item.name: item for item in list_inputs(cfg.inputs)}
    clash = [i.path for i in items.values() if output_path(cfg, i).resolve() == i.path.resolve()]
    if clash:
        raise ValueError(f"output {clash[0]} would overwrite its input; choose another output_dir")
    os.makedirs(pathlib.Path(cfg.output_dir) / STATUS_DIR, exist_ok=True)
    outcome = jobs.run(
        list(items), lambda name, outpainter, bar: _outpaint_video(cfg, outpainter, items[name]),
        status_path=lambda name: status_path(cfg, name),
        # Done means recorded as done: a run killed between publishing a video and its status did not finish it.
        finished=lambda name: (output_path(cfg, items[name]).is_file()
                               and jobs.read_status(status_path(cfg, name)).get("status") == "ok"),
        record=lambda name: {"video": name, "input": str(items[name].path),
                             "output": str(output_path(cfg, items[name]))},
        # An output path that cannot be written fails its video now, not after the outpainting.
        check=lambda name: check_output_file(output_path(cfg, items[name])),
        setup=lambda: Outpainter.from_folder(cfg.weights, settings), desc="infer", unit="video", verb="outpaint")
    assert outcome.all(), "a video was handled by no host"
    summary = summarize(cfg, list(items), outcome, time.perf_counter() - t_start)
    if jax.process_index() == 0:
        fileio.write_text(os.path.join(cfg.output_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
    return summary


def summarize(cfg, names: list[str], outcome: np.ndarray, seconds: float) -> dict:
    """The batch's outcome, read from the status files (jobs.tally): whichever run on the output folder writes
    the summary last writes it for the whole batch."""
    tally = jobs.tally(names, outcome, lambda name: status_path(cfg, name))
    truncated = [name for name in names if (r := jobs.read_status(status_path(cfg, name))).get("status") == "ok"
                 and r.get("truncated")]
    frames = sum(r.get("frames", 0) for r in tally["done"].values())
    return {"videos": len(names), "processes": jax.process_count(), "done": sorted(tally["done"]),
            "skipped": tally["skipped"],
            "failed": {name: r.get("error", "no status file") for name, r in tally["failed"].items()},
            "in_progress": tally["in_progress"], "truncated": truncated,
            "frames": frames, "seconds": seconds, "frames_per_second": frames / seconds,
            "per_video": tally["done"], "settings": json.loads(json.dumps(cfg.to_dict()))}


def report(summary: dict) -> str:
    lines = [f"{summary['videos']} videos on {summary['processes']} process(es): {len(summary['done'])} done, "
             f"{len(summary['skipped'])} skipped (already finished), {len(summary['failed'])} failed; "
             f"{summary['frames']} frames in {summary['seconds']:.1f} s ({summary['frames_per_second']:.2f} frames/s)"]
    lines += [f"failed: {name}: {reason}" for name, reason in summary["failed"].items()]
    lines += [f"in progress in another run: {name}" for name in summary["in_progress"]]
    lines += [f"truncated input (outpainted with the frames that decode): {name}" for name in summary["truncated"]]
    return "\n".join(lines)


def main(argv) -> int:
    del argv
    logging.getLogger("jax").setLevel(logging.WARNING)  # absl's INFO default would show backend probing
    logging.getLogger("m3ddm_jax").setLevel(logging.INFO)
    sharding.init_distributed()
    cfg = flags.FLAGS.config
    if cfg.compilation_cache:
        # A restarted batch (preemption, resume) reuses the compiled sampler from disk.
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache))
    code, summary = jobs.main(lambda: infer(cfg))
    if summary is None:
        return code
    if jax.process_index() == 0:
        print(report(summary))
        print(f"summary: {os.path.join(cfg.output_dir, SUMMARY_FILE)}")
    return jobs.exit_code(summary["failed"])


if __name__ == "__main__":
    # Defined here rather than at import: absl flags are global, and evaluate.py and train.py define --config too.
    config_flags.DEFINE_config_file("config", None, "batch inference config file (get_config())", lock_config=True)
    flags.mark_flag_as_required("config")
    app.run(main)
