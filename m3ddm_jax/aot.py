"""Ahead-of-time compilation for TPU slices, on any machine: libtpu's compiler runs without a TPU.

The config's train step (or window-sampler call) is built from shapes only and compiled for the devices of
a named slice (`v5e:2x4`, `v5p:2x2x2`, ..., several slices with `num_slices`). The report holds what the
compiler says of one device: memory by kind against HBM, FLOPs and bytes accessed, and from those a
roofline bound on the step time. No weights are read or made: a weights folder contributes its
config.json; a folder that does not exist stands for the released architecture (and the report says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from m3ddm_jax import fileio, platforms, pretrained, sharding
from m3ddm_jax.flops import count_flops
from m3ddm_jax.models.attention import resolve_attention
from m3ddm_jax.models.unet3d import UNet3DConfig
from m3ddm_jax.models.vae import VAEConfig
from m3ddm_jax.sampling.schedule import WINDOW
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.sampling.window import WindowSampler, call_spec, window_mesh, windows_per_call
from m3ddm_jax.training import trainer
from m3ddm_jax.training.checkpoint import abstract_like

GiB = 2 ** 30
PLATFORM = "tpu"


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation: vendor figures (Google Cloud TPU documentation) and the HBM that
    libtpu's compiler lets one chip's program use (from its out-of-memory message; libtpu 0.0.42.1)."""
    device_kind: str  # as JAX names the devices
    hbm_bytes: int
    usable_hbm_bytes: int
    peak_flops: float  # dense bfloat16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    chip_config: str | None = None  # "megacore": one JAX device per chip of two TensorCores, as JAX runs them


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, int(30.75 * GiB), 275e12, 1200e9, "megacore"),
    "v5e": Chip("TPU v5 lite", 16 * GiB, int(15.75 * GiB), 197e12, 819e9),
    "v5p": Chip("TPU v5", 95 * GiB, int(95.74 * GiB), 459e12, 2765e9, "megacore"),
    "v6e": Chip("TPU v6 lite", 32 * GiB, int(31.25 * GiB), 918e12, 1638e9),
}


class AotError(Exception):
    """A topology, config or setting that cannot be compiled; the message says which and what to do."""


class DoesNotFit(Exception):
    """The program needs more HBM per device than the chip has (the compiler refused it, or its plan is
    larger); `report` holds what is known."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class Slice:
    """The devices of a TPU topology and what the report needs to know about them."""
    topology: str
    num_slices: int
    devices: list
    chip: Chip

    @property
    def chips(self) -> int:
        return math.prod(int(n) for n in self.topology.split(":")[1].split("x")) * self.num_slices

    @property
    def processes(self) -> int:
        return len({d.process_index for d in self.devices})


# libtpu ends the process with abort() when one of its own checks fails, and no Python code runs after that:
# the log held back below is then the only account of why. A watcher process, started with the real stderr,
# waits for the holder's end of a pipe to close; if the log file is still there, the holder died inside the
# block, and the watcher writes the log out.
_WATCHER = ("import os, sys\n"
            "sys.stdin.buffer.read()\n"
            "if os.path.exists(sys.argv[1]):\n"
            "    sys.stderr.write('m3ddm_jax: the process died while libtpu ran; libtpu wrote:\\n')\n"
            "    sys.stderr.flush()\n"
            "    sys.stderr.buffer.write(open(sys.argv[1], 'rb').read())\n"
            "    os.unlink(sys.argv[1])\n")


@contextlib.contextmanager
def _captured_stderr():
    """Holds back what native code writes to stderr (libtpu's initialisation warnings on a machine without
    a TPU); yields a function that returns it, for an error message. If the process dies inside the block
    (libtpu aborts, the OOM killer), what was held back goes to stderr."""
    fd, path = tempfile.mkstemp(prefix="m3ddm_libtpu_", suffix=".log")
    watcher = subprocess.Popen([sys.executable, "-I", "-c", _WATCHER, path], stdin=subprocess.PIPE)
    with os.fdopen(fd, "w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.unlink(path)
            watcher.stdin.close()
            watcher.wait()


def tpu_slice(topology: str, num_slices: int = 1) -> Slice:
    """The devices of `num_slices` slices of `topology` ('v5e:2x4': generation, then chips per dimension)."""
    generation, _, shape = topology.partition(":")
    if generation not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise AotError(f"topology {topology!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                       f"{sorted(CHIPS)}, e.g. v5e:2x4, v5p:2x2x2, v6e:4x4, v4:2x2x2")
    if num_slices < 1:
        raise AotError(f"num_slices must be >= 1, got {num_slices}")
    if not platforms.accelerator_attached():
        # libtpu guards the chips of a machine with a process lock; with no chip there is nothing to guard,
        # and compiles in parallel (tests, sweeps) must not wait on each other.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask off Cloud TPU VMs
    from jax.experimental import topologies

    chip_config = {"chip_config_name": CHIPS[generation].chip_config} if CHIPS[generation].chip_config else {}
    with _captured_stderr() as libtpu_log:
        try:
            desc = topologies.get_topology_desc(platform=PLATFORM, topology_name=topology, num_slices=num_slices,
                                                **chip_config)
        except Exception as err:  # libtpu's errors are plain runtime errors
            raise AotError(f"libtpu cannot describe topology {topology!r} ({num_slices} slice(s)): {err}\n"
                           f"{libtpu_log()}".strip()) from None
    result = Slice(topology, num_slices, list(desc.devices), CHIPS[generation])
    if len(result.devices) != result.chips:
        raise AotError(f"topology {topology!r}: libtpu gives {len(result.devices)} devices for {result.chips} chips")
    return result


# ------------------------------------------------------------------------------------------ programs


@dataclasses.dataclass
class Program:
    """What to compile: the jitted function and its abstract arguments (with shardings), and facts for the
    report."""
    what: str
    fn: Any
    args: tuple
    model_flops: Callable[[], int]  # of one cost unit, all devices used, without recomputation (remat)
    notes: list[str]
    details: dict
    # What the compiler's cost analysis covers: it counts a loop body once, so for the sampler's scan its
    # FLOPs and bytes are those of one denoising step, not of the call.
    cost_unit: str = "call"

    def lower(self):
        return self.fn.lower(*self.args)


def device_bytes(tree) -> int:
    """Bytes of one device's shards of abstract arrays (ShapeDtypeStructs with shardings)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _folder_config(folder: str, default, notes: list[str], what: str, **overrides):
    """A weights folder's model config (its config.json only), or `default` where there is none."""
    if os.path.isfile(os.path.join(folder, pretrained.CONFIG_FILE)):
        return pretrained.read_config(folder, **overrides)
    notes.append(f"no {os.path.join(folder, pretrained.CONFIG_FILE)}: {what}")
    return dataclasses.replace(default, **overrides)


def abstract_models(cfg, notes: list[str]):
    """Shape-only codec and UNet of a training config, as `python -m m3ddm_jax.train` would build them."""
    if cfg.latent.kind == "vae":
        vae_config = _folder_config(os.path.join(cfg.latent.weights, pretrained.VAE), VAEConfig(), notes,
                                    "Stable Diffusion's VAE is assumed", dtype=cfg.compute_dtype)
        codec = pretrained.abstract_model(vae_config)
    else:
        codec = trainer.build_codec(cfg)  # the pixel space has no weights
    overrides = trainer.unet_overrides(cfg, PLATFORM)
    if cfg.init.weights:
        unet_config = _folder_config(os.path.join(cfg.init.weights, pretrained.UNET), UNet3DConfig(), notes,
                                     "the released M3DDM architecture is assumed", **overrides)
    else:
        unet_config = trainer.fresh_unet_config(cfg, codec.config.latent_channels, overrides)
    return codec, pretrained.abstract_model(unet_config)


def train_program(cfg, tpu: Slice, round_batch: bool = False) -> Program:
    """The config's train step at its global batch, on the config's mesh laid over the slice's devices.

    `round_batch`: a global batch that does not split over the slice's batch shards (a config written for
    another machine, like the tests' 2 clips on 8 chips) is raised to the next multiple that does, with a
    note; without it that is an error naming the batch to use."""
    notes: list[str] = []
    codec, unet = abstract_models(cfg, notes)
    try:
        mesh = sharding.make_mesh(cfg.mesh.to_dict(), tpu.devices)
        shards, size = trainer.batch_shards(cfg, mesh), cfg.data.global_batch_size
        if round_batch and size % shards:
            batch = shards * -(-size // shards)
            notes.append(f"the config's global batch {size} does not split over the {shards} batch shards of this "
                         f"slice: compiled at {batch}; --config.data.global_batch_size chooses")
            cfg = cfg.copy_and_resolve_references()
            with cfg.unlocked():
                cfg.data.global_batch_size = batch
        program = trainer.build_train_program(cfg, mesh, codec, unet)
    except ValueError as err:
        raise AotError(str(err)) from None

    unet_config, state = unet.config, program.abstract_state
    details = {"mesh": dict(mesh.shape), "global_batch": cfg.data.global_batch_size,
               "per_chip_batch": cfg.data.global_batch_size / tpu.chips, "remat": unet_config.remat,
               "vae_frames_per_call": cfg.get("vae_frames_per_call", 0),
               "dtype": unet_config.dtype, "attention": unet_config.attention_impl,
               "params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
               # What the arguments hold, per device: the memory model's terms (README).
               "argument_bytes": {"params": device_bytes(state.params), "optimizer": device_bytes(state.opt_state),
                                  "ema": device_bytes(state.ema),
                                  "frozen": device_bytes((state.rest, program.abstract_codec_state)),
                                  "batch": device_bytes(program.abstract_batch)}}

    def no_remat_flops() -> int:
        # The matmuls and convolutions of the same step without remat, attention as plain XLA matmuls (the
        # analytic counter does not see inside a Pallas kernel).
        plain = dataclasses.replace(unet_config, remat="none", attention_impl="xla")
        plain_program = trainer.build_train_program(cfg, mesh, codec, pretrained.abstract_model(plain))
        return count_flops(plain_program.step_fn.jitted, plain_program.abstract_state,
                           plain_program.abstract_codec_state, plain_program.abstract_batch)

    args = (program.abstract_state, program.abstract_codec_state, program.abstract_batch)
    return Program("train", program.step_fn, args, no_remat_flops, notes, details)


def _sampling_models(cfg, settings: SamplerSettings, notes: list[str]):
    """Shape-only UNet (as the Outpainter runs it: the settings' dtype and kernel, no remat), codec and
    scheduler config: of the weights folder of an inference config (`weights`), else of a training config."""
    overrides = {"dtype": settings.compute_dtype(PLATFORM), "remat": "none",
                 "attention_impl": resolve_attention(settings.attention, PLATFORM)}
    if "weights" in cfg:
        codec = pretrained.abstract_model(_folder_config(
            os.path.join(cfg.weights, pretrained.VAE), VAEConfig(), notes, "Stable Diffusion's VAE is assumed"))
        unet_config = _folder_config(os.path.join(cfg.weights, pretrained.UNET), UNet3DConfig(), notes,
                                     "the released M3DDM architecture is assumed", **overrides)
        scheduler = pretrained.read_scheduler_config(cfg.weights, default=pretrained.SD15_SCHEDULER_CONFIG)
    else:  # a training config: the model it trains, sampled as training samples it
        codec, unet = abstract_models(cfg, notes)
        unet_config, scheduler = dataclasses.replace(unet.config, **overrides), cfg.scheduler.to_dict()
    return pretrained.abstract_model(unet_config), codec, scheduler


def sample_program(cfg, tpu: Slice) -> Program:
    """One call of the jitted window sampler as the Outpainter issues it on one host of the slice: the
    default (or configured) windows per call over that host's devices, every guidance branch and every
    step, on the square canvas of side sampler.canvas_size (the official 256 x 256)."""
    notes: list[str] = []
    try:
        settings = SamplerSettings.from_config(cfg.get("sampler"))
    except ValueError as err:
        raise AotError(str(err)) from None
    unet, codec, scheduler = _sampling_models(cfg, settings, notes)
    local = [d for d in tpu.devices if d.process_index == tpu.devices[0].process_index]
    mesh = window_mesh(local)
    windows = windows_per_call(settings.windows_per_call, len(local))
    factor, channels = codec.config.downsample_factor, codec.config.latent_channels
    latent_hw = (settings.canvas_size // factor,) * 2
    global_latents = jax.ShapeDtypeStruct((WINDOW, *(s // factor for s in settings.global_size), channels),
                                          jnp.float32)
    graphdef, params = nnx.split(unet)
    tokens = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p).encode_global(x, 1), params, global_latents)
    inputs, noise = call_spec(mesh, windows, latent_hw, channels, tokens)
    params = abstract_like(params, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params))

    def make_sampler(model):
        return WindowSampler(model, scheduler, steps=settings.steps, scheduler=settings.scheduler,
                             guidance_scale=settings.guidance_scale,
                             global_guidance_scale=settings.global_guidance_scale,
                             exact_branches=settings.exact_branches)

    sampler = make_sampler(unet)
    plain = make_sampler(pretrained.abstract_model(dataclasses.replace(unet.config, attention_impl="xla")))
    details = {"windows": windows, "branches": len(sampler.branches), "steps": settings.steps,
               "scheduler": settings.scheduler, "devices_used": len(local), "latent_hw": latent_hw,
               "dtype": unet.config.dtype, "attention": unet.config.attention_impl,
               "params": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
               "argument_bytes": {"params": device_bytes(params), "inputs": device_bytes((inputs, noise))}}
    return Program("sample", sampler, (params, inputs, noise),
                   lambda: plain.flops(params, inputs, noise) / sampler.steps, notes, details, "denoising step")


# ------------------------------------------------------------------------------------------- report


def _parse_size(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** "BKMGT".index(unit or "B"))


def _out_of_memory(err: Exception) -> tuple[int | None, int | None] | None:
    """(needed, available) bytes from the compiler's out-of-memory error, None if it is another error. Either
    message's figure is the whole plan per device, arguments included, though one calls it "temporaries"."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    for pattern in (r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)",
                    r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"):
        m = re.search(pattern, text)
        if m:
            return _parse_size(m[1], m[2]), _parse_size(m[3], m[4])
    return None, None


def _advice(what: str, arguments: bool = False) -> str:
    """What to try; remat cannot shrink the arguments (state and batch)."""
    if what == "train":
        remat = "" if arguments else "a remat policy that keeps less (--config.remat=dots or full), "
        return (f"try {remat}a larger fsdp axis (--config.mesh.fsdp) or a smaller per-chip batch "
                f"(--config.data.global_batch_size)")
    return "try fewer windows per call (--config.sampler.windows_per_call) or fewer guidance branches"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def compile_program(program: Program, tpu: Slice) -> tuple[Any, dict]:
    """Compiles `program` for the slice; returns (compiled, report). Raises DoesNotFit (with the report) if
    it needs more HBM per device than the chip has."""
    chip = tpu.chip
    report = {"what": program.what, "topology": tpu.topology, "num_slices": tpu.num_slices, "chips": tpu.chips,
              "processes": tpu.processes, "device_kind": tpu.devices[0].device_kind,
              "hbm_bytes": chip.hbm_bytes, "usable_hbm_bytes": chip.usable_hbm_bytes,
              **program.details, "notes": program.notes}
    held = sum(program.details.get("argument_bytes", {}).values())
    if held > chip.usable_hbm_bytes:  # no plan can fit: say so without a long compile
        report.update(fits=False, compile_s=0.0, compile_cpu_s=0.0, per_device_bytes=None, needed_bytes=held)
        raise DoesNotFit(f"{program.what} does not fit on {tpu.topology}: its arguments alone ("
                         f"{', '.join(program.details['argument_bytes'])}) need {_gib(held)} per device, a device "
                         f"has {_gib(chip.usable_hbm_bytes)}; {_advice(program.what, arguments=True)}", report)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with _captured_stderr() as libtpu_log:  # libtpu may repeat its initialisation warnings
        try:
            compiled, error = program.lower().compile(), None
        except Exception as err:
            compiled, error, log = None, err, libtpu_log()
    if error is not None:
        oom = _out_of_memory(error)
        if oom is None:  # not a matter of size: show everything
            sys.stderr.write(log)
            raise error
        needed, available = oom
        report.update(fits=False, compile_s=round(time.perf_counter() - t0, 1),
                      compile_cpu_s=round(time.process_time() - cpu0, 1), per_device_bytes=None,
                      needed_bytes=needed, error=str(error).splitlines()[0])
        need = f"needs {_gib(needed)} per device" if needed else "needs more HBM than a device has"
        has = _gib(available or chip.usable_hbm_bytes)
        raise DoesNotFit(f"{program.what} does not fit on {tpu.topology}: the compiler says it {need}, a "
                         f"device has {has}; {_advice(program.what)}", report)
    # Wall time depends on what else the machine runs; CPU time (all compiler threads) much less.
    report.update(compile_s=round(time.perf_counter() - t0, 1), compile_cpu_s=round(time.process_time() - cpu0, 1))
    mem = compiled.memory_analysis()
    # Donated arguments come back as aliased outputs: count those bytes once.
    sizes = {"arguments": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
             "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes}
    sizes["total"] = sizes["arguments"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    report["per_device_bytes"] = sizes
    report["compiler_peak_bytes"] = getattr(mem, "peak_memory_in_bytes", None)
    report["generated_code_bytes"] = mem.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    model_flops = program.model_flops() / program.details.get("devices_used", len(tpu.devices))
    # The compiler's FLOPs leave out what runs inside Pallas kernels (splash attention), the analytic ones any
    # recomputation: the larger bounds the compute time (else the MFU ceiling can pass 100 %).
    compute_s, memory_s = max(flops, model_flops) / chip.peak_flops, accessed / chip.hbm_bandwidth
    roofline = max(compute_s, memory_s)
    # The cost analysis counts a loop body once: the sampler's scan over steps (hence its cost unit), and also
    # the VAE's frame chunks and XLA's windowed collective matmuls in the train step.
    report["loops"] = compiled.as_text().count(" while(")
    if report["loops"] > (program.what == "sample"):
        report["notes"].append(f"{report['loops']} loops in the compiled program: the compiler's FLOPs and bytes "
                               "accessed (and the roofline from them) count each loop body once; "
                               "bench/aot_breakdown.py on --dump counts bodies as often as they run")
    report.update(
        fits=sizes["total"] <= chip.usable_hbm_bytes, cost_unit=program.cost_unit, flops_per_device=flops,
        bytes_accessed_per_device=accessed, model_flops_per_device=model_flops,
        model_flop_per_byte=model_flops / accessed if accessed else None, compute_s=compute_s,
        memory_s=memory_s, roofline_s=roofline, bound="compute" if compute_s >= memory_s else "memory",
        mfu_ceiling=model_flops / chip.peak_flops / roofline if roofline else None)
    if not report["fits"]:
        raise DoesNotFit(f"{program.what} does not fit on {tpu.topology}: its plan needs "
                         f"{_gib(sizes['total'])} per device, a device has {_gib(chip.usable_hbm_bytes)}; "
                         f"{_advice(program.what)}", report)
    return compiled, report


# --------------------------------------------------------------------------------------- executables


def save_executable(compiled, path: str) -> None:
    """Writes the compiled executable (serialized, with its argument and result trees) atomically; a job on
    the same slice loads it with `load_executable`."""
    from jax.experimental import serialize_executable

    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
    device_ids = sorted({d.id for s in shardings for d in s.device_set})
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump({"format": "m3ddm_jax.aot", "jax": jax.__version__, "executable": payload,
                     "in_tree": in_tree, "out_tree": out_tree, "device_ids": device_ids}, f)


def load_executable(path: str, backend=None) -> Callable:
    """The executable saved by `save_executable`, loaded on this process's backend (the slice it was
    compiled for): call it with arrays of the shapes and shardings it was compiled for."""
    from jax.experimental import serialize_executable

    with open(path, "rb") as f:
        saved = pickle.load(f)
    if saved.get("format") != "m3ddm_jax.aot":
        raise ValueError(f"{path} is not an executable saved by tools/aot_compile.py")
    if saved["jax"] != jax.__version__:
        raise ValueError(f"{path} was compiled with jax {saved['jax']}, this is jax {jax.__version__}")
    # On the devices it was compiled for (ids), not all of the backend's: a program of one device, or of part of
    # a host's devices, runs on those.
    client = jax.devices(backend)[0].client if backend is None or isinstance(backend, str) else backend
    present = {d.id: d for d in client.devices()}
    ids = saved.get("device_ids", sorted(present))  # files saved before 2026-12-05: all devices
    if any(i not in present for i in ids):
        raise ValueError(f"{path} was compiled for devices {ids}; this process has {sorted(present)}: load it "
                         f"on the slice it was compiled for")
    return serialize_executable.deserialize_and_load(saved["executable"], saved["in_tree"], saved["out_tree"],
                                                     backend=client, execution_devices=[present[i] for i in ids])
