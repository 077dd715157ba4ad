"""How well the probes at θ_post (retention_jax/forecast.py) rank the realised L_ret.

Rows carry their post-training node's probes (`row["forecast"]`). For each stage-3 LR
and each predictor, Spearman ρ and Kendall τ between the predictor and the realised
L_ret across post-training nodes, computed within each replicate, with a percentile
bootstrap interval: over replicates when there are two or more (the mean ρ of the
resampled replicates), else over the nodes of the one replicate. L_im is the baseline:
the paper's finding is that it does not predict L_ret, and a probe earns its place only
by beating it: a larger ρ in its stated orientation (a forecast states its direction
before the data). The same statistics against forgetting (L_ret − L_im) say whether a
probe predicts the loss of D_post rather than its level.
"""

import math

import numpy as np
from matplotlib.figure import Figure
from scipy import stats as sp

from retention_jax.analysis.results import replicate

PREDICTORS = ("L_im", "interference", "cosine", "curvature", "sharpness", "trace", "lookahead")
TARGETS = ("L_ret", "forgetting")
DRAWS = 2_000
LEVEL = 0.95


def predictor(row: dict, name: str, tgt: str = "L_ret") -> float:
    """The predictor's value for a leaf: L_im, a probe of its post-training node, or the
    lookahead's forecast at the leaf's stage-3 LR (of forgetting: its forecast rise over
    the L_post it started from)."""
    if name == "L_im":
        return row["L_im"]
    f = row["forecast"]
    if name != "lookahead":
        return f[name]["value"]
    level = f[name]["value"][str(float(row["ft_lr"]))]
    return level - f["L_post"]["value"] if tgt == "forgetting" else level


def target(row: dict, name: str) -> float:
    return row["L_ret"] - row["L_im"] if name == "forgetting" else row["L_ret"]


def spearman(x, y) -> float:
    """Spearman ρ: the Pearson correlation of average ranks (ties shared); NaN when
    either side is constant or has fewer than 3 values."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(sp.rankdata(x), sp.rankdata(y))[0, 1])


def kendall(x, y) -> float:
    """Kendall τ-b; NaN as for `spearman`."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(sp.kendalltau(x, y).statistic)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    kept = samples[np.isfinite(samples)]
    if len(kept) == 0:
        return (math.nan, math.nan)
    lo, hi = np.quantile(kept, [0.5 - LEVEL / 2, 0.5 + LEVEL / 2])
    return (float(lo), float(hi))


def correlation(groups: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> dict:
    """ρ and τ of (x, y) pairs, one pair of arrays per replicate: their means over
    replicates and a bootstrap interval of the mean ρ and τ (over replicates from two
    on, else over the one replicate's nodes)."""
    rho = np.array([spearman(x, y) for x, y in groups])
    tau = np.array([kendall(x, y) for x, y in groups])
    rng = np.random.default_rng(seed)
    if len(groups) >= 2:
        over = "replicates"
        idx = rng.integers(0, len(groups), size=(DRAWS, len(groups)))
        rho_s, tau_s = np.nanmean(rho[idx], axis=1), np.nanmean(tau[idx], axis=1)
    else:
        over = "nodes"
        x, y = groups[0]
        idx = rng.integers(0, len(x), size=(DRAWS, len(x)))
        rho_s = np.array([spearman(x[i], y[i]) for i in idx])
        tau_s = np.array([kendall(x[i], y[i]) for i in idx])
    mean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
    return {
        "rho": mean(rho),
        "tau": mean(tau),
        "rho_per_replicate": rho.tolist(),
        "rho95": _interval(rho_s),
        "tau95": _interval(tau_s),
        "interval_over": over,
        "nodes": int(np.mean([len(x) for x, _ in groups])),
        "replicates": len(groups),
    }


def validate(rows: list[dict]) -> dict:
    """{target: {stage-3 LR: {predictor: `correlation`}}} over the rows with probes,
    and the probes' cost next to the stage-3 sweep's; {} when no row has probes."""
    rows = [r for r in rows if r.get("forecast")]
    if not rows:
        return {}
    out = {}
    for tgt in TARGETS:
        by_lr = {}
        for lr in sorted({r["ft_lr"] for r in rows}):
            mine = [r for r in rows if r["ft_lr"] == lr]
            reps = sorted({replicate(r) for r in mine})
            by_lr[lr] = {
                name: correlation(
                    [
                        (
                            np.array(
                                [predictor(r, name, tgt) for r in mine if replicate(r) == rep]
                            ),
                            np.array([target(r, tgt) for r in mine if replicate(r) == rep]),
                        )
                        for rep in reps
                    ]
                )
                for name in PREDICTORS
            }
        out[tgt] = by_lr
    out["cost"] = cost(rows)
    return out


def cost(rows: list[dict]) -> dict:
    """Per probe, the mean FLOPs and seconds per post-training node and the FLOPs as a
    share of the stage-3 sweep below that node (one leaf per stage-3 LR)."""
    posts = {r["ids"]["posttrain"]: r["forecast"] for r in rows}
    stage3 = np.mean([f["stage3_flops"] for f in posts.values()])
    out = {}
    for name in PREDICTORS[1:]:
        if name == "cosine":  # the interference program's calls
            continue
        flops = float(np.mean([f[name]["flops"] for f in posts.values()]))
        seconds = float(np.mean([f[name]["seconds"] for f in posts.values()]))
        out[name] = {"flops": flops, "seconds": seconds, "share_of_stage3": flops / stage3}
    total = sum(v["flops"] for v in out.values())
    out["all"] = {
        "flops": total,
        "seconds": sum(v["seconds"] for v in out.values()),
        "share_of_stage3": total / stage3,
        "compile_s": float(sum(f.get("compile_s", 0.0) for f in posts.values())),
    }
    out["stage3_flops"] = float(stage3)
    return out


def format_validation(v: dict) -> str:
    """`validate`'s numbers as the lines main.py prints."""
    if not v:
        return "forecast: no probes in these rows (forecast.probes=False)"
    lines = []
    for tgt in TARGETS:
        for lr, preds in v[tgt].items():
            base = preds["L_im"]["rho"]
            any_stats = next(iter(preds.values()))
            lines.append(
                f"forecast of {tgt} at stage-3 LR {lr:g} ({any_stats['nodes']} post-training "
                f"nodes, {any_stats['replicates']} replicate(s); interval over "
                f"{any_stats['interval_over']}):"
            )
            for name, c in preds.items():
                lo, hi = c["rho95"]
                mark = (
                    ""
                    if name == "L_im" or not np.isfinite(base)
                    else ("  beats L_im" if c["rho"] > base else "  loses to L_im")
                )
                lines.append(
                    f"  {name:<12} ρ {c['rho']:+.3f} (95% {lo:+.2f} to {hi:+.2f})  "
                    f"τ {c['tau']:+.3f}{mark}"
                )
    c = v["cost"]["all"]
    lines.append(
        f"forecast cost per post-training node: {c['flops'] / 1e9:.2f} GFLOP, "
        f"{c['share_of_stage3']:.1%} of its stage-3 sweep's training FLOPs, {c['seconds']:.1f} s "
        f"(+{c['compile_s']:.1f} s compiling, once per process)"
    )
    return "\n".join(lines)


def draw(rows: list[dict]) -> Figure:
    """Forecast against realised L_ret, one panel per predictor (L_im first), a color per
    stage-3 LR; the panel's title gives ρ at each LR."""
    rows = [r for r in rows if r.get("forecast")]
    v = validate(rows)["L_ret"]
    lrs = sorted({r["ft_lr"] for r in rows})
    fig = Figure(figsize=(3.4 * len(PREDICTORS), 3.4), layout="constrained")
    axes = fig.subplots(1, len(PREDICTORS), squeeze=False)[0]
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for ax, name in zip(axes, PREDICTORS, strict=True):
        for i, lr in enumerate(lrs):
            mine = [r for r in rows if r["ft_lr"] == lr]
            ax.scatter(
                [predictor(r, name) for r in mine],
                [r["L_ret"] for r in mine],
                s=16,
                color=colors[i % len(colors)],
                label=f"stage-3 LR {lr:g}",
            )
        rhos = ", ".join(f"{v[lr][name]['rho']:+.2f}" for lr in lrs)
        ax.set_title(f"{name}\nρ {rhos}", fontsize=9)
        ax.set_xlabel(name if name != "lookahead" else "lookahead forecast of L_ret")
    axes[0].set_ylabel("realised L_ret")
    axes[0].legend(fontsize=7)
    return fig
