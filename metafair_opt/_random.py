"""Seeded random generators, one way for every module that draws, and replaying a step's
random draws (dropout) exactly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["RngSnapshot", "replaying", "restore_rng", "rng_snapshot", "seeded_generator"]


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from fresh entropy when ``seed`` is None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


RngSnapshot = tuple[torch.device, Tensor, Tensor | None]


def rng_snapshot(device: torch.device) -> RngSnapshot:
    """The CPU generator's state and, for an accelerator, ``device``'s."""
    accelerator = None if device.type == "cpu" else getattr(torch, device.type).get_rng_state(
        device)
    return device, torch.get_rng_state(), accelerator


def restore_rng(snapshot: RngSnapshot) -> None:
    """Put the generators back to ``snapshot``."""
    device, cpu, accelerator = snapshot
    torch.set_rng_state(cpu)
    if accelerator is not None:
        getattr(torch, device.type).set_rng_state(accelerator, device)


@contextmanager
def replaying(snapshot: RngSnapshot) -> Iterator[None]:
    """Run the block with the generators at ``snapshot``; restore their states afterwards."""
    device, _, accelerator = snapshot
    devices = [] if accelerator is None else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type
                               if accelerator is not None else "cuda"):
        restore_rng(snapshot)
        yield
