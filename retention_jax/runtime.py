"""What one process holds while it runs an experiment graph, passed down explicitly.

The mesh and rule table, the step functions and their compiled executables (so the
whole graph compiles its train step once per shape), compile counts, the measured peak
FLOP/s, device-resident validation batches and the tables printed once already. Nothing
mutable lives at module level: a test builds its own runtime and asserts on it,
independent of test order.
"""

import dataclasses
from collections import Counter
from collections.abc import Callable

import jax

from retention_jax import config, data, perf, sharding, trainer


@dataclasses.dataclass
class Runtime:
    mesh: jax.sharding.Mesh
    rules: tuple
    compiles: Counter = dataclasses.field(default_factory=Counter)
    _steps: dict = dataclasses.field(default_factory=dict)
    _executables: dict = dataclasses.field(default_factory=dict)
    _peaks: dict = dataclasses.field(default_factory=dict)
    _eval_batches: dict = dataclasses.field(default_factory=dict)
    _seen: set = dataclasses.field(default_factory=set)

    @classmethod
    def create(cls, mesh_sizes: dict, rules: tuple) -> "Runtime":
        return cls(sharding.make_mesh(mesh_sizes), rules)

    def step_functions(
        self, model: config.Model, optimizer: config.Optimizer
    ) -> trainer.StepFunctions:
        key = (model, tuple(sorted(optimizer.static().items())))
        if key not in self._steps:
            self._steps[key] = trainer.step_functions(model, optimizer, self.mesh, self.rules)
        return self._steps[key]

    def train_executable(
        self, fns: trainer.StepFunctions, batch: int, seq_len: int
    ) -> tuple[Callable, float]:
        """The AOT-compiled train step for this shape and the seconds compiling took (0 when
        an earlier stage with the same shape compiled it)."""
        key = (id(fns), batch, seq_len)
        if key in self._executables:
            return self._executables[key], 0.0
        exe, seconds = trainer.compile_train(fns, fns.batch_shapes(batch, seq_len))
        self._executables[key] = exe
        self.compiles["train"] += 1
        return exe, seconds

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s per device for MFU: a datasheet value, or measured once per dtype."""
        if dtype not in self._peaks:
            self._peaks[dtype] = perf.peak_flops(dtype=dtype)[0]
        return self._peaks[dtype]

    def eval_batches(self, corpus, domain: str, batch: int, fns: trainer.StepFunctions) -> list:
        """A domain's validation batches on the mesh; each process supplies its own rows."""
        key = (corpus.fingerprint, domain, batch)
        if key not in self._eval_batches:
            n, p = jax.process_count(), jax.process_index()
            rows = slice(p * batch // n, (p + 1) * batch // n)
            self._eval_batches[key] = [
                data.to_global(
                    {k: v[rows] for k, v in b.items()}, self.mesh, fns.batch_sharding.spec
                )
                for b in data.validation_batches(corpus, domain, batch)
            ]
        return self._eval_batches[key]

    def first_sight(self, text: str) -> bool:
        """Whether `text` (a parameter table) is new to this process."""
        new = text not in self._seen
        self._seen.add(text)
        return new
