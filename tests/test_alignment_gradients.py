"""The FaAlGrad meta-gradient against independent computations (float64, tiny models).

References: (a) the model written out as a plain function of its weight tensors with
``torch.autograd.grad(create_graph=True)`` (no functional_call, no torchopt), (b) ``higher``,
(c) central finite differences of L(theta_I(theta_0), X_q). The second-order checks run twice:
as the wrapper keeps the inner steps' graph (default) and as it recomputes them
(``recompute_support=True``, Hessian-vector products).
"""

from __future__ import annotations

import higher
import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn

from metafair_opt import GradientAlignmentWrapper
from tests.helpers import rel_error

pytestmark = pytest.mark.usefixtures("float64_default")  # from tests/conftest.py


def bce(output: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(output.squeeze(-1), target)


def tiny_model(seed: int = 0, inputs: int = 3, hidden: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()


def tiny_batches(seed: int = 1, inputs: int = 3, n_s: int = 7, n_q: int = 9):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_s, inputs, generator=g)
    ys = (torch.rand(n_s, generator=g) > 0.5).double()
    xq = torch.randn(n_q, inputs, generator=g)
    yq = (torch.rand(n_q, generator=g) > 0.5).double()
    return xs, ys, xq, yq


def plain_mlp(params: list[Tensor], x: Tensor) -> Tensor:
    """The tiny model written by hand: Linear -> tanh -> Linear."""
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def wrapper_meta_gradient(model: nn.Module, batches, **kwargs) -> list[Tensor | None]:
    """Run one wrapper step with a zero-learning-rate optimizer and read p.grad (None for a
    parameter the step did not reach)."""
    xs, ys, xq, yq = batches
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, **kwargs)
    aligner.zero_grad()
    aligner.step(support=(xs, ys), query=(xq, yq))
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def hand_meta_gradient(params0: list[Tensor], batches, lr: float, steps: int) -> list[Tensor]:
    xs, ys, xq, yq = batches
    params = params0
    for _ in range(steps):
        grads = torch.autograd.grad(bce(plain_mlp(params, xs), ys), params, create_graph=True)
        params = [p - lr * g for p, g in zip(params, grads)]
    return list(torch.autograd.grad(bce(plain_mlp(params, xq), yq), params0))


def higher_meta_gradient(model: nn.Module, batches, lr: float, steps: int) -> list[Tensor]:
    xs, ys, xq, yq = batches
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(bce(fmodel(xs), ys))
        query_loss = bce(fmodel(xq), yq)
        return list(torch.autograd.grad(query_loss, list(model.parameters())))


def query_loss_after_inner(params0: list[Tensor], batches, lr: float, steps: int) -> Tensor:
    xs, ys, xq, yq = batches
    params = params0
    for _ in range(steps):
        grads = torch.autograd.grad(bce(plain_mlp(params, xs), ys), params)
        params = [p - lr * g for p, g in zip(params, grads)]
    return bce(plain_mlp(params, xq), yq)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_meta_gradient_matches_hand_written_autograd(inner_steps: int, recompute: bool) -> None:
    batches = tiny_batches()
    model = tiny_model()
    params0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    expected = hand_meta_gradient(params0, batches, lr=0.3, steps=inner_steps)
    got = wrapper_meta_gradient(model, batches, inner_lr=0.3, inner_steps=inner_steps,
                                recompute_support=recompute)
    assert rel_error(got, expected) < 1e-6
    # The second-order term is not negligible here, so the check has teeth.
    first_order = wrapper_meta_gradient(tiny_model(), batches, inner_lr=0.3,
                                        inner_steps=inner_steps, first_order=True)
    assert rel_error(first_order, expected) > 1e-3


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_meta_gradient_matches_higher(inner_steps: int, recompute: bool) -> None:
    batches = tiny_batches(seed=2)
    expected = higher_meta_gradient(tiny_model(seed=3), batches, lr=0.2, steps=inner_steps)
    got = wrapper_meta_gradient(tiny_model(seed=3), batches, inner_lr=0.2,
                                inner_steps=inner_steps, recompute_support=recompute)
    assert rel_error(got, expected) < 1e-6


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_meta_gradient_matches_finite_differences(inner_steps: int, recompute: bool) -> None:
    batches = tiny_batches(seed=4)
    model = tiny_model(seed=5)
    lr, eps = 0.25, 1e-6
    base = [p.detach().clone() for p in model.parameters()]
    numeric = []
    with torch.enable_grad():
        for k, tensor in enumerate(base):
            grad = torch.zeros_like(tensor)
            for idx in range(tensor.numel()):
                values = []
                for sign in (1.0, -1.0):
                    shifted = [t.clone().requires_grad_(True) for t in base]
                    shifted[k].data.view(-1)[idx] += sign * eps
                    values.append(query_loss_after_inner(shifted, batches, lr, inner_steps))
                grad.view(-1)[idx] = (values[0] - values[1]).item() / (2 * eps)
            numeric.append(grad)
    got = wrapper_meta_gradient(model, batches, inner_lr=lr, inner_steps=inner_steps,
                                recompute_support=recompute)
    assert rel_error(got, numeric) < 1e-4


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_first_order_is_query_gradient_at_adapted_parameters(inner_steps: int) -> None:
    batches = tiny_batches(seed=6)
    xs, ys, xq, yq = batches
    model = tiny_model(seed=7)
    lr = 0.3
    params = [p.detach().clone() for p in model.parameters()]
    for _ in range(inner_steps):
        leaf = [p.clone().requires_grad_(True) for p in params]
        grads = torch.autograd.grad(bce(plain_mlp(leaf, xs), ys), leaf)
        params = [p - lr * g for p, g in zip(params, grads)]
    adapted = [p.clone().requires_grad_(True) for p in params]
    expected = torch.autograd.grad(bce(plain_mlp(adapted, xq), yq), adapted)
    got = wrapper_meta_gradient(model, batches, inner_lr=lr, inner_steps=inner_steps,
                                first_order=True)
    assert rel_error(got, expected) < 1e-12


def test_section_4_1_alignment_identity_error_shrinks_like_lr_squared() -> None:
    """meta-grad = grad L_q - lr * grad(grad L_q . grad L_s) + O(lr^2) (paper, section 4.1)."""
    batches = tiny_batches(seed=8)
    xs, ys, xq, yq = batches
    model = tiny_model(seed=9)
    params0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    g_s = torch.autograd.grad(bce(plain_mlp(params0, xs), ys), params0, create_graph=True)
    g_q = torch.autograd.grad(bce(plain_mlp(params0, xq), yq), params0, create_graph=True)
    dot = sum((a * b).sum() for a, b in zip(g_q, g_s))
    grad_dot = torch.autograd.grad(dot, params0)
    errors = []
    for lr in (0.02, 0.01):
        approx = [q.detach() - lr * d for q, d in zip(g_q, grad_dot)]
        got = wrapper_meta_gradient(tiny_model(seed=9), batches, inner_lr=lr, inner_steps=1)
        errors.append(rel_error(got, approx))
        # The first-order term itself is far from negligible at these step sizes.
        assert rel_error(approx, [q.detach() for q in g_q]) > 10 * errors[-1]
    ratio = errors[0] / errors[1]
    assert 3.0 < ratio < 5.0, f"error ratio {ratio:.2f} for halving lr; expected about 4"


def test_torchopt_adam_inner_optimizer_matches_hand_written_adam() -> None:
    batches = tiny_batches(seed=10)
    xs, ys, xq, yq = batches
    lr, b1, b2, eps, eps_root = 0.05, 0.9, 0.999, 1e-8, 1e-8
    model = tiny_model(seed=11)
    params0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    params, m, v = params0, [0.0] * 4, [0.0] * 4
    for t in (1, 2):
        grads = torch.autograd.grad(bce(plain_mlp(params, xs), ys), params, create_graph=True)
        m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads)]
        v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grads)]
        params = [
            p - lr * (mi / (1 - b1**t)) / (torch.sqrt(vi / (1 - b2**t) + eps_root) + eps)
            for p, mi, vi in zip(params, m, v)
        ]
    expected = torch.autograd.grad(bce(plain_mlp(params, xq), yq), params0)
    got = wrapper_meta_gradient(
        model, batches, inner_steps=2,
        inner_optimizer=torchopt.adam(lr, betas=(b1, b2), eps=eps, eps_root=eps_root),
    )
    assert all(torch.isfinite(g).all() for g in got)
    assert rel_error(got, expected) < 1e-6


def test_inner_steps_zero_is_plain_training_on_query() -> None:
    xs, ys, xq, yq = tiny_batches(seed=12)
    model, reference = tiny_model(seed=13), tiny_model(seed=13)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, inner_steps=0)
    for _ in range(3):
        aligner.zero_grad()
        aligner.step(support=(xs, ys), query=(xq, yq))
        ref_opt.zero_grad()
        bce(reference(xq), yq).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-14)


def test_tied_weights_meta_gradient_matches_finite_differences() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Linear(3, 3, bias=False)
            self.decode = nn.Linear(3, 3, bias=True)
            self.decode.weight = self.encode.weight
            self.head = nn.Linear(3, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.decode(torch.tanh(self.encode(x)))))

    torch.manual_seed(14)
    model = Tied().double()
    assert len(list(model.parameters())) == 4  # the tied weight appears once
    xs, ys, xq, yq = tiny_batches(seed=15)
    lr, eps = 0.3, 1e-6

    def objective() -> float:
        fast = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        names = [n for n, _ in model.named_parameters()]
        call = torch.func.functional_call
        grads = torch.autograd.grad(bce(call(model, dict(zip(names, fast)), (xs,)), ys), fast)
        adapted = dict(zip(names, [p - lr * g for p, g in zip(fast, grads)]))
        return bce(call(model, adapted, (xq,)), yq).item()

    numeric = []
    for p in model.parameters():
        grad = torch.zeros_like(p)
        for idx in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[idx] += eps
            plus = objective()
            with torch.no_grad():
                p.view(-1)[idx] -= 2 * eps
            minus = objective()
            with torch.no_grad():
                p.view(-1)[idx] += eps
            grad.view(-1)[idx] = (plus - minus) / (2 * eps)
        numeric.append(grad)
    for recompute in (False, True):
        got = wrapper_meta_gradient(model, (xs, ys, xq, yq), inner_lr=lr, inner_steps=1,
                                    recompute_support=recompute)
        assert rel_error(got, numeric) < 1e-4
