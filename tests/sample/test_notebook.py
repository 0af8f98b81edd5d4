"""infer_loop.ipynb runs top to bottom with nbclient, in a kernel of this interpreter, against a tiny checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

NOTEBOOK = Path(__file__).resolve().parents[2] / "infer_loop.ipynb"


@pytest.fixture
def this_interpreter_kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec whose argv is sys.executable, found through JUPYTER_PATH: the kernel imports the same sd3."""
    name = "sd3-test-python"
    spec = tmp_path / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sd3 tests", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return name


def test_notebook_runs_and_shows_an_image(tiny_checkpoint, this_interpreter_kernel, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell is the parameter cell"
    assert "import torch" not in "".join(c.source for c in code), "no model code in the notebook"

    init = tmp_path / "init.png"  # image-to-image with a shifted grid, through the notebook's parameters
    Image.new("RGB", (32, 32), "white").save(init)
    # Papermill's convention: a cell right after the parameter cell overrides the parameters.
    at = nb.cells.index(code[0]) + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell(
        f'checkpoint = {str(tiny_checkpoint)!r}\ndevice = "cpu"\nnum_steps = 2\nbatch_size = 2\n'
        'width = 32\nheight = 32\nseed = 3\ntext_input = "a blue square"\n'
        f'init_image = {str(init)!r}\nstrength = 0.5\nshift = 3.0'))

    client = NotebookClient(nb, kernel_name=this_interpreter_kernel, timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    assert any("seeds [3, 4]" in o.get("text", "") for o in outputs if o.output_type == "stream")
