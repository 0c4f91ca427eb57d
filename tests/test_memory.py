"""Memory: the benchmark's live-tensor accounting is exact, and the meta-steps free the inner
(look-ahead) gradients before the forward that follows them (no timing)."""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafair_opt import GradientAlignmentWrapper, SampleReweighter
from metafair_opt.benchmark import peak_live_mb, step_peak_memory_mb

MB = 2**20


def test_peak_live_mb_is_the_peak_above_what_was_live_before() -> None:
    """Each call frees the 3 MiB the call before kept, allocates 4 and 2 MiB, frees the 4 and
    allocates 1 (kept with the 2): at most 6 MiB live, 3 above the 3 live before. Were the
    frees of the tracked call's tensors not seen, the peak would read 6."""
    kept: list[Tensor] = []

    def step() -> None:
        kept.clear()
        a = torch.empty(4 * MB, dtype=torch.uint8)
        b = torch.empty(2 * MB, dtype=torch.uint8)
        del a
        kept.extend([b, torch.empty(MB, dtype=torch.uint8)])

    assert peak_live_mb(step, "cpu", tracked=1) == pytest.approx(3, abs=1e-3)
    assert sum(t.numel() for t in kept) == 3 * MB


def test_peak_live_mb_of_a_replacement_and_of_a_release() -> None:
    """Replacing a 5 MiB tensor holds old and new at once: 5 MiB above the start. A step that
    only frees never rises above the start: 0."""
    held = [torch.empty(5 * MB, dtype=torch.uint8)]

    def replace() -> None:
        held[0] = torch.empty(5 * MB, dtype=torch.uint8)

    assert peak_live_mb(replace, "cpu", tracked=1) == pytest.approx(5, abs=1e-3)

    pool = [torch.empty(MB, dtype=torch.uint8) for _ in range(8)]

    def free_one() -> None:
        pool.pop()

    assert peak_live_mb(free_one, "cpu", tracked=2) == 0
    assert len(pool) == 5


def test_peak_live_mb_needs_a_tracked_call_on_the_cpu() -> None:
    with pytest.raises(ValueError, match="tracked >= 1"):
        peak_live_mb(lambda: None, "cpu", tracked=0)


@functools.cache
def w1_step_memory(variant: str) -> dict[str, float | None]:
    """W1's ``variant`` step measured in a fresh process, once for the tests that need it."""
    return step_peak_memory_mb("mlp", variant)


def test_step_peak_memory_reports_live_bytes_and_rss_in_a_fresh_process() -> None:
    memory = w1_step_memory("plain")
    assert set(memory) == {"peak_rss_mb", "peak_live_mb"}
    # W1's plain step holds at least its gradients (10,689 floats) and its first hidden
    # activation (256 x 64 floats) at once, and far less than a megabyte more.
    at_least = (10_689 + 256 * 64) * 4 / MB
    assert at_least < memory["peak_live_mb"] < 1.0
    # The pages its tensors need are new to a process whose free memory went back to the
    # system before the step (measured 0.35 to 0.45 MB; a step not measured reads 0).
    assert memory["peak_rss_mb"] >= 0.5 * memory["peak_live_mb"]


def test_meta_every_5_is_measured_on_a_weight_updating_step() -> None:
    """reweighter_every_5's memory is that of its costliest step, a weight update (the same
    live bytes as the reweighter's), not of a plain weighted step between updates."""
    every_5, every_step, plain = (w1_step_memory(v)
                                  for v in ("reweighter_every_5", "reweighter", "plain"))
    assert every_5["peak_live_mb"] == every_step["peak_live_mb"]
    assert every_5["peak_live_mb"] > plain["peak_live_mb"] + 0.1  # measured 0.39 and 0.21
    assert every_5["peak_rss_mb"] >= 0.5 * every_5["peak_live_mb"]


_RSS_CHILD = """
import sys, torch
from metafair_opt.benchmark import peak_rss_mb
earlier = torch.ones(2**26)  # 256 MB touched, then freed: the process's peak so far
del earlier
size_mb = int(sys.argv[1])
print(peak_rss_mb(lambda: torch.ones(size_mb * 2**18).sum()))  # size_mb MB of floats
"""


@pytest.mark.parametrize("size_mb", [0, 64])
def test_peak_rss_is_the_steps_own_peak_in_a_fresh_process(size_mb: int) -> None:
    """A step that touches 64 MB reads about 64 MB (the interpreter's own jitter is a few), and
    one that allocates nothing about 0, although the process touched 256 MB before: the peak
    is reset before the step, and memory freed earlier is not counted."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(size_mb)],
                            capture_output=True, text=True, check=True)
    assert float(result.stdout.strip()) == pytest.approx(size_mb, abs=4)


def _record_meta_gradients(monkeypatch) -> list[weakref.ref]:
    """Weak references to every gradient computed with create_graph=True from now on."""
    made: list[weakref.ref] = []
    grad = torch.autograd.grad

    def recording(*args, **kwargs):
        grads = grad(*args, **kwargs)
        if kwargs.get("create_graph"):
            made.extend(weakref.ref(g) for g in grads if g is not None)
        return grads

    monkeypatch.setattr(torch.autograd, "grad", recording)
    return made


def _alive_at_forward(model: nn.Module, call: int, made: list[weakref.ref]) -> list[int]:
    """Counts, at the start of the model's ``call``-th forward (from 1), how many of the
    recorded gradients are still alive (filled in by a pre-hook)."""
    calls: list[int] = []
    alive: list[int] = []

    def hook(_module, _args) -> None:
        calls.append(1)
        if len(calls) == call:
            gc.collect()
            alive.append(sum(r() is not None for r in made))

    model.register_forward_pre_hook(hook)
    return alive


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_alignment_frees_each_inner_gradient_before_the_next_forward(
        monkeypatch, inner_steps: int) -> None:
    """The differentiable SGD update saves nothing of the gradient it applies, so the inner
    gradients are gone by the query forward (a fused torch._foreach_add kept them alive: a
    copy of the model's gradients per inner step at the outer backward's peak)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    aligner = GradientAlignmentWrapper(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=lambda out, y: F.mse_loss(out.squeeze(-1), y), inner_lr=0.1,
        inner_steps=inner_steps)
    made = _record_meta_gradients(monkeypatch)
    alive = _alive_at_forward(model, inner_steps + 1, made)  # the query forward
    aligner.step(support=(torch.randn(6, 5), torch.randn(6)),
                 query=(torch.randn(10, 5), torch.randn(10)))
    assert len(made) == 4 * inner_steps  # the gradients were recorded
    assert alive == [0]


def test_reweighter_frees_the_lookahead_gradient_before_the_validation_forward(
        monkeypatch) -> None:
    """The reverse mode's look-ahead gradient (create_graph=True) is not kept by the
    look-ahead update through the validation forward and the double backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=20,
                          loss_fn=F.cross_entropy, weight_grad_mode="reverse")
    made = _record_meta_gradients(monkeypatch)
    alive = _alive_at_forward(model, 2, made)  # the validation forward
    before = rw.weights.clone()
    rw.step(torch.randn(8, 5), torch.randint(0, 3, (8,)), torch.arange(8),
            val=(torch.randn(10, 5), torch.randint(0, 3, (10,)), torch.arange(10) % 2))
    assert len(made) == 4 and alive == [0]
    assert not torch.equal(rw.weights, before)  # a weight-updating step ran


@pytest.mark.parametrize("repeats", [False, True])
def test_reweighter_keeps_the_row_inverse_only_for_repeated_rows(monkeypatch, index_check,
                                                                 repeats: bool) -> None:
    """Without repeated rows the step addresses the table in batch order: the sorted rows and
    the inverse that a check by sorting computes are gone by the validation forward (they were
    kept all step, two indices per sample), and a check on the host makes none; with repeats
    the inverse is still needed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=20,
                          loss_fn=F.cross_entropy, weight_grad_mode="reverse")
    made: list[weakref.ref] = []
    unique = torch.unique

    def recording(*args, **kwargs):
        result = unique(*args, **kwargs)
        if kwargs.get("return_inverse") and args[0].dtype == torch.int64 and args[0].numel() == 8:
            made.extend(weakref.ref(t) for t in result)  # the step's range check
        return result

    monkeypatch.setattr(torch, "unique", recording)
    alive = _alive_at_forward(model, 2, made)  # the validation forward
    idx = torch.tensor([3, 1, 3, 7, 0, 9, 1, 4]) if repeats else torch.arange(8)
    rw.step(torch.randn(8, 5), torch.randint(0, 3, (8,)), idx,
            val=(torch.randn(10, 5), torch.randint(0, 3, (10,)), torch.arange(10) % 2))
    if not repeats and index_check == "on the host":
        assert made == []
        return
    assert len(made) == 2
    assert alive == ([2] if repeats else [0])
