"""Tensors an autograd graph saves as recipes, computed again when the graph needs them.

A :class:`Recipe` stands in for a tensor that a graph would save: how to compute it again from
tensors that graph keeps anyway. A tensor carries its recipe as an attribute; while
:func:`saving_recipes` is active, the saved-tensor hooks save the recipe in place of such a
tensor (if it was not changed in place since), and every other tensor detached with autograd's
own check that it was not changed in place before use (autograd skips that check for tensors
saved through hooks).

A recipe's value is computed at the first unpack of a pass over the graph and kept until that
pass has unpacked each of its saves, then dropped; a pass that unpacks only some saves keeps it
for the graph's lifetime, never more than saving the tensor would have kept. A recipe computed
from another (see :meth:`Recipe.source_value`) computes each once per pass where a backward
unpacks the dependants before their sources, as a sequential network's does; in another order
a source may be computed twice, its value then kept like that of a partial pass. A recipe can also
be kept as the tensor itself until :meth:`Recipe.release` (for a graph that is differentiated
once before memory gets tight). A recipe checks the versions of the tensors it computes from;
a change through ``.data``, which no version records, is not seen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

__all__ = ["RECIPE", "Recipe", "check_version", "pack", "recipes_possible", "recipes_wanted",
           "saving_recipes", "unpack"]

#: The attribute through which a tensor carries its recipe.
RECIPE = "_metafair_opt_recipe"


def check_version(t: Tensor, version: int) -> None:
    """Autograd's check on a saved tensor, which it skips for tensors saved through hooks."""
    if t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
            f"expected version {version} instead. Change it out of place (or clone it) "
            "before the graph is differentiated.")


class Recipe(ABC):
    """How to compute a saved tensor again; subclasses say how (:meth:`evaluate`)."""

    __slots__ = ("inputs", "kept", "pending", "saves", "value", "version", "versions")

    def __init__(self, t: Tensor, inputs: tuple[Tensor | None, ...] = (),
                 version: int | None = None) -> None:
        """``t`` is the tensor the recipe stands in for (``version``: the one at which it
        does, if not ``t``'s current one); ``inputs`` the tensors it is computed from."""
        self.version = t._version if version is None else version
        # Detached: the recipe references values, never a graph.
        self.inputs = tuple(None if x is None else x.detach() for x in inputs)
        self.versions = tuple(0 if x is None else x._version for x in inputs)
        self.saves = self.pending = 0
        self.value: Tensor | None = None
        self.kept = False

    @abstractmethod
    def evaluate(self) -> Tensor:
        """The tensor's value, computed again (no graph)."""

    def checked_inputs(self) -> tuple[Tensor | None, ...]:
        """The inputs, after autograd's check that none was changed in place since."""
        for x, version in zip(self.inputs, self.versions):
            if x is not None:
                check_version(x, version)
        return self.inputs

    def live_for(self, t: Tensor) -> bool:
        """Whether this recipe still gives ``t``'s value (nothing changed it in place since)."""
        return t._version == self.version

    def save(self, t: Tensor) -> Any:
        """What a graph saves for ``t``: this recipe, or ``t`` itself if it changed since."""
        if not self.live_for(t):
            return _save(t)
        self.saves += 1
        self.pending += 1
        return self

    def keep(self, t: Tensor) -> None:
        """Give the unpacks ``t`` itself until :meth:`release`."""
        self.value, self.kept = t.detach(), True

    def release(self) -> None:
        """Drop the kept tensor: from now on the value is computed again."""
        if self.kept:
            self.value, self.kept, self.pending = None, False, self.saves

    def unpack(self) -> Tensor:
        """The value for one unpack of a save."""
        value = self.value
        if value is None:
            value = self.evaluate()
        if self.kept:
            check_version(value, self.version)
            return value
        self.pending -= 1
        if self.pending > 0:
            self.value = value
        else:  # the pass is done: drop the value, count the next pass's unpacks afresh
            self.value, self.pending = None, self.saves
        return value

    def source_value(self) -> tuple[Tensor, bool]:
        """The value for another recipe's computation, and whether the caller may write to it
        in place (it is kept for this pass's own unpacks when the graph saves this one too:
        its dependants come first in a backward pass)."""
        value = self.value
        if value is not None:
            return value, False
        value = self.evaluate()
        if self.pending > 0:
            self.value = value
        return value, self.pending == 0


def _save(t: Tensor) -> tuple[Tensor, int]:
    # Detached, as saved-tensor hooks must: a node saving its own output would otherwise hold
    # itself through it (a cycle that is never collected); autograd attaches the edge again.
    return t.detach(), t._version


def pack(t: Tensor) -> Any:
    """The saved-tensor hooks' pack: the tensor's recipe, or the tensor detached."""
    recipe = getattr(t, RECIPE, None)
    return _save(t) if recipe is None else recipe.save(t)


def unpack(packed: Any) -> Tensor:
    """The saved-tensor hooks' unpack."""
    if isinstance(packed, Recipe):
        return packed.unpack()
    t, version = packed
    check_version(t, version)
    return t


def recipes_possible() -> bool:
    """Whether saved-tensor hooks of ours would take effect: not where hooks are disabled, nor
    where others are active (``save_on_cpu``, say: theirs decide what is kept)."""
    return (torch._C._autograd._saved_tensors_hooks_is_enabled()
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


def recipes_wanted() -> bool:
    """Whether the innermost saved-tensor hooks are ours (they are thread-local state that
    autograd carries to the threads running a backward)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and hooks[0] is pack


def saving_recipes() -> Any:
    """The saved-tensor hooks (see the module's docstring)."""
    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
