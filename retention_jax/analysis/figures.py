"""The paper's figures from results rows: frontiers (Fig. 2), λ sweeps (Fig. 3), methods
(Figs. 4-6).

Each `draw_*` returns a matplotlib Figure (not registered with pyplot, so nothing leaks or
shows twice in a notebook); `draw_all` writes the ones the rows support as PNG and PDF.
Leaves whose post-training hit its token cap (`report.cap_hit`) are drawn hollow and
take no part in any frontier.
"""

import io
import os
from collections import defaultdict

import numpy as np
from matplotlib.figure import Figure

from retention_jax import fileio
from retention_jax.analysis import forecast, frontier, paper, report, results
from retention_jax.analysis.results import method, pipeline

PLAIN = ("unmixed", "mixed")
_COLORS = {
    "unmixed": "tab:gray",
    "mixed": "tab:blue",
    "mixed+dropout": "tab:green",
    "mixed+replay": "tab:orange",
    "mixed+dropout+replay": "tab:purple",
    "unmixed+dropout": "olivedrab",
    "unmixed+replay": "peru",
}
_PALETTE = ("tab:red", "tab:brown", "tab:pink", "tab:cyan", "tab:olive")
_AFTER = {"L_im": "post-training", "L_ret": "fine-tuning", "L_ft": "fine-tuning"}
_DOMAIN = {"L_im": "d_post", "L_ret": "d_post", "L_ft": "d_ft", "L_pre": "d_pre"}


def label(loss: str, row: dict) -> str:
    """Axis label naming the loss, its domain and when it is measured."""
    return f"{loss}: {row.get(_DOMAIN[loss], '?')} loss after {_AFTER.get(loss, 'fine-tuning')}"


def _methods(rows: list[dict]) -> list[str]:
    """Methods present, in Fig. 4's order (unmixed, mixed, +dropout, +replay, others)."""
    order = list(_COLORS)
    return sorted(
        {method(r) for r in rows},
        key=lambda m: (order.index(m), m) if m in order else (len(order), m),
    )


def _color(name: str, order: list[str]) -> str:
    return _COLORS.get(name) or _PALETTE[order.index(name) % len(_PALETTE)]


def _frontier_panel(ax, rows: list[dict], view: tuple[str, str], methods: list[str]) -> None:
    """Every leaf as a point; each method's frontier as its staircase (seed mean ± 95% CI)
    over the leaves that did not hit the stage-2 cap (those are drawn hollow)."""
    for name in methods:
        mine = [r for r in rows if method(r) == name]
        if not mine:
            continue
        color = _color(name, methods)
        capped = report.points([r for r in mine if report.cap_hit(r)], view)
        if len(capped):
            ax.scatter(
                *capped.T, s=16, facecolors="none", edgecolors=color, label=f"{name}, hit cap"
            )
        mine = report.converged(mine)
        if not mine:
            continue
        xy = report.points(mine, view)
        ax.scatter(xy[:, 0], xy[:, 1], s=16, alpha=0.5, color=color, label=name)
        seeds = sorted({r.get("seed", 0) for r in mine})
        if len(seeds) == 1:
            front = frontier.pareto_front(xy)
            ax.step(front[:, 0], front[:, 1], where="post", color=color, lw=2)
            continue
        per_seed = [report.points([r for r in mine if r.get("seed", 0) == s], view) for s in seeds]
        xs = np.linspace(xy[:, 0].min(), xy[:, 0].max(), 200)
        mean, half = frontier.band(per_seed, xs)
        ax.plot(xs, mean, color=color, lw=2, drawstyle="steps-post")
        ax.fill_between(xs, mean - half, mean + half, color=color, alpha=0.15, lw=0, step="post")
    ax.set_xlabel(label(view[0], rows[0]))
    ax.set_ylabel(label(view[1], rows[0]))
    ax.grid(alpha=0.3)


def _by(rows: list[dict], key) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(sorted(out.items()))


def _not_compute_matched(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("compute_matched", False)]


def draw_frontiers(rows: list[dict], methods: list[str] | None = None) -> Figure:
    """Fig. 2: per pipeline, (L_ft, L_ret) and (L_ret, L_pre), points and Pareto frontiers.

    `methods` defaults to unmixed and mixed (those present); compute-matched rows are left out.
    """
    rows = _not_compute_matched(rows)
    present = _methods(rows)
    methods = methods or [m for m in PLAIN if m in present] or present
    pipes = _by([r for r in rows if method(r) in methods], results.group)
    fig = Figure(figsize=(11, 4.2 * len(pipes)), layout="constrained")
    axes = fig.subplots(len(pipes), len(report.VIEWS), squeeze=False)
    for (pipe, mine), row_axes in zip(pipes.items(), axes, strict=True):
        for ax, view in zip(row_axes, report.VIEWS, strict=True):
            _frontier_panel(ax, mine, view, methods)
            ax.set_title(f"{pipe} (D_pre {mine[0].get('d_pre', '?')})\nlower-left is better")
        row_axes[0].legend(fontsize=8)
    return fig


# Figs. 4-6: the view and, per panel, the methods it compares (the panel's arm last).
METHOD_FIGURES = {
    "fig4": (
        ("L_ret", "L_ft"),
        {
            "dropout": ("unmixed", "mixed", "mixed+dropout"),
            "replay": ("unmixed", "mixed", "mixed+replay"),
        },
    ),
    "fig5": (
        ("L_ret", "L_pre"),
        {
            "dropout": ("unmixed", "mixed", "mixed+dropout"),
            "replay": ("unmixed", "mixed", "mixed+replay"),
        },
    ),
    "fig6": (
        ("L_ret", "L_ft"),
        {
            "dropout": ("unmixed", "unmixed+dropout", "mixed"),
            "replay": ("unmixed", "unmixed+replay", "mixed"),
        },
    ),
}


def method_panels(rows: list[dict], name: str) -> dict[str, tuple[str, ...]]:
    """The panels of figure `name` ('fig4' | 'fig5' | 'fig6') whose arm the rows hold."""
    if name not in METHOD_FIGURES:
        raise ValueError(f"figure {name!r} unknown; allowed: {sorted(METHOD_FIGURES)}")
    present = {method(r) for r in _not_compute_matched(rows)}
    panels = METHOD_FIGURES[name][1]
    # A panel needs its arm's method, the one beyond unmixed and mixed.
    return {arm: ms for arm, ms in panels.items() if set(ms) - set(PLAIN) <= present}


def draw_methods(rows: list[dict], name: str = "fig4") -> Figure:
    """Figs. 4-6: per group (pipeline, pool) a row of panels, dropout then replay.

    fig4: x = L_ret, y = L_ft, unmixed / mixed / mixed + the arm; fig5: the same methods
    in the (L_ret, L_pre) view; fig6: λ = 0 with the arm against mixing alone.
    """
    panels = method_panels(rows, name)
    if not panels:
        raise ValueError(
            f"draw_methods({name!r}): the rows hold neither a dropout nor a replay arm"
        )
    view = METHOD_FIGURES[name][0]
    groups = _by(_not_compute_matched(rows), results.group)
    fig = Figure(figsize=(5.5 * len(panels), 4.5 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), len(panels), squeeze=False)
    for (pipe, mine), row_axes in zip(groups.items(), axes, strict=True):
        for ax, (arm, methods) in zip(row_axes, panels.items(), strict=True):
            _frontier_panel(ax, mine, view, list(methods))
            ax.set_title(f"{pipe}: {arm}\nlower-left is better")
            ax.legend(fontsize=8)
    return fig


def draw_lambda(
    rows: list[dict],
    reference: str | None = None,
    ft_lr: float | None = None,
    post: tuple | None = None,
) -> Figure:
    """Fig. 3: per setting (added, compute-matched), L_im and L_ret against λ.

    One line per |D_post| pool, a star at each line's best λ, a ring around points whose
    post-training hit its cap; rows of one pipeline and one stage-2 setting (`post`, see
    `report.lambda_curves`). reference="paper" overlays the paper's 135M numbers (dashed).
    """
    curves = report.lambda_curves(rows, ft_lr, post)
    ref = report.lambda_curves(paper.rows()) if reference == "paper" else {}
    settings = sorted({cm for cm, _ in curves})
    fig = Figure(figsize=(11, 4.2 * len(settings)), layout="constrained")
    axes = fig.subplots(len(settings), 2, squeeze=False)
    lr = report.reference_ft_lr(rows) if ft_lr is None else ft_lr
    post = report.stage2_settings(rows)[0] if post is None else post
    for cm, row_axes in zip(settings, axes, strict=True):
        setting = "compute-matched" if cm else "added"
        for ax, loss in zip(row_axes, ("L_im", "L_ret"), strict=True):
            for pool, curve in ((p, c) for (c_m, p), c in curves.items() if c_m == cm):
                lam, y = [c.lam for c in curve], [getattr(c, loss) for c in curve]
                (line,) = ax.plot(lam, y, "o-", label=f"|D_post| = {results.tokens_label(pool)}")
                best = int(np.argmin(y))
                ax.scatter([lam[best]], [y[best]], marker="*", s=220, color=line.get_color())
                capped = [(c.lam, getattr(c, loss)) for c in curve if c.cap_hit]
                if capped:
                    x, yc = zip(*capped, strict=True)
                    ax.scatter(x, yc, s=140, facecolors="none", edgecolors="red", label="hit cap")
            if ref:
                _paper_reference(ax, ref, cm, loss)
            ax.set_xlabel("λ (share of D_post seen in pretraining)")
            ax.set_ylabel(label(loss, rows[0]))
            ax.set_title(
                f"{pipeline(rows[0])}, {setting}, stage-3 LR {lr:g}\n"
                f"stage 2: LR {post[0]}, batch {post[1]}"
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return fig


def _paper_reference(ax, ref: dict, cm: bool, loss: str) -> None:
    """The paper's 135M cells (dashed, darker for larger pools), a hollow star at each
    curve's best λ; for the compute-matched pools whose values were not digitized, a
    dotted line at the best λ the figure shows."""
    shade = {pool: 0.3 + 0.7 * pool / 300e6 for pool in paper.POOLS}
    for pool, curve in ((p, c) for (c_m, p), c in ref.items() if c_m == cm):
        lam, y = [c.lam for c in curve], [getattr(c, loss) for c in curve]
        name = f"paper 135M, {results.tokens_label(pool)}"
        ax.plot(lam, y, "x--", color="k", alpha=shade[pool], label=name)
        best = int(np.argmin(y))
        ax.plot(lam[best], y[best], "*", ms=16, mfc="none", mec="k", alpha=shade[pool])
    if cm and loss == "L_ret":
        for pool, lam in paper.COMPUTE_MATCHED_BEST_LAM.items():
            if (cm, pool) not in ref:
                label = f"paper 135M, {results.tokens_label(pool)}: best λ (values not digitized)"
                ax.axvline(lam, ls=":", color="k", alpha=shade[pool], label=label)


def save(fig: Figure, path_without_ext: str) -> list[str]:
    """Writes `fig` as PNG and PDF (local or gs://); returns the paths."""
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150)
        paths.append(f"{path_without_ext}.{ext}")
        fileio.write_bytes(paths[-1], buf.getvalue())
    return paths


def draw_all(
    workdir: str, rows: list[dict] | None = None, reference: str | None = None
) -> list[str]:
    """Draws into <workdir>/figures whatever the rows support; returns the paths written.

    frontiers (Fig. 2): any non compute-matched row; fig4, fig5, fig6: a dropout or replay
    arm; lambda_<pipeline>: a setting with at least two λ values, one figure per stage-2
    setting (suffixed _lr<post_lr>_b<post_batch> when there are several); forecast: rows
    whose post-training node holds probes.
    """
    rows = results.load(workdir) if rows is None else rows
    out = os.path.join(str(workdir), "figures")
    paths = []
    plain = _not_compute_matched(rows)
    if plain:
        paths += save(draw_frontiers(plain), os.path.join(out, "frontiers"))
    for name in METHOD_FIGURES:
        if method_panels(plain, name):
            paths += save(draw_methods(plain, name), os.path.join(out, name))
    for pipe, mine in _by(rows, pipeline).items():
        settings = report.stage2_settings(mine)
        for post in settings:
            if any(len(c) >= 2 for c in report.lambda_curves(mine, post=post).values()):
                name = "lambda_" + pipe.replace("->", "-")
                if len(settings) > 1:
                    name += f"_lr{post[0]}_b{post[1]}"
                paths += save(draw_lambda(mine, reference, post=post), os.path.join(out, name))
    if any(r.get("forecast") for r in rows):
        paths += save(forecast.draw(rows), os.path.join(out, "forecast"))
    return paths
