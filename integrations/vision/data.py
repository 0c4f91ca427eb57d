"""Image data sets whose items are ``(x, y, group, index)``, ready for the meta-optimisers.

Every function returns a :class:`GroupedDataset`: ``x`` a float ``C x H x W`` tensor, ``y`` and
``group`` ints and ``index`` the item's position in that dataset object, so a default
``DataLoader`` batch feeds :class:`~metafair_opt.SampleReweighter` (``index``) and
:meth:`~metafair_opt.GradientAlignmentWrapper.step_batch` (``group``). ``.groups`` and
``.targets`` are computed without loading an image.

* :func:`cifar`: CIFAR-10/100 through torchvision; the group is the class (class-based fairness).
* :func:`celeba`: CelebA through torchvision; y one attribute, the group another.
* :func:`colored_digits`: a small offline task from scikit-learn's bundled 8x8 digits, with a
  colour that is spuriously correlated with the label in training only.

Nothing is downloaded: a missing data set raises a ``FileNotFoundError`` that says which files
torchvision expects where and where to get them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100, CelebA

__all__ = [
    "CIFAR_STATS",
    "DIGIT_COLORS",
    "GroupedDataset",
    "celeba",
    "cifar",
    "colored_digits",
]

#: Per-channel mean and standard deviation of the official training images.
CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

#: RGB of the two digit colours of :func:`colored_digits`: group 0 red-ish, group 1 green-ish.
DIGIT_COLORS: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (0.9, 0.2, 0.2),
    (0.2, 0.9, 0.2),
)

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
_CELEBA_FILES = (
    "list_attr_celeba.txt",
    "list_eval_partition.txt",
    "identity_CelebA.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
)


class GroupedDataset(Dataset):
    """Items ``(x, y, group, index)`` over a map-style dataset whose items start with ``x``.

    Args:
        base: the underlying dataset (a torchvision data set or a ``TensorDataset``); item
            ``indices[i]`` of it is item ``i`` here, and only its first element (the image) is used.
        targets: one label per item of this dataset.
        groups: one group id per item of this dataset.
        indices: positions in ``base`` (default: ``0 .. len(targets) - 1``).

    Attributes:
        targets, groups: LongTensors, one entry per item.
        indices: LongTensor of the positions in ``base``.
    """

    def __init__(
        self,
        base: Dataset,
        targets: Sequence[int] | torch.Tensor,
        groups: Sequence[int] | torch.Tensor,
        indices: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        self.base = base
        self.targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
        self.groups = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
        n = self.targets.numel()
        self.indices = (
            torch.arange(n) if indices is None
            else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        )
        if not self.groups.numel() == self.indices.numel() == n:
            raise ValueError(
                f"targets, groups and indices need one entry per item; got {n}, "
                f"{self.groups.numel()} and {self.indices.numel()}."
            )

    def __len__(self) -> int:
        return self.targets.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} items.")
        index %= len(self)
        x = self.base[int(self.indices[index])][0]
        return x, int(self.targets[index]), int(self.groups[index]), index


# --------------------------------------------------------------------------------- CIFAR
def _cifar_layout(cls: type[CIFAR10]) -> list[str]:
    files = [name for name, _ in cls.train_list + cls.test_list]
    return [f"{cls.base_folder}/{name}" for name in [*files, cls.meta["filename"]]]


def _require_files(root: Path, title: str, expected: list[str], where: str) -> None:
    missing = [name for name in expected if not (root / name).is_file()]
    if missing:
        layout = ", ".join(f"<root>/{name}" for name in expected)
        raise FileNotFoundError(
            f"{title} not found under {root}: missing {', '.join(missing)}. torchvision expects "
            f"{layout}. Get the files from {where} and unpack them there; nothing is "
            "downloaded (download=False)."
        )


def _construct(cls: Callable[..., Any], name: str, **kwargs: Any) -> Any:
    """Builds a torchvision data set, turning its MD5-check failure into a clearer error."""
    try:
        return cls(download=False, **kwargs)
    except RuntimeError as err:
        raise RuntimeError(
            f"{name} files were found but torchvision's integrity check failed ({err}): they "
            "do not match the official release's MD5 sums. Replace them with the original "
            "files; nothing is downloaded."
        ) from err


def _balanced_holdout(
    targets: torch.Tensor, num_classes: int, val_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded positions of a class-balanced hold-out and of the rest, both sorted."""
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise ValueError(f"val_size must be a non-negative integer; got {val_size!r}.")
    if val_size % num_classes:
        raise ValueError(
            f"val_size={val_size} is not divisible by the {num_classes} classes: the "
            "hold-out takes val_size / num_classes images of every class."
        )
    per_class = val_size // num_classes
    counts = torch.bincount(targets, minlength=num_classes)
    if per_class >= int(counts.min()):
        raise ValueError(
            f"val_size={val_size} is too large: {per_class} images per class would leave no "
            f"training image of the smallest class ({int(counts.min())} images)."
        )
    rng = np.random.default_rng(seed)
    held = [
        np.flatnonzero(targets.numpy() == c)[rng.permutation(int(counts[c]))[:per_class]]
        for c in range(num_classes)
    ]
    mask = np.zeros(targets.numel(), dtype=bool)
    mask[np.concatenate(held)] = True
    return torch.from_numpy(np.flatnonzero(mask)), torch.from_numpy(np.flatnonzero(~mask))


def cifar(
    root: str | os.PathLike[str],
    name: str = "cifar10",
    split: str = "train",
    val_size: int = 5000,
    augment: bool = True,
    seed: int = 0,
) -> GroupedDataset:
    """CIFAR-10 or CIFAR-100 through torchvision (``download=False``); the group is the class.

    Args:
        root: folder holding ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
            ``test_batch``, ``batches.meta``) or ``cifar-100-python/`` (``train``, ``test``,
            ``meta``), as unpacked from the archives at https://www.cs.toronto.edu/~kriz/cifar.html.
        name: ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"`` (the official training set minus the hold-out), ``"val"`` (a
            class-balanced hold-out of ``val_size`` training images, ``val_size / num_classes``
            per class, drawn with ``seed``) or ``"test"`` (the official test set).
        val_size: size of the hold-out; must be divisible by the number of classes and leave
            every class at least one training image. ``train`` and ``val`` built with the same
            ``val_size`` and ``seed`` are disjoint and together cover the training set.
        augment: for ``"train"``, ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()``
            before ``ToTensor()`` and normalisation with :data:`CIFAR_STATS`; ``"val"`` and
            ``"test"`` are only converted and normalised.
        seed: seed of the hold-out draw.

    Returns:
        A :class:`GroupedDataset` of ``(3x32x32 image, class, class, index)`` items; its
        ``indices`` are positions in torchvision's training or test set.
    """
    classes = {"cifar10": CIFAR10, "cifar100": CIFAR100}
    if name not in classes:
        raise ValueError(f"name must be one of {sorted(classes)}; got {name!r}.")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test'; got {split!r}.")
    cls = classes[name]
    root = Path(root).expanduser()
    title = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name]
    _require_files(root, title, _cifar_layout(cls), _CIFAR_URL)

    mean, std = CIFAR_STATS[name]
    steps: list[Any] = []
    if split == "train" and augment:
        steps += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    base = _construct(
        cls, title, root=str(root), train=split != "test", transform=T.Compose(steps)
    )
    targets = torch.as_tensor(base.targets, dtype=torch.long)
    if split == "test":
        return GroupedDataset(base, targets, targets)
    held, rest = _balanced_holdout(targets, len(base.classes), val_size, seed)
    indices = held if split == "val" else rest
    return GroupedDataset(base, targets[indices], targets[indices], indices)


# -------------------------------------------------------------------------------- CelebA
def _require_celeba(root: Path) -> None:
    folder = root / CelebA.base_folder
    images = folder / "img_align_celeba"
    missing = [name for name in _CELEBA_FILES if not (folder / name).is_file()]
    has_jpg = False
    if images.is_dir():
        with os.scandir(images) as entries:
            has_jpg = any(entry.name.endswith(".jpg") for entry in entries)
    if not has_jpg:
        missing.insert(0, "img_align_celeba/*.jpg")
    if missing:
        layout = ", ".join(
            f"<root>/celeba/{name}" for name in ("img_align_celeba/*.jpg", *_CELEBA_FILES)
        )
        raise FileNotFoundError(
            f"CelebA not found under {root}: missing {', '.join(missing)} in {folder}. "
            f"torchvision expects {layout}. Get the aligned-and-cropped images and the "
            f"annotation files from {_CELEBA_URL} and unpack them there; nothing is "
            "downloaded (download=False)."
        )


def celeba(
    root: str | os.PathLike[str],
    target: str = "Attractive",
    sensitive: str = "Male",
    split: str = "train",
    image_size: int = 128,
) -> GroupedDataset:
    """CelebA through torchvision (``download=False``, ``target_type="attr"``).

    ``y`` is the ``target`` attribute and the group the ``sensitive`` attribute, both 0/1
    (torchvision maps the file's -1/1 to 0/1); any two of the 40 attribute names work. Following
    the FORML paper's "center-crop and resize to 128x128 and normalize", each aligned 178x218
    image is centre-cropped to 178x178, resized to ``image_size`` x ``image_size``, converted
    with ``ToTensor()`` and normalised with mean 0.5 and std 0.5 per channel (range [-1, 1]).

    Args:
        root: folder holding ``celeba/`` with ``img_align_celeba/*.jpg``,
            ``list_attr_celeba.txt``, ``list_eval_partition.txt``, ``identity_CelebA.txt``,
            ``list_bbox_celeba.txt`` and ``list_landmarks_align_celeba.txt`` (from
            https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html).
        target, sensitive: attribute names, e.g. ``"Attractive"``, ``"Male"``, ``"Young"``.
        split: the official partition: ``"train"``, ``"valid"`` (alias ``"val"``) or ``"test"``.
        image_size: side of the output images.

    Raises:
        ValueError: an unknown attribute name (the message lists the valid ones), equal
            ``target`` and ``sensitive``, or an unknown split.
        FileNotFoundError: the files are missing.
    """
    splits = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
    if split not in splits:
        raise ValueError(f"split must be 'train', 'valid' or 'test'; got {split!r}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer; got {image_size!r}.")
    if target == sensitive:
        raise ValueError(f"target and sensitive are both {target!r}: choose two attributes.")
    root = Path(root).expanduser()
    _require_celeba(root)
    transform = T.Compose([
        T.CenterCrop(178),
        T.Resize((image_size, image_size)),
        T.ToTensor(),
        T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    base = _construct(
        CelebA, "CelebA", root=str(root), split=splits[split], target_type="attr",
        transform=transform,
    )
    names = [name for name in base.attr_names if name]
    for role, attribute in (("target", target), ("sensitive", sensitive)):
        if attribute not in names:
            raise ValueError(
                f"{role}={attribute!r} is not a CelebA attribute; valid names: {', '.join(names)}."
            )
    attr = base.attr
    return GroupedDataset(
        base, attr[:, base.attr_names.index(target)], attr[:, base.attr_names.index(sensitive)]
    )


# ------------------------------------------------------------------------ coloured digits
def _digit_split(digits: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Seeded 60/20/20 split of positions, stratified by digit (each part sorted)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for digit in np.unique(digits):
        members = np.flatnonzero(digits == digit)[rng.permutation(int((digits == digit).sum()))]
        n_val = n_test = round(0.2 * members.size)
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val:n_val + n_test])
        parts["train"].append(members[n_val + n_test:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def _upsample(images: np.ndarray, image_size: int) -> torch.Tensor:
    """8x8 digits (0-16) to ``N x image_size x image_size`` intensities in [0, 1]."""
    small = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    big = F.interpolate(small, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return big[:, 0].clamp_(0.0, 1.0)


def colored_digits(
    split: str = "train", bias: float = 0.9, image_size: int = 32, seed: int = 0
) -> GroupedDataset:
    """An offline coloured-digit task with a colour that is spurious in training only.

    The 1,797 8x8 images of scikit-learn's bundled digits (``load_digits``) are split with
    ``seed`` into train/val/test, 60/20/20 within every digit (1,079 / 359 / 359 images),
    upsampled bilinearly to ``image_size`` x ``image_size`` and drawn in one of two colours
    (:data:`DIGIT_COLORS`: the intensity times the colour's RGB on a black background).

    * ``y`` is the digit's parity (0 = even, 1 = odd; 891 even and 906 odd images overall,
      50.4% odd in every split).
    * The group is the colour (0 = red-ish, 1 = green-ish).
    * In ``"train"`` the colour equals the parity with probability ``bias`` (an independent
      draw per image); in ``"val"`` and ``"test"`` with probability 0.5, i.e. colour and label
      are independent. With ``seed=0`` and ``bias=0.9`` the measured agreement is 0.906 in
      train (1,079 images; binomial standard error 0.009), 0.488 in val and 0.557 in test
      (359 images each; standard error 0.026).
    * Pixels are normalised per channel with one fixed affine map for every split, seed and
      bias: the mean and standard deviation of the whole upsampled digit set with both colours
      equally likely, so a colour-balanced split has roughly zero mean and unit variance.

    The same ``split``, ``bias``, ``image_size`` and ``seed`` give identical tensors; the colour
    draws of the three splits use independent streams derived from ``seed``.

    Returns:
        A :class:`GroupedDataset` of ``(3 x image_size x image_size, parity, colour, index)``
        items; ``.digits`` holds each item's digit (0-9).
    """
    from sklearn.datasets import load_digits

    split_ids = {"train": 0, "val": 1, "test": 2}
    if split not in split_ids:
        raise ValueError(f"split must be 'train', 'val' or 'test'; got {split!r}.")
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"bias must lie in [0, 1]; got {bias!r}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer; got {image_size!r}.")

    bunch = load_digits()
    digits = bunch.target.astype(np.int64)
    positions = _digit_split(digits, seed)[split]
    parity = torch.from_numpy(digits[positions] % 2)

    agree_prob = bias if split == "train" else 0.5
    rng = np.random.default_rng([seed, split_ids[split]])
    agrees = torch.from_numpy(rng.random(positions.size) < agree_prob)
    colour = torch.where(agrees, parity, 1 - parity)

    intensity = _upsample(bunch.images, image_size)
    palette = torch.tensor(DIGIT_COLORS)
    pixel_mean = intensity.mean()
    pixel_sq = intensity.square().mean()
    mean = pixel_mean * palette.mean(dim=0)
    std = (pixel_sq * palette.square().mean(dim=0) - mean.square()).sqrt()

    images = intensity[torch.from_numpy(positions)][:, None] * palette[colour][:, :, None, None]
    images = (images - mean[:, None, None]) / std[:, None, None]
    dataset = GroupedDataset(TensorDataset(images), parity, colour)
    dataset.digits = torch.from_numpy(digits[positions])
    return dataset
