"""Where a compiled program's memory and memory traffic go, by the project's source: read the TPU compiler's dumps
(tools/aot_compile.py --dump DIR) and attribute to the Python code that emitted them
  - the values live at the peak of HBM use (the compiler's live-range report), and
  - the bytes each scheduled instruction reads and writes (operands + result, loop bodies times their trip count;
    the sum is set against the compiler's own bytes-accessed figure when --report gives it).

    TPU_SKIP_MDS_QUERY=1 python tools/aot_compile.py --config configs/m3ddm_sd15_256.py --topology v5e:2x4 \\
        --config.data.global_batch_size=16 --dump /tmp/dump --json /tmp/r.json
    python bench/aot_breakdown.py /tmp/dump --report /tmp/r.json

Each instruction is named by the innermost function of m3ddm_jax/models that emitted it ("part", as
FILE.FUNCTION: vae.ResnetBlock.__call__ is the frozen VAE's, unet3d.ResnetBlockP3D.__call__ the UNet's; the
m3ddm_jax function outside the models where none did) and by its pass: forward, backward (JAX's transpose,
remat's recomputation included), or other (the train step's input stage, optimizer and EMA; the sampler's
arithmetic). What the compiler adds without source (a copy, a collective, a buffer) takes the part of the
value it moves or of the loop that fills it; the program's parameters are "(arguments)".
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

PACKAGE = "/m3ddm_jax/"
MODELS = "/m3ddm_jax/models/"
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0, "s4": 0.5, "u4": 0.5}
# Instructions that move no data of their own (or whose traffic their bodies count).
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
        "replica-id", "opt-barrier", "iota", "while", "conditional", "call"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](?:\{([\d,]*)(?::([^}]*))?\})?")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string as the TPU stores it: each array's minor dimensions padded to its layout's
    first tile (f32[4,8,8,16]{3,0,2,1:T(4,128)} pads dimension 3 to 128 and dimension 0 to 4); a tuple's
    arrays summed."""
    total = 0.0
    for dtype, dims, minor_to_major, tiling in _ARRAY.findall(shape):
        sizes = [int(d) for d in dims.split(",") if d]
        order = [int(d) for d in minor_to_major.split(",") if d] or list(range(len(sizes)))[::-1]
        tile = re.match(r"T\(([\d,]+)\)", tiling or "")
        if tile:
            tile_dims = [int(t) for t in tile.group(1).split(",")]
            for dim, t in zip(order, reversed(tile_dims)):  # the tile's last size goes with the most minor dim
                sizes[dim] = -(-sizes[dim] // t) * t
        n = 1
        for d in sizes:
            n *= d
        total += n * DTYPE_BYTES.get(dtype, 4)
    return int(total)


def _split_shape(rest: str) -> tuple[str, str]:
    """'SHAPE opcode(...)...' -> (SHAPE, the remainder); a tuple shape holds spaces inside its parentheses."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                return rest[:i + 1], rest[i + 2:]
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _operands(call: str) -> list[str]:
    """The %names in the top-level parentheses of 'opcode(%a, %b), attrs'."""
    depth, start = 0, call.find("(")
    for i in range(start, len(call)):
        depth += {"(": 1, ")": -1}.get(call[i], 0)
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", call[start:i])
    return []


def _instruction(line: str) -> dict | None:
    """One instruction line of a computation: its name, shape, opcode, operands, source and what the loop
    analysis needs (called computations, a scalar constant's value, a tuple index, a compare's direction)."""
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    shape, tail = _split_shape(m.group(2))
    opcode = tail.split("(", 1)[0]

    def field(pattern: str) -> str | None:
        found = re.search(pattern, tail)
        return found.group(1) if found else None

    literal = re.match(r"constant\((-?\d+)\)", tail) if opcode == "constant" else None
    index = field(r", index=(\d+)")
    return {"name": m.group(1), "shape": shape, "opcode": opcode, "operands": _operands(tail),
            "root": line.lstrip().startswith("ROOT "), "less_than": "direction=LT" in tail,
            "op_name": field(r'op_name="([^"]*)"') or "", "frame": int(field(r"stack_frame_id=(\d+)") or 0),
            "condition": field(r"condition=%([\w.\-]+)") or "",
            "literal": int(literal.group(1)) if literal else None, "index": int(index) if index else None,
            "called": re.findall(r"(?:body|calls|to_apply)=%([\w.\-]+)", tail) + [
                c for group in re.findall(r"branch_computations=\{([^}]*)\}", tail)
                for c in re.findall(r"%([\w.\-]+)", group)]}


class Module:
    """The scheduled HLO module of one dump: its computations' instructions and the source of each."""

    def __init__(self, path: str):
        self.computations: dict[str, list[dict]] = {}
        self.entry = None
        files, funcs, locs, frames = {}, {}, {}, {}
        tables = {"FileNames": files, "FunctionNames": funcs, "FileLocations": locs, "StackFrames": frames}
        table, current = None, None
        with open(path) as f:
            for line in f:
                line = line.rstrip("\n")
                if line in tables:
                    table = tables[line]
                    continue
                if table is not None:
                    if line[:1].isdigit():
                        key, rest = line.split(" ", 1)
                        table[int(key)] = rest
                        continue
                    table = None
                if line.endswith("{") and not line.startswith(" "):
                    name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
                    current = self.computations.setdefault(name, [])
                    if line.startswith("ENTRY"):
                        self.entry = name
                    continue
                ins = _instruction(line) if current is not None else None
                if ins:
                    current.append(ins)
        ints = lambda s: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", s)}  # noqa: E731
        self._locs = {k: ints(v) for k, v in locs.items()}
        self._frames = {k: ints(v) for k, v in frames.items()}
        self._files = {k: v.strip('"') for k, v in files.items()}
        self._funcs = {k: v.strip('"') for k, v in funcs.items()}
        self.by_name = {i["name"]: i for body in self.computations.values() for i in body}
        self._inner_parameters = {i["name"] for name, body in self.computations.items() if name != self.entry
                                  for i in body if i["opcode"] == "parameter"}
        self.users: dict[str, list[str]] = collections.defaultdict(list)
        for ins in self.by_name.values():
            for o in ins["operands"]:
                self.users[o].append(ins["name"])
        self._parts: dict[int, str] = {}

    def stack(self, frame: int) -> list[tuple[str, str]]:
        """(file, function) of a stack frame and its callers, innermost first. A frame's parent_frame_id is the
        parent's id plus one (0: none)."""
        out = []
        while frame in self._frames and len(out) < 200:
            loc = self._locs[self._frames[frame]["file_location_id"]]
            out.append((self._files[loc["file_name_id"]], self._funcs[loc["function_name_id"]]))
            parent = self._frames[frame]["parent_frame_id"] - 1
            if parent <= 0 or parent == frame:
                break
            frame = parent
        return out

    def part(self, frame: int) -> str:
        """The innermost models/ function of a frame's stack, else its innermost m3ddm_jax function."""
        if frame not in self._parts:
            stack = self.stack(frame)
            model = [f"{os.path.basename(file)[:-3]}.{fn}" for file, fn in stack if MODELS in file]
            package = [f"{os.path.basename(file)[:-3]}.{fn}" for file, fn in stack if PACKAGE in file]
            self._parts[frame] = (model or package or ["(compiler)"])[0]
        return self._parts[frame]

    def _constant(self, name: str) -> int | None:
        for _ in range(8):  # through the copies the compiler puts between a constant and its use
            ins = self.by_name.get(name)
            if ins is None:
                return None
            if ins["literal"] is not None:
                return ins["literal"]
            if ins["opcode"] not in ("copy", "bitcast", "convert") or not ins["operands"]:
                return None
            name = ins["operands"][0]
        return None

    def trips(self, loop: dict) -> int | None:
        """A while loop's trip count from its counter: the condition `counter < N`, the counter's start in the
        loop's initial tuple and its step in the body's result (a loop XLA unrolled steps by more than 1).
        None where the loop is not of that form."""
        cond = self.computations.get(loop["condition"], [])
        body = self.computations.get(loop["called"][0] if loop["called"] else "", [])
        compare = [i for i in cond if i["opcode"] == "compare"]
        if len(compare) != 1 or len(compare[0]["operands"]) != 2 or not body or not loop["operands"]:
            return None
        counter = self.by_name.get(compare[0]["operands"][0], {})
        bound = self._constant(compare[0]["operands"][1])
        k = counter.get("index")
        init_tuple, root = self.by_name.get(loop["operands"][0], {}), body[-1]
        for ins in body:
            if ins.get("root"):
                root = ins
        if bound is None or k is None or init_tuple.get("opcode") != "tuple" or root["opcode"] != "tuple":
            return None
        start = self._constant(init_tuple["operands"][k]) if k < len(init_tuple["operands"]) else None
        step_ins = self.by_name.get(root["operands"][k], {}) if k < len(root["operands"]) else {}
        while step_ins.get("opcode") in ("copy", "bitcast") and step_ins["operands"]:
            step_ins = self.by_name.get(step_ins["operands"][0], {})
        steps = [self._constant(o) for o in step_ins.get("operands", [])] if step_ins.get("opcode") == "add" else []
        step = next((c for c in steps if c is not None), None)
        if start is None or not step or step < 0 or not compare[0]["less_than"]:
            return None
        return max(0, -(-(bound - start) // step))

    def source(self, ins: dict) -> tuple[str, str]:
        """An instruction's (part, pass); one the compiler added (a copy, a prefetch, a collective) takes those
        of the value it moves, a buffer it allocates those of its first user (the loop that fills it), and the
        program's parameters are "(arguments)"."""
        for _ in range(32):
            if ins["frame"]:
                return self.part(ins["frame"]), direction(ins["op_name"])
            if ins["opcode"] == "parameter" and ins["name"] not in self._inner_parameters:
                return "(arguments)", "other"
            nxt = ins["operands"][:1] or self.users.get(ins["name"], [])[:1]
            if not nxt or nxt[0] not in self.by_name:
                break
            ins = self.by_name[nxt[0]]
        return "(compiler)", "other"


def direction(op_name: str) -> str:
    if "transpose(" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "other"


def traffic(module: Module, loops: bool = True) -> tuple[collections.Counter, set[str]]:
    """Bytes read and written by (part, pass): each instruction's operands and result (an asynchronous
    operation's once, at its start, whose result holds both ends), through calls and the largest branch of each
    conditional; loop bodies times their trip count, or once with loops=False (the compiler's cost analysis
    counts a body once). Also returns the loops whose trip count could not be read (counted once)."""
    totals: collections.Counter = collections.Counter()
    unknown: set[str] = set()

    def walk(name: str, times: int, into: collections.Counter) -> None:
        for ins in module.computations.get(name, []):
            if ins["opcode"] == "while":
                trips = module.trips(ins) if loops else 1
                if trips is None:  # counted once, and said
                    unknown.add(ins["name"])
                walk(ins["called"][0] if ins["called"] else "", times * (1 if trips is None else trips), into)
            elif ins["opcode"] == "call":
                for c in ins["called"]:
                    walk(c, times, into)
            elif ins["opcode"] == "conditional":
                branches = []
                for c in ins["called"]:
                    branch: collections.Counter = collections.Counter()
                    walk(c, times, branch)
                    branches.append(branch)
                if branches:
                    into.update(max(branches, key=lambda b: sum(b.values())))
            elif ins["opcode"] not in FREE and not ins["opcode"].endswith("-done"):
                moved = shape_bytes(ins["shape"])
                if not ins["opcode"].endswith("-start"):
                    moved += sum(shape_bytes(module.by_name[o]["shape"]) for o in ins["operands"]
                                 if o in module.by_name)
                into[module.source(ins)] += times * moved

    walk(module.entry, 1, totals)
    return totals, unknown


def peak(live_range: str, module: Module) -> tuple[collections.Counter, int]:
    """The values the compiler lists as live at the peak of its schedule (its live-range report; arguments and
    temporaries), by (part, pass), and their sum."""
    totals: collections.Counter = collections.Counter()
    listing = False
    with open(live_range) as f:
        for line in f:
            if "(peak):" in line:
                listing = True
            elif listing:
                m = re.match(r"\s+([\w.\-]+)\{[\d,]*\}: (\d+) bytes", line)
                if not m:
                    break
                ins = module.by_name.get(m.group(1), {"frame": 0, "op_name": "", "opcode": "", "operands": []})
                totals[module.source(ins)] += int(m.group(2))
    return totals, sum(totals.values())


def _dump_files(dump: str) -> tuple[str, str]:
    """The after-optimizations HLO and live-range report of the dump's largest module."""
    hlo = [p for p in glob.glob(os.path.join(dump, "*.after_optimizations.txt"))]
    if not hlo:
        raise SystemExit(f"aot_breakdown: no *.after_optimizations.txt in {dump}: compile with "
                         "tools/aot_compile.py --dump DIR (a program that does not fit stops before these dumps)")
    path = max(hlo, key=os.path.getsize)
    return path, path[:-len(".txt")] + "-live-range.txt"


def table(counter: collections.Counter, total: int, top: int) -> list[str]:
    passes = collections.Counter()
    for (_, way), n in counter.items():
        passes[way] += n
    rows = ["  by pass: " + ", ".join(f"{way} {n / 1e9:.2f} GB ({100 * n / max(total, 1):.0f}%)"
                                      for way, n in passes.most_common()),
            f"  {'part':<46} {'pass':<9} {'GB':>9} {'share':>6}"]
    for (part, way), n in counter.most_common(top):
        rows.append(f"  {part[:46]:<46} {way:<9} {n / 1e9:9.3f} {100 * n / max(total, 1):5.1f}%")
    rest = total - sum(n for _, n in counter.most_common(top))
    if rest > 0:
        rows.append(f"  {'(the rest)':<46} {'':<9} {rest / 1e9:9.3f} {100 * rest / max(total, 1):5.1f}%")
    return rows


def breakdown(dump: str, report: dict | None = None, top: int = 12) -> dict:
    hlo, live_range = _dump_files(dump)
    module = Module(hlo)
    moved, unknown = traffic(module)
    loops = sum(i["opcode"] == "while" for body in module.computations.values() for i in body)
    live, at_peak = peak(live_range, module)
    out = {"module": os.path.basename(hlo), "bytes_accessed": sum(moved.values()),
           "bytes_accessed_loop_bodies_once": sum(traffic(module, loops=False)[0].values()),
           "loops": loops, "loops_counted_once": len(unknown), "peak_bytes": at_peak,
           "traffic": [[p, w, n] for (p, w), n in moved.most_common()],
           "peak": [[p, w, n] for (p, w), n in live.most_common()]}
    accessed = (report or {}).get("bytes_accessed_per_device")
    compiler = f" (the compiler's cost analysis, which counts them once: {accessed / 1e9:.2f} GB)" if accessed else ""
    lines = [out["module"], f"bytes read + written per device: {out['bytes_accessed'] / 1e9:.2f} GB; loop bodies "
             f"counted once: {out['bytes_accessed_loop_bodies_once'] / 1e9:.2f} GB{compiler}",
             f"loops: {loops}, {len(unknown)} of them with no trip count read from their counter (counted once)"]
    lines += table(moved, out["bytes_accessed"], top)
    sizes = (report or {}).get("per_device_bytes") or {}
    lines.append(f"live at the compiler's peak of memory use: {at_peak / 2 ** 30:.2f} GiB"
                 + (f" (its report: arguments {sizes['arguments'] / 2 ** 30:.2f} + temporaries "
                    f"{sizes['temp'] / 2 ** 30:.2f} GiB)" if sizes else ""))
    lines += table(live, at_peak, top)
    out["text"] = "\n".join(lines)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", help="the --dump folder of tools/aot_compile.py")
    parser.add_argument("--report", help="that compile's --json report (its bytes accessed and temporaries)")
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    parser.add_argument("--json", help="also write the breakdown here")
    args = parser.parse_args()
    report = json.load(open(args.report)) if args.report else None
    out = breakdown(args.dump, report, args.top)
    print(out["text"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in out.items() if k != "text"}, f, indent=1)


if __name__ == "__main__":
    main()
