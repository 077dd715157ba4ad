"""Plain-text tables and the numbers behind the figures, for main.py and notebooks."""

import math
from collections import defaultdict

import numpy as np

from retention_jax.analysis import frontier, paper
from retention_jax.analysis.results import group, method, pipeline

VIEWS = (("L_ft", "L_ret"), ("L_ret", "L_pre"))  # (x, y) projections of SCIENCE.md Fig. 2
REFERENCE_FT_LR = paper.FT_LR  # the stage-3 LR of SCIENCE.md Fig. 3

_COLUMNS = (
    ("pipeline", "{:<14}", pipeline),
    ("method", "{:<28}", method),
    ("lam", "{:>5.2f}", lambda r: r.get("lam", 0.0)),
    ("post_lr", "{:>8.1e}", lambda r: r.get("post_lr", math.nan)),
    ("post_batch", "{:>10}", lambda r: r.get("post_batch", "")),
    ("dropout", "{:>7.3f}", lambda r: r.get("dropout", 0.0)),
    ("replay", "{:>6.3f}", lambda r: r.get("replay", 0.0)),
    ("ft_lr", "{:>8.1e}", lambda r: r.get("ft_lr", math.nan)),
    ("seed", "{:>4}", lambda r: r.get("seed", 0)),
    ("L_im", "{:>7.4f}", lambda r: r["L_im"]),
    ("L_ret", "{:>7.4f}", lambda r: r["L_ret"]),
    ("L_ft", "{:>7.4f}", lambda r: r["L_ft"]),
    ("L_pre", "{:>7.4f}", lambda r: r["L_pre"]),
)


def view_name(view: tuple[str, str]) -> str:
    return f"({view[0]}, {view[1]})"


def table(rows: list[dict]) -> str:
    """One line per leaf, sorted by pipeline, method and hyperparameters."""
    widths = [len(fmt.format(get(rows[0]))) if rows else len(name) for name, fmt, get in _COLUMNS]
    header = "  ".join(
        name.rjust(max(w, len(name))) for (name, _, _), w in zip(_COLUMNS, widths, strict=True)
    )
    lines = [header]
    for row in sorted(rows, key=lambda r: tuple(str(get(r)) for _, _, get in _COLUMNS[:9])):
        cells = [
            fmt.format(get(row)).rjust(max(w, len(name)))
            for (name, fmt, get), w in zip(_COLUMNS, widths, strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def points(rows: list[dict], view: tuple[str, str]) -> np.ndarray:
    return np.array([[r[view[0]], r[view[1]]] for r in rows], dtype=float).reshape(-1, 2)


def compare(rows: list[dict], a: str = "mixed", b: str = "unmixed") -> dict:
    """Per group (pipeline, pool, exposure mode) and view: frontier `a` against `b`.

    Keys per view: b_dominated_by_a, a_dominated_by_b (shares of frontier points), area
    (between the staircases over x_lo..x_hi; > 0 when a is better; NaN if the x ranges do
    not meet), hv_gain (hypervolume of a minus that of b, against the worst point of both)
    and seeds. Seeds are
    compared one by one; with several, values are means and `<key>_ci95` the half-width of
    their 95% confidence interval.
    """
    out = {}
    for pipe in sorted({group(r) for r in rows}):
        by = defaultdict(list)  # (method, seed) -> rows
        for r in rows:
            if group(r) == pipe and method(r) in (a, b):
                by[method(r), r.get("seed", 0)].append(r)
        seeds = sorted({s for m, s in by if m == a} & {s for m, s in by if m == b})
        if not seeds:
            continue
        out[pipe] = {}
        for view in VIEWS:
            per_seed = [
                frontier.compare(points(by[a, s], view), points(by[b, s], view)) for s in seeds
            ]
            result = {"seeds": len(seeds)}
            for key in per_seed[0]:
                mean, half = frontier.mean_ci([c[key] for c in per_seed])
                result[key] = float(mean)
                if len(seeds) > 1:
                    result[f"{key}_ci95"] = float(half)
            out[pipe][view_name(view)] = result
    return out


def format_compare(result: dict, a: str = "mixed", b: str = "unmixed") -> str:
    """`compare`'s output as lines a paper can quote."""

    def value(c, key):
        ci = c.get(f"{key}_ci95")
        return f"{c[key]:+.4f}" + (f" ± {ci:.4f}" if ci is not None else "")

    lines = [f"{a} vs {b} frontiers (area, hv_gain > 0: {a} is better)"]
    for pipe, views in result.items():
        for view, c in views.items():
            area = (
                f"{value(c, 'area')} over x in [{c['x_lo']:.3f}, {c['x_hi']:.3f}]"
                if c["x_lo"] <= c["x_hi"]
                else "n/a (x ranges do not meet)"
            )
            lines.append(
                f"  {pipe:<14} {view:<15} {b} frontier dominated {c['b_dominated_by_a']:.0%},"
                f" {a} frontier dominated {c['a_dominated_by_b']:.0%}, area {area}, "
                f"hv_gain {value(c, 'hv_gain')}, {c['seeds']} seed(s)"
            )
    return "\n".join(lines)


def reference_ft_lr(rows: list[dict], target: float = REFERENCE_FT_LR) -> float:
    """The swept stage-3 LR closest (in log) to the paper's 5e-5."""
    lrs = sorted({r["ft_lr"] for r in rows})
    return min(lrs, key=lambda lr: abs(math.log(lr / target)))


def lambda_curves(rows: list[dict], ft_lr: float | None = None) -> dict:
    """(compute_matched, pool_tokens) -> [(lam, L_im, L_ret), ...] sorted by lam.

    Only plain post-training (no dropout, no replay) at one stage-3 LR (`ft_lr`, default the
    one closest to 5e-5). Per λ the stage-2 setting (post_lr, post_batch) with the lowest
    L_im, averaged over seeds, stands for the point: it is the run a practitioner keeps
    before any fine-tuning, mirroring "stage 2 to convergence"; choosing by L_ret instead
    would flatter retention.
    """
    plain = [r for r in rows if not r.get("dropout", 0.0) and not r.get("replay", 0.0)]
    if not plain:
        return {}
    ft_lr = reference_ft_lr(plain) if ft_lr is None else ft_lr
    groups = defaultdict(lambda: defaultdict(list))
    for r in plain:
        if math.isclose(r["ft_lr"], ft_lr, rel_tol=1e-6):
            key = (bool(r.get("compute_matched", False)), r.get("pool_tokens"))
            config = (r["lam"], r.get("post_lr"), r.get("post_batch"))
            groups[key][config].append((r["L_im"], r["L_ret"]))
    curves = {}
    for key, configs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        best = {}
        for (lam, *_), values in configs.items():
            l_im, l_ret = np.mean(values, axis=0)
            if lam not in best or l_im < best[lam][1]:
                best[lam] = (lam, float(l_im), float(l_ret))
        curves[key] = [best[lam] for lam in sorted(best)]
    return curves
