"""Image models for the vision experiments: timm's ResNet-18, optionally with a CIFAR stem.

Nothing is ever downloaded: ``pretrained=True`` loads timm's ImageNet weights only when they
already lie in the local Hugging Face cache (or in torch hub's legacy checkpoint folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
from torch import nn

__all__ = ["build_resnet18", "cached_resnet18_weights"]

#: The files timm's Hugging Face loader looks for, in its order of preference.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

_NOT_CACHED = (
    "pretrained ResNet-18 weights are not in the local cache (~/.cache/huggingface/hub); "
    "download them once with network access or pass pretrained=False"
)


def _hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time.

    Follows ``huggingface_hub.constants`` (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
    ``HF_HOME``/hub, ``XDG_CACHE_HOME``/huggingface/hub, ``~/.cache/huggingface/hub``), which
    ``huggingface_hub`` itself evaluates only once, at import.
    """
    explicit = os.getenv("HF_HUB_CACHE") or os.getenv("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    xdg = os.getenv("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.getenv("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _torch_hub_checkpoints() -> Path:
    """torch hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``): timm's URL source."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_resnet18_weights() -> Path | None:
    """The local file holding timm's default ``resnet18`` weights, or ``None`` when not cached.

    Looks only at the disk: the Hugging Face hub cache entry of timm's ``hf_hub_id``
    (``timm/resnet18.a1_in1k``) and then torch hub's checkpoint folder (the URL source).
    """
    cfg = timm.models.get_pretrained_cfg("resnet18")
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = hub_id.partition("@")
        for filename in _HF_WEIGHT_FILES:
            found = try_to_load_from_cache(
                repo_id, filename, cache_dir=_hf_hub_cache(), revision=revision or None
            )
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    url = getattr(cfg, "url", None)
    if url:
        candidate = _torch_hub_checkpoints() / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def build_resnet18(
    num_classes: int, small_input: bool = True, pretrained: bool = False
) -> nn.Module:
    """timm's ResNet-18 with ``num_classes`` outputs.

    Args:
        num_classes: width of the classifier (``fc``).
        small_input: the CIFAR stem for 32x32 inputs: ``conv1`` becomes a 3x3, stride-1,
            padding-1 convolution (64 channels, no bias) and ``maxpool`` is removed
            (``nn.Identity``). ``False`` keeps timm's ImageNet stem (7x7 stride 2 and a max pool).
        pretrained: load timm's ImageNet weights (``resnet18.a1_in1k``) from the local cache;
            never downloads. The classifier is freshly initialised when ``num_classes != 1000``,
            and with ``small_input=True`` so is the new 3x3 stem.

    Raises:
        ValueError: ``num_classes`` is not a positive integer.
        RuntimeError: ``pretrained=True`` and the weights are not cached locally.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}.")
    if pretrained:
        weights = cached_resnet18_weights()
        if weights is None:
            raise RuntimeError(
                f"{_NOT_CACHED}. Looked in {_hf_hub_cache()} and {_torch_hub_checkpoints()}."
            )
        # A 'file' source makes timm read this path and nothing else (no hub or URL access).
        model = timm.create_model(
            "resnet18",
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay={"file": str(weights)},
        )
    else:
        model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    if small_input:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model
