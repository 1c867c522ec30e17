"""lt-recipes: long-tailed recipes on timm, with the GKP + GSA method of "Reframing Long-Tailed Learning via Loss
Landscape Geometry" (CVPR 2026). Importing the package registers the CIFAR ResNets with timm."""
from . import models  # noqa: F401  (registers resnet32_cifar / resnet8_cifar with timm)

__version__ = "0.1.0"
