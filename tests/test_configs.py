"""Every shipped config (configs/*.py): it passes its entry point's start-up checks, a missing section or key
stops it at start-up with a message naming it, and it runs at tiny size through its entry point with only
sizes and paths changed on the command line.

Where each config runs (checked against configs/ below, so a new config needs a run):
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, VIDEOS, config_from_flags, subprocess_env
from m3ddm_jax import evaluate, infer, pretrained, train
from m3ddm_jax.configlib import load_config as load
from m3ddm_jax.models.layers import random_init
from m3ddm_jax.models.pixel_space import PixelSpace
from m3ddm_jax.models.unet3d import UNet3DConfig
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.training import export
from m3ddm_jax.training.trainer import data_sources
from m3ddm_jax.video import read_video, write_video

sys.path.insert(0, str(REPO / "tools"))
import convert_checkpoint  # noqa: E402

PAPER_RUN = "test_configs.py::test_paper_config_trains_and_its_export_outpaints"
RUN_BY = {
    "demo": "test_configs.py::test_demo_trains_and_samples",
    "m3ddm_sd15_256": PAPER_RUN,
    "test_tiny": "test_train.py (every run there), test_configs.py::test_missing_section_stops_the_cli",
    "infer_example": PAPER_RUN,
    "infer_tiny": "test_infer.py (its CLI runs)",
    "eval_davis": PAPER_RUN,
    "eval_tiny": "test_evaluate.py (its runs)",
}
CONFIGS = {p.stem: p for p in sorted((REPO / "configs").glob("*.py"))}
TRAINING = sorted(n for n in CONFIGS if not n.startswith(("eval_", "infer_")))
ENTRY_POINTS = {"infer": infer, "eval": evaluate}  # by config-name prefix; the others are training configs
CLIP = VIDEOS / "stream_of_water.mp4"  # CC0 1.0; see SOURCES.md there


def test_every_config_is_run_by_a_test():
    assert set(RUN_BY) == set(CONFIGS)


def startup_check(name: str, tiny_weights: str, tmp_path):
    """The config's entry point (train, infer or evaluate) and the config, with what only a user can give
    (data, weights, outputs) filled in."""
    cfg = load(CONFIGS[name])
    entry = ENTRY_POINTS.get(name.split("_")[0], train)
    if entry is train:
        if not cfg.data.root and not cfg.data.sources:
            cfg.data.root = str(REPO / "assets" / "videos")
        cfg.init.weights = cfg.init.weights and tiny_weights
        cfg.latent.weights = cfg.latent.weights and tiny_weights
    else:
        cfg.weights, cfg.output_dir = tiny_weights, str(tmp_path)
        if entry is evaluate:
            cfg.videos = str(VIDEOS)
    return entry, cfg


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_passes_its_startup_check(name, tiny_weights, tmp_path):
    entry, cfg = startup_check(name, tiny_weights, tmp_path)
    assert isinstance(entry.check_config(cfg), SamplerSettings)


def test_training_configs_are_consistent():
    for name in TRAINING:
        cfg = load(CONFIGS[name])
        assert cfg.optim.total_steps == cfg.total_steps, name
        assert {n for n, _ in cfg.logical_axis_rules} >= {"batch", "embed", "heads", "mlp"}, name


def test_no_data_is_a_clear_error():
    cfg = load(REPO / "configs" / "m3ddm_sd15_256.py")
    with pytest.raises(ValueError, match="--config.data.root=DIR"):
        data_sources(cfg)


def without(cfg, key: str):
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    with node.unlocked():
        del node[leaf]
    return cfg


@pytest.mark.parametrize("name, key, message", [
    ("demo", "sample", "the config has no sample.every, sample.videos, sample.max_frames, sample.ratio, "
                       "sample.grid_columns; add them to the config file (configs/demo.py has every key)"),
    ("demo", "optim.ema_decay", "the config has no optim.ema_decay; add it"),
    ("demo", "sampler", "the config has no sampler; add it"),
    ("m3ddm_sd15_256", "sampler.seed", "config section `sampler`: missing key(s) sampler.seed."),
    ("infer_example", "sampler.canvas_size", "missing key(s) sampler.canvas_size."),
    ("infer_tiny", "ratio", "the config has no ratio; add it to the config file (configs/infer_example.py"),
    ("eval_davis", "metrics.i3d", "the config has no metrics.i3d; add it to the config file (configs/eval_davis.py"),
], ids=["demo-sample", "demo-optim.ema_decay", "demo-sampler", "paper-sampler.seed", "infer-sampler.canvas_size",
        "infer-ratio", "eval-metrics.i3d"])
def test_missing_key_is_named_at_startup(name, key, message, tiny_weights, tmp_path):
    entry, cfg = startup_check(name, tiny_weights, tmp_path)
    with pytest.raises(ValueError) as err:
        entry.check_config(without(cfg, key))
    assert message in str(err.value)


def test_sampling_settings_the_model_cannot_take_fail_at_startup():
    """The demo's model takes canvases of multiples of 4 (pixel space 2 x UNet 2): a 30-pixel canvas would fail
    only when training ends and samples are drawn; it fails before the first step."""
    cfg = load(CONFIGS["demo"])
    assert train.sample_canvas_multiple(cfg) == 4
    cfg.sampler.canvas_size = 30
    with pytest.raises(ValueError, match="canvas_size=30 must be a positive multiple of 4"):
        train.check_config(cfg)


def test_unknown_sampler_key_is_named():
    cfg = load(CONFIGS["demo"])
    with cfg.sampler.unlocked():
        cfg.sampler.canvas_long_side = 32  # the old name
    with pytest.raises(ValueError, match=r"unknown key\(s\) sampler\.canvas_long_side"):
        train.check_config(cfg)


def test_missing_section_stops_the_cli(tmp_path):
    """Through `python -m m3ddm_jax.train`: one line naming the section, exit status 1, and no work done
    (nothing written in the workdir)."""
    config = tmp_path / "no_sample.py"
    config.write_text(f"from m3ddm_jax.configlib import load_config\n\n\ndef get_config():\n"
                      f"    c = load_config({str(CONFIGS['test_tiny'])!r})\n    del c['sample']\n    return c\n")
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "m3ddm_jax.train", f"--config={config}", f"--workdir={workdir}"],
                          capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: the config has no sample.every, sample.videos" in proc.stderr
    assert not workdir.exists()


# ------------------------------------------------------------------------------------ the runs


def train_cli(name: str, workdir, cache_dir: str, *overrides: str):
    cmd = [sys.executable, "-m", "m3ddm_jax.train", f"--config={CONFIGS[name]}", f"--workdir={workdir}",
           f"--config.compilation_cache={cache_dir}", "--config.total_steps=2", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "group" not in r]  # training rows; validation rows are tested below
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"]) and rows[-1]["skipped_steps"] == 0
    assert export.checkpoint_steps(str(workdir)) == ([2], [])
    return rows


def test_demo_trains_and_samples(tmp_path, compile_cache):
    """The demo for 2 steps; it ends with its samples: the held-out clip outpainted to 9:16 by the EMA model;
    and its validation at steps 0 and 2: metrics.jsonl rows with the TELEA baseline, a frame grid."""
    workdir = tmp_path / "demo"
    train_cli("demo", workdir, compile_cache, "--config.sample.max_frames=4", "--config.sampler.steps=2",
              "--config.validation.max_frames=4")
    val = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if '"group"' in line]
    assert [r["step"] for r in val] == [0, 2]
    assert all(np.isfinite([r["val_loss"], r["val_psnr_generated"], r["estimate_psnr_generated"],
                            r["telea_psnr_generated"]]).all() for r in val)
    assert (workdir / "validation" / "step_0000002" / "grid.png").stat().st_size > 0
    folder = workdir / "samples" / "step_0000002"
    video = read_video(folder / "stream_of_water.mp4")
    n, h, w = video.frames.shape[:3]
    assert n == 4 and abs(w - h * 9 / 16) <= 1
    assert (folder / "grid.png").stat().st_size > 0
    assert isinstance(pretrained.load_model(str(workdir / export.MODEL / pretrained.VAE)), PixelSpace)


def short_clip(folder, frames: int = 8):
    """The first frames of a bundled clip, as a video file of its own."""
    clip = read_video(CLIP, max_frames=frames)
    path = folder / "water.mp4"
    write_video(path, clip.frames, clip.fps)
    return path


# One canvas (48x32) for every outpainting below, so that the sampler compiles once. 48 is a multiple of the
# small model's 16 (VAE 8 x UNet 2) but not of SD's 64: the start-up checks must read the folder's model.
SAMPLER_SIZES = ("--config.sampler.steps=2", "--config.sampler.canvas_mode=native", "--config.sampler.canvas_size=48",
                 "--config.sampler.global_size=(64, 64)")


def small_weights(folder, tiny_weights) -> str:
    """A weights folder as tools/convert_checkpoint.py writes it: the reference folder's tiny VAE and a smaller
    UNet than its tiny one, with random parameters. (The reference UNet's train step takes minutes to compile
    on CPU; this one's, with the paper config's bfloat16 and remat, about a minute. README's sequence with
    the reference UNet itself is run by hand.)"""
    unet = random_init(pretrained.abstract_model(UNet3DConfig(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock3D", "DownBlockP3D"),
        up_block_types=("UpBlockP3D", "CrossAttnUpBlock3D"), layers_per_block=1, attention_heads=2, norm_num_groups=8,
        cross_attention_dim=32, temporal_position_dim=16)), seed=0)
    pretrained.save_weights(str(folder), unet=unet, vae=pretrained.load_weights(tiny_weights).vae)
    return str(folder)


def test_paper_config_trains_and_its_export_outpaints(tmp_path, tiny_weights, compile_cache, capsys):
    """The README's sequence on small weights: the paper config for 2 steps from a small weights folder (SD's
    latent space: a VAE; bfloat16 and remat as configured), its export, outpainting a clip with the exported
    folder (the outpaint CLI), then the infer and eval configs that no other test runs, on that folder and
    one short clip."""
    init = small_weights(tmp_path / "init", tiny_weights)
    workdir = tmp_path / "paper"
    train_cli("m3ddm_sd15_256", workdir, compile_cache, f"--config.init.weights={init}",
              f"--config.latent.weights={init}", f"--config.data.root={REPO / 'assets' / 'videos'}",
              "--config.data.global_batch_size=1", "--config.data.worker_count=0", "--config.data.clip.size=(64, 64)",
              "--config.data.clip.num_frames=4", "--config.data.clip.num_global_frames=2")

    model = tmp_path / "model"
    assert convert_checkpoint.main(["export", "--src", str(workdir), "--dst", str(model)]) == 0, \
        capsys.readouterr().err
    weights, source = pretrained.load_weights(str(model)), pretrained.load_weights(init)
    assert weights.unet.config == source.unet.config  # the run's architecture, at its runtime defaults
    assert weights.vae.config == source.vae.config  # the run's latent space, its weights unchanged
    np.testing.assert_array_equal(weights.vae.decoder.conv_out.kernel.get_value(),
                                  source.vae.decoder.conv_out.kernel.get_value())
    assert weights.scheduler_config == load(CONFIGS["m3ddm_sd15_256"]).scheduler.to_dict()

    videos = tmp_path / "videos"
    videos.mkdir()
    clip = short_clip(videos)
    out = tmp_path / "water_9x16.mp4"
    from m3ddm_jax import outpaint

    assert outpaint.main([str(clip), "--ratio", "9:16", "--output", str(out), "--weights", str(model), "--steps", "2",
                          "--mode", "native", "--canvas-size", "48", "--global-size", "64x64"]) == 0
    result = read_video(out)
    assert len(result.frames) == 8 and abs(result.frames.shape[2] - result.frames.shape[1] * 9 / 16) <= 1

    cfg = config_from_flags(CONFIGS["infer_example"], f"--config.inputs=('{clip}',)", f"--config.weights={model}",
                            f"--config.output_dir={tmp_path / 'infer'}", *SAMPLER_SIZES)
    summary = infer.infer(cfg)
    assert summary["done"] == ["water"] and summary["failed"] == {} and summary["frames"] == 8, summary
    cfg = config_from_flags(CONFIGS["eval_davis"], f"--config.videos={videos}", f"--config.weights={model}",
                            f"--config.output_dir={tmp_path / 'eval'}", "--config.frame_size=(96, 54)", *SAMPLER_SIZES)
    results = evaluate.evaluate(cfg)
    assert results["videos"] == ["water"] and results["failed_videos"] == {}, results
    assert all(np.isfinite(row["psnr"]) for row in results["ratios"].values())
