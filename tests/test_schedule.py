"""The hierarchical window plan: the official schedule recorded from src/inference.py, and its invariants."""

import json

import pytest
from conftest import load_json

from m3ddm_jax.sampling import plan_windows
from m3ddm_jax.video import global_frame_indices

SCHEDULE = load_json("window_schedule.json")
LENGTHS = [1, 2, 3, 15, 16, 17, 30, 31, 49, 50, 51, 64, 81, 84, 100, 226, 240, 241, 255, 500, 1000]


@pytest.mark.reference
@pytest.mark.parametrize("n", sorted(SCHEDULE["per_N"], key=int) if SCHEDULE else [])
def test_plan_matches_official_schedule(reference_dir, n):
    recorded = json.loads((reference_dir / "window_schedule.json").read_text())
    ref, fps = recorded["per_N"][n], recorded["fps_of_fake_video"]
    plan = plan_windows(ref["N"])
    assert list(plan.strides) == ref["strides"]
    assert global_frame_indices(ref["N"]).tolist() == ref["global_frame_indices"]
    assert len(plan.windows) == ref["num_windows"]
    for w, r in zip(plan.windows, ref["windows"], strict=True):
        assert (w.index, w.stride) == (r["window"], r["stride"])
        assert list(w.frame_indices) == r["frame_indices"]
        assert list(w.guide_flags) == r["guide_flags"]
        assert list(w.guide_frames) == r["guide_frame_indices"]
        assert [list(s) if s else None for s in w.guide_sources] == r["guide_source_window_and_position"]
        assert list(w.new_frames) == r["newly_filled_frame_indices"]
        assert w.fps(fps) == r["fps_passed"]
        assert list(w.file_indices) == r["saved_file_indices"]
    files = plan.official_file_sources()
    assert list(files) == ref["output_video_frame_file_indices"]
    assert len(files) == ref["num_output_video_frames"]


def run(plan, batches):
    """Symbolic sampling: a window's output at a position records the window, the position and every guide
    latent it saw. Returns the latent of every frame and each window's guide inputs."""
    store, inputs = {}, {}
    for batch in batches:
        before = dict(store)
        for w in batch:
            assert w.guide_flags == tuple(f in before for f in w.frame_indices)
            inputs[w.index] = tuple(before.get(f) for f in w.frame_indices)
            for f, p in zip(w.new_frames, w.new_positions, strict=True):
                assert f not in store
                store[f] = (w.index, p, inputs[w.index])
    return store, inputs


@pytest.mark.parametrize("n", LENGTHS)
def test_plan_invariants(n):
    plan = plan_windows(n)
    assert plan.windows and all(len(w.frame_indices) == 16 for w in plan.windows)
    assert sorted(f for w in plan.windows for f in w.new_frames) == list(range(n))  # each frame filled once
    for w in plan.windows:
        for f, p in zip(w.new_frames, w.new_positions):
            assert w.frame_indices.index(f) == p
        for f, s in zip(w.frame_indices, w.guide_sources):
            if s is not None:
                assert s[0] < w.index and f in plan.windows[s[0]].new_frames

    batches = plan.batches()
    assert sorted(w.index for b in batches for w in b) == list(range(len(plan.windows)))
    batch_of = {w.index: i for i, b in enumerate(batches) for w in b}
    for i, batch in enumerate(batches):
        assert len({w.level for w in batch}) == 1
        assert all(batch_of[s[0]] < i for w in batch for s in w.guide_sources if s is not None)
    assert [b[0].level for b in batches] == sorted(b[0].level for b in batches)
    assert run(plan, batches) == run(plan, [[w] for w in plan.windows])  # batched == sequential

    sources = plan.frame_sources()
    assert len(sources) == n
    for f, (w, p) in enumerate(sources):
        assert plan.windows[w].frame_indices[p] == f and plan.windows[w].file_indices[p] == f


def test_independent_windows_are_batched():
    # N = 240: one stride-15 window, four stride-5 windows, 16 stride-1 windows; every guide of the two
    # finer levels comes from a coarser one. Below 50 frames there is one level and each window needs the
    # previous one's last frame.
    assert [len(b) for b in plan_windows(240).batches()] == [1, 4, 16]
    assert [len(b) for b in plan_windows(49).batches()] == [1, 1, 1, 1]


def test_single_frame_video():
    plan = plan_windows(1)  # the official loop makes no window at all here
    (w,) = plan.windows
    assert w.frame_indices == (0,) * 16 and not any(w.guide_flags) and w.new_frames == (0,)
    assert plan.frame_sources() == ((0, 0),)


@pytest.mark.parametrize("strides", [(4, 1), (7, 3, 1), (1,)])
def test_custom_strides(strides):
    plan = plan_windows(120, strides)
    assert plan.strides == strides
    assert sorted(f for w in plan.windows for f in w.new_frames) == list(range(120))


@pytest.mark.parametrize("n, strides", [(0, None), (10, (5,)), (10, ())])
def test_bad_arguments(n, strides):
    with pytest.raises(ValueError):
        plan_windows(n, strides)
