"""The benchmark's CUDA branches, run without a GPU: ``torch.cuda``'s synchronisation and
caching-allocator statistics replaced by a fake device whose work is asynchronous (a step only
queues it; ``synchronize`` runs the clock forward by what is queued) and whose allocator keeps
the statistics the real one reports."""

from __future__ import annotations

import pytest
import torch

import metafair_opt.benchmark as bench
from metafair_opt.benchmark import live_bytes_growth, peak_live_mb, time_interleaved

MB = 2**20


class FakeGpu:
    """Queued seconds of work, a host clock, and allocated bytes with their peak."""

    def __init__(self) -> None:
        self.clock = 0.0
        self.queued = 0.0
        self.allocated = 0
        self.peak = 0

    def launch(self, seconds: float) -> None:
        self.queued += seconds  # the host goes on at once, as with a kernel launch

    def synchronize(self, device=None) -> None:
        self.clock += self.queued
        self.queued = 0.0

    def alloc(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)

    def free(self, nbytes: int) -> None:
        self.allocated -= nbytes

    def memory_allocated(self, device=None) -> int:
        return self.allocated

    def max_memory_allocated(self, device=None) -> int:
        return self.peak

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak = self.allocated


@pytest.fixture
def gpu(monkeypatch) -> FakeGpu:
    fake = FakeGpu()
    for name in ("synchronize", "memory_allocated", "max_memory_allocated",
                 "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: fake.clock)
    return fake


def test_on_cuda_each_step_is_timed_to_the_end_of_its_queued_work(gpu: FakeGpu) -> None:
    steps = {"a": lambda: gpu.launch(2.0), "b": lambda: gpu.launch(3.0)}
    assert time_interleaved(steps, repeats=5, warmup=1, device="cuda") == {"a": 2000.0,
                                                                            "b": 3000.0}
    # Without the synchronisation the host clock would only see the launches.
    assert time_interleaved(steps, repeats=5, warmup=1, device="cpu") == {"a": 0.0, "b": 0.0}


def test_on_cuda_the_peak_is_the_allocator_s_above_what_was_held_before(gpu: FakeGpu) -> None:
    """As the CPU test of the profiler's accounting: each call frees the 3 MiB the call before
    kept, allocates 4 and 2 MiB, frees the 4 and allocates 1 (kept with the 2), so 3 MiB above
    the 3 held before. The first call also allocates and frees 10 MiB (a warm-up's workspace):
    a peak statistic not reset before the measured call would read 7."""
    calls = []

    def step() -> None:
        if calls:
            gpu.free(3 * MB)
        else:
            gpu.alloc(10 * MB)
            gpu.free(10 * MB)
        calls.append(len(calls))
        gpu.alloc(4 * MB)
        gpu.alloc(2 * MB)
        gpu.free(4 * MB)
        gpu.alloc(MB)

    assert peak_live_mb(step, "cuda", tracked=2) == 3.0
    assert len(calls) == 3  # two tracked calls, then the measured one
    # On CUDA the allocator's statistics need no tracked call.
    assert peak_live_mb(step, "cuda", tracked=0) == 3.0


def test_on_cuda_growth_is_the_allocator_s_bytes_after_the_last_call_minus_the_first(
        gpu: FakeGpu) -> None:
    def leaking() -> None:
        """A temporary whose peak the first call sets, then 4 bytes kept by each call."""
        size = 10 * MB if gpu.allocated == 0 else 4 * MB
        gpu.alloc(size)
        gpu.free(size)
        gpu.alloc(4)

    assert live_bytes_growth(leaking, first=10, last=200, device="cuda") == 190 * 4

    def tidy() -> None:
        gpu.alloc(4 * MB)
        gpu.free(4 * MB)

    assert live_bytes_growth(tidy, first=10, last=200, device="cuda") == 0


def test_the_agreement_check_steps_in_full_float32_precision_on_cuda() -> None:
    """cuDNN allows TensorFloat-32 by default, whose rounding would be read as disagreement:
    each checked step runs with both settings at "ieee", which are put back afterwards, also
    when the step fails; on the CPU they are left alone."""
    settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [s.fp32_precision for s in settings]
    seen: list[list[str]] = []
    model = torch.nn.Linear(2, 1)

    def step() -> None:
        seen.append([s.fp32_precision for s in settings])
        for p in model.parameters():
            p.grad = torch.ones_like(p)

    built = bench._Built(step=step, model=model)
    bench._one_step(built, torch.device("cuda"))
    bench._one_step(built, torch.device("cpu"))
    assert seen == [["ieee", "ieee"], before]
    assert [s.fp32_precision for s in settings] == before

    def failing() -> None:
        raise RuntimeError("a failed step")

    with pytest.raises(RuntimeError, match="a failed step"):
        bench._one_step(bench._Built(step=failing, model=model), torch.device("cuda"))
    assert [s.fp32_precision for s in settings] == before
