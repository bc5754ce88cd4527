"""The fit table: the largest per-chip batch of the paper config's train step that fits each TPU slice, per
remat policy, and the full-size sampler call, all from tools/aot_compile.py (libtpu on any machine).

Resumable: every compile appends one JSON line (its command, exit status and report) to --out, and a rerun
skips the compiles already there. A full-size compile takes 10+ minutes on 2 cores, so the search is
short: per-chip batch 1 and 2, a linear extrapolation of the per-device total to the usable HBM, then the
predicted largest batch and the one above it (stepping on only if the prediction was off).

    nohup nice -n 10 python bench/aot_fit.py --out /work/notes/aot_sweep/results.jsonl \\
        > /work/notes/aot_sweep/sweep.log 2>&1 &
    python bench/aot_fit.py --out /work/notes/aot_sweep/results.jsonl --table     # BENCHMARKS.md rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/m3ddm_sd15_256.py"
SLICES = {"v5e-8": ("v5e:2x4", 8), "v5p-8": ("v5p:2x2x1", 4), "v6e-8": ("v6e:2x4", 8)}
REMATS = ("none", "dots", "full")
PAPER_REMAT = "dots"  # configs/m3ddm_sd15_256.py
MULTIHOST = ("v5e-256", "v5e:16x16", 256, {"data": 16, "fsdp": 16})  # data x fsdp over 64 processes
DOES_NOT_FIT = 3


def command(what: str, topology: str, *, batch: int | None = None, remat: str | None = None,
            mesh: dict | None = None) -> list[str]:
    cmd = ["python", "tools/aot_compile.py", "--config", CONFIG, "--topology", topology, "--what", what]
    if batch is not None:
        cmd.append(f"--config.data.global_batch_size={batch}")
    if remat is not None:
        cmd.append(f"--config.remat={remat}")
    for axis, size in (mesh or {}).items():
        cmd.append(f"--config.mesh.{axis}={size}")
    return cmd


class Results:
    """The JSON lines of --out: one per finished compile, keyed by its command."""

    def __init__(self, path: str):
        self.path = path
        self.rows = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        self.rows[" ".join(row["command"])] = row

    def run(self, cmd: list[str]) -> dict:
        key = " ".join(cmd)
        if key in self.rows:
            return self.rows[key]
        print(f"[{time.strftime('%H:%M:%S')}] {key}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "report.json")
            proc = subprocess.run([sys.executable, *cmd[1:], "--json", out], cwd=REPO, capture_output=True,
                                  text=True)
            report = json.load(open(out)) if os.path.exists(out) else None
        if proc.returncode not in (0, DOES_NOT_FIT) or report is None:
            print(f"  failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            report = None
        row = {"command": cmd, "exit": proc.returncode, "report": report}
        if report is not None:  # a failed compile is retried by the next run
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.rows[key] = row
            print(f"  fits={report['fits']} total={_total(report)} compile_s={report['compile_s']}", flush=True)
        return row


def _total(report: dict) -> int | None:
    sizes = report.get("per_device_bytes")
    return sizes["total"] if sizes else report.get("needed_bytes")


def largest_batch(results: Results, topology: str, chips: int, remat: str, mesh: dict | None = None) -> int:
    """The largest per-chip batch whose train step fits (0 if not even 1 does)."""
    def report(b: int) -> dict:
        rep = results.run(command("train", topology, batch=b * chips, remat=remat, mesh=mesh))["report"]
        if rep is None:
            raise RuntimeError(f"the compile of {topology} remat={remat} batch {b}/chip failed (see the log)")
        return rep

    if not report(1)["fits"]:
        return 0
    if not report(2)["fits"]:
        return 1
    one, two = _total(report(1)), _total(report(2))
    b = max(2, 1 + math.floor((report(1)["usable_hbm_bytes"] - one) / max(two - one, 1)))
    while not report(b)["fits"]:  # the prediction was too high: step down
        b -= 1
    while report(b + 1)["fits"]:  # too low: step up
        b += 1
    return b


def sweep(results: Results) -> None:
    """In the order that gives every slice and program a row soonest (each compile is ~20 minutes): v5e, the
    issue's reference slice, under every policy; the other slices under the paper config's policy; the
    sampler calls; the multi-host slice; then the other slices' other policies."""
    (first, (topology0, chips0)), *others = SLICES.items()
    cases = [("train", first, topology0, chips0, remat) for remat in REMATS]
    cases += [("train", name, topology, chips, PAPER_REMAT) for name, (topology, chips) in others]
    cases += [("sample", name, topology, chips, None) for name, (topology, chips) in SLICES.items()]
    cases += [("multihost", *MULTIHOST[:3], PAPER_REMAT)]
    cases += [("train", name, topology, chips, remat) for name, (topology, chips) in others for remat in REMATS
              if remat != PAPER_REMAT]
    for what, name, topology, chips, remat in cases:
        try:
            if what == "train":
                print(f"{name} remat={remat}: largest per-chip batch "
                      f"{largest_batch(results, topology, chips, remat)}", flush=True)
            elif what == "sample":
                results.run(command("sample", topology))
            else:
                results.run(command("train", topology, batch=chips, remat=remat, mesh=MULTIHOST[3]))
        except RuntimeError as err:
            print(f"{name}: {err}", flush=True)


def table(results: Results) -> str:
    """Markdown rows: per slice and remat, the largest fitting batch (and the smallest that does not)."""
    lines = ["| slice | program | remat | per-chip batch | per-device total (GiB) | compile s | TFLOP/device | "
             "GB accessed/device | roofline ms | MFU ceiling | fits | command |", "|" + "---|" * 12]
    rows = [r for r in results.rows.values() if r["report"]]
    for row in sorted(rows, key=lambda r: (r["report"]["topology"], r["report"]["what"],
                                           r["report"].get("remat", ""), r["report"].get("per_chip_batch", 0))):
        rep = row["report"]
        total = _total(rep)
        flops = rep.get("flops_per_device")
        cells = [rep["topology"], rep["what"], rep.get("remat", "-"), f"{rep.get('per_chip_batch', '-'):g}"
                 if rep["what"] == "train" else f"{rep.get('windows', '-')} windows",
                 f"{total / 2 ** 30:.2f}" if total else "?", f"{rep['compile_s']:.0f}",
                 f"{flops / 1e12:.2f}" if flops else "-",
                 f"{rep['bytes_accessed_per_device'] / 1e9:.1f}" if flops else "-",
                 f"{rep['roofline_s'] * 1e3:.0f}" if flops else "-",
                 f"{100 * rep['mfu_ceiling']:.0f}%" if flops else "-", "yes" if rep["fits"] else "no",
                 "`" + " ".join(row["command"]) + "`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results, one JSON line per compile (appended)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = parser.parse_args()
    results = Results(args.out)
    if args.table:
        print(table(results))
        return
    sweep(results)


if __name__ == "__main__":
    main()
