"""The evaluation runner: the protocol end to end with tiny weights on two bundled clips (a video file and a
DAVIS-style frame folder), resume, scoring a predictions folder, bad videos, multi-host split, bad input."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, VIDEOS, load_config
from torch_reference import TorchI3D
from m3ddm_jax import evaluate, evaluation, jobs
from m3ddm_jax.convert.mapping import CheckpointMismatchError
from m3ddm_jax.sampling.pipeline import Outpainter
from m3ddm_jax.video import read_video
from m3ddm_jax.video.canvas import TELEA_RADIUS

ASSETS = REPO / "assets" / "videos"  # CC BY 3.0 / CC0 clips; see SOURCES.md there


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """llama.mp4 (a video file) and water/ (a DAVIS-style folder of 16 JPEG frames)."""
    folder = tmp_path_factory.mktemp("videos")
    os.symlink(ASSETS / "caminandes_llama.mp4", folder / "llama.mp4")
    os.makedirs(folder / "water")
    for i, frame in enumerate(read_video(ASSETS / "stream_of_water.mp4", max_frames=16).frames):
        cv2.imwrite(str(folder / "water" / f"{i:05d}.jpg"), frame[..., ::-1])
    (folder / "README.txt").write_text("not a video: ignored")
    return folder


def predictions_of(folder, tmp_path, ratios=("0.25", "0.66")):
    """A predictions folder whose results are the ground-truth videos themselves."""
    out = tmp_path / "predictions"
    for key in ratios:
        os.makedirs(out / key)
        for entry in folder.iterdir():
            if entry.name != "README.txt":
                os.symlink(entry, out / key / entry.name)
    return str(out)


@pytest.fixture(scope="module")
def first_run(tiny_weights, videos, lpips_pair, tmp_path_factory):
    """One outpainting run (LPIPS on, FVD off, outputs saved) and its output folder."""
    _, lin, alex = lpips_pair
    out = tmp_path_factory.mktemp("eval")
    cfg = load_config(videos=str(videos), weights=tiny_weights, output_dir=str(out), save_outputs=True,
                      **{"metrics.lpips_lin": lin, "metrics.alexnet": alex})
    return cfg, evaluate.evaluate(cfg), out


def test_end_to_end(first_run, videos):
    cfg, results, out = first_run
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["videos"] == ["llama", "water"] and results["failed_videos"] == {}
    assert set(results["ratios"]) == {"0.25", "0.66"}
    assert results["skipped_metrics"] == {"fvd": "no I3D weight file (metrics.i3d is empty)"}
    for row in [*results["ratios"].values(), results["average"]]:
        assert set(row) >= {"psnr", "ssim", "psnr_generated", "ssim_generated", "lpips"}
        assert all(np.isfinite(v) for v in row.values())
        assert row["psnr"] > row["psnr_generated"]  # the known region is kept exactly
    assert results["average"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in results["ratios"].values()]))
    table = (out / "results.md").read_text()
    for row in ("| 0.25 | 2 |", "| 0.66 | 2 |", "| average |", "- FVD: no I3D weight file"):
        assert row in table
    # The protocol's geometry: 64x128 frames, bands of round(r * 128 / 2) = 16 and 42 pixels, the centre kept.
    water = evaluation.Source("water", videos / "water")
    gt = evaluation.prepare(evaluation.read_frames(water, 16, 24.0)[0], (64, 128))
    for key, band in (("0.25", 16), ("0.66", 42)):
        record = json.loads((out / "per_video" / "water" / f"{key}.json").read_text())
        assert record["band"] == band and record["frames"] == 16 and record["size"] == [64, 128]
        saved = np.stack([cv2.imread(str(p))[..., ::-1]
                          for p in sorted((out / "outputs" / key / "water").iterdir())])
        np.testing.assert_array_equal(saved[:, :, band:128 - band], gt[:, :, band:128 - band])
        assert np.abs(saved[:, :, :band].astype(int) - gt[:, :, :band]).mean() > 1  # generated, not copied
        # The TELEA baseline of the same bands: OpenCV's inpainting of each frame from its centre.
        mask = np.zeros((64, 128), np.uint8)
        mask[:, :band] = mask[:, 128 - band:] = 1
        telea = np.stack([cv2.inpaint(f * (1 - mask[..., None]), mask, TELEA_RADIUS, cv2.INPAINT_TELEA) for f in gt])
        expected = evaluation.image_scores(telea, gt, band)
        assert {k: record["telea"][k] for k in expected} == pytest.approx(expected) and "lpips" in record["telea"]
        assert record["telea"]["psnr"] > record["telea"]["psnr_generated"]
    telea = results["telea"]
    assert set(telea["ratios"]) == {"0.25", "0.66"} and all(np.isfinite(v) for v in telea["average"].values())
    for row in ("| 0.25 TELEA init | 2 |", "| 0.66 TELEA init | 2 |", "| average TELEA init |"):
        assert row in table


def test_resume_does_no_outpainting(first_run, monkeypatch):
    cfg, results, out = first_run
    files = sorted((out / "per_video").rglob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run loaded the model")

    monkeypatch.setattr(Outpainter, "from_folder", refuse)
    assert evaluate.evaluate(cfg) == results
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_saved_outputs_rescore_the_same(first_run):
    """The saved PNG outputs, scored as a predictions folder, give the run's own scores."""
    cfg, results, out = first_run
    cfg = cfg.copy_and_resolve_references()
    cfg.weights, cfg.predictions, cfg.output_dir, cfg.save_outputs = "", str(out / "outputs"), str(out / "again"), False
    rescored = evaluate.evaluate(cfg)
    for key, row in results["ratios"].items():
        for metric, value in row.items():
            assert rescored["ratios"][key][metric] == pytest.approx(value, rel=1e-5), (key, metric)


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "i3d.pt"
    torch.save(TorchI3D().state_dict(), path)
    return str(path)


def test_identical_predictions_score_perfectly(videos, lpips_pair, i3d_file, tmp_path):
    _, lin, alex = lpips_pair
    cfg = load_config(videos=str(videos), weights="", predictions=predictions_of(videos, tmp_path),
                      output_dir=str(tmp_path / "out"),
                      **{"metrics.lpips_lin": lin, "metrics.alexnet": alex, "metrics.i3d": i3d_file})
    results = evaluate.evaluate(cfg)
    assert results["skipped_metrics"] == {}
    for row in [*results["ratios"].values(), results["average"]]:
        assert row["psnr"] == row["psnr_generated"] == np.inf
        assert row["ssim"] == pytest.approx(1, abs=1e-6) and row["ssim_generated"] == pytest.approx(1, abs=1e-6)
        assert row["lpips"] == pytest.approx(0, abs=1e-6)
        assert row["fvd"] == pytest.approx(0, abs=1e-6)
    assert results["ratios"]["0.25"]["fvd_videos"] == 2
    assert "| 0.25 | 2 | inf | 1.0000 | inf | 1.0000 | 0.0000 |" in (tmp_path / "out" / "results.md").read_text()


def test_bad_video_is_skipped_and_listed(videos, tmp_path, monkeypatch):
    """A frame folder with a frame of another size fails alone, names the frame, and is retried next run;
    the videos are split over two (simulated) hosts and process 0 writes the report."""
    folder = tmp_path / "videos"
    os.makedirs(folder / "broken")
    os.symlink(videos / "llama.mp4", folder / "llama.mp4")
    for i, size in enumerate([(48, 64), (48, 64), (40, 64)]):
        cv2.imwrite(str(folder / "broken" / f"{i}.png"), np.zeros((*size, 3), np.uint8))
    cfg = load_config(videos=str(folder), weights="", predictions=predictions_of(folder, tmp_path),
                      output_dir=str(tmp_path / "out"))
    barriers = []

    def allgather(outcome):  # the barrier, where each host's outcomes are gathered
        barriers.append(outcome)
        return np.stack([outcome])

    monkeypatch.setattr(evaluate.jax, "process_count", lambda: 2)
    monkeypatch.setattr(jobs.multihost_utils, "process_allgather", allgather)
    monkeypatch.setattr(evaluate.jax, "process_index", lambda: 1)
    assert evaluate.evaluate(cfg) is None  # host 1 scores its share, 'llama', and writes no report
    assert sorted(os.listdir(tmp_path / "out" / "per_video")) == ["llama"]
    monkeypatch.setattr(evaluate.jax, "process_index", lambda: 0)
    results = evaluate.evaluate(cfg)  # host 0: 'broken'
    assert [b.tolist() for b in barriers] == [[0, jobs.DONE], [jobs.FAILED, 0]]  # host 1 had llama, host 0 broken
    status = json.loads((tmp_path / "out" / "per_video" / "broken" / "status.json").read_text())
    assert status["status"] == "error" and status["process"] == 0 and "a 40x64 frame" in status["error"]
    assert results["videos"] == ["llama"] and list(results["failed_videos"]) == ["broken"]
    assert f"{folder / 'broken' / '2.png'}: a 40x64 frame after 48x64 frames" in results["failed_videos"]["broken"]
    assert "- broken: " in (tmp_path / "out" / "results.md").read_text()
    cv2.imwrite(str(folder / "broken" / "2.png"), np.zeros((48, 64, 3), np.uint8))  # fixed: retried, scored
    assert evaluate.evaluate(cfg)["videos"] == ["broken", "llama"]
    assert json.loads((tmp_path / "out" / "per_video" / "broken" / "status.json").read_text())["status"] == "ok"


def test_bad_input_is_named(videos, tiny_weights, lpips_pair, tmp_path):
    run = lambda **kw: evaluate.evaluate(load_config(**{"videos": str(videos), "weights": tiny_weights,
                                                        "output_dir": str(tmp_path / "out"), **kw}))
    with pytest.raises(FileNotFoundError, match=f"videos folder {tmp_path / 'nowhere'} does not exist"):
        run(videos=str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=f"no videos in videos folder {tmp_path / 'empty'}"):
        run(videos=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=f"metrics.i3d: weight file {tmp_path / 'i3d.pt'} does not exist"):
        run(**{"metrics.i3d": str(tmp_path / "i3d.pt")})
    with pytest.raises(FileNotFoundError, match=f"weights folder {tmp_path / 'w'} does not exist"):
        run(weights=str(tmp_path / "w"))
    with pytest.raises(ValueError, match="sampler.steps=1: the M3DDM PNDM loop needs at least 2 timesteps.*use "
                                         "more steps or the ddim scheduler"):
        run(**{"sampler.steps": 1})
    with pytest.raises(ValueError, match="set exactly one of --config.weights"):
        run(predictions=str(videos))
    with pytest.raises(FileNotFoundError, match=f"predictions folder {videos} has no sub-folder 0.25, 0.66"):
        run(weights="", predictions=str(videos))
    _, lin, alex = lpips_pair
    with pytest.raises(CheckpointMismatchError, match=f"(?s)missing keys: .*Check that {lin} is the LPIPS AlexNet"
                                                      ) as err:  # a weight file's hint, not config.json's
        run(**{"metrics.lpips_lin": lin, "metrics.alexnet": lin})
    assert "config.json" not in str(err.value)


def test_truncated_video_is_refused(tmp_path):
    """A ground-truth video cut short is not scored (it fails, and the report lists it with the reason)."""
    clip = VIDEOS / "stream_of_water.mp4"
    data = clip.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:int(len(data) * 0.3)])
    with pytest.raises(ValueError, match=r"cut\.mp4 is truncated: .*a benchmark video must be complete"):
        evaluation.read_frames(evaluation.Source("cut", tmp_path / "cut.mp4"), 0, 24.0)
    frames, _ = evaluation.read_frames(evaluation.Source("cut", tmp_path / "cut.mp4"), 2, 24.0)  # the first 2 exist
    assert len(frames) == 2


def test_band_geometry():
    assert [evaluation.band_width(854, r) for r in (0.25, 0.66)] == [107, 282]  # DAVIS 480p width
    assert [evaluation.band_width(256, r) for r in (0.25, 0.66)] == [32, 84]
    mask = evaluation.generated_mask((2, 10), 3)
    assert mask[0].tolist() == [True] * 3 + [False] * 4 + [True] * 3
    with pytest.raises(ValueError, match="mask ratio 0.01 of a 64-pixel-wide frame leaves bands of 0 pixels"):
        evaluation.band_width(64, 0.01)


def test_davis_config_needs_only_paths(tmp_path):
    """The DAVIS config is the paper's protocol; its placeholder paths are the first thing it asks for."""
    cfg = load_config("eval_davis", output_dir=str(tmp_path))
    assert tuple(cfg.mask_ratios) == (0.25, 0.66) and cfg.sampler.steps == 50
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.evaluate(cfg)


def test_cli_error(tiny_weights, tmp_path):
    command = [sys.executable, "-m", "m3ddm_jax.evaluate", "--config", str(REPO / "configs" / "eval_tiny.py"),
               f"--config.weights={tiny_weights}", f"--config.videos={tmp_path / 'nowhere'}",
               f"--config.output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert f"error: videos folder {tmp_path / 'nowhere'} does not exist" in proc.stderr
