"""Side by side: the authors' PyTorch UNet and m3ddm_jax's UNet on the same CPU, in one run.

Both load the same weights (the fixtures' tiny official UNet, official parameter names) and get the same
inputs (drawn here with a fixed seed; official layout (B, C, F, H, W) for PyTorch, channels-last for JAX).
Each side is a persistent worker process (bench/sxs_worker.py) that loads, compiles and warms up outside the
timed part; then the calls alternate: official, JAX, JAX with encoding, official, ... One timed call is one
UNet evaluation: one denoising step for all rows (windows x guidance branches) of the case.

What a call computes differs on purpose:
  official           the official forward encodes the global latents (b x branches x g frames) in every call;
  jax                m3ddm_jax's forward on precomputed global tokens (the sampler encodes them once per
                     video, DESIGN section 6): the headline figure;
  jax_with_encoding  the same encoder work inside every call as the official forward.
Both sides run float32 with the same number of threads on the same CPUs (PyTorch: torch.set_num_threads
and OMP_WAIT_POLICY=PASSIVE, without which its spinning threads collapse whenever anything else runs; XLA,
which has no thread-count setting, is held to the same N CPUs by the affinity mask each worker sets).

Peak memory is the peak resident size (VmHWM) of each worker during each timed call, reset through
/proc/self/clear_refs just before the call, so it counts the weights, the runtime and the call's working
memory; `process_peak_gib` also covers loading, compiling and warming up. XLA's planned temporaries, FLOPs
and bytes accessed of each compiled JAX variant are reported too.

Setup, once (the official code is never committed; .ref/ is git-ignored):

    git clone https://github.com/alimama-creative/M3DDM-Video-Outpainting .ref/M3DDM-Video-Outpainting
    python bench/sxs_official.py --setup          # .ref/venv-official: torch 2.13.0 (CPU), diffusers 0.18.2, ...

Run (the real case takes about 70-100 s per call and side):

    python bench/sxs_official.py --case toy --repeats 10 --json sxs_toy.json
    python bench/sxs_official.py --case real --repeats 3 --json sxs_real.json
    python bench/sxs_official.py --case real --frames 8 --size 16   # a case's shape, overridden
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from report import markdown_table, report

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
REF = os.path.join(REPO, ".ref")
OFFICIAL_URL = "https://github.com/alimama-creative/M3DDM-Video-Outpainting"
# The official code's environment, as the reference fixtures were produced (their README): torch's CPU wheel.
OFFICIAL_PACKAGES = ("torch==2.13.0", "diffusers==0.18.2", "huggingface_hub==0.16.4", "transformers==4.31.0",
                     "numpy==1.26.4", "einops", "safetensors")
VARIANTS = ("official", "jax", "jax_with_encoding")
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Case:
    b: int  # windows (the official forward's b)
    branches: int  # guidance branches stacked per window (the official do_classfier: 1, 2 or 4)
    frames: int
    size: int  # latent height = width
    global_frames: int
    global_size: int  # global latent height = width

    @property
    def rows(self) -> int:
        return self.b * self.branches


CASES = {
    "toy": Case(b=2, branches=1, frames=4, size=16, global_frames=3, global_size=16),
    # A sampler step of the official pipeline on 2 windows with 4-way guidance at 256x256 pixels.
    "real": Case(b=2, branches=4, frames=16, size=32, global_frames=16, global_size=32),
}


def default_reference() -> str:
    shared = os.environ.get("M3DDM_SHARED_DIR") or os.path.join(os.path.dirname(REPO), "shared")
    return os.environ.get("M3DDM_REFERENCE_DIR") or os.path.join(shared, "fixtures", "m3ddm_reference")


def setup_official_venv(venv: str) -> None:
    """Creates the official code's virtual environment (CPU torch; diffusers 0.18.2 needs huggingface_hub<0.26)."""
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", *OFFICIAL_PACKAGES], check=True)


def make_inputs(case: Case, seed: int) -> dict:
    """One UNet call's arguments in the official layout: sample (N, 9, F, h, w) = noisy latent | local latent
    | mask (1 in side bands, 0 on a guide frame), global latents (b*g, 4, hg, wg)."""
    rng = np.random.default_rng(seed)
    n, s = case.rows, case.size
    sample = rng.standard_normal((n, 9, case.frames, s, s), np.float32)
    mask = np.zeros((s, s), np.float32)
    mask[:, : s // 4] = mask[:, s - s // 4:] = 1
    sample[:, 8] = mask
    sample[:, 8, 0] = 0
    return {"sample": sample,
            "encoder_hidden_states": rng.standard_normal((case.b * case.global_frames, 4, case.global_size,
                                                          case.global_size), np.float32),
            "timestep": np.full((n,), 501, np.int64), "fps": np.full((n,), 8, np.int64),
            "b": np.int64(case.b), "g": np.int64(case.global_frames), "do_classfier": np.int64(case.branches)}


class Worker:
    """A worker process (bench/sxs_worker.py) spoken to in JSON lines."""

    def __init__(self, side: str, python: str, args, inputs: str, env: dict):
        cmd = [python, os.path.join(BENCH, "sxs_worker.py"), side, "--inputs", inputs,
               "--weights", os.path.join(args.reference, "unet_tiny.safetensors"),
               "--config", os.path.join(args.reference, "config.json"),
               "--threads", str(args.threads), "--warmup", str(args.warmup)]
        cmd += (["--official", args.official] if side == "official"
                else ["--jax-repo", args.jax_repo, "--attention", args.attention])
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()["ready"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            status = self.proc.wait()
            why = ("killed, most likely by the kernel for lack of memory (see MemAvailable in /proc/meminfo)"
                   if status == -9 else f"exit status {status}; its error is above")
            raise RuntimeError(f"the {self.side} worker stopped: {why}")
        return json.loads(line)

    def request(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def finish(self, outputs: str) -> None:
        self.request(cmd="finish", outputs=outputs)
        self.proc.wait()


def worker_env(threads: int) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # A forced host device count would split the CPU between simulated devices.
    env.pop("XLA_FLAGS", None)
    return env


def run_case(name: str, case: Case, args) -> dict:
    log = lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="sxs_") as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        np.savez(inputs, **make_inputs(case, args.seed))
        env = worker_env(args.threads)
        load_before = os.getloadavg()
        workers = {}
        # One after the other, so that two warm-ups never hold their peak memory at once.
        for side, python in (("official", args.official_python), ("jax", sys.executable)):
            log(f"starting the {side} worker (load, compile, {args.warmup} warm-up call(s))")
            workers[side] = Worker(side, python, args, inputs, env)
            log(f"{side} ready in {workers[side].info['setup_s']} s")
        calls = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for variant in VARIANTS:
                reply = workers["official" if variant == "official" else "jax"].request(cmd="call", variant=variant)
                calls[variant].append(reply)
                log(f"repeat {r + 1}/{args.repeats} {variant}: {reply['seconds']:.3f} s, "
                    f"peak {reply['peak_rss'] / GIB:.2f} GiB")
        load_after = os.getloadavg()
        for w in workers.values():
            w.finish(tmp)
        outputs = {v: np.load(os.path.join(tmp, f"{v}.npy")) for v in VARIANTS}

    sides = {}
    for variant in VARIANTS:
        info = workers["official" if variant == "official" else "jax"].info
        seconds = [c["seconds"] for c in calls[variant]]
        peak = max(c["peak_rss"] for c in calls[variant])
        sides[variant] = {"median_s": statistics.median(seconds), "min_s": min(seconds),
                          "times_s": [round(s, 4) for s in seconds], "peak_gib": round(peak / GIB, 3),
                          "rss_before_call_gib": round(max(c["rss_before"] for c in calls[variant]) / GIB, 3),
                          "call_working_gib": round(max(c["peak_rss"] - c["rss_before"] for c in calls[variant])
                                                    / GIB, 3),
                          "process_peak_gib": round(max(peak, info["setup_peak_rss"]) / GIB, 3)}
        if variant != "official":
            sides[variant]["max_abs_diff"] = float(np.abs(outputs[variant] - outputs["official"]).max())
            sides[variant]["xla"] = info["xla"][variant]
    official = sides["official"]["median_s"]
    return {"case": name, **dataclasses.asdict(case), "rows": case.rows,
            "official_over_jax": round(official / sides["jax"]["median_s"], 3),
            "official_over_jax_with_encoding": round(official / sides["jax_with_encoding"]["median_s"], 3),
            "output_std": float(outputs["official"].std()), **sides,
            "workers": {side: w.info for side, w in workers.items()},
            "load_avg_before": load_before, "load_avg_after": load_after}


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        o, j, e = r["official"], r["jax"], r["jax_with_encoding"]
        rows.append({"case": r["case"], "official s": f"{o['median_s']:.3f}", "JAX s": f"{j['median_s']:.3f}",
                     "official/JAX": f"{r['official_over_jax']:.2f}", "JAX+enc s": f"{e['median_s']:.3f}",
                     "official/(JAX+enc)": f"{r['official_over_jax_with_encoding']:.2f}",
                     "max abs diff": f"{max(j['max_abs_diff'], e['max_abs_diff']):.1e}",
                     "official peak GiB": f"{o['peak_gib']:.2f}", "JAX peak GiB": f"{j['peak_gib']:.2f}",
                     "JAX+enc peak GiB": f"{e['peak_gib']:.2f}",
                     "XLA temp GiB": f"{j['xla']['temp_bytes'] / GIB:.2f}",
                     "load before/after": f"{r['load_avg_before'][0]:.1f}/{r['load_avg_after'][0]:.1f}"})
    return markdown_table(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help="create --official-python's virtual environment and exit")
    p.add_argument("--case", action="append", choices=sorted(CASES), help="toy (default) and/or real")
    for field in dataclasses.fields(Case):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=int, help=f"override the case's {field.name}")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side, alternating")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side after compiling")
    p.add_argument("--threads", type=int, default=2, help="threads (and CPUs) of each side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official", default=os.path.join(REF, "M3DDM-Video-Outpainting"),
                   help="a clone of the official repository")
    p.add_argument("--official-python", default=os.path.join(REF, "venv-official", "bin", "python"),
                   help="the python of the official code's virtual environment")
    p.add_argument("--jax-repo", default=REPO, help="the m3ddm_jax checkout whose model is timed")
    p.add_argument("--attention", default="auto",
                   help="the JAX side's attention kernel (default auto, as the sampler runs it; the checkout "
                        "before issue 12, .ref/m3ddm_jax-HEAD, knows only xla)")
    p.add_argument("--reference", default=default_reference(),
                   help="fixture folder with config.json and unet_tiny.safetensors (official names)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    if args.setup:
        setup_official_venv(os.path.dirname(os.path.dirname(args.official_python)))
        return {}
    if not os.path.isfile(os.path.join(args.official, "src", "model", "unet_3d_condition_video.py")):
        p.error(f"--official {args.official}: not a clone of the official code; run\n"
                f"  git clone {OFFICIAL_URL} {args.official}")
    if not os.path.isfile(args.official_python):
        p.error(f"--official-python {args.official_python} does not exist; create it with "
                f"`python bench/sxs_official.py --setup`")
    for name in ("config.json", "unet_tiny.safetensors"):
        if not os.path.isfile(os.path.join(args.reference, name)):
            p.error(f"--reference {args.reference} has no {name} (set M3DDM_REFERENCE_DIR or pass --reference)")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Case) if getattr(args, f.name)}
    cases = {}
    for name in args.case or ["toy"]:
        cases[name + ("-custom" if overrides else "")] = dataclasses.replace(CASES[name], **overrides)

    official_commit = subprocess.run(["git", "-C", args.official, "rev-parse", "HEAD"], capture_output=True,
                                     text=True).stdout.strip() or None
    result = {"date": datetime.date.today().isoformat(), "device": f"CPU, {cpu_name()}, {os.cpu_count()} cores",
              "command": " ".join(["python", "bench/sxs_official.py", *argv]),
              "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "dtype": "float32",
              "official_commit": official_commit, "jax_repo": args.jax_repo, "attention": args.attention,
              "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    t0 = time.perf_counter()
    result["cases"] = [run_case(name, case, args) for name, case in cases.items()]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report(result, args.json)
    print(table(result["cases"]))
    return result


if __name__ == "__main__":
    main()
