"""One device call on a lent GPU: the measurements of issues 15 and 14, in priority order, each section in its own
process with its own time budget, results written after every section.

Sections (in this order; a section that fails or runs out of time is recorded and the next one runs):
  window_official  The authors' UNet (random weights, fp16, CUDA) driven through the official pipeline's denoising
                   loop for one window: 50 PNDM steps, 4-way guidance (4 UNet rows per step, the global frames
                   encoded inside every UNet call as the official forward does), 16 frames of 32x32 latents,
                   16 global frames. The loop is re-created from the pipeline's code
                   (`outpainting_with_random_masked_latent_inference_bidirection`): its module imports decord
                   and CLIP classes the device does not have. The SD VAE's encode/decode of the same window are
                   timed on their own.
  window_jax       m3ddm_jax's window sampler call for one window exactly as the Outpainter issues it
                   (Outpainter's sampler and mesh, sampling.window.call_spec/place, default SamplerSettings:
                   bf16 on GPU, attention `auto`, 3 branches, 50 PNDM steps), compiled ahead of time (compile
                   time, the compiler's FLOPs per step), then timed; then, if time is left, the Outpainter's VAE
                   encode/decode of the same window.
  window_jax_xla   The same with attention `xla`, run only when window_jax has no time per window (a cuDNN
                   attention failure, say), so that the side by side still gets a JAX figure.
  step_flops       The 8192^3 bf16 matmul rate (the measured peak) and the analytic FLOPs of one guided step
                   (attention as plain matmuls), giving the step's achieved TFLOP/s and its share of the peak.
  demo_training    Issue 14: `python -m m3ddm_jax.train --config configs/demo.py` on the GPU for as many steps
                   as the budget allows, validation (EMA band PSNR against TELEA) every --demo-val-every steps;
                   its metrics.jsonl comes back as demo_metrics.jsonl.
  train_step       The paper config's train step (configs/m3ddm_sd15_256.py: 16 x 256 x 256, 16 global frames,
                   bf16, remat as configured), random weights, a synthetic batch (bench/train_step.py): step
                   time and MFU against the measured peak at batch 1, then the largest batch that fits among
                   powers of two up to the one that batch 1's memory plan predicts.
  video            A 100-frame video end to end: decode (PyAV), outpaint (VAE, windows 15/5/1, decode), encode.

Everything goes to OUT/results.json (rewritten after every section, and by the sections as they go), the
demo's metrics to OUT/demo_metrics.jsonl; tee the output to OUT/log.txt. Compiled executables are shared
between the sections' processes through a persistent compilation cache (the video reuses the window's).

    python bench/gpu.py --out $OUT --deadline 470 2>&1 | tee $OUT/log.txt       # the device run (/work/notes/gpu_run.md)
    python bench/gpu.py --out /tmp/gpu_tiny --tiny                               # tiny shapes, CPU: a smoke test
    python bench/gpu.py --out /tmp/g --tiny --sections window_jax,step_flops     # some sections only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

# Name -> (largest share of the deadline in seconds, fewest seconds worth starting it with).
SECTIONS = {
    "window_official": (75, 30),
    "window_jax": (160, 60),
    "window_jax_xla": (130, 60),  # only when window_jax got no time per window (e.g. a cuDNN failure)
    "step_flops": (45, 15),
    "demo_training": (130, 60),
    "train_step": (150, 60),
    "video": (120, 50),
}
RESULTS = "results.json"
OFFICIAL = os.path.join(REPO, ".ref", "M3DDM-Video-Outpainting")
VIDEO = os.path.join(REPO, "assets", "videos", "caminandes_llama.mp4")  # 200 frames, 640x360


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _median(xs):
    return round(statistics.median(xs), 4) if xs else None


def _timed(fn, repeats: int, after_each=None) -> list[float]:
    """Wall times of `repeats` calls of fn (which waits for its device work); after_each(times) records them."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if after_each:
            after_each(times)
    return times


class Recorder:
    """A section's results, written to its JSON file after every change (a killed section keeps its figures)."""

    def __init__(self, path: str, budget: float):
        self.path, self.data = path, {}
        self.deadline = time.monotonic() + budget

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value
        _write_json(self.path, self.data)

    def part(self, name: str, fn, *args):
        """Runs fn(*args); on an exception records its traceback under errors[name] and returns None."""
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - a failing part is a result; the next part still runs
            self["errors"] = {**self.data.get("errors", {}), name: traceback.format_exc()}
            print(f"[{name}] failed:\n{traceback.format_exc()}", flush=True)
            return None


def _log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ the window


def full_models(tiny: bool, dtype: str = "float32"):
    """Random-weight UNet and VAE: the released architecture and SD 1.5's VAE, or the fixtures' tiny ones."""
    from outpaint import PRESETS  # bench/outpaint.py

    from m3ddm_jax import pretrained
    from m3ddm_jax.models.layers import random_init

    unet_config, vae_config = PRESETS["tiny" if tiny else "full"]
    return random_init(pretrained.abstract_model(unet_config)), random_init(pretrained.abstract_model(vae_config))


def window_shape(tiny: bool) -> dict:
    """The window: 16 frames (the sampler's WINDOW) of `size` x `size` latents, 16 global frames."""
    return {"frames": 16, "size": 8 if tiny else 32, "global_frames": 16, "steps": 3 if tiny else 50}


def official_unet_config(cfg) -> dict:
    """The official UNet3DConditionModel's constructor arguments for a UNet3DConfig (inverse of from_diffusers)."""
    return {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "block_out_channels": list(cfg.block_out_channels), "down_block_types": list(cfg.down_block_types),
            "up_block_types": list(cfg.up_block_types), "layers_per_block": cfg.layers_per_block,
            "attention_head_dim": cfg.attention_heads, "norm_num_groups": cfg.norm_num_groups,
            "norm_eps": cfg.norm_eps, "cross_attention_dim": cfg.cross_attention_dim,
            "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": int(cfg.freq_shift), "act_fn": "silu",
            "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1}


def section_window_official(rec: Recorder, args) -> None:
    import torch

    from outpaint import PRESETS
    from m3ddm_jax.pretrained import SD15_SCHEDULER_CONFIG

    sys.path.insert(0, os.path.join(args.official, "src"))
    from diffusers import AutoencoderKL, PNDMScheduler
    from model.unet_3d_condition_video import UNet3DConditionModel

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    shape = window_shape(args.tiny)
    unet_config, vae_config = PRESETS["tiny" if args.tiny else "full"]
    rec["setup"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "dtype": str(dtype), **shape, "rows_per_step": 4,
                    "official_commit": subprocess.run(["git", "-C", args.official, "rev-parse", "HEAD"],
                                                      capture_output=True, text=True).stdout.strip() or None}
    t0 = time.perf_counter()
    with torch.device(device):
        unet = UNet3DConditionModel(**official_unet_config(unet_config))
    unet = unet.to(dtype).eval()
    rec["init_s"] = round(time.perf_counter() - t0, 2)
    rec["params"] = sum(p.numel() for p in unet.parameters())

    f, s, g = shape["frames"], shape["size"], shape["global_frames"]
    gen = torch.Generator(device).manual_seed(0)
    randn = lambda *sh: torch.randn(sh, generator=gen, device=device, dtype=dtype)
    ori, masked, uncond = randn(1, 4, f, s, s), randn(1, 4, f, s, s), randn(1, 4, 1, s, s).repeat(1, 1, f, 1, 1)
    mask = torch.zeros(1, 1, f, s, s, device=device, dtype=dtype)
    mask[..., : s // 4] = mask[..., s - s // 4:] = 1
    global_latents = randn(g, 4, s, s)
    # As the pipeline stacks them for do_classfier=4: [uncond local, cond local] x 2 (global uncond, cond).
    latents_cond = torch.cat([uncond, masked] * 2)
    mask_channel = torch.cat([torch.ones_like(mask), mask] * 2)
    fps = torch.full((4,), 8, device=device, dtype=torch.int64)
    scheduler = PNDMScheduler.from_config({k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "_class_name"})
    steps, scale, global_scale = shape["steps"], 2.0, 4.0

    def window():
        # The pipeline's loop at strength 1 (its init_timestep / t_start arithmetic), for one window.
        scheduler.set_timesteps(steps)
        offset = scheduler.config.get("steps_offset", 0)
        init_timestep = min(int(steps * 1.0) + offset, steps)
        t_start = max(steps - init_timestep + offset, 0)
        latents = scheduler.add_noise(ori, randn(1, 4, f, s, s),
                                      torch.tensor([scheduler.timesteps[-init_timestep]], device=device))
        calls = 0
        with torch.inference_mode():
            for t in scheduler.timesteps[t_start:].to(device):
                x = torch.cat([torch.cat([latents] * 4), latents_cond, mask_channel], dim=1)
                x = scheduler.scale_model_input(x, t)
                eps = unet(x, t, fps=fps, encoder_hidden_states=global_latents, b=1, f=f, g=g, is_empty_img=False,
                           do_classfier=4).sample
                uu, cu, _, cc = eps.chunk(4)
                latents = scheduler.step(uu + scale * (cu - uu) + global_scale * (cc - cu), t, latents).prev_sample
                calls += 1
        if cuda:
            torch.cuda.synchronize()
        return latents, calls

    t0 = time.perf_counter()
    out, calls = window()
    rec["first_window_s"] = round(time.perf_counter() - t0, 3)
    rec["unet_calls_per_window"] = calls
    rec["output_finite"] = bool(torch.isfinite(out).all())
    def record(times):
        rec["window_s"], rec["median_window_s"] = times, _median(times)

    _timed(window, args.repeats, record)
    if cuda:
        rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    rec.part("vae", _official_vae, rec, args, AutoencoderKL, vae_config, device, dtype, f, g, s)


def _official_vae(rec, args, AutoencoderKL, vae_config, device, dtype, f, g, s):
    """The pipeline's VAE work for one window: encode 2F+1 canvas frames and G global frames, decode F."""
    import torch

    with torch.device(device):
        vae = AutoencoderKL(**{k: v for k, v in vae_config.to_diffusers().items() if not k.startswith("_")})
    vae = vae.to(dtype).eval()
    px = s * vae_config.downsample_factor
    frames = torch.rand(2 * f + 1, 3, px, px, device=device, dtype=dtype) * 2 - 1
    global_frames = torch.rand(g, 3, px, px, device=device, dtype=dtype) * 2 - 1
    latents = torch.randn(f, 4, s, s, device=device, dtype=dtype)

    def run():
        with torch.inference_mode():
            vae.encode(frames).latent_dist.sample()
            vae.encode(global_frames).latent_dist.sample()
            vae.decode(latents / 0.18215).sample
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    rec["vae_s"] = _median(_timed(run, 2))
    rec["median_window_with_vae_s"] = round(rec["median_window_s"] + rec["vae_s"], 4)


def _sampler_call(tiny: bool, attention: str = "auto", windows: int = 1):
    """(outpainter, sampler inputs, noise) of one call of `windows` windows as the Outpainter issues it."""
    import numpy as np

    from m3ddm_jax.pretrained import SD15_SCHEDULER_CONFIG
    from m3ddm_jax.sampling import Outpainter
    from m3ddm_jax.sampling.settings import SamplerSettings
    from m3ddm_jax.sampling.window import WindowInputs, call_spec, place

    shape = window_shape(tiny)
    unet, vae = full_models(tiny)
    outpainter = Outpainter(unet, vae, SD15_SCHEDULER_CONFIG, SamplerSettings(steps=shape["steps"], attention=attention))
    f, s, g = shape["frames"], shape["size"], shape["global_frames"]
    rng = np.random.default_rng(0)
    randn = lambda *sh: rng.standard_normal(sh).astype(np.float32)
    cond, uncond = outpainter.latent_tokens(randn(g, s, s, 4))
    mask = np.zeros((1, 1, s, s, 1), np.float32)
    mask[:, :, :, : s // 4] = mask[:, :, :, s - s // 4:] = 1
    inputs = WindowInputs(randn(windows, f, s, s, 4), randn(windows, f, s, s, 4), mask,
                          np.zeros((windows, f, s, s, 4), np.float32), np.zeros((windows, f), bool),
                          randn(1, 1, s, s, 4), np.full((windows,), 8.0, np.float32), cond, uncond)
    spec, noise_spec = call_spec(outpainter.mesh, windows, (s, s), 4, cond)
    return outpainter, place(inputs, spec), place(randn(1, f, s, s, 4), noise_spec)


def section_window_jax(rec: Recorder, args, attention: str = "auto") -> None:
    import jax

    dev = jax.devices()[0]
    t0 = time.perf_counter()
    outpainter, inputs, noise = _sampler_call(args.tiny, attention)
    sampler = outpainter.sampler
    unet = jax.tree.leaves(sampler.params)[0]
    rec["setup"] = {"device": f"{dev.platform}:{dev.device_kind} x{jax.device_count()}", **window_shape(args.tiny),
                    "windows": 1, "branches": len(sampler.branches), "rows_per_step": len(sampler.branches),
                    "unet_calls_per_window": sampler.steps, "settings": outpainter.settings.to_dict(),
                    "param_dtype": str(unet.dtype), "setup_s": round(time.perf_counter() - t0, 2)}
    t0 = time.perf_counter()
    lowered = sampler.lower(sampler.params, inputs, noise)
    rec["lower_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    rec.part("compiled_cost", _compiled_cost, rec, compiled)

    def window():
        return jax.block_until_ready(compiled(sampler.params, inputs, noise, sampler.scales))

    t0 = time.perf_counter()
    out = window()
    rec["first_window_s"] = round(time.perf_counter() - t0, 3)
    rec["output_finite"] = bool(jax.numpy.isfinite(out).all())
    def record(times):
        rec["window_s"], rec["median_window_s"] = times, _median(times)
        rec["median_step_s"] = round(rec["median_window_s"] / sampler.steps, 5)

    _timed(window, args.repeats, record)
    stats = dev.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        rec["peak_memory_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
    if rec.left() > 40 or args.tiny:
        rec.part("vae", _jax_vae, rec, outpainter, args.tiny)


def _compiled_cost(rec, compiled):
    """The compiler's view: its cost analysis counts the scan body once, so FLOPs and bytes are per step."""
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    rec["compiled_per_step"] = {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}
    rec["compiled_memory_gib"] = {k: round(getattr(mem, f"{k}_size_in_bytes") / 2 ** 30, 3)
                                  for k in ("argument", "output", "temp", "generated_code")}


def _jax_vae(rec, outpainter, tiny: bool):
    """The Outpainter's VAE work for one window: encode 2F+1 canvas frames and G global frames, decode F."""
    import jax
    import numpy as np

    from m3ddm_jax.sampling.pipeline import Draws

    shape = window_shape(tiny)
    f, s, g = shape["frames"], shape["size"], shape["global_frames"]
    px = s * outpainter.vae_factor
    rng = np.random.default_rng(0)
    frames = rng.uniform(-1, 1, (2 * f + 1, px, px, 3)).astype(np.float32)
    global_frames = rng.uniform(-1, 1, (g, px, px, 3)).astype(np.float32)
    draws = Draws.from_key(0, (s, s), (s, s))
    latents = rng.standard_normal((f, s, s, 4)).astype(np.float32)

    def run():
        outpainter.encode(lambda a, b: frames[a:b], len(frames), draws.vae_local)
        jax.block_until_ready(outpainter.global_tokens(global_frames, draws.vae_global))
        outpainter.decode(latents)

    t0 = time.perf_counter()
    run()
    rec["vae_first_s"] = round(time.perf_counter() - t0, 2)
    rec["vae_s"] = _median(_timed(run, 2))
    rec["median_window_with_vae_s"] = round(rec["median_window_s"] + rec["vae_s"], 4)


# ------------------------------------------------------------------------------------- FLOPs and peak


def matmul_peak(n: int, repeats: int = 5, calls: int = 10) -> dict:
    """Dense bf16 matmul rate of an n^3 product on random data (three input pairs in turn, so no call reads
    what the last one left in the cache); the median over `repeats` runs of `calls` back-to-back products."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 6)
    mats = [jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys]
    matmul = jax.jit(lambda a, b: a @ b)
    for i in range(3):
        matmul(mats[2 * i], mats[2 * i + 1]).block_until_ready()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [matmul(mats[2 * (i % 3)], mats[2 * (i % 3) + 1]) for i in range(calls)]
        jax.block_until_ready(outs)
        rates.append(2 * n ** 3 * calls / (time.perf_counter() - t0))
    return {"n": n, "tflops_per_s": round(statistics.median(rates) / 1e12, 2),
            "all_tflops_per_s": [round(r / 1e12, 2) for r in rates]}


def guided_step_flops(tiny: bool) -> int:
    """Analytic FLOPs (m3ddm_jax.flops: matmuls and convolutions) of one guided step of the window call, on
    shapes only: the same sampler with attention as plain matmuls (the counter cannot see inside a fused
    kernel), over its steps."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from outpaint import PRESETS
    from m3ddm_jax import pretrained
    from m3ddm_jax.sampling.settings import SamplerSettings
    from m3ddm_jax.sampling.window import WindowSampler, call_spec, window_mesh

    shape = window_shape(tiny)
    settings = SamplerSettings(steps=shape["steps"])
    unet = pretrained.abstract_model(dataclasses.replace(
        PRESETS["tiny" if tiny else "full"][0], dtype=settings.compute_dtype(jax.default_backend()),
        attention_impl="xla"))
    sampler = WindowSampler(unet, pretrained.SD15_SCHEDULER_CONFIG, steps=settings.steps,
                            scheduler=settings.scheduler, guidance_scale=settings.guidance_scale,
                            global_guidance_scale=settings.global_guidance_scale)
    s, g = shape["size"], shape["global_frames"]
    graphdef, params = nnx.split(unet)
    tokens = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p).encode_global(x, 1), params,
                            jax.ShapeDtypeStruct((g, s, s, 4), jnp.float32))
    inputs, noise = call_spec(window_mesh(jax.local_devices()[:1]), 1, (s, s), 4, tokens)
    return sampler.flops(params, inputs, noise) // sampler.steps


def section_step_flops(rec: Recorder, args) -> None:
    import jax

    dev = jax.devices()[0]
    rec["device"] = f"{dev.platform}:{dev.device_kind}"
    rec["matmul_peak"] = rec.part("matmul_peak", matmul_peak, 1024 if args.tiny else 8192)
    flops = rec.part("analytic", guided_step_flops, args.tiny)
    if flops is None:
        return
    rec["analytic_flops_per_step"] = flops
    sections = _read_results(args.out).get("sections", {})
    window = next((w for w in (sections.get("window_jax", {}), sections.get("window_jax_xla", {}))
                   if w.get("median_step_s")), {})
    step_s = window.get("median_step_s")
    if step_s:
        achieved = flops / step_s
        rec["median_step_s"] = step_s
        rec["achieved_tflops_per_s"] = float(f"{achieved / 1e12:.4g}")
        if rec.data.get("matmul_peak"):
            rec["share_of_matmul_peak"] = round(achieved / 1e12 / rec.data["matmul_peak"]["tflops_per_s"], 4)
        compiled = (window.get("compiled_per_step") or {}).get("flops")
        if compiled:
            rec["compiled_flops_per_step"] = compiled
            rec["compiled_over_analytic"] = round(compiled / flops, 3)


# ------------------------------------------------------------------------------------------ the demo


def section_demo_training(rec: Recorder, args) -> None:
    """Issue 14: the demo's curve of validation PSNR against steps, through the real entry point."""
    workdir = os.path.join(args.scratch, "demo_run")
    shutil.rmtree(workdir, ignore_errors=True)
    overrides = [f"--config.total_steps={args.demo_steps}", f"--config.validation.every={args.demo_val_every}",
                 "--config.log_every=50", f"--config.checkpoint_every={10 ** 9}", "--config.sample.videos=()",
                 f"--config.data.worker_count={args.demo_workers}",
                 f"--config.compilation_cache={os.path.join(args.scratch, 'demo_cache')}"]
    if args.tiny:
        overrides += ["--config.validation.clips=1", "--config.validation.timesteps=1", "--config.sampler.steps=2",
                      "--config.log_every=2"]
    cmd = [sys.executable, "-m", "m3ddm_jax.train", "--config", os.path.join(REPO, "configs", "demo.py"),
           "--workdir", workdir, *overrides]
    rec["command"] = " ".join(cmd[1:])
    metrics = os.path.join(workdir, "metrics.jsonl")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(rec.left() - 8, 10))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "stopped at the section's budget"
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["exit"] = rc
    if not os.path.isfile(metrics):
        rec["note"] = "no metrics.jsonl was written"
        return
    from m3ddm_jax.training.validation import GROUP

    shutil.copy(metrics, os.path.join(args.out, "demo_metrics.jsonl"))
    with open(metrics) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    train = [r for r in lines if "group" not in r]
    rec["validation"] = [{k: r.get(k) for k in ("step", "val_loss", "val_psnr_generated", "estimate_psnr_generated",
                                                 "telea_psnr_generated", "val_ssim_generated", "telea_ssim_generated",
                                                 "val_seconds")}
                         for r in lines if r.get("group") == GROUP]
    if train:
        rec["last_train"] = train[-1]
        rec["steps_per_sec"] = train[-1].get("steps_per_sec")


# ----------------------------------------------------------------------------------- the train step


def section_train_step(rec: Recorder, args) -> None:
    import jax
    import numpy as np
    from flax import nnx

    import train_step as bench_train  # bench/train_step.py
    from m3ddm_jax import configlib, sharding
    from m3ddm_jax.training.trainer import build_trainer, global_batch

    base = configlib.load_config(os.path.join(REPO, "configs", "test_tiny.py" if args.tiny else "m3ddm_sd15_256.py"))
    base.data.worker_count = 0
    peak = (_read_results(args.out).get("sections", {}).get("step_flops", {}).get("matmul_peak") or {}).get(
        "tflops_per_s")
    dev = jax.devices()[0]
    rec["setup"] = {"config": "configs/test_tiny.py" if args.tiny else "configs/m3ddm_sd15_256.py",
                    "device": f"{dev.platform}:{dev.device_kind}", "dtype": base.compute_dtype, "remat": base.remat,
                    "clip": base.data.clip.to_dict(), "peak_tflops": peak, "peak_source": "measured" if peak else None}
    if not peak:
        peak = bench_train.device_peak(dev.device_kind)
        rec["setup"] = {**rec.data["setup"], "peak_tflops": peak, "peak_source": "vendor (bench/train_step.py)"}
    codec, unet = bench_train.benchmark_models(base, abstract=False)
    runs = {}

    def run(batch_size: int) -> dict:
        cfg = base.copy_and_resolve_references()
        cfg.data.global_batch_size = batch_size
        mesh = sharding.make_mesh(cfg.mesh.to_dict())
        trainer = build_trainer(cfg, mesh, codec=codec, unet=unet)
        batch = global_batch(bench_train.synthetic_batch(cfg, trainer.codec, "pixels"), mesh)
        t0 = time.perf_counter()
        compiled = trainer.step_fn.lower(trainer.state, trainer.codec_state, batch).compile()
        out = {"compile_s": round(time.perf_counter() - t0, 2)}
        mem = compiled.memory_analysis()
        out["plan_gib"] = {k: round(getattr(mem, f"{k}_size_in_bytes") / 2 ** 30, 2)
                           for k in ("argument", "output", "alias", "temp")}
        runs[batch_size] = out
        rec["runs"] = runs
        carry = list(compiled(trainer.state, trainer.codec_state, batch))  # warm-up; then (state, metrics)

        def step():
            carry[:] = compiled(carry[0], trainer.codec_state, batch)
            jax.block_until_ready(carry[1])

        jax.block_until_ready(carry[1])
        times = _timed(step, args.train_iters)
        state, metrics = carry
        out.update(median_step_s=round(statistics.median(times), 5), step_s=[round(t, 5) for t in times],
                   loss=float(np.asarray(metrics["loss"])) if "loss" in metrics else None, fits=True)
        stats = dev.memory_stats() or {}
        out["peak_memory_gib"] = round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2) or None
        rec["runs"] = runs
        if batch_size == 1:  # what the FLOP count needs, kept for the end
            abstract = jax.eval_shape(lambda s: s, state)  # the step donates its state: shapes only
            flop_args[:] = [cfg, nnx.merge(trainer.graphdef, abstract.params, abstract.rest).config, trainer.codec,
                            abstract, trainer.codec_state, batch]
        return out

    flop_args = []
    one = run(1)
    total = (dev.memory_stats() or {}).get("bytes_limit")
    if total:
        fixed = (one["plan_gib"]["argument"] + one["plan_gib"]["output"] - one["plan_gib"]["alias"]) * 2 ** 30
        per_clip = max(one["plan_gib"]["temp"] * 2 ** 30, 1)
        rec["memory_limit_gib"] = round(total / 2 ** 30, 2)
        rec["predicted_max_batch"] = int((total - fixed) // per_clip)
    predicted = rec.data.get("predicted_max_batch") or 8
    candidates = [b for b in (64, 32, 16, 8, 4, 2) if b <= max(predicted, 2)][:3] if not args.tiny else [2]
    largest = 1
    for b in candidates:
        if rec.left() < one["compile_s"] + 15:
            rec["batch_search"] = f"stopped before batch {b}: the section's time is short"
            break
        try:
            run(b)
            largest = b
            break  # the candidates go down: the first that fits is the largest tried
        except Exception as err:  # noqa: BLE001 - out of memory is a result
            runs[b] = {"fits": False, "error": str(err).splitlines()[0][:500]}
            rec["runs"] = runs
            jax.clear_caches()
    rec["largest_batch_fitting"] = largest
    # Last, as it only traces (CPU): the same figures come from `python bench/train_step.py --config
    # configs/m3ddm_sd15_256.py --flops_only --config.data.global_batch_size=1` on any machine.
    model, hw = bench_train.step_flops(*flop_args)
    f = rec["flops_per_clip"] = {"model": model, "hardware": hw}
    for b, r in runs.items():
        if r.get("median_step_s") and f:
            r["mfu"] = round(f["model"] * b / r["median_step_s"] / (peak * 1e12), 4) if peak else None
            r["hfu"] = round(f["hardware"] * b / r["median_step_s"] / (peak * 1e12), 4) if peak else None
            r["clips_per_s"] = round(b / r["median_step_s"], 3)
    rec["runs"] = runs


# -------------------------------------------------------------------------------------- the video


def section_video(rec: Recorder, args) -> None:
    """A 100-frame video end to end with random full-size weights: decode, outpaint, encode."""
    from m3ddm_jax.pretrained import SD15_SCHEDULER_CONFIG
    from m3ddm_jax.sampling import Outpainter
    from m3ddm_jax.sampling.settings import SamplerSettings
    from m3ddm_jax.video import read_video, write_video

    frames = 50 if args.tiny else args.video_frames
    settings = SamplerSettings(steps=window_shape(args.tiny)["steps"], windows_per_call=1,
                               **({"canvas_mode": "native", "canvas_size": 64, "global_size": (64, 64)}
                                  if args.tiny else {}))
    rec["setup"] = {"video": os.path.basename(VIDEO), "frames": frames, "ratio": "9:16",
                    "settings": settings.to_dict(),
                    "note": "windows_per_call=1: the window call compiled by window_jax comes from the persistent "
                            "cache; the default (4 per device) would compile 2 more shapes"}
    unet, vae = full_models(args.tiny)
    outpainter = Outpainter(unet, vae, SD15_SCHEDULER_CONFIG, settings)
    out_path = os.path.join(args.scratch, "video_out.mp4")

    def end_to_end() -> dict:
        t0 = time.perf_counter()
        video = read_video(VIDEO, max_frames=frames)
        t1 = time.perf_counter()
        result = outpainter.outpaint(video.frames, video.fps, "9:16")
        t2 = time.perf_counter()
        write_video(out_path, result.frames, video.fps)
        t3 = time.perf_counter()
        return {"decode_s": round(t1 - t0, 3), "outpaint_s": round(t2 - t1, 3), "encode_s": round(t3 - t2, 3),
                "total_s": round(t3 - t0, 3), "frames": len(result.frames), "windows": len(result.plan.windows),
                "frames_per_s": round(len(result.frames) / (t3 - t0), 3),
                **{f"outpaint_{k}_s": round(v, 3) for k, v in result.timings.items()}}

    rec["first_run"] = end_to_end()
    if rec.left() > rec.data["first_run"]["total_s"] * 1.3 + 5:
        rec["second_run"] = end_to_end()


# ------------------------------------------------------------------------------------------- driver


CHILDREN = {"window_official": section_window_official, "window_jax": section_window_jax,
            "window_jax_xla": lambda rec, args: section_window_jax(rec, args, attention="xla"),
            "step_flops": section_step_flops, "demo_training": section_demo_training,
            "train_step": section_train_step, "video": section_video}


def _read_results(out: str) -> dict:
    path = os.path.join(out, RESULTS)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def versions() -> dict:
    from importlib import metadata

    names = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
             "grain", "ml-collections", "av", "numpy", "torch", "diffusers", "transformers", "huggingface-hub")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["python"] = sys.version.split()[0]
    found["flax_path"] = _module_path("flax")
    return found


def _module_path(name: str) -> str | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def gpu_info() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                               "power.limit,temperature.gpu", "--format=csv"], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def summary(results: dict) -> dict:
    s = results["sections"]
    o, j = s.get("window_official", {}), s.get("window_jax", {})
    if not j.get("median_window_s") and s.get("window_jax_xla", {}).get("median_window_s"):
        j = s["window_jax_xla"]
        out_note = "JAX figures from window_jax_xla (attention xla): window_jax failed"
    else:
        out_note = None
    out = {"note": out_note} if out_note else {}
    if o.get("median_window_s") and j.get("median_window_s"):
        out["window_official_over_jax"] = round(o["median_window_s"] / j["median_window_s"], 3)
    if o.get("median_window_with_vae_s") and j.get("median_window_with_vae_s"):
        out["window_with_vae_official_over_jax"] = round(o["median_window_with_vae_s"] / j["median_window_with_vae_s"], 3)
    for key, sec, field in (("official_window_s", o, "median_window_s"), ("jax_window_s", j, "median_window_s"),
                            ("jax_compile_s", j, "compile_s"),
                            ("step_share_of_matmul_peak", s.get("step_flops", {}), "share_of_matmul_peak"),
                            ("step_tflops_per_s", s.get("step_flops", {}), "achieved_tflops_per_s"),
                            ("matmul_peak", s.get("step_flops", {}), "matmul_peak"),
                            ("demo_validation", s.get("demo_training", {}), "validation"),
                            ("train_largest_batch", s.get("train_step", {}), "largest_batch_fitting"),
                            ("train_runs", s.get("train_step", {}), "runs"),
                            ("video_second_run", s.get("video", {}), "second_run")):
        if sec.get(field) is not None:
            out[key] = sec[field]
    return out


def run_sections(args) -> dict:
    start = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.scratch, exist_ok=True)
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
               "deadline_s": args.deadline, "tiny": args.tiny, "versions": versions(), "nvidia_smi": gpu_info(),
               "sections": {}, "status": {}}
    _write_json(os.path.join(args.out, RESULTS), results)
    # Children share compiled programs through this cache (the video reuses the window call).
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(args.scratch, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="2", PYTHONUNBUFFERED="1")
    budgets = dict(SECTIONS)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        budgets[name] = (float(seconds), budgets[name][1])
    for name in args.sections.split(","):
        cap, least = budgets[name]
        left = args.deadline - (time.monotonic() - start) - 5
        budget = min(cap, left)
        if name == "window_jax_xla" and results["sections"].get("window_jax", {}).get("median_window_s"):
            results["status"][name] = "not needed: window_jax has its time per window"
            continue
        if budget < least and not args.tiny:
            results["status"][name] = f"skipped: {left:.0f} s left, the section needs {least} s"
            _log(results["status"][name])
            continue
        if args.tiny:
            budget = max(budget, 600)
        partial = os.path.join(args.scratch, f"{name}.json")
        if os.path.exists(partial):
            os.remove(partial)
        child_env = dict(env)
        if name == "train_step":  # the largest batch needs (nearly) all the memory
            child_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.95"
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--partial", partial,
               "--child-budget", str(budget), *args.passthrough]
        _log(f"section {name}: budget {budget:.0f} s")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=child_env, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
            status = "ok" if rc == 0 else f"failed, exit status {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"stopped at its budget of {budget:.0f} s"
        try:
            with open(partial) as f:
                results["sections"][name] = json.load(f)
        except (OSError, ValueError):
            results["sections"][name] = {}
        if results["sections"][name].get("errors"):
            status += f"; tracebacks of {', '.join(results['sections'][name]['errors'])} under errors"
        results["sections"][name]["section_wall_s"] = round(time.monotonic() - t0, 1)
        results["status"][name] = status
        results["summary"] = summary(results)
        results["elapsed_s"] = round(time.monotonic() - start, 1)
        _write_json(os.path.join(args.out, RESULTS), results)
        _log(f"section {name}: {status} after {time.monotonic() - t0:.0f} s")
    print(json.dumps({"status": results["status"], "summary": results.get("summary", {})}, indent=2, default=str))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where results.json and demo_metrics.jsonl go ($OUT)")
    p.add_argument("--deadline", type=float, default=470, help="seconds for all sections together")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, run in this order")
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS", help="a section's cap")
    p.add_argument("--tiny", action="store_true", help="tiny models and shapes (CPU smoke test)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per side after the warm-up window")
    p.add_argument("--official", default=OFFICIAL, help="a clone of the official code")
    p.add_argument("--demo-steps", type=int, default=8000, help="the demo's total_steps (the budget stops it)")
    p.add_argument("--demo-val-every", type=int, default=500)
    p.add_argument("--demo-workers", type=int, default=4, help="the demo's data.worker_count")
    p.add_argument("--train-iters", type=int, default=5, help="timed train steps per batch size")
    p.add_argument("--video-frames", type=int, default=100)
    p.add_argument("--scratch", default="/tmp/gpu_bench", help="work folder (caches, the demo's run)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--partial", help=argparse.SUPPRESS)
    p.add_argument("--child-budget", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.tiny:
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        rec = Recorder(args.partial, args.child_budget)
        rec.part(args.child, CHILDREN[args.child], rec, args)
        return
    if args.tiny:
        args.demo_steps, args.demo_val_every = min(args.demo_steps, 4), min(args.demo_val_every, 2)
    args.passthrough = ["--out", args.out, "--repeats", str(args.repeats), "--official", args.official,
                        "--demo-steps", str(args.demo_steps), "--demo-val-every", str(args.demo_val_every),
                        "--demo-workers", str(args.demo_workers), "--train-iters", str(args.train_iters),
                        "--video-frames", str(args.video_frames), "--scratch", args.scratch,
                        *(["--tiny"] if args.tiny else [])]
    run_sections(args)


if __name__ == "__main__":
    main()
