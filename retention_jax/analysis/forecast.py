"""How well the probes at θ_post (retention_jax/forecast.py) rank the realised L_ret.

Rows carry their post-training node's probes (`row["forecast"]`). For each stage-3 LR
and each predictor, Spearman ρ and Kendall τ between the predictor and the realised
L_ret across post-training nodes, computed within each replicate. Over two or more
replicates the interval is the Student-t interval of the mean of the per-replicate
values (`stats.t_interval`, the rule of every effect; a bootstrap over three replicates
would span no more than their range), clipped to [-1, 1]; with one replicate it is a
percentile bootstrap over its nodes. L_im is the baseline:
the paper's finding is that it does not predict L_ret, and a probe earns its place only
by beating it: a larger ρ in its stated orientation (a forecast states its direction
before the data). The same statistics against forgetting (L_ret − L_im) say whether a
probe predicts the loss of D_post rather than its level.
"""

import math

import numpy as np
from matplotlib.figure import Figure
from scipy import stats as sp

from retention_jax.analysis import stats
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


def _over_replicates(values: np.ndarray) -> tuple[float, float]:
    """The t interval of the mean of per-replicate correlations, within [-1, 1]."""
    lo, hi = stats.t_interval(values[np.isfinite(values)])
    return (max(lo, -1.0), min(hi, 1.0)) if np.isfinite(lo) else (lo, hi)


def correlation(groups: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> dict:
    """ρ and τ of (x, y) pairs, one pair of arrays per replicate: their means over
    replicates and a 95% interval of the mean ρ and τ (a t interval over replicates from
    two on, else a bootstrap over the one replicate's nodes)."""
    rho = np.array([spearman(x, y) for x, y in groups])
    tau = np.array([kendall(x, y) for x, y in groups])
    if len(groups) >= 2:
        over = "replicates"
        rho95, tau95 = _over_replicates(rho), _over_replicates(tau)
    else:
        over = "nodes"
        x, y = groups[0]
        idx = np.random.default_rng(seed).integers(0, len(x), size=(DRAWS, len(x)))
        rho95 = _interval(np.array([spearman(x[i], y[i]) for i in idx]))
        tau95 = _interval(np.array([kendall(x[i], y[i]) for i in idx]))
    mean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
    return {
        "rho": mean(rho),
        "tau": mean(tau),
        "rho_per_replicate": rho.tolist(),
        "rho95": rho95,
        "tau95": tau95,
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
            _against_baseline(by_lr[lr])
        out[tgt] = by_lr
    out["cost"] = cost(rows)
    return out


def _against_baseline(preds: dict) -> None:
    """Adds to each probe its paired gain over L_im: ρ − ρ(L_im) per replicate, with the
    interval of every effect (`stats.effect`), so "beats L_im" is a resolved claim."""
    base = np.array(preds["L_im"]["rho_per_replicate"])
    for name, c in preds.items():
        if name != "L_im":
            e = stats.effect((np.array(c["rho_per_replicate"]) - base).tolist())
            c["gain_over_L_im"] = {"mean": e.mean, "ci95": e.ci95, "n": e.n}


def _verdict(c: dict) -> str:
    g = c.get("gain_over_L_im")
    if g is None or not np.isfinite(g["mean"]):
        return ""
    lo, hi = g["ci95"]
    if g["n"] < 2:
        return f"  vs L_im {g['mean']:+.2f} (one replicate: no interval)"
    word = "beats L_im" if lo > 0 else "loses to L_im" if hi < 0 else "vs L_im (not resolved)"
    return f"  {word} {g['mean']:+.2f} (95% {lo:+.2f} to {hi:+.2f})"


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
            any_stats = next(iter(preds.values()))
            lines.append(
                f"forecast of {tgt} at stage-3 LR {lr:g} ({any_stats['nodes']} post-training "
                f"nodes, {any_stats['replicates']} replicate(s); interval over "
                f"{any_stats['interval_over']}):"
            )
            for name, c in preds.items():
                lo, hi = c["rho95"]
                lines.append(
                    f"  {name:<12} ρ {c['rho']:+.3f} (95% {lo:+.2f} to {hi:+.2f})  "
                    f"τ {c['tau']:+.3f}{_verdict(c)}"
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
