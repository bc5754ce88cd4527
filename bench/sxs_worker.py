"""One side of bench/sxs_official.py: a persistent process that loads one UNet, warms it up, then times
calls on request. The driver starts it; it is not meant to be run by hand.

    python bench/sxs_worker.py official --inputs NPZ --weights W --config C --threads N --official REPO
    python bench/sxs_worker.py jax      --inputs NPZ --weights W --config C --threads N [--jax-repo ROOT]
                                        [--attention auto]

Only the standard library and numpy are imported at the top: the official side runs in its own virtual
environment (torch, diffusers 0.18.2; no jax), the JAX side in the project's.

Protocol. Once loaded, compiled and warmed up, the worker writes one JSON line {"ready": info}. Then it
answers each JSON line read from stdin with one line:
  {"cmd": "call", "variant": V}  -> {"seconds": wall time of the call, "peak_rss": peak resident bytes
                                     during the call, "rss_before": resident bytes before it (after
                                     returning freed heap to the system)}
  {"cmd": "finish", "outputs": D} -> saves the last output of each variant as D/V.npy (official layout
                                     (N, 4, F, h, w), float32), replies {"saved": [V, ...]}, exits.
Replies go to the original stdout; whatever the libraries print is sent to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> None:
    """Returns freed heap to the system (glibc keeps it otherwise, and RSS would carry the previous call's
    memory), then sets the peak resident size (VmHWM) back to the current size (Linux >= 4.0)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def official_side(args, inputs):
    """The authors' UNet3DConditionModel, float32, no grad; it encodes the global latents in every call."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    sys.path.insert(0, os.path.join(args.official, "src"))
    from model.unet_3d_condition_video import UNet3DConditionModel

    with open(args.config) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    model = UNet3DConditionModel(**config)
    model.load_state_dict(load_file(args.weights), strict=True)
    model.eval()
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    b, g, dc = (int(inputs[k]) for k in ("b", "g", "do_classfier"))
    f = t["sample"].shape[2]

    def call():
        with torch.inference_mode():
            return model(t["sample"], t["timestep"], b=b, g=g, f=f, is_empty_img=False, do_classfier=dc,
                         encoder_hidden_states=t["encoder_hidden_states"], fps=t["fps"]).sample

    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    return {"official": call}, lambda out: out.numpy(), info


def jax_side(args, inputs):
    """m3ddm_jax's UNet3D, float32, jitted, with the attention kernel `args.attention` ('auto' by default, as
    the sampler runs it). 'jax': global tokens precomputed (as the sampler does once per video);
    'jax_with_encoding': the same encoder work inside every call as the official forward."""
    sys.path.insert(0, args.jax_repo)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import m3ddm_jax
    from m3ddm_jax.convert import m3ddm

    unet = m3ddm.load_official(args.weights, args.config, attention_impl=args.attention)
    graphdef, state = nnx.split(unet)
    b, dc = int(inputs["b"]), int(inputs["do_classfier"])
    if dc not in (1, 2, 4):
        raise ValueError(f"do_classfier={dc}: the official forward knows 1, 2 or 4 branches")

    def encode(unet, latents):
        # The official forward's global batch: zero latents before the real ones (is_empty_img=False).
        zeros = jnp.zeros_like(latents)
        batch = {1: [latents], 2: [zeros, latents], 4: [zeros, zeros, latents, latents]}[dc]
        return unet.encode_global(jnp.concatenate(batch), b * dc)

    def forward(state, sample, t, fps, tokens):
        return nnx.merge(graphdef, state)(sample, t, fps, tokens)

    def forward_with_encoding(state, sample, t, fps, latents):
        unet = nnx.merge(graphdef, state)
        return unet(sample, t, fps, encode(unet, latents))

    sample = jnp.asarray(np.moveaxis(inputs["sample"], 1, -1))
    latents = jnp.asarray(np.moveaxis(inputs["encoder_hidden_states"], 1, -1))
    t, fps = jnp.asarray(inputs["timestep"], jnp.int32), jnp.asarray(inputs["fps"], jnp.float32)
    state = jax.device_put(state)
    tokens = jax.jit(lambda st, x: encode(nnx.merge(graphdef, st), x))(state, latents).block_until_ready()

    variants, info = {}, {"jax": jax.__version__, "m3ddm_jax": os.path.dirname(m3ddm_jax.__file__),
                          "devices": str(jax.devices()), "attention": args.attention, "xla": {}}
    for name, fn, last in (("jax", forward, tokens), ("jax_with_encoding", forward_with_encoding, latents)):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(state, sample, t, fps, last).compile()
        mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info["xla"][name] = {
            "compile_s": round(time.perf_counter() - t0, 2),
            "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes, "generated_code_bytes": mem.generated_code_size_in_bytes,
            "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
            "transcendentals": cost.get("transcendentals")}
        variants[name] = (lambda c, x: lambda: c(state, sample, t, fps, x).block_until_ready())(compiled, last)
    return variants, lambda out: np.moveaxis(np.asarray(out), -1, 1), info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("side", choices=["official", "jax"])
    p.add_argument("--inputs", required=True, help="the driver's npz (official layout)")
    p.add_argument("--weights", required=True, help="official-name safetensors")
    p.add_argument("--config", required=True, help="official config.json")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant before 'ready'")
    p.add_argument("--official", help="the official repository (its src/ holds the model)")
    p.add_argument("--jax-repo", default=REPO, help="the m3ddm_jax checkout to import")
    p.add_argument("--attention", default="auto", help="the JAX side's attention kernel (a registry name)")
    args = p.parse_args(argv)

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    reply = lambda msg: replies.write(json.dumps(msg) + "\n")

    cpus = sorted(os.sched_getaffinity(0))
    if args.threads > len(cpus):
        raise SystemExit(f"--threads {args.threads}: this process may run on only {len(cpus)} CPUs")
    # XLA has no thread-count setting; the affinity mask holds both sides to the same N CPUs.
    os.sched_setaffinity(0, cpus[:args.threads])

    with np.load(args.inputs) as z:
        inputs = dict(z)
    t0 = time.perf_counter()
    variants, to_official_layout, info = (official_side if args.side == "official" else jax_side)(args, inputs)
    outputs = {}
    for name, call in variants.items():
        for _ in range(args.warmup):
            outputs[name] = call()
    info.update(setup_s=round(time.perf_counter() - t0, 2), cpus=sorted(os.sched_getaffinity(0)),
                variants=list(variants), rss_after_setup=_status_bytes("VmRSS"),
                setup_peak_rss=_status_bytes("VmHWM"))
    reply({"ready": info})

    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "call":
            name = msg["variant"]
            _reset_peak_rss()
            rss_before = _status_bytes("VmRSS")
            t0 = time.perf_counter()
            outputs[name] = variants[name]()
            seconds = time.perf_counter() - t0
            reply({"seconds": seconds, "peak_rss": _status_bytes("VmHWM"), "rss_before": rss_before})
        elif msg["cmd"] == "finish":
            for name, out in outputs.items():
                np.save(os.path.join(msg["outputs"], f"{name}.npy"), to_official_layout(out).astype(np.float32))
            reply({"saved": sorted(outputs)})
            return
        else:
            raise ValueError(f"unknown command {msg!r}")


if __name__ == "__main__":
    main()
