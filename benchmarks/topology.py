r"""Compiles the paper configs for Cloud TPU slices on this host and writes what each
program needs into the configs' docstrings.

  pip install -e '.[tpu]'
  python benchmarks/topology.py                 # every target below; rewrites docstrings
  python benchmarks/topology.py --only=paper_1b --nowrite

Each target is a config file, its argument and a gcloud accelerator type; every distinct
program of the graph is compiled for the slice (retention_jax.topology: deviceless, with
libtpu) and summarised in the paragraph of the config's docstring that starts with
`PARAGRAPH`, replaced whole on every run. Compiles of the 1B programs take minutes on a
small CPU host; the persistent compilation cache (`--cache`) serves repeats.
"""

import importlib
import os
import re
import sys
import textwrap
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from retention_jax import topology  # noqa: E402

# (config module, argument, accelerator): 1B on a v5p and a v5e slice, 135M on a small one.
TARGETS = (
    ("paper_135m", "musicpile-chempile", "v5p-8"),
    ("paper_1b", "musicpile-chempile", "v5p-64"),
    ("paper_1b", "musicpile-chempile", "v5litepod-64"),
    ("1b_early_exposure", "musicpile-chempile,dropout", "v5p-64"),
)
PARAGRAPH = "Compiled for Cloud TPU"
WIDTH = 92

_ONLY = flags.DEFINE_string("only", "", "Config modules to compile (comma-separated).")
_WRITE = flags.DEFINE_bool("write", True, "Rewrite the configs' docstrings.")
_CACHE = flags.DEFINE_string(
    "cache", os.path.expanduser("~/.cache/retention_jax/jax"), "Persistent compilation cache."
)


def summary(target: str, programs: list, s: topology.Slice, seconds: float) -> list[str]:
    """One entry per program: per-device HBM, FLOPs, roofline, MFU, attention kernel."""
    gib = topology.GIB
    lines = textwrap.wrap(
        f"{target} on {s.accelerator} ({s.topology_name}, {s.n_devices} devices, "
        f"{s.hosts} host(s), {s.chip.hbm_bytes / gib:.2f} GiB HBM each; all compiled in "
        f"{seconds:.0f} s):",
        WIDTH,
    )
    for p in programs:
        kernel = " in Mosaic" if p.hlo.mosaic_calls else ""
        coll = ", ".join(f"{op} ×{c}" for op, (c, _) in p.hlo.collectives.items()) or "none"
        text = (
            f"{p.name}, {p.rows} rows in {p.microbatches} microbatch(es): "
            f"{p.argument_bytes / gib:.2f} + {p.temp_bytes / gib:.2f} GiB (arguments + "
            f"temporaries, {p.hbm_bytes / s.chip.hbm_bytes:.0%} of HBM), "
            f"{p.flops / 1e12:.1f} TFLOP, roofline {p.roofline_s(s.chip) * 1e3:,.0f} ms, "
            f"MFU {p.mfu(s.chip):.0%}, {p.attention} attention{kernel}; collectives {coll}."
        )
        lines += textwrap.wrap(text, WIDTH, initial_indent="  ", subsequent_indent="    ")
    return lines


def rewrite(path: str, entries: list[list[str]]) -> None:
    """Replaces (or appends) the docstring paragraph that starts with PARAGRAPH."""
    with open(path) as f:
        source = f.read()
    end = source.index('"""', source.index('"""') + 3)  # the module docstring's close
    doc = source[:end]
    head = (
        f"{PARAGRAPH} (deviceless, libtpu; `python benchmarks/topology.py` writes this "
        "paragraph; per device, arguments and temporaries from XLA's memory analysis, FLOPs "
        "of the compiled matmuls, roofline from the chip's peak and HBM bandwidth):"
    )
    block = "\n".join(textwrap.wrap(head, WIDTH) + [line for e in entries for line in e])
    pattern = re.compile(rf"\n{re.escape(PARAGRAPH)} .*?(?=\n\n|\n?\Z)", re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: "\n" + block, doc)
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc + source[end:])


def main(argv) -> None:
    del argv
    topology.cpu_host()
    import jax

    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    only = set(filter(None, _ONLY.value.split(",")))
    written: dict[str, list] = {}
    for module, arg, accelerator in TARGETS:
        if only and module not in only:
            continue
        cfg = importlib.import_module(f"configs.{module}").get_config(arg)
        start = time.perf_counter()
        s = topology.parse(accelerator)
        programs = topology.check(cfg, accelerator)
        lines = summary(f"{module}:{arg}", programs, s, time.perf_counter() - start)
        print("\n".join(lines), flush=True)
        written.setdefault(module, []).append(lines)
    if _WRITE.value:
        for module, entries in written.items():
            rewrite(os.path.join(_ROOT, "configs", f"{module}.py"), entries)


if __name__ == "__main__":
    app.run(main)
