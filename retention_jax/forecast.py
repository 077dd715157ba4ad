"""Probes of θ_post that forecast how much of D_post survives stage 3, before any of it.

They run on the post-training node's mesh (parameters in their train-step shardings) on
`forecast.rows` rows of the first validation batch of D_post and of D_ft that the
runtime already holds. The math is written against loss closures of a parameter tree,
so the tests check it on a quadratic, where every probe has a closed form; on the model,
five compiled programs (a loss and gradient, a Hessian-vector step, an alignment, the
stage-3 AdamW update and its init) are called a fixed number of times.

- interference: -⟨∇L_post, ∇L_ft⟩ and minus its cosine. An SGD step -η∇L_ft changes
  L_post by -η⟨∇L_post, ∇L_ft⟩ to first order.
- curvature: g_ftᵀ H_post g_ft by a Hessian-vector product, the second-order term of
  that same step.
- sharpness and trace: the top eigenvalue of H_post (power iteration) and its trace
  (Hutchinson): how fast L_post rises for a displacement of a given size.
- lookahead: L_post after the first k steps of stage 3 at each stage-3 LR (the stage-3
  AdamW and schedule, on the D_ft rows), extrapolated to the full budget.

Every probe is oriented so that a larger value forecasts a larger L_ret
(docs/forecast.md).
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from retention_jax import config, cost, data, trainer
from retention_jax import model as model_lib
from retention_jax import runtime as runtime_lib
from retention_jax import steps as steps_lib

PROBES = ("interference", "cosine", "curvature", "sharpness", "trace", "lookahead")


def _dot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def hvp(loss: Callable, params, v):
    """H(params) · v of `loss`: the VJP of the gradient (H is symmetric, so vᵀH = (Hv)ᵀ).
    Reverse-over-reverse, because the model's custom-VJP kernels (SwiGLU, attention,
    cross-entropy) have no forward-mode rule: a jvp of the gradient cannot trace them."""
    return jax.vjp(jax.grad(loss), params)[1](v)[0]


def hvp_step(loss: Callable, params, v) -> tuple:
    """(Hv / ‖Hv‖, vᵀHv): one power-iteration step and one Rayleigh numerator."""
    h = hvp(loss, params, v)
    norm = jnp.sqrt(_dot(h, h))
    return jax.tree.map(lambda x: x / norm, h), _dot(v, h)


def alignment(g_post, g_ft) -> tuple[jax.Array, jax.Array]:
    """(-⟨g_post, g_ft⟩, -cos(g_post, g_ft)): minus the first-order fall of L_post per
    unit-LR SGD step on L_ft."""
    dot = _dot(g_post, g_ft)
    return -dot, -dot / jnp.sqrt(_dot(g_post, g_post) * _dot(g_ft, g_ft))


def power_iteration(step: Callable, v, iters: int) -> float:
    """The top eigenvalue of H: `iters` calls of `step` (`hvp_step` of H) from `v`; the
    last call's vᵀHv over vᵀv of its unit input."""
    v = jax.tree.map(lambda x: x / jnp.sqrt(_dot(v, v)), v)
    for _ in range(iters):
        v, rayleigh = step(v)
    return float(rayleigh)


def hutchinson(step: Callable, zs: list) -> float:
    """tr H by Hutchinson: the mean zᵀHz over Rademacher `zs` (exact for a diagonal H)."""
    return float(sum(float(step(z)[1]) for z in zs) / len(zs))


def adamw_update(static: dict, params, opt, grads, step: jax.Array, hp: dict) -> tuple:
    """One stage-3 update exactly as `steps.train_step` applies it (clipping, Adam
    moments, the decoupled decay, the warmup-cosine LR of `hp`): (params, opt)."""
    adam, opt = steps_lib.make_tx(static).update(grads, opt, params)
    lr = steps_lib.learning_rate(step, hp)
    exclude = tuple(static["decay_exclude"])
    updates = jax.tree_util.tree_map_with_path(
        functools.partial(_decoupled, lr, hp["weight_decay"], exclude), adam, params
    )
    return optax.apply_updates(params, updates), opt


def _decoupled(lr, wd, exclude, path, u, p):
    return -lr * (u + wd * p if steps_lib.decays(path, exclude) else u)


def lookahead(grad_ft: Callable, loss_post: Callable, update: Callable, params, opt, k: int):
    """L_post after each of the first `k` stage-3 steps: `update(params, opt, g, step)`
    with g = `grad_ft(params)`, full-batch on the held-out D_ft rows."""
    curve = []
    for step in range(k):
        params, opt = update(params, opt, grad_ft(params), step)
        curve.append(float(loss_post(params)))
    return curve


def cumulative_lr(schedule: dict, steps: int) -> float:
    """Σ of the stage-3 LR (`steps_lib.learning_rate`) over its first `steps` steps."""
    hp = steps_lib.hparams(schedule)
    return float(sum(steps_lib.learning_rate(jnp.asarray(s), hp) for s in range(steps)))


def extrapolate(l_0: float, l_k: float, schedule: dict, k: int, num_steps: int) -> float:
    """L_post at the end of stage 3 from its value after k steps: the rise grows in
    proportion to the cumulative LR, ΔL(N) = ΔL(k) · ΣLR(N) / ΣLR(k). An Adam step moves
    each coordinate by about its LR, so the displacement, and to first order the rise,
    scale with the summed LR; the warmup and cosine enter exactly."""
    ratio = cumulative_lr(schedule, num_steps) / max(cumulative_lr(schedule, k), 1e-30)
    return l_0 + (l_k - l_0) * ratio


def lookahead_steps(fraction: float, num_steps: int) -> int:
    """k: `fraction` of the stage-3 budget, at least one step."""
    return max(1, min(num_steps, config.round_half_up(fraction * num_steps)))


# ------------------------------------------------------------------ the model's probes


class _Meter:
    """Compiled programs of one runtime and the FLOPs and seconds of each probe's calls
    (and the seconds compiling in this call of `probe`).

    A program is compiled once per runtime (its FLOPs: XLA's cost analysis of the
    loop-free program on one device, times the devices); every call adds them to the
    probe that made it."""

    def __init__(self, rt: runtime_lib.Runtime):
        self.rt, self.cost, self.compile_s = rt, {}, 0.0

    def program(self, name: str, key: tuple, fn: Callable, args: tuple) -> tuple:
        full = ("forecast", name, key)
        if full not in self.rt._executables:
            start = time.perf_counter()
            with jax.set_mesh(self.rt.mesh):
                exe = jax.jit(fn).lower(*_abstract(args)).compile()
            cost = exe.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            flops = float(cost.get("flops", 0.0)) * self.rt.mesh.size  # per device -> all
            self.rt._executables[full] = (exe, flops)
            self.rt.compiles["forecast"] += 1
            self.compile_s += time.perf_counter() - start
        return full

    def call(self, probe: str, full: tuple, *args):
        exe, flops = self.rt._executables[full]
        start = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        c = self.cost.setdefault(probe, {"flops": 0.0, "seconds": 0.0, "calls": 0})
        c["flops"] += flops
        c["seconds"] += time.perf_counter() - start
        c["calls"] += 1
        return out


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _host_vectors(like, seed: int, count: int, rademacher: bool) -> list:
    """`count` seeded random trees shaped like `like`, drawn on the host (the same values
    on any mesh) and put into its shardings."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(like)
    out = []
    for _ in range(count):
        draws = [
            rng.choice(np.array([-1.0, 1.0], np.float32), x.shape)
            if rademacher
            else rng.standard_normal(x.shape, np.float32)
            for x in leaves
        ]
        tree = treedef.unflatten(draws)
        out.append(trainer.put_host(tree, jax.tree.map(lambda x: x.sharding, like)))
    return out


def probe(
    rt: runtime_lib.Runtime,
    fns: trainer.StepFunctions,
    exp: config.Experiment,
    params: nnx.State,
    post_batch: dict,
    ft_batch: dict,
) -> dict:
    """Every probe of θ_post = `params` (post-training's model without dropout, on
    `forecast.rows` rows of each batch): its value, FLOPs (compiled cost analysis, times
    its calls) and seconds. Five programs serve all probes: a loss and gradient, a
    Hessian-vector step, an alignment, an AdamW update and its init. `stage3_flops` is
    the training FLOPs of the stage-3 sweep the probes stand in for.

    Derivatives are with respect to the base weights (LoRA adapters held fixed: the same
    function, and the gradient of the merged weights)."""
    base, rest = nnx.split_state(params, model_lib.BASE_PARAMS, ...)
    m = _Meter(rt)
    run = _programs(m, fns, exp, base, rest, post_batch)
    s = _Session(m, run, base, rest, post_batch, ft_batch)
    out = _gradient_probes(s)
    out |= _hessian_probes(s, exp.forecast)
    ft_plan = data.plan("finetune", exp)  # the stage 3 the probes stand in for
    out["lookahead"] = _lookahead_probe(s, exp, ft_plan, out["L_post"]["value"])
    for name, c in m.cost.items():
        out[name].update(c)
    out["cosine"].update(m.cost["interference"])  # the same calls
    out["compile_s"] = m.compile_s  # 0 once this process compiled the programs
    out["settings"] = {**dataclasses.asdict(exp.forecast), "lrs": list(exp.forecast.lrs)}
    out["stage3_flops"] = stage3_cost(exp, ft_plan)
    return out


class _Programs(NamedTuple):
    """The runtime's keys of the five compiled programs (`_Meter.program`)."""

    grad: tuple  # (base, rest, batch) -> (L, ∇L)
    hess: tuple  # (base, rest, batch, v) -> (Hv / ‖Hv‖, vᵀHv)
    align: tuple  # (g_post, g_ft) -> (-⟨g_post, g_ft⟩, -cos)
    init: tuple  # base -> a fresh stage-3 optimizer state
    update: tuple  # (base, opt, g, step, hp) -> (base, opt): one stage-3 step


def _programs(m: _Meter, fns: trainer.StepFunctions, exp, base, rest, batch) -> _Programs:
    """The five programs, compiled once per runtime for arguments shaped like these; the
    loss reads every `stride`-th row of a batch (`forecast.rows` rows)."""
    stride = exp.eval_batch // exp.forecast.rows
    static = exp.finetune.optimizer.static()

    def loss(p, r, batch):
        rows = jax.tree.map(lambda a: a[::stride], batch)
        sums = steps_lib.eval_step(fns.graphdef, nnx.merge_state(p, r), rows)
        return sums[0] / jnp.maximum(sums[1], 1.0)

    key = (fns.graphdef, stride, tuple(sorted(static.items())))
    grad = m.program("grad", key, jax.value_and_grad(loss), (base, rest, batch))
    hess = m.program(
        "hvp",
        key,
        lambda p, r, b, v: hvp_step(lambda q: loss(q, r, b), p, v),
        (base, rest, batch, base),
    )
    align = m.program("alignment", key, alignment, (base, base))
    init = m.program("init", key, steps_lib.make_tx(static).init, (base,))
    hp = _replicated(m.rt, steps_lib.hparams(exp.finetune.optimizer.schedule(1, 1)))
    zero = _replicated(m.rt, np.zeros((), np.int32))
    update = m.program(
        "update",
        key,
        functools.partial(adamw_update, static),
        (base, m.call("lookahead", init, base), base, zero, hp),
    )
    return _Programs(grad, hess, align, init, update)


@dataclasses.dataclass(frozen=True)
class _Session:
    """What every probe's calls share: the meter, its programs, θ_post split into the base
    weights (differentiated) and the rest (LoRA adapters, held fixed), and the batches."""

    m: _Meter
    run: _Programs
    base: nnx.State
    rest: nnx.State
    post: dict
    ft: dict


def _gradient_probes(s: _Session) -> dict:
    """L_post; interference and cosine from both gradients; curvature g_ftᵀ H_post g_ft."""
    l_post, g_post = s.m.call("interference", s.run.grad, s.base, s.rest, s.post)
    _, g_ft = s.m.call("interference", s.run.grad, s.base, s.rest, s.ft)
    inter, cos = s.m.call("interference", s.run.align, g_post, g_ft)
    _, curv = s.m.call("curvature", s.run.hess, s.base, s.rest, s.post, g_ft)
    return {
        "L_post": {"value": float(l_post)},
        "interference": {"value": float(inter)},
        "cosine": {"value": float(cos)},
        "curvature": {"value": float(curv)},
    }


def _hessian_probes(s: _Session, f: config.Forecast) -> dict:
    """Sharpness (power iteration) and trace (Hutchinson) of H_post from seeded vectors."""

    def hvp_on_post(probe: str) -> Callable:
        return lambda v: s.m.call(probe, s.run.hess, s.base, s.rest, s.post, v)

    (v0,) = _host_vectors(s.base, f.seed, 1, rademacher=False)
    sharpness = power_iteration(hvp_on_post("sharpness"), v0, f.power_iters)
    zs = _host_vectors(s.base, f.seed + 1, f.hutchinson, rademacher=True)
    return {
        "sharpness": {"value": sharpness},
        "trace": {"value": hutchinson(hvp_on_post("trace"), zs)},
    }


def _lookahead_probe(s: _Session, exp: config.Experiment, plan, l_post: float) -> dict:
    """L_post along the first k stage-3 steps (of `plan`) at each stage-3 LR, and its
    extrapolation to the stage-3 budget."""
    k = lookahead_steps(exp.forecast.lookahead, plan.num_steps)
    curves, value = {}, {}
    for lr in exp.forecast.lrs:
        schedule = dataclasses.replace(exp.finetune.optimizer, lr=lr).schedule(
            plan.num_steps, plan.batch * plan.seq_len
        )
        curves[str(lr)] = curve = lookahead(
            lambda p: s.m.call("lookahead", s.run.grad, p, s.rest, s.ft)[1],
            lambda p: s.m.call("lookahead", s.run.grad, p, s.rest, s.post)[0],
            _update_at(s, schedule),
            s.base,
            s.m.call("lookahead", s.run.init, s.base),
            k,
        )
        value[str(lr)] = extrapolate(l_post, curve[-1], schedule, k, plan.num_steps)
    return {"value": value, "curve": curves, "steps": k, "budget_steps": plan.num_steps}


def _update_at(s: _Session, schedule: dict) -> Callable:
    """`update(params, opt, g, step)` of `lookahead`: the compiled stage-3 step under
    `schedule`."""
    hp = _replicated(s.m.rt, steps_lib.hparams(schedule))

    def update(p, o, g, step: int):
        return s.m.call("lookahead", s.run.update, p, o, g, _replicated(s.m.rt, np.int32(step)), hp)

    return update


def _replicated(rt: runtime_lib.Runtime, tree):
    """Host values replicated on the mesh."""
    replicated = jax.sharding.NamedSharding(rt.mesh, jax.sharding.PartitionSpec())
    return trainer.put_host(tree, jax.tree.map(lambda _: replicated, tree))


def at_theta_post(rt, fns, exp, params, corpus) -> dict:
    """`probe` on the first validation batch of D_post and of D_ft."""
    post = rt.eval_batches(corpus, "post", exp.eval_batch, fns)[0]
    ft = rt.eval_batches(corpus, "ft", exp.eval_batch, fns)[0]
    return probe(rt, fns, exp, params, post, ft)


def stage3_cost(exp: config.Experiment, plan) -> float:
    """Training FLOPs of the stage-3 sweep below one post-training node (one leaf per
    stage-3 LR, each run by `plan`): 6N per token (`cost.flops_per_token`) times its
    tokens."""
    per_token = cost.flops_per_token(exp.model_for("finetune"), plan.seq_len)
    return per_token * sum(plan.tokens.values()) * len(exp.forecast.lrs)


def ranking(posts: dict[str, dict | None]) -> str:
    """The post-training variants (node id -> result.json) ranked per stage-3 LR by the
    lookahead's forecast L_ret, lowest first; those in the better half at some LR are the
    ones to send to stage 3."""
    have = {i: r["forecast"] for i, r in posts.items() if r and r.get("forecast")}
    if not have:
        return "forecast: no post-training node holds probes"
    lrs = sorted({lr for f in have.values() for lr in f["lookahead"]["value"]}, key=float)
    keep = set()
    lines = []
    for lr in lrs:
        order = sorted(have, key=lambda i: have[i]["lookahead"]["value"].get(lr, math.inf))
        keep.update(order[: -(-len(order) // 2)])
        lines.append(f"forecast L_ret at stage-3 LR {float(lr):g}, best first:")
        lines += [f"  {i}  {have[i]['lookahead']['value'][lr]:.4f}" for i in order]
    lines.append(f"send to stage 3 ({len(keep)} of {len(have)}): {', '.join(sorted(keep))}")
    return "\n".join(lines)
