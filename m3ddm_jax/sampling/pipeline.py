"""Outpainting a whole video: canvas -> VAE latents -> hierarchical windows -> decode -> composite -> crop.

Per video, once: the canvas frames (TELEA-inpainted init frames and black-padded masked frames) and one black
frame are VAE-encoded, and the 16 global frames are encoded and turned into conditional and unconditional
tokens (DESIGN §6). Then the windows of `plan_windows(N).batches()` run batch by batch, each batch as one
call of the jitted window sampler, sharded over a 1-D mesh of the local devices. The chosen latent of each
of the N frames is decoded once, composited with the source and cropped.

Randomness comes from one key, split in the official draw order: VAE posterior noise of the local frames,
the initial noise, VAE posterior noise of the global frames. As in the official code every window starts
from the same initial-noise tensor; unlike it, each frame's posterior draw is made once per video (the
official code re-encodes, with fresh unseeded noise, every time a frame appears in a window), and every
video has exactly N output frames.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from m3ddm_jax import jitting, pretrained
from m3ddm_jax.models.unet3d import UNet3D
from m3ddm_jax.models.vae import LatentCodec
from m3ddm_jax.sampling.schedule import WINDOW, WindowPlan, plan_windows
from m3ddm_jax.sampling.settings import CANVAS_MODES, SamplerSettings
from m3ddm_jax.jitting import Static, model_jit
from m3ddm_jax.sampling.window import (WindowInputs, WindowSampler, call_spec, place, window_mesh,
                                       windows_per_call)
from m3ddm_jax.sharding import WINDOWS
from m3ddm_jax.video.canvas import (MODEL_MULTIPLE, CanvasFrames, Layout, OfficialLayout,
                                    composite, composite_native, crop, global_frames, latent_mask, make_canvas,
                                    native_layout, official_layout, to_model_range, to_uint8)

Progress = Callable[[int, int], None]  # (window-steps done, window-steps in all)
Items = Callable[[int, int], np.ndarray]  # (start, stop) -> items start..stop-1


class Draws(NamedTuple):
    """The random draws of a run, in the official order. The VAE posterior draws are given per item, so that
    the draws of a long video never exist at once and do not depend on how the frames are chunked."""

    vae_local: Items  # (h, w, C) each: the init frames, then the masked frames, then the black frame
    initial_noise: jax.Array  # (F, h, w, C): the start noise of every window (as officially)
    vae_global: Items  # (hg, wg, C) each: the global frames

    @classmethod
    def replay(cls, vae_local: np.ndarray, initial_noise: np.ndarray, vae_global: np.ndarray) -> Draws:
        """Recorded draws, e.g. the official `rand_*` tensors (channels-last)."""
        return cls(lambda s, e: vae_local[s:e], initial_noise, lambda s, e: vae_global[s:e])

    @classmethod
    def from_key(cls, key: jax.Array | int, latent_hw: tuple[int, int], global_latent_hw: tuple[int, int],
                 channels: int = 4) -> Draws:
        k_local, k_noise, k_global = jax.random.split(_as_key(key), 3)
        return cls(_keyed_items(k_local, (*latent_hw, channels)),
                   jax.random.normal(k_noise, (WINDOW, *latent_hw, channels)),
                   _keyed_items(k_global, (*global_latent_hw, channels)))


def _keyed_items(key: jax.Array, shape: tuple[int, ...]) -> Items:
    """Standard-normal items; item i is drawn from fold_in(key, i)."""
    return lambda s, e: np.asarray(_normal_items(key, jnp.arange(s, e), shape))


@functools.partial(jax.jit, static_argnums=2)
def _normal_items(key, indices, shape):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(indices)


@dataclasses.dataclass(frozen=True)
class Outpainted:
    frames: np.ndarray  # (N, Ho, Wo, 3) uint8: the result
    latents: np.ndarray  # (N, h, w, 4): the latent each frame was decoded from
    layout: Layout
    plan: WindowPlan
    timings: dict[str, float]  # seconds: 'vae' (encode, global tokens, decode), 'unet' (sampler calls), 'total'


class VideoLatents(NamedTuple):
    """What the windows of one video are sampled from, computed once per video (Outpainter._prepare)."""

    init: np.ndarray  # (N, h, w, C) latents of the init (TELEA-inpainted) canvas frames
    cond: np.ndarray  # (N, h, w, C) latents of the masked canvas frames
    shared: dict  # the WindowInputs every window shares (leading 1): mask, uncond_latent, cond/uncond_tokens
    noise: jax.Array  # (F, h, w, C) the initial noise every window starts from


@model_jit
def _encode(graphdef: Static, params, images, eps):
    return nnx.merge(graphdef.value, params).encode_to_latents(images, eps=eps)


@model_jit
def _decode(graphdef: Static, params, latents):
    return jnp.clip(nnx.merge(graphdef.value, params).decode_latents(latents) / 2 + 0.5, 0.0, 1.0)


@model_jit
def _global_tokens(graphdef: Static, params, latents):
    """Conditional tokens of the global latents and unconditional ones (the encoder on zero latents)."""
    unet = nnx.merge(graphdef.value, params)
    return unet.encode_global(latents, 1), unet.encode_global(jnp.zeros_like(latents), 1)


def canvas_multiple(unet_config, codec_config) -> int:
    """What the canvas sides must be multiples of for a UNet and latent space: the latent factor times the
    UNet's (64 for SD's VAE and UNet, 4 for the demo's)."""
    return codec_config.downsample_factor * unet_config.downsample_factor


def make_layout(source_hw: tuple[int, int], ratio: str | float, mode: str = "official", *,
                canvas_size: int = 256, multiple: int = MODEL_MULTIPLE) -> Layout:
    """'official': the official square canvas of side <= 256, cropped to `ratio` afterwards; 'native': a
    canvas shaped like `ratio` (long side `canvas_size`, sides multiples of `multiple`), composited at the
    source resolution."""
    if mode == "official":
        return official_layout(source_hw, [ratio])
    if mode == "native":
        return native_layout(source_hw, ratio, canvas_size=canvas_size, multiple=multiple)
    raise ValueError(f"unknown canvas mode {mode!r}; use one of {CANVAS_MODES}")


def compose_output(generated: np.ndarray, frames: np.ndarray, canvas: CanvasFrames,
                   layout: Layout) -> np.ndarray:
    """Generated canvas frames (uint8) -> output frames: the source where it is known, cropped to the ratio."""
    if isinstance(layout, OfficialLayout):
        return crop(composite(generated, canvas), layout.crops[0])
    return composite_native(generated, frames, layout)


class Outpainter:
    """A UNet, a latent space and the sampler settings, ready to outpaint videos one after another (compiled
    code is reused across videos of the same canvas size).

    The UNet runs in the settings' compute dtype and attention kernel, whatever it was built with (a training
    UNet may carry bfloat16 and remat). Window batches are split over `devices` (default: all local devices)
    along a 1-D mesh axis 'windows'; a call holds at most `settings.windows_per_call` windows (0:
    window.WINDOWS_PER_DEVICE per device) and is padded to devices x a power of two so that few shapes
    compile. The VAE runs `vae_batch` frames per call.
    """

    def __init__(self, unet: UNet3D, vae: LatentCodec, scheduler_config: dict,
                 settings: SamplerSettings = SamplerSettings(), *, loop: str = "scan",
                 devices: Sequence[jax.Device] | None = None, vae_batch: int = 8):
        self.settings = settings
        unet = pretrained.reconfigure(unet, remat="none", **settings.unet_overrides(jax.default_backend()))
        self.sampler = WindowSampler(unet, scheduler_config, steps=settings.steps, scheduler=settings.scheduler,
                                     guidance_scale=settings.guidance_scale,
                                     global_guidance_scale=settings.global_guidance_scale,
                                     exact_branches=settings.exact_branches, loop=loop, strength=settings.strength)
        self.mesh = window_mesh(devices or jax.local_devices())
        self.num_devices = self.mesh.size
        # The VAE's chunks of frames are split over the window axis (vae_batch is a multiple of the devices);
        # the models' parameters and the global latents are replicated. The sampler calls' inputs are placed
        # by sampling.window.call_spec.
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.vae_sharding = NamedSharding(self.mesh, PartitionSpec(WINDOWS))
        self.sampler.put_params(self._replicated)
        self._unet_static = Static(self.sampler.graphdef)  # hashed once, not per video
        self.vae_graphdef, vae_params = jitting.split(vae)
        self.vae_params = jax.device_put(vae_params, self._replicated)
        self.vae_factor = vae.config.downsample_factor
        self.latent_channels = vae.config.latent_channels
        self.canvas_multiple = canvas_multiple(unet.config, vae.config)
        self.max_windows_per_call = windows_per_call(settings.windows_per_call, self.num_devices)
        self.vae_batch = self._round_to_devices(vae_batch)

    @classmethod
    def from_folder(cls, folder: str, settings: SamplerSettings = SamplerSettings(), **kwargs) -> Outpainter:
        """From a weights folder (tools/convert_checkpoint.py: converted or exported), its UNet loaded in the
        settings' compute dtype and attention kernel."""
        weights = pretrained.load_weights(folder, **settings.unet_overrides(jax.default_backend()))
        return cls(weights.unet, weights.vae, weights.scheduler_config, settings, **kwargs)

    @property
    def steps(self) -> int:
        return self.sampler.steps

    # ------------------------------------------------------------------------------------------ pieces

    def _round_to_devices(self, n: int) -> int:
        return self.num_devices * math.ceil(n / self.num_devices)

    def _vae_map(self, fn, graph_and_params, n: int, make: Callable[[int, int], tuple]) -> jax.Array:
        """fn over n items in fixed-size chunks (the last one zero-padded, so one shape compiles), each chunk
        split over the devices."""
        size = self.vae_batch
        out = []
        for s in range(0, n, size):
            args = make(s, min(s + size, n))
            real = len(args[0])
            args = [np.pad(np.asarray(a), [(0, size - real)] + [(0, 0)] * (np.ndim(a) - 1)) for a in args]
            out.append(fn(*graph_and_params, *jax.device_put(args, self.vae_sharding))[:real])
        return jnp.concatenate(out)

    def encode(self, images: Items, n: int, eps: Items) -> np.ndarray:
        """Scaled posterior samples of n images: `images(s, e)` in [-1, 1], posterior noise `eps(s, e)`."""
        return np.asarray(self._vae_map(_encode, (self.vae_graphdef, self.vae_params), n,
                                        lambda s, e: (images(s, e), eps(s, e))))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (n, h, w, 4) -> images (n, H, W, 3) in [0, 1] (clamped as the official pipeline does)."""
        return np.asarray(self._vae_map(_decode, (self.vae_graphdef, self.vae_params), len(latents),
                                        lambda s, e: (latents[s:e],)))

    def global_tokens(self, images: np.ndarray, eps: Items) -> tuple[jax.Array, jax.Array]:
        """Global frames (G, Hg, Wg, 3) in [-1, 1] -> conditional and unconditional tokens, each (1, L, C)."""
        return self.latent_tokens(self.encode(lambda s, e: images[s:e], len(images), eps))

    def latent_tokens(self, latents: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Global latents (G, hg, wg, 4) -> conditional and unconditional tokens, each (1, L, C)."""
        return _global_tokens(self._unet_static, self.sampler.params,
                              jax.device_put(latents, self._replicated))

    def _latent_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        return hw[0] // self.vae_factor, hw[1] // self.vae_factor

    def _prepare(self, images: Items, n: int, pixel_mask: np.ndarray, global_images: np.ndarray,
                 draws: Draws) -> VideoLatents:
        """The per-video pieces: `images(s, e)` in [-1, 1] are items s..e-1 of the n init frames, the n masked
        frames and the black frame, VAE-encoded; the global frames become tokens; the pixel mask (H, W),
        1 = generate, becomes the latent mask."""
        local = self.encode(images, 2 * n + 1, draws.vae_local)
        cond_tokens, uncond_tokens = self.global_tokens(global_images, draws.vae_global)
        mask = latent_mask(pixel_mask, self.vae_factor)[None, None, :, :, None].astype(np.float32)
        shared = dict(mask=mask, uncond_latent=local[None, None, 2 * n], cond_tokens=cond_tokens,
                      uncond_tokens=uncond_tokens)
        return VideoLatents(local[:n], local[n:2 * n], shared, draws.initial_noise)

    def _sample_call(self, inputs: WindowInputs, noise) -> tuple[np.ndarray, jax.Array]:
        """One sampler call, placed by its spec (what tools/aot_compile.py --what sample compiles): the
        latents, and the noise as placed (moved to the devices once: later calls find it there)."""
        b, f, h, w, c = np.shape(inputs.init_latents)
        spec, noise_spec = call_spec(self.mesh, b, (h, w), c, inputs.cond_tokens, frames=f)
        noise = place(noise, noise_spec)
        return np.asarray(self.sampler(place(inputs, spec), noise=noise)), noise

    # ------------------------------------------------------------------------------------ one window

    def outpaint_window(self, init_images: np.ndarray, masked_images: np.ndarray, pixel_mask: np.ndarray,
                        global_images: np.ndarray, fps: float, *, guide_latents: np.ndarray | None = None,
                        guide_flags: np.ndarray | None = None, key: jax.Array | int = 0,
                        draws: Draws | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One official window (`outpainting_with_random_masked_latent_inference_bidirection`, batch 1).

        init_images, masked_images (F, H, W, 3) and global_images (G, Hg, Wg, 3) in [-1, 1]; pixel_mask (H, W),
        1 = generate; guide_latents (F, h, w, 4) are used where guide_flags (F,) is set. `draws` replays
        recorded noise, otherwise it comes from `key`. Returns latents (F, h, w, 4) and images (F, H, W, 3)
        in [0, 1].
        """
        f = len(init_images)
        if draws is None:
            draws = Draws.from_key(key, self._latent_hw(init_images.shape[1:3]),
                                   self._latent_hw(global_images.shape[1:3]), self.latent_channels)
        sources = (init_images, masked_images, -np.ones_like(init_images[:1]))
        video = self._prepare(lambda s, e: _take(sources, s, e), f, pixel_mask, global_images, draws)
        if guide_flags is None:
            guide_flags = np.zeros(f, bool)
        if guide_latents is None:
            guide_latents = np.zeros_like(video.init)
        window = np.arange(f)[None]
        inputs = _window_inputs(video, window, np.asarray(guide_latents, np.float32)[window],
                                np.asarray(guide_flags, bool)[None], np.asarray([fps], np.float32))
        latents = self._sample_call(inputs, video.noise[None])[0][0]
        return latents, self.decode(latents)

    # ------------------------------------------------------------------------------------- a video

    def outpaint(self, frames: np.ndarray, fps: float, ratio: str | float, *, key: jax.Array | int | None = None,
                 strides: Sequence[int] | None = None, progress: Progress | None = None) -> Outpainted:
        """Outpaints source frames (N, H, W, 3) uint8 at `fps` to aspect ratio `ratio` (width:height).

        The canvas (mode and size) and the global frames' size are the settings'. Randomness comes from `key`
        (default: the settings' seed). `strides` overrides the official hierarchy ([15, 5, 1] from 50 frames
        on, else [1]). `progress(done, total)` is called after every sampler call, in window-steps.
        """
        t_start = time.perf_counter()
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
            raise ValueError(f"frames must be uint8 RGB (N >= 1, H, W, 3), got {frames.dtype} {frames.shape}")
        n = len(frames)
        settings = self.settings
        layout = make_layout(frames.shape[1:3], ratio, settings.canvas_mode, canvas_size=settings.canvas_size,
                             multiple=self.canvas_multiple)
        canvas = make_canvas(frames, layout)
        draws = Draws.from_key(settings.seed if key is None else key, self._latent_hw(layout.canvas_hw),
                               self._latent_hw(settings.global_size), self.latent_channels)

        timings = {"vae": 0.0, "unet": 0.0}
        t0 = time.perf_counter()
        black = np.zeros_like(canvas.masked[:1])
        sources = (canvas.init, canvas.masked, black)
        video = self._prepare(lambda s, e: to_model_range(_take(sources, s, e)), n, canvas.mask,
                              global_frames(frames, size=settings.global_size), draws)
        timings["vae"] += time.perf_counter() - t0

        plan = plan_windows(n, strides)
        latents = self._sample_plan(plan, video, float(fps), timings, progress)

        t0 = time.perf_counter()
        generated = to_uint8(self.decode(latents))
        timings["vae"] += time.perf_counter() - t0
        out = compose_output(generated, frames, canvas, layout)
        timings["total"] = time.perf_counter() - t_start
        return Outpainted(out, latents, layout, plan, timings)

    def split_batch(self, windows: Sequence) -> list[tuple[list, int]]:
        """Splits a batch of the plan into sampler calls: (windows, padded size)."""
        cap = self.max_windows_per_call
        calls = []
        for s in range(0, len(windows), cap):
            chunk = list(windows[s:s + cap])
            per_device = math.ceil(len(chunk) / self.num_devices)
            calls.append((chunk, min(cap, self.num_devices * 2 ** math.ceil(math.log2(per_device)))))
        return calls

    def _sample_plan(self, plan: WindowPlan, video: VideoLatents, fps: float, timings: dict,
                     progress: Progress | None) -> np.ndarray:
        """Runs the plan's windows; returns the latent of every frame (plan.frame_sources())."""
        held = np.zeros_like(video.init)  # the latent each frame holds once a window has produced it: guides
        outputs = {}
        noise = video.noise[None]
        total, done = len(plan.windows) * self.steps, 0
        for batch in plan.batches():
            for chunk, size in self.split_batch(batch):
                padded = chunk + chunk[-1:] * (size - len(chunk))  # repeats, discarded
                idx = np.array([w.frame_indices for w in padded])
                inputs = _window_inputs(video, idx, held[idx], np.array([w.guide_flags for w in padded]),
                                        np.array([w.fps(fps) for w in padded], np.float32))
                t0 = time.perf_counter()
                out, noise = self._sample_call(inputs, noise)
                timings["unet"] += time.perf_counter() - t0
                for w, latents in zip(chunk, out):
                    outputs[w.index] = latents
                    held[list(w.new_frames)] = latents[list(w.new_positions)]
                done += len(chunk) * self.steps
                if progress is not None:
                    progress(done, total)
        return np.stack([outputs[w][p] for w, p in plan.frame_sources()])


def _window_inputs(video: VideoLatents, frames: np.ndarray, guide_latents: np.ndarray, guide_flags: np.ndarray,
                   fps: np.ndarray) -> WindowInputs:
    """The sampler inputs of windows of `video`: frames (B, F) indexes its latents."""
    return WindowInputs(video.init[frames], video.cond[frames], guide_latents=guide_latents,
                        guide_flags=guide_flags, fps=fps, **video.shared)


def _take(arrays: Sequence[np.ndarray], s: int, e: int) -> np.ndarray:
    """Items s..e-1 of the concatenation of `arrays`, without concatenating them all."""
    parts, offset = [], 0
    for a in arrays:
        lo, hi = max(s - offset, 0), min(e - offset, len(a))
        if lo < hi:
            parts.append(a[lo:hi])
        offset += len(a)
    return np.concatenate(parts)


def _as_key(key: jax.Array | int) -> jax.Array:
    return jax.random.key(key) if isinstance(key, (int, np.integer)) else key
