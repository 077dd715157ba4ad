r"""A finished node's result as a Hugging Face Llama directory.

  python -m retention_jax.export --workdir=/tmp/smoke --node=finetune-3f2a --out=/tmp/hf

Writes model.safetensors and config.json of the node's result step (the best step under
early stopping, else the last; LoRA adapters merged) and the tokenizer files of its data
config, so that `LlamaForCausalLM.from_pretrained(out)` and `AutoTokenizer` load it.
`--node` is a run id or a prefix of exactly one. The parameters are restored on one
device, replicated.
"""

import os
import sys

import jax
from absl import app, flags, logging
from etils import epath
from jax.sharding import AxisType

from retention_jax import checkpoint, config, errors, fileio, hf, stage
from retention_jax import model as model_lib


def find_node(workdir: str, node: str) -> str:
    """The run directory of the node whose id is `node` or starts with it (exactly one)."""
    runs = epath.Path(workdir) / "runs"
    if not runs.exists():
        raise errors.UserError(f"--workdir={workdir}: no run directories in it ({runs} missing)")
    ids = sorted(p.name for p in runs.iterdir())
    matches = [i for i in ids if i == node] or [i for i in ids if i.startswith(node)]
    if len(matches) != 1:
        shown = matches if matches else ids[:5] + (["..."] if len(ids) > 5 else [])
        raise errors.UserError(
            f"--node={node!r}: {'matches several nodes' if matches else 'matches no node'} "
            f"of the {len(ids)} in {runs}; ids: {shown}"
        )
    return os.path.join(workdir, "runs", matches[0])


def result_params(run_dir: str) -> tuple[config.Model, dict, object]:
    """(model config, identity, parameters of the result step) of a finished run."""
    record = fileio.read_json(os.path.join(run_dir, "config.json"))
    result = stage.read_result(run_dir)
    if record is None or result is None:
        raise errors.UserError(
            f"{run_dir}: not a finished node (config.json and result.json needed)"
        )
    identity = record["identity"]
    model_cfg = config.parse_model(identity["model"])
    mesh = jax.make_mesh((1,), ("replica",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    rules = tuple((axis, None) for axis in model_lib.axis_sizes(model_cfg))
    _, target = model_lib.abstract_state(model_cfg, mesh, rules)
    params = checkpoint.restore_params(os.path.join(run_dir, "ckpt"), result["result_step"], target)
    return model_cfg, identity, params


def export_node(workdir: str, node: str, out_dir: str) -> str:
    """Writes the node's result step to `out_dir` (weights, config, tokenizer); returns it."""
    run_dir = find_node(workdir, node)
    model_cfg, identity, params = result_params(run_dir)
    hf.export(params, model_cfg, out_dir)
    hf.save_tokenizer(identity["data"]["tokenizer"], out_dir)
    return out_dir


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every store it opens at INFO
    f = flags.FLAGS
    try:
        out = export_node(f.workdir, f.node, f.out)
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(errors.EXIT_USER)
    print(f"wrote {sorted(os.listdir(out))} to {out}")


if __name__ == "__main__":  # flags only for the command: importing this module defines none
    flags.DEFINE_string("workdir", None, "The experiment's work directory.")
    flags.DEFINE_string("node", None, "A run id, or a prefix of exactly one.")
    flags.DEFINE_string("out", None, "Output directory for the Hugging Face files.")
    flags.mark_flags_as_required(["workdir", "node", "out"])
    app.run(main)
