"""FLOPs of the Chorus streaming encoders: analytic per-frame formulas and a measured counter.

Conventions: one multiply-add is 2 FLOPs. Time: fbank frames are 10 ms; the 4x convolutional front end
(``ConvSubsampling``) turns them into 40 ms encoder frames, so one audio second is ``ENCODER_FRAMES_PER_SECOND``
= 25 encoder frames, and every per-frame formula below is per 40 ms encoder frame.

Two kinds of FLOPs are counted, and every formula can report either (``elementwise``):
    * matrix FLOPs: Linear / Conv1d weights and the attention products q.k and p.v. These are exactly what
      ``torch.utils.flop_counter.FlopCounterMode`` counts (matmul, addmm, bmm, convolution, attention kernels;
      ``measure_flops`` adds the CPU attention kernel the stock counter omits), so ``elementwise=False`` is the
      number to compare with ``measure_flops``.
    * element-wise FLOPs (estimates, ``elementwise=True`` adds them): bias additions (FlopCounterMode counts
      ``addmm`` as its matrix product only), LayerNorm (about 8 per element: mean, centring, square, variance,
      scaling, affine), SiLU (about 4: exp, add, divide, multiply), ReLU (1), softmax (about 5 per attention
      score: scale, max, exp, sum, divide), RoPE (3 per rotated query/key element) and residual additions (1).
      With the default sizes they add about 2% to the matrix FLOPs of a block.

Attention's q.k and p.v FLOPs grow with the number of keys a query is scored against: ``left_context + 1`` in
steady-state streaming one frame at a time (the default below). Chunked streaming scores each query against the
cache plus the whole chunk (a few more keys), and a whole-utterance ``forward`` scores every query against all
T' frames before the band mask discards most of them: pass ``keys`` to model those executions.

Legend of symbols:
    F   input feature dimension;  D  model dimension;  H  attention heads;  d_ff  feed-forward dimension
    K_c convolution module kernel (``conv_kernel``)
    A   arbitrator hidden dimension;  L  blocks;  W  left context;  K  keys per query

Example:
    >>> from shared.models.transformer import TransformerConfig
    >>> round(encoder_flops_per_second(TransformerConfig()) / 1e6)  # dense default encoder, MFLOPs per audio s
    115
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import flop_counter

from shared.models.transformer import TransformerConfig, sliding_window_config

__all__ = [
    "ENCODER_FRAMES_PER_SECOND",
    "ENCODER_FRAME_SECONDS",
    "arbitrator_flops_per_frame",
    "conv_flops_per_frame",
    "encoder_flops_per_frame",
    "encoder_flops_per_second",
    "ffn_flops_per_frame",
    "frontend_flops_per_frame",
    "measure_flops",
    "mha_flops_per_frame",
    "sliding_window_flops_per_second",
]

ENCODER_FRAME_SECONDS = 0.04  # 4x subsampling of 10 ms fbank frames
ENCODER_FRAMES_PER_SECOND = 25

_LAYER_NORM = 8  # FLOPs per normalized element (mean, centre, square, variance, scale, affine)
_SILU = 4  # exp, add, divide, multiply
_SOFTMAX = 5  # scale, max, exp, sum, divide per score
_ROPE = 3  # two multiplies and one add per rotated element


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


def frontend_flops_per_frame(input_dim: int, d_model: int, *, elementwise: bool = True) -> int:
    """FLOPs of ``ConvSubsampling`` per encoder frame, in steady state.

    The first Conv1d (kernel 3, stride 2, F -> D) runs twice per encoder frame, the second (kernel 3, stride 2,
    D -> D) once: 2 x 2*3*F*D + 2*3*D*D. (Over a whole utterance the first conv runs 2T' + 1 times, not 2T'.)
    Element-wise: bias and ReLU on 2 x D + D outputs.
    """
    _check_positive(input_dim=input_dim, d_model=d_model)
    flops = 2 * (2 * 3 * input_dim * d_model) + 2 * 3 * d_model * d_model
    if elementwise:
        flops += 2 * (3 * d_model)  # bias + ReLU on each of the 3 D-wide outputs
    return flops


def mha_flops_per_frame(d_model: int, num_heads: int, keys: int, *, elementwise: bool = True) -> int:
    """FLOPs of one multi-head self-attention sub-block for one query frame scored against ``keys`` keys.

    Matrix FLOPs: q, k, v projections 2*D*3D, output projection 2*D*D, scores 2*K*D (H heads of d_h = D/H) and
    the weighted sum of values 2*K*D. Element-wise: the sub-block's LayerNorm, 4 D-wide biases, RoPE on the
    query and key, softmax over H*K scores and the residual addition.
    """
    _check_positive(d_model=d_model, num_heads=num_heads, keys=keys)
    flops = 2 * d_model * 3 * d_model + 2 * d_model * d_model + 2 * (2 * keys * d_model)
    if elementwise:
        flops += (_LAYER_NORM + 4 + 2 * _ROPE + 1) * d_model + _SOFTMAX * num_heads * keys
    return flops


def ffn_flops_per_frame(d_model: int, ffn_dim: int, *, elementwise: bool = True) -> int:
    """FLOPs of one feed-forward sub-block per frame: 2 x 2*D*d_ff; element-wise LayerNorm, biases, SiLU, residual."""
    _check_positive(d_model=d_model, ffn_dim=ffn_dim)
    flops = 2 * (2 * d_model * ffn_dim)
    if elementwise:
        flops += (_LAYER_NORM + 1 + 1) * d_model + (1 + _SILU) * ffn_dim
    return flops


def conv_flops_per_frame(d_model: int, kernel_size: int, *, elementwise: bool = True) -> int:
    """FLOPs of one causal convolution module per frame: pointwise 2*D*2D, depthwise 2*K_c*D, pointwise 2*D*D;
    element-wise its two LayerNorms, biases (2D + D + D), GLU (sigmoid and product, about 5 per D), SiLU, residual."""
    _check_positive(d_model=d_model, kernel_size=kernel_size)
    flops = 2 * d_model * 2 * d_model + 2 * kernel_size * d_model + 2 * d_model * d_model
    if elementwise:
        flops += (2 * _LAYER_NORM + 4 + 5 + _SILU + 1) * d_model
    return flops


def arbitrator_flops_per_frame(d_model: int, arbitrator_dim: int, gates: int = 2, *, elementwise: bool = True) -> int:
    """FLOPs of one block's arbitrator per frame: LayerNorm, Linear(D, A), ReLU, Linear(A, gates), gate decision.

    Matrix FLOPs 2*D*A + 2*A*gates; element-wise LayerNorm on D, bias and ReLU on A, bias, sigmoid (about 4)
    and threshold on each gate.
    """
    _check_positive(d_model=d_model, arbitrator_dim=arbitrator_dim, gates=gates)
    flops = 2 * d_model * arbitrator_dim + 2 * arbitrator_dim * gates
    if elementwise:
        flops += _LAYER_NORM * d_model + 2 * arbitrator_dim + 6 * gates
    return flops


def _per_block(rate: float | Sequence[float], num_layers: int, name: str) -> list[float]:
    rates = [float(rate)] * num_layers if isinstance(rate, int | float) else [float(r) for r in rate]
    if len(rates) != num_layers:
        raise ValueError(f"{name} needs one on-rate per block ({num_layers}), got {len(rates)}")
    for value in rates:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} on-rates must lie in [0, 1], got {value}")
    return rates


def encoder_flops_per_frame(
    config: TransformerConfig,
    *,
    mha_on: float | Sequence[float] = 1.0,
    ffn_on: float | Sequence[float] = 1.0,
    arbitrator_dim: int = 0,
    keys: int | None = None,
    elementwise: bool = True,
) -> float:
    """FLOPs of a whole encoder per 40 ms encoder frame.

    Args:
        config: the encoder's sizes (``left_context`` sets the steady-state key count W + 1).
        mha_on: share of frames whose attention sub-block runs, one number or one per block (1 = dense).
        ffn_on: the same for the feed-forward sub-blocks.
        arbitrator_dim: A of the amortized model's per-block arbitrators; 0 for models without them.
        keys: keys each query is scored against; default ``config.left_context + 1``.
        elementwise: add the element-wise estimates (and the final LayerNorm) to the matrix FLOPs.

    Returns:
        front end + sum over blocks (mha_on * MHA + conv + ffn_on * FFN + arbitrator) [+ final LayerNorm].
    """
    if arbitrator_dim < 0:
        raise ValueError(f"arbitrator_dim must be >= 0, got {arbitrator_dim}")
    keys = config.left_context + 1 if keys is None else keys
    mha = mha_flops_per_frame(config.d_model, config.num_heads, keys, elementwise=elementwise)
    ffn = ffn_flops_per_frame(config.d_model, config.ffn_dim, elementwise=elementwise)
    arbitrator = arbitrator_flops_per_frame(config.d_model, arbitrator_dim, elementwise=elementwise) if arbitrator_dim else 0
    conv = conv_flops_per_frame(config.d_model, config.conv_kernel, elementwise=elementwise) if config.conv_kernel else 0
    mha_rates = _per_block(mha_on, config.num_layers, "mha_on")
    ffn_rates = _per_block(ffn_on, config.num_layers, "ffn_on")
    blocks = sum(m * mha + conv + f * ffn + arbitrator for m, f in zip(mha_rates, ffn_rates, strict=True))
    final_norm = _LAYER_NORM * config.d_model if elementwise else 0
    return frontend_flops_per_frame(config.input_dim, config.d_model, elementwise=elementwise) + blocks + final_norm


def encoder_flops_per_second(config: TransformerConfig, **rates: Any) -> float:
    """FLOPs per second of audio (25 encoder frames) of the dense (no ``rates``) or amortized encoder: keyword
    arguments as in ``encoder_flops_per_frame`` (for the amortized model its ``arbitrator_dim`` and the measured
    gate on-rates of ``AmortizedTransformerEncoder.gate_stats()``)."""
    return ENCODER_FRAMES_PER_SECOND * encoder_flops_per_frame(config, **rates)


def sliding_window_flops_per_second(config: TransformerConfig, window: int = 8, *, elementwise: bool = True) -> float:
    """FLOPs per audio second of the sliding-window-attention baseline: ``config`` with ``window`` frames of history."""
    return encoder_flops_per_second(sliding_window_config(config, window), elementwise=elementwise)


def _cpu_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(
    grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def measure_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs that ``fn(*args, **kwargs)`` actually executes, counted by ``FlopCounterMode``.

    Counted: matrix products (mm, addmm, bmm, baddbmm, matmul), convolutions and attention kernels, including
    the CPU fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its backward), which the
    stock counter does not know. Not counted: element-wise ops (LayerNorm, activations, softmax outside fused
    attention, bias additions, indexing). A fused attention kernel counts every query against every key it is
    given, masked or not. Run it under ``torch.no_grad()`` to count a forward pass alone.
    """
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    }
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()
