"""The hierarchical coarse-to-fine window plan of M3DDM inference, as plain Python data.

Official rules (src/inference.py): strides [15, 5, 1] for N >= 50 frames, else [1]. For each stride, in
order, windows start at entries 0, 15, 30, ... of frames[::stride] while start < N // stride - 1, and take
16 consecutive entries, padded with frame N - 1. A frame that already holds a latent from any earlier window
is a guide. After a window, every frame of it without a latent takes the window's output at the frame's
first position in it.

Deviations (both only change what the official code does badly):
* A 1-frame video gets one window (the official loop makes none for N = 1, so nothing is generated).
* `frame_sources` gives exactly N output frames; `official_file_sources` gives the official output, which
  also holds the padded positions as extra frames.
"""

from __future__ import annotations

import dataclasses

WINDOW = 16
HOP = WINDOW - 1  # consecutive windows of one level share one frame


def official_strides(num_frames: int) -> tuple[int, ...]:
    return (15, 5, 1) if num_frames >= 50 else (1,)


@dataclasses.dataclass(frozen=True)
class Window:
    index: int  # position in the official sequential order
    level: int  # index into the plan's strides
    stride: int
    start: int  # index of the first frame in frames[::stride]
    frame_indices: tuple[int, ...]
    guide_flags: tuple[bool, ...]  # the position's frame already holds a latent: it conditions, mask 0
    guide_sources: tuple[tuple[int, int] | None, ...]  # (window, position) whose output that latent is
    new_frames: tuple[int, ...]  # frames that take this window's output (ascending) ...
    new_positions: tuple[int, ...]  # ... from these positions

    def fps(self, video_fps: float) -> float:
        """The fps argument of this window's call: the official video fps // stride."""
        return float(video_fps // self.stride)

    @property
    def guide_frames(self) -> tuple[int, ...]:
        """The distinct guide frames, in position order."""
        return tuple(dict.fromkeys(f for f, g in zip(self.frame_indices, self.guide_flags) if g))

    @property
    def file_indices(self) -> tuple[int, ...]:
        """The official output file number of each position: (start + i)·stride. Padded positions get
        numbers >= N, real ones their frame index."""
        return tuple((self.start + i) * self.stride for i in range(len(self.frame_indices)))


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    num_frames: int
    strides: tuple[int, ...]
    windows: tuple[Window, ...]

    def batches(self) -> tuple[tuple[Window, ...], ...]:
        """The windows as a sequence of batches: within a level, each window goes one batch after the last
        same-level window it takes a guide from (guides from coarser levels are ready anyway). Windows of a
        batch take no guide from each other, and fill disjoint frames (a frame two windows of one level
        share is filled by the first and a guide of the second), so running a batch at once gives exactly
        the official sequential result."""
        batches: list[list[Window]] = []
        batch_of: dict[int, int] = {}
        for level in range(len(self.strides)):
            first = len(batches)
            for w in (w for w in self.windows if w.level == level):
                deps = [batch_of[s[0]] + 1 for s in w.guide_sources if s is not None]
                b = max([first, *deps])
                if b == len(batches):
                    batches.append([])
                batches[b].append(w)
                batch_of[w.index] = b
        return tuple(tuple(b) for b in batches)

    def official_file_sources(self) -> dict[int, tuple[int, int]]:
        """Official output: file number -> (window, position) whose decoded output ends up in that file. Every
        window writes all its positions; a number written several times keeps the last window's frame."""
        sources = {}
        for w in self.windows:
            for position, number in enumerate(w.file_indices):
                sources[number] = (w.index, position)
        return dict(sorted(sources.items()))

    def frame_sources(self) -> tuple[tuple[int, int], ...]:
        """Our output: exactly N frames; frame f comes from (window, position), the same choice as the
        official file f: the last window holding f at a real (unpadded) position, i.e. the finest level's
        and latest window's output, even where f was a guide there (that output is regenerated, not the
        guide latent copied). The stride-1 level holds every frame at a real position."""
        sources = self.official_file_sources()
        return tuple(sources[f] for f in range(self.num_frames))


def plan_windows(num_frames: int, strides: tuple[int, ...] | None = None) -> WindowPlan:
    """The window plan for a video of `num_frames` frames (official strides unless given)."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least 1 frame, got {num_frames}")
    strides = official_strides(num_frames) if strides is None else tuple(strides)
    if not strides or strides[-1] != 1 or min(strides) < 1:
        raise ValueError(f"strides must be positive and end with 1 so that every frame is generated, got {strides}")
    source: dict[int, tuple[int, int]] = {}  # frame -> (window, position) of the latent it holds
    windows: list[Window] = []
    for level, stride in enumerate(strides):
        entries = list(range(0, num_frames, stride))
        stop = num_frames // stride - 1
        if level == len(strides) - 1:
            stop = max(stop, 1)  # the official loop is empty for N = 1
        for start in range(0, stop, HOP):
            frames = tuple((entries[start : start + WINDOW] + [num_frames - 1] * WINDOW)[:WINDOW])
            new = {}
            for position, f in enumerate(frames):
                if f not in source and f not in new:
                    new[f] = position
            windows.append(
                Window(
                    index=len(windows),
                    level=level,
                    stride=stride,
                    start=start,
                    frame_indices=frames,
                    guide_flags=tuple(f in source for f in frames),
                    guide_sources=tuple(source.get(f) for f in frames),
                    new_frames=tuple(new),
                    new_positions=tuple(new.values()),
                )
            )
            source.update((f, (len(windows) - 1, p)) for f, p in new.items())
    return WindowPlan(num_frames, strides, tuple(windows))
