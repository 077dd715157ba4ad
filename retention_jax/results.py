"""The results row of a fine-tuned leaf (one line of `<workdir>/results.jsonl`) and its method.

The core writes rows (`experiment.collect`); `analysis/` reads them. Rows record the
lineage, every swept value, the four losses and whether post-training converged.
"""

LOSSES = ("L_im", "L_ret", "L_ft", "L_pre")
COMPUTE_MATCHED = " (compute-matched)"


def method_of(row: dict) -> str:
    """'unmixed' (lam == 0) or 'mixed', then '+dropout', '+replay', '+lora' (LoRA
    post-training), ' (compute-matched)'."""
    name = "mixed" if row.get("lam", 0.0) > 0 else "unmixed"
    if row.get("dropout", 0.0) > 0:
        name += "+dropout"
    if row.get("replay", 0.0) > 0:
        name += "+replay"
    if row.get("lora_rank", 0) > 0:
        name += "+lora"
    if row.get("compute_matched", False):
        name += COMPUTE_MATCHED
    return name


def row(ids: dict, exp, swept: dict, results: dict, model_params: int, replicate: int = 0) -> dict:
    """One leaf's row. `ids` and `results` map stage names to node ids and result.json
    contents along the lineage; `exp` is the leaf's typed config; `replicate` the copy of
    the graph it belongs to (comparisons pair rows within one)."""
    pre, post, ft = (results[s] for s in ("pretrain", "posttrain", "finetune"))
    d = exp.data
    r = {
        "run_id": ids["finetune"],
        "ids": ids,
        "pipeline": f"{d.post.name}->{d.ft.name}",
        "d_pre": d.pre.name,
        "d_post": d.post.name,
        "d_ft": d.ft.name,
        "lam": exp.pretrain.exposure.lam,
        "exposure_mode": exp.pretrain.exposure.mode,
        "compute_matched": exp.posttrain.compute_matched,
        "pool_tokens": d.post_pool_tokens,
        "seed": exp.seed,
        "replicate": replicate,
        "data_seed": d.seed,
        "model_params": model_params,
        "post_lr": exp.posttrain.optimizer.lr,
        "post_batch": exp.posttrain.batch,
        "dropout": exp.posttrain.dropout,
        "replay": exp.posttrain.replay,
        "lora_rank": exp.posttrain.lora.rank,
        "lora_dropout": exp.posttrain.lora.dropout,
        "ft_lr": exp.finetune.optimizer.lr,
        "L_im": post["val"]["post"],
        "L_ret": ft["val"]["post"],
        "L_ft": ft["val"]["ft"],
        "L_pre": ft["val"]["pre"],
        "post_steps": post["steps"],
        "post_planned_steps": post["planned_steps"],
        "post_result_step": post["result_step"],
        "post_stopped_early": post["stopped_early"],
        "tokens": {s: results[s]["tokens"] for s in ("pretrain", "posttrain", "finetune")},
        "swept": swept,
    }
    r["method"] = method_of(r)
    return r
