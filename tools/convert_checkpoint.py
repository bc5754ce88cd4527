"""Convert PyTorch checkpoints into an m3ddm_jax weights folder (see m3ddm_jax/pretrained.py).

    python tools/convert_checkpoint.py m3ddm --src DIR --dst OUT [--vae SD_VAE_DIR]

`m3ddm`: the authors' released UNet (a folder with config.json and diffusion_pytorch_model.{safetensors,bin},
or a weights file with --config), plus the Stable Diffusion VAE (a diffusers vae/ folder, or a weights
file with --vae-config). OUT then holds everything the outpainting CLI needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m3ddm_jax import pretrained  # noqa: E402
from m3ddm_jax.convert import m3ddm  # noqa: E402
from m3ddm_jax.convert.sources import find_weights, open_state_dict  # noqa: E402
from m3ddm_jax.convert.vae import load_vae_folder, vae_from_torch  # noqa: E402
from m3ddm_jax.models.vae import VAEConfig  # noqa: E402


def _count(model) -> int:
    from flax import nnx
    import jax

    return sum(x.size for x in jax.tree.leaves(nnx.state(model)))


def _load_vae(src: str, config_path: str | None):
    if os.path.isdir(src) and config_path is None:
        return load_vae_folder(src)[1], find_weights(src)
    weights = find_weights(src) if os.path.isdir(src) else src
    config_path = config_path or os.path.join(os.path.dirname(weights), "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no VAE config.json; pass --vae-config")
    with open(config_path) as f:
        return vae_from_torch(open_state_dict(weights), VAEConfig.from_diffusers(json.load(f))), weights


def convert_m3ddm(args) -> dict:
    t0 = time.time()
    weights = find_weights(args.src) if os.path.isdir(args.src) else args.src
    config_path = args.config or os.path.join(os.path.dirname(weights), "config.json")
    source = open_state_dict(weights)
    print(f"UNet: {weights} ({len(source)} tensors)", flush=True)
    unet = m3ddm.unet_from_torch(source, m3ddm.read_official_config(config_path))
    report = {"kind": "m3ddm", "unet": {"source": os.path.abspath(weights), "config": os.path.abspath(config_path),
                                        "tensors": len(source), "values": _count(unet)}}
    vae = None
    if args.vae:
        vae, vae_weights = _load_vae(args.vae, args.vae_config)
        print(f"VAE: {vae_weights}", flush=True)
        report["vae"] = {"source": os.path.abspath(vae_weights), "values": _count(vae)}
    else:
        print("no --vae given: the folder holds the UNet only and cannot outpaint until a VAE is added",
              file=sys.stderr)
    scheduler = None
    if args.scheduler_config:
        with open(args.scheduler_config) as f:
            scheduler = json.load(f)
    pretrained.save_weights(args.dst, unet=unet, vae=vae, scheduler_config=scheduler, report=report,
                            overwrite=args.overwrite)
    print(f"wrote {args.dst} in {time.time() - t0:.1f} s: UNet {report['unet']['values']:,} values"
          + (f", VAE {report['vae']['values']:,} values" if vae is not None else ""))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("m3ddm", help="the authors' released M3DDM UNet (+ SD VAE)")
    p.add_argument("--src", required=True, help="folder with config.json + diffusion_pytorch_model.{safetensors,bin}, "
                                                "or a weights file")
    p.add_argument("--config", help="the UNet's config.json when --src is a file elsewhere")
    p.add_argument("--vae", help="diffusers vae/ folder (config.json + weights), or a weights file")
    p.add_argument("--vae-config", help="the VAE's config.json when --vae is a file elsewhere")
    p.add_argument("--scheduler-config", help="scheduler_config.json (default: Stable Diffusion 1.5's PNDM)")
    p.add_argument("--dst", required=True, help="output weights folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    p.set_defaults(run=convert_m3ddm)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
