"""Benchmark: outpainting one video end to end, the jitted window loop against a Python-loop baseline.

For each loop ('scan': the whole denoising loop of a window batch in one jitted call; 'python': the same
steps driven from the host, one jitted UNet+guidance+sampler call per step) the video is outpainted once
with compilation, then `--repeats` times in the steady state (loops alternating; the median run is reported). Times are split into VAE (encoding the
canvas and global frames, decoding), UNet (sampler calls) and overhead (canvas, TELEA inpainting,
gathering window inputs, compositing).

    python bench/outpaint.py --preset tiny --frames 50 --steps 5 --mode native --canvas-size 64 --global-size 64  # CPU
    python bench/outpaint.py --preset full --frames 50 --steps 50 --dtype bfloat16                    # GPU/TPU
    python bench/outpaint.py --weights out/m3ddm_tiny ...                                             # converted folder
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from m3ddm_jax import pretrained  # noqa: E402
from m3ddm_jax.models.layers import random_init  # noqa: E402
from m3ddm_jax.models.unet3d import UNet3DConfig  # noqa: E402
from m3ddm_jax.models.vae import VAEConfig  # noqa: E402
from m3ddm_jax.sampling import Outpainter  # noqa: E402
from m3ddm_jax.sampling.settings import SamplerSettings  # noqa: E402
from m3ddm_jax.video import read_video  # noqa: E402
from report import report  # noqa: E402

DEFAULT_VIDEO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "videos",
                             "stream_of_water.mp4")
PRESETS = {
    # The fixtures' tiny official UNet and VAE architectures.
    "tiny": (UNet3DConfig(block_out_channels=(16, 32, 32, 32), attention_heads=2, norm_num_groups=8),
             VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)),
    # The released M3DDM UNet (1.3B parameters) and SD 1.5's VAE.
    "full": (UNet3DConfig(), VAEConfig.sd15()),
}


def models(args):
    """(unet, vae, scheduler config): a converted folder, or random parameters of a preset's shapes."""
    if args.weights:
        w = pretrained.load_weights(args.weights)
        return w.unet, w.vae, w.scheduler_config
    unet_config, vae_config = PRESETS[args.preset]
    unet = random_init(pretrained.abstract_model(unet_config))
    return unet, random_init(pretrained.abstract_model(vae_config)), pretrained.SD15_SCHEDULER_CONFIG


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    src.add_argument("--weights", help="a converted weights folder (tools/convert_checkpoint.py)")
    p.add_argument("--video", default=DEFAULT_VIDEO)
    p.add_argument("--frames", type=int, default=50, help="first N frames of the video (>= 50: strides 15/5/1)")
    p.add_argument("--ratio", default="9:16")
    p.add_argument("--mode", choices=("official", "native"), default="native")
    p.add_argument("--canvas-size", type=int, default=256, help="native canvas long side")
    p.add_argument("--global-size", type=int, default=256,
                   help="side the 16 global frames are resized to (official 256: 3136 tokens per row)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--windows-per-call", type=int, default=None)
    p.add_argument("--loops", default="scan,python", help="comma-separated: scan, python")
    p.add_argument("--repeats", type=int, default=3, help="steady-state runs per loop (the median is reported)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)

    video = read_video(args.video, max_frames=args.frames)
    n = len(video.frames)
    unet, vae, scheduler_config = models(args)
    device = jax.devices()[0]
    result = {"device": f"{device.platform}:{device.device_kind} x{jax.device_count()}",
              "model": args.weights or args.preset, "dtype": args.dtype, "video": os.path.basename(args.video),
              "frames": n, "source_hw": list(video.frames.shape[1:3]), "ratio": args.ratio, "mode": args.mode,
              "global_size": args.global_size, "steps": args.steps, "runs": {}}
    loops = args.loops.split(",")
    settings = SamplerSettings(steps=args.steps, canvas_mode=args.mode, canvas_size=args.canvas_size,
                               global_size=(args.global_size,) * 2, dtype=args.dtype,
                               windows_per_call=args.windows_per_call or 0)
    outpainters = {loop: Outpainter(unet, vae, scheduler_config, settings, loop=loop) for loop in loops}

    def run(loop):
        return outpainters[loop].outpaint(video.frames, video.fps, args.ratio)

    first = {loop: run(loop) for loop in loops}
    # Steady state: the loops alternate, so that load from other jobs on a shared host hits both alike.
    warm = {loop: [] for loop in loops}
    for _ in range(args.repeats):
        for loop in loops:
            warm[loop].append(run(loop).timings)
    some = first[loops[0]]
    result.update(canvas_hw=list(some.layout.canvas_hw), windows=len(some.plan.windows),
                  sampler_calls=sum(len(outpainters[loops[0]].split_batch(b)) for b in some.plan.batches()),
                  repeats=args.repeats)
    for loop in loops:
        t = sorted(warm[loop], key=lambda t: t["total"])[len(warm[loop]) // 2]  # the median run
        result["runs"][loop] = {
            "first_run_s": round(first[loop].timings["total"], 2),
            "total_s": round(t["total"], 3), "vae_s": round(t["vae"], 3), "unet_s": round(t["unet"], 3),
            "overhead_s": round(t["total"] - t["vae"] - t["unet"], 3), "frames_per_s": round(n / t["total"], 3),
        }
    return report(result, args.json)


if __name__ == "__main__":
    main()
