"""Score a training run's checkpoint on its held-out clips again, with settings changed or not.

    python tools/validate_run.py --run RUN_DIR [--step N] [--params ema|raw] [--out DIR] \
        [--set sampler.steps=5 --set sampler.scheduler=ddim --set "validation.videos=('clip.mp4',)" ...]

The run's own validation (m3ddm_jax/training/validation.py) with the config the run saved in that checkpoint,
so that with no --set the figures are those of the run's metrics.jsonl at that step: val_loss, the sampler's
generated-band PSNR / SSIM, the one-step estimate and the TELEA fill. `--set KEY=VALUE` replaces one
config value first (a Python literal, else a string): the sampler settings (`sampler.*`), the held-out
clips and protocol (`validation.*`). The UNet is the checkpoint's EMA parameters (`--params raw`: the raw
ones), in the latent space of the run's model/ folder, with the noise schedule of the saved config. Prints
one JSON object; with --out, also writes it to DIR/metrics.json and the frame grid to DIR/grid.png.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from m3ddm_jax import fileio, pretrained  # noqa: E402
from m3ddm_jax.sampling.settings import SamplerSettings  # noqa: E402
from m3ddm_jax.train import sample_canvas_multiple  # noqa: E402
from m3ddm_jax.training import export, validation  # noqa: E402


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> None:
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set sampler.steps=5")
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f"--set {item!r}: the run's config has no key {key!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node[leaf] = tuple(value) if isinstance(value, list) else value


def rescore(run_dir: str, step: int | None = None, params: str = "ema", overrides: list[str] = (),
            out: str | None = None) -> dict:
    """The validation record of checkpoint `step` (default: the newest complete one) of the run in `run_dir`."""
    if not os.path.isdir(os.path.join(run_dir, export.MODEL)):
        raise FileNotFoundError(f"{run_dir} is not a training run folder (no {export.MODEL}/); give the --workdir "
                                f"of a run of python -m m3ddm_jax.train")
    step = export.choose_step(run_dir, step)
    cfg = export.run_config(run_dir, step)
    apply_overrides(cfg, list(overrides))
    if not cfg.validation.videos:
        raise ValueError("validation.videos is empty: give held-out clips with --set \"validation.videos=('A.mp4',)\"")
    settings = SamplerSettings.from_config(cfg.sampler)
    validation.check(cfg, settings, sample_canvas_multiple(cfg))
    codec = pretrained.load_model(os.path.join(run_dir, export.MODEL, pretrained.VAE))
    validator = validation.Validator(cfg, codec, settings)
    if out is not None:
        os.makedirs(out, exist_ok=True)
    record = {"run": os.path.abspath(run_dir), "step": step, "params": params, "set": list(overrides),
              **validator(export.restore_unet(run_dir, step, params), out)}
    if out is not None:
        fileio.write_text(os.path.join(out, "metrics.json"), json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run's --workdir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    parser.add_argument("--params", choices=sorted(export.PARAMS), default="ema")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="replace a value of the run's config (repeatable)")
    parser.add_argument("--out", help="folder for metrics.json and grid.png")
    args = parser.parse_args(argv)
    try:
        record = rescore(args.run, args.step, args.params, args.set, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
