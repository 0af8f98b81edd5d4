"""`sd3 eval` end to end on the tiny checkpoint: held-out shards and an image folder as the reference, one JSON line,
and the one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
import math

from PIL import Image

from sd3.cli import main as cli


def run_eval(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = cli(["eval", *args])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else None), captured.err


def test_eval_against_heldout_shards_prints_one_json_line(tiny_checkpoint, shapes_phase, tiny_models, tmp_path, capsys):
    code, result, err = run_eval(
        capsys, "--checkpoint", str(tiny_checkpoint), "--reference", str(shapes_phase.folder), "--n", "6",
        "--clip", str(tiny_models.root / "metaclip"), "--steps", "2", "--device", "cpu", "--batch-size", "4",
        "--save-images", str(tmp_path / "generated"),
    )
    assert code == 0, err
    assert "generating" in err  # the progress bar
    assert result["n"] == 6 and result["fid"] is None and result["fid_features"].startswith("none")
    assert math.isfinite(result["fid_clip"]) and result["fid_clip"] >= 0
    assert 0 <= result["clip_score"] <= 100 and 0 <= result["clip_score_reference"] <= 100
    assert result["sample"]["num_steps"] == 2
    generated = sorted((tmp_path / "generated").glob("*.png"))
    assert len(generated) == 6 and Image.open(generated[0]).size == (64, 64)  # the checkpoint's [sample] size

    # Same seed, same reference rows and images: the same numbers.
    code, again, _ = run_eval(
        capsys, "--checkpoint", str(tiny_checkpoint), "--reference", str(shapes_phase.folder), "--n", "6",
        "--clip", str(tiny_models.root / "metaclip"), "--steps", "2", "--device", "cpu", "--batch-size", "4",
    )
    assert code == 0 and again["fid_clip"] == result["fid_clip"] and again["clip_score"] == result["clip_score"]


def test_eval_against_an_image_folder(tiny_checkpoint, tiny_models, tmp_path, capsys):
    folder = tmp_path / "ref"
    folder.mkdir()
    rows = []
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": f"A {colour} square in the center of a white background."})
    rows.append({"image": "missing.png", "prompt": "gone"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, result, err = run_eval(capsys, "--checkpoint", str(tiny_checkpoint), "--reference", str(folder), "--n", "4",
                                 "--clip", str(tiny_models.root / "metaclip"), "--steps", "1", "--device", "cpu")
    assert code == 0, err
    assert result["n"] == 3 and result["skipped_reference_rows"] == {"missing_file": 1}


def test_bad_input_is_one_line_and_exit_2(tiny_checkpoint, tiny_models, shapes_phase, tmp_path, capsys):
    clip = str(tiny_models.root / "metaclip")
    cases = [
        (["--reference", str(tmp_path / "nowhere"), "--clip", clip], "--reference"),
        (["--reference", str(tmp_path), "--clip", clip], "no .parquet shards"),
        (["--reference", str(shapes_phase.folder), "--clip", clip, "--inception", str(tmp_path / "w.pth")],
         "--inception"),
        (["--reference", str(shapes_phase.folder), "--n", "2", "--clip", str(tmp_path / "no-clip")], "--clip"),
    ]
    for extra, needle in cases:
        code, _, err = run_eval(capsys, "--checkpoint", str(tiny_checkpoint), "--device", "cpu", *extra)
        assert code == 2, extra
        errors = [line for line in err.splitlines() if line.startswith("sd3 eval: error: ")]
        assert len(errors) == 1 and needle in errors[0], err
