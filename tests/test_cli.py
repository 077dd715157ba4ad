"""main.py as a user meets it: one-line errors with a distinct status, overrides that are
honoured or refused, --help without loading JAX, Ctrl-C that says what was kept."""

import os
import signal
import subprocess
import sys
import time

import pytest

from configs import default
from retention_jax import config, errors, experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "main.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow  # a process each (5 s: JAX starts)
@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.foo=1"], "error: --config.foo=1: AttributeError"),
        (["--config.finetune.lr=abc"], "error: flag --config.finetune.lr=abc: could not convert"),
        (["--config=configs/nope.py"], "error: --config=configs/nope.py: OSError"),
        (["--config=configs/default.py:big"], "variant 'big' unknown; allowed: '' | 'replica"),
        (["--config=configs/corpora.py"], "configs/corpora.py names the corpora"),
        (["--config.finetune.lr=-1.0"], "error: config key finetune.lr=-1.0: a number in (0, 1]"),
        (["--config.seed=4294967296"], "error: config key seed=4294967296: an integer in [0"),
        (["--config.pretrain.exposure.lam=1.5"], "config key pretrain.exposure.lam=1.5: a num"),
        (["--config.finetune.tokens=100"], "config key finetune.tokens=100: at least data.seq_len"),
        (["--config.posttrain.lr=0.01"], "config key posttrain.lr=0.01: not a key of the linked"),
        (["--only=garbage"], "error: --only=garbage: matches no node; allowed: comma-separated"),
        (["--devices=-2"], "error: --devices=-2: a positive number of devices"),
        (["--bogus"], "error: Unknown command line flag 'bogus'"),
    ],
)
def test_user_errors_are_one_line_with_their_own_status(args, message, tmp_path):
    workdir = str(tmp_path / "w")
    done = _main(*args, f"--workdir={workdir}", "--dry_run")
    assert done.returncode == errors.EXIT_USER, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not os.path.exists(workdir)  # refused before anything was written


def test_verbose_shows_the_traceback():
    done = _main("--config.finetune.lr=-1.0", "--dry_run", "--verbose")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "finetune.lr=-1.0" in done.stderr


def test_help_answers_without_loading_jax():
    done = _main("--help", timeout=30)
    assert done.returncode == 0
    assert "--[no]dry_run" in done.stdout and "--[no]verbose" in done.stdout
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['main.py', '--help']\n"
        "try:\n"
        "    runpy.run_path('main.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print(e.code, 'jax' in sys.modules, 'matplotlib' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.splitlines()[-1] == "0 False False"


def test_an_override_of_a_swept_key_replaces_its_axis():
    c = default.get_config()
    pinned, notes = config.pin(c, {"finetune.lr": 0.5, "data.seq_len": 64})
    assert pinned.sweep.finetune == (("finetune.lr", (0.5,)),)
    assert notes == [
        "--config.finetune.lr=0.5 replaces sweep.finetune's values "
        "(0.0001, 0.001, 0.003, 0.01) for finetune.lr"
    ]
    assert pinned.sweep.pretrain == c.sweep.pretrain
    done = _main("--config.finetune.lr=0.005", "--dry_run")
    assert done.returncode == 0, done.stderr
    assert notes[0].replace("0.5", "0.005") in done.stdout
    leaves = [line for line in done.stdout.splitlines() if line.startswith("finetune-")]
    assert len(leaves) == 27 and all('{"finetune.lr": 0.005}' in line for line in leaves)


@pytest.mark.slow
def test_ctrl_c_says_what_was_kept(tmp_path):
    workdir = str(tmp_path / "w")
    # A shell's background job ignores SIGINT and its children inherit that; a user's
    # Ctrl-C reaches a foreground process with the default action, so the child resets it
    # before it execs main.py (a preexec_fn would fork this multithreaded process).
    argv = [sys.executable, "main.py", "--config=configs/default.py:smoke", f"--workdir={workdir}"]
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    reset += "os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", reset, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # interrupt during the first training steps
        if " step " in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted: finished nodes, committed data shards and every node's last" in err
    assert "Traceback" not in err


def test_dry_run_opens_every_source_and_tokenizer(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = default.get_config("smoke")
    c.data.post.source = f"files:{tmp_path}/none/*.txt"
    with pytest.raises(errors.UserError, match=r"data.post.source='files:.*': no files match"):
        experiment.dry_run(c)
    c = default.get_config("smoke")
    c.data.tokenizer = f"hf:{tmp_path}/missing-tokenizer"
    with pytest.raises(errors.UserError, match=r"data.tokenizer='hf:/.*missing-tokenizer'"):
        experiment.dry_run(c)
    c = default.get_config("smoke")
    c.data.ft.source = "hf:someone/some-corpus"  # a hub id: left to the prepare step
    experiment.dry_run(c)
    out = capsys.readouterr().out
    assert "data.ft.source='hf:someone/some-corpus': not checked, the hub is out of reach" in out
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_bad_document_fails_its_nodes_without_a_traceback(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f'{{"text": "document {i}: {"la " * 40}"}}' for i in range(401)]
    lines[200] = '{"text": "a\x01 control character"}'
    (corpus / "music.jsonl").write_text("\n".join(lines) + "\n")
    workdir = tmp_path / "w"
    done = _main(
        "--config=configs/default.py:smoke",
        f"--config.data.post.source=files:{corpus}/*.jsonl",
        f"--workdir={workdir}",
    )
    assert done.returncode == 1
    assert "FAILED: DataError: data.post.source=" in done.stdout
    assert "music.jsonl, the line at byte" in done.stdout
    assert "21 node(s) did not finish" in done.stderr  # 3 failed, their 18 descendants skipped
    assert "Traceback" not in done.stdout + done.stderr
    assert len(list((workdir / "runs").glob("*/failed.json"))) == 3
