"""Every key of an experiment config and its default; other configs change a few.

Not run by itself: `configs/default.py` is the built-in experiment. Keys:

  model       a preset from retention_jax/presets.py
  mesh        sizes of the (data, fsdp, tensor) mesh axes; -1 takes the remaining devices
  rules       parameters' logical axis names -> mesh axes
  data        tokenizer, sequence length, packing, the three domains and pool sizes
  pretrain    stage 1: D_pre budget, optimizer, early exposure of the D_post pool
  posttrain   stage 2: optimizer, dropout, replay, early stopping or compute-matched
  finetune    stage 3: D_ft budget and optimizer
  replicates  copies of the whole graph, each paired comparison made within one copy
  sweep       per stage, (dotted config path, values) pairs; the graph is their product
  eval, ckpt, log   evaluation size and period, checkpoint period, logging period
  profile     a jax.profiler trace of a window of steps in every node that runs them
  forecast    probes of θ_post that forecast L_ret, at the end of every post-training node
"""

import ml_collections as mlc

from retention_jax import presets


def _optimizer(**kw) -> dict:
    opt = dict(
        lr=1e-3,  # peak
        min_lr=1e-4,  # the cosine's floor; above `lr` it is clamped to `lr`
        warmup_steps=100,
        warmup_fraction=0.0,  # > 0: warmup is this fraction of the stage's steps instead
        horizon_tokens=0,  # > 0: the cosine reaches min_lr after this many tokens, not at the end
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        clip_norm=1.0,
        decay_exclude=("norm",),  # parameters whose path names one of these do not decay
        allow_unreached_peak=False,  # True accepts a warmup as long as the stage itself
        microbatches=1,  # gradient accumulation steps inside one step; batch stays global
        microbatch_rows=0,  # > 0 instead: the fewest microbatches of at most this many rows/device
    )
    opt.update(kw)
    return opt


def _domain(source: str, name: str) -> dict:
    # `source`: builtin:NAME | files:GLOB | hf:HUB_ID_OR_DIR | tfds:NAME[:SPLIT] | seqio:TASK
    # `text`: the field holding the text, or a format string over fields ("{inputs}\n{targets}").
    return dict(source=source, name=name, text="text", options={})


def get_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0
    # Replicate r of the graph runs seed + r: its initialisation, data order, exposed
    # subset and dropout streams. With replicate_pools it also runs data.seed + r: another
    # sample of every corpus, so other D_post and D_ft pools (a prepare per replicate).
    # Within a replicate every λ shares the pools, so mixed-vs-unmixed stays paired.
    c.replicates = 1
    c.replicate_pools = True
    c.model = presets.tiny()
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # Parameters' logical axes -> mesh axes. Batch rows always split over data×fsdp.
    c.rules = (
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("vocab", "tensor"),
        ("layers", None),
        ("head_dim", None),
        ("lora", None),
    )
    c.data = dict(
        tokenizer="byte",  # byte | hf:HUB_ID_OR_DIR | spm:MODEL_FILE
        seq_len=128,
        packing="concat",  # concat (concatenate then split) | first_fit (segment ids)
        cache_dir="",  # '' -> <workdir>/data_cache (local or gs://): shared by every host and job
        val_fraction=0.02,  # share of documents (by key hash) held out for validation
        val_tokens=16_384,  # validation tokens per domain, fixed for every run
        pre=_domain("builtin:prose", "prose"),
        post=_domain("builtin:music", "music"),
        ft=_domain("builtin:chem", "chem"),
        post_pool_tokens=200_000,  # |D_post|
        ft_pool_tokens=200_000,  # |D_ft|
        seed=0,  # which blocks of each source make its store (and so the D_post/D_ft pools)
        workers=0,  # tokenizing processes of the prepare step; 0: one per core
        read_threads=0,  # grain read threads of the loader; 0 reads in the main thread
        # (on a 2-core CPU threads cost the step ~3%; accelerator configs set 4)
    )
    c.pretrain = dict(
        init="",  # '' initialises afresh; 'hf:HUB_ID_OR_DIR' starts from a Llama checkpoint
        tokens=1_000_000,  # D_pre tokens (early exposure adds to or replaces these)
        batch=16,
        exposure=dict(
            lam=0.0,  # fraction of the D_post pool seen in stage 1, each token at most once
            mode="add",  # add (on top of the D_pre budget) | replace (displaces D_pre)
            window=(0.0, 1.0),  # fractions of the stage inside which exposure is spread
        ),
        **_optimizer(lr=3e-3, min_lr=3e-4, warmup_steps=50),
    )
    c.posttrain = dict(
        batch=16,
        max_tokens=1_000_000,  # repetition of the pool allowed up to this budget
        # LoRA post-training: rank > 0 trains adapters only; they are merged before stage 3.
        lora=dict(rank=0, alpha=128.0, dropout=0.0, targets=("o", "gate", "up", "down", "head")),
        seed=-1,  # stage-2 data order and dropout; -1: the experiment seed (the pool split's)
        dropout=0.0,  # one rate at embedding, attention, residual and MLP
        replay=0.0,  # fraction of stage-2 sequences drawn from D_pre
        compute_matched=False,  # one pass in total: λ in stage 1, the other 1-λ here
        early_stop=dict(every=50, patience=3, min_delta=0.0),  # every=0 disables it
        **_optimizer(lr=1e-3, min_lr=5e-5, warmup_steps=20),
    )
    c.finetune = dict(
        tokens=200_000,
        batch=16,
        **_optimizer(lr=1e-3, min_lr=0.0, warmup_steps=10),
    )
    # Per stage: (dotted path from the root, values) pairs; the graph is their product.
    c.sweep = dict(
        pretrain=(("pretrain.exposure.lam", (0.0, 1.0)),),
        posttrain=(("posttrain.lr", (1e-3,)),),
        finetune=(("finetune.lr", (1e-4, 1e-3)),),
    )
    c.eval = dict(batch=32, every=0)  # steps between validations of every domain; 0: ckpt.every
    c.ckpt = dict(every=200, every_minutes=30.0)  # steps; and wall time (0: steps only)
    c.log = dict(every=20)
    c.profile = dict(steps=(0, 0))  # (first, last): trace these steps into each run directory
    # The retention forecast (docs/forecast.md): probes of θ_post written into the
    # post-training node's result.json before its children run, on `rows` rows of the first
    # validation batch of D_post and D_ft, at every stage-3 LR the sweep gives.
    c.forecast = dict(
        probes=True,
        rows=8,  # of the first validation batch of each domain (a divisor of eval.batch)
        power_iters=5,  # power iterations for the top Hessian eigenvalue
        hutchinson=2,  # Rademacher samples of the Hessian trace
        lookahead=0.25,  # the lookahead's steps: this fraction of stage 3 (at least one)
        seed=0,  # the power iteration's start and the Rademacher draws
    )
    return c
