"""GradientAlignmentWrapper(recompute_support=True): the same training as the default step,
computed by Hessian-vector products on a recomputed support pass, with a lower memory peak.

The meta-gradient itself is checked against hand-written autograd, ``higher`` and finite
differences in tests/test_alignment_gradients.py (both ways of computing it); here: whole
training runs with BatchNorm, dropout and optimizer state, parameters no loss reaches, the
memory peak, and the options it cannot be combined with.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn

from metafair_opt import GradientAlignmentWrapper
from metafair_opt.benchmark import peak_live_mb
from tests.helpers import TwoHeads

pytestmark = pytest.mark.usefixtures("float64_default")  # from tests/conftest.py


def noisy_model() -> nn.Module:
    """BatchNorm (buffers that a forward moves) and dropout (random draws to replay)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3),
                         nn.Linear(8, 3))


def bce(output: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(output.squeeze(-1), target)


def batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(7, 5, generator=g), torch.randint(0, 3, (7,), generator=g)),
            (torch.randn(9, 5, generator=g), torch.randint(0, 3, (9,), generator=g)))


def train(recompute: bool, inner_steps: int, seed: int = 5, steps: int = 3):
    """A few steps with momentum; the final state, gradients, results and the generator's
    next draw (the step must leave torch's random state as the default step does)."""
    model = noisy_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    aligner = GradientAlignmentWrapper(model, optimizer, F.cross_entropy, inner_lr=0.5,
                                       inner_steps=inner_steps, track_alignment=True,
                                       recompute_support=recompute)
    support, query = batches()
    torch.manual_seed(seed)
    results = []
    for _ in range(steps):
        aligner.zero_grad()
        results.append(aligner.step(support, query))
    return (model.state_dict(), [p.grad.clone() for p in model.parameters()], results,
            torch.rand(3))


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_recompute_support_trains_the_same_model(inner_steps: int) -> None:
    kept = train(recompute=False, inner_steps=inner_steps)
    recomputed = train(recompute=True, inner_steps=inner_steps)
    for key, value in kept[0].items():
        torch.testing.assert_close(recomputed[0][key], value, rtol=1e-12, atol=1e-14)
    for a, b in zip(kept[1], recomputed[1]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
    for a, b in zip(kept[2], recomputed[2]):
        assert b.query_loss == pytest.approx(a.query_loss, rel=1e-12)
        assert b.support_losses == pytest.approx(a.support_losses, rel=1e-12)
        assert b.alignment == pytest.approx(a.alignment, rel=1e-10)
    assert torch.equal(kept[3], recomputed[3])  # the same random draws, no more, no fewer
    assert int(kept[0]["1.num_batches_tracked"]) == 3  # once per step, as by default
    # The check has teeth: other dropout masks give another gradient, so a recomputation
    # that drew fresh masks would have failed above.
    other = train(recompute=False, inner_steps=inner_steps, seed=6)
    assert max(float((a - b).abs().max()) for a, b in zip(kept[1], other[1])) > 1e-3


def test_parameters_no_loss_reaches_get_no_gradient_as_by_default() -> None:
    grads = {}
    for recompute in (False, True):
        torch.manual_seed(3)
        model = TwoHeads(outputs=2)
        aligner = GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                           F.cross_entropy, inner_lr=0.4, inner_steps=2,
                                           recompute_support=recompute)
        support, query = ((torch.randn(6, 3), torch.randint(0, 2, (6,))),
                          (torch.randn(5, 3), torch.randint(0, 2, (5,))))
        aligner.step(support, query)
        grads[recompute] = {n: p.grad for n, p in model.named_parameters()}
    assert grads[True]["unused.weight"] is None and grads[True]["unused.bias"] is None
    for name, value in grads[False].items():
        if value is not None:
            torch.testing.assert_close(grads[True][name], value, rtol=1e-10, atol=1e-14)


def test_recompute_support_lowers_the_peak_of_live_tensors() -> None:
    """A large batch through narrow layers, so that saved activations dominate: by default the
    peak holds the support pass's graph (kept for the second-order backward) and the query
    pass's together; recomputed, one at a time. Measured: 17.0 against 12.0 MB. (With as many
    support as query rows the support's second-order pass alone is as large as both
    together were on this model: no gain.)"""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    x = torch.randn(4096, 32)
    y = torch.randint(0, 2, (4096,))
    peaks = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                              nn.Linear(256, 2))
        aligner = GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=1e-3),
                                           F.cross_entropy, recompute_support=recompute)

        def step(aligner=aligner) -> None:
            aligner.zero_grad()
            aligner.step((x[:1024], y[:1024]), (x[1024:], y[1024:]))
        peaks[recompute] = peak_live_mb(step)
    assert peaks[True] < 0.8 * peaks[False], peaks


@pytest.mark.parametrize(("options", "clash"), [
    ({"first_order": True}, "first_order=True (no second-order graph to recompute)"),
    ({"inner_optimizer": torchopt.sgd(0.1, momentum=0.9)},
     "a custom inner_optimizer (it needs the default SGD inner step)"),
    ({"compiled": True}, "compiled=True"),
])
def test_options_recompute_support_cannot_serve_are_refused(options: dict, clash: str) -> None:
    model = noisy_model()
    with pytest.raises(ValueError, match=re.escape(
            f"recompute_support=True cannot be combined with {clash}. It recomputes the "
            "second-order step of the default SGD inner optimizer in eager mode: drop "
            "recompute_support, or use first_order=False, no inner_optimizer and "
            "compiled=False.")):
        GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 F.cross_entropy, recompute_support=True, **options)


def test_recompute_support_is_not_part_of_the_saved_configuration() -> None:
    """It changes how the step is computed, not what: a checkpoint moves between the two
    without a configuration warning."""
    model = noisy_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kept = GradientAlignmentWrapper(model, optimizer, F.cross_entropy)
    recomputed = GradientAlignmentWrapper(model, optimizer, F.cross_entropy,
                                          recompute_support=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recomputed.load_state_dict(kept.state_dict())
    assert "recompute_support" not in kept.config()


def test_inner_steps_zero_ignores_recompute_support() -> None:
    """Nothing to recompute: the plain step on the query set, as without the option."""
    finals = []
    for recompute in (False, True):
        torch.manual_seed(2)
        model = nn.Linear(3, 1)
        aligner = GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                           bce, inner_steps=0, recompute_support=recompute)
        xq, yq = torch.randn(6, 3), (torch.arange(6) % 2).double()
        aligner.step((xq[:0], yq[:0]), (xq, yq))
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)
