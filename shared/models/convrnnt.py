"""ConvRNN-T: a streaming LSTM transducer encoder fed by a local and a global causal CNN.

Radfar et al., "ConvRNN-T: Convolutional Augmented Recurrent Neural Network Transducers for Streaming Speech
Recognition", Interspeech 2022 (arXiv 2209.14868). The paper's ingredients: causal 1-D convolutions,
squeeze-and-excitation, dilation and residual blocks in a local and a global context CNN in front of LSTM layers.
The block layout and the sizes below are ours::

    feats (B, T, F) ─┬─ local CNN:  2 strided causal convs (4x) -> residual causal conv blocks ─── (B, T', Cl) ─┐
                     │                                                                                        concat
                     └─ global CNN: 2 strided causal convs (4x) -> dilated depthwise-separable ── (B, T', Cg) ─┘
                                    blocks, each with a causal squeeze-and-excitation over ALL past frames      │
                                                                        (B, T', D) <- Linear <- LSTM x L <──────┘

Legend of tensor symbols (shared with ``shared.models.encoder``):
    B   batch size
    T   input feature frames (10 ms each); t the frames of one streaming chunk
    F   feature dimension (``input_dim``, 80 log-mel bins)
    T'  encoder frames (40 ms each), T' = T // 4; t' the encoder frames one chunk releases
    D   encoder output dimension (``output_dim``)
    Cl  channels of the local CNN; Cg channels of the global CNN; C, Cin, Cout channels of one layer
    K   kernel size of a convolution
    S   stride of a convolution (2 in the subsampling layers, 1 elsewhere)
    P   left context of a causal convolution, P = dilation * (K - 1) + 1 - S: the input frames it needs
        before the first frame of its first output (zeros at the start of an utterance)
    R   pending frames of a strided convolution, 0 <= R < S: input already received but not yet a full stride
    H   LSTM hidden size; L number of LSTM layers

Time alignment: encoder frame i is computed from input frames 0 .. 4i + 3 and nothing later, offline and
streaming alike, so ``forward`` yields T // 4 frames and ``infer`` releases frame i once input frame 4i + 3 has
arrived (earlier frames wait in the strided convolutions' state). Every part below is written once, as a step
``(x, state) -> (y, state)``; ``forward`` is that step from the zero state ``init_state`` returns, which is what
makes streaming exact rather than an approximation.

Receptive fields: the local CNN sees a finite window, ``ConvRNNTEncoder.local_receptive_field`` input frames
(39 frames = 0.39 s with the defaults). The global CNN's dilated convolutions see 57 encoder frames (2.3 s), and
its squeeze-and-excitation gates each frame with the mean of all frames up to it, so the global branch, like
the LSTM, depends on the whole past.

Example:
    >>> encoder = ConvRNNTEncoder(ConvRNNTConfig()).eval()
    >>> out = encoder(torch.randn(2, 400, 80), torch.tensor([400, 322]))
    >>> out.frames.shape, out.lengths.tolist()
    (torch.Size([2, 100, 144]), [100, 80])
    >>> state = encoder.init_state(batch_size=1)
    >>> frames, state = encoder.infer(torch.randn(1, 18, 80), state)  # input frames 0..17
    >>> frames.shape  # encoder frames 0..3 (frame 4 waits for input frame 19)
    torch.Size([1, 4, 144])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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
    state_reference,
)

__all__ = [
    "ConvRNNTConfig",
    "ConvRNNTEncoder",
    "ConvRNNTState",
    "GlobalBlockState",
    "GlobalContextState",
    "LSTMState",
    "LocalContextState",
    "SubsamplingState",
]

_SUBSAMPLING_STRIDE = 2  # each of the two strided convolutions of a branch halves the frame rate: 4x in all


@dataclass(frozen=True)
class ConvRNNTConfig:
    """Sizes of a ConvRNN-T encoder (scalars only, so a Flower run config can set every field).

    The defaults give 2.46 M parameters, to compare at matched size with a ~2.5 M transformer encoder.
    """

    input_dim: int = 80  # F: 80 log-mel bins from the Chorus front end
    output_dim: int = 144  # D: the transformer encoder's d_model, so both feed the same-sized joiner
    subsampling_kernel_size: int = 3  # K of the two stride-2 convs: each output sees its stride plus 1 frame back
    local_channels: int = 192  # Cl: local and global branches split the LSTM input evenly (384 = 2 x 192)
    local_kernel_size: int = 5  # K of the local residual convs: 2 blocks reach 0.39 s, a syllable or two
    local_num_blocks: int = 2  # few full convs: the local branch is for short-range detail, the global one for context
    global_channels: int = 192  # Cg: depthwise-separable blocks are cheap, so width costs little here
    global_kernel_size: int = 5  # K of the dilated depthwise convs, ContextNet's size
    global_num_blocks: int = 6  # two cycles of dilations 1, 2, 4: convolutions alone reach 57 frames (2.3 s)
    global_dilation_cycle: int = 3  # block i has dilation 2 ** (i % cycle), a scalar instead of a tuple field
    se_reduction: int = 8  # squeeze-and-excitation bottleneck C / 8, as in ContextNet
    lstm_hidden_size: int = 288  # H: brings the total to ~2.5 M, the LSTMs (58%) the recurrent core of an RNN-T
    lstm_num_layers: int = 2  # L: two unidirectional layers on top of the CNN front ends, kept small for devices
    dropout: float = 0.1  # residual branches, between LSTM layers and before the output: small data per device
    dp_compatible: bool = False  # DPLSTM for DP-SGD: same state_dict; fwd+bwd 1.7x slower, 6.7x with per-sample grads

    def __post_init__(self) -> None:
        positive = {
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "local_channels": self.local_channels,
            "local_kernel_size": self.local_kernel_size,
            "global_channels": self.global_channels,
            "global_kernel_size": self.global_kernel_size,
            "global_dilation_cycle": self.global_dilation_cycle,
            "se_reduction": self.se_reduction,
            "lstm_hidden_size": self.lstm_hidden_size,
            "lstm_num_layers": self.lstm_num_layers,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        non_negative = {"local_num_blocks": self.local_num_blocks, "global_num_blocks": self.global_num_blocks}
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.subsampling_kernel_size < _SUBSAMPLING_STRIDE:
            raise ValueError(
                f"subsampling_kernel_size must be >= the stride {_SUBSAMPLING_STRIDE}, got {self.subsampling_kernel_size}"
            )
        if self.se_reduction > self.global_channels:
            raise ValueError(f"se_reduction must be <= global_channels ({self.global_channels}), got {self.se_reduction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def global_dilations(self) -> tuple[int, ...]:
        """Dilation of each global block: 1, 2, 4, ... restarting every ``global_dilation_cycle`` blocks."""
        return tuple(2 ** (i % self.global_dilation_cycle) for i in range(self.global_num_blocks))


class SubsamplingState(NamedTuple):
    """Input history of a branch's two stride-2 convolutions: P frames of left context, then R pending frames.

    Attributes:
        conv1: (B, F, P + R) the last input feature frames.
        conv2: (B, C, P + R) the last outputs of ``conv1``.
    """

    conv1: Tensor
    conv2: Tensor


class LocalContextState(NamedTuple):
    """Streaming state of the local CNN.

    Attributes:
        subsampling: history of the strided convolutions.
        blocks: per residual block, (B, Cl, K - 1) the last inputs of its causal convolution.
    """

    subsampling: SubsamplingState
    blocks: tuple[Tensor, ...]


class GlobalBlockState(NamedTuple):
    """Streaming state of one global block.

    Attributes:
        conv: (B, Cg, dilation * (K - 1)) the last inputs of its dilated depthwise convolution.
        se_sum: (B, Cg) sum over all past encoder frames of the activations its squeeze-and-excitation averages.
    """

    conv: Tensor
    se_sum: Tensor


class GlobalContextState(NamedTuple):
    """Streaming state of the global CNN.

    Attributes:
        subsampling: history of the strided convolutions.
        blocks: one state per global block.
        frames_seen: (B,) int64, encoder frames produced so far: the count of every block's running mean.
    """

    subsampling: SubsamplingState
    blocks: tuple[GlobalBlockState, ...]
    frames_seen: Tensor


class LSTMState(NamedTuple):
    """Recurrent state of the LSTM stack, one row per layer.

    Attributes:
        h: (L, B, H) hidden state.
        c: (L, B, H) cell state.
    """

    h: Tensor
    c: Tensor


class ConvRNNTState(NamedTuple):
    """Everything ``ConvRNNTEncoder.infer`` carries from one chunk to the next."""

    local_context: LocalContextState
    global_context: GlobalContextState
    lstm: LSTMState


class _ChannelNorm(nn.Module):
    """LayerNorm over the channels of each frame of (B, C, T): per frame, hence causal (GroupNorm pools over T)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class _Subsampling(nn.Module):
    """Two stride-2 causal convolutions: (B, Cin, t) -> (B, C, t') at a quarter of the frame rate."""

    def __init__(self, in_channels: int, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv1 = CausalConv1d(in_channels, channels, kernel_size, stride=_SUBSAMPLING_STRIDE)
        self.conv2 = CausalConv1d(channels, channels, kernel_size, stride=_SUBSAMPLING_STRIDE)
        self.norm = _ChannelNorm(channels)

    def initial_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> SubsamplingState:
        return SubsamplingState(
            conv1=self.conv1.initial_history(batch_size, device, dtype),
            conv2=self.conv2.initial_history(batch_size, device, dtype),
        )

    def forward(self, x: Tensor, state: SubsamplingState) -> tuple[Tensor, SubsamplingState]:
        y, conv1 = self.conv1(x, state.conv1)
        y, conv2 = self.conv2(F.silu(y), state.conv2)
        return F.silu(self.norm(y)), SubsamplingState(conv1=conv1, conv2=conv2)


class _LocalBlock(nn.Module):
    """x + Dropout(SiLU(LayerNorm(CausalConv(x)))) on (B, Cl, t')."""

    def __init__(self, channels: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.conv = CausalConv1d(channels, channels, kernel_size)
        self.norm = _ChannelNorm(channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        y, history = self.conv(x, history)
        return x + self.dropout(F.silu(self.norm(y))), history


class _LocalContextCNN(nn.Module):
    """The local branch: subsampling, then residual causal conv blocks. (B, F, t) -> (B, Cl, t')."""

    def __init__(self, config: ConvRNNTConfig) -> None:
        super().__init__()
        self.subsampling = _Subsampling(config.input_dim, config.local_channels, config.subsampling_kernel_size)
        self.blocks = BlockList(
            _LocalBlock(config.local_channels, config.local_kernel_size, config.dropout) for _ in range(config.local_num_blocks)
        )

    @property
    def receptive_field(self) -> int:
        """Input frames one output frame depends on: frame i sees input frames 4i + 4 - receptive_field .. 4i + 3."""
        convs = [self.subsampling.conv1, self.subsampling.conv2, *(block.conv for block in self.blocks)]
        frames = 1
        for conv in reversed(convs):  # walk from one output frame back to the input: each layer widens the window
            frames = (frames - 1) * conv.stride + conv.context + conv.stride
        return frames

    def initial_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LocalContextState:
        return LocalContextState(
            subsampling=self.subsampling.initial_state(batch_size, device, dtype),
            blocks=tuple(block.conv.initial_history(batch_size, device, dtype) for block in self.blocks),
        )

    def forward(self, x: Tensor, state: LocalContextState) -> tuple[Tensor, LocalContextState]:
        x, subsampling = self.subsampling(x, state.subsampling)
        if x.size(2) == 0:  # no encoder frame completed in this chunk: the blocks keep their state
            return x, LocalContextState(subsampling=subsampling, blocks=state.blocks)
        histories = []
        for block, history in zip(self.blocks, state.blocks, strict=True):
            x, history = block(x, history)
            histories.append(history)
        return x, LocalContextState(subsampling=subsampling, blocks=tuple(histories))


class _CausalSqueezeExcitation(nn.Module):
    """Squeeze-and-excitation whose context at frame t is the mean of frames 0..t, not of the whole utterance.

    forward(x (B, C, t' >= 1), prefix_sum (B, C), prefix_count (B,)) -> (gated x (B, C, t'), sum including x (B, C)),
    where prefix_sum and prefix_count cover the frames before x (zeros at the start of an utterance).
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.squeeze = nn.Linear(channels, channels // reduction)
        self.excite = nn.Linear(channels // reduction, channels)

    def forward(self, x: Tensor, prefix_sum: Tensor, prefix_count: Tensor) -> tuple[Tensor, Tensor]:
        running_sum = prefix_sum.unsqueeze(2) + x.cumsum(dim=2)  # (B, C, t')
        steps = torch.arange(1, x.size(2) + 1, device=x.device)
        count = (prefix_count.unsqueeze(1) + steps).to(x.dtype)  # (B, t')
        context = (running_sum / count.unsqueeze(1)).transpose(1, 2)  # (B, t', C)
        gates = torch.sigmoid(self.excite(F.silu(self.squeeze(context)))).transpose(1, 2)  # (B, C, t')
        return x * gates, running_sum[:, :, -1]


class _GlobalBlock(nn.Module):
    """x + Dropout(CausalSE(SiLU(LayerNorm(Pointwise(DilatedDepthwise(x)))))) on (B, Cg, t')."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, se_reduction: int, dropout: float) -> None:
        super().__init__()
        self.depthwise = CausalConv1d(channels, channels, kernel_size, dilation=dilation, groups=channels)
        self.pointwise = nn.Conv1d(channels, channels, 1)
        self.norm = _ChannelNorm(channels)
        self.se = _CausalSqueezeExcitation(channels, se_reduction)
        self.dropout = nn.Dropout(dropout)

    def initial_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> GlobalBlockState:
        return GlobalBlockState(
            conv=self.depthwise.initial_history(batch_size, device, dtype),
            se_sum=torch.zeros(batch_size, self.pointwise.out_channels, device=device, dtype=dtype),
        )

    def forward(self, x: Tensor, state: GlobalBlockState, frames_seen: Tensor) -> tuple[Tensor, GlobalBlockState]:
        y, conv = self.depthwise(x, state.conv)
        y = F.silu(self.norm(self.pointwise(y)))
        y, se_sum = self.se(y, state.se_sum, frames_seen)
        return x + self.dropout(y), GlobalBlockState(conv=conv, se_sum=se_sum)


class _GlobalContextCNN(nn.Module):
    """The global branch: subsampling, then dilated depthwise-separable blocks with causal SE.

    (B, F, t) -> (B, Cg, t').
    """

    def __init__(self, config: ConvRNNTConfig) -> None:
        super().__init__()
        self.subsampling = _Subsampling(config.input_dim, config.global_channels, config.subsampling_kernel_size)
        self.blocks = BlockList(
            _GlobalBlock(config.global_channels, config.global_kernel_size, dilation, config.se_reduction, config.dropout)
            for dilation in config.global_dilations
        )

    def initial_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> GlobalContextState:
        return GlobalContextState(
            subsampling=self.subsampling.initial_state(batch_size, device, dtype),
            blocks=tuple(block.initial_state(batch_size, device, dtype) for block in self.blocks),
            frames_seen=torch.zeros(batch_size, dtype=torch.int64, device=device),
        )

    def forward(self, x: Tensor, state: GlobalContextState) -> tuple[Tensor, GlobalContextState]:
        x, subsampling = self.subsampling(x, state.subsampling)
        if x.size(2) == 0:  # no encoder frame completed in this chunk: the blocks keep their state
            return x, state._replace(subsampling=subsampling)
        block_states = []
        for block, block_state in zip(self.blocks, state.blocks, strict=True):
            x, block_state = block(x, block_state, state.frames_seen)
            block_states.append(block_state)
        frames_seen = state.frames_seen + x.size(2)
        return x, GlobalContextState(subsampling=subsampling, blocks=tuple(block_states), frames_seen=frames_seen)


def _dplstm_aliases(parent: nn.Module) -> dict[str, str]:
    """The parameter aliases of the DPLSTM ``parent.lstm`` (its cell's name -> nn.LSTM's name). The hooks below are
    registered only on a parent whose ``lstm`` is a DPLSTM (``dp_compatible``)."""
    from opacus.layers import DPLSTM

    lstm = parent.lstm
    if not isinstance(lstm, DPLSTM):
        raise TypeError(f"the DPLSTM state_dict hooks are on a module whose lstm is a {type(lstm).__name__}")
    return lstm.old_to_new


def _drop_dplstm_aliases(parent: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook of the module holding a DPLSTM as ``lstm``.

    DPLSTM holds each parameter twice, under nn.LSTM's name (``weight_ih_l0``) and its cell's (``l0.ih.weight``).
    Opacus' own hook drops the second only when DPLSTM is the top-level module (nested, it filters a copy), so
    the aliases are dropped here, one level up, where the state_dict is edited in place.
    """
    for alias in _dplstm_aliases(parent):
        state_dict.pop(f"{prefix}lstm.{alias}", None)


def _fill_dplstm_aliases(
    parent: nn.Module,
    state_dict: dict[str, Tensor],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """load_state_dict pre-hook, the inverse of ``_drop_dplstm_aliases``: an nn.LSTM name also loads its alias."""
    for alias, name in _dplstm_aliases(parent).items():
        if f"{prefix}lstm.{name}" in state_dict:
            state_dict.setdefault(f"{prefix}lstm.{alias}", state_dict[f"{prefix}lstm.{name}"])


def _make_lstm(config: ConvRNNTConfig) -> nn.Module:
    """nn.LSTM, or with ``dp_compatible`` opacus' DPLSTM: same call signature, same outputs for the same weights,
    the same state_dict keys (once its parent registers the hooks above; their order differs, so match by name),
    per-sample gradients in Opacus' hooks mode, but several times slower (a Python loop over time steps)."""
    kwargs = {
        "input_size": config.local_channels + config.global_channels,
        "hidden_size": config.lstm_hidden_size,
        "num_layers": config.lstm_num_layers,
        "batch_first": True,
        "dropout": config.dropout if config.lstm_num_layers > 1 else 0.0,
    }
    if not config.dp_compatible:
        return nn.LSTM(**kwargs)
    # Imported here, not at module level: opacus takes ~1.5 s to import and on-device inference never needs it.
    from opacus.layers import DPLSTM

    return DPLSTM(**kwargs)


class ConvRNNTEncoder(nn.Module):
    """ConvRNN-T streaming encoder (a ``shared.models.encoder.StreamingEncoder``).

    ``forward`` for training on padded batches; ``init_state`` and ``infer`` for chunk-by-chunk streaming, which
    reproduces ``forward`` for any chunking.

    Args:
        config: sizes; ``ConvRNNTConfig()`` gives the 2.46 M-parameter default.

    Example:
        >>> encoder = ConvRNNTEncoder(ConvRNNTConfig(dp_compatible=True))  # ready for Opacus' GradSampleModule
    """

    def __init__(self, config: ConvRNNTConfig) -> None:
        super().__init__()
        self.config = config
        self.input_dim = config.input_dim
        self.output_dim = config.output_dim
        self.local_cnn = _LocalContextCNN(config)
        self.global_cnn = _GlobalContextCNN(config)
        self.lstm = _make_lstm(config)
        if config.dp_compatible:
            self.register_state_dict_post_hook(_drop_dplstm_aliases)
            self.register_load_state_dict_pre_hook(_fill_dplstm_aliases)
        self.dropout = nn.Dropout(config.dropout)
        self.output_linear = nn.Linear(config.lstm_hidden_size, config.output_dim)

    @property
    def local_receptive_field(self) -> int:
        """Input frames the local branch's frame i depends on: 4i + 4 - local_receptive_field .. 4i + 3."""
        return self.local_cnn.receptive_field

    def subsampled_length(self, lengths: Tensor) -> Tensor:
        """(B,) input frame counts -> (B,) encoder frame counts, T // 4."""
        return torch.div(lengths, _SUBSAMPLING_STRIDE**2, rounding_mode="floor")

    def init_state(self, batch_size: int = 1, device: torch.device | None = None) -> ConvRNNTState:
        """A fresh streaming state: the zeros ``forward`` pads with, and zero LSTM h/c.

        Args:
            batch_size: B, the number of streams ``infer`` advances together.
            device: where the state lives; the parameters' device when None.
        """
        reference = state_reference(self, batch_size, device)
        device, dtype = reference.device, reference.dtype
        lstm_shape = (self.config.lstm_num_layers, batch_size, self.config.lstm_hidden_size)
        return ConvRNNTState(
            local_context=self.local_cnn.initial_state(batch_size, device, dtype),
            global_context=self.global_cnn.initial_state(batch_size, device, dtype),
            lstm=LSTMState(
                h=torch.zeros(lstm_shape, device=device, dtype=dtype),
                c=torch.zeros(lstm_shape, device=device, dtype=dtype),
            ),
        )

    def _step(self, feats: Tensor, state: ConvRNNTState) -> tuple[Tensor, ConvRNNTState]:
        """feats (B, t, F), state -> (frames (B, t', D), state): the one computation behind forward and infer."""
        x = feats.transpose(1, 2)  # (B, F, t)
        local, local_state = self.local_cnn(x, state.local_context)  # (B, Cl, t')
        global_, global_state = self.global_cnn(x, state.global_context)  # (B, Cg, t')
        context = torch.cat([local, global_], dim=1).transpose(1, 2)  # (B, t', Cl + Cg)
        if context.size(1) == 0:  # no full stride yet: the LSTM has nothing to consume (and rejects empty input)
            frames = context.new_zeros(context.size(0), 0, self.output_dim)
            return frames, ConvRNNTState(local_context=local_state, global_context=global_state, lstm=state.lstm)
        hidden, (h, c) = self.lstm(self.dropout(context), (state.lstm.h, state.lstm.c))  # (B, t', H)
        frames = self.output_linear(self.dropout(hidden))  # (B, t', D)
        return frames, ConvRNNTState(local_context=local_state, global_context=global_state, lstm=LSTMState(h=h, c=c))

    def forward(self, feats: Tensor, lengths: Tensor) -> EncoderOutput:
        """Encode a padded batch.

        Args:
            feats: (B, T, F) log-mel features; frames at or after ``lengths`` are padding (ignored, may hold NaN).
            lengths: (B,) valid frames per utterance, each in 0..T.

        Returns:
            EncoderOutput with frames (B, T // 4, D) (zeros past each utterance's length), lengths (B,) = lengths // 4,
            and compute_cost 1 (a dense encoder).
        """
        check_batch(feats, lengths, self.input_dim)
        batch_size, num_frames, _ = feats.shape
        lengths = lengths.to(feats.device)
        valid = torch.arange(num_frames, device=feats.device) < lengths.unsqueeze(1)  # (B, T)
        feats = feats.masked_fill(~valid.unsqueeze(2), 0.0)
        frames, _ = self._step(feats, self.init_state(batch_size, feats.device))
        out_lengths = self.subsampled_length(lengths)
        out_valid = torch.arange(frames.size(1), device=feats.device) < out_lengths.unsqueeze(1)  # (B, T')
        frames = frames.masked_fill(~out_valid.unsqueeze(2), 0.0)
        return EncoderOutput(frames=frames, lengths=out_lengths, compute_cost=constant_cost(frames))

    def infer(self, chunk: Tensor, state: ConvRNNTState) -> tuple[Tensor, ConvRNNTState]:
        """Encode the next chunk of a stream.

        Args:
            chunk: (B, t, F) the next feature frames, any t >= 0.
            state: from ``init_state`` or the previous ``infer`` call.

        Returns:
            frames (B, t', D), the encoder frames whose inputs are now complete (t' may be 0), and the new state.
        """
        check_chunk(chunk, self.input_dim, state.lstm.h.size(1))
        return self._step(chunk, state)
