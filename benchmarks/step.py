r"""Train-step throughput of this codebase, and of transformers' Llama on the same machine.

  python benchmarks/step.py --model=configs/models.py:tiny --batch=16 --seq_len=256
  python benchmarks/step.py --model=configs/models.py:smollm2_135m --batch=4 --torch
  python benchmarks/step.py --model=configs/models.py:tiny --model.d_model=256 --model.n_layers=6

Prints compile time, step time, tokens/s, model TFLOP/s and MFU. FLOPs per token are
`model.flops_per_token` (6·N_matmul + 6·layers·seq·d_model, causal attention, the
MaxText convention). The peak is the accelerator's bf16 datasheet value, or on a CPU a
measured float32 matmul (perf.measured_peak), so CPU MFU reads as "share of what this
host's matmul reaches". `--torch` (hf extra) times a `LlamaForCausalLM` step with AdamW
(β 0.9/0.95, weight decay 0.1, clipping 1.0) on the same batch and prints the ratio.
"""

import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from configs import base
from retention_jax import model as model_lib
from retention_jax import perf, sharding, train

_MODEL = config_flags.DEFINE_config_file("model", "configs/models.py:tiny", "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_TORCH = flags.DEFINE_bool("torch", False, "Also time transformers' LlamaForCausalLM.")


def _batch(vocab: int, batch: int, length: int) -> dict:
    toks = np.random.RandomState(0).randint(1, vocab, (batch, length + 1)).astype(np.int32)
    return dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        segment_ids=np.ones((batch, length), np.int32),
        positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
    )


def time_jax(mcfg, host: dict, steps: int) -> dict:
    c = base.get_config()
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    fns = train.steps_for(mcfg, c.pretrain, mesh, c.rules)
    state = train.init_state(
        fns, nnx.state(model_lib.create(mcfg, mesh, c.rules, 0)), c.pretrain, 1000
    )
    batch = {k: jax.device_put(v, fns.batch_sharding) for k, v in host.items()}
    exe, compile_s = fns.compile_train(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}
    )
    rng = jax.random.PRNGKey(0)
    state, m = exe(state, batch, rng)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = exe(state, batch, rng)
    jax.block_until_ready(m)
    return {"compile_s": compile_s, "step_s": (time.perf_counter() - start) / steps}


def time_torch(mcfg, host: dict, steps: int) -> dict:
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
    )
    model = LlamaForCausalLM(cfg).train()
    dtype = torch.bfloat16 if mcfg.dtype == "bfloat16" else torch.float32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs = torch.from_numpy(host["inputs"]).long()
    labels = torch.from_numpy(host["targets"]).long()

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"step_s": (time.perf_counter() - start) / steps, "threads": torch.get_num_threads()}


def main(argv) -> None:
    del argv
    mcfg = _MODEL.value
    host = _batch(mcfg.vocab_size, _BATCH.value, _SEQ.value)
    tokens = _BATCH.value * _SEQ.value
    n = model_lib.count_params(mcfg)
    fpt = model_lib.flops_per_token(mcfg, _SEQ.value)
    peak, source = perf.peak_flops(dtype=mcfg.dtype)
    print(
        f"model {n:,} parameters, {fpt / 1e6:.1f} MFLOP/token; batch {_BATCH.value} × "
        f"{_SEQ.value}; {jax.device_count()} × {jax.devices()[0].device_kind}; "
        f"peak {peak / 1e12:.3f} TFLOP/s per device ({source})"
    )
    j = time_jax(mcfg, host, _STEPS.value)
    tp = perf.throughput(tokens, j["step_s"], fpt, peak)
    print(
        f"jax:   compile {j['compile_s']:.1f}s  step {j['step_s'] * 1e3:.1f} ms  "
        f"{tp['tokens_per_s']:,.0f} tok/s  {tp['tflops_per_device']:.4f} TFLOP/s/device  "
        f"MFU {tp['mfu']:.1%}"
    )
    if _TORCH.value:
        t = time_torch(mcfg, host, _STEPS.value)
        print(
            f"torch: step {t['step_s'] * 1e3:.1f} ms  {tokens / t['step_s']:,.0f} tok/s "
            f"({t['threads']} threads)  jax/torch speed {t['step_s'] / j['step_s']:.2f}×"
        )


if __name__ == "__main__":
    app.run(main)
