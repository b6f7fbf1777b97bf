"""EWC: the penalty's value and gradient, the empirical Fisher by hand, federated sums, the train_steps hook."""

from __future__ import annotations

import copy

import pytest
import torch

from shared.fairness.ewc import EWCPenalty, add_fisher_sums, fisher_from_sums, fisher_sums, transducer_loss
from shared.models.transducer import Transducer
from shared.training import train_steps
from tests.conftest import tiny_batches, tiny_transducer


def _perturbed(model: torch.nn.Module, scale: float = 0.1, seed: int = 3) -> torch.nn.Module:
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return moved


def test_penalty_is_zero_at_the_anchor_and_its_gradient_is_the_formula() -> None:
    model = tiny_transducer()
    generator = torch.Generator().manual_seed(0)
    fisher = {name: torch.rand(p.shape, generator=generator) for name, p in model.named_parameters()}
    penalty = EWCPenalty.from_model(model, fisher, lam=3.0)
    assert float(penalty(model).detach()) == 0.0
    moved = _perturbed(model)
    value = penalty(moved)
    value.backward()
    anchors = {name: p.detach() for name, p in model.named_parameters()}
    expected = 3.0 * sum(float((fisher[n] * (p.detach() - anchors[n]).square()).sum()) for n, p in moved.named_parameters())
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    for name, p in moved.named_parameters():
        torch.testing.assert_close(p.grad, 2 * 3.0 * fisher[name] * (p.detach() - anchors[name]))


def test_penalty_ignores_parameters_without_fisher_and_names_mismatches() -> None:
    model = tiny_transducer()
    fisher = {"joiner.output.bias": torch.ones(6)}
    penalty = EWCPenalty.from_model(model, fisher, lam=1.0)
    moved = _perturbed(model)
    expected = float((moved.joiner.output.bias - model.joiner.output.bias).detach().square().sum())
    assert float(penalty(moved).detach()) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"Fisher entries \['nope'\] have no anchor"):
        EWCPenalty({}, {"nope": torch.ones(1)}, lam=1.0)
    with pytest.raises(ValueError, match="lam must be >= 0, got -1"):
        EWCPenalty.from_model(model, fisher, lam=-1.0)
    with pytest.raises(ValueError, match=r"no parameters \['joiner.output.bias'\]"):
        penalty(torch.nn.Linear(2, 2))


def test_fisher_of_a_linear_model_equals_a_hand_computation() -> None:
    # y = w . x + b, loss of a batch = mean (y - t)^2 -> grad_w = mean 2 (y - t) x, grad_b = mean 2 (y - t).
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(0.5)
    batches = [
        (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0], [0.0]])),
        (torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0]])),
    ]
    # Batch 1: residuals (1.5 - 1, -1.5 - 0) = (0.5, -1.5): grad_w = (0.5, -1.5), grad_b = -1.
    # Batch 2: residual 0.5 - 1 = -0.5: grad_w = (-2, -1), grad_b = -1.
    sums = fisher_sums(model, batches, loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    assert sums.count == 2
    torch.testing.assert_close(sums.sums["weight"], torch.tensor([[0.25 + 4.0, 2.25 + 1.0]]))
    torch.testing.assert_close(sums.sums["bias"], torch.tensor([2.0]))
    fisher = fisher_from_sums(sums.sums, sums.count)
    torch.testing.assert_close(fisher["weight"], torch.tensor([[2.125, 1.625]]))


def test_transducer_fisher_sums_are_squared_batch_gradients_and_add_across_devices() -> None:
    model = tiny_transducer()
    model.train()
    batches = tiny_batches(3)
    total = fisher_sums(model, batches)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode restored, .grad untouched
    model.eval()
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        transducer_loss(model, batch).backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad.square()
    for name in expected:
        torch.testing.assert_close(total.sums[name], expected[name])
    # Two devices' sums added, divided by the total count, equal the Fisher over all their batches.
    parts = [fisher_sums(model, batches[:1]), fisher_sums(model, batches[1:])]
    combined = add_fisher_sums(parts)
    assert combined.count == 3
    federated, central = fisher_from_sums(combined.sums, combined.count), fisher_from_sums(total.sums, total.count)
    for name in central:
        torch.testing.assert_close(federated[name], central[name])
    with pytest.raises(ValueError, match="count must be positive"):
        fisher_from_sums(total.sums, 0)


def test_train_steps_penalty_hook_holds_parameters_near_the_anchor() -> None:
    batches = tiny_batches(2)

    def run(penalty_lam: float | None) -> tuple[Transducer, float]:
        model = tiny_transducer()
        penalty = None
        if penalty_lam is not None:
            ones = {name: torch.ones_like(p) for name, p in model.named_parameters()}
            penalty = EWCPenalty.from_model(model, ones, lam=penalty_lam)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        stats = train_steps(model, batches, steps=4, optimizer=optimizer, spec_augment_seed=None, penalty=penalty)
        return model, stats.penalty

    anchor = tiny_transducer()
    plain, no_penalty = run(None)
    zero_weight, zero_penalty = run(0.0)
    held, penalty_value = run(50.0)
    assert no_penalty == 0.0 and zero_penalty == 0.0 and penalty_value > 0.0
    for a, b in zip(plain.parameters(), zero_weight.parameters()):  # lam = 0: exactly the plain training
        torch.testing.assert_close(a, b)

    def drift(model: Transducer) -> float:
        return sum(float((p - q).detach().square().sum()) for p, q in zip(model.parameters(), anchor.parameters()))

    assert drift(held) < 0.5 * drift(plain)


def test_sgd_takes_the_penalty_implicitly_where_an_explicit_step_diverges() -> None:
    anchor = tiny_transducer()
    fisher = {name: torch.full_like(p, 5.0) for name, p in anchor.named_parameters()}
    penalty = EWCPenalty.from_model(anchor, fisher, lam=10.0)  # lr 0.1: 2 lr lam F = 10

    def distance(model: torch.nn.Module) -> float:
        return sum(float((p - q).detach().square().sum()) for p, q in zip(model.parameters(), anchor.parameters())) ** 0.5

    explicit, implicit = _perturbed(anchor), _perturbed(anchor)
    start = distance(explicit)
    penalty(explicit).backward()
    with torch.no_grad():
        for p in explicit.parameters():
            p.sub_(0.1 * p.grad)
    assert distance(explicit) == pytest.approx(9.0 * start, rel=1e-4)  # |1 - 10|: overshoots, grows
    penalty.proximal_step(implicit, lr=0.1)
    assert distance(implicit) == pytest.approx(start / 11.0, rel=1e-4)  # 1 / (1 + 10): toward the anchor

    model = copy.deepcopy(anchor)  # train_steps under plain SGD takes the implicit step after each update
    stats = train_steps(
        model,
        tiny_batches(2),
        steps=4,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        spec_augment_seed=None,
        penalty=penalty,
    )
    plain = copy.deepcopy(anchor)
    train_steps(plain, tiny_batches(2), steps=4, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1), spec_augment_seed=None)
    assert stats.penalty > 0.0 and distance(model) < 0.2 * distance(plain)
