"""lt-recipes: long-tailed recipes on timm, with the GKP + GSA method of "Reframing Long-Tailed Learning via Loss
Landscape Geometry" (CVPR 2026).

Importing the package is cheap (no torch, no timm), so `lt_recipes.config` reports a bad recipe key at once;
`import lt_recipes.models` registers the CIFAR ResNets (resnet8_cifar, resnet32_cifar) with timm.
"""

__version__ = "0.1.0"
