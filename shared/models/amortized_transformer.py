"""Compute-cost amortized streaming Transformer encoder (Xie et al., Interspeech 2022, arXiv 2207.02393).

The dense ``CausalTransformerEncoder`` with, in every block, a light frame-level *arbitrator* that switches the
block's attention (MHA) and feed-forward (FFN) sub-blocks on or off for each frame. A skipped sub-block outputs
zeros for that frame, so the residual carries the frame on unchanged. How much to skip is learned from a
compute-cost term, ``EncoderOutput.compute_cost``, that training adds to its loss as ``lambda * compute_cost``.
The paper publishes the idea and its result (60% less compute at +3% relative WER); the choices below are ours::

    block input x (B, t', D) --> arbitrator: LayerNorm -> Linear(D, A) -> ReLU -> Linear(A, 2) -> [MHA, FFN] logits
        x = x + g_mha * MHA(LN(x))          g in {0, 1} per frame
        x = x + g_ffn * FFN(LN(x))

Design decisions (not published in the paper):
    * Arbitrator: one per block, reading only the current frame's block input. A later block's decision thus sees
      what the earlier blocks did, and a gate depends on nothing that is not already computed, so streaming stays
      exact. Its cost (about 2% of a block with the defaults) is counted in ``compute_cost``. Its last layer starts
      with bias ``init_bias`` (2: p_on = 0.88) and tiny weights (std 0.01): every eval-mode gate starts on, so a
      model made ``from_dense`` starts as exactly the dense model and training starts by sampling the dense
      computation most of the time, while gradients reach every arbitrator weight from the first step.
    * Estimator: straight-through Gumbel-sigmoid. In training a gate is the hard decision 1[logit + n > 0] with
      logistic noise n (so it is on with probability sigmoid(logit)); its backward pass is the gradient of the
      relaxed sigmoid((logit + n) / temperature). The training forward pass thus runs exactly the on/off computation
      inference runs (no mismatch from soft gates), while gradients still reach the arbitrator. In eval mode gates
      are deterministic: sigmoid(logit) > threshold, no noise.
    * Keys and values: a frame whose MHA is off writes no key/value; later frames do not attend to it, in training
      too (a key mask derived from the hard gates; it carries no gradient). Inference therefore skips such a
      frame's q/k/v projections entirely, and the streaming cache holds only active frames' keys and values with
      their absolute positions. The window is the dense model's window in *time*: frame t attends to the active
      frames s with t - W <= s <= t, so a cache holds at most W entries. In training an off frame's own attention
      output (zeroed by its gate) is computed as if it were on (it sees itself and the active frames): that is the
      counterfactual the straight-through gradient needs, and a query never faces an empty key set (no NaN).
    * ``compute_cost``: the expected executed share of the blocks' compute, averaged over valid frames:
      sum_l (p_mha F_mha + p_ffn F_ffn + F_arb) / sum_l (F_mha + F_ffn + F_arb), with p = sigmoid(logit)
      (differentiable; a forced gate contributes its constant 0 or 1) and the per-frame FLOPs of
      ``shared.models.flops`` (attention scored against W + 1 keys, element-wise ops included). A block whose two
      gates are both forced runs no arbitrator and counts none (F_arb = 0). The arbitrators sit in the
      denominator too, so the cost stays in [0, 1] as ``EncoderOutput`` promises (1 = everything ran; without
      them a small model's cost exceeds 1 when most gates are on). That changes the gradient with respect to
      each p only by a constant factor (a rescaling of lambda). The saving against the dense model, arbitrators
      included, is ``shared.models.flops.encoder_flops_per_second`` with the measured on-rates.
    * Execution: training (and ``gather=False``) runs each sub-block on the full (B, t', D) tensor and multiplies
      its output by the gate: the differentiable masked path, batch-first everywhere as Opacus needs. Inference
      (eval mode, where ``gather`` defaults to True) gathers the frames whose gate is on, runs the sub-block on
      them alone (attention: their queries against the active keys, the band mask built from their positions),
      scatters the results back, and calls no part of a sub-block when none of its frames is on. Both paths give
      the same frames in eval mode. ``CausalSelfAttention``'s layers (``qkv``, ``out``) are reused, its
      ``forward`` is not: it cannot mask keys. Speed (eager PyTorch, one CPU thread, batch 1, 8 s of audio): a
      sub-block skipped for a whole chunk saves its time (half the blocks off: 53% of the FLOPs, ~70% of the
      time), but skipping single frames inside 4- to 16-frame chunks saves FLOPs, not time (small matmuls are
      bound by reading the weights, and gathering adds per-operation overhead); it pays off from chunks of
      about a whole utterance.
    * Padding: frames beyond an utterance's length in ``forward`` have every gate off, so no compute is spent on
      them; causality keeps them from affecting valid frames either way.

Legend of tensor symbols (see also ``shared/models/encoder.py`` and ``shared/models/transformer.py``):
    B   batch size
    T   input feature frames (10 ms);  t  input frames in one streaming chunk
    T'  encoder frames (40 ms);        t' encoder frames of one block input (an utterance's or a chunk's)
    F   feature dimension (``input_dim``);  D  model dimension;  H  heads;  d_h = D / H
    A   arbitrator hidden dimension (``arbitrator_dim``)
    W   ``left_context``: past frames, in time, a frame may attend to (itself excluded)
    N   frames whose sub-block is on, over the whole batch (gathered path)
    n   the most frames whose sub-block is on in one utterance (gathered path pads to it)
    c   entries in a layer's key/value cache (active frames only), c <= W
    p   pending input frames not yet consumed by the front end, p <= 6

Example:
    >>> from shared.models.transformer import CausalTransformerEncoder, TransformerConfig
    >>> dense = CausalTransformerEncoder(TransformerConfig(num_layers=2)).eval()
    >>> encoder = AmortizedTransformerEncoder.from_dense(dense)  # every gate starts on: the dense model
    >>> feats, lengths = torch.randn(1, 100, 80), torch.tensor([100])
    >>> torch.allclose(encoder(feats, lengths).frames, dense(feats, lengths).frames, atol=1e-5)
    True
    >>> encoder.set_forced_gates(mha=None, ffn=False, layers=[1])  # never run block 1's feed-forward
    >>> encoder.reset_gate_stats()
    >>> state, pieces = encoder.init_state(batch_size=1), []
    >>> for chunk in feats.split(16, dim=1):
    ...     frames, state = encoder.infer(chunk, state)
    ...     pieces.append(frames)
    >>> torch.cat(pieces, dim=1).shape, encoder.gate_stats().ffn_rate
    (torch.Size([1, 24, 144]), (1.0, 0.0))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.models.encoder import BlockList, EncoderOutput, check_batch, rotary_tables, rotate, state_reference
from shared.models.flops import arbitrator_flops_per_frame, ffn_flops_per_frame, mha_flops_per_frame
from shared.models.transformer import (
    CausalSelfAttention,
    CausalTransformerEncoder,
    ConvSubsampling,
    FeedForward,
    TransformerConfig,
    TransformerState,
    stream_blocks,
    subsampled_length,
)

__all__ = [
    "ActiveKVCache",
    "AmortizedBlock",
    "AmortizedConfig",
    "AmortizedState",
    "AmortizedTransformerEncoder",
    "Arbitrator",
    "BlockGates",
    "GateStats",
    "is_arbitrator",
]


def is_arbitrator(name: str) -> bool:
    """Whether a parameter or state-dict key of an amortized model belongs to an arbitrator (the part a dense
    checkpoint lacks)."""
    return ".arbitrator." in name


@dataclass(frozen=True)
class AmortizedConfig:
    """Sizes and gate settings of ``AmortizedTransformerEncoder``."""

    base: TransformerConfig = field(default_factory=TransformerConfig)  # the dense sizes: dense weights load as is
    arbitrator_dim: int = 32  # small: it runs on every frame of every block (about 2% of a block's FLOPs)
    temperature: float = 1.0  # tau of the relaxed sigmoid in the backward pass; 1 = the logistic's own sigmoid
    init_bias: float = 2.0  # p_on = sigmoid(2) = 0.88 at start: training starts close to the dense model
    threshold: float = 0.5  # eval gate on iff sigmoid(logit) > threshold; 0.5 = the training distribution's mode

    def __post_init__(self) -> None:
        if self.arbitrator_dim < 1:
            raise ValueError(f"arbitrator_dim must be positive, got {self.arbitrator_dim}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not math.isfinite(self.init_bias):
            raise ValueError(f"init_bias must be finite, got {self.init_bias}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")
        if self.base.conv_kernel:
            raise ValueError(
                f"the amortized encoder has no convolution module: base.conv_kernel must be 0, got {self.base.conv_kernel}"
            )


class ActiveKVCache(NamedTuple):
    """One layer's attention memory: rotated keys and values of the active frames of the last W frames of time.

    Utterances of a batch keep different numbers of active frames; entries past an utterance's count are padding
    (``active`` False).

    Attributes:
        key: (B, H, c, d_h) keys, rotated by RoPE at their positions.
        value: (B, H, c, d_h).
        position: (B, c) int64 absolute encoder-frame positions of the entries, increasing.
        active: (B, c) bool, False for padding entries.
    """

    key: Tensor
    value: Tensor
    position: Tensor
    active: Tensor


AmortizedState = TransformerState  # of one ActiveKVCache per block: TransformerState[ActiveKVCache]


class BlockGates(NamedTuple):
    """One block's gate decisions for a (B, t') block input.

    Attributes:
        mha: (B, t') attention gates, exactly 0 or 1 (0 beyond an utterance's length); in training they carry the
            straight-through gradient.
        ffn: (B, t') feed-forward gates, likewise.
        mha_probability: (B, t') sigmoid(logit) of the attention gates (the forced value where forced).
        ffn_probability: (B, t') likewise for the feed-forward gates.
        arbitrated: whether the arbitrator ran (False when both gates of the block are forced).
    """

    mha: Tensor
    ffn: Tensor
    mha_probability: Tensor
    ffn_probability: Tensor
    arbitrated: bool


@dataclass(frozen=True)
class GateStats:
    """Gate counts accumulated since the last ``reset_gate_stats``, over valid frames.

    Attributes:
        frames: encoder frames passed through the blocks.
        mha_on: per block, frames whose attention sub-block ran (sampled gates in training).
        ffn_on: per block, frames whose feed-forward sub-block ran.
    """

    frames: int
    mha_on: tuple[int, ...]
    ffn_on: tuple[int, ...]

    @property
    def mha_rate(self) -> tuple[float, ...]:
        """Per block, the share of frames whose attention ran (0 before any frame)."""
        return tuple(on / self.frames if self.frames else 0.0 for on in self.mha_on)

    @property
    def ffn_rate(self) -> tuple[float, ...]:
        """Per block, the share of frames whose feed-forward ran."""
        return tuple(on / self.frames if self.frames else 0.0 for on in self.ffn_on)

    @property
    def executed_share(self) -> float:
        """Share of all (block, sub-block, frame) triples executed, unweighted by FLOPs."""
        rates = self.mha_rate + self.ffn_rate
        return sum(rates) / len(rates) if rates else 0.0


class Arbitrator(nn.Module):
    """Per-frame gate logits of one block: LayerNorm -> Linear(D, A) -> ReLU -> Linear(A, 2) -> [MHA, FFN].

    Causal per frame: frame i's logits depend on frame i's block input only.
    """

    def __init__(self, d_model: int, hidden_dim: int, init_bias: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.hidden = nn.Linear(d_model, hidden_dim)
        self.out = nn.Linear(hidden_dim, 2)
        nn.init.normal_(self.out.weight, std=0.01)  # logits start at init_bias, yet every weight gets a gradient
        nn.init.constant_(self.out.bias, init_bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, t', D) block inputs -> (B, t', 2) logits of the [MHA, FFN] gates."""
        return self.out(F.relu(self.hidden(self.norm(x))))


def _straight_through_gumbel(logit: Tensor, temperature: float) -> Tensor:
    """Hard sample 1[logit + n > 0], n ~ Logistic(0, 1), with the gradient of sigmoid((logit + n) / tau).

    ``hard + (relaxed - relaxed.detach())`` is exactly ``hard`` in the forward pass (x - x = 0 exactly).
    """
    uniform = torch.rand_like(logit).clamp(1e-6, 1.0 - 1e-6)
    noisy = logit + (torch.log(uniform) - torch.log1p(-uniform))
    relaxed = torch.sigmoid(noisy / temperature)
    hard = (noisy > 0).to(logit.dtype)
    return hard + (relaxed - relaxed.detach())


def _attend(
    qkv: Tensor,
    positions: Tensor,
    is_key: Tensor,
    cache: ActiveKVCache,
    rotary: tuple[Tensor, Tensor],
    num_heads: int,
    left_context: int,
) -> tuple[Tensor, ActiveKVCache]:
    """Attention of n query frames over the cached active keys and the active ones among themselves.

    Query i (at ``positions[:, i]``) attends to key j iff key j is active (cached and active, or ``is_key``) and
    lies in its window (0 <= position_i - position_j <= W), and always to itself: for an active query that is
    the dense rule, for an inactive one (its output is discarded or zeroed by its gate) the counterfactual "if it
    were on", which also keeps every row of the mask non-empty.

    Args:
        qkv: (B, n, 3D) projected queries, keys and values.
        positions: (B, n) int64 absolute positions of the n frames.
        is_key: (B, n) bool, frames that write their key/value (MHA on; not padding).
        cache: the c active entries before these frames.
        rotary: cosines and sines (B or 1, 1, n, d_h / 2) of the n frames' RoPE angles.
        num_heads: H.
        left_context: W.

    Returns:
        (B, n, D) attended values (before the output projection), and the cache extended by the n frames
        (c + n entries; ``active`` = ``is_key`` for the new ones).
    """
    batch, count, width = qkv.shape
    d_model = width // 3
    qkv = qkv.view(batch, count, 3, num_heads, d_model // num_heads).permute(2, 0, 3, 1, 4)
    query, key = rotate(qkv[:2], *rotary).unbind(0)
    extended = ActiveKVCache(
        key=torch.cat([cache.key, key], dim=2),
        value=torch.cat([cache.value, qkv[2]], dim=2),
        position=torch.cat([cache.position, positions], dim=1),
        active=torch.cat([cache.active, is_key], dim=1),
    )
    distance = positions[:, :, None] - extended.position[:, None, :]
    mask = (distance >= 0) & (distance <= left_context) & extended.active[:, None, :]
    diagonal = torch.arange(count, device=qkv.device)
    mask[:, diagonal, cache.key.shape[2] + diagonal] = True
    attended = F.scaled_dot_product_attention(query, extended.key, extended.value, attn_mask=mask.unsqueeze(1))
    return attended.transpose(1, 2).reshape(batch, count, d_model), extended


def _first_true(mask: Tensor) -> tuple[Tensor, Tensor]:
    """mask (B, m) bool -> index (B, k) of each row's True entries first, in order, and valid (B, k).

    k is the largest number of True entries in a row; ``valid`` marks the index entries that point at one.
    """
    if mask.shape[0] == 1:
        index = mask[0].nonzero().view(1, -1)
        return index, torch.ones_like(index, dtype=torch.bool)
    counts = mask.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    index = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return index, torch.arange(width, device=mask.device)[None, :] < counts[:, None]


def _forget(cache: ActiveKVCache, horizon: int) -> ActiveKVCache:
    """The cache without its padding and the entries before ``horizon`` (no later frame can see them)."""
    keep = cache.active & (cache.position >= horizon)
    if bool(keep.all()):
        return cache
    index, active = _first_true(keep)
    if keep.shape[0] == 1 and index.shape[1] > 0:
        first, last = int(index[0, 0]), int(index[0, -1])
        if last - first + 1 == index.shape[1]:  # one contiguous run (the usual case): slice, as the dense model
            kept = slice(first, last + 1)
            return ActiveKVCache(cache.key[:, :, kept], cache.value[:, :, kept], cache.position[:, kept], active)
    gather = index[:, None, :, None].expand(-1, cache.key.shape[1], -1, cache.key.shape[3])
    return ActiveKVCache(
        key=cache.key.gather(2, gather),
        value=cache.value.gather(2, gather),
        position=cache.position.gather(1, index),
        active=active,
    )


class AmortizedBlock(nn.Module):
    """Pre-LayerNorm Transformer block whose MHA and FFN sub-blocks an arbitrator switches per frame.

    Submodule names equal ``TransformerBlock``'s (plus ``arbitrator``), so dense weights load unchanged.
    ``forced_mha`` / ``forced_ffn`` (None, True or False) override the arbitrator for tests and benchmarks.
    """

    def __init__(self, config: AmortizedConfig) -> None:
        super().__init__()
        base = config.base
        self.attention_norm = nn.LayerNorm(base.d_model)
        self.attention = CausalSelfAttention(base.d_model, base.num_heads, base.left_context)
        self.feed_forward_norm = nn.LayerNorm(base.d_model)
        self.feed_forward = FeedForward(base.d_model, base.ffn_dim, base.dropout)
        self.dropout = nn.Dropout(base.dropout)
        self.arbitrator = Arbitrator(base.d_model, config.arbitrator_dim, config.init_bias)
        self.temperature = config.temperature
        self.threshold = config.threshold
        self.forced_mha: bool | None = None
        self.forced_ffn: bool | None = None

    def gates(self, x: Tensor, valid: Tensor) -> BlockGates:
        """Gate decisions for x (B, t', D); valid (B, t') bool marks the frames within utterance lengths."""
        forced = (self.forced_mha, self.forced_ffn)
        weights = valid.to(x.dtype)
        arbitrated = any(force is None for force in forced)
        decisions = probabilities = None
        if arbitrated:
            logits = self.arbitrator(x)
            probabilities = torch.sigmoid(logits)
            if self.training:
                decisions = _straight_through_gumbel(logits, self.temperature)
            else:
                decisions = (probabilities > self.threshold).to(x.dtype)
            decisions = decisions * weights.unsqueeze(-1)
        columns: list[tuple[Tensor, Tensor]] = []
        for column, force in enumerate(forced):
            if force is None:
                assert decisions is not None and probabilities is not None  # the arbitrator ran
                columns.append((decisions[..., column], probabilities[..., column]))
            else:
                constant = weights * float(force)
                columns.append((constant, constant))
        (mha, mha_probability), (ffn, ffn_probability) = columns
        return BlockGates(mha, ffn, mha_probability, ffn_probability, arbitrated)

    def forward(
        self,
        x: Tensor,
        cache: ActiveKVCache,
        offset: int,
        valid: Tensor,
        *,
        gather: bool = False,
        update_cache: bool = True,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, ActiveKVCache, BlockGates]:
        """Run the block on frames ``offset .. offset + t' - 1``.

        Args:
            x: (B, t', D) block inputs.
            cache: the active keys/values of the frames before ``offset``.
            offset: absolute position of x's first frame.
            valid: (B, t') bool, False for padding frames (their gates are off).
            gather: run only the active frames' sub-blocks (eval mode only) instead of the masked full tensors.
            update_cache: return the cache for the frames after these (False: return ``cache`` unchanged).
            rotary: RoPE cosines and sines (t', d_h / 2) of these frames, if already computed (by the encoder,
                once for all blocks).

        Returns:
            (B, t', D) block outputs, the new cache and the gates.
        """
        if gather and self.training:
            raise ValueError(
                "gather=True runs only in eval mode: training's straight-through gradient needs every frame's sub-block output"
            )
        gates = self.gates(x, valid)
        if x.shape[1] == 0:
            return x, cache, gates
        if rotary is None:
            rotary = rotary_tables(offset, x.shape[1], self.attention.d_head, x)
        if gather:
            x, extended = self._attention_gathered(x, cache, offset, gates.mha > 0, rotary)
            x = self._feed_forward_gathered(x, gates.ffn > 0)
        else:
            x, extended = self._attention_masked(x, cache, offset, gates.mha, rotary)
            x = self._feed_forward_masked(x, gates.ffn)
        if update_cache:
            cache = _forget(extended, horizon=offset + x.shape[1] - self.attention.left_context)
        return x, cache, gates

    def _attention_masked(
        self, x: Tensor, cache: ActiveKVCache, offset: int, gate: Tensor, rotary: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, ActiveKVCache]:
        """Training path: every frame's attention, multiplied by its gate; off frames write no key/value."""
        on = gate.detach() > 0
        if not gate.requires_grad and not bool(on.any()):
            return x, cache
        positions = (offset + torch.arange(x.shape[1], device=x.device)).expand(x.shape[0], -1)
        cos, sin = rotary
        attended, extended = _attend(
            self.attention.qkv(self.attention_norm(x)),
            positions,
            on,
            cache,
            (cos[None, None], sin[None, None]),
            self.attention.num_heads,
            self.attention.left_context,
        )
        return x + self.dropout(self.attention.out(attended) * gate.unsqueeze(-1)), extended

    def _feed_forward_masked(self, x: Tensor, gate: Tensor) -> Tensor:
        """Training path: every frame's feed-forward output, multiplied by its gate."""
        if not gate.requires_grad and not bool((gate > 0).any()):
            return x
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x), frame_mask=gate))

    def _attention_gathered(
        self, x: Tensor, cache: ActiveKVCache, offset: int, on: Tensor, rotary: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, ActiveKVCache]:
        """Inference path: attention for the active frames alone, over the active keys alone."""
        if not bool(on.any()):
            return x, cache
        heads, left_context = self.attention.num_heads, self.attention.left_context
        cos, sin = rotary
        if bool(on.all()):  # nothing to gather
            positions = (offset + torch.arange(x.shape[1], device=x.device)).expand(x.shape[0], -1)
            qkv = self.attention.qkv(self.attention_norm(x))
            attended, extended = _attend(qkv, positions, on, cache, (cos[None, None], sin[None, None]), heads, left_context)
            return x + self.attention.out(attended), extended
        index, slots = _first_true(on)
        selected = x[on]
        projected = self.attention.qkv(self.attention_norm(selected))
        if x.shape[0] == 1 or bool(slots.all()):
            qkv = projected.view(x.shape[0], index.shape[1], -1)
        else:
            qkv = projected.new_zeros(x.shape[0], index.shape[1], projected.shape[1])
            qkv[slots] = projected
        rotary_at = (cos[index].unsqueeze(1), sin[index].unsqueeze(1))
        attended, extended = _attend(qkv, offset + index, slots, cache, rotary_at, heads, left_context)
        update = self.attention.out(attended[slots])
        return x.index_put((on,), selected + update), extended

    def _feed_forward_gathered(self, x: Tensor, on: Tensor) -> Tensor:
        """Inference path: the feed-forward of the active frames alone."""
        if not bool(on.any()):
            return x
        if bool(on.all()):
            return x + self.feed_forward(self.feed_forward_norm(x))
        selected = x[on]
        update = self.feed_forward(self.feed_forward_norm(selected).unsqueeze(0)).squeeze(0)
        return x.index_put((on,), selected + update)


class AmortizedTransformerEncoder(nn.Module):
    """Compute-amortized streaming Transformer encoder implementing ``shared.models.encoder.StreamingEncoder``.

    ``forward`` (whole padded utterances) and ``infer`` (chunk by chunk) give the same frames for any chunking in
    eval mode (up to float error; a gate whose sigmoid(logit) lies within float error of the threshold could flip).
    Frames beyond an utterance's length are zeros in ``forward``'s output. ``compute_cost`` is differentiable in
    training: add ``lambda * compute_cost`` to the loss to trade accuracy for compute.
    """

    def __init__(self, config: AmortizedConfig) -> None:
        super().__init__()
        base = config.base
        self.config = config
        self.input_dim = base.input_dim
        self.output_dim = base.d_model
        self.frontend = ConvSubsampling(base.input_dim, base.d_model)
        self.frontend_dropout = nn.Dropout(base.dropout)
        self.blocks = BlockList(AmortizedBlock(config) for _ in range(base.num_layers))
        self.final_norm = nn.LayerNorm(base.d_model)
        self.mha_flops = float(mha_flops_per_frame(base.d_model, base.num_heads, base.left_context + 1))
        self.ffn_flops = float(ffn_flops_per_frame(base.d_model, base.ffn_dim))
        self.arbitrator_flops = float(arbitrator_flops_per_frame(base.d_model, config.arbitrator_dim))
        self._stat_frames = 0
        self._stat_mha = [0] * base.num_layers
        self._stat_ffn = [0] * base.num_layers

    @classmethod
    def from_dense(cls, dense: CausalTransformerEncoder, config: AmortizedConfig | None = None) -> AmortizedTransformerEncoder:
        """An amortized encoder with ``dense``'s weights (arbitrators freshly initialized), in ``dense``'s mode.

        ``config.base`` must equal ``dense.config``; by default ``AmortizedConfig(base=dense.config)``.
        """
        config = AmortizedConfig(base=dense.config) if config is None else config
        if config.base != dense.config:
            raise ValueError(f"config.base {config.base} differs from the dense encoder's config {dense.config}")
        reference = next(dense.parameters())
        model = cls(config).to(device=reference.device, dtype=reference.dtype)
        missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
        foreign = [key for key in missing if not is_arbitrator(key)] + list(unexpected)
        if foreign:
            raise ValueError(f"dense weights do not map onto the amortized encoder: {foreign}")
        return model.train(dense.training)

    def set_forced_gates(self, mha: bool | None = None, ffn: bool | None = None, layers: Iterable[int] | None = None) -> None:
        """Force the gates of ``layers`` (default: all blocks): True = always on, False = never run, None = let the
        arbitrator decide. Sets both sub-blocks of every listed block. Not saved in the state dict."""
        for name, value in (("mha", mha), ("ffn", ffn)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True, False or None, got {value!r}")
        indices = list(range(len(self.blocks))) if layers is None else list(layers)
        for index in indices:
            if not 0 <= index < len(self.blocks):
                raise ValueError(f"layer {index} is out of range [0, {len(self.blocks)})")
        for index in indices:
            block = self.blocks[index]
            block.forced_mha, block.forced_ffn = mha, ffn

    def forced_gates(self) -> tuple[tuple[bool | None, bool | None], ...]:
        """Per block, the (mha, ffn) forcing set by ``set_forced_gates``."""
        return tuple((block.forced_mha, block.forced_ffn) for block in self.blocks)

    def gate_stats(self) -> GateStats:
        """Gate counts over the valid frames of every ``forward`` / ``infer`` since the last reset."""
        return GateStats(frames=self._stat_frames, mha_on=tuple(self._stat_mha), ffn_on=tuple(self._stat_ffn))

    def reset_gate_stats(self) -> None:
        """Zero the counts ``gate_stats`` reports."""
        self._stat_frames = 0
        self._stat_mha = [0] * len(self.blocks)
        self._stat_ffn = [0] * len(self.blocks)

    def subsampled_length(self, lengths: Tensor) -> Tensor:
        """(B,) input frame counts -> (B,) encoder frame counts."""
        return subsampled_length(lengths)

    def init_state(self, batch_size: int = 1, device: torch.device | None = None) -> TransformerState[ActiveKVCache]:
        """Fresh streaming state: nothing pending, empty caches, position 0."""
        reference = state_reference(self, batch_size, device)
        return AmortizedState(
            pending=reference.new_zeros(batch_size, 0, self.input_dim),
            layers=self._empty_caches(batch_size, reference),
            offset=0,
        )

    def _empty_caches(self, batch_size: int, reference: Tensor) -> tuple[ActiveKVCache, ...]:
        caches = []
        for block in self.blocks:
            empty = block.attention.empty_cache(batch_size, reference)
            position = torch.zeros(batch_size, 0, dtype=torch.long, device=reference.device)
            active = torch.zeros(batch_size, 0, dtype=torch.bool, device=reference.device)
            caches.append(ActiveKVCache(key=empty.key, value=empty.value, position=position, active=active))
        return tuple(caches)

    def _resolve_gather(self, gather: bool | None) -> bool:
        if gather is None:
            return not self.training
        if gather and self.training:
            raise ValueError(
                "gather=True runs only in eval mode: training's straight-through gradient needs every frame's sub-block output"
            )
        return gather

    def _encode(
        self,
        frames: Tensor,
        layers: tuple[ActiveKVCache, ...],
        offset: int,
        valid: Tensor,
        *,
        gather: bool,
        update_cache: bool,
    ) -> tuple[Tensor, tuple[ActiveKVCache, ...], tuple[BlockGates, ...]]:
        """Blocks and final norm over (B, t', D) subsampled frames starting at ``offset``; records gate counts."""
        frames = self.frontend_dropout(frames)
        rotary = rotary_tables(offset, frames.shape[1], self.blocks[0].attention.d_head, frames)
        new_layers, all_gates = [], []
        for block, cache in zip(self.blocks, layers, strict=True):
            frames, cache, gates = block(frames, cache, offset, valid, gather=gather, update_cache=update_cache, rotary=rotary)
            new_layers.append(cache)
            all_gates.append(gates)
        self._stat_frames += int(valid.sum())
        for index, gates in enumerate(all_gates):
            self._stat_mha[index] += int((gates.mha.detach() > 0).sum())
            self._stat_ffn[index] += int((gates.ffn.detach() > 0).sum())
        return self.final_norm(frames), tuple(new_layers), tuple(all_gates)

    def _compute_cost(self, gates: tuple[BlockGates, ...], valid: Tensor) -> Tensor:
        """Expected executed share of the blocks' FLOPs, averaged over valid frames (0 without any)."""
        weights = valid.to(gates[0].mha.dtype)
        expected = torch.zeros_like(weights)
        total = 0.0
        for block_gates in gates:
            arbitrator = self.arbitrator_flops if block_gates.arbitrated else 0.0
            expected = expected + block_gates.mha_probability * self.mha_flops
            expected = expected + block_gates.ffn_probability * self.ffn_flops + arbitrator
            total += self.mha_flops + self.ffn_flops + arbitrator
        return (expected * weights).sum() / (total * weights.sum().clamp(min=1.0))

    def encode_with_gates(
        self, feats: Tensor, lengths: Tensor, *, gather: bool | None = None
    ) -> tuple[EncoderOutput, tuple[BlockGates, ...]]:
        """``forward``, also returning every block's gates (for analysis and tests).

        Args:
            feats: (B, T, F) features, padded beyond ``lengths``.
            lengths: (B,) valid input frames per utterance, each in [0, T].
            gather: run only the active frames' sub-blocks; default: in eval mode. True in training raises.

        Returns:
            ``EncoderOutput`` (frames (B, T', D), zeros beyond each length; lengths (B,); compute_cost, a scalar)
            and one ``BlockGates`` of (B, T') tensors per block.
        """
        check_batch(feats, lengths, self.input_dim)
        gather = self._resolve_gather(gather)
        out_lengths = self.subsampled_length(lengths)
        frames = self.frontend(feats)
        valid = torch.arange(frames.shape[1], device=frames.device) < out_lengths.to(frames.device)[:, None]
        caches = self._empty_caches(feats.shape[0], frames)
        frames, _, gates = self._encode(frames, caches, 0, valid, gather=gather, update_cache=False)
        frames = frames * valid.unsqueeze(-1).to(frames.dtype)
        output = EncoderOutput(frames=frames, lengths=out_lengths, compute_cost=self._compute_cost(gates, valid))
        return output, gates

    def forward(self, feats: Tensor, lengths: Tensor, *, gather: bool | None = None) -> EncoderOutput:
        """Encode whole utterances: feats (B, T, F), lengths (B,) -> ``EncoderOutput`` (see ``encode_with_gates``)."""
        return self.encode_with_gates(feats, lengths, gather=gather)[0]

    def infer(self, chunk: Tensor, state: TransformerState[ActiveKVCache]) -> tuple[Tensor, TransformerState[ActiveKVCache]]:
        """``CausalTransformerEncoder.infer``: chunk (B, t, F) -> newly completed frames (B, t', D) and the new
        state, with gathered execution in eval mode."""

        def encode(frames: Tensor, layers: tuple[ActiveKVCache, ...], offset: int) -> tuple[Tensor, tuple[ActiveKVCache, ...]]:
            valid = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
            frames, layers, _ = self._encode(frames, layers, offset, valid, gather=not self.training, update_cache=True)
            return frames, layers

        return stream_blocks(self.frontend, self.input_dim, chunk, state, encode)
