"""Deviceless TPU compiles: the graph's programs compiled for real Cloud TPU slices by
libtpu on this CPU (skipped when libtpu, the `tpu` extra, is absent)."""

import math

import jax
import pytest

from configs import default, paper_1b
from retention_jax import config, errors, experiment, model, sharding, topology, trainer

needs_libtpu = pytest.mark.skipif(
    not topology.libtpu_available(), reason="libtpu not installed (pip install -e '.[tpu]')"
)


@pytest.mark.parametrize(
    "name, kind, grid, chips, devices, hosts",
    [
        ("v4-8", "v4", (2, 2, 1), 4, 4, 1),
        ("v4-32", "v4", (2, 2, 4), 16, 16, 4),
        ("v5p-8", "v5p", (2, 2, 1), 4, 4, 1),
        ("v5p-16", "v5p", (2, 2, 2), 8, 8, 2),
        ("v5p-64", "v5p", (2, 4, 4), 32, 32, 8),
        ("v5p-128", "v5p", (4, 4, 4), 64, 64, 16),
        ("v5p-1024", "v5p", (8, 8, 8), 512, 512, 128),
        ("v5litepod-1", "v5e", (1, 1), 1, 1, 1),
        ("v5litepod-4", "v5e", (2, 2), 4, 4, 1),
        ("v5e-8", "v5e", (2, 4), 8, 8, 1),
        ("v5litepod-16", "v5e", (4, 4), 16, 16, 4),
        ("v5litepod-256", "v5e", (16, 16), 256, 256, 64),
        ("v6e-32", "v6e", (4, 8), 32, 32, 8),
        ("v3-8", "v3", (2, 2), 4, 8, 1),  # v2/v3: each TensorCore a device
        ("v2-32", "v2", (4, 4), 16, 32, 4),
    ],
)
def test_accelerator_names_map_to_slices(name, kind, grid, chips, devices, hosts):
    s = topology.parse(name)
    assert (s.chip.kind, s.grid, s.chips, s.n_devices, s.hosts) == (
        kind,
        grid,
        chips,
        devices,
        hosts,
    )
    assert s.topology_name == f"{kind}:{'x'.join(map(str, grid))}"


@pytest.mark.parametrize(
    "name", ["v5p-4", "v5p-12", "v5e-2", "v5e-3", "v5e-512", "v7-8", "tpu", "v4-8x"]
)
def test_unknown_slices_are_refused(name):
    with pytest.raises(errors.ConfigError, match=rf"--topology={name!r}: a Cloud TPU"):
        topology.parse(name)


# The tiny model's train step (16 rows of 128, splash attention) on v5p-8 (4 chips, data
# parallel), per chip as libtpu 0.0.42 lays it out: arguments, temporaries, outputs.
TINY_V5P8 = {"train": (10_249_216, 43_863_904, 10_244_288), "eval": (3_428_864, 10_976_384, 512)}


@needs_libtpu
def test_tiny_splash_step_compiles_for_v5p_with_golden_memory():
    c = default.get_config("smoke")  # 128-token rows: `auto` attention is splash on TPU
    s = topology.parse("v5p-8")
    programs, mesh = topology.compile_graph(c, s, log=lambda _: None)
    assert mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    train, ev = programs
    assert (train.name, train.nodes, ev.name, ev.nodes) == (
        "pretrain+posttrain+finetune train step",  # one program serves the three stages
        21,
        "eval step",
        21,
    )
    for p, key in ((train, "train"), (ev, "eval")):
        assert p.attention == "splash" and p.hlo.mosaic_calls >= 1  # lowered to Mosaic
        got = (p.argument_bytes, p.temp_bytes, p.output_bytes)
        assert got == pytest.approx(TINY_V5P8[key], rel=0.1)
    assert train.hlo.mosaic_calls == 3  # forward, and the backward's dq and dkv kernels
    assert set(train.hlo.collectives) == {"all-reduce"}  # data parallel: gradients only
    # The compiled matmuls are the model's 6N a token (no remat here), loops expanded.
    assert train.hlo.flops == pytest.approx(train.model_flops - train.kernel_flops, rel=0.01)
    assert topology.table(programs, s).count("splash (Mosaic") == 2


@needs_libtpu
def test_paper_1b_pretraining_step_fits_a_v5p_slice():
    """The 1B step as the config sets it (fsdp 8, microbatches of 8 rows, bf16, remat dots,
    the layers scanned) on 32 chips of v5p: 512 rows are 16 a chip, 2 microbatches."""
    c = paper_1b.get_config("musicpile-chempile")
    s = topology.parse("v5p-64")
    node = experiment.expand(c, s.n_devices)[0]
    opt = node.exp.pretrain.optimizer
    assert (node.exp.mesh, opt.microbatches) == ({"data": 4, "fsdp": 8, "tensor": 1}, 2)
    mesh = sharding.make_mesh(node.exp.mesh, topology.devices(s))
    fns = trainer.step_functions(node.exp.model, opt, mesh, node.exp.rules)
    exe, seconds = trainer.compile_train(fns, fns.batch_shapes(512, 1024))
    mem = exe.memory_analysis()
    hbm = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    assert hbm + mem.output_size_in_bytes - mem.alias_size_in_bytes < s.chip.hbm_bytes
    hlo = topology.analyse_hlo(exe.as_text())
    assert hlo.mosaic_calls >= 3  # splash forward and backward
    assert {"all-gather", "all-reduce"} <= set(hlo.collectives)  # fsdp gathers weights
    print(f"1B train step on {s.accelerator}: {hbm / 2**30:.1f} GiB a chip, {seconds:.0f} s")


@needs_libtpu
def test_oversized_microbatch_rows_are_refused_naming_the_key():
    """2,048 rows at once of a tiny model with a 65,536-token vocabulary (float32 logits:
    0.5 GiB a row) cannot fit a v5e chip; the compiler's refusal names the knob."""
    c = default.get_config("smoke")
    c.model.vocab_size = 65_536
    for stage in ("pretrain", "posttrain", "finetune"):
        c[stage].update(batch=2048, microbatch_rows=2048, allow_unreached_peak=True)
    with pytest.raises(
        errors.ConfigError,
        match=r"config key pretrain.microbatch_rows=2048: fewer rows a device at once: the "
        r"pretrain\+posttrain\+finetune train step on v5litepod-1: RESOURCE_EXHAUSTED",
    ):
        topology.check(c, "v5litepod-1", log=lambda _: None)


def test_model_choices_follow_the_mesh_platform():
    """A TPU mesh in context picks the TPU's attention and a rolled layer scan, whatever
    the process's default backend (here the CPU)."""
    m = config.parse_model(default.get_config().model)  # attention "auto"
    cpu = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    with jax.set_mesh(cpu):
        assert model_choices(m) == ("einsum_vjp", m.n_layers)
    if topology.libtpu_available():
        tpu = sharding.make_mesh(
            {"data": -1, "fsdp": 1, "tensor": 1}, topology.devices(topology.parse("v5p-8"))
        )
        with jax.set_mesh(tpu):
            assert model_choices(m) == ("splash", 1)


def model_choices(m: config.Model) -> tuple[str, int]:
    return model.attention_impl(m, 128), model.layer_unroll(m)


@pytest.mark.parametrize(
    "lhs, rhs, out, attrs, contracted",
    [  # batched matmuls as XLA:TPU writes them: (B, K) as dilated, or padded, windows
        (
            [8, 2, 2, 128, 32],
            [8, 2, 128, 32, 1],
            [8, 2, 2, 128, 128],
            "window={size=8x2x1 stride=7x1x1 lhs_dilate=8x2x1}, dim_labels=012bf_01oi2->012bf",
            32,
        ),
        ([512, 128, 1], [128, 4, 32], [512, 4, 32], "window={size=4 pad=3_3 rhs_reversal=1}, "
         "dim_labels=bf0_i0o->b0f", 128),
        ([1024, 384], [384, 128], [1024, 128], "dim_labels=bf_io->bf", 384),
    ],
)  # fmt: skip
def test_convolution_flops_skip_padding_and_dilation_holes(lhs, rhs, out, attrs, contracted):
    assert topology._conv_macs(lhs, rhs, out, attrs) == math.prod(out) * contracted
