"""metafair_opt._forward_replay: a forward-mode pass that takes a recorded forward's
convolution outputs as its primal values.

Every check is against PyTorch's own forward-mode AD of the same model (float64): primal and
tangent of the output, with the record taken, with a record that does not line up, with an
output written in place, and with batch norm's tangent for each combination of dual inputs.
Then the reweighter's forward-mode weight gradient on a residual CNN against the same step with
PyTorch's jvp.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref
from contextlib import nullcontext

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import metafair_opt._forward_replay as forward_replay
import metafair_opt.reweighting as reweighting
from metafair_opt._forward_replay import PrimalRecord, recording_primals, replaying_primals
from tests.helpers import spy_on_replay_takes, two_reweighting_steps

pytestmark = pytest.mark.usefixtures("float64_default")  # from tests/conftest.py


class Block(nn.Module):
    """A residual block as timm's: conv, BN, in-place ReLU, conv, BN, += shortcut, ReLU."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.down = nn.Sequential(nn.Conv2d(channels, 4, 1, stride=stride), nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        return F.relu(out, inplace=True)


def residual_cnn(seed: int = 0, classes: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
                         Block(3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, classes))


def dual_forward(model: nn.Module, x: Tensor, tangents: dict[str, Tensor], context) -> tuple:
    """Primal and tangent of ``model(x)`` with the named parameters dual along ``tangents`` (the
    others plain), on a copy of the buffers, inside ``context``."""
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with fwad.dual_level(), context:
        values = {n: fwad.make_dual(p.detach(), tangents[n]) if n in tangents else p.detach()
                  for n, p in params.items()}
        primal, tangent = fwad.unpack_dual(functional_call(model, (values, buffers), (x,)))
        return primal.clone(), tangent.clone()


def recorded(model: nn.Module, x: Tensor) -> tuple[PrimalRecord, Tensor]:
    """A record of ``model(x)`` (buffers on a copy) and the output, whose graph holds the
    recorded tensors as a training forward's would."""
    record = PrimalRecord()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with recording_primals(record):
        output = functional_call(model, (dict(model.named_parameters()), buffers), (x,))
    return record, output


def directions(model: nn.Module, seed: int = 5) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def batch(seed: int = 1, rows: int = 6) -> Tensor:
    return torch.randn(rows, 2, 6, 6, generator=torch.Generator().manual_seed(seed))


def assert_same(got: tuple[Tensor, Tensor], expected: tuple[Tensor, Tensor]) -> None:
    assert expected[1].abs().max() > 1e-3  # a tangent that means something
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def assert_replay_matches_pytorch(model: nn.Module, x: Tensor, record: PrimalRecord,
                                  reused: int, tangents: dict[str, Tensor] | None = None) -> None:
    """The dual pass replaying ``record`` takes ``reused`` outputs and gives PyTorch's jvp."""
    tangents = directions(model) if tangents is None else tangents
    got = dual_forward(model, x, tangents, replaying_primals(record))
    assert record.reused == reused
    assert_same(got, dual_forward(model, x, tangents, nullcontext()))


def test_replay_takes_every_recorded_output_and_matches_pytorchs_jvp() -> None:
    model, x = residual_cnn(), batch()
    tangents = directions(model)
    expected = dual_forward(model, x, tangents, nullcontext())
    record, _ = recorded(model, x)
    assert len(record.outputs) == 4
    got = dual_forward(model, x, tangents, replaying_primals(record))
    assert record.reused == 4
    assert_same(got, expected)
    assert record.outputs == []  # emptied on exit


def test_one_dimensional_convolutions_are_taken_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Conv1d(3, 2, 2),
                          nn.Flatten())
    x = torch.randn(5, 2, 7, generator=torch.Generator().manual_seed(1))
    tangents = directions(model)
    record, _ = recorded(model, x)
    got = dual_forward(model, x, tangents, replaying_primals(record))
    assert record.reused == 2
    assert_same(got, dual_forward(model, x, tangents, nullcontext()))


def test_the_primal_values_are_the_recorded_ones() -> None:
    """A recorded output swapped for other values (of the version it was recorded at) shows
    up in the replay's output, so the replay really takes it instead of computing it."""
    model, x = residual_cnn(), batch()
    record, _ = recorded(model, x)
    last = record.outputs[-1]
    output = last.output()
    noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(9))
    swapped = output.detach() + noise
    record.outputs[-1] = dataclasses.replace(last, output=weakref.ref(swapped), version=0)
    plain = dual_forward(model, x, directions(model), nullcontext())[0]
    replayed = dual_forward(model, x, directions(model), replaying_primals(record))[0]
    assert (replayed - plain).abs().max() > 1e-3


def test_a_record_that_does_not_line_up_is_not_used() -> None:
    """Recorded on one model, replayed on another of the same shape: nothing is taken (other
    weights), and the result is the second model's jvp."""
    first, second, x = residual_cnn(seed=0), residual_cnn(seed=1), batch()
    record, _ = recorded(first, x)
    assert_replay_matches_pytorch(second, x, record, reused=0)


def test_after_a_call_that_does_not_line_up_nothing_is_taken() -> None:
    """The second convolution is the same module in both models, but its input comes from
    another first convolution: once the first call does not line up, the second (same weight,
    same input shape) must not be taken either."""
    torch.manual_seed(0)
    shared = nn.Conv2d(3, 2, 3)
    first = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), shared, nn.BatchNorm2d(2),
                          nn.Flatten())
    second = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), shared, nn.BatchNorm2d(2),
                           nn.Flatten())
    x = batch()
    record, _ = recorded(first, x)
    assert_replay_matches_pytorch(second, x, record, reused=0)


def test_a_weight_changed_in_place_since_the_recording_is_not_taken() -> None:
    model, x = residual_cnn(), batch()
    record, _ = recorded(model, x)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    assert_replay_matches_pytorch(model, x, record, reused=0)


def test_another_batch_size_is_not_used() -> None:
    model = residual_cnn()
    record, _ = recorded(model, batch(rows=6))
    x = batch(seed=2, rows=5)
    assert_replay_matches_pytorch(model, x, record, reused=0)


def test_a_weight_of_another_shape_on_the_same_storage_is_not_taken() -> None:
    """The replayed convolution's weight starts where the recorded one does (a slice of it):
    same storage, other shape, so nothing is taken."""
    torch.manual_seed(0)
    full = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    x = batch()
    record, _ = recorded(full, x)
    sliced = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten())
    sliced[0].weight = nn.Parameter(full[0].weight[:3])
    assert sliced[0].weight.data_ptr() == full[0].weight.data_ptr()
    assert_replay_matches_pytorch(sliced, x, record, reused=0)


def test_a_weight_on_the_same_storage_with_other_strides_is_not_taken() -> None:
    """A transposed view of the recorded weight: same storage and shape, other values."""
    torch.manual_seed(0)
    first = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.Flatten())
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    record, _ = recorded(first, x)
    second = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.Flatten())
    second[0].weight = nn.Parameter(first[0].weight.transpose(0, 1))
    assert second[0].weight.data_ptr() == first[0].weight.data_ptr()
    assert second[0].weight.shape == first[0].weight.shape
    assert_replay_matches_pytorch(second, x, record, reused=0)


def test_a_weight_recomputed_with_the_same_values_is_taken() -> None:
    """A parametrization builds the weight afresh at every call (other storage, same values)."""

    class Doubled(nn.Module):
        def forward(self, weight: Tensor) -> Tensor:
            return 2 * weight

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    nn.utils.parametrize.register_parametrization(conv, "weight", Doubled())
    model = nn.Sequential(conv, nn.BatchNorm2d(3), nn.Flatten())
    x = batch()
    record, _ = recorded(model, x)
    assert_replay_matches_pytorch(model, x, record, reused=1)


@pytest.mark.parametrize("batched", [True, False])
def test_a_convolution_with_only_its_bias_dual(batched: bool) -> None:
    """A frozen weight and a trainable bias (the tangent is the bias tangent, broadcast)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Tanh(), nn.Conv2d(5, 2, 2))
    x = batch()
    if not batched:
        x = x[0]
    tangents = {n: t for n, t in directions(model).items() if n.endswith("bias")}
    record, _ = recorded(model, x)
    got = dual_forward(model, x, tangents, replaying_primals(record))
    assert_same(got, dual_forward(model, x, tangents, nullcontext()))


def test_the_record_keeps_no_output_alive() -> None:
    """Weak references: an output batch norm saves for its backward is there to be taken; one
    only an out-of-place ReLU read (it saves its own result) is freed, and computed again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3), nn.ReLU(),
                          nn.Conv2d(3, 2, 2), nn.BatchNorm2d(2), nn.Flatten())
    x = batch()
    record, _graph = recorded(model, x)  # the graph alive, as the training forward's is
    gc.collect()
    assert [entry.output() is not None for entry in record.outputs] == [True, False, True]
    tangents = directions(model)
    got = dual_forward(model, x, tangents, replaying_primals(record))
    assert record.reused == 2  # the freed one computed, the one after it still taken
    assert_same(got, dual_forward(model, x, tangents, nullcontext()))


def test_an_output_written_in_place_is_not_taken() -> None:
    """conv -> in-place ReLU (no batch norm between): the recorded output is changed in place,
    so the replay computes it; the convolutions after it are still taken."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3),
                          nn.ReLU(inplace=True), nn.Conv2d(3, 2, 2), nn.Flatten())
    x = batch()
    record, _graph = recorded(model, x)
    assert_replay_matches_pytorch(model, x, record, reused=2)


@pytest.fixture
def routed_batch_norms(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the batch norm calls the replay computes itself (one entry each)."""
    calls: list[int] = []
    original = forward_replay._batch_norm

    def counted(*args):
        calls.append(1)
        return original(*args)
    monkeypatch.setattr(forward_replay, "_batch_norm", counted)
    return calls


@pytest.mark.parametrize(("affine", "dual"), [
    (True, "input"), (True, "weight"), (True, "bias"), (True, "weight_and_bias"),
    (True, "input_and_weight"), (True, "input_and_bias"), (True, "all"),
    (False, "input"), (False, "all")])
def test_batch_norm_tangent_matches_pytorchs(affine: bool, dual: str,
                                             routed_batch_norms: list[int]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, affine=affine), nn.Tanh(),
                          nn.Flatten())
    with torch.no_grad():
        if affine:
            model[1].weight.normal_()
            model[1].bias.normal_()
    conv = ["0.weight", "0.bias"]  # dual convolution parameters make the input dual
    names = {"input": conv, "weight": ["1.weight"], "bias": ["1.bias"],
             "weight_and_bias": ["1.weight", "1.bias"], "input_and_weight": [*conv, "1.weight"],
             "input_and_bias": [*conv, "1.bias"],
             "all": [n for n, _ in model.named_parameters()]}[dual]
    tangents = {n: t for n, t in directions(model).items() if n in names}
    x = batch()
    got = dual_forward(model, x, tangents, replaying_primals(PrimalRecord()))
    assert routed_batch_norms == [1]
    assert_same(got, dual_forward(model, x, tangents, nullcontext()))


def test_batch_norm_in_the_replay_updates_running_statistics_as_pytorch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=0.3))
    tangents, x = directions(model), batch()
    stats = []
    for context in (nullcontext(), replaying_primals(PrimalRecord())):
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        with fwad.dual_level(), context:
            values = {n: fwad.make_dual(p.detach(), tangents[n])
                      for n, p in model.named_parameters()}
            functional_call(model, (values, buffers), (x,))
        stats.append(buffers)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(stats[0][name], stats[1][name])
    assert not torch.equal(stats[0]["1.running_mean"], model[1].running_mean)


def test_without_a_record_nothing_is_routed() -> None:
    assert isinstance(replaying_primals(None), nullcontext)
    assert isinstance(recording_primals(None), nullcontext)


# ------------------------------------------------------------------------ in the reweighter
def reweighter_run(monkeypatch: pytest.MonkeyPatch, replay: bool, model: nn.Module | None = None,
                   mode: str = "forward", **options) -> tuple:
    """Two reweighting steps (forward mode unless ``mode`` says otherwise) on the residual CNN
    or ``model``; ``replay=False`` swaps the replay for PyTorch's own jvp. Returns the weights,
    the model's state and how many recorded outputs were taken."""
    with monkeypatch.context() as patch:
        taken = spy_on_replay_takes(patch)
        if not replay:
            patch.setattr(reweighting, "recording_primals", lambda record: nullcontext())
            patch.setattr(reweighting, "replaying_primals", lambda record: nullcontext())
        model = model if model is not None else residual_cnn(seed=4, classes=3)
        weights, state = two_reweighting_steps(model, lambda seed, rows: batch(seed, rows),
                                               weight_grad_mode=mode, **options)
    return weights, state, sum(taken)


@pytest.mark.parametrize("options", [{}, {"recompute_forward": True}],
                         ids=["kept", "recompute_forward"])
def test_reweighter_forward_mode_with_replay_matches_pytorchs_jvp(
        monkeypatch: pytest.MonkeyPatch, options: dict, routed_batch_norms: list[int]) -> None:
    w_got, state_got, taken = reweighter_run(monkeypatch, replay=True, **options)
    # Four batch norms a step in the forward-mode pass, two steps.
    assert len(routed_batch_norms) == 8
    w_ref, state_ref, _ = reweighter_run(monkeypatch, replay=False, **options)
    assert len(routed_batch_norms) == 8
    # Four convolutions a step, two steps; recompute_forward frees them, so none is taken.
    assert taken == (0 if options else 8)
    assert w_ref.abs().max() > 1e-3  # the weights moved, so the comparison means something
    assert torch.allclose(w_got, w_ref, rtol=0, atol=1e-12)
    for a, b in zip(state_got, state_ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


class RunningCentre(nn.Module):
    """Subtracts a running mean of its input in training mode too (its output reads a buffer
    the forward updates), as running normalisers do."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("centre", torch.linspace(-1.0, 1.0, channels))

    def forward(self, x: Tensor) -> Tensor:
        out = x - self.centre.view(1, -1, 1, 1)
        self.centre.mul_(0.5).add_(x.detach().mean((0, 2, 3)), alpha=0.5)
        return out


def test_the_forward_mode_pass_sees_the_buffers_the_training_forward_saw(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reverse mode differentiates the training forward itself, so it is the reference; the
    forward-mode pass must run on the buffers that forward started from (not on those the
    validation forward has moved), or its tangents belong to other activations."""
    def model() -> nn.Module:
        torch.manual_seed(4)
        return nn.Sequential(nn.Conv2d(2, 3, 3), RunningCentre(3), nn.Tanh(), nn.Conv2d(3, 3, 3),
                             nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    w_fwd, state_fwd, taken = reweighter_run(monkeypatch, replay=True, model=model())
    w_rev, state_rev, _ = reweighter_run(monkeypatch, replay=True, model=model(), mode="reverse")
    # The second convolution's output each step (batch norm keeps it); the first one's only
    # feeds a subtraction, which keeps nothing, so it is freed and computed again.
    assert taken == 2
    assert w_rev.abs().max() > 1e-3
    assert torch.allclose(w_fwd, w_rev, rtol=0, atol=1e-12)
    for a, b in zip(state_fwd, state_rev):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
