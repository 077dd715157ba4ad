r"""Model presets: the tiny CPU model, SmolLM2-135M and the paper's 1B.

Each returns the `model` section of an experiment config (an ml_collections ConfigDict,
so `--config.model.d_model=256` overrides it); `config.parse_model` makes it typed.
`PRESETS` and `get_config(name)` name them for tools that take a model by name or by
config file (`benchmarks/step.py --model=retention_jax/presets.py:smollm2_135m`).
"""

import ml_collections as mlc


def _model(**kw) -> mlc.ConfigDict:
    c = mlc.ConfigDict(
        dict(
            vocab_size=49_152,
            d_model=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            head_dim=64,
            d_mlp=1_536,
            rope_base=100_000.0,
            norm_eps=1e-5,
            tie_embeddings=True,
            init_std=0.02,
            param_dtype="float32",
            dtype="float32",  # compute dtype: float32 | bfloat16
            remat="none",  # none | full | dots
            scan_layers=True,  # lax.scan over the stacked layers; False: a Python loop
            scan_unroll=0,  # layers per scan iteration; 0 = auto (all on CPU, 1 elsewhere)
            attention="auto",  # auto | einsum | einsum_vjp | xla | cudnn | splash (attention_impl)
            loss_chunk=0,  # positions per cross-entropy chunk; 0 = all logits at once
            dropout=dict(embed=0.0, attn=0.0, resid=0.0, mlp=0.0),
        )
    )
    c.update(kw)
    return c


def smollm2_135m() -> mlc.ConfigDict:
    """SmolLM2-135M: 134,515,008 parameters."""
    return _model()


def paper_1b() -> mlc.ConfigDict:
    """The paper's 1B: full multi-head attention, 1,029,917,376 parameters.

    The table's ≈1.03B holds only with an untied output head (tied: 0.945B), so the
    head is untied here.
    """
    return _model(
        d_model=1_728, n_layers=24, n_heads=27, n_kv_heads=27, d_mlp=4_608, tie_embeddings=False
    )


def tiny(vocab_size: int = 512) -> mlc.ConfigDict:
    """A CPU model for the built-in experiment and the tests (byte tokenizer vocabulary)."""
    return _model(
        vocab_size=vocab_size,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        d_mlp=384,
        rope_base=10_000.0,
    )


PRESETS = {"tiny": tiny, "smollm2_135m": smollm2_135m, "paper_1b": paper_1b}


def get_config(name: str = "tiny") -> mlc.ConfigDict:
    """A preset by name: `--model=retention_jax/presets.py:smollm2_135m` in config flags."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} unknown; allowed: {sorted(PRESETS)}")
    return PRESETS[name]()
