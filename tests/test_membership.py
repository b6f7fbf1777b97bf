"""The loss-threshold membership-inference attack (shared/privacy/membership.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.config import ModelConfig
from shared.data.dataset import Batch
from shared.models.checkpoint import build_model
from shared.privacy.membership import loss_threshold_attack, utterance_losses
from shared.training import train_steps


def test_separated_losses_give_auc_one_and_full_advantage() -> None:
    rng = np.random.default_rng(0)
    result = loss_threshold_attack(rng.normal(1.0, 0.1, 200), rng.normal(3.0, 0.1, 300))
    assert result.auc == 1.0 and result.advantage == 1.0
    assert 1.0 < result.threshold < 3.0 and (result.members, result.non_members) == (200, 300)


def test_identical_loss_distributions_give_auc_one_half() -> None:
    rng = np.random.default_rng(1)
    result = loss_threshold_attack(rng.gamma(2.0, 1.0, 4000), rng.gamma(2.0, 1.0, 4000))
    assert result.auc == pytest.approx(0.5, abs=0.03)
    assert result.advantage < 0.06  # the oracle threshold still finds a little by chance


def test_advantage_is_the_best_tpr_minus_fpr_of_the_roc_curve() -> None:
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    members, non_members = rng.normal(0.0, 1.0, 300), rng.normal(0.7, 1.2, 500)
    result = loss_threshold_attack(members, non_members)
    labels = np.concatenate([np.ones(300), np.zeros(500)])
    false_positive, true_positive, _ = roc_curve(labels, -np.concatenate([members, non_members]))
    assert result.advantage == pytest.approx(float(np.max(true_positive - false_positive)), abs=1e-12)
    assert result.advantage == pytest.approx(
        np.mean(members <= result.threshold) - np.mean(non_members <= result.threshold), abs=1e-12
    )


def test_higher_member_loss_reads_as_no_membership() -> None:
    """Lower loss means member: members with HIGHER losses give AUC ~0, not ~1."""
    result = loss_threshold_attack([5.0, 6.0, 7.0], [1.0, 2.0])
    assert result.auc == 0.0


def test_planted_overlap_matches_the_analytic_auc() -> None:
    """Members N(0, 1), non-members N(d, 1): AUC = Phi(d / sqrt 2); advantage = 2 Phi(d / 2) - 1."""
    from scipy.stats import norm

    rng = np.random.default_rng(2)
    shift = 1.0
    result = loss_threshold_attack(rng.normal(0.0, 1.0, 20000), rng.normal(shift, 1.0, 20000))
    assert result.auc == pytest.approx(norm.cdf(shift / np.sqrt(2)), abs=0.01)
    assert result.advantage == pytest.approx(2 * norm.cdf(shift / 2) - 1, abs=0.02)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="member_losses is empty"):
        loss_threshold_attack([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        loss_threshold_attack([1.0], [float("nan")])


def random_utterances(count: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(
        feats=torch.randn(count, 32, 80, generator=generator),
        feat_lens=torch.full((count,), 32),
        targets=torch.randint(0, 10, (count, 4), generator=generator),
        target_lens=torch.full((count,), 4),
        ids=[f"s{seed}-{i}" for i in range(count)],
    )


def test_overfitted_model_leaks_membership_of_its_training_utterances() -> None:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name="transformer", d_model=32, num_layers=1, num_heads=2, ffn_dim=64, vocab_size=10, dropout=0.0)
    )
    members, non_members = random_utterances(6, seed=0), random_utterances(6, seed=1)
    before = loss_threshold_attack(
        list(utterance_losses(model, [members]).values()), list(utterance_losses(model, [non_members]).values())
    )
    train_steps(model, [members], steps=20, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), spec_augment_seed=None)
    assert model.training  # utterance_losses restores the mode
    losses = utterance_losses(model, [members, non_members])
    result = loss_threshold_attack([losses[uid] for uid in members.ids], [losses[uid] for uid in non_members.ids])
    assert result.auc > 0.9 and result.auc > before.auc
    assert result.advantage > 0.5
