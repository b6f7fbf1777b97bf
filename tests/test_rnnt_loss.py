"""rnnt_loss against a brute-force sum over every alignment of small lattices."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from shared.models.rnnt_loss import rnnt_loss


def _brute_force_nll(log_probs: torch.Tensor, labels: list[int], blank: int) -> torch.Tensor:
    """-log of the sum over all alignments; log_probs (T, U + 1, V) of one utterance, already truncated."""
    frames, num_labels = log_probs.shape[0], len(labels)
    path_scores = []
    # An alignment is T + U symbols ending with a blank; choose which of the first T + U - 1 slots emit labels.
    for emit_slots in itertools.combinations(range(frames + num_labels - 1), num_labels):
        t, u, score = 0, 0, log_probs.new_zeros(())
        for slot in range(frames + num_labels):
            if slot in emit_slots:
                score = score + log_probs[t, u, labels[u]]
                u += 1
            else:
                score = score + log_probs[t, u, blank]
                t += 1
        path_scores.append(score)
    return -torch.logsumexp(torch.stack(path_scores), dim=0)


def _random_case(
    max_frames: int, max_labels: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    generator = torch.Generator().manual_seed(seed)
    batch = 3
    num_classes = int(torch.randint(2, 5, (), generator=generator))
    blank = int(torch.randint(0, num_classes, (), generator=generator))
    logits = 2.0 * torch.randn(batch, max_frames, max_labels + 1, num_classes, generator=generator, dtype=torch.float64)
    non_blank = [c for c in range(num_classes) if c != blank]
    choice = torch.randint(0, len(non_blank), (batch, max_labels), generator=generator)
    targets = torch.tensor(non_blank)[choice].long()
    logit_lengths = torch.randint(1, max_frames + 1, (batch,), generator=generator)
    logit_lengths[0] = max_frames
    target_lengths = torch.randint(0, max_labels + 1, (batch,), generator=generator)
    target_lengths[0] = max_labels
    targets[torch.arange(max_labels) >= target_lengths[:, None]] = -1  # padding must be ignored
    return logits, targets, logit_lengths, target_lengths, blank


@pytest.mark.parametrize("max_labels", range(4))
@pytest.mark.parametrize("max_frames", range(1, 5))
def test_value_and_gradient_match_brute_force(max_frames: int, max_labels: int) -> None:
    # Both scan directions are covered: rows along T when T <= U + 1, along U + 1 otherwise.
    case = _random_case(max_frames, max_labels, seed=max_frames * 4 + max_labels)
    logits, targets, logit_lengths, target_lengths, blank = case
    ours_input = logits.clone().requires_grad_(True)
    ours = rnnt_loss(ours_input, targets, logit_lengths, target_lengths, blank=blank)
    weights = torch.arange(1.0, len(ours) + 1, dtype=torch.float64)  # distinct weights catch mixed-up rows
    (ours * weights).sum().backward()

    reference_input = logits.clone().requires_grad_(True)
    log_probs = reference_input.log_softmax(dim=-1)
    reference = torch.stack(
        [
            _brute_force_nll(
                log_probs[b, : int(logit_lengths[b]), : int(target_lengths[b]) + 1],
                targets[b, : int(target_lengths[b])].tolist(),
                blank,
            )
            for b in range(len(logits))
        ]
    )
    (reference * weights).sum().backward()

    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(ours_input.grad, reference_input.grad, rtol=1e-4, atol=1e-8)


def test_gradient_is_zero_on_padding() -> None:
    logits = torch.randn(2, 6, 4, 5, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [2, 0, 0]])
    rnnt_loss(logits, targets, torch.tensor([6, 4]), torch.tensor([3, 1]), blank=4).sum().backward()
    grad = logits.grad
    assert grad is not None
    assert torch.all(grad[1, 4:] == 0)  # frames beyond logit length
    assert torch.all(grad[1, :, 2:] == 0)  # label positions beyond target length + 1
    assert grad[1, :4, :2].abs().sum() > 0
    assert grad[0].abs().sum() > 0


def test_long_lattice_float32_matches_float64() -> None:
    logits = torch.randn(2, 300, 21, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(1, 32, (2, 20), generator=torch.Generator().manual_seed(1))
    lengths, target_lengths = torch.tensor([300, 250]), torch.tensor([20, 13])
    single = rnnt_loss(logits, targets, lengths, target_lengths, blank=0)
    double = rnnt_loss(logits.double(), targets, lengths, target_lengths, blank=0)
    torch.testing.assert_close(single.double(), double, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize(("frames", "labels"), [(1, 0), (1, 2), (3, 0)])
def test_edge_cases_are_finite(frames: int, labels: int) -> None:
    logits = torch.randn(1, frames, labels + 1, 3, requires_grad=True)
    targets = torch.ones(1, labels, dtype=torch.long)
    nll = rnnt_loss(logits, targets, torch.tensor([frames]), torch.tensor([labels]), blank=0)
    nll.sum().backward()
    assert torch.isfinite(nll).all()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    if frames == 1 and labels == 0:
        torch.testing.assert_close(nll[0], -logits.log_softmax(-1)[0, 0, 0, 0])


def test_probabilities_of_all_label_sequences_sum_below_one() -> None:
    # With T = 2 frames and at most 2 labels from 2 classes, enumerate label sequences; total mass < 1.
    logits = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    total = 0.0
    for length in range(3):
        for labels in itertools.product([1, 2], repeat=length):
            padded = torch.tensor([list(labels) + [1] * (2 - length)])
            nll = rnnt_loss(logits, padded, torch.tensor([2]), torch.tensor([length]), blank=0)
            total += math.exp(-float(nll[0]))
    assert 0.0 < total < 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logits": torch.zeros(1, 2, 3)}, "logits must be"),
        ({"targets": torch.zeros(1, 3, dtype=torch.long)}, "U \\+ 1 = 4"),
        ({"logit_lengths": torch.tensor([3])}, "logit_lengths must lie in \\[1, T=2\\], got \\[3\\]"),
        ({"logit_lengths": torch.tensor([0])}, "logit_lengths must lie"),
        ({"target_lengths": torch.tensor([3])}, "target_lengths must lie in \\[0, U=2\\], got \\[3\\]"),
        ({"targets": torch.tensor([[1, 4]])}, "got \\[4\\]"),
        ({"targets": torch.tensor([[1, 0]])}, "other than blank=0"),
        ({"blank": 4}, "blank=4"),
    ],
)
def test_invalid_inputs_raise(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "logits": torch.zeros(1, 2, 3, 4),
        "targets": torch.tensor([[1, 2]]),
        "logit_lengths": torch.tensor([2]),
        "target_lengths": torch.tensor([2]),
        "blank": 0,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rnnt_loss(**arguments)  # type: ignore[arg-type]


def test_fastemit_keeps_the_loss_and_scales_the_gradient_of_label_emissions() -> None:
    """FastEmit (Yu et al. 2021): the same loss value, and a gradient that is the plain one plus lambda times the
    part flowing through label emissions (so it is linear in lambda and differs from the plain one)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    targets, t_lens, u_lens = torch.tensor([[1, 2, 3], [3, 1, 0]]), torch.tensor([6, 4]), torch.tensor([3, 2])

    def grad(lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.clone().requires_grad_(True)
        loss = rnnt_loss(x, targets, t_lens, u_lens, blank=4, fastemit_lambda=lam).sum()
        loss.backward()
        assert x.grad is not None
        return loss.detach(), x.grad

    plain_value, plain_grad = grad(0.0)
    fast_value, fast_grad = grad(0.5)
    assert torch.allclose(plain_value, fast_value)
    assert not torch.allclose(plain_grad, fast_grad)
    double_value, double_grad = grad(1.0)
    assert torch.allclose(fast_grad - plain_grad, 0.5 * (double_grad - plain_grad), atol=1e-10)


def test_emission_bonus_matches_brute_force_with_weighted_alignments() -> None:
    # The bonus is a log-weight on each label emission: the loss is -log sum_a P(a) exp(sum of a's bonuses).
    logits, targets, logit_lengths, target_lengths, blank = _random_case(4, 3, seed=11)
    bonus = torch.randn(logits.shape[0], logits.shape[1], targets.shape[1], dtype=torch.float64)
    ours = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=blank, emission_bonus=bonus)
    log_probs = logits.log_softmax(dim=-1).clone()
    for b in range(len(logits)):
        for u in range(int(target_lengths[b])):
            log_probs[b, :, u, int(targets[b, u])] += bonus[b, :, u]
    reference = torch.stack(
        [
            _brute_force_nll(
                log_probs[b, : int(logit_lengths[b]), : int(target_lengths[b]) + 1],
                targets[b, : int(target_lengths[b])].tolist(),
                blank,
            )
            for b in range(len(logits))
        ]
    )
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="emission_bonus must be"):
        rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=blank, emission_bonus=bonus[:, :2])
