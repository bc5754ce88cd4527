"""Outpainting whole videos: the hierarchical run (batched = sequential), the kept pixels, the CLI end to end
(frame count, size, audio) and its errors. A tiny random model; few steps and small canvases."""

import pathlib
import re
import shutil
import sys

import av
import jax
import numpy as np
import pytest

from conftest import SMALL_UNET, VIDEOS, mux_sine
from m3ddm_jax import pretrained
from m3ddm_jax.models.layers import random_init
from m3ddm_jax.models.vae import VAEConfig
from m3ddm_jax.outpaint import main
from m3ddm_jax.sampling import Outpainter, plan_windows
from m3ddm_jax.sampling.pipeline import Draws, VideoLatents, compose_output
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.video import composite, crop, make_canvas, native_layout, official_layout, read_video, write_video
from m3ddm_jax.video.canvas import global_frames, to_model_range

CLIP = VIDEOS / "stream_of_water.mp4"  # CC0 1.0 (MDN interactive-examples); see SOURCES.md
TESTS = pathlib.Path(__file__).resolve().parent
STEPS = 2
CANVAS = 64  # native canvas long side: 8x8 latents
SETTINGS = SamplerSettings(steps=STEPS, canvas_mode="native", canvas_size=CANVAS, global_size=(64, 64))


def tiny_models():
    """A small UNet (two levels: quick to compile) and the fixtures' tiny VAE architecture, random parameters."""
    unet = random_init(pretrained.abstract_model(SMALL_UNET), seed=1)
    vae = random_init(pretrained.abstract_model(VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                                                          norm_num_groups=4)), seed=2)
    return unet, vae


def synthetic_frames(n=50):
    """n frames (>= 50: strides 15/5/1) of 48x64 with some structure."""
    y, x = np.mgrid[:48, :64]
    t = np.arange(n)[:, None, None]
    return np.stack([(x * 4 + t * 3) % 256, (y * 5 + t) % 256, (x + y + 7 * t) % 256], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "tiny"
    unet, vae = tiny_models()
    pretrained.save_weights(str(folder), unet=unet, vae=vae)
    return folder


@pytest.fixture(scope="module")
def video_frames():
    return synthetic_frames()


def test_hierarchical_batched_equals_sequential(weights, video_frames):
    """Windows of one plan batch run in one sampler call give the same frames as one call per window; the
    output has exactly N frames and the source pixels untouched (native mode, before any encoding)."""
    results, progress = {}, []
    for per_call in (1, 0):
        outpainter = Outpainter.from_folder(str(weights), SETTINGS.replace(windows_per_call=per_call, seed=3),
                                            devices=jax.devices()[:1])  # per_call 1: one window a call
        results[per_call] = outpainter.outpaint(video_frames, 25.0, "1:1",
                                                progress=lambda done, total: progress.append((done, total)))
    seq, batched = results[1], results[0]
    assert seq.plan.strides == (15, 5, 1)
    assert [len(b) for b in seq.plan.batches()] == [1, 1, 4]
    assert progress[-1] == (6 * STEPS, 6 * STEPS) and len(progress) == 6 + 3
    np.testing.assert_allclose(batched.latents, seq.latents, rtol=1e-4, atol=1e-4)
    assert np.abs(batched.frames.astype(int) - seq.frames).max() <= 1
    assert batched.frames.shape == (50, 64, 64, 3)
    y0, y1, x0, x1 = batched.layout.output_box
    np.testing.assert_array_equal(batched.frames[:, y0:y1, x0:x1], video_frames)
    assert batched.frames[:, :y0].std() > 1  # something was generated there
    assert set(batched.timings) == {"vae", "unet", "total"}


def test_one_window_video_equals_outpaint_window(weights):
    """A 16-frame video is one window: outpaint() gives the latents that outpaint_window() gives for its
    canvas, global frames and draws (the two share the per-video preparation and the sampler call)."""
    outpainter = Outpainter.from_folder(str(weights), SETTINGS)
    frames = synthetic_frames(16)
    result = outpainter.outpaint(frames, 25.0, "1:1", key=5)
    assert len(result.plan.windows) == 1
    canvas = make_canvas(frames, result.layout)
    latent_hw = lambda hw: (hw[0] // outpainter.vae_factor, hw[1] // outpainter.vae_factor)
    draws = Draws.from_key(5, latent_hw(result.layout.canvas_hw), latent_hw(SETTINGS.global_size))
    latents, _ = outpainter.outpaint_window(to_model_range(canvas.init), to_model_range(canvas.masked),
                                            canvas.mask, global_frames(frames, size=SETTINGS.global_size), 25.0,
                                            draws=draws)
    np.testing.assert_array_equal(latents, result.latents)


class RecordingSampler:
    """Stands in for the window sampler: position p of window w comes out as 1000 w + p, and each window's
    guide inputs are recorded. Windows are recognised by their frames (the init latent of frame f is f)."""

    steps = 1

    def __init__(self, plan):
        self.window_of = {w.frame_indices: w.index for w in plan.windows}
        self.seen = {}

    def __call__(self, inputs, *, noise):
        out = np.zeros(inputs.init_latents.shape, np.float32)
        for b, frames in enumerate(np.asarray(inputs.init_latents)[:, :, 0, 0, 0].astype(int)):
            w = self.window_of[tuple(frames)]
            self.seen[w] = (np.asarray(inputs.guide_flags[b]), np.asarray(inputs.guide_latents[b, :, 0, 0, 0]))
            out[b] = 1000 * w + np.arange(len(frames))[:, None, None, None]
        return out


@pytest.mark.parametrize("n", [1, 17, 50, 100, 241])
def test_plan_routes_guides_and_outputs(weights, n):
    """Every window sees, at its guide positions, the output of the window and position the plan names, and
    frame f ends up with the output plan.frame_sources() names."""
    outpainter = Outpainter.from_folder(str(weights), SamplerSettings(windows_per_call=3))
    plan = plan_windows(n)
    outpainter.sampler = recorder = RecordingSampler(plan)
    init = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 8, 8, 4))
    shared = dict(mask=np.ones((1, 1, 8, 8, 1)), uncond_latent=np.zeros((1, 1, 8, 8, 4)),
                  cond_tokens=np.zeros((1, 4, 16)), uncond_tokens=np.zeros((1, 4, 16)))
    video = VideoLatents(init, init, shared, np.zeros((16, 8, 8, 4)))
    latents = outpainter._sample_plan(plan, video, 25.0, {"unet": 0.0}, None)
    assert sorted(recorder.seen) == [w.index for w in plan.windows]
    for w in plan.windows:
        flags, guides = recorder.seen[w.index]
        assert tuple(flags) == w.guide_flags
        for position, source in enumerate(w.guide_sources):
            if source is not None:
                assert guides[position] == 1000 * source[0] + source[1]
    assert list(latents[:, 0, 0, 0]) == [1000 * w + p for w, p in plan.frame_sources()]


@pytest.mark.slow
def test_windows_split_over_devices():
    """Window batches sharded over 2 (simulated CPU) devices give the single-device result."""
    unet, vae = tiny_models()
    frames = synthetic_frames()
    outpainters = [Outpainter(unet, vae, pretrained.SD15_SCHEDULER_CONFIG, SETTINGS, devices=devices)
                   for devices in (jax.devices()[:1], jax.devices()[:2])]
    assert outpainters[1].vae_sharding.shard_shape((4, 3)) == (2, 3)  # each device encodes half of a VAE chunk
    runs = [o.outpaint(frames, 25.0, "1:1", key=3) for o in outpainters]
    np.testing.assert_allclose(runs[0].latents, runs[1].latents, rtol=1e-4, atol=1e-4)
    assert np.abs(runs[0].frames.astype(int) - runs[1].frames).max() <= 1


def test_official_mode_keeps_the_canvas_source():
    """Official compositing: the black-padded canvas where the mask is 0, generated elsewhere, cropped."""
    frames = np.random.default_rng(0).integers(0, 256, (2, 240, 320, 3), np.uint8)
    layout = official_layout((240, 320), "9:16")
    canvas = make_canvas(frames, layout)
    generated = np.full((2, 256, 256, 3), 7, np.uint8)
    out = compose_output(generated, frames, canvas, layout)
    np.testing.assert_array_equal(out, crop(composite(generated, canvas), layout.crops[0]))
    assert out.shape == (2, 256, 144, 3)


def make_input_clip(path, frames=17):
    """The first frames of a bundled clip, with a sine audio track."""
    clip = read_video(CLIP, max_frames=frames)
    audio = path.parent / "sound.m4a"
    rate = 8000
    with av.open(str(audio), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        mux_sine(out, stream, rate, int(rate * clip.duration))
    write_video(path, clip.frames, clip.fps, audio_from=audio)
    return read_video(path)


def test_cli_end_to_end(weights, tmp_path, capsys):
    src = make_input_clip(tmp_path / "in.mp4")
    out = tmp_path / "out.mp4"
    rc = main([str(tmp_path / "in.mp4"), "--ratio", "9:16", "--output", str(out), "--weights", str(weights),
               "--steps", str(STEPS), "--mode", "native", "--canvas-size", str(CANVAS), "--seed", "5"])
    assert rc == 0, capsys.readouterr().err
    result = read_video(out)
    layout = native_layout(src.frames.shape[1:3], "9:16", canvas_size=CANVAS)
    assert len(result.frames) == len(src.frames) == 17  # the official script would write 31
    assert result.frames.shape[1:3] == layout.output_hw == (854, 480)
    assert result.fps == src.fps and result.has_audio
    y0, y1, x0, x1 = layout.output_box
    kept = result.frames[:, y0:y1, x0:x1].astype(np.float64)
    mse = np.mean((kept - src.frames) ** 2)
    assert 10 * np.log10(255.0 ** 2 / mse) > 35  # the source survives, within codec error
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def broken_weights(weights, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(weights, incomplete)
    (incomplete / "vae" / "flax_params.safetensors").unlink()
    return incomplete


def empty_video(tmp_path):
    path = tmp_path / "empty.avi"
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", r"video file not found: .*missing\.mp4"),
    ("not_video", r"notes\.mp4 is not a video"),
    ("no_frames", r"empty\.avi: its video stream has no decodable frame"),
    ("bad_ratio", r"cannot parse aspect ratio 'wide'"),
    ("no_weights", r"weights folder .*nowhere does not exist; convert a checkpoint"),
    ("incomplete_weights", r"weights folder .*incomplete is incomplete: missing vae/flax_params\.safetensors"),
    ("official_too_small", r"small\.mp4: official canvas: a 48x64 frame"),
    ("output_is_folder", r"--output .*taken\.mp4 is a folder"),
    ("steps_zero", r"--steps 0: sampler settings: steps must be >= 1"),
    ("steps_one_pndm", r"--steps 1: the M3DDM PNDM loop needs at least 2 timesteps.*use more steps"),
    ("official_latent", r"square\.mp4: official canvas: .*100x100 canvas.*multiple of 16.*--mode native"),
])
def test_cli_errors(weights, tmp_path, capsys, monkeypatch, case, message):
    """Every bad argument, path or input shape is reported before the model is loaded, naming it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Outpainter, "from_folder", refuse)
    video = tmp_path / "clip.mp4"
    write_video(video, np.zeros((2, 48, 64, 3), np.uint8), 24)
    args = {"ratio": "9:16", "weights": weights}
    output = tmp_path / "out.mp4"
    extra = []
    if case == "missing":
        video = tmp_path / "missing.mp4"
    elif case == "not_video":
        video = tmp_path / "notes.mp4"
        video.write_text("not a video\n")
    elif case == "no_frames":
        video = empty_video(tmp_path)
    elif case == "bad_ratio":
        args["ratio"] = "wide"
    elif case == "no_weights":
        args["weights"] = tmp_path / "nowhere"
    elif case == "incomplete_weights":
        args["weights"] = broken_weights(weights, tmp_path)
    elif case == "official_too_small":
        video = video.rename(tmp_path / "small.mp4")
    elif case == "output_is_folder":
        output = tmp_path / "taken.mp4"
        output.mkdir()
    elif case in ("steps_zero", "steps_one_pndm"):
        extra = ["--steps", case.endswith("zero") and "0" or "1", "--mode", "native", "--canvas-size", str(CANVAS)]
    elif case == "official_latent":  # a 1:1 frame of 100 pixels: the official canvas is 100x100
        video = tmp_path / "square.mp4"
        write_video(video, np.zeros((2, 100, 100, 3), np.uint8), 24)
        args["ratio"] = "1:1"
    rc = main([str(video), "--ratio", args["ratio"], "--output", str(output), "--weights", str(args["weights"]),
               *extra])
    err = capsys.readouterr().err
    assert rc == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out.mp4").exists()


def test_cli_truncated_input_is_flagged(weights, tmp_path, capsys):
    """A video cut short is outpainted with the frames that decode, and the user is told, twice."""
    make_input_clip(tmp_path / "full.mp4")
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])  # a few frames (its first 30% is one partial frame)
    cut = read_video(tmp_path / "cut.mp4")
    assert cut.truncated
    out = tmp_path / "out.mp4"
    rc = main([str(tmp_path / "cut.mp4"), "--ratio", "9:16", "--output", str(out), "--weights", str(weights),
               "--steps", str(STEPS), "--mode", "native", "--canvas-size", str(CANVAS)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert len(read_video(out).frames) == len(cut.frames) < cut.declared_frames
    assert f"warning: {cut.truncation}" in err
    assert re.search(rf"{len(cut.frames)} frames of \d+x\d+ .*\(truncated input: its container declares "
                     rf"{cut.declared_frames}\)", err), err


def test_convert_dst_exists_is_refused_before_reading(tmp_path, monkeypatch, capsys):
    """tools/convert_checkpoint.py: an existing --dst without --overwrite stops before any tensor is read."""
    sys.path.insert(0, str(TESTS.parent / "tools"))
    import convert_checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(convert_checkpoint, "open_state_dict", refuse)
    monkeypatch.setattr(convert_checkpoint.export, "export", refuse)
    (tmp_path / "dst").mkdir()
    for kind in ("m3ddm", "sd", "inflate", "export"):
        rc = convert_checkpoint.main([kind, "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")])
        err = capsys.readouterr().err
        assert rc == 1 and f"error: --dst {tmp_path / 'dst'} already exists; pass --overwrite to replace it" in err, err
    assert list((tmp_path / "dst").iterdir()) == []
