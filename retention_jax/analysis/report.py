"""Plain-text tables and the numbers behind the figures, for main.py and notebooks.

Convergence is data: a post-training run that is not compute-matched and did not stop
early ran to its token cap, so its L_im is not a converged loss. Such rows are marked
"cap" in the table, left out of frontiers and comparisons, and counted where they are
left out (docs/science.md, "Convergence").
"""

import math
from collections import defaultdict
from typing import NamedTuple

import numpy as np

from retention_jax.analysis import frontier, paper, results
from retention_jax.analysis.results import group, method, pipeline

VIEWS = (("L_ft", "L_ret"), ("L_ret", "L_pre"))  # (x, y) projections of the paper's Fig. 2
REFERENCE_FT_LR = paper.FT_LR  # the stage-3 LR of the paper's Fig. 3


def cap_hit(row: dict) -> bool:
    """True when the row's post-training ran to its cap: neither stopped early nor
    compute-matched. Rows written before runs recorded `post_stopped_early` are False."""
    stopped = row.get("post_stopped_early")
    return stopped is not None and not stopped and not row.get("compute_matched", False)


def stage2_end(row: dict) -> str:
    """How the row's post-training ended: stopped | cap | matched | ? (not recorded)."""
    if row.get("compute_matched", False):
        return "matched"
    stopped = row.get("post_stopped_early")
    return "?" if stopped is None else ("stopped" if stopped else "cap")


def converged(rows: list[dict]) -> list[dict]:
    """The rows whose post-training did not hit its cap."""
    return [r for r in rows if not cap_hit(r)]


def _post_runs(rows: list[dict]) -> dict:
    """Post-training run id -> one of its rows (a run feeds many leaves)."""
    return {r.get("ids", {}).get("posttrain", r.get("run_id", i)): r for i, r in enumerate(rows)}


def convergence_note(rows: list[dict]) -> str:
    """One line: how many post-training runs hit their cap, and what is done with them."""
    runs = _post_runs(rows).values()
    capped = sum(cap_hit(r) for r in runs)
    unknown = sum(stage2_end(r) == "?" for r in runs)
    text = (
        f"{capped} of {len(runs)} post-training runs hit their token cap before early "
        "stopping (stage2_end 'cap'); frontiers and comparisons leave their leaves out"
    )
    if unknown:
        text += f"; {unknown} run(s) did not record how they ended ('?')"
    return text


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
    ("stage2_end", "{:>10}", stage2_end),
    ("post_steps", "{:>10}", lambda r: r.get("post_steps", "")),
    ("L_im", "{:>7.4f}", lambda r: r["L_im"]),
    ("L_ret", "{:>7.4f}", lambda r: r["L_ret"]),
    ("L_ft", "{:>7.4f}", lambda r: r["L_ft"]),
    ("L_pre", "{:>7.4f}", lambda r: r["L_pre"]),
)


def view_name(view: tuple[str, str]) -> str:
    return f"({view[0]}, {view[1]})"


def table(rows: list[dict]) -> str:
    """One line per leaf, sorted by pipeline, method and hyperparameters, then the
    convergence note."""
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
    return "\n".join(lines + [convergence_note(rows)])


def points(rows: list[dict], view: tuple[str, str]) -> np.ndarray:
    return np.array([[r[view[0]], r[view[1]]] for r in rows], dtype=float).reshape(-1, 2)


def compare(
    rows: list[dict], a: str = "mixed", b: str = "unmixed", include_cap_hit: bool = False
) -> dict:
    """Per group (pipeline, pool, exposure mode) and view: frontier `a` against `b`.

    Keys per view: b_dominated_by_a, a_dominated_by_b (shares of frontier points), area
    (between the staircases over x_lo..x_hi; > 0 when a is better; NaN if the x ranges do
    not meet), hv_gain (hypervolume of a minus that of b, against the worst point of both),
    seeds, and cap_hit_left_out (leaves of a and b whose post-training hit its cap; kept
    only with include_cap_hit). Seeds are compared one by one; with several, values are
    means and `<key>_ci95` the half-width of their 95% confidence interval.
    """
    out = {}
    for pipe in sorted({group(r) for r in rows}):
        mine = [r for r in rows if group(r) == pipe and method(r) in (a, b)]
        left_out = 0 if include_cap_hit else sum(cap_hit(r) for r in mine)
        by = defaultdict(list)  # (method, seed) -> rows
        for r in mine if include_cap_hit else converged(mine):
            by[method(r), r.get("seed", 0)].append(r)
        seeds = sorted({s for m, s in by if m == a} & {s for m, s in by if m == b})
        if not seeds:
            continue
        out[pipe] = {}
        for view in VIEWS:
            per_seed = [
                frontier.compare(points(by[a, s], view), points(by[b, s], view)) for s in seeds
            ]
            result = {"seeds": len(seeds), "cap_hit_left_out": left_out}
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
                f"hv_gain {value(c, 'hv_gain')}, {c['seeds']} seed(s), "
                f"{c['cap_hit_left_out']} cap-hit leaves left out"
            )
    return "\n".join(lines)


def reference_ft_lr(rows: list[dict], target: float = REFERENCE_FT_LR) -> float:
    """The swept stage-3 LR closest (in log) to the paper's 5e-5."""
    lrs = sorted({r["ft_lr"] for r in rows})
    return min(lrs, key=lambda lr: abs(math.log(lr / target)))


class LambdaPoint(NamedTuple):
    lam: float
    L_im: float
    L_ret: float
    cap_hit: bool  # some run behind the point hit its stage-2 cap


def _plain(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("dropout", 0.0) and not r.get("replay", 0.0)]


def stage2_settings(rows: list[dict]) -> list[tuple]:
    """(post_lr, post_batch) pairs of the plain (no dropout, no replay) rows."""
    keys = {(r.get("post_lr"), r.get("post_batch")) for r in _plain(rows)}
    return sorted(keys, key=lambda k: tuple(math.inf if v is None else v for v in k))


def lambda_curves(
    rows: list[dict], ft_lr: float | None = None, post: tuple | None = None
) -> dict[tuple, list[LambdaPoint]]:
    """(compute_matched, pool_tokens) -> [LambdaPoint, ...] sorted by λ.

    Plain post-training (no dropout, no replay) at one stage-3 LR (`ft_lr`, default the
    one closest to 5e-5) and ONE stage-2 setting for every λ: `post` = (post_lr,
    post_batch), or the only one present. Choosing a setting per λ (by L_im or L_ret)
    would let the selection, not λ, shape the curve, so several settings without `post`
    is an error. Seeds are averaged.
    """
    plain = _plain(rows)
    if not plain:
        return {}
    settings = stage2_settings(plain)
    if post is None and len(settings) > 1:
        raise ValueError(
            f"lambda_curves: post=None but the rows hold {len(settings)} stage-2 settings "
            f"(post_lr, post_batch) {settings}; name one with post=(post_lr, post_batch)"
        )
    post = settings[0] if post is None else tuple(post)
    if post not in settings:
        raise ValueError(f"lambda_curves: post={post!r}; allowed: one of {settings}")
    ft_lr = reference_ft_lr(plain) if ft_lr is None else ft_lr
    groups = defaultdict(lambda: defaultdict(list))
    for r in plain:
        if (r.get("post_lr"), r.get("post_batch")) == post and math.isclose(
            r["ft_lr"], ft_lr, rel_tol=1e-6
        ):
            key = (bool(r.get("compute_matched", False)), r.get("pool_tokens"))
            groups[key][r["lam"]].append(r)
    curves = {}
    for key, by_lam in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        curves[key] = [
            LambdaPoint(
                float(lam),
                float(np.mean([r["L_im"] for r in mine])),
                float(np.mean([r["L_ret"] for r in mine])),
                any(cap_hit(r) for r in mine),
            )
            for lam, mine in sorted(by_lam.items())
        ]
    return curves


def _added(rows: list[dict]) -> list[dict]:
    return [r for r in _plain(rows) if not r.get("compute_matched", False)]


def exposure_share(rows: list[dict]) -> dict:
    """|D_post| -> D_post tokens of stage 1 over all its tokens at the largest λ; empty
    when the rows do not record stage-1 tokens."""
    top = max((r.get("lam", 0.0) for r in rows), default=0.0)
    out = {}
    for r in rows:
        if r.get("lam") == top and "tokens" in r:
            seen = r["tokens"]["pretrain"]
            out[r.get("pool_tokens")] = seen["post"] / sum(seen.values())
    return dict(sorted(out.items(), key=lambda kv: kv[0] or 0))


def convergence(rows: list[dict]) -> dict:
    """Over the post-training runs that are not compute-matched: how many stopped early,
    and the most of its cap (post_steps / post_planned_steps) any of them used."""
    runs = [r for r in _post_runs(rows).values() if not r.get("compute_matched", False)]
    used = [r["post_steps"] / r["post_planned_steps"] for r in runs if r.get("post_planned_steps")]
    stopped = sum(stage2_end(r) == "stopped" for r in runs)
    return {
        "runs": len(runs),
        "stopped_early": stopped,
        "all_converged": bool(runs) and stopped == len(runs),
        "max_cap_used": max(used, default=math.nan),
    }


def forgetting(rows: list[dict]) -> dict[float, float]:
    """Stage-3 LR -> median relative forgetting (L_ret - L_im) / L_im over its leaves."""
    by = defaultdict(list)
    for r in _plain(rows):
        by[r["ft_lr"]].append((r["L_ret"] - r["L_im"]) / r["L_im"])
    return {lr: float(np.median(v)) for lr, v in sorted(by.items())}


def summary(rows: list[dict], ft_lr: float | None = None) -> dict:
    """Everything the built-in experiment reports, computed from its rows.

    Keys: convergence (see `convergence`), share (`exposure_share`), ft_lr (the stage-3
    LR of the λ readings, default the one closest to 5e-5), forgetting (per stage-3 LR),
    settings: (post_lr, post_batch, pool_tokens) -> {"added": [LambdaPoint],
    "L_ret_by_ft_lr": stage-3 LR -> the added arm's L_ret per λ, "L_im_spread": max - min
    of its L_im over λ,
    "compute_matched": [LambdaPoint], "best_lam": the compute-matched λ of lowest L_ret},
    and frontiers (`compare` of mixed against unmixed, both views).
    """
    if ft_lr is None and _plain(rows):
        ft_lr = reference_ft_lr(_plain(rows))
    settings = {}
    for post in stage2_settings(rows):
        curves = lambda_curves(rows, ft_lr=ft_lr, post=post)
        for pool in sorted({p for _, p in curves}, key=lambda p: p or 0):
            added, matched = curves.get((False, pool), []), curves.get((True, pool), [])
            by_ft_lr = {}
            for lr in sorted({r["ft_lr"] for r in _added(rows)}):
                at = lambda_curves(rows, ft_lr=lr, post=post).get((False, pool), [])
                by_ft_lr[lr] = [p.L_ret for p in at]
            l_im = [p.L_im for p in added]
            settings[(*post, pool)] = {
                "added": added,
                "L_ret_by_ft_lr": by_ft_lr,
                "L_im_spread": max(l_im) - min(l_im) if l_im else math.nan,
                "compute_matched": matched,
                "best_lam": min(matched, key=lambda p: p.L_ret).lam if matched else None,
            }
    return {
        "convergence": convergence(rows),
        "share": exposure_share(rows),
        "ft_lr": ft_lr,
        "forgetting": forgetting(rows),
        "settings": settings,
        "frontiers": compare(_added(rows)),
    }


def format_summary(s: dict) -> str:
    """`summary`'s output as the lines main.py prints."""
    conv = s["convergence"]
    share = ", ".join(
        f"{v:.1%} (|D_post| {results.tokens_label(pool)})" for pool, v in s["share"].items()
    )
    lines = [
        f"stage 2 converged: {'yes' if conv['all_converged'] else 'NO'} "
        f"({conv['stopped_early']} of {conv['runs']} runs stopped early; the longest used "
        f"{conv['max_cap_used']:.0%} of its cap)",
        f"exposure share of stage 1 at the largest λ: {share or 'n/a'}",
        "relative forgetting (L_ret - L_im) / L_im per stage-3 LR: "
        + ", ".join(f"{lr:g}: {v:+.1%}" for lr, v in s["forgetting"].items()),
    ]
    for (post_lr, batch, pool), c in s["settings"].items():
        head = (
            f"|D_post| {results.tokens_label(pool)}, stage 2 LR {post_lr:g}, batch {batch}; "
            f"stage 3 LR {s['ft_lr']:g}"
        )
        lines.append(f"{head}: added (Fig. 3a), L_im spread over λ {c['L_im_spread']:.4f}")
        lines += [f"  λ {p.lam:.2f}  L_im {p.L_im:.4f}  L_ret {p.L_ret:.4f}" for p in c["added"]]
        lams = ", ".join(f"{p.lam:g}" for p in c["added"])
        for lr, l_ret in c["L_ret_by_ft_lr"].items():
            values = ", ".join(f"{v:.4f}" for v in l_ret)
            lines.append(f"  stage 3 LR {lr:g}: L_ret at λ = {lams}: {values}")
        if c["compute_matched"]:
            lines.append(f"{head}: compute-matched (Fig. 3b), best λ {c['best_lam']:.2f}")
            lines += [
                f"  λ {p.lam:.2f}  L_im {p.L_im:.4f}  L_ret {p.L_ret:.4f}"
                for p in c["compute_matched"]
            ]
    lines.append(format_compare(s["frontiers"]))
    return "\n".join(lines)
