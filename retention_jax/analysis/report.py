"""Plain-text tables and the numbers behind the figures, for main.py and notebooks.

Convergence is data: a post-training run that is not compute-matched and did not stop
early ran to its token cap, so its L_im is not a converged loss. Such rows are marked
"cap" in the table, left out of frontiers and comparisons, and counted where they are
left out (docs/science.md, "Convergence").
"""

import math
import os
from collections import defaultdict
from typing import NamedTuple

import numpy as np

from retention_jax import fileio
from retention_jax.analysis import forecast, frontier, paper, results, stats
from retention_jax.analysis.results import group, method, pipeline, replicate

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
    ("rep", "{:>3}", replicate),
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
    for row in sorted(rows, key=lambda r: tuple(str(get(r)) for _, _, get in _COLUMNS[:10])):
        cells = [
            fmt.format(get(row)).rjust(max(w, len(name)))
            for (name, fmt, get), w in zip(_COLUMNS, widths, strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines + [convergence_note(rows)])


def points(rows: list[dict], view: tuple[str, str]) -> np.ndarray:
    return np.array([[r[view[0]], r[view[1]]] for r in rows], dtype=float).reshape(-1, 2)


def _frontier_numbers(a: np.ndarray, b: np.ndarray, ref: tuple) -> dict:
    """frontier.compare's numbers plus `gap`: the area between the staircases over the
    length of their common x range (the mean y advantage of a there; NaN if none)."""
    c = frontier.compare(a, b, ref)
    width = c["x_hi"] - c["x_lo"]
    c["gap"] = c["area"] / width if width > 0 else math.nan
    return c


def compare(
    rows: list[dict], a: str = "mixed", b: str = "unmixed", include_cap_hit: bool = False
) -> dict:
    """Per group (pipeline, pool, exposure mode) and view: frontier `a` against `b`, paired
    within each replicate (results.replicate) that holds both.

    Per view: replicates, cap_hit_left_out (leaves of a and b whose post-training hit its
    cap; kept only with include_cap_hit), reference (the hypervolume reference point: the
    worst x and worst y of a and b over every replicate, one for the whole comparison so
    that per-replicate hypervolumes compare), the mean over replicates of
    b_dominated_by_a, a_dominated_by_b (shares of frontier points), area (between the
    staircases over x_lo..x_hi; > 0 when a is better), gap (area / (x_hi - x_lo)),
    hv_gain (hypervolume of a minus that of b), and `stats`: each of them as a
    stats.Effect over the replicates.
    """
    out = {}
    for pipe in sorted({group(r) for r in rows}):
        mine = [r for r in rows if group(r) == pipe and method(r) in (a, b)]
        left_out = 0 if include_cap_hit else sum(cap_hit(r) for r in mine)
        by = defaultdict(list)  # (method, replicate) -> rows
        for r in mine if include_cap_hit else converged(mine):
            by[method(r), replicate(r)].append(r)
        reps = sorted({s for m, s in by if m == a} & {s for m, s in by if m == b})
        if not reps:
            continue
        out[pipe] = {}
        for view in VIEWS:
            every = np.concatenate([points(by[m, s], view) for m in (a, b) for s in reps])
            ref = tuple(float(v) for v in every.max(axis=0))
            per = [
                _frontier_numbers(points(by[a, s], view), points(by[b, s], view), ref) for s in reps
            ]
            effects = {key: stats.effect([c[key] for c in per], reps) for key in per[0]}
            out[pipe][view_name(view)] = {
                "replicates": len(reps),
                "cap_hit_left_out": left_out,
                "reference": list(ref),
                **{key: e.mean for key, e in effects.items()},
                "stats": effects,
            }
    return out


def format_compare(result: dict, a: str = "mixed", b: str = "unmixed") -> str:
    """`compare`'s output as lines a paper can quote (means over replicates)."""
    lines = [f"{a} vs {b} frontiers (area, gap, hv_gain > 0: {a} is better)"]
    for pipe, views in result.items():
        for view, c in views.items():
            area = (
                f"area {c['area']:+.4f}, gap {c['gap']:+.4f} over x in "
                f"[{c['x_lo']:.3f}, {c['x_hi']:.3f}]"
                if c["x_lo"] <= c["x_hi"]
                else "area n/a (x ranges do not meet)"
            )
            lines.append(
                f"  {pipe:<14} {view:<15} {b} frontier dominated {c['b_dominated_by_a']:.0%},"
                f" {a} frontier dominated {c['a_dominated_by_b']:.0%}, {area}, "
                f"hv_gain {c['hv_gain']:+.4f} (reference {c['reference'][0]:.3f}, "
                f"{c['reference'][1]:.3f}), {c['replicates']} replicate(s), "
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
    """Full post-training with neither dropout nor replay: the λ analyses' rows."""
    return [
        r
        for r in rows
        if not r.get("dropout", 0.0) and not r.get("replay", 0.0) and not r.get("lora_rank", 0)
    ]


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


MIXED_BETTER = ("mixed retains better", "unmixed retains better")
# Effect name -> (what a positive mean says, what a negative one says); None: descriptive.
EFFECTS = {
    "gap (L_ft, L_ret)": MIXED_BETTER,
    "gap (L_ret, L_pre)": ("mixed keeps D_pre better", "unmixed keeps D_pre better"),
    "hv_gain (L_ft, L_ret)": ("mixed frontier larger", "unmixed frontier larger"),
    "hv_gain (L_ret, L_pre)": ("mixed frontier larger", "unmixed frontier larger"),
    "unmixed dominated by mixed (L_ft, L_ret)": None,
    "mixed dominated by unmixed (L_ft, L_ret)": None,
    "unmixed dominated by mixed (L_ret, L_pre)": None,
    "mixed dominated by unmixed (L_ret, L_pre)": None,
    "L_ret gap at stage-3 LR": MIXED_BETTER,
    "L_ret fall per unit λ": ("L_ret falls with λ", "L_ret rises with λ"),
    "L_im spread over λ": None,
    "compute-matched best λ": None,
}
PRIMARY = "gap (L_ft, L_ret)"


def _extremes(rows: list[dict]) -> list[dict]:
    """Per group, the rows at λ = 0 (unmixed) and at the group's largest λ (mixed)."""
    top = defaultdict(float)
    for r in rows:
        top[group(r)] = max(top[group(r)], r.get("lam", 0.0))
    return [r for r in rows if r.get("lam", 0.0) in (0.0, top[group(r)])]


def _by_replicate(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    out = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[group(r)][replicate(r)].append(r)
    return out


def _mean_over_settings(rows: list[dict], fn) -> float:
    """fn(rows of one stage-2 setting) averaged over the settings where it is defined."""
    by = defaultdict(list)
    for r in rows:
        by[r.get("post_lr"), r.get("post_batch")].append(r)
    values = [v for v in (fn(mine) for mine in by.values()) if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _l_ret_gap(rows: list[dict]) -> float:
    l_ret = {method(r): r["L_ret"] for r in rows}
    return l_ret["unmixed"] - l_ret["mixed"] if len(l_ret) == 2 else math.nan


def _slope(rows: list[dict], key: str) -> float:
    lams = [r["lam"] for r in rows]
    return float(np.polyfit(lams, [r[key] for r in rows], 1)[0]) if len(set(lams)) > 1 else math.nan


def _spread(rows: list[dict], key: str) -> float:
    return max(r[key] for r in rows) - min(r[key] for r in rows) if rows else math.nan


def _best_lam(rows: list[dict]) -> float:
    return min(rows, key=lambda r: r["L_ret"])["lam"] if rows else math.nan


def _effects_of(per_rep: dict[int, list[dict]], fn) -> stats.Effect:
    reps = sorted(per_rep)
    return stats.effect([fn(per_rep[s]) for s in reps], reps)


def effects(rows: list[dict], frontiers: dict, ft_lr: float) -> dict[str, dict[str, dict]]:
    """Group -> effect name -> {"effect": stats.Effect over replicates, "positive",
    "negative"} (see EFFECTS), from converged full post-training rows. Mixed is the
    group's largest λ, unmixed λ 0; every value is computed within one replicate."""
    added = converged(_added(rows))
    matched = [r for r in converged(_plain(rows)) if r.get("compute_matched", False)]
    at = lambda rs, lr: [r for r in rs if math.isclose(r["ft_lr"], lr, rel_tol=1e-6)]
    out = defaultdict(dict)

    def put(g: str, name: str, e: stats.Effect) -> None:
        kind = next(k for k in EFFECTS if name.startswith(k))
        positive, negative = EFFECTS[kind] or (None, None)
        out[g][name] = {"effect": e, "positive": positive, "negative": negative}

    for g, views in frontiers.items():
        for view, c in views.items():
            put(g, f"gap {view}", c["stats"]["gap"])
            put(g, f"hv_gain {view}", c["stats"]["hv_gain"])
            put(g, f"unmixed dominated by mixed {view}", c["stats"]["b_dominated_by_a"])
            put(g, f"mixed dominated by unmixed {view}", c["stats"]["a_dominated_by_b"])
    for g, per_rep in _by_replicate(_extremes(added)).items():
        for lr in sorted({r["ft_lr"] for r in added}):
            gap = lambda rs, lr=lr: _mean_over_settings(at(rs, lr), _l_ret_gap)
            put(g, f"L_ret gap at stage-3 LR {lr:g}", _effects_of(per_rep, gap))
    for g, per_rep in _by_replicate(at(added, ft_lr)).items():
        fall = lambda rs: -_mean_over_settings(rs, lambda m: _slope(m, "L_ret"))
        put(g, "L_ret fall per unit λ", _effects_of(per_rep, fall))
        spread = lambda rs: _mean_over_settings(rs, lambda m: _spread(m, "L_im"))
        put(g, "L_im spread over λ", _effects_of(per_rep, spread))
    for g, per_rep in _by_replicate(at(matched, ft_lr)).items():
        best = lambda rs: _mean_over_settings(rs, _best_lam)
        put(g, "compute-matched best λ", _effects_of(per_rep, best))
    return dict(out)


def format_effects(found: dict[str, dict[str, dict]]) -> str:
    """A verdict line per signed effect, mean and interval per descriptive one."""
    lines = [
        "effects over replicates (mixed = the largest λ, unmixed = λ 0; paired within "
        "a replicate; 95% t-interval, exact sign-flip p):"
    ]
    for g, named in found.items():
        for name in sorted(named, key=lambda k: (k != PRIMARY, list(named).index(k))):
            item, e = named[name], named[name]["effect"]
            label = f"  {g}: {name}" + (" (primary)" if name == PRIMARY else "")
            if item["positive"] is not None:
                lines.append(stats.verdict(label, e, item["positive"], item["negative"]))
            elif e.n:
                lo, hi = e.ci95
                ci = f" (95% CI {lo:.4f} to {hi:.4f})" if e.n > 1 else ""
                lines.append(f"{label}: {e.mean:.4f}{ci}, n = {e.n}")
    return "\n".join(lines)


def summary(rows: list[dict], ft_lr: float | None = None) -> dict:
    """Everything the built-in experiment reports, computed from its rows.

    Keys: convergence (see `convergence`), share (`exposure_share`), ft_lr (the stage-3
    LR of the λ readings, default the one closest to 5e-5), forgetting (per stage-3 LR),
    settings: (post_lr, post_batch, pool_tokens) -> {"added": [LambdaPoint],
    "L_ret_by_ft_lr": stage-3 LR -> the added arm's L_ret per λ, "L_im_spread": max - min
    of its L_im over λ,
    "compute_matched": [LambdaPoint], "best_lam": the compute-matched λ of lowest L_ret},
    replicates (those present), frontiers (`compare` of the largest λ against λ 0 on the
    added arm, both views), effects (`effects`) and forecast (`forecast.validate`: the
    probes' ρ with L_ret against L_im's). The λ readings are means over replicates; the
    effects carry the per-replicate values.
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
    frontiers = compare(_extremes(_added(rows)))
    return {
        "replicates": sorted({replicate(r) for r in rows}),
        "convergence": convergence(rows),
        "share": exposure_share(rows),
        "ft_lr": ft_lr,
        "forgetting": forgetting(rows),
        "settings": settings,
        "frontiers": frontiers,
        "effects": effects(rows, frontiers, ft_lr) if ft_lr is not None else {},
        "forecast": forecast.validate(rows),
    }


SUMMARY = "summary.json"


def write_summary(workdir: str, rows: list[dict]) -> dict:
    """Writes `<workdir>/summary.json` (atomically): every number `format_summary` prints,
    as `to_json` spells it; returns the summary."""
    s = summary(rows)
    fileio.write_json(os.path.join(workdir, SUMMARY), to_json(s))
    return s


def to_json(value):
    """A summary as plain JSON values: Effects and LambdaPoints as dicts, tuple keys as
    'a, b, c' strings, NaN as None (strict JSON)."""
    if isinstance(value, stats.Effect):
        return to_json(value.to_json())
    if isinstance(value, LambdaPoint):
        return to_json(value._asdict())
    if isinstance(value, dict):
        return {
            ", ".join(map(str, k)) if isinstance(k, tuple) else str(k): to_json(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return to_json(value.item())
    return value


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
    if s["effects"]:
        lines.append(format_effects(s["effects"]))
    if s.get("forecast"):
        lines.append(forecast.format_validation(s["forecast"]))
    return "\n".join(lines)
