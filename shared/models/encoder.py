"""The contract every streaming encoder of Chorus keeps, so the transducer can wrap any of them.

Legend of tensor symbols used in shapes across ``shared/models``:
    B  batch size
    T  input feature frames (10 ms each)
    T' encoder output frames (after subsampling; 40 ms each for 4x)
    F  feature dimension (80 log-mel bins)
    D  encoder output dimension
    t  frames in one streaming chunk (input), t' the encoder frames it releases
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = ["EncoderOutput", "StreamingEncoder"]


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

    def forward(self, feats: Tensor, lengths: Tensor) -> EncoderOutput:
        """feats: (B, T, F); lengths: (B,). Returns frames (B, T', D)."""
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
