"""Every command the docs show dry-runs, in-process: each `python main.py` line of README.md
and docs/science.md with its flags, and every config with its argument
(`configs/FILE.py:ARG`) they name, as the science.md table and launcher lines do."""

import ast
import importlib
import pathlib
import re
import shlex

import pytest

from retention_jax import config, experiment

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ("README.md", "docs/science.md")
SPEC = re.compile(r"configs/([\w.]+)\.py(?::([\w,.\-]+))?")
RUNNABLE = re.compile(r"configs/[\w.]+\.py:[\w,.\-]+")  # a bare path in prose names a file
COMMAND = re.compile(r"^(?:.* && )?python main\.py(?P<flags>( .*)?)$")  # a shell line
DEFAULT_SPEC = "configs/default.py"


def _main_flags(flags: str) -> tuple[str, tuple, str]:
    """(config spec, --config.KEY=VALUE overrides, --only) of one `python main.py` line."""
    spec, overrides, only = DEFAULT_SPEC, [], ""
    for token in shlex.split(flags.split("#")[0]):
        flag, _, value = token.partition("=")
        if flag == "--config":
            spec = value
        elif flag.startswith("--config."):
            overrides.append((flag.removeprefix("--config."), value))
        elif flag == "--only":
            only = value
    return spec, tuple(overrides), only


def commands() -> list[tuple[str, tuple, str]]:
    found = set()
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        lines = [COMMAND.match(ln) for ln in text.splitlines()]
        found |= {_main_flags(m["flags"]) for m in lines if m}
        found |= {(m.group(0), (), "") for m in RUNNABLE.finditer(text)}
    return sorted(found)


def _load(spec: str):
    name, arg = SPEC.fullmatch(spec).groups()
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(arg) if arg else module.get_config()


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def test_the_docs_name_the_fig_10_to_12_arms():
    specs = {spec for spec, _, _ in COMMANDS}
    for arm in ("", ",replay", ",dropout"):  # C4 -> MusicPile -> FLAN, Table 10's dropout
        assert f"configs/1b_early_exposure.py:musicpile-flan{arm}" in specs
    assert len(specs) >= 15


def _id(spec: str, overrides: tuple, only: str) -> str:
    flags = [f"--config.{k}={v}" for k, v in overrides] + ([f"--only={only}"] if only else [])
    return " ".join([spec.removeprefix("configs/"), *flags])


COMMANDS = commands()


@pytest.mark.parametrize("spec, overrides, only", COMMANDS, ids=[_id(*c) for c in COMMANDS])
def test_documented_command_dry_runs(spec, overrides, only, capsys):
    c = _load(spec)
    for key, value in overrides:
        config.assign(c, key, _literal(value))
    experiment.dry_run(c, only=only)
    assert "pretrain" in capsys.readouterr().out
