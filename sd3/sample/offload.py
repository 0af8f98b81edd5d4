"""Stage-by-stage device placement for sampling: one stage's models on the accelerator at a time.

Sampling runs three stages (encode the prompts, denoise, decode). With `Offload(device, enabled=True)` the models of
the stage that runs visit `device` and wait on the CPU otherwise, so the accelerator's peak is the largest stage,
not the sum of all models. On the CPU there is nothing to gain and every visit is a no-op.

A *part* is what the pipeline holds: an nn.Module (the MMDiT), a TextEncoders or a LatentVAE. `modules(part)` names
the nn.Modules each kind holds, explicitly, so a new attribute on those classes is never moved by accident.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sd3.encoders.text import TextEncoders
from sd3.encoders.vae import LatentVAE

Part = torch.nn.Module | TextEncoders | LatentVAE


def modules(part: Part) -> list[torch.nn.Module]:
    """The nn.Modules a part holds: the module itself; a TextEncoders' CLIP, Gemma and BERT; a LatentVAE's VAE."""
    if isinstance(part, torch.nn.Module):
        return [part]
    if isinstance(part, TextEncoders):
        return [part.clip, part.gemma, part.bert]
    if isinstance(part, LatentVAE):
        return [part.vae]
    raise TypeError(f"offload: cannot place a {type(part).__name__} (an nn.Module, TextEncoders or LatentVAE)")


def move(part: Part, device: torch.device) -> None:
    """Move a part's modules to `device`; a TextEncoders or LatentVAE also sends its inputs there from now on."""
    for module in modules(part):
        module.to(device)
    if not isinstance(part, torch.nn.Module):
        part.device = device


def release(device: torch.device) -> None:
    """Hand the memory of the weights that just left a GPU back to the driver, for the next stage's models."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def visiting(part: Part, there: torch.device, back: torch.device) -> Iterator[Part]:
    """Within the block the part is on `there`, afterwards on `back` again; a no-op when both are the same."""
    if there == back:
        yield part
        return
    move(part, there)
    release(back)
    try:
        yield part
    finally:
        move(part, back)
        release(there)


class Offload:
    """Where each part waits between stages.

    device: where every stage runs; enabled: parts wait on the CPU between their stages (`home`), else everything
    stays on `device`.
    """

    def __init__(self, device: torch.device, enabled: bool):
        self.device = device
        self.home = torch.device("cpu") if enabled else device

    def move_home(self, part: Part) -> None:
        """Put a part where it waits between its stages."""
        move(part, self.home)

    def on_device(self, part: Part):
        """`with offload.on_device(vae):` the part's stage: it visits the device."""
        return visiting(part, self.device, self.home)

    def off_device(self, part: Part):
        """`with offload.off_device(model):` another stage runs: this part waits at home meanwhile."""
        return visiting(part, self.home, self.device)
