"""DP-SGD on the streaming transducers (shared/privacy/dp.py): Opacus compatibility, clipping, accounting, budget."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.validators import ModuleValidator

import shared.models.amortized_transformer as amortized_module
from shared.config import ModelConfig
from shared.data.dataset import Batch
from shared.data.features import augment
from shared.models.checkpoint import MODEL_NAMES, build_model
from shared.privacy.dp import (
    AccountantState,
    DPCompatibilityError,
    DPRound,
    PrivacyBudgetExhausted,
    check_budget,
    dp_train_steps,
    make_dp_compatible,
    validate,
)

VOCAB = 20


def tiny_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, d_model=32, num_layers=1, num_heads=2, ffn_dim=64, vocab_size=VOCAB, dropout=0.0)
    return build_model(cfg)


def utterances(count: int, seed: int = 0) -> Batch:
    """``count`` random utterances of different lengths, padded into one batch."""
    generator = torch.Generator().manual_seed(seed)
    feat_lens = torch.randint(20, 48, (count,), generator=generator)
    target_lens = torch.randint(1, 5, (count,), generator=generator)
    return Batch(
        feats=torch.randn(count, int(feat_lens.max()), 80, generator=generator),
        feat_lens=feat_lens,
        targets=torch.randint(0, VOCAB, (count, int(target_lens.max())), generator=generator),
        target_lens=target_lens,
        ids=[f"utt{seed}-{i}" for i in range(count)],
    )


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def per_utterance_gradients(model: torch.nn.Module, batch: Batch) -> list[torch.Tensor]:
    """Each utterance's gradient of its per-token loss, run ALONE on a copy of ``model``."""
    grads = []
    for row in range(len(batch)):
        alone = copy.deepcopy(model)
        length, tokens = int(batch.feat_lens[row]), int(batch.target_lens[row])
        out = alone(
            batch.feats[row : row + 1, :length],
            batch.feat_lens[row : row + 1],
            batch.targets[row : row + 1, :tokens],
            batch.target_lens[row : row + 1],
        )
        (out.loss_per_utt.sum() / tokens).backward()
        grads.append(torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in alone.parameters()]))
    return grads


def clipped_mean(grads: list[torch.Tensor], clip: float) -> torch.Tensor:
    """The SGD (lr 1) update of noiseless DP-SGD over all of ``grads``: -(1/N) sum_i clip_C(g_i)."""
    return -sum(g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in grads) / len(grads)


def noiseless_round(model: torch.nn.Module, batch: Batch, clip: float, **options: Any) -> DPRound:
    """One DP-SGD step over all of ``batch`` (q = 1) with no noise and SGD at lr 1: the update is the clipped mean."""
    return dp_train_steps(
        model,
        [batch],
        steps=1,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        sample_rate=1.0,
        accountant=AccountantState(),
        delta=1e-5,
        seed=0,
        **options,
    )


@pytest.fixture
def deterministic_gates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The amortized encoder's gates without Gumbel noise, so utterances run alone or batched draw the same."""

    def gate(logit: torch.Tensor, temperature: float) -> torch.Tensor:
        relaxed = torch.sigmoid(logit / temperature)
        return (logit > 0).to(logit.dtype) + (relaxed - relaxed.detach())

    monkeypatch.setattr(amortized_module, "_straight_through_gumbel", gate)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_used_with_dp_passes_opacus_validation(name: str) -> None:
    model = make_dp_compatible(tiny_model(name)).train()
    assert ModuleValidator.validate(model, strict=False) == []
    validate(model)


def test_validate_names_the_offending_module() -> None:
    model = tiny_model("convrnnt")  # nn.LSTM: Opacus has no per-sample gradients for it
    with pytest.raises(DPCompatibilityError, match=r"encoder\.lstm \(LSTM\).*DPLSTM"):
        validate(model)


def test_make_dp_compatible_keeps_weights_outputs_and_state_dict_keys() -> None:
    model = tiny_model("convrnnt").eval()
    batch = utterances(2)
    before_state = copy.deepcopy(model.state_dict())
    before = model(batch.feats, batch.feat_lens, batch.targets, batch.target_lens).loss_per_utt
    make_dp_compatible(model)
    assert type(model.encoder.lstm).__name__ == "DPLSTM" and not model.training
    after_state = model.state_dict()
    assert list(after_state) == list(before_state) or set(after_state) == set(before_state)
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    after = model(batch.feats, batch.feat_lens, batch.targets, batch.target_lens).loss_per_utt
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "batch_frames"), [("transformer", None), ("transformer", 90), ("amortized", None), ("convrnnt", None)]
)
def test_dp_step_is_the_mean_of_per_utterance_gradients_each_clipped(
    name: str, batch_frames: int | None, deterministic_gates: None
) -> None:
    """noise 0, q = 1, SGD lr 1: the update is -(1/N) sum_i clip_C(g_i), g_i from utterance i run ALONE.

    C is the median per-utterance norm, so some gradients are clipped and some are not: the clip factor of each
    utterance differs, which only matches if Opacus' per-sample gradients are the per-utterance gradients.
    ``batch_frames=90`` splits the sample into several forward passes of one step.
    """
    model = make_dp_compatible(tiny_model(name)).train()
    batch = utterances(5)
    grads = per_utterance_gradients(model, batch)
    clip = float(torch.stack([g.norm() for g in grads]).median())
    expected_update = clipped_mean(grads, clip)

    keys = list(model.state_dict())
    before = flat_params(model)
    result = noiseless_round(model, batch, clip, batch_frames=batch_frames, spec_augment=False)
    torch.testing.assert_close(flat_params(model) - before, expected_update, rtol=1e-4, atol=1e-6)
    assert float(expected_update.norm()) <= clip + 1e-6  # the mean of clipped gradients is within C
    assert result.stats.utterances == len(batch) and result.epsilon == math.inf  # no noise: no privacy
    # The model comes back clean: no hooks, no per-sample attributes, the same state_dict keys.
    assert list(model.state_dict()) == keys
    assert not any(hasattr(p, attr) for p in model.parameters() for attr in ("grad_sample", "summed_grad"))
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_dp_round_gives_each_utterance_its_own_lead_in_and_masks_inside_its_clipped_gradient() -> None:
    """With lead-in silence and SpecAugment, DP-SGD's update is still the mean of per-utterance clipped gradients,
    each of its own augmented utterance alone: the augmentation adds no coupling between sampling units.

    The expected augmentation is replayed from the round's seed: the generator draws the Poisson sample (q = 1,
    everyone), then ``augment``s the one pass."""
    model = tiny_model("transformer").train()
    batch = utterances(4)
    order = torch.argsort(batch.feat_lens, stable=True)  # the round's one pass is length-sorted
    batch = Batch(
        feats=batch.feats[order],
        feat_lens=batch.feat_lens[order],
        targets=batch.targets[order],
        target_lens=batch.target_lens[order],
        ids=[batch.ids[i] for i in order.tolist()],
    )
    generator = torch.Generator().manual_seed(0)
    torch.rand(len(batch), generator=generator)  # the round's Poisson sample
    feats, lens = augment(batch.feats, batch.feat_lens, lead_frames=30, lead_prob=0.5, generator=generator)
    assert (lens > batch.feat_lens).any() and (lens == batch.feat_lens).any()  # some begin late, some on cue
    augmented = Batch(feats=feats, feat_lens=lens, targets=batch.targets, target_lens=batch.target_lens, ids=batch.ids)
    grads = per_utterance_gradients(model, augmented)
    clip = float(torch.stack([g.norm() for g in grads]).median())

    before = flat_params(model)
    noiseless_round(model, batch, clip, lead_silence_frames=30, lead_silence_prob=0.5)
    torch.testing.assert_close(flat_params(model) - before, clipped_mean(grads, clip), rtol=1e-4, atol=1e-6)


def test_noise_is_added_with_std_sigma_c_over_expected_batch() -> None:
    """An empty Poisson sample still steps: the update is pure noise N(0, (sigma C / qN)^2) and is counted."""
    model = tiny_model("transformer")
    before = flat_params(model)
    sigma, clip, q, n = 2.0, 0.5, 1e-9, 4
    result = dp_train_steps(
        model,
        [utterances(n)],
        steps=1,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        sample_rate=q,
        accountant=AccountantState(),
        delta=1e-5,
        seed=3,
    )
    assert result.stats.utterances == 0 and result.accountant.history == ((sigma, q, 1),)
    std = float((flat_params(model) - before).std())
    assert std == pytest.approx(sigma * clip / (q * n), rel=0.05)


def test_epsilon_after_k_rounds_matches_opacus_accountant() -> None:
    """k rounds of m steps, the state kept between rounds as a Flower ConfigRecord, equal Opacus fed directly."""
    from flwr.app import ConfigRecord

    rounds, steps, sigma, q, delta = 3, 2, 1.1, 0.5, 1e-5
    model = tiny_model("transformer")
    batches = [utterances(3, seed=0), utterances(3, seed=1)]
    record = ConfigRecord(AccountantState().to_record())  # what a device's context.state holds
    direct = RDPAccountant()
    for round_ in range(1, rounds + 1):
        state = AccountantState.from_record(dict(record))
        result = dp_train_steps(
            model,
            batches,
            steps=steps,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            sample_rate=q,
            accountant=state,
            delta=delta,
            seed=round_,
        )
        record = ConfigRecord(result.accountant.to_record())
        for _ in range(steps):
            direct.step(noise_multiplier=sigma, sample_rate=q)
        assert list(result.accountant.history) == [tuple(entry) for entry in direct.history]
    assert result.accountant.history == ((sigma, q, rounds * steps),)
    assert result.epsilon == direct.get_epsilon(delta=delta)  # Opacus' own accountant, fed the same steps
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=rounds * steps, orders=orders)
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert result.epsilon == pytest.approx(float(epsilon), rel=1e-12)


def test_accountant_state_composes_runs_like_opacus() -> None:
    """Rounds at different sample rates (a device whose data grew) compose as Opacus' accountant composes them."""
    runs = [(1.0, 0.1, 5), (1.0, 0.1, 3), (0.8, 0.25, 4), (1.0, 0.1, 2)]
    state, direct = AccountantState(), RDPAccountant()
    for sigma, q, steps in runs:
        state = state.after(noise_multiplier=sigma, sample_rate=q, steps=steps)
        for _ in range(steps):
            direct.step(noise_multiplier=sigma, sample_rate=q)
    assert [tuple(entry) for entry in direct.history] == list(state.history)
    assert state.history == ((1.0, 0.1, 8), (0.8, 0.25, 4), (1.0, 0.1, 2)) and state.steps == 14
    assert state.epsilon(1e-6) == direct.get_epsilon(delta=1e-6)
    assert AccountantState.from_record(state.to_record()) == state
    assert AccountantState().epsilon(1e-5) == 0.0


def test_accountant_record_rejects_malformed_records() -> None:
    with pytest.raises(ValueError, match="missing"):
        AccountantState.from_record({"noise-multipliers": [1.0], "steps": [2]})
    with pytest.raises(ValueError, match="differ in length"):
        AccountantState.from_record({"noise-multipliers": [1.0], "sample-rates": [0.1, 0.2], "steps": [2]})
    with pytest.raises(ValueError, match="sample rate"):
        AccountantState.from_record({"noise-multipliers": [1.0], "sample-rates": [1.5], "steps": [2]})


def test_device_refuses_the_round_that_would_exceed_its_budget() -> None:
    sigma, q, steps, delta = 1.0, 0.5, 2, 1e-5
    after_two = AccountantState().after(noise_multiplier=sigma, sample_rate=q, steps=2 * steps).epsilon(delta)
    after_three = AccountantState().after(noise_multiplier=sigma, sample_rate=q, steps=3 * steps).epsilon(delta)
    budget = (after_two + after_three) / 2
    model = tiny_model("transformer")
    batches = [utterances(3)]
    state = AccountantState()
    for round_ in range(2):
        result = dp_train_steps(
            model,
            batches,
            steps=steps,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            sample_rate=q,
            accountant=state,
            delta=delta,
            epsilon_budget=budget,
            seed=round_,
        )
        state = result.accountant
        assert result.epsilon <= budget
    before = flat_params(model)
    with pytest.raises(PrivacyBudgetExhausted) as refused:
        dp_train_steps(
            model,
            batches,
            steps=steps,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            sample_rate=q,
            accountant=state,
            delta=delta,
            epsilon_budget=budget,
        )
    assert torch.equal(flat_params(model), before)  # refused before training
    error = refused.value
    assert error.epsilon == pytest.approx(after_two) and error.next_epsilon == pytest.approx(after_three)
    assert f"{after_two:.4g}" in str(error) and f"{budget:.4g}" in str(error) and "refuses" in str(error)
    with pytest.raises(PrivacyBudgetExhausted, match="is spent"):
        check_budget(state, noise_multiplier=sigma, sample_rate=q, steps=1, delta=delta, epsilon_budget=after_two / 2)


def test_learnable_compute_cost_is_rejected_under_dp() -> None:
    model = tiny_model("amortized")
    with pytest.raises(ValueError, match="compute_weight"):
        dp_train_steps(
            model,
            [utterances(3)],
            steps=1,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=1.0,
            accountant=AccountantState(),
            delta=1e-5,
            compute_weight=0.01,
            seed=0,
        )
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # cleaned up after the error
