r"""The paper's two-layer linear network (SCIENCE.md, "The theory"), simulated exactly.

  python -m retention_jax.analysis.theory --out=/tmp/theory.png

The network is W = W2 @ W1 (hidden width `width`), trained by full-batch gradient descent on
the population squared loss of each task, L_t(W) = 1/2 tr((W - S_t) C_t (W - S_t)^T): S_t
holds the task's singular values and C_t its input variances. Rotation-equivariance of GD
from isotropic random init lets us work in the shared singular basis (U = V = I), so the
learned singular value of feature i is W[i, i]. Features come in three blocks:

  invariant     the same (largest) singular value in every task
  inconsistent  shared by every task, but D_post disagrees with D_pre and D_ft
  specialized   value beta in D_post only; zero input variance under D_pre and D_ft

Stage 1 trains on (1 - alpha) D_pre + alpha D_post, stage 2 on D_post, stage 3 on D_ft.
Stage 2 stops once the D_post loss reaches `post_target` ("matched": the mixed model's
loss after its stage 1), so both models are compared at (nearly) the same immediate loss
L_im: the paper's point is that equal L_im can hide different retention. The mixed model
meets that target already, so post-training leaves its features as they are; the unmixed
one can reach it within the stage-2 budget only through the inconsistent block, because
its specialized features sit at a saddle (tiny init) that takes far longer to leave.
Fine-tuning on D_ft (zero input variance on the specialized block) then undoes that
distortion. The mixed model's small remaining Δ comes from its stage-1 compromise on the
inconsistent block, of order alpha.
"""

import argparse
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

TASKS = ("pre", "post", "ft")
BLOCKS = ("invariant", "inconsistent", "specialized")


@dataclasses.dataclass(frozen=True)
class Config:
    """Defaults: D_ft agrees with D_pre on the inconsistent block (an unrelated downstream task
    keeps the general features), and alpha = 0.03 is about the paper's 0.3B D_post tokens
    mixed into ~9B pretraining tokens at λ = 1.
    """

    n_invariant: int = 2
    n_inconsistent: int = 2
    n_specialized: int = 2
    sigma_invariant: float = 3.0
    sigma_inconsistent: tuple[float, float, float] = (1.0, 2.0, 1.0)  # pre, post, ft
    beta: float = 0.5  # specialized singular value in D_post
    post_var_inconsistent: float = 0.5  # D_post input variance on the inconsistent block
    alpha: float = 0.03  # mixed share of D_post in stage 1 (the mixed model)
    width: int = 0  # hidden units; 0 -> number of features
    init_scale: float = 1e-3  # std of the initial weights
    lr: tuple[float, float, float] = (0.1, 0.01, 0.1)  # stage 2 slow enough to hit the target
    steps: tuple[int, int, int] = (10_000, 2_000, 2_000)
    post_target: float | str = "matched"  # stage-2 stop loss; "matched" or a number
    seed: int = 0

    @property
    def n(self) -> int:
        return self.n_invariant + self.n_inconsistent + self.n_specialized


def _blocks(cfg: Config) -> dict[str, slice]:
    a, b = cfg.n_invariant, cfg.n_invariant + cfg.n_inconsistent
    return dict(invariant=slice(0, a), inconsistent=slice(a, b), specialized=slice(b, cfg.n))


def tasks(cfg: Config) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per task: (singular values, input variances), one entry per feature."""
    out = {}
    for t, sig_inc in zip(TASKS, cfg.sigma_inconsistent, strict=True):
        sig = [cfg.sigma_invariant] * cfg.n_invariant + [sig_inc] * cfg.n_inconsistent
        var_inc = cfg.post_var_inconsistent if t == "post" else 1.0
        var = [1.0] * cfg.n_invariant + [var_inc] * cfg.n_inconsistent
        spec = 1.0 if t == "post" else 0.0
        sig += [cfg.beta * spec] * cfg.n_specialized
        var += [spec] * cfg.n_specialized
        out[t] = (jnp.asarray(sig), jnp.asarray(var))
    return out


def loss(w: jax.Array, task: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Population squared loss of the end-to-end map `w` on one task."""
    sig, var = task
    return 0.5 * jnp.sum((w - jnp.diag(sig)) ** 2 * var[None, :])


@jax.jit(static_argnames="steps")
def _descend(params, mix, lr, target, steps: int, all_tasks):
    """`steps` GD steps on sum_t mix[t] * L_t; frozen once the D_post loss is <= target.

    Returns the final params and the losses on every task before each step (steps x 3).
    """

    def objective(p):
        w = p[1] @ p[0]
        return sum(m * loss(w, t) for m, t in zip(mix, all_tasks, strict=True))

    def step(p, _):
        w = p[1] @ p[0]
        losses = jnp.stack([loss(w, t) for t in all_tasks])
        g = jax.grad(objective)(p)
        active = losses[1] > target
        p = jax.tree.map(lambda x, d: jnp.where(active, x - lr * d, x), p, g)
        return p, losses

    return jax.lax.scan(step, params, None, length=steps)


@dataclasses.dataclass
class Run:
    """One model through the three stages."""

    alpha: float
    singular: dict[str, np.ndarray]  # "init", "pretrain", "posttrain", "finetune" -> W diag
    end: dict[str, np.ndarray]  # the same keys -> (L_pre, L_post, L_ft) at the stage's end
    post_steps: int  # stage-2 steps actually taken

    @property
    def L_im(self) -> float:
        return float(self.end["posttrain"][1])

    @property
    def L_ret(self) -> float:
        return float(self.end["finetune"][1])

    @property
    def L_pre(self) -> float:
        return float(self.end["finetune"][0])

    @property
    def pre_rise(self) -> float:
        """How much post-training raised the D_pre loss."""
        return float(self.end["posttrain"][0] - self.end["pretrain"][0])

    @property
    def delta(self) -> float:
        """Increase of the D_post loss caused by fine-tuning."""
        return self.L_ret - self.L_im


def simulate(cfg: Config, alpha: float, post_target: float = -1.0) -> Run:
    """Runs the three stages for mixing fraction `alpha` (0 = unmixed pretraining)."""
    all_tasks = tuple(tasks(cfg).values())
    k1, k2 = jax.random.split(jax.random.key(cfg.seed))
    h = cfg.width or cfg.n
    params = (
        cfg.init_scale * jax.random.normal(k1, (h, cfg.n)),
        cfg.init_scale * jax.random.normal(k2, (cfg.n, h)),
    )

    def record(name):
        w = params[1] @ params[0]
        singular[name] = np.asarray(jnp.diag(w))
        end[name] = np.asarray([loss(w, t) for t in all_tasks])

    singular, end = {}, {}
    record("init")
    mixes = ((1.0 - alpha, alpha, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    targets = (-1.0, post_target, -1.0)
    for name, mix, lr, target, steps in zip(
        ("pretrain", "posttrain", "finetune"), mixes, cfg.lr, targets, cfg.steps, strict=True
    ):
        params, losses = _descend(params, mix, lr, target, steps, all_tasks)
        record(name)
        if name == "posttrain":
            post_steps = int(np.sum(np.asarray(losses[:, 1]) > target))
    return Run(
        alpha=alpha,
        singular=singular,
        end=end,
        post_steps=post_steps,
    )


def block_means(cfg: Config, run: Run) -> dict[str, dict[str, float]]:
    """Mean learned singular value per block after each stage."""
    return {
        stage: {b: float(np.mean(sv[s])) for b, s in _blocks(cfg).items()}
        for stage, sv in run.singular.items()
    }


def compare(cfg: Config = Config()) -> dict[str, Run]:
    """Mixed (alpha = cfg.alpha) and unmixed (alpha = 0) runs, post-trained to one target."""
    target = cfg.post_target
    if target == "matched":
        probe = simulate(dataclasses.replace(cfg, steps=(cfg.steps[0], 0, 0)), cfg.alpha)
        target = float(probe.end["pretrain"][1])
    return {
        "mixed": simulate(cfg, cfg.alpha, float(target)),
        "unmixed": simulate(cfg, 0.0, float(target)),
    }


def claims(cfg: Config, runs: dict[str, Run]) -> dict[str, float]:
    """The numbers behind the three claims of section 5."""
    spec = _blocks(cfg)["specialized"]
    m, u = runs["mixed"], runs["unmixed"]
    return {
        "spec_after_pretrain_mixed": float(np.mean(m.singular["pretrain"][spec])),
        "spec_after_pretrain_unmixed": float(np.max(np.abs(u.singular["pretrain"][spec]))),
        "spec_init": float(np.max(np.abs(u.singular["init"][spec]))),
        "beta": cfg.beta,
        "pre_rise_mixed": m.pre_rise,
        "pre_rise_unmixed": u.pre_rise,
        "L_im_mixed": m.L_im,
        "L_im_unmixed": u.L_im,
        "delta_mixed": m.delta,
        "delta_unmixed": u.delta,
    }


def summary(c: dict[str, float]) -> str:
    return "\n".join(
        [
            "(1) only mixed pretraining learns the specialized features:",
            f"    after stage 1: mixed {c['spec_after_pretrain_mixed']:.4f} (beta "
            f"{c['beta']}), unmixed max |s| {c['spec_after_pretrain_unmixed']:.2e} "
            f"(init {c['spec_init']:.2e})",
            "(2) post-training to the same L_im distorts the unmixed model's inconsistent",
            f"    features: L_im mixed {c['L_im_mixed']:.4f}, unmixed {c['L_im_unmixed']:.4f};"
            f" D_pre loss rise mixed {c['pre_rise_mixed']:.4f}, "
            f"unmixed {c['pre_rise_unmixed']:.4f}",
            "(3) fine-tuning leaves the specialized features alone:",
            f"    delta = L_ret - L_im: mixed {c['delta_mixed']:.4f}, "
            f"unmixed {c['delta_unmixed']:.4f}",
        ]
    )


def draw(cfg: Config, runs: dict[str, Run]) -> Figure:
    """Left: learned singular values per block; right: D_pre and D_post losses; per stage."""
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_sv, ax_loss = fig.subplots(1, 2, width_ratios=(1.3, 1))
    stages = ("pretrain", "posttrain", "finetune")
    x = np.arange(len(stages))
    width = 0.8 / (len(BLOCKS) * len(runs))
    colors = dict(invariant="tab:gray", inconsistent="tab:orange", specialized="tab:green")
    for i, (name, run) in enumerate(runs.items()):
        means = block_means(cfg, run)
        for j, b in enumerate(BLOCKS):
            ax_sv.bar(
                x + (i * len(BLOCKS) + j + 0.5) * width - 0.4,
                [means[s][b] for s in stages],
                width,
                color=colors[b],
                alpha=1.0 if name == "mixed" else 0.45,
                hatch="" if name == "mixed" else "//",
                label=f"{name}: {b}",
            )
        style = "o-" if name == "mixed" else "s--"
        for k, (task, color) in enumerate((("D_pre", "tab:blue"), ("D_post", "tab:red"))):
            values = [run.end[s][k] for s in stages]
            ax_loss.plot(x, values, style, color=color, label=f"{name}: {task} loss")
    ax_sv.set_xticks(x, [f"after {s}" for s in stages])
    ax_sv.set_ylim(0, 1.35 * cfg.sigma_invariant)  # room for the legend
    ax_sv.set_ylabel("learned singular value (block mean)")
    ax_sv.set_title(f"features (solid: mixed, α = {cfg.alpha}; hatched: unmixed)")
    ax_sv.legend(fontsize=7, ncols=2)
    ax_loss.set_xticks(x, [f"after {s}" for s in stages])
    ax_loss.set_ylabel("population loss")
    ax_loss.set_title(
        f"Δ = L_ret - L_im: mixed {runs['mixed'].delta:.3f}, unmixed {runs['unmixed'].delta:.3f}"
    )
    ax_loss.legend(fontsize=7)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="where to write the figure (.png/.pdf)")
    parser.add_argument("--alpha", type=float, default=Config.alpha)
    parser.add_argument("--beta", type=float, default=Config.beta)
    args = parser.parse_args(argv)
    cfg = Config(alpha=args.alpha, beta=args.beta)
    runs = compare(cfg)
    print(summary(claims(cfg, runs)))
    if args.out:
        draw(cfg, runs).savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
