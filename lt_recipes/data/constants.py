"""What is fixed per dataset: class counts, default normalisation, where Fashion-MNIST is installed."""
from __future__ import annotations

# Classes of every dataset; the list datasets' counts are the published ones (their list files decide in a run).
NUM_CLASSES = {"digits": 10, "fmnist": 10, "cifar10": 10, "cifar100": 100, "imagenet_lt": 1000, "places_lt": 365,
               "inat2018": 8142}
# (mean, std) per channel of the in-memory datasets' training images; image files default to ImageNet's.
MEAN_STD = {
    "digits": ((0.3053,), (0.3759,)),
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# The default data.root of fmnist: where Debian's dataset-fashion-mnist package installs the idx files.
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
