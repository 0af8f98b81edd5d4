"""Node layouts (how many loader GPUs feed how many model GPUs) and the stall each one is predicted to have.

The model of a step (per micro-batch of `batch` images per model rank):
    model rank:  M = batch · m                      (m: MMDiT forward+backward seconds per image)
    loader k:    L_k = share_k · batch · l           (l: loader seconds per image, all parts; share_k: its consumers)
The loader overlaps with training (batches are sent asynchronously, `max_in_flight` ahead), and DDP makes every
model rank wait for the slowest one at each optimizer step, so in steady state every rank runs at the period
P = max(M, max_k L_k). Model ranks stall (P - M) / P of the time, loader k idles (P - L_k) / P, and the node trains
n_model · batch / P images per second. Uneven shares (3 loaders feeding 2+2+1) are explicit maps for
`topology.loader_to_model`, which Topology.resolve accepts as they are.

`colocated` (no loader ranks, every GPU encodes its own batch: topology.mode=colocated) is listed for reference:
P = batch · (m + l) with nothing to overlap, and it needs the encoders' memory next to the training state.
"""

from __future__ import annotations

from dataclasses import dataclass

from sd3.config import LOADER_MODES, TopologyConfig


@dataclass(frozen=True)
class Layout:
    """One node: loader GPU k feeds shares[k] model GPUs (empty shares + colocated: every GPU does both)."""

    shares: tuple[int, ...]
    colocated_gpus: int = 0

    @property
    def gpus(self) -> int:
        return self.colocated_gpus or len(self.shares) + sum(self.shares)

    @property
    def model_gpus(self) -> int:
        return self.colocated_gpus or sum(self.shares)

    @property
    def name(self) -> str:
        if self.colocated_gpus:
            return f"colocated x{self.colocated_gpus}"
        if len(set(self.shares)) == 1:
            return f"{len(self.shares)}+{sum(self.shares)} ({len(self.shares)}x1:{self.shares[0]})"
        return f"{len(self.shares)}+{sum(self.shares)} ({'+'.join(map(str, self.shares))})"

    def loader_to_model(self) -> dict[int, list[int]]:
        """The map for one node: loaders are local ranks 0..L-1, their consumers follow in order."""
        mapping, first = {}, len(self.shares)
        for loader, share in enumerate(self.shares):
            mapping[loader] = list(range(first, first + share))
            first += share
        return mapping

    def overrides(self) -> list[str]:
        """The `sd3 train` overrides that select this layout (an explicit map when the shares are uneven)."""
        if self.colocated_gpus:
            return ["--topology.mode=colocated"]
        if len(set(self.shares)) == 1:
            return [f"--topology.loaders_per_node={len(self.shares)}", f"--topology.models_per_loader={self.shares[0]}"]
        body = ", ".join(f"{k}: {v}" for k, v in self.loader_to_model().items()).replace(" ", "")
        return [f"--topology.loader_to_model={{{body}}}"]


@dataclass(frozen=True)
class Prediction:
    """A layout's predicted steady state, per micro-batch step."""

    layout: Layout
    model_step_s: float
    loader_step_s: float  # the slowest loader's
    period_s: float
    stall_pct: float  # of a model rank's time, waiting for batches
    loader_idle_pct: float  # of the busiest loader's time, waiting for a consumer to take a batch
    images_per_s_per_gpu: float


def predict(layout: Layout, batch: int, loader_s_per_image: float, model_s_per_image: float) -> Prediction:
    model_step = batch * model_s_per_image
    if layout.colocated_gpus:
        loader_step = batch * loader_s_per_image
        period = model_step + loader_step
        return Prediction(layout, model_step, loader_step, period, 100.0 * loader_step / period, 0.0,
                          batch / period)
    loader_step = max(layout.shares) * batch * loader_s_per_image
    period = max(model_step, loader_step)
    return Prediction(
        layout, model_step, loader_step, period,
        stall_pct=100.0 * (period - model_step) / period,
        loader_idle_pct=100.0 * (period - loader_step) / period,
        images_per_s_per_gpu=layout.model_gpus * batch / period / layout.gpus,
    )


def balanced_shares(model_gpus: int, loaders: int) -> tuple[int, ...]:
    """`model_gpus` split over `loaders` as evenly as possible, larger shares first (7 over 3 -> 3, 2, 2)."""
    base, extra = divmod(model_gpus, loaders)
    return tuple(base + 1 if k < extra else base for k in range(loaders))


def candidate_layouts(gpus_per_node: int) -> list[Layout]:
    """Every loader count 1..G-1 with its most even split (only the largest share sets the period), + colocated."""
    layouts = [Layout(balanced_shares(gpus_per_node - n, n)) for n in range(1, gpus_per_node) if gpus_per_node - n >= n]
    return layouts + [Layout((), colocated_gpus=gpus_per_node)]


def configured_layout(cfg: TopologyConfig, gpus_per_node: int) -> Layout:
    """The layout a TopologyConfig asks for (an explicit map counts as one node)."""
    if cfg.mode not in LOADER_MODES:
        return Layout((), colocated_gpus=gpus_per_node)
    if cfg.loader_to_model:
        return Layout(tuple(len(v) for _, v in sorted(cfg.loader_to_model.items(), key=lambda kv: int(kv[0]))))
    return Layout((cfg.models_per_loader,) * cfg.loaders_per_node)


def recommend(predictions: list[Prediction], max_stall_pct: float) -> Prediction:
    """The most images/s per GPU among loader layouts stalling at most max_stall_pct (else the least stalled)."""
    loader_layouts = [p for p in predictions if not p.layout.colocated_gpus]
    within = [p for p in loader_layouts if p.stall_pct <= max_stall_pct + 1e-9]
    if within:
        return max(within, key=lambda p: (p.images_per_s_per_gpu, -p.stall_pct))
    return min(loader_layouts, key=lambda p: p.stall_pct)
