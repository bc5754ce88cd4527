"""Training data: decoding, sources (folder, TFDS), clip sampling, masks and CFG dropout frequencies, the grain
pipeline (sharding, resume, workers) and the latent cache.

The bundled clips are used as they are, cropped to tiny training sizes (stream_of_water.mp4 is CC0;
tears_of_steel_lab.mp4 is Tears of Steel (c) 2012 Blender Foundation | mango.blender.org, CC BY 3.0, see
../shared/data/videos/SOURCES.md).
"""

import dataclasses
import itertools
import math
import sys

import av
import numpy as np
import pytest

from conftest import VIDEOS
from m3ddm_jax.data import (ArrayVideo, ClipConfig, DataConfig, LatentCacheSource, MaskConfig, VideoError,
                            VideoFolderSource, global_in_clip, make_dataset, plan_clip,
                            probe, random_resized_crop, read_frames, sample_clip, sample_guides, sample_masks,
                            sample_outpaint, shard_indices, write_latent_cache)
from m3ddm_jax.video import global_frame_indices, read_video

WATER = VIDEOS / "stream_of_water.mp4"  # 90 frames, 480x360, 30000/1001 fps
LAB = VIDEOS / "tears_of_steel_lab.mp4"  # 120 frames, 640x360, 24 fps
TINY = ClipConfig(size=(32, 48), num_frames=4, num_global_frames=4)


def _write_h264(path, frames, fps=24, gop=8):
    """A small H.264 mp4 with a keyframe every `gop` frames (the bundled clips have a single keyframe)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(gop), "keyint_min": str(gop), "crf": "10"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))


def _ramp_video(num_frames, h=16, w=16, fps=24.0):
    """Frame i is a uniform image of value i (so any crop of it tells its index)."""
    return ArrayVideo(np.broadcast_to(np.arange(num_frames, dtype=np.uint8)[:, None, None, None],
                                      (num_frames, h, w, 3)).copy(), fps)


def _within(freq, p, n, k=4.0):
    return abs(freq - p) <= k * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.fixture
def video_dir(tmp_path):
    """Two real clips, a corrupt .mp4 (random bytes), a 3-frame video, and files the source must ignore."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "water.mp4").symlink_to(WATER)
    (tmp_path / "lab.mp4").symlink_to(LAB)
    (tmp_path / "broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    _write_h264(tmp_path / "short.mp4", np.zeros((3, 32, 32, 3), np.uint8))  # TINY clips need 4
    (tmp_path / "notes.txt").write_text("not a video")
    (tmp_path / ".hidden.mp4").symlink_to(WATER)
    return tmp_path


# ------------------------------------------------------------------------------------------- decoding


def test_read_frames_matches_full_decode_with_seeks(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (60, 48, 64, 3), np.uint8)
    path = tmp_path / "gop.mp4"
    _write_h264(path, frames, gop=8)
    full = read_video(path).frames
    info = probe(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (60, 24.0, 48, 64)
    indices = [50, 3, 3, 59, 20, 21, 0, 40]
    for seek_gap in (4, 1000):  # seeking over every gap, and decoding straight through
        np.testing.assert_array_equal(read_frames(path, indices, seek_gap=seek_gap), full[indices])
    with pytest.raises(VideoError, match="ends at frame 59"):
        read_frames(path, [10, 70])


def test_probe_rejects_non_videos(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(VideoError):
        probe(bad)
    with pytest.raises(VideoError):
        probe(tmp_path / "missing.mp4")
    info = probe(WATER)
    assert (info.num_frames, round(info.fps, 3), info.height, info.width) == (90, 29.97, 360, 480)


# ------------------------------------------------------------------------------------------- sources


def test_folder_source_lists_videos_and_manifest(video_dir):
    source = VideoFolderSource(video_dir)
    assert [source.name(i) for i in range(len(source))] == ["a/water.mp4", "broken.mp4", "lab.mp4", "short.mp4"]
    manifest = video_dir / "list.txt"
    manifest.write_text('# training videos\nlab.mp4\n\n{"path": "a/water.mp4", "caption": "creek"}\n')
    listed = VideoFolderSource(video_dir, manifest=manifest)
    assert [listed.name(i) for i in range(len(listed))] == ["lab.mp4", "a/water.mp4"]
    assert listed[1].num_frames == 90
    with pytest.raises(VideoError):
        source[1]  # broken.mp4


def test_folder_pipeline_skips_and_counts_bad_videos(video_dir):
    config = DataConfig(sources=({"kind": "folder", "path": str(video_dir)},), clip=TINY, per_host_batch_size=4,
                        shuffle=False, num_epochs=1)
    batches = list(make_dataset(config, seed=3))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["frames"].shape == (4, 4, 32, 48, 3) and batch["frames"].dtype == np.uint8
    assert batch["global_frames"].shape == (4, 4, 32, 48, 3)
    # Unshuffled, position p starts at video p: 1 (broken) and 3 (short) are replaced by good videos.
    assert set(batch["index"].tolist()) <= {0, 2}
    assert batch["skipped"][[0, 2]].tolist() == [0, 0] and (batch["skipped"][[1, 3]] >= 1).all()
    assert batch["fps"].dtype == np.float32 and batch["frame_indices"].dtype == np.int32
    for i, index in enumerate(batch["index"]):
        source_fps, n = (30000 / 1001, 90) if index == 0 else (24.0, 120)
        stride = batch["frame_indices"][i, 1] - batch["frame_indices"][i, 0]
        assert batch["fps"][i] == pytest.approx(source_fps / stride, rel=1e-6)
        assert batch["global_indices"][i].tolist() == global_frame_indices(n, 4).tolist()


def test_tfds_builder_round_trip_without_tensorflow(video_dir, tmp_path):
    import tensorflow_datasets as tfds

    from m3ddm_jax.data.tfds_video import BUILDER_NAME, TfdsVideoSource, build_video_folder_dataset

    (video_dir / "short.mp4").unlink()  # kept out to keep the build small; too-short videos are stored anyway
    builder = build_video_folder_dataset(video_dir, tmp_path / "tfds", name="clips", short_side=24, max_frames=20)
    assert builder.skipped == ["broken.mp4"]
    name = f"{BUILDER_NAME}/clips"
    records = tfds.data_source(name, data_dir=tmp_path / "tfds", split="train", download=False)
    assert sorted(r["path"] for r in records) == [b"a/water.mp4", b"lab.mp4"]
    for record in records:
        source_path = WATER if record["path"] == b"a/water.mp4" else LAB
        original = read_video(source_path, max_frames=20)
        assert record["frames"].shape == (20, 24, 32 if source_path == WATER else 43, 3)
        assert record["fps"] == pytest.approx(float(original.fps), rel=1e-6)
    source = TfdsVideoSource(name, data_dir=tmp_path / "tfds")
    assert len(source) == 2 and source[0].num_frames == 20
    config = DataConfig(sources=({"kind": "tfds", "name": name, "data_dir": str(tmp_path / "tfds")},),
                        clip=ClipConfig(size=(16, 16), num_frames=4, num_global_frames=4), per_host_batch_size=2)
    batch = next(iter(make_dataset(config, seed=0)))
    assert batch["frames"].shape == (2, 4, 16, 16, 3)
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------------------------------- clips


def test_plan_clip_stride_and_fps_rules():
    rng = np.random.default_rng(0)
    # stride = round(source / target); the condition is the effective rate.
    plan = plan_clip(1000, 24.0, 16, (12.0, 12.0), rng)
    assert plan.stride == 2 and plan.fps == 12.0
    plan = plan_clip(1000, 30.0, 16, (7.0, 7.0), rng)
    assert plan.stride == 4 and plan.fps == 7.5  # 30 / 7 = 4.29 -> 4
    plan = plan_clip(1000, 10.0, 16, (30.0, 30.0), rng)
    assert plan.stride == 1 and plan.fps == 10.0  # the target is capped at the source rate
    # Too short for the stride: the largest stride that fits; too short for stride 1: an error.
    plan = plan_clip(40, 24.0, 16, (1.0, 1.0), rng)
    assert plan.stride == 2 and plan.frame_indices.tolist() == list(range(plan.frame_indices[0], 40, 2))[:16]
    assert plan_clip(16, 24.0, 16, (1.0, 1.0), rng).frame_indices.tolist() == list(range(16))
    with pytest.raises(VideoError, match="15 frames"):
        plan_clip(15, 24.0, 16, (1.0, 30.0), rng)
    strides, starts = set(), set()
    for _ in range(2000):
        plan = plan_clip(500, 24.0, 16, (1.0, 30.0), rng)
        idx = plan.frame_indices
        assert idx[0] >= 0 and idx[-1] < 500 and (np.diff(idx) == plan.stride).all()
        assert plan.fps == 24.0 / plan.stride
        strides.add(plan.stride)
        starts.add(int(idx[0]))
    assert strides == set(range(1, 25))  # targets from 1 (stride 24) to 24+ (stride 1)
    assert min(starts) == 0 and max(starts) > 400


def test_sample_clip_one_crop_for_all_frames():
    rng = np.random.default_rng(1)
    texture = rng.integers(0, 256, (90, 120, 3), np.uint8)
    still = ArrayVideo(np.repeat(texture[None], 40, axis=0), 25.0)
    config = ClipConfig(size=(24, 32), num_frames=8, num_global_frames=6)
    for seed in range(5):
        clip = sample_clip(still, config, np.random.default_rng(seed))
        frames = np.concatenate([clip["frames"], clip["global_frames"]])
        assert frames.shape == (14, 24, 32, 3)
        assert (frames == frames[0]).all()  # the same box and resize for clip and global frames
    ramp = _ramp_video(100)
    clip = sample_clip(ramp, config, np.random.default_rng(0))
    assert (clip["frames"][:, 0, 0, 0] == clip["frame_indices"]).all()
    assert (clip["global_frames"][:, 0, 0, 0] == clip["global_indices"]).all()
    assert clip["global_indices"].tolist() == np.linspace(0, 99, 6, dtype=int).tolist()


def test_augmentation_mirrors_and_permutes_the_whole_clip_alike():
    video = ArrayVideo(np.random.default_rng(2).integers(0, 256, (30, 40, 48, 3), np.uint8), 25.0)
    plain = ClipConfig(size=(16, 24), num_frames=4, num_global_frames=3)
    augmented = dataclasses.replace(plain, hflip_prob=1.0, channel_shuffle_prob=1.0)
    perms = set()
    for seed in range(8):
        base = sample_clip(video, plain, np.random.default_rng(seed))
        clip = sample_clip(video, augmented, np.random.default_rng(seed))  # the same clip and crop, then mirrored
        flipped = [base[k][:, :, ::-1] for k in ("frames", "global_frames")]
        perm = next(p for p in itertools.permutations(range(3)) if np.array_equal(clip["frames"], flipped[0][..., p]))
        np.testing.assert_array_equal(clip["global_frames"], flipped[1][..., perm])
        perms.add(perm)
    assert len(perms) > 1  # the permutation is drawn per clip
    # Off (the default), nothing more is drawn: the clips of a config without augmentation stay as they were.
    rng = np.random.default_rng(0)
    sample_clip(video, plain, rng)
    assert rng.integers(1 << 30) == _after_one_clip(video, plain)
    assert augmented.without_augmentation() == plain
    with pytest.raises(ValueError, match="hflip_prob"):
        ClipConfig(hflip_prob=1.5)


def _after_one_clip(video, config):
    """The next draw after a clip's own draws (the plan and the crop), replayed by hand."""
    rng = np.random.default_rng(0)
    plan_clip(video.num_frames, video.fps, config.num_frames, config.fps_range, rng)
    random_resized_crop((video.height, video.width), config.size, config.crop_scale, config.crop_ratio, rng)
    return rng.integers(1 << 30)


def test_random_resized_crop_ranges():
    rng = np.random.default_rng(0)
    for _ in range(500):
        y0, y1, x0, x1 = random_resized_crop((360, 640), (256, 256), (0.3, 1.0), (3 / 4, 4 / 3), rng)
        h, w = y1 - y0, x1 - x0
        assert 0 <= y0 < y1 <= 360 and 0 <= x0 < x1 <= 640
        assert 0.3 * 0.98 <= h * w / (360 * 640) <= 1.0
        assert 3 / 4 * 0.98 <= w / h <= 4 / 3 * 1.02
    # No try fits a full-area 1:1 crop in a 16:9 frame: the largest centred crop of the nearest aspect.
    assert random_resized_crop((360, 640), (256, 256), (1.0, 1.0), (1.0, 1.0), rng) == (0, 360, 140, 500)


# ------------------------------------------------------------------------------------------- masks


def test_mask_and_dropout_frequencies():
    config = MaskConfig()
    n, h, w = 20000, 64, 96
    rng = np.random.default_rng(0)
    directions, sides, modes, given_random = [], [], [], []
    for _ in range(n):
        outpaint = sample_outpaint(config, rng, h, w)
        directions.append(outpaint.direction)
        sides.append(outpaint.sides)
        mode, given = sample_guides(config, rng, 16)
        modes.append(mode)
        if mode == "first_last":
            assert given.tolist() == [True] + [False] * 14 + [True]
        elif mode == "none":
            assert not given.any()
        else:
            given_random.append(given)
    directions, modes = np.array(directions), np.array(modes)
    for name, p in (("one_side", 0.30), ("two_sides", 0.55), ("four_sides", 0.15)):
        assert _within(np.mean(directions == name), p, n), name
    for name, p in (("none", 0.30), ("first_last", 0.35), ("random", 0.35)):
        assert _within(np.mean(modes == name), p, n), name
    given_random = np.array(given_random)
    assert _within(given_random.mean(), 0.5, given_random.size)
    one = [s[0] for s, d in zip(sides, directions) if d == "one_side"]
    for side in ("top", "bottom", "left", "right"):
        assert _within(one.count(side) / len(one), 0.25, len(one)), side
    two = [s for s, d in zip(sides, directions) if d == "two_sides"]
    assert _within(two.count(("left", "right")) / len(two), 0.5, len(two))

    drops = [sample_masks(config, rng, height=16, width=16, num_frames=4, in_clip=np.zeros(4, bool))
             for _ in range(n)]
    assert _within(np.mean([d["drop_local"] for d in drops]), 0.35, n)
    assert _within(np.mean([d["drop_global"] for d in drops]), 0.10, n)
    both = np.mean([d["drop_local"] and d["drop_global"] for d in drops])
    assert _within(both, 0.035, n)  # independent flags


def test_mask_geometry_and_ratio_distribution():
    config = MaskConfig()
    rng = np.random.default_rng(1)
    h, w, n = 256, 256, 5000
    ratios, measured = [], []
    for _ in range(n):
        outpaint = sample_outpaint(config, rng, h, w)
        mask = outpaint.mask(h, w)
        top, bottom, left, right = outpaint.margins
        ratios.append(outpaint.ratio)
        measured.append(mask.mean())
        # The known region is one rectangle; masked sides are exactly the sampled ones.
        assert set(outpaint.sides) == {s for s, m in zip(("top", "bottom", "left", "right"), outpaint.margins) if m}
        assert mask[top:h - bottom, left:w - right].sum() == 0
        assert mask.sum() == h * w - (h - top - bottom) * (w - left - right)
        if len(outpaint.sides) >= 2:  # centred: opposite bands differ by at most one pixel, top/left smaller
            assert 0 <= bottom - top <= 1 and 0 <= right - left <= 1
    ratios, measured = np.array(ratios), np.array(measured)
    assert np.abs(measured - ratios).max() < 0.01  # rounding to whole pixels only
    # Kolmogorov-Smirnov against U(0.15, 0.75) (critical value at the 0.1% level: 1.95 / sqrt(n)).
    x = np.sort(measured)
    cdf = np.clip((x - 0.15) / 0.6, 0, 1)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.95 / math.sqrt(n) + 0.005


def test_latent_mask_and_global_masks():
    rng = np.random.default_rng(2)
    global_indices = np.array([0, 30, 60, 90, 119])
    inside = global_in_clip(global_indices, np.arange(25, 71, 3))
    assert inside.tolist() == [False, True, True, False, False]
    for mode, expected in (("in_clip", inside), ("all", np.ones(5, bool)), ("none", np.zeros(5, bool))):
        out = sample_masks(MaskConfig(global_mask=mode), rng, height=40, width=56, num_frames=6,
                           in_clip=inside)
        assert out["global_masked"].tolist() == expected.tolist()
        np.testing.assert_array_equal(out["latent_mask"], out["mask"][::8, ::8])  # the official nearest rule


def test_model_range_and_latent_mask_serve_numpy_and_jit():
    """The data (numpy) and the training objective (JAX, inside jit) share video.canvas's to_model_range and
    latent_mask: the same dtypes and values (to float32 rounding) in both, uint8 values round-trip, and the
    latent mask keeps the pixel mask's convention (1 = generate) at each cell's top-left pixel."""
    import jax

    from m3ddm_jax.video import latent_mask, to_model_range, to_uint8

    u8 = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    x = to_model_range(u8)
    assert x.dtype == np.float32 and (x.min(), x.max()) == (-1.0, 1.0)
    np.testing.assert_array_equal(np.diff(x.ravel()) > 0, True)  # strictly increasing in the uint8 value
    np.testing.assert_array_equal(to_uint8(x * 0.5 + 0.5), u8)
    traced = np.asarray(jax.jit(to_model_range)(u8))
    assert traced.dtype == x.dtype
    np.testing.assert_allclose(traced, x, rtol=0, atol=2**-23)  # XLA may round x / 255 one float32 step apart
    np.testing.assert_array_equal(to_uint8(traced * 0.5 + 0.5), u8)

    rng = np.random.default_rng(4)
    h, w = 48, 64
    for _ in range(20):
        outpaint = sample_outpaint(MaskConfig(), rng, h, w)
        mask = outpaint.mask(h, w)
        top, bottom, left, right = outpaint.margins
        yy, xx = np.meshgrid(np.arange(0, h, 8), np.arange(0, w, 8), indexing="ij")
        generated = (yy < top) | (yy >= h - bottom) | (xx < left) | (xx >= w - right)
        for got in (latent_mask(mask), np.asarray(jax.jit(latent_mask)(mask))):
            assert got.dtype == mask.dtype
            np.testing.assert_array_equal(got, generated.astype(mask.dtype))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        latent_mask(np.zeros((20, 24), np.uint8))


def test_config_validation_and_configdict():
    from ml_collections import ConfigDict

    config = DataConfig.create(ConfigDict({"sources": [{"kind": "folder", "path": "/videos"}], "per_host_batch_size": 4,
                                           "clip": {"size": [64, 128], "fps_range": [2, 8]},
                                           "masks": {"drop_local_prob": 0.2}}))
    assert config.clip == ClipConfig(size=(64, 128), fps_range=(2.0, 8.0)) and config.masks.drop_local_prob == 0.2
    assert config.sources == ({"kind": "folder", "path": "/videos"},) and config.per_host_batch_size == 4
    with pytest.raises(ValueError, match="unknown data config fields"):
        DataConfig.create({"batchsize": 4})
    with pytest.raises(ValueError, match="sum to 1"):
        MaskConfig(one_side_prob=0.5)
    with pytest.raises(ValueError, match="global_mask"):
        MaskConfig(global_mask="some")
    with pytest.raises(ValueError, match="multiples of 8"):
        ClipConfig(size=(30, 32))


# ------------------------------------------------------------------------------------------- pipeline


def _memory_source(count=8, num_frames=24):
    return [_ramp_video(num_frames + i, fps=24.0 + i) for i in range(count)]


SMALL = DataConfig(clip=ClipConfig(size=(16, 16), num_frames=4, num_global_frames=4), per_host_batch_size=2)


def test_shards_cover_the_data_without_overlap():
    assert [len(shard_indices(9, i, 2)) for i in range(2)] == [4, 4]
    source = _memory_source(8)
    seen = []
    for shard in range(2):
        config = dataclasses.replace(SMALL, num_epochs=1)
        indices = np.concatenate([b["index"] for b in make_dataset(config, seed=5, shard_index=shard,
                                                                    shard_count=2, source=source)])
        assert len(indices) == 4 and len(set(indices.tolist())) == 4
        seen.append(set(indices.tolist()))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(8))


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_iterator_resume_equals_uninterrupted():
    source = _memory_source(8)
    it = iter(make_dataset(SMALL, seed=7, source=source))
    [next(it) for _ in range(5)]  # into the second epoch (4 batches per epoch)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = iter(make_dataset(SMALL, seed=7, source=source))
    resumed.set_state(state)
    _assert_same_batches([next(resumed) for _ in range(4)], expected)
    other = next(iter(make_dataset(SMALL, seed=8, source=source)))
    assert not np.array_equal(other["index"], expected[0]["index"]) or not np.array_equal(
        other["frame_indices"], expected[0]["frame_indices"])


def test_worker_processes_give_the_same_batches_and_resume():
    """Also from a program that never parsed absl flags (pytest, like a notebook or a plain script): the
    pipeline starts grain's workers there and leaves the command line unparsed (the entry points own it)."""
    from absl import flags

    assert not flags.FLAGS.is_parsed(), "something in this test process parsed the global absl flags"
    source = _memory_source(8)
    expected = iter(make_dataset(SMALL, seed=11, source=source))
    expected = [next(expected) for _ in range(5)]
    config = dataclasses.replace(SMALL, worker_count=2)
    it = iter(make_dataset(config, seed=11, source=source))
    try:
        got = [next(it) for _ in range(2)]
        state = it.get_state()
    finally:
        it.close()
    resumed = iter(make_dataset(config, seed=11, source=source))
    try:
        resumed.set_state(state)
        got += [next(resumed) for _ in range(3)]
    finally:
        resumed.close()
    _assert_same_batches(got, expected)
    assert not flags.FLAGS.is_parsed()


# ------------------------------------------------------------------------------------------- latent cache


def _dummy_encode(images):
    """(N, H, W, 3) -> 8x8 average pools with a 4th channel, and a std that depends on the input."""
    n, h, w, _ = images.shape
    pooled = images.reshape(n, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
    mean = np.concatenate([pooled, pooled[..., :1] * 2], axis=-1)
    return mean, np.abs(mean) * 0.1 + 0.01


def test_latent_cache_round_trip(tmp_path):
    source = _memory_source(5, num_frames=20)
    source[2] = _ramp_video(3)  # too short: skipped and recorded
    clip = ClipConfig(size=(16, 24), num_frames=4, num_global_frames=4)
    for shard in range(2):
        meta = write_latent_cache(tmp_path / "cache", source, _dummy_encode, clip=clip, seed=9, clips_per_video=2,
                                  shard_index=shard, shard_count=2)
        assert meta["records"] == (4 if shard == 1 else 2) and meta["skipped_videos"] == ([2] if shard == 0 else [])
    cache = LatentCacheSource(tmp_path / "cache")
    assert len(cache) == 6 and cache.clip == clip
    record = cache[0]
    assert record["index"] == 0 and record["latent_mean"].dtype == np.float32
    expected = sample_clip(source[0], clip, np.random.default_rng([9, 0, 0]))
    mean, std = _dummy_encode(((np.concatenate([expected["frames"], expected["global_frames"]]) / 255.0
                                - 0.5) / 0.5).astype(np.float32))
    np.testing.assert_allclose(record["latent_mean"], mean[:4], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(record["global_latent_std"], std[4:], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(record["frame_indices"], expected["frame_indices"])
    config = DataConfig(latent_cache=str(tmp_path / "cache"), clip=clip, per_host_batch_size=3)
    batch = next(iter(make_dataset(config, seed=0)))
    assert batch["latent_mean"].shape == (3, 4, 2, 3, 4) and batch["global_latent_std"].shape == (3, 4, 2, 3, 4)
    assert batch["latent_mask"].shape == (3, 2, 3) and batch["mask"].shape == (3, 16, 24)
    assert "frames" not in batch and (batch["skipped"] == 0).all()
    (tmp_path / "cache" / "latents-00001-of-00002.json").unlink()
    with pytest.raises(ValueError, match="incomplete latent cache"):
        LatentCacheSource(tmp_path / "cache")
