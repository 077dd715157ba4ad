r"""The paper's section-5 two-layer linear network, simulated under the paper's protocol.

  python -m retention_jax.analysis.theory --json        # the numbers
  python -m retention_jax.analysis.theory --out=t.png   # the T and K sweeps, drawn
  python -m retention_jax.analysis.theory --phase --out=p.png  # the phase diagram

Model. θ = W1·W2 (n x n, hidden width n) maps x to y; task t has target A_t = U Σ_t Vᵀ and
every task shares U and V, so we work in that basis (A_t = diag(σ_t)). Losses are population
losses in closed form, L_t(θ) = E‖(θ - A_t)x‖² = Σ_ij (θ - A_t)_ij² C_t[j], with C_t the
diagonal input covariance: I_{n-k} (zero on the specialized block) for D_pre and D_ft, I_n for
D_post. Initialisation W1(0) = W2(0) = exp(-T)·I; from there full-matrix gradient descent
keeps θ diagonal, with θ_ii = a_i² ≥ 0 (tests check both).

Features: invariant (largest singular value, the same in every task), inconsistent (D_post
disagrees with D_pre and D_ft by at least c_mis), specialized (value β < c_mis/2 in D_post
only, k of them).

Protocol. Stage 1: a fixed number of GD steps (time-limited) on the α-mixture
(1-α)·D_pre + α·D_post (mixed) or on D_pre (unmixed). Stage 2, the same for both models:
K GD steps on ‖θ - A_post‖² + λ‖θ - θ0‖², θ0 the stage-2 start. Stage 3: plain GD on D_ft.
Δ = L_ret - L_im is the rise of the D_post loss during stage 3.

Where the paper's assumptions contradict each other, and what is relaxed here:
- C.6 (αβ > (1-α)σ_pre + ασ_post on the inconsistent block) cannot hold for non-negative
  singular values (C.3/C.4): for β < c_mis/2 the mixture's inconsistent target exceeds αβ.
  With W1(0) = W2(0) the network cannot represent a negative diagonal either. We keep
  C.3/C.4 and drop C.6, so the mixed model learns the inconsistent block in stage 1, to the
  mixture's compromise (1-α)σ_pre + ασ_post, instead of leaving it at zero (Thm C.10).
- The mixture's input covariance on the specialized block is α, so GD drives those singular
  values to β at rate ∝ αβ, not to αβ: after stage 1 they sit wherever the step budget lets
  them get (the T sweep shows the window), and they are reported against both β and αβ.

The bound Δ_unmixed ≥ k[c_mis² - 4βε - 2c_mis·ε] is evaluated with k the number of
inconsistent features and ε the largest distance of the unmixed model's singular values from
the idealised states the argument assumes, diag(σ_inv, σ_post, 0) after stage 2 and
diag(σ_inv, σ_ft, 0) after stage 3; it "applies" where it is positive.

Phase diagram (`phase_diagram`, `draw_phase`): the same protocol on grids over what the
theorems leave open (T, K, λ, α, β against c_mis, D_post's inconsistent value and its input
variance on the specialized block), with C.6 either dropped as above or "imposed": the mixed
model leaves stage 1 with its inconsistent block unlearned, the state Thm C.10 asserts. Each
cell gives the sign and size of Δ_mixed - Δ_unmixed and of the L_ret gap, whether the bound
applies and holds, and whether C.4 and C.6 hold.

`matched_stop` keeps, as an illustration only, the rule that stops each model's stage 2 once
its D_post loss reaches the mixed model's loss after stage 1: it gives the two models
different stage-2 lengths, and that difference alone produces a gap in Δ.
"""

import argparse
import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

TASKS = ("pre", "post", "ft")
BLOCKS = ("invariant", "inconsistent", "specialized")
STAGES = ("init", "pretrain", "posttrain", "finetune")
MODELS = ("mixed", "unmixed")
POINT_KEYS = ("alpha", "T", "lam", "K")  # what one batch may vary between its runs
SWEEPS = {"T": (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0), "K": (10, 30, 100, 300, 1000, 3000)}
LAM_SWEEP = (0.0, 0.1, 1.0)  # where the lower bound applies depends on λ


@dataclasses.dataclass(frozen=True)
class Config:
    """One setting of the model and the protocol.

    alpha = 0.03 is about the paper's 0.3B D_post tokens mixed into ~10B pretraining tokens.
    The stage-1 budget (steps_pretrain · lr = 200 time units) lets the mixed model's
    specialized features leave their saddle at T up to about 5 (see the T sweep).
    """

    n_invariant: int = 2
    n_inconsistent: int = 2
    n_specialized: int = 2  # the paper's k
    sigma_invariant: float = 3.0
    sigma_inconsistent: tuple[float, float, float] = (1.0, 2.0, 1.0)  # pre, post, ft
    beta: float = 0.4  # specialized singular value in D_post
    alpha: float = 0.03  # share of D_post in the mixed model's stage 1
    T: float = 4.0  # W1(0) = W2(0) = exp(-T)·I
    lam: float = 1.0  # proximal weight λ of stage 2
    K: int = 100  # stage-2 steps, the same for both models
    lr: float = 0.02  # GD step size of every stage
    steps_pretrain: int = 10_000
    steps_finetune: int = 500

    def __post_init__(self):
        def bad(key: str, allowed: str):
            raise ValueError(f"config key {key}={getattr(self, key)!r}: {allowed}")

        for key in ("n_invariant", "n_inconsistent", "n_specialized"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "must be an integer >= 1")
        for key in ("K", "steps_pretrain", "steps_finetune"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                bad(key, "must be an integer >= 0")
        sig = self.sigma_inconsistent
        if len(sig) != 3 or min(sig) < 0:
            bad("sigma_inconsistent", "must be three non-negative values (pre, post, ft)")
        if not self.sigma_invariant > max(sig):
            bad("sigma_invariant", f"must exceed every inconsistent value (max {max(sig)})")
        if self.c_mis <= 0:
            bad("sigma_inconsistent", "D_post must differ from D_pre and from D_ft")
        if not 0 < self.beta < self.c_mis / 2:
            bad("beta", f"must lie in (0, c_mis/2) = (0, {self.c_mis / 2})")
        if not 0 <= self.alpha <= 1:
            bad("alpha", "must lie in [0, 1]")
        if not self.T > 0:
            bad("T", "must be > 0")
        if not self.lam >= 0:
            bad("lam", "must be >= 0")
        limit = 1 / (2 * (1 + self.lam) * self.sigma_invariant)
        if not 0 < self.lr < limit:
            bad("lr", f"must lie in (0, 1/(2(1+lam)·sigma_invariant)) = (0, {limit:.4g})")

    @property
    def n(self) -> int:
        return self.n_invariant + self.n_inconsistent + self.n_specialized

    @property
    def c_mis(self) -> float:
        """Margin by which D_post disagrees with D_pre and D_ft on the inconsistent block."""
        pre, post, ft = self.sigma_inconsistent
        return min(abs(post - pre), abs(post - ft))


def blocks(cfg: Config) -> dict[str, slice]:
    a, b = cfg.n_invariant, cfg.n_invariant + cfg.n_inconsistent
    return dict(invariant=slice(0, a), inconsistent=slice(a, b), specialized=slice(b, cfg.n))


def tasks(cfg: Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task: (singular values, input variances), one entry per feature."""
    out = {}
    for t, sig_inc in zip(TASKS, cfg.sigma_inconsistent, strict=True):
        post = float(t == "post")
        sig = [cfg.sigma_invariant] * cfg.n_invariant + [sig_inc] * cfg.n_inconsistent
        sig += [cfg.beta * post] * cfg.n_specialized
        var = [1.0] * (cfg.n_invariant + cfg.n_inconsistent) + [post] * cfg.n_specialized
        out[t] = (np.asarray(sig, np.float32), np.asarray(var, np.float32))
    return out


class _Knobs(NamedTuple):
    """What varies between the runs of one batch (each field has one entry per run)."""

    alpha: jax.Array
    T: jax.Array
    lam: jax.Array
    K: jax.Array
    stop: jax.Array  # stage 2 halts once the D_post loss <= stop; -inf under the protocol


@dataclasses.dataclass(frozen=True)
class _Steps:
    """GD steps of each stage in one batch's program: static (scan lengths), so hashable."""

    pretrain: int
    posttrain: int  # the batch's largest K: each run masks its steps past its own K
    finetune: int


def _one_run(sig_3xN, var_3xN, knobs: _Knobs, lr, steps: _Steps):
    """One model through the three stages; returns θ's diagonal and losses after each."""
    n = sig_3xN.shape[1]
    a_3xNxN = jax.vmap(jnp.diag)(sig_3xN)

    def feature_losses(theta_NxN):  # 3xN: each task's loss, split by input feature
        return jnp.sum((theta_NxN[None] - a_3xNxN) ** 2 * var_3xN[:, None, :], axis=1)

    def descend(params, objective, n_steps, active):
        def step(carry, i):
            p, taken = carry
            g = jax.grad(lambda q: objective(q[0] @ q[1]))(p)
            on = active(i, p[0] @ p[1])
            p = jax.tree.map(lambda x, d: jnp.where(on, x - lr * d, x), p, g)
            return (p, taken + on), None

        (params, taken), _ = jax.lax.scan(step, (params, 0), jnp.arange(n_steps), unroll=8)
        return params, taken

    w_NxN = jnp.exp(-knobs.T) * jnp.eye(n)
    params = (w_NxN, w_NxN)
    thetas = [params[0] @ params[1]]
    mix_3 = jnp.stack([1 - knobs.alpha, knobs.alpha, 0.0])
    params, _ = descend(
        params, lambda th: mix_3 @ feature_losses(th).sum(1), steps.pretrain, lambda i, th: True
    )
    thetas.append(theta0_NxN := params[0] @ params[1])

    def proximal(th):
        return feature_losses(th)[1].sum() + knobs.lam * jnp.sum((th - theta0_NxN) ** 2)

    def stage2_active(i, th):
        return (i < knobs.K) & (feature_losses(th)[1].sum() > knobs.stop)

    params, post_steps = descend(params, proximal, steps.posttrain, stage2_active)
    thetas.append(params[0] @ params[1])
    params, _ = descend(
        params, lambda th: feature_losses(th)[2].sum(), steps.finetune, lambda i, th: True
    )
    thetas.append(params[0] @ params[1])
    th_4xNxN = jnp.stack(thetas)
    off_4xNxN = th_4xNxN * (1 - jnp.eye(n))[None]
    return dict(
        singular_4xN=jax.vmap(jnp.diag)(th_4xNxN),
        losses_4x3xN=jax.vmap(feature_losses)(th_4xNxN),
        offdiag=jnp.max(jnp.abs(off_4xNxN)),
        post_steps=post_steps,
    )


@functools.partial(jax.jit, static_argnames=("steps",))
def _pipeline(sig_3xN, var_3xN, knobs: _Knobs, lr, steps: _Steps):
    """Every run of the batch through the three stages, in one compiled program."""
    run = functools.partial(_one_run, lr=lr, steps=steps)
    return jax.vmap(run, in_axes=(None, None, 0))(sig_3xN, var_3xN, knobs)


@dataclasses.dataclass
class Run:
    """One model through the three stages."""

    cfg: Config  # the setting it ran under (its own alpha, T, lam, K)
    singular: dict[str, np.ndarray]  # stage -> diagonal of θ at the stage's end
    feature_losses: dict[str, np.ndarray]  # stage -> (L_pre, L_post, L_ft) split by feature
    post_steps: int  # stage-2 steps taken
    offdiag: float  # largest |off-diagonal entry| of θ over all stages

    def end(self, stage: str) -> np.ndarray:
        """(L_pre, L_post, L_ft) at the end of `stage`."""
        return self.feature_losses[stage].sum(axis=1)

    @property
    def L_im(self) -> float:
        return float(self.end("posttrain")[1])

    @property
    def L_ret(self) -> float:
        return float(self.end("finetune")[1])

    @property
    def L_ft(self) -> float:
        return float(self.end("finetune")[2])

    @property
    def L_pre(self) -> float:
        return float(self.end("finetune")[0])

    @property
    def pre_rise(self) -> float:
        """How much stage 2 raised the D_pre loss."""
        return float(self.end("posttrain")[0] - self.end("pretrain")[0])

    @property
    def delta(self) -> float:
        """Rise of the D_post loss during fine-tuning."""
        return self.L_ret - self.L_im

    def delta_by_block(self) -> dict[str, float]:
        rise_N = self.feature_losses["finetune"][1] - self.feature_losses["posttrain"][1]
        return {b: float(rise_N[s].sum()) for b, s in blocks(self.cfg).items()}

    def block_means(self) -> dict[str, dict[str, float]]:
        """Mean learned singular value per block after each stage."""
        return {
            stage: {b: float(np.mean(sv[s])) for b, s in blocks(self.cfg).items()}
            for stage, sv in self.singular.items()
        }


def simulate(
    cfg: Config, points: Sequence[dict[str, float]], stop: Sequence[float] | None = None
) -> list[Run]:
    """Runs one batch: each point overrides some of alpha, T, lam and K of `cfg`.

    `stop` (per point) halts stage 2 once the D_post loss reaches it; None is the protocol.
    """
    for p in points:
        for key in sorted(set(p) - set(POINT_KEYS)):
            raise ValueError(f"config key {key}={p[key]!r}: a point may set only {POINT_KEYS}")
    cfgs = [dataclasses.replace(cfg, **p) for p in points]  # validates each point
    stops = [-math.inf] * len(points) if stop is None else list(stop)
    sig, var = zip(*tasks(cfg).values(), strict=True)
    knobs = _Knobs(
        alpha=jnp.asarray([c.alpha for c in cfgs], jnp.float32),
        T=jnp.asarray([c.T for c in cfgs], jnp.float32),
        lam=jnp.asarray([c.lam for c in cfgs], jnp.float32),
        K=jnp.asarray([c.K for c in cfgs], jnp.int32),
        stop=jnp.asarray(stops, jnp.float32),
    )
    steps = _Steps(cfg.steps_pretrain, max(c.K for c in cfgs), cfg.steps_finetune)
    out = jax.device_get(_pipeline(jnp.stack(sig), jnp.stack(var), knobs, cfg.lr, steps=steps))
    return [
        Run(
            cfg=c,
            singular=dict(zip(STAGES, out["singular_4xN"][i], strict=True)),
            feature_losses=dict(zip(STAGES, out["losses_4x3xN"][i], strict=True)),
            post_steps=int(out["post_steps"][i]),
            offdiag=float(out["offdiag"][i]),
        )
        for i, c in enumerate(cfgs)
    ]


def _pairs(point: dict[str, float], cfg: Config) -> list[dict[str, float]]:
    return [{**point, "alpha": cfg.alpha}, {**point, "alpha": 0.0}]


def compare(cfg: Config = Config()) -> dict[str, Run]:
    """Mixed (alpha = cfg.alpha) and unmixed (alpha = 0) runs under the protocol."""
    return dict(zip(MODELS, simulate(cfg, _pairs({}, cfg)), strict=True))


def matched_stop(
    cfg: Config, target: float | None = None, k_budget: int = max(SWEEPS["K"])
) -> dict[str, Run]:
    """Illustration, not the protocol: stage 2 of each model (at most `k_budget` steps) stops
    once its D_post loss reaches `target`, by default the mixed model's after stage 1."""
    if target is None:
        target = float(compare(dataclasses.replace(cfg, K=0))["mixed"].end("pretrain")[1])
    stop = target * (1 + 1e-5)  # float32 rounding: the mixed model starts at the target
    runs = simulate(cfg, _pairs({"K": k_budget}, cfg), stop=[stop, stop])
    return dict(zip(MODELS, runs, strict=True))


def lower_bound(run: Run) -> dict[str, float | bool]:
    """The paper's bound k[c_mis² - 4βε - 2c_mis·ε] on Δ_unmixed, ε measured on `run`."""
    cfg = run.cfg
    b = blocks(cfg)
    _, post, ft = cfg.sigma_inconsistent
    eps = 0.0
    for stage, inc in (("posttrain", post), ("finetune", ft)):
        ideal_N = np.zeros(cfg.n)
        ideal_N[b["invariant"]] = cfg.sigma_invariant
        ideal_N[b["inconsistent"]] = inc
        eps = max(eps, float(np.max(np.abs(run.singular[stage] - ideal_N))))
    c = cfg.c_mis
    bound = cfg.n_inconsistent * (c**2 - 4 * cfg.beta * eps - 2 * c * eps)
    return dict(c_mis=c, eps=eps, bound=bound, applies=bound > 0, holds=run.delta >= bound)


def claims(runs: dict[str, Run]) -> dict[str, Any]:
    """The numbers behind the three claims of section 5, for a mixed/unmixed pair."""
    cfg = runs["unmixed"].cfg
    out: dict[str, Any] = {
        "T": cfg.T,
        "K": cfg.K,
        "lam": cfg.lam,
        "beta": cfg.beta,
        "alpha_beta": runs["mixed"].cfg.alpha * cfg.beta,
        "spec_init": math.exp(-2 * cfg.T),
    }
    for name, run in runs.items():
        means = run.block_means()
        out |= {
            f"spec_after_pretrain_{name}": means["pretrain"]["specialized"],
            f"spec_after_posttrain_{name}": means["posttrain"]["specialized"],
            f"inc_after_pretrain_{name}": means["pretrain"]["inconsistent"],
            f"inc_after_posttrain_{name}": means["posttrain"]["inconsistent"],
            f"post_steps_{name}": run.post_steps,
            f"pre_rise_{name}": run.pre_rise,
            f"L_im_{name}": run.L_im,
            f"L_ret_{name}": run.L_ret,
            f"L_ft_{name}": run.L_ft,
            f"L_pre_{name}": run.L_pre,
            f"delta_{name}": run.delta,
        }
        out |= {f"delta_{b}_{name}": v for b, v in run.delta_by_block().items()}
    out |= {f"bound_{k}": v for k, v in lower_bound(runs["unmixed"]).items()}
    return out


def report(cfg: Config = Config()) -> dict[str, Any]:
    """Headline pair, the T, K and λ sweeps and the matched-stop illustration, as JSON data.

    Everything under the protocol runs in one compiled batch."""
    points = [{}]
    points += [{"T": t} for t in SWEEPS["T"]] + [{"K": k} for k in SWEEPS["K"]]
    points += [{"lam": lam} for lam in LAM_SWEEP]
    runs = simulate(cfg, [q for p in points for q in _pairs(p, cfg)])
    pairs = [
        claims(dict(zip(MODELS, runs[i : i + 2], strict=True))) for i in range(0, len(runs), 2)
    ]
    n_t, n_k = len(SWEEPS["T"]), len(SWEEPS["K"])
    return {
        "config": dataclasses.asdict(cfg),
        "protocol": pairs[0],
        "sweep_T": pairs[1 : 1 + n_t],
        "sweep_K": pairs[1 + n_t : 1 + n_t + n_k],
        "sweep_lam": pairs[1 + n_t + n_k :],
        "matched_stop_illustration": claims(matched_stop(cfg, float(runs[0].end("pretrain")[1]))),
    }


def summary(rep: dict[str, Any]) -> str:
    c, m = rep["protocol"], rep["matched_stop_illustration"]
    lines = [
        f"protocol: T={c['T']}, both models K={c['K']} proximal steps (lam={c['lam']})",
        "(1) specialized singular value after stage 1: "
        f"mixed {c['spec_after_pretrain_mixed']:.4f} (beta {c['beta']}, alpha*beta "
        f"{c['alpha_beta']:.4f}), unmixed {c['spec_after_pretrain_unmixed']:.2e} "
        f"(init {c['spec_init']:.2e})",
        "(2) inconsistent mean after stage 1 -> 2: "
        f"mixed {c['inc_after_pretrain_mixed']:.3f} -> {c['inc_after_posttrain_mixed']:.3f}, "
        f"unmixed {c['inc_after_pretrain_unmixed']:.3f} -> "
        f"{c['inc_after_posttrain_unmixed']:.3f}; D_pre loss rise mixed "
        f"{c['pre_rise_mixed']:.4f}, unmixed {c['pre_rise_unmixed']:.4f}",
        f"(3) delta = L_ret - L_im: mixed {c['delta_mixed']:.4f}, unmixed "
        f"{c['delta_unmixed']:.4f} (specialized part {c['delta_specialized_mixed']:.1e}, "
        f"{c['delta_specialized_unmixed']:.1e}); L_ret mixed {c['L_ret_mixed']:.4f}, "
        f"unmixed {c['L_ret_unmixed']:.4f}",
        f"    bound on delta_unmixed: {c['bound_bound']:.4f} (eps {c['bound_eps']:.3f}, "
        f"applies {c['bound_applies']}, holds {c['bound_holds']})",
        "illustration only, stage 2 stopped at the mixed model's stage-1 D_post loss: steps "
        f"mixed {m['post_steps_mixed']}, unmixed {m['post_steps_unmixed']}; delta mixed "
        f"{m['delta_mixed']:.4f}, unmixed {m['delta_unmixed']:.4f}",
    ]
    return "\n".join(lines)


def draw(rep: dict[str, Any]) -> Figure:
    """Rows: the T sweep and the K sweep. Columns: specialized singular values, Δ with the
    paper's bound, and L_ret with the stage-2 rise of the D_pre loss."""
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3)
    styles = {"mixed": ("tab:green", "o-"), "unmixed": ("tab:purple", "s--")}
    for row, key in zip(axes, ("T", "K"), strict=True):
        points = rep[f"sweep_{key}"]
        x = [p[key] for p in points]
        ax_sv, ax_d, ax_l = row
        for name, (color, style) in styles.items():
            for stage, fill in (("pretrain", color), ("posttrain", "none")):
                ax_sv.plot(
                    x,
                    [p[f"spec_after_{stage}_{name}"] for p in points],
                    style,
                    color=color,
                    mfc=fill,
                    label=f"{name}, after stage {1 if stage == 'pretrain' else 2}",
                )
            ax_d.plot(x, [p[f"delta_{name}"] for p in points], style, color=color, label=name)
            ax_l.plot(x, [p[f"L_ret_{name}"] for p in points], style, color=color, label=name)
            rise = [p[f"pre_rise_{name}"] for p in points]
            ax_l.plot(
                x, rise, style, color=color, mfc="none", alpha=0.6, label=f"{name}, D_pre rise"
            )
        ax_sv.axhline(points[0]["beta"], color="gray", lw=0.8, label="β")
        ax_sv.axhline(points[0]["alpha_beta"], color="gray", lw=0.8, ls=":", label="αβ")
        ax_d.plot(x, [p["bound_bound"] for p in points], "k:", label="paper's bound (unmixed)")
        ax_d.axhline(0, color="gray", lw=0.5)
        for ax, title in zip(
            row,
            ("specialized singular value", "Δ = L_ret − L_im", "L_ret; D_pre loss rise in stage 2"),
            strict=True,
        ):
            ax.set_xlabel("T (init exp(−T)·I)" if key == "T" else "K (stage-2 steps, both)")
            ax.set_title(f"{title} vs {key}")
            ax.legend(fontsize=7)
            if key == "K":
                ax.set_xscale("log")
    return fig


# The phase diagram: every free parameter the theorems leave open, on grids.
#
# With identity initialisation θ stays diagonal and W1 = W2 = diag(a), so each feature
# evolves alone: a <- a·(1 - lr·∂L/∂θ), θ = a². Features of one block share their
# dynamics, so one representative per block (weighted by the block size in every loss)
# gives the full-matrix simulation's numbers (a test checks it), thousands of runs at once.
PHASE_KEYS = ("alpha", "T", "lam", "K", "beta", "sigma_post", "v_spec")
C6_MODES = ("dropped", "imposed")
GRIDS = {
    "T": (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0),
    "K": (0, 3, 10, 30, 100, 300, 1000, 3000),
    "lam": (0.0, 0.03, 0.1, 0.3, 1.0, 2.0, 3.0),
    "alpha": (0.003, 0.01, 0.03, 0.1, 0.3, 0.6, 0.8, 1.0),
    "beta": (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.4, 2.9),
    "sigma_post": (0.0, 0.5, 1.5, 2.0, 2.5),
    "v_spec": (0.1, 0.3, 1.0, 3.0),
}
PANELS = (("T", "K"), ("lam", "K"), ("alpha", "beta"), ("sigma_post", "v_spec"))


def _phase_default(cfg: Config) -> dict[str, float]:
    """`cfg` as a point of the diagram (D_post's specialized input variance is 1)."""
    keys = ("alpha", "T", "lam", "K", "beta")
    return {k: getattr(cfg, k) for k in keys} | {
        "sigma_post": cfg.sigma_inconsistent[1],
        "v_spec": 1.0,
    }


def _block_tasks(cfg: Config, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """(targets, input variances), task x block, for the point `p` of the diagram."""
    pre, _, ft = cfg.sigma_inconsistent
    targets = ((pre, 0.0), (p["sigma_post"], p["beta"]), (ft, 0.0))
    sig = [[cfg.sigma_invariant, inc, b] for inc, b in targets]
    var = [[1.0, 1.0, 0.0], [1.0, 1.0, p["v_spec"]], [1.0, 1.0, 0.0]]
    return np.asarray(sig, np.float32), np.asarray(var, np.float32)


class _BlockRuns(NamedTuple):
    """The runs of one phase-diagram batch, R of them: per run, targets and input
    variances (task x block), the stage-1 task mixture, T, λ, K, and whether C.6 is
    imposed on it."""

    sig_Rx3x3: jax.Array
    var_Rx3x3: jax.Array
    mix_Rx3: jax.Array
    t_R: jax.Array
    lam_R: jax.Array
    k_R: jax.Array
    impose_R: jax.Array


@functools.partial(jax.jit, static_argnames=("steps",))
def _block_pipeline(runs: _BlockRuns, lr, steps: _Steps):
    """Per-block scalar dynamics of every run; θ per block after each stage."""
    sig_Rx3x3, var_Rx3x3, mix_Rx3, t_R, lam_R, k_R, impose_R = runs

    def descend(a_Rx3, grad, n_steps, active):
        def step(a, i):
            return jnp.where(active(i), a * (1 - lr * grad(a * a)), a), None

        return jax.lax.scan(step, a_Rx3, jnp.arange(n_steps), unroll=8)[0]

    a = jnp.broadcast_to(jnp.exp(-t_R)[:, None], (t_R.shape[0], 3))
    thetas = [a * a]
    w_Rx3x3 = mix_Rx3[:, :, None] * var_Rx3x3  # stage-1 weight per task and block
    a = descend(
        a,
        lambda th: 2 * jnp.sum(w_Rx3x3 * (th[:, None] - sig_Rx3x3), 1),
        steps.pretrain,
        lambda i: True,
    )
    # C.6 imposed: the mixed model leaves stage 1 with its inconsistent block unlearned
    # (Thm C.10), at its initial value (exactly 0 would be a saddle GD never leaves).
    a = a.at[:, 1].set(jnp.where(impose_R, jnp.exp(-t_R), a[:, 1]))
    thetas.append(th0 := a * a)
    a = descend(
        a,
        lambda th: 2 * var_Rx3x3[:, 1] * (th - sig_Rx3x3[:, 1]) + 2 * lam_R[:, None] * (th - th0),
        steps.posttrain,
        lambda i: (i < k_R)[:, None],
    )
    thetas.append(a * a)
    a = descend(
        a,
        lambda th: 2 * var_Rx3x3[:, 2] * (th - sig_Rx3x3[:, 2]),
        steps.finetune,
        lambda i: True,
    )
    thetas.append(a * a)
    return jnp.stack(thetas, 1)  # R x stage x block


_MIXED, _UNMIXED = slice(0, None, 2), slice(1, None, 2)  # a batch's runs alternate


def phase_points(cfg: Config, points: Sequence[dict], c6: str = "dropped") -> dict[str, np.ndarray]:
    """Mixed and unmixed runs at each point (any of PHASE_KEYS set; the rest from `cfg`).

    Points may break the paper's assumptions: that is what the diagram maps. Returns, per
    point, the losses of both models, their gaps, the C.17 bound on Δ_unmixed and which of
    C.4 (0 < β < c_mis/2) and C.6 (αβ > (1-α)σ_pre + ασ_post) hold.
    """
    if c6 not in C6_MODES:
        raise ValueError(f"config key c6={c6!r}: allowed {C6_MODES}")
    for p in points:
        for key in sorted(set(p) - set(PHASE_KEYS)):
            raise ValueError(f"config key {key}={p[key]!r}: a point may set only {PHASE_KEYS}")
    full = [_phase_default(cfg) | p for p in points]
    runs = [(p, alpha) for p in full for alpha in (p["alpha"], 0.0)]  # mixed, unmixed
    sig, var = zip(*(_block_tasks(cfg, p) for p, _ in runs), strict=True)
    block_runs = _BlockRuns(
        jnp.asarray(np.stack(sig)),
        jnp.asarray(np.stack(var)),
        jnp.asarray([[1 - a, a, 0.0] for _, a in runs], jnp.float32),
        jnp.asarray([p["T"] for p, _ in runs], jnp.float32),
        jnp.asarray([p["lam"] for p, _ in runs], jnp.float32),
        jnp.asarray([p["K"] for p, _ in runs], jnp.int32),
        jnp.asarray([c6 == "imposed" and a > 0 for _, a in runs]),
    )
    steps = _Steps(cfg.steps_pretrain, max(int(p["K"]) for p in full), cfg.steps_finetune)
    th = np.asarray(_block_pipeline(block_runs, cfg.lr, steps=steps), np.float64)
    out = _phase_losses(cfg, th, np.stack(sig), np.stack(var))
    return out | _phase_bound(cfg, full, th[_UNMIXED], out["delta_unmixed"])


def _phase_losses(cfg: Config, th, sig, var) -> dict[str, np.ndarray]:
    """Both models' L_im, L_ret and Δ at each point, and the gaps mixed - unmixed, from θ
    (run x stage x block) and the runs' targets and variances (run x task x block)."""
    mult = np.asarray([cfg.n_invariant, cfg.n_inconsistent, cfg.n_specialized], np.float64)
    # loss[run, stage, task] = Σ_blocks size · variance · (θ - target)²
    loss = np.einsum("b,rtb,rstb->rst", mult, var, (th[:, :, None] - sig[:, None]) ** 2)
    l_im, l_ret = loss[:, 2, 1], loss[:, 3, 1]
    out = {
        "L_im_mixed": l_im[_MIXED],
        "L_im_unmixed": l_im[_UNMIXED],
        "L_ret_mixed": l_ret[_MIXED],
        "L_ret_unmixed": l_ret[_UNMIXED],
        "delta_mixed": (l_ret - l_im)[_MIXED],
        "delta_unmixed": (l_ret - l_im)[_UNMIXED],
    }
    out["d_delta"] = out["delta_mixed"] - out["delta_unmixed"]
    out["d_ret"] = out["L_ret_mixed"] - out["L_ret_unmixed"]
    return out


def _phase_bound(cfg: Config, full: list[dict], th_u, delta_unmixed) -> dict[str, np.ndarray]:
    """The C.17 bound on Δ_unmixed (ε measured on the unmixed runs' θ, `th_u`), whether
    it applies and holds, and whether C.4 and C.6 hold, at each point of `full`."""
    pre, _, ft = cfg.sigma_inconsistent
    post = np.asarray([p["sigma_post"] for p in full])
    beta = np.asarray([p["beta"] for p in full])
    alpha = np.asarray([p["alpha"] for p in full])
    c_mis = np.minimum(abs(post - pre), abs(post - ft))
    # ε: the unmixed model's distance from diag(σ_inv, σ_post, 0) after stage 2 and
    # diag(σ_inv, σ_ft, 0) after stage 3, as `lower_bound` measures it.
    ideal2 = np.stack([np.full_like(post, cfg.sigma_invariant), post, 0 * post], 1)
    ideal3 = np.stack([np.full_like(post, cfg.sigma_invariant), 0 * post + ft, 0 * post], 1)
    eps = np.maximum(abs(th_u[:, 2] - ideal2).max(1), abs(th_u[:, 3] - ideal3).max(1))
    bound = cfg.n_inconsistent * (c_mis**2 - 4 * beta * eps - 2 * c_mis * eps)
    return {
        "bound": bound,
        "bound_applies": bound > 0,
        "bound_holds": (bound > 0) & (delta_unmixed >= bound),
        "c4": (beta > 0) & (beta < c_mis / 2),
        "c6": alpha * beta > (1 - alpha) * pre + alpha * post,
    }


def phase_diagram(cfg: Config = Config()) -> dict[str, Any]:
    """Every panel of PANELS under both C.6 modes, in one compiled batch.

    Returns {"panels": {(c6, x, y): {"x": grid, "y": grid, field: y x x array}}, ...}
    with the default point's coordinates under "default".
    """
    cells = {(x, y): [{x: a, y: b} for b in GRIDS[y] for a in GRIDS[x]] for x, y in PANELS}
    flat = [p for ps in cells.values() for p in ps]
    panels = {}
    for c6 in C6_MODES:
        res = phase_points(cfg, flat, c6)
        at = 0
        for (x, y), ps in cells.items():
            shape = (len(GRIDS[y]), len(GRIDS[x]))
            panels[c6, x, y] = {"x": GRIDS[x], "y": GRIDS[y]} | {
                k: v[at : at + len(ps)].reshape(shape) for k, v in res.items()
            }
            at += len(ps)
    return {"panels": panels, "default": _phase_default(cfg)}


def phase_summary(diagram: dict[str, Any]) -> dict[str, Any]:
    """Per C.6 mode and panel: how many cells show each outcome (JSON-ready)."""
    out = {}
    for (c6, x, y), p in diagram["panels"].items():
        out[f"{c6}:{x}x{y}"] = {
            "cells": int(p["d_delta"].size),
            "delta_mixed_below_unmixed": int((p["d_delta"] < -1e-4).sum()),
            "L_ret_mixed_below_unmixed": int((p["d_ret"] < -1e-4).sum()),
            "bound_applies": int(p["bound_applies"].sum()),
            "bound_holds": int(p["bound_holds"].sum()),
            "c4": int(p["c4"].sum()),
            "c6": int(p["c6"].sum()),
            "c4_and_c6": int((p["c4"] & p["c6"]).sum()),
            "d_delta_range": [float(p["d_delta"].min()), float(p["d_delta"].max())],
            "d_ret_range": [float(p["d_ret"].min()), float(p["d_ret"].max())],
        }
    return out


_AXIS = {
    "T": "T (init exp(−T)·I)",
    "K": "K (stage-2 steps, both)",
    "lam": "λ (proximal weight)",
    "alpha": "α (D_post share of stage 1)",
    "beta": "β / c_mis",
    "sigma_post": "σ_post on the inconsistent block (σ_pre = σ_ft = 1)",
    "v_spec": "D_post input variance, specialized block",
}


def draw_phase(diagram: dict[str, Any]) -> Figure:
    """Rows: panels. Columns: Δ_mixed − Δ_unmixed and L_ret,mixed − L_ret,unmixed, with C.6
    dropped, then imposed. Blue: mixed lower (the paper's direction). Solid line: zero;
    dots: the C.17 bound applies and holds, x: applies and fails; dashed outline: C.4
    holds, dotted: C.6 holds (they never meet); star: the default."""
    from matplotlib.colors import TwoSlopeNorm

    fig = Figure(figsize=(20, 4.2 * len(PANELS)), layout="constrained")
    axes = fig.subplots(len(PANELS), 4, squeeze=False)
    for row, (x, y) in zip(axes, PANELS, strict=True):
        for ax, (c6, field) in zip(
            row, [(m, f) for m in C6_MODES for f in ("d_delta", "d_ret")], strict=True
        ):
            p = diagram["panels"][c6, x, y]
            z = p[field]
            lim = max(float(abs(z).max()), 1e-6)
            mesh = ax.pcolormesh(
                z, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim), shading="flat"
            )
            fig.colorbar(mesh, ax=ax, shrink=0.8)
            cx, cy = np.meshgrid(np.arange(len(p["x"])) + 0.5, np.arange(len(p["y"])) + 0.5)
            if z.min() < 0 < z.max():
                ax.contour(cx, cy, z, levels=[0.0], colors="k", linewidths=1)
            for mask, marker in (
                (p["bound_holds"], "."),
                (p["bound_applies"] & ~p["bound_holds"], "x"),
            ):
                ax.scatter(cx[mask], cy[mask], marker=marker, color="k", s=14)
            for key, ls in (("c4", "--"), ("c6", ":")):
                m = p[key].astype(float)
                if 0 < m.sum() < m.size:
                    ax.contour(cx, cy, m, levels=[0.5], colors="g", linestyles=ls, linewidths=2)
            d = diagram["default"]
            if d[x] in p["x"] and d[y] in p["y"]:
                at = (p["x"].index(d[x]) + 0.5, p["y"].index(d[y]) + 0.5)
                ax.plot(*at, "*", color="gold", markersize=16, markeredgecolor="k")
            ax.set_xticks(np.arange(len(p["x"])) + 0.5, [f"{v:g}" for v in p["x"]])
            ax.set_yticks(np.arange(len(p["y"])) + 0.5, [f"{v:g}" for v in p["y"]])
            ax.set_xlabel(_AXIS[x])
            ax.set_ylabel(_AXIS[y])
            what = "Δ_mixed − Δ_unmixed" if field == "d_delta" else "L_ret,mixed − L_ret,unmixed"
            ax.set_title(f"{what}, C.6 {c6}", fontsize=10)
    fig.suptitle(
        "Blue: mixed lower (the paper's direction); black line: zero; dots: the C.17 bound "
        "applies and holds, x: applies and fails; green dashed: C.4 holds, green dotted: C.6 "
        "holds (the paper's regime needs both: no cell has them); star: the default"
    )
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--out", default="", help="where to write the figure (.png/.pdf)")
    for key in ("alpha", "beta", "T", "lam"):
        parser.add_argument(f"--{key}", type=float, default=getattr(Config, key))
    parser.add_argument("--K", type=int, default=Config.K)
    parser.add_argument("--phase", action="store_true", help="the phase diagram instead")
    args = parser.parse_args(argv)
    cfg = Config(alpha=args.alpha, beta=args.beta, T=args.T, lam=args.lam, K=args.K)
    if args.phase:
        diagram = phase_diagram(cfg)
        print(json.dumps(phase_summary(diagram), indent=1))
        fig = draw_phase(diagram) if args.out else None
    else:
        rep = report(cfg)
        print(json.dumps(rep, indent=1) if args.json else summary(rep))
        fig = draw(rep) if args.out else None
    if fig is not None:
        fig.savefig(args.out, dpi=120)
        if not args.json:
            print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
