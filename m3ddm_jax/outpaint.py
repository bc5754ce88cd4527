"""Outpaint one video to another aspect ratio.

    python -m m3ddm_jax.outpaint INPUT --ratio 9:16 --output OUT.mp4 --weights DIR [--seed 0] [--steps 50]
        [--mode official|native] [--canvas-size 256] [--global-size 256x256] [--guidance 2]
        [--global-guidance 4] [--scheduler pndm|ddim] [--dtype auto] [--attention auto]

DIR is a weights folder (tools/convert_checkpoint.py: a converted checkpoint or an exported training run);
it defaults to $M3DDM_WEIGHTS. The output has exactly as many frames as the input, at its frame rate, with
its audio; it is written atomically (the same frames give the same file). A video cut short (fewer frames
decode than its container declares) is outpainted with the frames that decode, with a warning. Modes:
'official' reproduces the official pipeline (a square canvas of at most 256 pixels, cropped to the ratio);
'native' generates on a canvas shaped like the ratio and keeps the source pixels at full resolution. The flags are the sampler settings (m3ddm_jax/sampling/settings.py); an
unset flag keeps the settings' default, the official value.
"""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from m3ddm_jax import pretrained
from m3ddm_jax.models.attention import NAMES as ATTENTION_NAMES
from m3ddm_jax.pretrained import WEIGHTS_ENV, check_weights_folder
from m3ddm_jax.sampling.pipeline import Outpainter, canvas_multiple, make_layout
from m3ddm_jax.sampling.settings import CANVAS_MODES, DTYPES, SCHEDULERS, SamplerSettings
from m3ddm_jax.video import parse_ratio, read_video, write_video
from m3ddm_jax.video.io import check_output_file

# flag -> SamplerSettings field; the defaults and the checks are the settings'.
SETTINGS_FLAGS = {"seed": "seed", "steps": "steps", "strength": "strength", "mode": "canvas_mode",
                  "canvas_size": "canvas_size",
                  "global_size": "global_size", "guidance": "guidance_scale",
                  "global_guidance": "global_guidance_scale", "scheduler": "scheduler", "dtype": "dtype",
                  "attention": "attention", "windows_per_call": "windows_per_call",
                  "exact_branches": "exact_branches"}


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size HEIGHTxWIDTH (e.g. 256x256)") from None
    return h, w


def check_layout(weights: str, source_hw: tuple[int, int], ratio: str, settings: SamplerSettings) -> None:
    """Fails fast, from the weights folder's configs alone, on a ratio or canvas its model cannot take."""
    unet, latent = (pretrained.read_config(os.path.join(weights, sub)) for sub in (pretrained.UNET, pretrained.VAE))
    multiple = canvas_multiple(unet, latent)
    layout = make_layout(source_hw, ratio, settings.canvas_mode, canvas_size=settings.canvas_size, multiple=multiple)
    ch, cw = layout.canvas_hw
    if ch % multiple or cw % multiple:  # only the official canvas, sized by the frame, can miss the multiple
        raise ValueError(f"official canvas: a {source_hw[0]}x{source_hw[1]} frame extended to {ratio} gives a "
                         f"{ch}x{cw} canvas, but this model needs sides that are a multiple of {multiple} pixels; "
                         f"use the native canvas (--mode native)")


def parse_args(argv=None) -> argparse.Namespace:
    d = SamplerSettings()
    p = argparse.ArgumentParser(prog="python -m m3ddm_jax.outpaint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="the video to outpaint (any format FFmpeg reads)")
    p.add_argument("--ratio", required=True, help="target aspect ratio, width:height (9:16), 9/16 or 0.5625")
    p.add_argument("--output", required=True, help="the mp4 to write (H.264, with the input's audio)")
    p.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV), help=f"weights folder (default ${WEIGHTS_ENV})")
    p.add_argument("--seed", type=int, help=f"seeds every random draw (default {d.seed})")
    p.add_argument("--steps", type=int, help=f"denoising steps per window (default {d.steps}, as officially)")
    p.add_argument("--strength", type=float, help="start partway: from the TELEA-inpainted init noised to the last "
                                                  f"strength x steps timesteps (img2img; default {d.strength:g}: "
                                                  "from noise, as officially)")
    p.add_argument("--mode", choices=CANVAS_MODES, help=f"canvas mode (default {d.canvas_mode})")
    p.add_argument("--canvas-size", type=int, help="native mode: the canvas's long side in pixels, a multiple of "
                                                   f"64 (default {d.canvas_size})")
    p.add_argument("--global-size", type=_size, help="HEIGHTxWIDTH the global frames are resized to (default "
                                                     f"{d.global_size[0]}x{d.global_size[1]}, as officially)")
    p.add_argument("--guidance", type=float, help="guidance scale of the masked-frame condition (official "
                                                  f"guidance_scale, default {d.guidance_scale:g})")
    p.add_argument("--global-guidance", type=float,
                   help="guidance scale of the global-frame condition (official previous_guidance_scale, default "
                        f"{d.global_guidance_scale:g}); <= 1 gives 2-way guidance")
    p.add_argument("--scheduler", choices=SCHEDULERS, help=f"sampler (default {d.scheduler}, as officially)")
    p.add_argument("--dtype", choices=DTYPES, help="UNet compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU "
                                                   f"(default {d.dtype})")
    p.add_argument("--attention", choices=ATTENTION_NAMES, help=f"attention kernel (default {d.attention})")
    p.add_argument("--windows-per-call", type=int, help="most windows per sampler call (default 4 per device)")
    p.add_argument("--exact-branches", action="store_true", default=None,
                   help="evaluate the 4th guidance branch the official code computes and discards (same result)")
    return p.parse_args(argv)


def _flag(name: str, value) -> str:
    return f"--{name.replace('_', '-')} {value}"


def settings_from_args(args: argparse.Namespace) -> SamplerSettings:
    """The settings the flags give; a bad value is an error naming its flag (the flags that are bad alone, else
    every flag given: a combination is at fault)."""
    given = {flag: getattr(args, flag) for flag in SETTINGS_FLAGS if getattr(args, flag) is not None}
    try:
        return SamplerSettings(**{SETTINGS_FLAGS[flag]: value for flag, value in given.items()})
    except ValueError as err:
        def bad_alone(flag: str) -> bool:
            try:
                SamplerSettings(**{SETTINGS_FLAGS[flag]: given[flag]})
            except ValueError:
                return True
            return False

        culprits = [flag for flag in given if bad_alone(flag)] or list(given)
        raise ValueError(f"{', '.join(_flag(f, given[f]) for f in culprits)}: {err}") from err


def run(args: argparse.Namespace) -> None:
    # Cheap checks first: a bad argument should not cost a model load or a video decode.
    settings = settings_from_args(args)
    parse_ratio(args.ratio)
    check_output_file(args.output, "--output")
    weights = check_weights_folder(args.weights)
    settings.check_steps(pretrained.read_scheduler_config(weights), _flag("steps", settings.steps))
    video = read_video(args.input)
    try:
        check_layout(weights, video.frames.shape[1:3], args.ratio, settings)
    except ValueError as err:
        raise ValueError(f"{args.input}: {err}") from err
    if video.truncated:
        print(f"warning: {video.truncation}; outpainting the {len(video.frames)} frames that decode", file=sys.stderr)
    outpainter = Outpainter.from_folder(weights, settings)
    with tqdm(desc=os.path.basename(args.input), unit="step", file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = outpainter.outpaint(video.frames, video.fps, args.ratio, progress=progress)
    write_video(args.output, result.frames, video.fps, audio_from=video if video.has_audio else None)
    n, h, w = result.frames.shape[:3]
    t = result.timings
    cut = f" (truncated input: its container declares {video.declared_frames})" if video.truncated else ""
    print(f"{args.output}: {n} frames of {w}x{h} in {t['total']:.1f} s (VAE {t['vae']:.1f} s, UNet {t['unet']:.1f} s)"
          f"{cut}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
