"""Vision integration: timm's ResNet-18 and image data sets with ``(x, y, group, index)`` items.

Installed as ``metafair_opt.integrations.vision``; needs the ``vision`` extra
(``pip install "metafair-opt[vision]"``). Nothing here downloads anything: CIFAR and CelebA are
read from files already on disk, pretrained weights only from the local cache, and
:func:`colored_digits` is built from scikit-learn's bundled digits.
"""

# Runs before any submodule is imported, so one check covers the whole package.
try:
    import timm  # noqa: F401
    import torchvision  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the vision extra
    raise ImportError(
        "metafair_opt.integrations.vision needs torchvision and timm: "
        'pip install "metafair-opt[vision]"'
    ) from err

from metafair_opt.integrations.vision.data import (
    CIFAR_STATS,
    DIGIT_COLORS,
    GroupedDataset,
    celeba,
    cifar,
    colored_digits,
)
from metafair_opt.integrations.vision.models import (
    build_resnet18,
    cached_resnet18_weights,
)

__all__ = [
    "CIFAR_STATS",
    "DIGIT_COLORS",
    "GroupedDataset",
    "build_resnet18",
    "cached_resnet18_weights",
    "celeba",
    "cifar",
    "colored_digits",
]
