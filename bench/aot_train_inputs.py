"""What the train step's input stage costs on a TPU slice: the frozen VAE encoding of a batch's clip, masked and
global frames (objective.unet_inputs, the step's first stage), compiled alone for the slice with the train
step's shardings, by frames per encoder call.

    TPU_SKIP_MDS_QUERY=1 python bench/aot_train_inputs.py --per-chip 1 --frames-per-call 0 4

Shapes only (the config's VAE, or SD's where no weights folder exists); each compile takes a few minutes on 2
cores. Set it against the whole step's temporaries from tools/aot_compile.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from m3ddm_jax import aot  # noqa: E402
from m3ddm_jax.configlib import load_config  # noqa: E402
from m3ddm_jax.training import objective  # noqa: E402


def inputs_memory(config: str, topology: str, per_chip: int, frames_per_call: int) -> dict:
    cfg = load_config(config)
    tpu = aot.tpu_slice(topology)
    cfg.data.global_batch_size = per_chip * tpu.chips
    codec, _ = aot.abstract_models(cfg, [])
    program = aot.train_program(cfg, tpu)
    _, codec_state, batch = program.args
    graphdef = nnx.graphdef(codec)

    def inputs(codec_state, batch):
        return objective.unet_inputs(nnx.merge(graphdef, codec_state), batch, jax.random.key(0), frames_per_call)

    t0 = time.perf_counter()
    with jax.set_mesh(program.fn.mesh):
        compiled = jax.jit(inputs).lower(codec_state, batch).compile()
    mem = compiled.memory_analysis()
    return {"topology": topology, "per_chip_batch": per_chip, "vae_frames_per_call": frames_per_call,
            "temp_gib": round(mem.temp_size_in_bytes / 2**30, 3),
            "arguments_gib": round(mem.argument_size_in_bytes / 2**30, 3),
            "compile_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/m3ddm_sd15_256.py")
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--per-chip", type=int, default=1, help="clips per chip")
    parser.add_argument("--frames-per-call", type=int, nargs="+", default=[0, 4], help="0: a clip's frames at once")
    args = parser.parse_args()
    for k in args.frames_per_call:
        print(json.dumps(inputs_memory(args.config, args.topology, args.per_chip, k)), flush=True)


if __name__ == "__main__":
    main()
