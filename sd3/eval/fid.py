"""FID with torchmetrics' FrechetInceptionDistance: the running mean / covariance sums in float64 (synchronised
across ranks by torchmetrics) and the Fréchet distance of Heusel et al. 2017, "GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium", eq. 6:

    d² = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)

Why torchmetrics: a maintained implementation whose features are torch-fidelity's port of the TF Inception-v3 that
every FID paper uses (the 2048-d pool3 output, not the source's 1000-way logits), built from a local weights file
(`feature_extractor_weights_path`: nothing downloaded at run time), and it takes any nn.Module as the feature
extractor too (FID on CLIP features here). clean-fid fixes its own resize but downloads its TorchScript Inception.
torch-fidelity itself imports torchvision; on a machine without it only the CLIP-feature FID is available.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

INCEPTION_FEATURES = "inception-v3-compat pool3 (2048-d), torch-fidelity"


class EvalError(ValueError):
    """Bad input to `sd3 eval` (a missing file, a missing optional dependency); one line naming it (exit 2)."""


def inception_fid(weights: str | Path) -> FrechetInceptionDistance:
    """FID on the 2048-d Inception pool features, the network's weights read from the local file `weights`
    (torch-fidelity's pt_inception-2015-12-05-6726825d.pth; any download of it works, nothing is fetched here)."""
    weights = Path(weights)
    if not weights.is_file():
        raise EvalError(f"--inception {weights}: no such file (torch-fidelity's pt_inception-2015-12-05 weights)")
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics imports it only when it builds the Inception
    except ImportError as e:
        raise EvalError(f"Inception FID needs torch-fidelity (pip install 'sd3[eval]'): {e}") from None
    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))


def feature_fid(extractor: nn.Module) -> FrechetInceptionDistance:
    """FID on the features of any extractor taking uint8 images (N, 3, H, W) -> (N, F)."""
    return FrechetInceptionDistance(feature=extractor)

