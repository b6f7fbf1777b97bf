"""The contract every streaming encoder of Chorus keeps, so the transducer can wrap any of them.

Legend of tensor symbols used in shapes across ``shared/models``:
    B  batch size
    T  input feature frames (10 ms each)
    T' encoder output frames (after subsampling; 40 ms each for 4x)
    F  feature dimension (80 log-mel bins)
    D  encoder output dimension
    t  frames in one streaming chunk (input), t' the encoder frames it releases
    C  channels of a convolution (Cin in, Cout out)
    K  kernel size of a convolution;  S  its stride;  P  its left context, P = dilation * (K - 1) + 1 - S
    R  pending input frames of a strided convolution, 0 <= R < S
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar, overload

import torch
from torch import Tensor, nn

__all__ = [
    "BlockList",
    "CausalConv1d",
    "EncoderOutput",
    "StreamingEncoder",
    "check_batch",
    "check_chunk",
    "constant_cost",
    "rotary_tables",
    "rotate",
    "state_reference",
]

BlockT = TypeVar("BlockT", bound=nn.Module)

if TYPE_CHECKING:

    class BlockList(nn.ModuleList, Generic[BlockT]):
        """An ``nn.ModuleList`` of one kind of block, as the type checker sees it: iterating and indexing give
        that kind (``nn.ModuleList`` says only ``Module``). At run time it is ``nn.ModuleList`` itself."""

        def __init__(self, modules: Iterable[BlockT]) -> None: ...

        def __iter__(self) -> Iterator[BlockT]: ...

        @overload
        def __getitem__(self, idx: slice) -> BlockList[BlockT]: ...

        @overload
        def __getitem__(self, idx: int) -> BlockT: ...

        def __getitem__(self, idx: int | slice) -> BlockT | BlockList[BlockT]: ...
else:
    BlockList = nn.ModuleList


class EncoderOutput(NamedTuple):
    """What ``StreamingEncoder.forward`` returns.

    Attributes:
        frames: (B, T', D) encoder output.
        lengths: (B,) number of valid frames in ``frames`` per utterance.
        compute_cost: scalar tensor, the expected share (0..1) of the encoder's gateable compute that was
            executed; differentiable for models that learn to skip compute, a constant 1 for dense ones.
    """

    frames: Tensor
    lengths: Tensor
    compute_cost: Tensor


class StreamingEncoder(Protocol):
    """An encoder usable offline (training) and chunk by chunk (on a device).

    ``infer`` applied to consecutive chunks of any size must produce the same frames as ``forward`` on the
    whole utterance (up to float error): streaming is exact, not an approximation of the offline model.
    """

    input_dim: int
    output_dim: int

    def __call__(self, feats: Tensor, lengths: Tensor) -> EncoderOutput:
        """An encoder is an ``nn.Module``: calling it runs ``forward``."""
        ...

    def forward(self, feats: Tensor, lengths: Tensor) -> EncoderOutput:
        """feats: (B, T, F); lengths: (B,). Returns frames (B, T', D)."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Its weights (``nn.Module.parameters``)."""
        ...

    def init_state(self, batch_size: int = 1, device: torch.device | None = None) -> Any:
        """A fresh streaming state (a typed NamedTuple/dataclass of the implementing module)."""
        ...

    def infer(self, chunk: Tensor, state: Any) -> tuple[Tensor, Any]:
        """chunk: (B, t, F) next feature frames. Returns (frames (B, t', D), new state); t' may be 0."""
        ...

    def subsampled_length(self, lengths: Tensor) -> Tensor:
        """(B,) input frame counts -> (B,) encoder frame counts that ``forward`` produces."""
        ...


def constant_cost(reference: Tensor) -> Tensor:
    """The compute cost of a dense encoder: always all of it."""
    return reference.new_ones(())


def check_batch(feats: Tensor, lengths: Tensor, input_dim: int) -> None:
    """Raise ValueError unless feats is (B, T, F=input_dim) and lengths (B,) with every length in [0, T]."""
    if feats.dim() != 3 or feats.shape[2] != input_dim:
        raise ValueError(f"feats must be (B, T, F={input_dim}), got shape {tuple(feats.shape)}")
    if lengths.shape != (feats.shape[0],):
        raise ValueError(f"lengths must be (B={feats.shape[0]},), got shape {tuple(lengths.shape)}")
    if feats.shape[0] > 0 and (int(lengths.min()) < 0 or int(lengths.max()) > feats.shape[1]):
        raise ValueError(f"lengths must lie in [0, T={feats.shape[1]}], got {lengths.tolist()}")


def check_chunk(chunk: Tensor, input_dim: int, state_batch: int) -> None:
    """Raise ValueError unless chunk is (B, t, F=input_dim) with the batch size B the streaming state was made for."""
    if chunk.dim() != 3 or chunk.shape[2] != input_dim:
        raise ValueError(f"chunk must be (B, t, F={input_dim}), got shape {tuple(chunk.shape)}")
    if chunk.shape[0] != state_batch:
        raise ValueError(f"chunk has batch {chunk.shape[0]}, the state has batch {state_batch}")


def rotary_tables(offset: int, frames: int, d_head: int, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Cosines and sines (t', d_h / 2) of the RoPE angles of frames ``offset .. offset + t' - 1``.

    Angles are computed in float64 so that positions of unbounded streams (millions of frames) stay exact; the
    tables come in ``reference``'s dtype and device.
    """
    positions = torch.arange(offset, offset + frames, dtype=torch.float64)
    inverse_frequencies = 10000.0 ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
    angles = positions[:, None] * inverse_frequencies[None, :]
    return (
        angles.cos().to(device=reference.device, dtype=reference.dtype),
        angles.sin().to(device=reference.device, dtype=reference.dtype),
    )


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply RoPE to x (..., n, d_h): each pair (x_i, x_{i + d_h/2}) turns by its frame's angle (cos, sin broadcast)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def state_reference(module: torch.nn.Module, batch_size: int, device: torch.device | str | None) -> Tensor:
    """A scalar zero with the dtype of ``module``'s parameters on ``device`` (their device when None): what a
    fresh streaming state of ``batch_size`` streams is built from. ValueError for a batch size below 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parameter = next(module.parameters())
    return parameter.new_zeros((), device=parameter.device if device is None else torch.device(device))


class CausalConv1d(nn.Module):
    """A Conv1d over the present and past only, streamed through the input frames it still needs (its history);
    a strided output is released once its stride is complete. ``forward`` from ``initial_history`` is the offline
    convolution with zeros before the first frame.

    Output frame j covers input frames j*S - P .. j*S + S - 1, so T input frames give T // S outputs.
    forward(x (B, Cin, t), history (B, Cin, P + R)) -> (y (B, Cout, (R + t) // S), history (B, Cin, P + R')).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.context = dilation * (kernel_size - 1) + 1 - stride
        if self.context < 0:
            raise ValueError(f"kernel_size {kernel_size} with dilation {dilation} is shorter than the stride {stride}")
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups)

    def initial_history(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, self.conv.in_channels, self.context, device=device, dtype=dtype)

    def forward(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([history, x], dim=2)
        num_outputs = (x.size(2) - self.context) // self.stride
        if num_outputs == 0:
            return x.new_zeros(x.size(0), self.conv.out_channels, 0), x
        return self.conv(x), x[:, :, num_outputs * self.stride :]
