"""sd3: train Stable-Diffusion-3-style MMDiT text-to-image models with dedicated data-loader ranks."""

__version__ = "0.1.0"
