"""`sd3 sample` end to end on `tiny_checkpoint`: files written (text-to-image, image-to-image with a shifted grid),
and every bad argument refused before any model loads, as one line on stderr with exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]


def sample_cmd(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sd3", "sample", "--checkpoint", str(checkpoint), "--prompt", "a red circle",
            "--out", str(out), "--steps", "2", "--device", "cpu", *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def test_sample_command_writes_pngs_grid_and_gif(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    cmd = sample_cmd(tiny_checkpoint, out, "--prompt", "a blue square!", "--width", "32", "--height", "32",
                     "--seed", "7", "--gif")
    done = run(cmd)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["7_a-red-circle.gif", "7_a-red-circle.png", "8_a-blue-square.gif", "8_a-blue-square.png",
                     "grid_7.png"]
    assert str(out / "grid_7.png") in done.stdout


def test_sample_command_image_to_image_with_a_shifted_grid(tiny_checkpoint, tmp_path):
    init = tmp_path / "init.png"
    image = Image.new("RGB", (48, 32), "white")
    ImageDraw.Draw(image).ellipse((8, 4, 32, 28), fill=(220, 30, 30))
    image.save(init)
    out = tmp_path / "out"
    done = run(sample_cmd(tiny_checkpoint, out, "--init-image", str(init), "--strength", "0.6", "--shift", "3",
                          "--steps", "5", "--seed", "3", "--batch-size", "2"))
    assert done.returncode == 0, done.stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["3_a-red-circle.png", "4_a-red-circle.png", "grid_3.png"]
    assert all(Image.open(p).size == (48, 32) for p in pngs[:2])  # the init image's size
    assert '"strength": 0.6' in done.stdout and '"shift": 3.0' in done.stdout
    # t = 0.6 entered on the 5-step grid shifted by 3 (1, 0.923, 0.818, 0.667, 0.429, 0): 0.6 -> 0.429 -> 0.
    assert '"steps_taken": 2' in done.stdout


@pytest.fixture
def corrupt_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the tiny checkpoint whose model.safetensors is garbage (its EMA weights intact)."""
    copy = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "model.safetensors").write_bytes(b"\xff" * 64)
    return copy


def test_bad_arguments_are_one_line_exit_2_before_any_model_loads(tiny_checkpoint, corrupt_checkpoint, tmp_path):
    out = tmp_path / "out"
    cases = {
        "steps -3": (["--steps", "-3"], "steps -3 must be >= 1"),
        "sampler": (["--sampler", "nope"], "sampler 'nope' is not one of euler, euler_stochastic, heun"),
        "strength": (["--init-image", str(tmp_path), "--strength", "1.5"], "strength 1.5 must be in [0, 1]"),
        "init image": (["--init-image", str(tmp_path / "missing.png")], "missing.png does not exist"),
        "not an image": (["--init-image", str(tiny_checkpoint / "config.json")], "is not a readable image"),
        "shift": (["--shift", "0"], "shift 0.0 must be > 0"),
        "width": (["--width", "30"], "width 30 is not a positive multiple of 16"),
        "strength alone": (["--strength", "0.5"], "--strength needs --init-image"),
    }
    procs = {name: subprocess.Popen(sample_cmd(tiny_checkpoint, out, *extra), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for name, (extra, _) in cases.items()}
    missing = sample_cmd(tmp_path / "no-such-checkpoint", out)
    procs["checkpoint"] = subprocess.Popen(missing, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    cases["checkpoint"] = ([], "no checkpoint at")
    procs["corrupt"] = subprocess.Popen(sample_cmd(corrupt_checkpoint, out, "--raw-weights"), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    cases["corrupt"] = ([], "model.safetensors: not a readable .safetensors file")
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("sd3 sample: error: "), (name, stderr)
        assert cases[name][1] in lines[0], (name, lines[0])
        assert not out.exists(), name  # nothing sampled, nothing written
