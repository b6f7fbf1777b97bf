"""RNN-transducer loss (Graves 2012) in pure PyTorch, differentiated by autograd.

Legend of tensor symbols:
    B  batch size
    T  joiner time frames (encoder output frames, T' elsewhere in ``shared/models``)
    U  target tokens (the padded maximum); the lattice has U + 1 label positions
    V  output classes, blank included

The loss of one utterance is ``-log P(y | x)``, the log of the sum over all alignments of the ``(T_b, U_b + 1)``
lattice: an alignment moves from node ``(0, 0)`` to node ``(T_b - 1, U_b)`` by emitting blank (``t + 1``) or the next
label (``u + 1``) and ends with a final blank. With ``alpha[t, u]`` the log-probability of reaching node ``(t, u)``::

    alpha[0, 0] = 0
    alpha[t, u] = logaddexp(alpha[t - 1, u] + blank[t - 1, u], alpha[t, u - 1] + emit[t, u - 1])
    loss        = -(alpha[T_b - 1, U_b] + blank[T_b - 1, U_b])

How it is computed:
    1. ``logsumexp`` over V once, then the blank and label log-probabilities are gathered into ``(B, T, U + 1)``
       grids (log-softmax values are ``logits - logsumexp``, so no second ``(B, T, U + 1, V)`` tensor is kept for
       the backward pass).
    2. The recursion runs row by row along the shorter lattice side. Within a row the dependency on the left
       neighbour is linear in probability space, so the whole row is solved in one shot: with ``C`` the running
       sum of the in-row steps, ``alpha[m, :] = C + logcumsumexp(incoming - C)``. A lattice of ``T x (U + 1)``
       therefore costs ``min(T, U + 1)`` vectorized steps. The grids are V times smaller than the logits, so the
       recursion runs in float64: long running sums lose no precision for a negligible cost.
    3. Every lattice node is reachable from ``(0, 0)``, so all ``alpha`` values are finite (for finite logits):
       no ``-inf`` ever enters the recursion and no gradient can become NaN. Padding positions (``t >= T_b`` or
       ``u > U_b``) never feed ``alpha[T_b - 1, U_b]``, so their gradient is exactly zero.

Example:
    >>> logits = torch.randn(2, 5, 4, 6, requires_grad=True)
    >>> targets = torch.tensor([[1, 2, 3], [4, 1, 0]])
    >>> nll = rnnt_loss(logits, targets, torch.tensor([5, 3]), torch.tensor([3, 2]), blank=5)
    >>> nll.shape
    torch.Size([2])
    >>> nll.sum().backward()
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rnnt_loss"]


def _check_inputs(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor, blank: int) -> None:
    """Raise ``ValueError`` for any shape, length or label a caller could get wrong."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, T, U + 1, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    batch, max_frames, max_labels_plus_one, num_classes = logits.shape
    if targets.dim() != 2 or targets.shape[0] != batch:
        raise ValueError(f"targets must be (B={batch}, U), got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if targets.shape[1] + 1 != max_labels_plus_one:
        raise ValueError(
            f"logits' label axis must be U + 1 = {targets.shape[1] + 1} for targets of U = {targets.shape[1]} "
            f"tokens, got {max_labels_plus_one}"
        )
    for name, lengths in (("logit_lengths", logit_lengths), ("target_lengths", target_lengths)):
        if lengths.shape != (batch,):
            raise ValueError(f"{name} must be (B={batch},), got shape {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"{name} must be integers, got dtype {lengths.dtype}")
    if not 0 <= blank < num_classes:
        raise ValueError(f"blank={blank} is not a class index of V={num_classes} classes")
    if batch == 0:
        return
    if int(logit_lengths.min()) < 1 or int(logit_lengths.max()) > max_frames:
        raise ValueError(f"logit_lengths must lie in [1, T={max_frames}], got {logit_lengths.tolist()}")
    if int(target_lengths.min()) < 0 or int(target_lengths.max()) > targets.shape[1]:
        raise ValueError(f"target_lengths must lie in [0, U={targets.shape[1]}], got {target_lengths.tolist()}")
    valid = torch.arange(targets.shape[1], device=targets.device) < target_lengths.to(targets.device)[:, None]
    labels = targets[valid]
    bad = (labels < 0) | (labels >= num_classes) | (labels == blank)
    if bool(bad.any()):
        raise ValueError(
            f"targets must be labels in [0, V={num_classes}) other than blank={blank} within target_lengths; "
            f"got {sorted(set(labels[bad].tolist()))}"
        )


def _lattice_log_probs(logits: Tensor, targets: Tensor, target_lengths: Tensor, blank: int) -> tuple[Tensor, Tensor]:
    """Blank and label log-probabilities on the lattice.

    Args:
        logits: (B, T, U + 1, V).
        targets: (B, U); entries beyond ``target_lengths`` may hold anything.
        target_lengths: (B,).

    Returns:
        blank_lp: (B, T, U + 1) log P(blank | t, u), float64.
        emit_lp: (B, T, U) log P(targets[u] | t, u), float64.
    """
    batch, max_frames, _, _ = logits.shape
    max_labels = targets.shape[1]
    normalizer = torch.logsumexp(logits, dim=-1)
    valid = torch.arange(max_labels, device=targets.device) < target_lengths.to(targets.device)[:, None]
    safe_targets = targets.long().masked_fill(~valid, blank).to(logits.device)
    index = safe_targets[:, None, :, None].expand(batch, max_frames, max_labels, 1)
    emit_logits = logits[:, :, :max_labels].gather(dim=-1, index=index).squeeze(-1)
    blank_lp = (logits[..., blank] - normalizer).double()
    emit_lp = (emit_logits - normalizer[:, :, :max_labels]).double()
    return blank_lp, emit_lp


def _forward_variables(across: Tensor, along: Tensor) -> Tensor:
    """Log forward variables of a lattice scanned row by row.

    ``alpha[m, n] = logaddexp(alpha[m - 1, n] + across[m - 1, n], alpha[m, n - 1] + along[m, n - 1])`` with
    ``alpha[0, 0] = 0``. Each row is solved in closed form: with ``C[m, n] = sum_{j < n} along[m, j]``,
    ``alpha[m, n] = C[m, n] + logcumsumexp_n(incoming[m, n] - C[m, n])`` where ``incoming`` is the first term.

    Args:
        across: (B, M - 1, N) log-weights of the steps from row m - 1 to row m.
        along: (B, M, N - 1) log-weights of the steps within a row.

    Returns:
        alpha: (B, M, N).
    """
    running = torch.cat([along.new_zeros(along.shape[0], along.shape[1], 1), along.cumsum(dim=2)], dim=2)
    rows = [running[:, 0]]
    for m in range(1, running.shape[1]):
        incoming = rows[-1] + across[:, m - 1]
        rows.append(running[:, m] + torch.logcumsumexp(incoming - running[:, m], dim=1))
    return torch.stack(rows, dim=1)


def rnnt_loss(
    logits: Tensor,
    targets: Tensor,
    logit_lengths: Tensor,
    target_lengths: Tensor,
    *,
    blank: int,
    fastemit_lambda: float = 0.0,
    emission_bonus: Tensor | None = None,
) -> Tensor:
    """Per-utterance RNN-T negative log-likelihood.

    Args:
        logits: (B, T, U + 1, V) unnormalized joiner outputs.
        targets: (B, U) int64 label ids, padded beyond ``target_lengths`` with any value.
        logit_lengths: (B,) valid frames per utterance, each in [1, T].
        target_lengths: (B,) valid labels per utterance, each in [0, U].
        blank: index of the blank class in V.
        fastemit_lambda: FastEmit regularization (Yu et al. 2021): the gradient through every label emission is
            scaled by ``1 + lambda`` while the loss value is unchanged, which favours alignments that emit early
            and so concentrates each label's emission on few frames (what greedy search needs).
        emission_bonus: optional (B, T, U) log-weights added to the emission of ``targets[:, u]`` at frame t, e.g. a
            latency penalty on some labels (the turn tokens of ``SeparatorTransducer``); the result is then the
            negative log of the bonus-weighted sum over alignments, no longer a likelihood.

    Returns:
        (B,) ``-log P(targets | logits)`` in the dtype of ``logits``.

    Raises:
        ValueError: on inconsistent shapes, out-of-range lengths, or labels that are blank or not in [0, V).
    """
    _check_inputs(logits, targets, logit_lengths, target_lengths, blank)
    batch = logits.shape[0]
    if batch == 0:
        return logits.sum(dim=(1, 2, 3)) * 0.0
    blank_lp, emit_lp = _lattice_log_probs(logits, targets, target_lengths, blank)
    if fastemit_lambda:
        emit_lp = emit_lp * (1.0 + fastemit_lambda) - emit_lp.detach() * fastemit_lambda
    if emission_bonus is not None:
        if emission_bonus.shape != emit_lp.shape:
            raise ValueError(f"emission_bonus must be (B, T, U) = {tuple(emit_lp.shape)}, got {tuple(emission_bonus.shape)}")
        emit_lp = emit_lp + emission_bonus.to(emit_lp)
    max_frames, max_labels = emit_lp.shape[1], emit_lp.shape[2]
    if max_frames <= max_labels + 1:
        alpha = _forward_variables(across=blank_lp[:, :-1], along=emit_lp)
    else:
        alpha = _forward_variables(across=emit_lp.transpose(1, 2), along=blank_lp[:, :-1].transpose(1, 2))
        alpha = alpha.transpose(1, 2)
    rows = torch.arange(batch, device=alpha.device)
    last_t = logit_lengths.to(alpha.device).long() - 1
    last_u = target_lengths.to(alpha.device).long()
    log_likelihood = alpha[rows, last_t, last_u] + blank_lp[rows, last_t, last_u]
    return (-log_likelihood).to(logits.dtype)
