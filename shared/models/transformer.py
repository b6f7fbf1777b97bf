"""Causal streaming Transformer encoder: the dense baseline of Chorus.

A causal 4x convolutional front end, then pre-LayerNorm Transformer blocks whose self-attention lets every encoder
frame see itself and the ``left_context`` frames before it (a sliding causal window), with rotary position
embeddings (RoPE) on absolute frame positions. With ``conv_kernel`` > 0 each block also has Conformer's convolution
module (Gulati et al. 2020), made causal: a depthwise convolution over each frame and the ``conv_kernel - 1``
frames before it. Because nothing ever looks ahead, ``infer`` on consecutive chunks of ANY size reproduces
``forward`` exactly: the front end keeps the input frames it has not consumed yet, each block keeps the keys and
values of its last ``left_context`` frames (and its convolution's last ``conv_kernel - 1`` inputs), and the state
counts frames so RoPE stays absolute.

The parts (``ConvSubsampling``, ``CausalSelfAttention``, ``FeedForward``, ``TransformerBlock``) are public so that
the compute-amortized encoder can reuse them; attention and feed-forward take an optional per-frame mask that
scales (0 = skips) each frame's output.

Legend of tensor symbols (see also ``shared/models/encoder.py``):
    B   batch size
    T   input feature frames (10 ms);  t  input frames in one streaming chunk
    T'  encoder frames (40 ms);        t' encoder frames released by one chunk (or any block input length)
    F   feature dimension (``input_dim``)
    D   model dimension (``d_model``)
    H   attention heads;  d_h = D / H per-head dimension
    W   ``left_context``: past encoder frames each frame attends to, itself excluded (window of W + 1 frames)
    c   cached frames in a layer's key/value cache, c <= W
    K   ``conv_kernel``: frames one causal depthwise convolution sees (K - 1 of them kept between chunks)
    p   pending input frames not yet consumed by the front end, p <= 6

Example:
    >>> encoder = CausalTransformerEncoder(TransformerConfig(num_layers=2)).eval()
    >>> feats, lengths = torch.randn(2, 100, 80), torch.tensor([100, 61])
    >>> out = encoder(feats, lengths)
    >>> out.frames.shape, out.lengths.tolist()
    (torch.Size([2, 24, 144]), [24, 14])
    >>> state, pieces = encoder.init_state(batch_size=2), []
    >>> for chunk in feats.split(16, dim=1):
    ...     frames, state = encoder.infer(chunk, state)
    ...     pieces.append(frames)
    >>> streamed = torch.cat(pieces, dim=1)  # utterance 1 streamed on past its length: compare utterance 0
    >>> torch.allclose(streamed[0], out.frames[0], atol=1e-4)
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.models.encoder import (
    BlockList,
    CausalConv1d,
    EncoderOutput,
    check_batch,
    check_chunk,
    constant_cost,
    rotary_tables,
    rotate,
    state_reference,
)

__all__ = [
    "BlockCache",
    "CausalConvModule",
    "CausalSelfAttention",
    "CausalTransformerEncoder",
    "ConvSubsampling",
    "FeedForward",
    "LayerCache",
    "TransformerBlock",
    "TransformerConfig",
    "TransformerState",
    "stream_blocks",
    "sliding_window_config",
    "subsampled_length",
]


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of ``CausalTransformerEncoder``."""

    input_dim: int = 80  # 80 log-mel filterbank bins (kaldi-style fbank, the Chorus front end)
    d_model: int = 144  # the width of Conformer-S (Gulati et al. 2020): a small, on-device-sized model
    num_heads: int = 4  # d_h = 36: wide enough per head, even as RoPE requires
    ffn_dim: int = 576  # the customary 4 x d_model
    num_layers: int = 8  # deep enough for the amortized variant to have blocks worth skipping; fits on a device
    left_context: int = 64  # 64 past frames x 40 ms = 2.56 s of attention history, plus the frame itself
    dropout: float = 0.1  # standard Transformer regularization for small (100 h-scale) corpora
    conv_kernel: int = 0  # K of the causal convolution module in every block; 0: no convolution module

    def __post_init__(self) -> None:
        for name in ("input_dim", "d_model", "num_heads", "ffn_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads != 0 or (self.d_model // self.num_heads) % 2 != 0:
            raise ValueError(f"d_model={self.d_model} must split into num_heads={self.num_heads} heads of even size (RoPE)")
        if self.left_context < 0:
            raise ValueError(f"left_context must be >= 0, got {self.left_context}")
        if self.conv_kernel < 0:
            raise ValueError(f"conv_kernel must be >= 0, got {self.conv_kernel}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


def sliding_window_config(base: TransformerConfig, window: int = 8) -> TransformerConfig:
    """The sliding-window-attention baseline: ``base`` with only ``window`` frames of left context (8 x 40 ms)."""
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return dataclasses.replace(base, left_context=window)


def subsampled_length(lengths: Tensor) -> Tensor:
    """(B,) input frame counts -> (B,) encoder frame counts of the 4x front end (0 below 7 input frames)."""
    first = torch.div(lengths - 3, 2, rounding_mode="floor") + 1
    return (torch.div(first - 3, 2, rounding_mode="floor") + 1).clamp(min=0)


def _band_mask(frames: int, cached: int, left_context: int, device: torch.device) -> Tensor:
    """(t', c + t') boolean mask, True where query i (frame c + i of the keys) may attend key j.

    Query i attends keys ``c + i - W <= j <= c + i``: itself and its W predecessors, cached or new.
    """
    query = torch.arange(frames, device=device)[:, None] + cached
    key = torch.arange(cached + frames, device=device)[None, :]
    return (key <= query) & (key >= query - left_context)


Cache = TypeVar("Cache")


class LayerCache(NamedTuple):
    """One layer's attention memory: keys (rotated by RoPE) and values of its last c <= W frames.

    Attributes:
        key: (B, H, c, d_h).
        value: (B, H, c, d_h).
    """

    key: Tensor
    value: Tensor


class BlockCache(NamedTuple):
    """One ``TransformerBlock``'s memory between chunks.

    Attributes:
        attention: its attention's keys and values.
        conv: (B, D, K - 1) the convolution module's inputs of the frames before the chunk ((B, D, 0) without one).
    """

    attention: LayerCache
    conv: Tensor


class TransformerState(NamedTuple, Generic[Cache]):
    """Streaming state of ``CausalTransformerEncoder`` (``Cache`` = ``BlockCache``) and of
    ``AmortizedTransformerEncoder`` (``ActiveKVCache``).

    Attributes:
        pending: (B, p, F) input frames the front end has not consumed yet (p <= 6).
        layers: one cache per block, in order.
        offset: encoder frames released so far: the absolute position of the next frame.
    """

    pending: Tensor
    layers: tuple[Cache, ...]
    offset: int


def stream_blocks(
    frontend: ConvSubsampling,
    input_dim: int,
    chunk: Tensor,
    state: TransformerState[Cache],
    encode: Callable[[Tensor, tuple[Cache, ...], int], tuple[Tensor, tuple[Cache, ...]]],
) -> tuple[Tensor, TransformerState[Cache]]:
    """``infer`` of the Transformer encoders: the front end consumes ``chunk`` after what was pending, and the
    encoder frames it completes go through ``encode`` (frames, caches, offset) -> (frames, new caches)."""
    check_chunk(chunk, input_dim, state.pending.shape[0])
    frames, pending = frontend.stream(state.pending, chunk)
    if frames.shape[1] == 0:
        return frames, state._replace(pending=pending)
    frames, layers = encode(frames, state.layers, state.offset)
    return frames, TransformerState(pending=pending, layers=layers, offset=state.offset + frames.shape[1])


class ConvSubsampling(nn.Module):
    """Causal 4x subsampling: two Conv1d (kernel 3, stride 2, no padding) with ReLU.

    Encoder frame i depends on input frames 4i .. 4i + 6 only, so ``T' = subsampled_length(T)``.
    """

    factor = 4
    receptive_field = 7

    def __init__(self, input_dim: int, d_model: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(input_dim, d_model, kernel_size=3, stride=2)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2)
        self.d_model = d_model

    def forward(self, feats: Tensor) -> Tensor:
        """feats: (B, T, F) -> (B, T', D); T' = 0 when T < 7."""
        if feats.shape[1] < self.receptive_field:
            return feats.new_zeros(feats.shape[0], 0, self.d_model)
        hidden = F.relu(self.conv1(feats.transpose(1, 2)))
        return F.relu(self.conv2(hidden)).transpose(1, 2)

    def stream(self, pending: Tensor, chunk: Tensor) -> tuple[Tensor, Tensor]:
        """Streaming step: (pending (B, p, F), chunk (B, t, F)) -> (new frames (B, t', D), new pending frames).

        The input frames not yet consumed by a complete output frame stay pending for the next chunk."""
        feats = torch.cat([pending, chunk.to(pending.dtype)], dim=1)
        frames = self(feats)
        return frames, feats[:, self.factor * frames.shape[1] :]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over a sliding causal window, with RoPE, built from Linear layers (Opacus-ready).

    The same code serves training (an empty cache and ``offset`` 0) and streaming (the cache of earlier chunks).
    """

    def __init__(self, d_model: int, num_heads: int, left_context: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.left_context = left_context
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def empty_cache(self, batch_size: int, reference: Tensor) -> LayerCache:
        """A cache with no frames: (B, H, 0, d_h) keys and values like ``reference``'s dtype and device."""
        empty = reference.new_zeros(batch_size, self.num_heads, 0, self.d_head)
        return LayerCache(key=empty, value=empty)

    def forward(self, x: Tensor, cache: LayerCache, offset: int, frame_mask: Tensor | None = None) -> tuple[Tensor, LayerCache]:
        """Attend each frame to itself and its W predecessors.

        Args:
            x: (B, t', D) normalized inputs of frames ``offset .. offset + t' - 1``.
            cache: keys and values of the c frames just before ``offset``.
            offset: absolute position of x's first frame.
            frame_mask: optional (B, t') weights multiplied into each frame's output (0 skips a frame's output).

        Returns:
            (B, t', D) outputs and the cache of the last min(W, c + t') frames.
        """
        batch, frames, d_model = x.shape
        query, key, value = self.qkv(x).view(batch, frames, 3, self.num_heads, self.d_head).permute(2, 0, 3, 1, 4)
        cos, sin = rotary_tables(offset, frames, self.d_head, x)
        keys = torch.cat([cache.key, rotate(key, cos, sin)], dim=2)
        values = torch.cat([cache.value, value], dim=2)
        mask = _band_mask(frames, cache.key.shape[2], self.left_context, x.device)
        attended = F.scaled_dot_product_attention(rotate(query, cos, sin), keys, values, attn_mask=mask)
        output = self.out(attended.transpose(1, 2).reshape(batch, frames, d_model))
        if frame_mask is not None:
            output = output * frame_mask.unsqueeze(-1).to(output.dtype)
        kept = keys.shape[2] - min(self.left_context, keys.shape[2])
        return output, LayerCache(key=keys[:, :, kept:], value=values[:, :, kept:])


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear(D, ffn_dim), SiLU, dropout, Linear(ffn_dim, D)."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_model, ffn_dim)
        self.out = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        """x: (B, t', D) -> (B, t', D); optional frame_mask (B, t') scales (0 skips) each frame's output."""
        output = self.out(self.dropout(F.silu(self.hidden(x))))
        if frame_mask is not None:
            output = output * frame_mask.unsqueeze(-1).to(output.dtype)
        return output


class CausalConvModule(nn.Module):
    """Conformer's convolution module, causal: pointwise Linear(D, 2D) and GLU, a depthwise Conv1d over each frame
    and its K - 1 predecessors, LayerNorm (BatchNorm's batch statistics would differ between training and a
    device's stream), SiLU, pointwise Linear(D, D). Linear, Conv1d and LayerNorm all have Opacus grad samplers."""

    def __init__(self, d_model: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = CausalConv1d(d_model, d_model, kernel_size, groups=d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_out = nn.Linear(d_model, d_model)

    def empty_history(self, batch_size: int, reference: Tensor) -> Tensor:
        """(B, D, K - 1) zeros: what the convolution sees before an utterance's first frame."""
        return self.depthwise.initial_history(batch_size, reference.device, reference.dtype)

    def forward(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, t', D), history (B, D, K - 1) -> (B, t', D) and the history for the frames after x."""
        gated = F.glu(self.pointwise_in(x), dim=-1)
        convolved, history = self.depthwise(gated.transpose(1, 2), history)
        return self.pointwise_out(F.silu(self.norm(convolved.transpose(1, 2)))), history


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + MHA(LN(x)), then (with ``conv_kernel`` > 0) x + Conv(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = CausalSelfAttention(config.d_model, config.num_heads, config.left_context)
        self.conv: CausalConvModule | None = None
        if config.conv_kernel > 0:
            self.conv_norm = nn.LayerNorm(config.d_model)
            self.conv = CausalConvModule(config.d_model, config.conv_kernel)
        self.feed_forward_norm = nn.LayerNorm(config.d_model)
        self.feed_forward = FeedForward(config.d_model, config.ffn_dim, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def empty_cache(self, batch_size: int, reference: Tensor) -> BlockCache:
        """The memory of a block that has seen no frames, like ``reference``'s dtype and device."""
        attention = self.attention.empty_cache(batch_size, reference)
        if self.conv is None:
            return BlockCache(attention, reference.new_zeros(batch_size, self.attention.out.out_features, 0))
        return BlockCache(attention, self.conv.empty_history(batch_size, reference))

    def forward(self, x: Tensor, cache: BlockCache, offset: int) -> tuple[Tensor, BlockCache]:
        """x: (B, t', D) frames from ``offset`` on -> (B, t', D) and this block's updated cache."""
        attended, attention = self.attention(self.attention_norm(x), cache.attention, offset)
        x = x + self.dropout(attended)
        history = cache.conv
        if self.conv is not None:
            convolved, history = self.conv(self.conv_norm(x), history)
            x = x + self.dropout(convolved)
        x = x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))
        return x, BlockCache(attention, history)


class CausalTransformerEncoder(nn.Module):
    """Streaming Transformer encoder implementing ``shared.models.encoder.StreamingEncoder``.

    ``forward`` (training, whole padded utterances) and ``infer`` (chunk by chunk) give the same frames for any
    chunking, in eval mode. Frames beyond an utterance's length are zeros in ``forward``'s output.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.input_dim = config.input_dim
        self.output_dim = config.d_model
        self.frontend = ConvSubsampling(config.input_dim, config.d_model)
        self.frontend_dropout = nn.Dropout(config.dropout)
        self.blocks = BlockList(TransformerBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.d_model)

    def subsampled_length(self, lengths: Tensor) -> Tensor:
        """(B,) input frame counts -> (B,) encoder frame counts."""
        return subsampled_length(lengths)

    def init_state(self, batch_size: int = 1, device: torch.device | None = None) -> TransformerState[BlockCache]:
        """Fresh streaming state: nothing pending, empty caches, position 0."""
        reference = state_reference(self, batch_size, device)
        layers = tuple(block.empty_cache(batch_size, reference) for block in self.blocks)
        pending = reference.new_zeros(batch_size, 0, self.input_dim)
        return TransformerState(pending=pending, layers=layers, offset=0)

    def _encode(self, frames: Tensor, layers: tuple[BlockCache, ...], offset: int) -> tuple[Tensor, tuple[BlockCache, ...]]:
        """Blocks and final norm over (B, t', D) subsampled frames starting at ``offset``."""
        frames = self.frontend_dropout(frames)
        new_layers = []
        for block, cache in zip(self.blocks, layers, strict=True):
            frames, cache = block(frames, cache, offset)
            new_layers.append(cache)
        return self.final_norm(frames), tuple(new_layers)

    def forward(self, feats: Tensor, lengths: Tensor) -> EncoderOutput:
        """Encode whole utterances.

        Args:
            feats: (B, T, F) features, padded beyond ``lengths``.
            lengths: (B,) valid input frames per utterance, each in [0, T].

        Returns:
            ``EncoderOutput`` with frames (B, T', D) (zeros beyond each length), lengths (B,) and a constant cost 1.
        """
        check_batch(feats, lengths, self.input_dim)
        out_lengths = self.subsampled_length(lengths)
        frames = self.frontend(feats)
        if frames.shape[1] > 0:
            frames, _ = self._encode(frames, self.init_state(feats.shape[0], feats.device).layers, offset=0)
        valid = torch.arange(frames.shape[1], device=frames.device) < out_lengths.to(frames.device)[:, None]
        frames = frames * valid.unsqueeze(-1).to(frames.dtype)
        return EncoderOutput(frames=frames, lengths=out_lengths, compute_cost=constant_cost(frames))

    def infer(self, chunk: Tensor, state: TransformerState[BlockCache]) -> tuple[Tensor, TransformerState[BlockCache]]:
        """Encode the next chunk of a stream.

        Args:
            chunk: (B, t, F) next input frames (any t >= 0).
            state: from ``init_state`` or the previous ``infer`` call.

        Returns:
            (B, t', D) newly completed encoder frames (t' may be 0) and the new state.
        """
        return stream_blocks(self.frontend, self.input_dim, chunk, state, self._encode)
