r"""Train-step throughput and memory of this codebase, and of transformers' Llama.

  python benchmarks/step.py --model=retention_jax/presets.py:tiny --batch=16 --seq_len=256 --torch
  python benchmarks/step.py --model=retention_jax/presets.py:smollm2_135m --batch=4 --torch
  python benchmarks/step.py --model=retention_jax/presets.py:tiny --model.attention=xla --profile
  python benchmarks/step.py --suite=device --out=/tmp/bench        # benchmarks/device.sh

Compare suite: compile time, step time, tokens/s, model TFLOP/s and MFU, the compiled
step's memory, and with `--torch` (hf extra) a `LlamaForCausalLM` step with AdamW
(β 0.9/0.95, weight decay 0.1, clipping 1.0) on the same batch, run eagerly and under
`torch.compile`. The three are timed in `--reps` interleaved rounds (machine load hits
all of them alike) and medians are printed. FLOPs per token are
`cost.flops_per_token` (6·N_matmul + 6·layers·seq·d_model, causal attention, the
MaxText convention). The peak is the accelerator's bf16 datasheet value, or on a CPU a
measured matmul (perf.measured_peak), so CPU MFU reads as "share of what this host's
matmul reaches". `--profile` adds the step's most expensive XLA ops (a jax.profiler
trace).

Device suite: every model × attention implementation × remat policy of the grid below
(bf16 compute), each with tokens/s, MFU, compiled memory and errors (an out-of-memory
or unsupported combination is recorded, not fatal), plus the top ops of one short
profile per model, written to `<out>/device.json`. `--tiny` runs a CPU-sized grid.
"""

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import base  # noqa: E402
from retention_jax import config, cost, perf, presets, sharding, trainer  # noqa: E402
from retention_jax import model as model_lib  # noqa: E402

_MODEL = config_flags.DEFINE_config_file("model", "retention_jax/presets.py:tiny", "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step (global batch).")
_MICRO = flags.DEFINE_integer("microbatches", 1, "Gradient accumulation steps per step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per round (after one warm-up step).")
_REPS = flags.DEFINE_integer("reps", 3, "Interleaved timing rounds; medians are reported.")
_TORCH = flags.DEFINE_bool("torch", False, "Also time transformers (eager and compiled).")
_PROFILE = flags.DEFINE_bool("profile", False, "Print the step's top XLA ops.")
_SUITE = flags.DEFINE_enum("suite", "compare", ["compare", "device"], "What to run.")
_OUT = flags.DEFINE_string("out", None, "Device suite: directory for device.json.")
_TINY = flags.DEFINE_bool("tiny", False, "Device suite: CPU-sized models and steps.")

GIB = 2**30


def host_batch(vocab: int, batch: int, length: int) -> dict:
    toks = np.random.RandomState(0).randint(1, vocab, (batch, length + 1)).astype(np.int32)
    return dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        segment_ids=np.ones((batch, length), np.int32),
        positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
    )


def memory(exe) -> dict:
    """Per-device bytes of a compiled step (XLA's memory analysis), in GiB."""
    m = exe.memory_analysis()
    return {
        "argument_gib": m.argument_size_in_bytes / GIB,
        "output_gib": m.output_size_in_bytes / GIB,
        "temp_gib": m.temp_size_in_bytes / GIB,
        "alias_gib": m.alias_size_in_bytes / GIB,
    }


class JaxStep:
    """The compiled train step of one model on all local devices, ready to time."""

    def __init__(self, mcfg: config.Model, host: dict, microbatches: int = 1):
        c = base.get_config()
        c.pretrain.update(batch=len(host["inputs"]), microbatches=microbatches)
        mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
        opt = config.parse_optimizer(c.pretrain, "pretrain", mesh.size)
        fns = trainer.step_functions(mcfg, opt, mesh, c.rules)
        params = trainer.init_params(fns, 0)
        self.state = trainer.fresh_state(fns, params, opt.schedule(1000, 1))
        self.batch = {k: jax.device_put(v, fns.batch_sharding) for k, v in host.items()}
        shapes = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
            for k, v in self.batch.items()
        }
        self.exe, self.compile_s = trainer.compile_train(fns, shapes)
        self.rng = jax.random.PRNGKey(0)
        self.run(1)  # warm-up

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, m = self.exe(self.state, self.batch, self.rng)
        jax.block_until_ready(m)
        return (time.perf_counter() - start) / steps


def top_ops(step: JaxStep, steps: int = 2, n: int = 12) -> list[dict]:
    """The `n` XLA ops with the most device time over `steps` steps (jax.profiler).

    Each op is named as the trace names it, with its HLO opcode and the JAX source op
    (metadata op_name) looked up in the compiled module's text.
    """
    hlo = {}
    for line in step.exe.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(", line)
        if m:
            src = re.search(r'op_name="([^"]*)"', line)
            hlo[m.group(1)] = (m.group(2), src.group(1) if src else "")
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            step.run(steps)
        path = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total = collections.Counter()
    for e in events:
        op = e.get("args", {}).get("hlo_op")
        if e.get("ph") == "X" and op and not e["name"].startswith("end: "):
            total[op] += e.get("dur", 0.0)
    all_us = sum(total.values()) or 1.0
    return [
        {
            "op": op,
            "opcode": hlo.get(op, ("", ""))[0],
            "source": hlo.get(op, ("", ""))[1][-90:],
            "ms_per_step": us / 1e3 / steps,
            "share": us / all_us,
        }
        for op, us in total.most_common(n)
    ]


def torch_step(mcfg, host: dict, compiled: bool):
    """A transformers Llama train step on the same batch; returns step(n) -> s/step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=mcfg.vocab_size,
        hidden_size=mcfg.d_model,
        intermediate_size=mcfg.d_mlp,
        num_hidden_layers=mcfg.n_layers,
        num_attention_heads=mcfg.n_heads,
        num_key_value_heads=mcfg.n_kv_heads,
        head_dim=mcfg.head_dim,
        rms_norm_eps=mcfg.norm_eps,
        rope_theta=mcfg.rope_base,
        tie_word_embeddings=mcfg.tie_embeddings,
        max_position_embeddings=host["inputs"].shape[1],
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).train()
    dtype = torch.bfloat16 if mcfg.dtype == "bfloat16" else torch.float32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs = torch.from_numpy(host["inputs"]).long()
    labels = torch.from_numpy(host["targets"]).long()

    def loss_fn():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=inputs).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    forward = torch.compile(loss_fn) if compiled else loss_fn

    def one():
        forward().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            one()
        return (time.perf_counter() - start) / steps

    run(2 if compiled else 1)  # warm-up (compiled: trace, then the first cached run)
    return run


def compare(mcfg: config.Model) -> None:
    host = host_batch(mcfg.vocab_size, _BATCH.value, _SEQ.value)
    tokens = _BATCH.value * _SEQ.value
    fpt = cost.flops_per_token(mcfg, _SEQ.value)
    peak, source = perf.peak_flops(dtype=mcfg.dtype)
    print(
        f"model {model_lib.count_params(mcfg):,} parameters, {fpt / 1e6:.1f} MFLOP/token; "
        f"batch {_BATCH.value} × {_SEQ.value}, {_MICRO.value} microbatch(es); "
        f"attention {model_lib.attention_impl(mcfg, _SEQ.value)}, layer unroll "
        f"{model_lib.layer_unroll(mcfg)}; {jax.device_count()} × "
        f"{jax.devices()[0].device_kind}; peak {peak / 1e12:.3f} TFLOP/s ({source})"
    )
    j = JaxStep(mcfg, host, _MICRO.value)
    mem = memory(j.exe)
    print(
        f"jax compile {j.compile_s:.1f}s; per-device memory: arguments "
        f"{mem['argument_gib']:.3f} GiB, temp {mem['temp_gib']:.3f} GiB"
    )
    runners = {"jax": j.run}
    if _TORCH.value:
        import torch

        runners["torch eager"] = torch_step(mcfg, host, compiled=False)
        runners["torch.compile"] = torch_step(mcfg, host, compiled=True)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # Process CPU time too: on a loaded host it is steadier than wall time.
    times = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for _ in range(_REPS.value):
        for name, run in runners.items():
            c0 = time.process_time()
            times[name].append(run(_STEPS.value))
            cpu[name].append((time.process_time() - c0) / _STEPS.value)
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    for name, seconds in med.items():
        tp = perf.throughput(tokens, seconds, fpt, peak)
        runs = ", ".join(f"{tokens / s:,.0f}" for s in times[name])
        line = f"{name:>13}: step {seconds * 1e3:8.1f} ms  {tp['tokens_per_s']:9,.0f} tok/s"
        line += f" (runs {runs}); CPU {med_cpu[name] * 1e3:8.1f} ms/step"
        if name == "jax":
            line += f"  {tp['tflops_per_device']:.4f} TFLOP/s/device  MFU {tp['mfu']:.1%}"
        else:
            line += f"  jax/{name} speed {seconds / med['jax']:.2f}× wall, "
            line += f"{med_cpu[name] / med_cpu['jax']:.2f}× CPU time"
        print(line)
    if _PROFILE.value:
        for op in top_ops(j):
            print(
                f"  {op['ms_per_step']:8.2f} ms {op['share']:6.1%}  {op['op']:<28} "
                f"{op['opcode']:<12} {op['source']}"
            )


def _grid(tiny: bool) -> list[tuple[str, dict, int, int]]:
    """(name, model config overrides, batch, seq_len) per model of the device suite."""
    if tiny:
        return [("tiny", dict(n_layers=2), 2, 64)]
    return [("smollm2_135m", dict(), 16, 2048), ("paper_1b", dict(), 8, 2048)]


def device_suite(out: str, tiny: bool) -> dict:
    """Runs the device grid and writes `<out>/device.json`; returns its content."""
    backend = jax.default_backend()
    attentions = ["einsum", "einsum_vjp", "xla"] + {"gpu": ["cudnn"], "tpu": ["splash"]}.get(
        backend, []
    )
    remats = ["none", "full"] if tiny else ["none", "dots", "full"]
    steps = 2 if tiny else 5
    peak, peak_source = perf.peak_flops(dtype="bfloat16")
    report = {
        "backend": backend,
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "peak_flops": peak,
        "peak_source": peak_source,
        "runs": [],
        "profiles": {},
    }
    start = time.perf_counter()
    for name, overrides, batch, seq in _grid(tiny):
        raw = presets.tiny() if tiny else presets.PRESETS[name]()
        raw.update(overrides, dtype="bfloat16")
        host = host_batch(raw.vocab_size, batch, seq)
        fpt = cost.flops_per_token(config.parse_model(raw), seq)
        best = None
        for attention in attentions:
            for remat in remats:
                raw.attention, raw.remat = attention, remat
                run = dict(model=name, attention=attention, remat=remat, batch=batch, seq_len=seq)
                try:
                    j = JaxStep(config.parse_model(raw), host)
                    seconds = min(j.run(steps) for _ in range(2))
                    run.update(compile_s=j.compile_s, step_s=seconds, **memory(j.exe))
                    run.update(perf.throughput(batch * seq, seconds, fpt, peak))
                    if best is None or seconds < best[0]:
                        best = (seconds, j, attention, remat)
                    else:
                        del j
                except Exception as e:  # recorded: OOM or an unsupported combination
                    run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                report["runs"].append(run)
                print(json.dumps(run), flush=True)
        if best is not None:
            _, j, attention, remat = best
            report["profiles"][name] = dict(
                attention=attention, remat=remat, top_ops=top_ops(j, steps=2)
            )
            del j
    report["wall_s"] = time.perf_counter() - start
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "device.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv) -> None:
    del argv
    if _SUITE.value == "device":
        out = _OUT.value or os.environ.get("OUT") or "."
        report = device_suite(out, _TINY.value)
        print(f"wrote {os.path.join(out, 'device.json')} ({len(report['runs'])} runs)")
    else:
        compare(config.parse_model(_MODEL.value))


if __name__ == "__main__":
    app.run(main)
