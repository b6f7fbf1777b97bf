"""Adversarial reweighting: the ARL weight formula, the ascent step, the warm-up, the population surrogate, and
the train_steps reweighter hook."""

from __future__ import annotations

import copy

import pytest
import torch

from shared.data.dataset import Batch
from shared.fairness.arw import (
    UTTERANCE_STATISTICS,
    AdversarialReweighter,
    Adversary,
    PopulationStats,
    ScoreSums,
    adversary_inputs,
    arl_weights,
    population_surrogate,
    utterance_statistics,
)
from shared.training import GRAD_CLIP_NORM, train_steps
from tests.conftest import tiny_batches, tiny_transducer


def _batch(size: int = 6, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 60, (size,), generator=generator)
    feats = torch.randn(size, int(lengths.max()), 8, generator=generator)
    feats *= (torch.arange(feats.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
    return Batch(
        feats=feats,
        feat_lens=lengths,
        targets=torch.zeros(size, 4, dtype=torch.long),
        target_lens=torch.randint(1, 5, (size,), generator=generator),
        ids=[f"u{i}" for i in range(size)],
    )


def test_arl_weights_follow_the_formula() -> None:
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.4])
    scores = torch.sigmoid(logits)
    weights = arl_weights(logits)
    torch.testing.assert_close(weights, 1 + 5 * scores / scores.sum())
    # sum w = n + n * sum s / sum s = 2n: the mean weight is exactly 2, every weight at least 1.
    assert float(weights.sum()) == pytest.approx(10.0) and bool((weights >= 1).all())
    torch.testing.assert_close(arl_weights(torch.full((4,), -3.0)), torch.full((4,), 2.0))  # uniform adversary
    population = PopulationStats(mean_score=0.25, weighted_loss=1.0)
    torch.testing.assert_close(arl_weights(logits, population=population), 1 + scores / 0.25)
    with pytest.raises(ValueError, match=r"non-empty \(B,\) vector, got shape \(2, 2\)"):
        arl_weights(torch.zeros(2, 2))


def test_utterance_statistics_by_hand() -> None:
    feats = torch.zeros(2, 4, 2)
    feats[0] = torch.tensor([[1.0, 3.0], [3.0, 5.0], [0.0, 0.0], [0.0, 0.0]])  # energies 2, 4 (2 valid frames)
    feats[1] = torch.tensor([[1.0, 1.0]] * 4)
    stats = utterance_statistics(feats, torch.tensor([2, 4]))
    expected = torch.tensor([[torch.log(torch.tensor(0.02)), 3.0, 1.0], [torch.log(torch.tensor(0.04)), 1.0, 0.0]])
    torch.testing.assert_close(stats, expected)
    batch = _batch(3)
    with_embedding = adversary_inputs(batch, speaker_embedding=torch.tensor([0.6, 0.8]))
    assert with_embedding.shape == (3, UTTERANCE_STATISTICS + 2)
    torch.testing.assert_close(with_embedding[:, 3:], torch.tensor([[0.6, 0.8]] * 3))
    with pytest.raises(ValueError, match=r"no speaker embedding for utterances \['u0'"):
        adversary_inputs(batch, speaker_embedding={})


def test_an_adversary_step_increases_the_weighted_loss() -> None:
    batch = _batch(8)
    losses = torch.rand(8, generator=torch.Generator().manual_seed(1)) * 10
    torch.manual_seed(0)
    reweighter = AdversarialReweighter(Adversary(UTTERANCE_STATISTICS), lr=0.05)
    tokens = batch.target_lens.sum()

    def weighted_loss() -> float:
        with torch.no_grad():
            return float((arl_weights(reweighter.adversary(adversary_inputs(batch))) * losses).sum() / tokens)

    before = weighted_loss()
    assert before == pytest.approx(float(2 * losses.sum() / tokens))  # starts uniform
    weights = reweighter(batch, losses)
    torch.testing.assert_close(weights, torch.full((8,), 1.0))  # the weights before its step, halved: mean 1
    after = weighted_loss()
    assert after > before and reweighter.last_objective == pytest.approx(before)
    for _ in range(20):
        reweighter(batch, losses)
    assert weighted_loss() > after
    # The learner's mean weight stays 1 (ARL's 2, halved: the loss is moved, not rescaled), so a weighted loss
    # above the uniform one means weights covary with the losses.
    weights = reweighter(batch, losses)
    assert float(weights.mean()) == pytest.approx(1.0) and float(((weights - 1) * losses).sum()) > 0


def test_warm_up_keeps_the_adversary_frozen_and_uniform() -> None:
    batch, losses = _batch(4), torch.tensor([1.0, 5.0, 2.0, 0.5])
    adversary = Adversary(UTTERANCE_STATISTICS, hidden_dim=4)
    reweighter = AdversarialReweighter(adversary, warmup_steps=3)
    initial = copy.deepcopy(adversary.state_dict())
    for _ in range(3):  # the warm-up trains as without ARW
        torch.testing.assert_close(reweighter(batch, losses), torch.ones(4))
    assert all(torch.equal(initial[k], v) for k, v in adversary.state_dict().items())
    reweighter(batch, losses)
    assert not all(torch.equal(initial[k], v) for k, v in adversary.state_dict().items())
    assert reweighter.steps == 4 and reweighter.score_sums.count == 16.0


def test_population_weights_and_weight_mass() -> None:
    """With the federation's mean score m, ARL's w_i = 1 + s_i / m, of which the learner gets half; the reweighter
    keeps the mass it handed out."""
    batch, losses = _batch(4), torch.tensor([1.0, 5.0, 2.0, 0.5])
    adversary = Adversary(UTTERANCE_STATISTICS)
    with torch.no_grad():
        adversary.net.weight.copy_(torch.tensor([[1.0, 0.5, -0.5]]))  # type: ignore[union-attr]
    scores = torch.sigmoid(adversary(utterance_statistics(batch.feats, batch.feat_lens))).detach()
    population = PopulationStats(mean_score=0.8, weighted_loss=2.0)
    reweighter = AdversarialReweighter(adversary, warmup_steps=1, population=population)
    assert reweighter.mean_weight() == 1.0  # nothing handed out yet: the uniform weight
    torch.testing.assert_close(reweighter(batch, losses), torch.ones(4))  # warm-up
    weights = reweighter(batch, losses)
    torch.testing.assert_close(weights, (1 + scores / 0.8) / 2)
    assert reweighter.weight_sum == pytest.approx(4.0 + float(weights.sum()))
    assert reweighter.mean_weight() == pytest.approx((4.0 + float(weights.sum())) / 8)


def test_population_surrogate_gradients_sum_to_the_central_arl_gradient() -> None:
    batch = _batch(10, seed=2)
    losses = torch.rand(10, generator=torch.Generator().manual_seed(3)) * 5
    torch.manual_seed(1)
    adversary = Adversary(UTTERANCE_STATISTICS, hidden_dim=5)
    torch.nn.init.normal_(adversary.net[2].weight)  # away from uniform, so the gradient is generic
    inputs = adversary_inputs(batch)

    def gradient(objective: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(objective, list(adversary.parameters())))

    central = gradient((arl_weights(adversary(inputs)) * losses).sum())
    with torch.no_grad():  # what the server forms from the devices' summed ScoreSums
        scores = torch.sigmoid(adversary(inputs))
        sums = sum(
            (
                ScoreSums(float(scores[p].sum()), float(scores[p].numel()), float((scores[p] * losses[p]).sum()))
                for p in (slice(0, 4), slice(4, 10))
            ),
            ScoreSums(0.0, 0.0, 0.0),
        )
    population = sums.population()
    devices = [gradient(population_surrogate(adversary(inputs[p]), losses[p], population)) for p in (slice(0, 4), slice(4, 10))]
    for central_grad, first, second in zip(central, *devices):
        torch.testing.assert_close(first + second, central_grad, rtol=1e-5, atol=1e-6)


def test_train_steps_applies_the_reweighters_weights() -> None:
    batches = tiny_batches(1)

    class Fixed:
        def __init__(self, weights: list[float]) -> None:
            self.weights, self.calls = torch.tensor(weights), 0

        def __call__(self, batch: Batch, losses: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            assert losses.shape == (len(batch.ids),) and batch is batches[0]
            return self.weights

    def one_step(reweighter: Fixed | None) -> torch.nn.Module:
        model = tiny_transducer()
        train_steps(
            model,
            batches,
            steps=1,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            spec_augment_seed=None,
            reweighter=reweighter,
        )
        return model

    plain, ones = one_step(None), one_step(Fixed([1.0, 1.0]))
    for a, b in zip(plain.parameters(), ones.parameters()):  # unit weights: exactly the plain step
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Weights (1, 0): the step of utterance 0's loss alone, still divided by all the batch's tokens.
    first_only = Fixed([1.0, 0.0])
    stepped = one_step(first_only)
    manual = tiny_transducer()
    manual.train()
    batch = batches[0]
    out = manual(batch.feats, batch.feat_lens, batch.targets, batch.target_lens)
    (out.loss_per_utt[0] / batch.target_lens.sum()).backward()
    torch.nn.utils.clip_grad_norm_(manual.parameters(), GRAD_CLIP_NORM)
    torch.optim.SGD(manual.parameters(), lr=0.1).step()
    assert first_only.calls == 1
    for a, b in zip(stepped.parameters(), manual.parameters()):
        torch.testing.assert_close(a, b)


def test_adversarial_reweighter_runs_inside_train_steps() -> None:
    batches = tiny_batches(2)
    model = tiny_transducer()
    embedding = torch.nn.functional.normalize(torch.ones(4), dim=0)
    reweighter = AdversarialReweighter(
        Adversary(UTTERANCE_STATISTICS + 4), warmup_steps=1, inputs=lambda b: adversary_inputs(b, speaker_embedding=embedding)
    )
    stats = train_steps(
        model,
        batches,
        steps=3,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        spec_augment_seed=0,
        reweighter=reweighter,
    )
    assert stats.steps == 3 and reweighter.steps == 3 and reweighter.score_sums.count == 6.0
    assert reweighter.last_objective == reweighter.last_objective  # not NaN: it stepped after the warm-up
    population = reweighter.score_sums.population()
    assert 0 < population.mean_score < 1
