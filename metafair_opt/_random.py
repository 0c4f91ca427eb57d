"""Seeded random generators, one way for every module that draws."""

from __future__ import annotations

import torch

__all__ = ["seeded_generator"]


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from fresh entropy when ``seed`` is None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
