"""TrainState: where a run is — step, counters, RNG, data position — owning its state_dict (torchtitan's habit).

The Checkpointer saves it next to the model, EMA, optimizer, scheduler and scaler; each of them owns its state
the same way, so nothing assembles a checkpoint dict by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sd3.train.rng import capture_rng_state, restore_rng_state


@dataclass
class TrainState:
    """The run's position and totals that survive resume.

    step: optimizer steps done; micro_step: micro-batches consumed = the sampler step of this rank's loader;
    images: images trained on by this model rank; nonfinite_*: non-finite steps (total, current streak);
    skipped_base: rows skipped as bad per reason up to the checkpoint this run started from (all loaders);
    skipped_total: the latest all-loader total (set before a save); run_id: the wandb run id;
    sampler: this rank's loader's BucketBatchSampler.state_dict() without its step (the data's identity and, after
    an elastic resume, the re-planned segment); the schedule is global, so one position serves every loader.
    """

    step: int = 0
    micro_step: int = 0
    images: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_row: int = 0
    skipped_base: dict[str, int] = field(default_factory=dict)
    skipped_total: dict[str, int] = field(default_factory=dict)
    run_id: str = ""
    sampler: dict[str, Any] = field(default_factory=dict)

    def data_position(self) -> dict[str, Any]:
        """The sampler state at this point: every loader is at sampler step micro_step, because every model rank
        consumes one micro-batch of its loader per micro-step, and all loaders slice one global schedule."""
        return {**self.sampler, "step": self.micro_step}

    def meta(self) -> dict[str, Any]:
        """The small part written to meta.json: what loaders and tools read without opening state.pt."""
        return {"step": self.step, "micro_step": self.micro_step, "wandb_run_id": self.run_id, "images": self.images,
                "sampler": self.data_position()}

    def state_dict(self) -> dict[str, Any]:
        """weights_only-safe: numbers, strings, dicts and the RNG state tensors."""
        return {
            "step": self.step,
            "micro_step": self.micro_step,
            "counters": {"images": self.images, "nonfinite_steps": self.nonfinite_steps,
                         "nonfinite_in_row": self.nonfinite_in_row, "skipped_rows": dict(self.skipped_total)},
            "wandb_run_id": self.run_id,
            "sampler": self.data_position(),
            "rng": capture_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore position, counters and the global RNG states (the data position is read by the sources)."""
        self.step = int(state["step"])
        self.micro_step = int(state["micro_step"])
        c = state.get("counters", {})
        self.images = int(c.get("images", 0))
        self.nonfinite_steps = int(c.get("nonfinite_steps", 0))
        self.nonfinite_in_row = int(c.get("nonfinite_in_row", 0))
        self.skipped_base = {str(k): int(v) for k, v in c.get("skipped_rows", {}).items()}
        self.skipped_total = dict(self.skipped_base)
        self.run_id = str(state.get("wandb_run_id", self.run_id))
        restore_rng_state(state["rng"])
