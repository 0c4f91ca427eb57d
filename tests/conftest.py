"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64_default():
    """Float64 as torch's default dtype for one test (gradient checks need its precision)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def fresh_torch_compile():
    """torch.compile's caches cleared before and after one test that compiles a model itself.

    They are kept per code object, so they outlive the model: once a compiled model has been
    fed forward-mode dual tensors, torch.compile runs the frames it broke on eagerly from then
    on, for every later model of the same classes, and a later test would compile nothing.
    """
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["on the host", "by sorting"])
def index_check(request, monkeypatch):
    """Each way SampleReweighter checks a batch's indices (range, repeats): small CPU batches
    as a Python list, others with torch.unique (forced here by a host limit of 0 rows)."""
    if request.param == "by sorting":
        monkeypatch.setattr("metafair_opt.reweighting._HOST_CHECK_ROWS", 0)
    return request.param


@pytest.fixture(scope="session")
def session_compile_cache(tmp_path_factory) -> str:
    """A folder for Inductor's compile cache, empty when this test session starts."""
    return str(tmp_path_factory.mktemp("inductor-cache"))


@pytest.fixture
def own_compile_cache(session_compile_cache, monkeypatch) -> None:
    """Inductor's cache in :func:`session_compile_cache` for one test, so that a test of what
    the cache finds does not find graphs that earlier runs of the suite left in the default
    one. Shared between such tests: a new cache folder costs about 6 s of set-up on the first
    compile."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", session_compile_cache)
