"""Convert PyTorch checkpoints into an m3ddm_jax weights folder (see m3ddm_jax/pretrained.py).

    python tools/convert_checkpoint.py m3ddm --src DIR --dst OUT [--vae SD_VAE_DIR]
    python tools/convert_checkpoint.py sd --src SD_DIR_OR_FILE --dst SD_OUT [--unet-config F --vae-config F]
    python tools/convert_checkpoint.py inflate --src SD_OUT --dst M3DDM_INIT [--config F] [--seed N]
    python tools/convert_checkpoint.py export --src RUN_DIR --dst OUT [--step N] [--params ema|raw]

`m3ddm`: the authors' released UNet (a folder with config.json and diffusion_pytorch_model.{safetensors,bin},
or a weights file with --config), plus the Stable Diffusion VAE (a diffusers vae/ folder, or a weights
file with --vae-config). OUT then holds everything the outpainting CLI needs.

`sd`: Stable Diffusion 1.x, a diffusers folder (unet/, vae/, scheduler/) or an original .ckpt/.safetensors
(SD 1.5's configs unless --unet-config/--vae-config name diffusers config.json files). SD_OUT holds the SD
UNet (the 3D UNet's 2D mode), the VAE and the scheduler config.

`inflate`: an `sd` folder -> the initial M3DDM UNet (see m3ddm_jax/convert/inflate.py), with the same VAE
and scheduler. --config is a JSON file of UNet3DConfig fields that override the inflated config.
conversion.json in the output folder reports how every tensor started.

`export`: a training run (the --workdir of `python -m m3ddm_jax.train`) -> OUT with the trained UNet (EMA
parameters by default, of the newest complete checkpoint by default), the latent space the run trained in
(the SD VAE, or the demo's pixel space) and its noise schedule; see m3ddm_jax/training/export.py. Any mesh or
number of processes may have written the checkpoint; export reads it on one CPU host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m3ddm_jax import pretrained  # noqa: E402
from m3ddm_jax.convert import inflate, m3ddm, sd  # noqa: E402
from m3ddm_jax.convert.sources import find_weights, open_state_dict  # noqa: E402
from m3ddm_jax.convert.vae import load_vae_folder, vae_from_torch  # noqa: E402
from m3ddm_jax.models.vae import VAEConfig  # noqa: E402
from m3ddm_jax.training import export  # noqa: E402


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


def _read_json(path: str | None) -> dict | None:
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def convert_sd(args) -> dict:
    t0 = time.time()
    weights, report = sd.load_stable_diffusion(args.src, unet_config=_read_json(args.unet_config),
                                               vae_config=_read_json(args.vae_config))
    report["unet_values"], report["vae_values"] = _count(weights.unet), _count(weights.vae)
    pretrained.save_weights(args.dst, unet=weights.unet, vae=weights.vae, scheduler_config=weights.scheduler_config,
                            report=report, overwrite=args.overwrite)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.dst} in {time.time() - t0:.1f} s: SD UNet {report['unet_values']:,} values, "
          f"VAE {report['vae_values']:,} values")
    return report


def convert_inflate(args) -> dict:
    t0 = time.time()
    weights = pretrained.load_weights(args.src)
    config = inflate.inflated_config(weights.unet.config, **(_read_json(args.config) or {}))
    unet, entries = inflate.inflate(weights.unet, config, seed=args.seed)
    report = {"source": os.path.abspath(args.src), **inflate.report(entries, config, args.seed)}
    pretrained.save_weights(args.dst, unet=unet, vae=weights.vae, scheduler_config=weights.scheduler_config,
                            report=report, overwrite=args.overwrite)
    print(report["property"])
    for what, row in report["summary"].items():
        print(f"  {what}: {row['tensors']} tensors, {row['values']:,} values")
    print(f"wrote {args.dst} in {time.time() - t0:.1f} s; every tensor is listed in "
          f"{os.path.join(args.dst, 'conversion.json')}")
    return report


def run_export(args) -> dict:
    t0 = time.time()
    report = export.export(args.src, args.dst, step=args.step, params=args.params, overwrite=args.overwrite)
    print(f"wrote {args.dst} in {time.time() - t0:.1f} s: step {report['step']} ({args.params} parameters, "
          f"{report['unet_values']:,} values), latent space {report['latent_space']}")
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

    p = sub.add_parser("sd", help="Stable Diffusion 1.x (diffusers folder or original single file)")
    p.add_argument("--src", required=True, help="diffusers folder (unet/, vae/, scheduler/) or .ckpt/.safetensors")
    p.add_argument("--unet-config", help="diffusers unet config.json for a single file (default: SD 1.5's)")
    p.add_argument("--vae-config", help="diffusers vae config.json for a single file (default: SD 1.5's)")
    p.add_argument("--dst", required=True, help="output weights folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    p.set_defaults(run=convert_sd)

    p = sub.add_parser("inflate", help="an `sd` weights folder -> the initial M3DDM 3D UNet")
    p.add_argument("--src", required=True, help="weights folder written by the `sd` subcommand")
    p.add_argument("--config", help="JSON file of UNet3DConfig fields overriding the inflated config")
    p.add_argument("--seed", type=int, default=0, help="seed of the newly initialised tensors")
    p.add_argument("--dst", required=True, help="output weights folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    p.set_defaults(run=convert_inflate)

    p = sub.add_parser("export", help="a training run's checkpoint -> a weights folder")
    p.add_argument("--src", required=True, help="the run folder (the --workdir of python -m m3ddm_jax.train)")
    p.add_argument("--step", type=int, help="the checkpoint step (default: the newest complete one)")
    p.add_argument("--params", choices=sorted(export.PARAMS), default="ema",
                   help="the EMA parameters (default) or the raw ones")
    p.add_argument("--dst", required=True, help="output weights folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    p.set_defaults(run=run_export)
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.dst) and not args.overwrite:  # before any tensor is read (minutes for 2.6 GB)
            raise FileExistsError(f"--dst {args.dst} already exists; pass --overwrite to replace it")
        args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
