"""Every compiled program of an experiment graph, compiled for a real TPU slice on any host.

libtpu (the `tpu` extra) describes a slice's chips without owning one
(`jax.experimental.topologies`), and XLA's TPU compiler lays each program out for them:
its per-chip HBM, FLOPs, collectives and kernels are the TPU's, not those of fake CPU
devices. So a wrong sharding, a Mosaic kernel that does not lower or a step that does
not fit HBM shows up here, before any VM is paid for.

Accelerator names are gcloud's (`--accelerator-type`): v4-N and v5p-N count TensorCores
(two a chip, driven as one megacore device), so N/2 chips and devices; v2-N and v3-N
count TensorCores too, each its own device (N/2 chips, N devices); v5litepod-N (v5e-N)
and v6e-N count chips. Grids follow Cloud TPU's slice shapes (v5p-64: 2x4x4 chips,
v5litepod-16: 4x4); a host holds 4 chips, except v5e/v6e slices of up to 8 chips (one
host). Per-device figures (HBM, FLOPs) are a chip's, or a TensorCore's on v2/v3.
"""

import dataclasses
import functools
import importlib.util
import math
import os
import re
import time
from collections.abc import Callable
from typing import NoReturn

import jax

from retention_jax import cost, errors, graph, sharding, trainer
from retention_jax import model as model_lib

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of a generation, per device: a chip, or on v2/v3 (no megacore)
    one of its two TensorCores (Cloud TPU system architecture pages)."""

    kind: str  # the generation as libtpu's topology names spell it
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bytes_per_s: float
    cores_in_name: int  # TensorCores per chip counted by the accelerator name's N
    dims: int  # torus dimensions of the chip grid
    megacore: bool = True  # two TensorCores driven as one device

    @property
    def devices_per_chip(self) -> int:
        return 1 if self.megacore else self.cores_in_name


# HBM: what XLA's TPU compiler (libtpu 0.0.42) lets a program use, from its
# out-of-memory message: 16 GiB on v5e less 0.25 GiB reserved, and so on.
_V5E = Chip("v5e", 197e12, 15.75 * GIB, 819e9, 1, 2)
CHIPS = {
    "v2": Chip("v2", 22.5e12, 7.48 * GIB, 350e9, 2, 2, megacore=False),
    "v3": Chip("v3", 61.5e12, 15.48 * GIB, 450e9, 2, 2, megacore=False),
    "v4": Chip("v4", 275e12, 30.75 * GIB, 1228e9, 2, 3),
    "v5p": Chip("v5p", 459e12, 95.74 * GIB, 2765e9, 2, 3),
    "v5litepod": _V5E,
    "v5e": _V5E,
    "v6e": Chip("v6e", 918e12, 31.25 * GIB, 1640e9, 1, 2),
}
CHIPS_PER_HOST = 4
SINGLE_HOST_2D = 8  # v5e/v6e slices of up to 8 chips are one host
MAX_2D = 256  # a full v5e/v6e pod: 16x16 chips


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator: str  # as gcloud names it: v5p-64
    chip: Chip
    grid: tuple[int, ...]  # chips along each torus axis
    hosts: int

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def n_devices(self) -> int:
        return self.chips * self.chip.devices_per_chip

    @property
    def topology_name(self) -> str:
        return f"{self.chip.kind}:{'x'.join(map(str, self.grid))}"

    def describe(self) -> str:
        unit = "chip" if self.chip.megacore else "TensorCore"
        return (
            f"{self.accelerator}: {self.chips} {self.chip.kind} chips "
            f"({self.topology_name}), {self.n_devices} devices, {self.hosts} host(s); "
            f"a {unit}: {self.chip.hbm_bytes / GIB:.1f} GiB HBM, "
            f"{self.chip.peak_flops / 1e12:.1f} TFLOP/s bf16, "
            f"{self.chip.hbm_bytes_per_s / 1e9:,.0f} GB/s"
        )


def _grid(chips: int, dims: int) -> tuple[int, ...] | None:
    """Cloud TPU's slice shape for `chips` (a power of two): from one host's 2x2 (x1), the
    last of the shortest axes doubles (16 → 2x2x4, 32 → 2x4x4, 64 → 4x4x4). 2-D slices
    (v5e, v6e, v2, v3) also come as one chip and end at 16x16."""
    if chips < 1 or chips & (chips - 1) or (dims == 2 and chips > MAX_2D):
        return None
    if chips < 4:
        return (1, 1) if dims == 2 and chips == 1 else None
    grid = [2, 2] + [1] * (dims - 2)
    while math.prod(grid) < chips:
        shortest = min(grid)
        grid[max(i for i, n in enumerate(grid) if n == shortest)] *= 2
    return tuple(grid)


def parse(accelerator: str) -> Slice:
    """A gcloud accelerator type (v4-32, v5p-64, v5litepod-16 / v5e-16, v6e-8) as a slice."""
    m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator)
    chip = CHIPS[m.group(1)] if m else None
    n = int(m.group(2)) if m else 0
    chips = n // chip.cores_in_name if chip and n % chip.cores_in_name == 0 else 0
    grid = _grid(chips, chip.dims) if chip else None
    if grid is None:
        errors.fail(
            "--topology",
            accelerator,
            "a Cloud TPU accelerator type: v2-N, v3-N, v4-N or v5p-N (N TensorCores, two "
            "a chip, N ≥ 8) or v5litepod-N / v5e-N / v6e-N (N chips: 1, 4, 8, ... 256); "
            "N a power of two",
        )
    single = chip.cores_in_name == 1 and chips <= SINGLE_HOST_2D
    hosts = 1 if single else max(1, chips // CHIPS_PER_HOST)
    return Slice(accelerator, chip, grid, hosts)


def devices(s: Slice) -> list[jax.Device]:
    """Compile-only devices of the slice (no TPU needed; libtpu must be installed)."""
    from jax.experimental import topologies

    # libtpu guards a real TPU with a lockfile in /tmp; compiling opens none.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    host = s.grid if s.hosts == 1 else (2, 2) + (1,) * (s.chip.dims - 2)
    return topologies.get_topology_desc(
        platform="tpu",
        topology_name=s.topology_name,
        chip_config_name="megacore" if s.chip.megacore and s.chip.cores_in_name == 2 else "default",
        chips_per_host_bounds=(*host, 1) if len(host) == 2 else host,
    ).devices


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while"}
_NO_TRAFFIC |= {"call", "conditional", "after-all", "partition-id", "replica-id"}
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z\-]*)\((.*)")


def _dims(text: str) -> list[tuple[str, list[int]]]:
    return [
        (dt, [int(d) for d in dims.split(",") if d])
        for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text)
    ]


def _bytes(text: str) -> int:
    return sum(_BYTES.get(dt, 4) * math.prod(d) for dt, d in _dims(text))


@dataclasses.dataclass(frozen=True)
class Hlo:
    """What a step executes, read from the compiled (per-chip) HLO text with every while
    loop's body counted its trip count times (layer scan, microbatches): XLA's own cost
    analysis counts a loop body once."""

    flops: float  # matmuls and convolutions (Mosaic kernels are opaque: not counted)
    bytes: float  # HBM traffic: operands and results of the top-level ops and fusions
    collectives: dict[str, tuple[int, int]]  # op -> (count, result bytes) a step
    mosaic_calls: int


def analyse_hlo(hlo: str) -> Hlo:
    """FLOPs, HBM traffic, collectives and Mosaic kernels of one compiled HLO module."""
    comps: dict[str, list[tuple]] = {}
    name = entry = None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            name = re.match(r"(?:ENTRY )?%?([\w.\-]+)", line).group(1)
            entry = name if line.startswith("ENTRY") else entry
            comps[name] = []
        elif name is not None and (m := _INSTR.match(line)):
            comps[name].append(m.groups())
    times, control = {entry: 1}, {entry}
    order = [entry]
    for comp in order:  # callers before callees: a breadth-first walk from the entry
        for _, _, op, rest in comps[comp]:
            n = 1
            if op == "while":
                cond, body = (
                    re.search(rf"{k}=%?([\w.\-]+)", rest).group(1) for k in ("condition", "body")
                )
                n = _trip_count(comps[cond], comps[body])
            for key, callee in re.findall(r"(body|condition|calls|to_apply)=%?([\w.\-]+)", rest):
                if callee in comps and callee not in times:
                    times[callee] = times[comp] * n
                    order.append(callee)
                    if op in ("while", "call", "conditional") and key != "calls":
                        control.add(callee)
    flops = traffic = 0.0
    coll = {op: [0, 0] for op in _COLLECTIVES}
    mosaic = 0
    for comp, k in times.items():
        shapes = {n: shape for n, shape, _, _ in comps[comp]}
        for _, shape, op, rest in comps[comp]:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            if op == "dot":
                lhs = _dims(shapes[operands[0]])[0][1]
                contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
                size = math.prod(lhs[int(i)] for i in contract.split(",") if i)
                flops += k * 2 * math.prod(_dims(shape)[0][1]) * size
            elif op == "convolution":
                lhs, rhs = (_dims(shapes[o])[0][1] for o in operands[:2])
                flops += k * 2 * _conv_macs(lhs, rhs, _dims(shape)[0][1], rest)
            base = op.removesuffix("-start")
            if base in coll:
                coll[base][0] += k
                coll[base][1] += k * _bytes(shape)
            if op == "custom-call" and 'custom_call_target="tpu_custom_call"' in rest:
                mosaic += 1
            if comp in control and op not in _NO_TRAFFIC and not op.endswith("-done"):
                sizes = [_bytes(shapes.get(o, "")) for o in operands]
                called = re.search(r"calls=%?([\w.\-]+)", rest) if op == "fusion" else None
                inner = comps[called.group(1)] if called else [("", shape, op, rest)]
                traffic += k * _traffic(inner, sizes, _bytes(shape), bool(called))
    collectives = {op: (c, b) for op, (c, b) in coll.items() if c}
    return Hlo(flops, traffic, collectives, mosaic)


def _traffic(inner: list[tuple], operands: list[int], result: int, fused: bool) -> int:
    """HBM bytes one op or fusion moves: its operands and result, except that a slice
    reads only the slice (a stacked layer's weights or residuals in a scan) and an
    in-place dynamic-update-slice writes only the update."""
    if not fused:  # a lone op: its operands are positional
        _, shape, op, rest = inner[0]
        if op == "dynamic-slice":
            return 2 * result
        if op == "dynamic-update-slice":
            return 2 * operands[1]
        return sum(operands) + result
    names = {n: i for n, _, op, r in inner if op == "parameter" for i in [int(r.split(")")[0])]}
    shapes = {n: shape for n, shape, _, _ in inner}
    uses: dict[str, list[tuple[str, str, int]]] = {}
    for n, _, op, rest in inner:
        for pos, a in enumerate(re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])):
            uses.setdefault(a, []).append((n, op, pos))
    read = list(operands)
    for pname, i in names.items():
        users = uses.get(pname, [])
        if users and all(op == "dynamic-slice" and pos == 0 for _, op, pos in users):
            read[i] = sum(_bytes(shapes[n]) for n, _, _ in users)
        if any(op == "dynamic-update-slice" and pos == 0 for _, op, pos in users):
            read[i] = 0  # updated in place: the untouched part is neither read nor written
    root = inner[-1]  # the ROOT is printed last
    outs = re.findall(r"%([\w.\-]+)", root[3].split(")", 1)[0]) if root[2] == "tuple" else [root[0]]
    defs = {n: (op, rest) for n, _, op, rest in inner}
    written = 0
    for o in outs:
        op, rest = defs.get(o, ("", ""))
        if op == "dynamic-update-slice":
            update = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])[1]
            written += _bytes(shapes.get(update, ""))
        else:
            written += _bytes(shapes.get(o, ""))
    return sum(read) + (written if outs else result)


def _conv_macs(lhs: list[int], rhs: list[int], out: list[int], attrs: str) -> int:
    """Multiply-adds of an HLO convolution. XLA:TPU writes batched matmuls as windows over
    padded or dilated inputs: taps that land on padding or dilation holes are not counted."""
    lhs_l, rhs_l, out_l = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs).groups()
    window = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(re.findall(r"(\w+)=([\w\-]+)", window.group(1))) if window else {}
    spatial = sorted(c for c in rhs_l if c.isdigit())

    def per_dim(key: str, default: str) -> list[str]:
        return fields[key].split("x") if key in fields else [default] * len(spatial)

    pads = [int(p.split("_")[0]) for p in per_dim("pad", "0_0")]
    stride, lhs_dil, rhs_dil = (
        [int(v) for v in per_dim(k, "1")] for k in ("stride", "lhs_dilate", "rhs_dilate")
    )
    macs = math.prod(out) * rhs[rhs_l.index("i")]
    for j, d in enumerate(spatial):
        size_in, taps, size_out = lhs[lhs_l.index(d)], rhs[rhs_l.index(d)], out[out_l.index(d)]
        last = (size_in - 1) * lhs_dil[j]  # the dilated input's last position
        positions = (
            o * stride[j] + t * rhs_dil[j] - pads[j] for o in range(size_out) for t in range(taps)
        )
        valid = sum(1 for q in positions if 0 <= q <= last and q % lhs_dil[j] == 0)
        macs = macs // size_out * valid
    return macs


def _trip_count(cond: list[tuple], body: list[tuple]) -> int:
    """Iterations of a counted loop from 0: the condition's `counter < limit` and the
    body's `counter + step` (windowed collective matmuls step by 2). 1 when unreadable."""
    defs = {n: (op, rest) for n, _, op, rest in cond}
    compare = next((rest for _, _, op, rest in cond if op == "compare"), "")
    operands = re.findall(r"%([\w.\-]+)", compare.split(")", 1)[0])
    index = limit = None
    for o in operands:
        op, rest = defs.get(o, ("", ""))
        if op == "constant":
            limit = int(re.match(r"(\d+)", rest).group(1))
        elif op == "get-tuple-element":
            index = re.search(r"index=(\d+)", rest).group(1)
    if limit is None or index is None:
        return 1
    consts = {
        n: int(m.group(1))
        for n, _, op, r in body
        if op == "constant" and (m := re.match(r"(\d+)\)", r))
    }
    counter = {n for n, _, op, r in body if op == "get-tuple-element" and f"index={index}" in r}
    step = 1
    for _, _, op, rest in body:
        args = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        if op == "add" and counter & set(args) and (c := [consts[a] for a in args if a in consts]):
            step = c[0]
    return -(-limit // step)


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's per-chip figures on a slice."""

    name: str  # "pretrain train step", "eval step"
    nodes: int  # graph nodes that run it
    rows: int  # batch rows of one call (global)
    microbatches: int
    knob: str  # the config key that shrinks its memory
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    hlo: Hlo
    kernel_flops: float  # per chip per call inside Mosaic kernels (the model's attention)
    model_flops: float  # per chip per call, cost.flops_per_token (6N + attention)
    attention: str
    compile_s: float

    @property
    def hbm_bytes(self) -> int:
        """Peak HBM a chip holds: inputs, temporaries and the outputs not aliased (donated)."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def flops(self) -> float:
        """Per chip per call: the compiled matmuls (recomputation included) and kernels."""
        return self.hlo.flops + self.kernel_flops

    def roofline_s(self, chip: Chip) -> float:
        """Compute- or HBM-bound time of one call, collectives assumed overlapped. The
        compute is at least the model's: the HLO count can miss work XLA hides from the
        text (a loop whose trip count it does not spell as `counter < limit`)."""
        flops = max(self.flops, self.model_flops)
        return max(flops / chip.peak_flops, self.hlo.bytes / chip.hbm_bytes_per_s)

    def mfu(self, chip: Chip) -> float:
        return self.model_flops / (self.roofline_s(chip) * chip.peak_flops)


def _analyse(exe, head: tuple, flops: tuple, attention: str, seconds: float) -> Program:
    """`head`: Program's first five fields (name, nodes, rows, microbatches, knob);
    `flops`: (model FLOPs, its attention share) per chip per call."""
    mem = exe.memory_analysis()
    hlo = analyse_hlo(exe.as_text())
    model_flops, attention_flops = flops
    return Program(
        *head,
        mem.argument_size_in_bytes,
        mem.temp_size_in_bytes,
        mem.output_size_in_bytes,
        mem.alias_size_in_bytes,
        hlo,
        attention_flops if hlo.mosaic_calls else 0.0,
        model_flops,
        attention,
        seconds,
    )


def _compile_eval(fns: trainer.StepFunctions, batch: dict) -> tuple:
    """The evaluation step compiled like the runtime's (under the mesh), and its seconds."""
    start = time.perf_counter()
    with jax.set_mesh(fns.mesh):
        exe = fns.evaluate.lower(fns.state_shapes.params, batch).compile()
    return exe, time.perf_counter() - start


def _refuse(knob: str, rows: int, mesh_sizes: dict, why: str) -> NoReturn:
    """ConfigError naming what to change: fewer rows a device at once, or the mesh."""
    if rows > 1:
        errors.fail(knob, rows, f"fewer rows a device at once: {why}")
    errors.fail("mesh", dict(mesh_sizes), f"more fsdp sharding or a larger slice: {why}")


def compile_graph(cfg, s: Slice, log: Callable[[str], None] = print) -> tuple[list, dict]:
    """Compiles each distinct program of `cfg`'s graph for slice `s`: a train step per
    (model, optimizer, batch) and an evaluation step per model, with the config's mesh,
    rules and microbatches resolved for the slice's chips. Returns them and the mesh."""
    nodes = graph.expand(cfg, s.n_devices)
    exp0 = nodes[0].exp
    _check_hosts(nodes, s)
    mesh = sharding.make_mesh(exp0.mesh, devices(s))
    groups: dict[tuple, list] = {}
    for n in nodes:
        fkey = (n.model, tuple(sorted(n.optimizer.static().items())))
        groups.setdefault(("train", fkey, n.plan.batch, n.plan.seq_len), []).append(n)
        groups.setdefault(("eval", (n.model, ()), n.exp.eval_batch, n.plan.seq_len), []).append(n)
    fns_cache: dict = {}
    programs = []
    for (kind, _, rows, seq_len), members in groups.items():
        n = members[0]
        stage = "+".join(dict.fromkeys(m.stage for m in members))  # stages sharing the program
        model, opt = n.model, n.optimizer
        key = (model, tuple(sorted(opt.static().items())))
        if key not in fns_cache:  # an eval step reuses its model's first step functions
            fns_cache[key] = trainer.step_functions(model, opt, mesh, n.exp.rules)
        fns = fns_cache[key]
        batch = fns.batch_shapes(rows, seq_len)
        tokens = rows * seq_len / s.n_devices  # a device's share
        total = cost.flops_per_token(model, seq_len) * tokens
        flops = (total, total - cost.flops_per_token(model, 0) * tokens)
        with jax.set_mesh(mesh):
            attention = model_lib.attention_impl(model, seq_len)
        if kind == "train":
            name, micro, knob = (
                f"{stage} train step",
                opt.microbatches,
                f"{n.stage}.microbatch_rows",
            )
            log(f"compiling {name} ({rows} rows, {micro} microbatch(es)) for {s.accelerator}")
            compile_fn = functools.partial(trainer.compile_train, fns, batch)
        else:
            name, micro, knob = "eval step", 1, "eval.batch"
            log(f"compiling {name} ({rows} rows) for {s.accelerator}")
            compile_fn = functools.partial(_compile_eval, fns, batch)
            flops = (flops[0] / 3, flops[1] / 3)  # forward only
        try:
            exe, seconds = compile_fn()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            at_once = rows // (exp0.mesh["data"] * exp0.mesh["fsdp"]) // micro
            why = str(e).splitlines()[0]  # XLA's own words: what it needs, what there is
            _refuse(knob, at_once, exp0.mesh, f"the {name} on {s.accelerator}: {why}")
        programs.append(
            _analyse(exe, (name, len(members), rows, micro, knob), flops, attention, seconds)
        )
    return programs, exp0.mesh


def _check_hosts(nodes, s: Slice) -> None:
    """Each host feeds an equal share of every batch."""
    for n in nodes:
        if n.plan.batch % s.hosts:
            errors.fail(f"{n.stage}.batch", n.plan.batch, f"a multiple of {s.hosts} hosts")
        if n.exp.eval_batch % s.hosts:
            errors.fail("eval.batch", n.exp.eval_batch, f"a multiple of {s.hosts} hosts")


def check_fit(programs: list[Program], s: Slice, mesh_sizes: dict) -> None:
    """Raises ConfigError naming the knob of the first program over a device's HBM."""
    for p in programs:
        if p.hbm_bytes > s.chip.hbm_bytes:
            rows = p.rows // (mesh_sizes["data"] * mesh_sizes["fsdp"]) // p.microbatches
            _refuse(
                p.knob,
                rows,
                mesh_sizes,
                f"the {p.name} on {s.accelerator} needs {p.hbm_bytes / GIB:.1f} GiB a device "
                f"of {s.chip.hbm_bytes / GIB:.2f} GiB HBM",
            )


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def _size(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / 2**20:.1f} MiB"


def table(programs: list[Program], s: Slice) -> str:
    """Per chip: HBM, FLOPs, collectives, kernels, roofline time and MFU of each program."""
    cap = s.chip.hbm_bytes
    w = max(len(p.name) for p in programs)
    lines = [
        s.describe(),
        f"{'program':<{w}} {'nodes':>5} {'rows':>5} {'micro':>5} {'args':>6} {'temp':>6} "
        f"{'out':>6} {'HBM GiB':>8} {'use':>5} {'TFLOP':>8} {'roofline':>9} {'MFU':>5} "
        f"{'compile':>7}  attention",
    ]
    for p in programs:
        kernels = p.hlo.mosaic_calls
        mosaic = f"{p.attention} (Mosaic ×{kernels})" if kernels else p.attention
        lines.append(
            f"{p.name:<{w}} {p.nodes:>5} {p.rows:>5} {p.microbatches:>5} "
            f"{_gib(p.argument_bytes):>6} {_gib(p.temp_bytes):>6} "
            f"{_gib(p.output_bytes - p.alias_bytes):>6} {_gib(p.hbm_bytes):>8} "
            f"{p.hbm_bytes / cap:>5.0%} {p.flops / 1e12:>8.2f} "
            f"{p.roofline_s(s.chip) * 1e3:>7.1f}ms {p.mfu(s.chip):>5.0%} "
            f"{p.compile_s:>6.0f}s  {mosaic}"
        )
        parts = [f"{op} ×{c} {_size(b)}" for op, (c, b) in p.hlo.collectives.items()]
        lines.append(f"{'':<{w}} collectives a call: " + (", ".join(parts) or "none"))
    lines.append(
        "Per chip and call. HBM: arguments + temporaries + outputs not donated (XLA's memory "
        "analysis). TFLOP: the compiled matmuls, loops counted their trip count times, plus "
        "the attention inside Mosaic kernels. Roofline: max(FLOPs (at least the model's) / "
        "peak, HBM traffic / bandwidth), collectives overlapped. MFU: the model's 6N + "
        "attention FLOPs over it."
    )
    return "\n".join(lines)


def check(cfg, accelerator: str, log: Callable[[str], None] = print) -> list[Program]:
    """Compiles the graph's programs for `accelerator`, logs their table and raises
    ConfigError (naming the knob) when one does not fit a chip's HBM."""
    s = parse(accelerator)
    if not libtpu_available():
        raise RuntimeError(
            "--topology needs libtpu: pip install -e '.[tpu]' (it compiles; no TPU is used)"
        )
    programs, mesh_sizes = compile_graph(cfg, s, log)
    log(table(programs, s))
    check_fit(programs, s, mesh_sizes)
    return programs


def cpu_host() -> None:
    """Keeps this process's own devices on the CPU: with libtpu installed JAX would first
    look for a local TPU (0.5 s and a page of warnings on a host without one)."""
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
