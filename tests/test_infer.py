"""Batch outpainting (`python -m m3ddm_jax.infer`): input lists, setup errors, a batch with a bad file, resume
after kill -9, two hosts on 127.0.0.1. Runs are subprocesses (exit codes, kill -9, jax.distributed) sharing one
persistent compilation cache; tiny fixture weights, 3 frames per video, 2 steps on a 64-pixel canvas."""

import json
import os
import signal
import subprocess
import sys
import time

import av
import pytest

from conftest import REPO, VIDEOS, free_port, load_config, subprocess_env
from m3ddm_jax import infer
from m3ddm_jax.video import read_video

CONFIG = REPO / "configs" / "infer_tiny.py"
CLIPS = [VIDEOS / f"{name}.mp4" for name in ("big_buck_bunny", "caminandes_llama", "stream_of_water",
                                             "tears_of_steel_lab")]
FRAMES = 3  # infer_tiny's max_frames


def command(weights, out, inputs):
    return [sys.executable, "-m", "m3ddm_jax.infer", f"--config={CONFIG}", f"--config.weights={weights}",
            f"--config.output_dir={out}", f"--config.inputs={inputs!r}"]


def env(cache_dir, **extra):
    """Every run reads and fills the shared compilation cache."""
    return subprocess_env(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)


def run(cmd, compile_cache):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env(compile_cache))


def statuses(out):
    return {p.stem: json.loads(p.read_text()) for p in (out / "status").glob("*.json")}


def outputs(out):
    return sorted(p.stem for p in out.glob("*.mp4"))


# ------------------------------------------------------------------------------------ no outpainting


def test_inputs_folder_glob_list_and_paths(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("x.mp4", "y.MOV", "notes.txt"):
        (tmp_path / "a" / name).write_text("")
    (tmp_path / "list.txt").write_text(f"# a comment\n\na/x.mp4\n{tmp_path / 'b' / 'z.mkv'}\n")
    names = lambda spec: [(i.name, i.path) for i in infer.list_inputs(spec)]
    assert names(str(tmp_path / "a")) == [("x", tmp_path / "a" / "x.mp4"), ("y", tmp_path / "a" / "y.MOV")]
    assert names(str(tmp_path / "a" / "*.txt")) == [("notes", tmp_path / "a" / "notes.txt")]
    # A list's relative paths are relative to the list; a path listed twice counts once; a missing video is
    # kept (it fails at its turn); the result is sorted by name.
    assert names((str(tmp_path / "list.txt"), str(tmp_path / "a" / "x.mp4"), str(tmp_path / "w.mp4"))) == [
        ("w", tmp_path / "w.mp4"), ("x", tmp_path / "a" / "x.mp4"), ("z", tmp_path / "b" / "z.mkv")]
    with pytest.raises(ValueError, match=r"inputs .*a/x\.mp4 and .*b/x\.mp4 would both be written as x\.mp4"):
        infer.list_inputs((str(tmp_path / "a"), str(tmp_path / "b" / "x.mp4")))
    with pytest.raises(FileNotFoundError, match=r"input glob '.*\*\.webm' matches no file"):
        infer.list_inputs(str(tmp_path / "*.webm"))
    with pytest.raises(FileNotFoundError, match=r"input list .*nowhere\.txt does not exist"):
        infer.list_inputs(str(tmp_path / "nowhere.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"input folder .*empty holds no video file"):
        infer.list_inputs(str(tmp_path / "empty"))


def test_setup_errors_stop_before_any_work(tiny_weights, tmp_path):
    out = tmp_path / "out"
    cases = [({"ratio": "wide"}, ValueError, "cannot parse aspect ratio 'wide'"),
             ({"sampler.canvas_size": 100}, ValueError, "canvas_size=100 must be a positive multiple of 64"),
             ({"sampler.steps": 1}, ValueError, "sampler.steps=1: the M3DDM PNDM loop needs at least 2 timesteps"),
             ({"weights": str(tmp_path / "w")}, FileNotFoundError, f"weights folder {tmp_path / 'w'} does not exist"),
             ({"inputs": (str(out),)}, ValueError, f"output {out / 'x.mp4'} would overwrite its input")]
    os.makedirs(out)
    (out / "x.mp4").write_text("")
    for overrides, error, message in cases:
        cfg = load_config("infer_tiny", **{"weights": tiny_weights, "output_dir": str(out), "inputs": (str(CLIPS[0]),),
                                           **overrides})
        with pytest.raises(error, match=message):
            infer.infer(cfg)
    assert os.listdir(out) == ["x.mp4"]


def test_output_that_is_a_folder_fails_first(tiny_weights, tmp_path, monkeypatch):
    """An output path taken by a folder fails that video at once, naming the path, with no model loaded (it
    used to count as already finished, or to fail on the rename after the whole outpainting)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(infer.Outpainter, "from_folder", refuse)
    out = tmp_path / "out"
    (out / f"{CLIPS[0].stem}.mp4").mkdir(parents=True)
    cfg = load_config("infer_tiny", weights=tiny_weights, output_dir=str(out), inputs=(str(CLIPS[0]),))
    summary = infer.infer(cfg)
    assert summary["done"] == [] and summary["skipped"] == []
    assert f"output {out / CLIPS[0].stem}.mp4 is a folder" in summary["failed"][CLIPS[0].stem]


def test_example_config_needs_only_paths(tmp_path):
    cfg = load_config("infer_example", output_dir=str(tmp_path))
    assert cfg.sampler.steps == 50 and cfg.sampler.canvas_mode == "official"
    with pytest.raises(FileNotFoundError, match="weights folder weights/m3ddm does not exist"):
        infer.infer(cfg)


def test_cli_setup_error_exits_1(tiny_weights, tmp_path, compile_cache):
    proc = run(command(tiny_weights, tmp_path / "out", (str(tmp_path / "*.mp4"),)), compile_cache)
    assert proc.returncode == infer.EXIT_SETUP_ERROR == 1, proc.stderr[-3000:]
    assert f"error: input glob '{tmp_path}/*.mp4' matches no file" in proc.stderr


# ---------------------------------------------------------------------------------------- batches


def test_batch_with_a_bad_video(tiny_weights, tmp_path, compile_cache):
    """Two clips and a text file named .mp4, from a folder: the clips are outpainted to 9:16 with all their
    (limited) frames, the bad file is recorded with its reason, and the exit status is 2."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for clip in CLIPS[1:3]:
        os.symlink(clip, videos / clip.name)
    (videos / "notes.mp4").write_text("not a video\n")
    out = tmp_path / "out"
    proc = run(command(tiny_weights, out, (str(videos),)), compile_cache)
    assert proc.returncode == infer.EXIT_VIDEOS_FAILED == 2, proc.stderr[-3000:]
    assert outputs(out) == ["caminandes_llama", "stream_of_water"]
    for name in outputs(out):
        video = read_video(out / f"{name}.mp4")
        n, h, w = video.frames.shape[:3]
        assert n == FRAMES and abs(w - h * 9 / 16) <= 1, (name, video.frames.shape)
    records = statuses(out)
    assert sorted(records) == ["caminandes_llama", "notes", "stream_of_water"]
    assert records["notes"]["status"] == "error" and "notes.mp4 is not a video" in records["notes"]["error"]
    assert {records[n]["status"] for n in outputs(out)} == {"ok"}
    assert records["caminandes_llama"]["output_size"] == [1138, 640]  # 360x640 extended to 9:16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == ["caminandes_llama", "stream_of_water"] and summary["skipped"] == []
    assert list(summary["failed"]) == ["notes"] and summary["frames"] == 2 * FRAMES
    assert summary["frames_per_second"] > 0
    assert "video notes failed, skipped" in proc.stderr
    assert "3 videos on 1 process(es): 2 done, 0 skipped (already finished), 1 failed" in proc.stdout
    assert [p for p in os.listdir(out) if p.startswith(".")] == []  # no temporary left


def test_resume_after_kill(tiny_weights, tmp_path, compile_cache):
    """kill -9 once the first output exists: every output under its final name is complete; the next run
    skips the finished videos (their files untouched) and does the rest. Finished means the status says ok:
    a kill between publishing a video and writing its status leaves the video to be done again."""
    listing = tmp_path / "videos.txt"
    listing.write_text("".join(f"{clip}\n" for clip in CLIPS))
    out = tmp_path / "out"
    cmd = command(tiny_weights, out, (str(listing),))
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(compile_cache), stdout=log, stderr=log)
        deadline = time.time() + 300
        while not outputs(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    published = outputs(out)
    assert 1 <= len(published) < len(CLIPS), (published, (tmp_path / "killed.log").read_text()[-3000:])
    for name in published:
        assert len(read_video(out / f"{name}.mp4").frames) == FRAMES
    status = lambda name: out / "status" / f"{name}.json"
    finished = [n for n in published if status(n).exists() and json.loads(status(n).read_text())["status"] == "ok"]
    assert len(published) - len(finished) <= 1  # the kill can land between a video and its status
    stamps = {p: p.stat().st_mtime_ns for n in finished for p in (out / f"{n}.mp4", status(n))}
    assert len(list(out.rglob("*.lock"))) <= 1  # the killed run's claim on the video it was doing, if any

    proc = run(cmd, compile_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outputs(out) == [c.stem for c in CLIPS]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert list(out.rglob("*.lock")) == []  # taken over: its process is dead
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == finished and summary["done"] == [c.stem for c in CLIPS if c.stem not in finished]
    assert summary["failed"] == {}


def test_two_hosts_split_the_videos(tiny_weights, tmp_path, compile_cache):
    """Two processes on 127.0.0.1: video i goes to process i mod 2, each video is done once, and process 0
    summarizes the whole batch."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for clip in CLIPS:
        os.symlink(clip, videos / clip.name)
    out = tmp_path / "out"
    cmd = command(tiny_weights, out, (str(videos / "*.mp4"),))
    port = free_port()
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(compile_cache, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    logs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, logs):
        assert p.returncode == 0, err[-3000:]
    names = [c.stem for c in CLIPS]
    records = statuses(out)
    assert sorted(records) == names == outputs(out)
    assert [records[n]["process"] for n in names] == [i % 2 for i in range(len(names))]
    for i, (_, err) in enumerate(logs):  # together exactly the batch: no video done twice
        share = len(names[i::2])
        assert f"{share} of {share} videos to outpaint on this host" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["done"] == names and summary["frames"] == FRAMES * len(names)
    assert "videos on 2 process(es)" in logs[0][0] and "videos on" not in logs[1][0]


def cut_after_packets(src, dst, count):
    """The bytes of `src` up to the end of its `count`-th video packet: a file cut short (a broken download)
    whose container still declares every frame."""
    with av.open(str(src)) as container:
        ends = sorted(p.pos + p.size for p in container.demux(video=0) if p.pos is not None and p.size)
    dst.write_bytes(src.read_bytes()[:ends[count - 1]])
    return dst


def test_two_runs_share_one_output_folder(tiny_weights, tmp_path, compile_cache):
    """Two independent runs on one output folder split the videos (each claims a video with a lock file), the
    summary covers the whole batch whoever writes it last, four copies of one clip give four identical files
    (from either process), and a video cut short is done with the frames that decode and flagged 'truncated'."""
    videos = tmp_path / "videos"
    videos.mkdir()
    copies = [f"copy{i}" for i in range(4)]
    for name in copies:
        os.symlink(CLIPS[2], videos / f"{name}.mp4")
    cut = cut_after_packets(CLIPS[2], videos / "cut.mp4", FRAMES - 1)
    decoded = len(read_video(cut).frames)
    assert decoded < FRAMES
    out = tmp_path / "out"
    cmd = command(tiny_weights, out, (str(videos),))
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(compile_cache)) for _ in range(2)]
    logs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, logs):
        assert p.returncode == 0, err[-3000:]
    names = sorted(copies + ["cut"])
    assert outputs(out) == names
    for name in names:  # each video outpainted by exactly one of the runs
        assert sum(err.count(f"video {name} done") for _, err in logs) == 1, [err[-2000:] for _, err in logs]
    first = (out / "copy0.mp4").read_bytes()
    assert all((out / f"{name}.mp4").read_bytes() == first for name in copies)
    records = statuses(out)
    assert records["cut"]["status"] == "ok" and records["cut"]["truncated"]
    assert records["cut"]["frames"] == decoded and records["cut"]["declared_frames"] > FRAMES
    assert not any(records[name]["truncated"] for name in copies)
    assert "cut.mp4 is truncated" in logs[0][1] + logs[1][1]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["done"] + summary["skipped"]) == names and summary["failed"] == {}
    assert summary["truncated"] == ["cut"]
    assert [p.name for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".lock"] == []
