"""Video side of outpainting: official canvas parity, global frames, PyAV read/write, native canvas."""

import json
import os
import re
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest

from conftest import REPO, VIDEOS, load_json, mux_sine
from m3ddm_jax import fileio
from m3ddm_jax.data.decode import VideoError
from m3ddm_jax.data.sources import FileVideo
from m3ddm_jax.video import (composite, composite_native, crop, global_frame_indices, global_frames,
                             latent_mask, make_canvas, native_layout, official_layout, parse_ratio, parse_ratios,
                             read_video, resize_bilinear_antialias, to_model_range, write_video)

PREPROCESS = load_json("preprocess.json") or {}
SCHEDULE = load_json("window_schedule.json") or {}
PIPELINE_RUNS = (load_json("pipeline_runs.json") or {}).get("runs", {})
CLIP = VIDEOS / "stream_of_water.mp4"  # CC0 1.0 (MDN interactive-examples); see SOURCES.md


def _case_id(case):
    h, w = case["input_hw"]
    return f"{h}x{w}-{case['target_ratio_list']}"


def _nchw_to_nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


# ------------------------------------------------------------------------------------- official parity


@pytest.mark.reference
@pytest.mark.parametrize("case", PREPROCESS.get("cases", []), ids=_case_id)
def test_official_layout_matches_fixture(reference_dir, case):
    if "error" in case:
        with pytest.raises(ValueError, match="official"):
            official_layout(case["input_hw"], case["target_ratio_list"])
        return
    layout = official_layout(case["input_hw"], case["target_ratio_list"])
    # Values and int/float types: a grown side is a float, and that is what makes small inputs fail.
    assert list(layout.max_target_size) == case["get_max_target_size"]
    assert [type(v) for v in layout.max_target_size] == [type(v) for v in case["get_max_target_size"]]
    assert list(layout.canvas_hw) == case["canvas_hw"]
    assert list(layout.resized_hw) == case["resized_hw"]
    assert list(layout.box) == case["content_box_y0y1x0x1"]
    ch, cw = layout.canvas_hw
    assert (layout.box.y0, ch - layout.box.y1, layout.box.x0, cw - layout.box.x1) == (
        case["pad_top"], case["pad_bottom"], case["pad_left"], case["pad_right"])
    assert [[b.x0, b.y0, b.x1, b.y1] for b in layout.crops] == [c["crop_box_x0y0x1y1"] for c in case["final_crops"]]
    assert [list(b.hw[::-1]) for b in layout.crops] == [c["writer_size_wh"] for c in case["final_crops"]]


def load_example(folder):
    with np.load(folder / PREPROCESS["example_npz"]["file"]) as data:
        return dict(data)


@pytest.fixture(scope="module")
def example(reference_dir):
    return load_example(reference_dir)


@pytest.mark.reference
def test_official_canvas_matches_example(each_reference_dir):
    preprocess = json.loads((each_reference_dir / "preprocess.json").read_text())
    example = load_example(each_reference_dir)
    case = preprocess["example_npz"]["case"]
    layout = official_layout(case["input_hw"], case["target_ratio_list"])
    canvas = make_canvas(_nchw_to_nhwc(example["pre_input_frames"]), layout)
    # Bit-exact in uint8 units: the same OpenCV resize (float32) + truncation and TELEA radius 5.
    np.testing.assert_array_equal(canvas.masked, _nchw_to_nhwc(example["pre_masked_frames"]))
    np.testing.assert_array_equal(canvas.init, _nchw_to_nhwc(example["pre_frames_inpaint"]))
    for frame_mask in example["pre_mask"][0]:
        np.testing.assert_array_equal(canvas.mask, frame_mask)
    # Official final pixels: the source canvas where the mask is 0, the generated pixels elsewhere.
    generated = np.full_like(canvas.masked, 7)
    final = composite(generated, canvas)
    keep = canvas.mask == 0
    np.testing.assert_array_equal(final[:, keep], canvas.masked[:, keep])
    assert np.all(final[:, ~keep] == 7)
    # The final crop: the first ratio's, within the truncation of its short side; the fixture's writer size
    # where the folder records this case's crops.
    h, w = crop(final, layout.crops[0]).shape[1:3]
    assert (h, w) == layout.crops[0].hw
    ratio = parse_ratios(case["target_ratio_list"])[0]
    assert 0 <= (h * ratio - w if ratio < 1 else w / ratio - h) < 1
    for recorded in preprocess["cases"]:
        if [recorded["input_hw"], recorded["target_ratio_list"]] == [case["input_hw"], case["target_ratio_list"]]:
            assert [w, h] == recorded["final_crops"][0]["writer_size_wh"]


@pytest.mark.reference
def test_global_frames_match_example(example):
    out = global_frames(_nchw_to_nhwc(example["global_input_frames"]))
    expected = _nchw_to_nhwc(example["global_output"])[0]
    assert out.shape == (16, 256, 256, 3) and out.dtype == np.float32
    # One input frame: all 16 global frames are that frame. Measured max abs diff 2.4e-7 (float32 rounding).
    assert np.abs(out - expected).max() <= 1e-6


@pytest.mark.reference
@pytest.mark.parametrize("n", sorted(SCHEDULE.get("per_N", {}), key=int))
def test_global_frame_indices_match_schedule(reference_dir, n):
    expected = SCHEDULE["per_N"][n]["global_frame_indices"]
    np.testing.assert_array_equal(global_frame_indices(int(n)), expected)


@pytest.mark.reference
@pytest.mark.parametrize("run", sorted(PIPELINE_RUNS))
def test_model_range_and_latent_mask_match_pipeline(reference_dir, run):
    with np.load(reference_dir / PIPELINE_RUNS[run]["file"]) as data:
        images, mask, sample, guide = (data[k] for k in ("ori_image", "mask", "unet_step0_sample", "guide_flags"))
    u8 = np.round((images * 0.5 + 0.5) * 255).astype(np.uint8)
    np.testing.assert_array_equal(to_model_range(u8), images)  # bit for bit
    # Mask channel of row 1 (b = 1), which holds the conditional local context in 2- and 4-way guidance,
    # at the frames without a guide latent.
    for f in np.flatnonzero(~guide):
        np.testing.assert_array_equal(sample[1, 8, f], latent_mask(mask[0, 0]))


@pytest.mark.parametrize("src_hw", [(90, 200), (360, 640), (332, 800), (255, 257), (7, 300)])
def test_antialias_resize_matches_torch(src_hw):
    """Against PyTorch's own kernel, including downscaling, where the fixture (an enlargement) is silent."""
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(0).random((*src_hw, 3), dtype=np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=(256, 256),
                                               mode="bilinear", align_corners=False, antialias=True)
    ours = resize_bilinear_antialias(image, (256, 256))
    assert np.abs(ours - expected[0].permute(1, 2, 0).numpy()).max() <= 1e-6


# ------------------------------------------------------------------------------------------- ratio parse


@pytest.mark.parametrize("text,value", [("9:16", 9 / 16), ("9/16", 9 / 16), ("0.5625", 0.5625), (" 16 : 9 ", 16 / 9),
                                        ("2.39", 2.39), (1.0, 1.0)])
def test_parse_ratio(text, value):
    assert parse_ratio(text) == value


@pytest.mark.parametrize("text", ["abc", "9:0", "0", "-1:2", "9:16:2", "", "nan", "inf", "9x16"])
def test_parse_ratio_rejects(text):
    with pytest.raises(ValueError, match=re.escape(f"aspect ratio {text!r}")):
        parse_ratio(text)


# ----------------------------------------------------------------------------------------------- native


@pytest.mark.parametrize("src_hw", [(360, 640), (640, 360), (101, 77), (1080, 1920), (332, 800)])
@pytest.mark.parametrize("ratio", ["9:16", "16:9", "1:1", "4:3", "2.39"])
def test_native_layout_geometry(src_hw, ratio):
    layout = native_layout(src_hw, ratio)
    (oh, ow), (h, w), r = layout.output_hw, src_hw, parse_ratio(ratio)
    assert oh % 2 == 0 and ow % 2 == 0 and oh >= h and ow >= w
    assert min(abs(ow - r * oh), abs(oh - ow / r)) <= 1  # the target ratio within one pixel
    y0, y1, x0, x1 = layout.output_box
    assert (y1 - y0, x1 - x0) == (h, w) and abs(y0 - (oh - y1)) <= 1 and abs(x0 - (ow - x1)) <= 1  # centred
    ch, cw = layout.canvas_hw
    assert ch % 64 == 0 and cw % 64 == 0 and max(ch, cw) == 256
    assert 0 <= layout.box.y0 < layout.box.y1 <= ch and 0 <= layout.box.x0 < layout.box.x1 <= cw


@pytest.fixture(scope="module")
def clip():
    return read_video(CLIP, max_frames=3)


@pytest.mark.parametrize("ratio", ["9:16", "2.39"])
def test_native_canvas_and_composite(clip, ratio):
    layout = native_layout(clip.frames.shape[1:3], ratio)
    canvas = make_canvas(clip.frames, layout)
    y0, y1, x0, x1 = layout.box
    assert canvas.mask[y0:y1, x0:x1].max() == 0 and canvas.mask.sum() == canvas.mask.size - (y1 - y0) * (x1 - x0)
    assert canvas.masked.shape == canvas.init.shape == (3, *layout.canvas_hw, 3)
    assert latent_mask(canvas.mask).shape == (layout.canvas_hw[0] // 8, layout.canvas_hw[1] // 8)
    generated = np.full_like(canvas.masked, 77)
    out = composite_native(generated, clip.frames, layout)
    assert out.shape == (3, *layout.output_hw, 3) and out.dtype == np.uint8
    keep = np.zeros(layout.output_hw, bool)
    keep[layout.output_box.y0:layout.output_box.y1, layout.output_box.x0:layout.output_box.x1] = True
    np.testing.assert_array_equal(out[:, keep].reshape(clip.frames.shape), clip.frames)  # bit-identical
    assert np.all(out[:, ~keep] == 77)


# ------------------------------------------------------------------------------------------------- I/O


def test_read_write_round_trip(tmp_path, clip):
    assert clip.frames.shape == (3, 360, 480, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == Fraction(30000, 1001) and not clip.has_audio
    out = tmp_path / "out.mp4"
    write_video(out, clip.frames, clip.fps)
    back = read_video(out)
    assert back.frames.shape == clip.frames.shape and back.fps == clip.fps
    assert _psnr(back.frames, clip.frames) > 30
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_write_odd_size_is_padded_to_even(tmp_path, clip):
    write_video(tmp_path / "odd.mp4", clip.frames[:2, :101, :77], 24)
    back = read_video(tmp_path / "odd.mp4")
    assert back.frames.shape == (2, 102, 78, 3) and back.fps == 24
    assert _psnr(back.frames[:, :101, :77], clip.frames[:2, :101, :77]) > 30


def _make_clip_with_audio(path, codec, container_format, *, frames=10, fps=10, rate=44100):
    """A small video with a 440 Hz sine track covering the same duration."""
    with av.open(str(path), "w", format=container_format) as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream(codec, rate=rate, layout="mono")
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        mux_sine(out, audio, rate, rate * frames // fps)


def _audio_seconds(path):
    with av.open(str(path)) as container:
        (stream,) = container.streams.audio
        codec = stream.codec_context.name
        seconds = sum(p.duration for p in container.demux(stream) if p.duration) * stream.time_base
    return codec, float(seconds)


@pytest.mark.parametrize("codec,container_format,suffix", [("aac", "mp4", ".mp4"),  # copied
                                                           ("pcm_s16le", "matroska", ".mkv")])  # to AAC
def test_audio_is_carried_over(tmp_path, codec, container_format, suffix):
    src = tmp_path / f"in{suffix}"
    _make_clip_with_audio(src, codec, container_format)
    video = read_video(src)
    assert video.has_audio and len(video.frames) == 10 and video.duration == 1
    write_video(tmp_path / "full.mp4", video.frames, video.fps, audio_from=video)
    out_codec, seconds = _audio_seconds(tmp_path / "full.mp4")
    assert out_codec == "aac" and abs(seconds - 1.0) < 0.1
    # A shorter video takes the audio up to its own end.
    write_video(tmp_path / "short.mp4", video.frames[:4], video.fps, audio_from=src)
    assert abs(_audio_seconds(tmp_path / "short.mp4")[1] - 0.4) < 0.1


def test_failed_write_leaves_nothing(tmp_path, clip):
    out = tmp_path / "out.mp4"

    def frames_then_crash():
        yield from clip.frames[:2]
        raise RuntimeError("crash while encoding")

    with pytest.raises(RuntimeError, match="crash while encoding"):
        write_video(out, frames_then_crash(), clip.fps)
    assert list(tmp_path.iterdir()) == []
    # An earlier complete output stays as it was.
    out.write_bytes(b"previous")
    with pytest.raises(ValueError, match="after frames of size"):
        write_video(out, [clip.frames[0], clip.frames[0, :64]], clip.fps)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"] and out.read_bytes() == b"previous"


def test_bad_inputs(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(missing)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 10)
    with pytest.raises(ValueError, match="notes.mp4"):
        read_video(text)
    audio_only = tmp_path / "sound.m4a"
    with av.open(str(audio_only), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=8000, layout="mono")
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16", layout="mono")
        chunk.sample_rate, chunk.pts = 8000, 0
        out.mux(stream.encode(chunk))
        out.mux(stream.encode(None))
    with pytest.raises(ValueError, match="sound.m4a has no video stream"):
        read_video(audio_only)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_video(tmp_path / "nowhere" / "out.mp4", np.zeros((1, 8, 8, 3), np.uint8), 24)
    with pytest.raises(ValueError, match="native"):
        official_layout((72, 128), "9:16")


def truncated_copy(src, dst, fraction=0.3):
    """The first `fraction` of the bytes of `src`: what an interrupted download or copy leaves."""
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


def declared_frames(path):
    with av.open(str(path)) as container:
        return container.streams.video[0].frames


def test_truncated_video_is_flagged(tmp_path):
    """A file cut short decodes to fewer frames than its container declares: read_video says so (outpaint and
    infer warn and flag it), and the training reader rejects clips past the end with the same diagnosis."""
    declared = declared_frames(CLIP)
    full = read_video(CLIP)
    assert len(full.frames) == full.declared_frames == declared and not full.truncated and full.truncation is None
    cut = truncated_copy(CLIP, tmp_path / "cut.mp4")
    video = read_video(cut)
    decoded = len(video.frames)
    assert 0 < decoded < declared and video.declared_frames == declared and video.truncated
    assert re.search(rf"cut\.mp4 is truncated: its container declares {declared} frames but only {decoded} decode",
                     video.truncation)
    # Asking for no more frames than decode is not a truncated read.
    assert not read_video(cut, max_frames=decoded).truncated and read_video(cut, max_frames=decoded + 1).truncated
    # Training: the header's length, the decodable frames readable, a clip past the end rejected (and skipped).
    source = FileVideo.open(cut)
    assert source.num_frames == declared and len(source.read([0, decoded - 1])) == 2
    with pytest.raises(VideoError, match=rf"is truncated: its container declares {declared} frames but only "
                                         rf"{decoded} decode"):
        source.read([0, declared - 1])


def test_write_video_is_reproducible(tmp_path):
    """The same frames give the same bytes: on another run and whatever number of CPUs the encoder sees (x264's
    automatic thread count changes its output), and no library version is written into the file."""
    frames = np.random.default_rng(0).integers(0, 256, (4, 256, 192, 3), dtype=np.uint8)
    write_video(tmp_path / "a.mp4", frames, 24)
    write_video(tmp_path / "b.mp4", frames, 24)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    cpus = os.sched_getaffinity(0)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {min(cpus)})
        try:
            write_video(tmp_path / "one_cpu.mp4", frames, 24)
        finally:
            os.sched_setaffinity(0, cpus)
        assert (tmp_path / "one_cpu.mp4").read_bytes() == (tmp_path / "a.mp4").read_bytes()
    assert b"Lavf" not in (tmp_path / "a.mp4").read_bytes()


def _killed_writer(target):
    """A process killed (SIGKILL) in the middle of an atomic write of `target`."""
    code = ("import os, sys\nfrom m3ddm_jax.fileio import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    open(tmp, 'w').write('half')\n    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr


def test_stale_part_files_are_cleaned(tmp_path):
    """A SIGKILL mid-write leaves a hidden .part; the next write of the same target removes it, but never the
    .part of a writer that is still alive, nor another target's."""
    target, other = tmp_path / "out.json", tmp_path / "other.json"
    _killed_writer(target)
    _killed_writer(other)
    parts = lambda name: sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{name}."))
    (stale,) = parts("out.json")
    assert len(parts("other.json")) == 1
    with fileio.atomic_path(str(target)) as live:  # a live writer of the same target (this process)
        open(live, "w").write("live")
        fileio.write_text(str(target), "new")
        assert parts("out.json") == [os.path.basename(live)] and target.read_text() == "new"
    assert target.read_text() == "live" and parts("out.json") == [] and len(parts("other.json")) == 1
    # Folders written atomically (weights folders) too.
    code = ("import os, sys\nfrom m3ddm_jax.fileio import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as tmp:\n    open(os.path.join(tmp, 'x'), 'w').write('half')\n"
            "    os.kill(os.getpid(), 9)\n")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "w")], cwd=REPO).returncode == -9
    assert len(parts("w")) == 1
    with fileio.atomic_dir(str(tmp_path / "w")) as tmp:
        open(os.path.join(tmp, "x"), "w").write("done")
    assert parts("w") == [] and (tmp_path / "w" / "x").read_text() == "done"
