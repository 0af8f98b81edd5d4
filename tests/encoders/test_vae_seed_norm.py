"""encoders.latent_norm = "seed": the source's z·scale + shift (SEED_SPEC §g item 5)."""

import torch

from sd3.encoders.vae import denormalize, normalize

SHIFT, SCALE = 0.1159, 0.3611  # FLUX.1


def test_seed_normalisation_round_trips_and_differs_by_the_specs_constant():
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    seed = normalize(z, SHIFT, SCALE, "seed")
    torch.testing.assert_close(seed, z * SCALE + SHIFT)
    torch.testing.assert_close(denormalize(seed, SHIFT, SCALE, "seed"), z)
    # The source's latents are ours plus shift·(1 + scale) ≈ 0.158 for FLUX.
    torch.testing.assert_close(seed - normalize(z, SHIFT, SCALE), torch.full_like(z, SHIFT * (1 + SCALE)))
