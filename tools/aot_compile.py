"""Will it fit, and how fast can it be? Compile a config's train step or sampler call for a TPU slice, on any
machine (libtpu's compiler, no TPU needed), and report per-chip memory, FLOPs and a roofline bound.

    python tools/aot_compile.py --config configs/m3ddm_sd15_256.py --topology v5e:2x4 --config.data.global_batch_size=8
    python tools/aot_compile.py --config configs/test_tiny.py --topology v5e:2x4 --json r.json
    python tools/aot_compile.py --config configs/m3ddm_sd15_256.py --topology v5e:2x2 --num_slices 2 \\
        --config.mesh.data=2 --save step.aot       # a job on that slice loads it: m3ddm_jax.aot.load_executable
    python tools/aot_compile.py --config configs/infer_example.py --topology v6e:2x4 --what sample

Shapes only: weights are never read (a weights folder gives its config.json; a missing folder stands for
the released architecture). A config's own global batch that does not split over the slice's batch shards
is raised to the next multiple that does (the report notes it); one given with --config.data.global_batch_size is
compiled as given. Exit status: 0 fits, 3 does not fit (with what to try), 1 a bad topology or
config. Needs the `tpu` extra (pip install -e ".[tpu]").
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tool only compiles: it never needs (or takes) this machine's accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from m3ddm_jax import aot, fileio  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (get_config())", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice GENERATION:AxB[xC]: v5e:2x4, v5p:2x2x2, v6e:4x4, v4:2x2x2")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices of that topology (multi-slice: the data axis spans them)")
_WHAT = flags.DEFINE_enum("what", "train", ["train", "sample"], "the train step or the window-sampler call")
_JSON = flags.DEFINE_string("json", None, "also write the report here (JSON)")
_SAVE = flags.DEFINE_string("save", None, "write the serialized compiled executable here")
_DUMP = flags.DEFINE_string("dump", None, "write the compiler's dumps here (HLO, buffer assignment, and the "
                            "memory-usage report that names the largest allocations)")

DOES_NOT_FIT = 3


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def table(report: dict) -> str:
    """The report as a few lines for people."""
    mesh = " ".join(f"{k}={v}" for k, v in report.get("mesh", {}).items())
    rows = [("topology", f"{report['topology']} x{report['num_slices']}: {report['chips']} chips "
                         f"({report['device_kind']}), {report['processes']} processes")]
    if report["what"] == "train":
        rows.append(("train step", f"global batch {report['global_batch']} ({report['per_chip_batch']:g} per chip), "
                                   f"mesh {mesh}, remat {report['remat']}, {report['dtype']}, "
                                   f"attention {report['attention']}, {report['params'] / 1e6:.1f}M params"))
    else:
        rows.append(("sampler call", f"{report['windows']} windows x {report['branches']} branches x "
                                     f"{report['steps']} steps, {report['devices_used']} devices, "
                                     f"{report['dtype']}, attention {report['attention']}"))
    limit = f"of {_size(report['usable_hbm_bytes'])} usable ({_size(report['hbm_bytes'])} HBM)"
    b = report.get("per_device_bytes")
    if b:
        rows.append(("memory/device", f"arguments {_size(b['arguments'])} + output {_size(b['output'])} - alias "
                                      f"{_size(b['alias'])} + temp {_size(b['temp'])} = {_size(b['total'])} {limit}"))
        rows.append(("arguments hold", ", ".join(f"{k} {_size(v)}" for k, v in report["argument_bytes"].items())))
        rows.append(("FLOPs/device", f"per {report['cost_unit']}: {report['flops_per_device']:.4g} compiled, "
                                     f"{report['model_flops_per_device']:.4g} model (no recompute)"))
        rows.append(("bytes accessed", f"{report['bytes_accessed_per_device']:.4g} per device "
                                       f"({report['model_flop_per_byte']:.4g} model FLOP per byte)"))
        rows.append(("roofline", f"{report['roofline_s'] * 1e3:.4g} ms per {report['cost_unit']} ({report['bound']}-bound: compute "
                                 f"{report['compute_s'] * 1e3:.4g} ms, memory {report['memory_s'] * 1e3:.4g} ms); "
                                 f"MFU ceiling {100 * report['mfu_ceiling']:.3g}%"))
    else:
        rows.append(("memory/device", f"needs {_size(report.get('needed_bytes'))} {limit}"))
    rows.append(("fits", "yes" if report["fits"] else "NO"))
    rows.append(("compile", f"{report['compile_s']} s ({report['compile_cpu_s']} s of CPU)"))
    rows += [("note", n) for n in report["notes"]]
    return "\n".join(f"{k:<15} {v}" for k, v in rows)


def main(argv) -> None:
    del argv
    if _DUMP.value:  # read by libtpu when it starts, in tpu_slice
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={_DUMP.value}".strip()
    try:
        tpu = aot.tpu_slice(_TOPOLOGY.value, _NUM_SLICES.value)
        if _WHAT.value == "train":  # a batch the user chose is compiled as chosen, or refused
            explicit = "data.global_batch_size" in config_flags.get_override_values(flags.FLAGS["config"])
            program = aot.train_program(_CONFIG.value, tpu, round_batch=not explicit)
        else:
            program = aot.sample_program(_CONFIG.value, tpu)
        compiled, report = aot.compile_program(program, tpu)
        status = 0
    except aot.AotError as err:
        print(f"aot_compile: {err}", file=sys.stderr)
        sys.exit(1)
    except aot.DoesNotFit as err:
        compiled, report, status = None, err.report, DOES_NOT_FIT
        print(f"aot_compile: {err}", file=sys.stderr)
    report["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
    report["overrides"] = config_flags.get_override_values(flags.FLAGS["config"])
    print(table(report))
    if _JSON.value:
        fileio.write_text(_JSON.value, json.dumps(report, indent=2) + "\n")
    if _SAVE.value and compiled is not None:
        aot.save_executable(compiled, _SAVE.value)
        print(f"{'saved':<15} {_SAVE.value}")
    sys.exit(status)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
