"""Every command, given bad input, prints ONE line on stderr naming the culprit and exits 2; no model is built for it.

The commands run in this process through `sd3.cli.main` (what `python -m sd3` calls), so a traceback would
surface as an exception here; one case runs the real entry point as a subprocess to check the process exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from sd3.cli import main
from sd3.config_loader import load_config
from sd3.model.attention import flash_available


class RunsCode:
    """Pickles to a call of os.system: what torch.load(weights_only=True) must refuse to run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def bad_checkpoint(tmp_path):
    """A complete-looking checkpoint directory whose files are broken in the ways a user meets."""

    def make(name: str, state: object = None, weights: bytes | None = None):
        path = tmp_path / name
        path.mkdir()
        cfg = load_config("tiny-cpu")
        (path / "config.json").write_text(cfg.to_json())
        (path / "meta.json").write_text(json.dumps({"step": 4}))
        for file in ("model.safetensors", "ema.safetensors"):
            if weights is None:
                save_file({"w": torch.zeros(2)}, str(path / file))
            else:
                (path / file).write_bytes(weights)
        torch.save(state if state is not None else {"step": 4}, path / "state.pt")  # as the source saved it
        return path

    return make


def cases(tmp_path, bad_checkpoint) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, a word the one error line must contain)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = bad_checkpoint("corrupt", weights=b"\xff" * 64)  # "header too large"
    pickled = bad_checkpoint("pickled", state={"step": RunsCode(str(tmp_path / "pwned"))})
    no_such = str(tmp_path / "no-such")
    train = ["train", "--config", "tiny-cpu", "--topology.mode=colocated", f"--train.save_dir={tmp_path / 'run'}"]
    return {
        "unknown command": (["nope"], "invalid choice"),
        "unknown option": (["info", "--config", "tiny-cpu", "--bogus"], "--bogus"),
        "unknown preset": (["info", "--config", "no-such-preset"], "no-such-preset"),
        "bad choice": (["info", "--config", "tiny-cpu", "--train.precision=fp13"], "train.precision"),
        "unknown choice": (["info", "--config", "tiny-cpu", "--model.positional_encoding=RoPE3d"],
                           "model.positional_encoding"),
        "negative steps": (train + ["--train.total_steps=-5"], "train.total_steps"),
        "zero batch": (train + ["--data.batch_size=0"], "data.batch_size"),
        "info size": (["info", "--config", "tiny-cpu", "--height", "100"], "100"),
        "make-dataset n": (["make-dataset", "shapes", "--out", str(tmp_path / "raw"), "--n", "0"], "--n"),
        "import-folder path": (["import-folder", "--images", no_such, "--out", str(tmp_path / "o")], "no-such"),
        "create-phase path": (["create-phase", "--input-dir", no_such, "--output-dir", str(tmp_path / "p")], "no-such"),
        "create-phase empty": (["create-phase", "--input-dir", str(empty), "--output-dir", str(tmp_path / "p")],
                               "no .parquet shards"),
        "create-phase sizes": (["create-phase", "--input-dir", str(empty), "--output-dir", str(tmp_path / "p"),
                                "--max-res", "100"], "patch_size"),
        "create-indices path": (["create-indices", "--data-parquet-folder", no_such, "--bucket-indices-path",
                                 str(tmp_path / "i.npz")], "no-such"),
        "make-tiny weights": (["make-tiny", "--out", str(tmp_path / "m"), "--vae-weights", no_such], "no-such"),
        "sample checkpoint": (["sample", "--checkpoint", no_such, "--prompt", "a red circle"], "no-such"),
        "sample corrupt weights": (["sample", "--checkpoint", str(corrupt), "--prompt", "a", "--dtype", "fp32"],
                                   "safetensors"),
        "train corrupt weights": (train + [f"--train.resume={corrupt}"], "model.safetensors"),
        "train pickled state": (train + [f"--train.resume={pickled}"], "state.pt is not a plain-tensor checkpoint"),
        "train resume path": (train + [f"--train.resume={no_such}"], "no-such"),
        "bench args": (["bench", "index", "--rows", "0"], "--rows"),
        "bench name": (["bench", "nope"], "invalid choice"),
    }


CASES = ["unknown command", "unknown option", "unknown preset", "bad choice", "unknown choice", "negative steps",
         "zero batch", "info size", "make-dataset n", "import-folder path", "create-phase path", "create-phase empty",
         "create-phase sizes", "create-indices path", "make-tiny weights", "sample checkpoint",
         "sample corrupt weights", "train corrupt weights", "train pickled state", "train resume path", "bench args",
         "bench name"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_exit_2(name, tmp_path, bad_checkpoint, capsys):
    argv, culprit = cases(tmp_path, bad_checkpoint)[name]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits by itself
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert culprit in err[0] and "error" in err[0], err
    assert "Traceback" not in err[0]
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran


def test_every_case_is_run(tmp_path, bad_checkpoint):
    assert sorted(cases(tmp_path, bad_checkpoint)) == sorted(CASES)


@pytest.mark.skipif(flash_available(), reason="flash-attn runs here")
def test_forced_backend_that_cannot_run_is_one_line(capsys):
    assert main(["info", "--config", "tiny-cpu", "--model.attention_backend=flash"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attention_backend='flash'" in err[0], err


def test_internal_failure_keeps_its_traceback(monkeypatch):
    """Not a user error: the exception propagates (python exits 1 with the traceback)."""
    import sd3.commands.info as info

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(info, "count_parameters", broken)
    with pytest.raises(ZeroDivisionError):
        main(["info", "--config", "tiny-cpu"])


def test_help_works_everywhere(capsys):
    """Every command's and benchmark's --help: argparse %-formats help strings, so a stray % garbles or crashes it."""
    from sd3.bench import BENCHMARKS
    from sd3.cli import COMMANDS

    helps = [["--help"]] + [[name, "--help"] for name in COMMANDS] + [["bench", name, "--help"] for name in BENCHMARKS]
    for argv in helps:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, argv
        out = capsys.readouterr().out
        assert "usage:" in out and "option_strings" not in out, argv


def test_process_exit_code_is_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-m", "sd3", "create-indices", "--data-parquet-folder",
                           str(tmp_path / "no-such"), "--bucket-indices-path", str(tmp_path / "i.npz")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "no-such" in done.stderr
