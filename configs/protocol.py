"""The paper's protocol, shared by its two model sizes (D_pre = C4); not a config by itself.

configs/paper_135m.py and configs/paper_1b.py each start from `settings` and add what
belongs to their size: the model's memory layout on devices, the stage-1 budget, the
stage-2 grid and batches, seeds. Shared here: a D_post → D_ft pipeline of real corpora
(configs/corpora.py), SmolLM2's tokenizer, 1,024-token sequences, 0.3B-token D_post and
D_ft pools, 2M validation tokens a domain; bf16 compute, remat of the dots, the loss in
chunks of 256 positions. Stage 1: λ ∈ {0, 1} (unmixed and mixed), LR 5e-4 → 5e-5
cosine, 1,000 warmup steps, batch 512 (the paper gives these for 1B only). Stage 2: min LR
5e-5, at most 2B tokens, early stopping every 100 steps with patience 3. Stage 3: 200M
D_ft tokens, 100 warmup steps, cosine to 0, over STAGE3_LRS (docs/science.md says why this
grid). The arms (`arm_sweep`) add dropout, replay or LoRA to the stage-2 grid; `shrink`
keeps a graph's shape at CPU sizes.
"""

import ml_collections as mlc

from configs import base, corpora
from retention_jax import presets

M = 1_000_000
ARMS = ("mixing", "dropout", "replay", "lora")
# Stage-3 LRs from almost no change (Adam moves a weight by about lr per step: 1e-6 over
# ~1,000 steps is 5% of the init scale) to strong forgetting (above most stage-2 peaks).
STAGE3_LRS = (1e-6, 3e-6, 1e-5, 5e-5, 2e-4, 1e-3)
REPLAY = 0.01  # share of stage-2 sequences drawn from D_pre
DROPOUTS = (0.02, 0.05)
LORA_RANK = 64  # alpha 128 (alpha/rank 2); targets o, gate, up, down, head (no q, k, v)
LORA_DROPOUTS = (0.0, 0.02, 0.05)


def settings(pipeline: str, smoke: bool, model: mlc.ConfigDict) -> mlc.ConfigDict:
    """The shared settings around `model`, with real corpora or (smoke) built-in ones."""
    c = base.get_config()
    corpora.set_pipeline(c, pipeline, smoke)
    c.model = model
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"
    c.model.loss_chunk = 256
    c.data.tokenizer = "hf:HuggingFaceTB/SmolLM2-135M"
    c.data.seq_len = 1024
    c.data.read_threads = 4  # prefetch batches while the accelerator steps
    c.data.post_pool_tokens = 300 * M
    c.data.ft_pool_tokens = 300 * M
    c.data.val_tokens = 2 * M
    c.pretrain.update(batch=512, lr=5e-4, min_lr=5e-5, warmup_steps=1_000)
    c.posttrain.update(max_tokens=2_000 * M, min_lr=5e-5)
    c.posttrain.early_stop.update(every=100, patience=3)
    c.finetune.update(tokens=200 * M, lr=5e-5, min_lr=0.0, warmup_steps=100)
    c.ckpt.every = 1_000
    c.log.every = 50
    c.sweep.pretrain = (("pretrain.exposure.lam", (0.0, 1.0)),)
    c.sweep.finetune = (("finetune.lr", STAGE3_LRS),)
    return c


def arm_sweep(arm: str) -> tuple:
    """The posttrain sweep pairs an arm adds to the stage-2 grid."""
    return {
        "mixing": (),
        "dropout": (("posttrain.dropout", DROPOUTS),),
        "replay": (("posttrain.replay", (REPLAY,)),),
        "lora": (("posttrain.lora.rank", (LORA_RANK,)), ("posttrain.lora.dropout", LORA_DROPOUTS)),
    }[arm]


def shrink(c: mlc.ConfigDict) -> None:
    """Same graph shape, CPU sizes: tiny model, byte tokenizer, built-in data."""
    c.model = presets.tiny()
    c.data.tokenizer = "byte"
    c.data.seq_len = 64
    c.data.update(post_pool_tokens=8_192, ft_pool_tokens=8_192, val_tokens=2_048)
    c.pretrain.update(tokens=16_384, batch=8, warmup_steps=2)
    c.posttrain.update(batch=8, max_tokens=8_192, warmup_steps=2)
    c.posttrain.early_stop.update(every=4, patience=2)
    c.finetune.update(tokens=4_096, batch=8, warmup_steps=1)
    c.eval.batch = 8
    c.ckpt.every = 8
    c.log.every = 4
    c.sweep.finetune = (("finetune.lr", (1e-4, 1e-2)),)
