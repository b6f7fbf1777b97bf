"""Analytic FLOP formulas against FlopCounterMode; the measured counter itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.models.flops import (
    ENCODER_FRAMES_PER_SECOND,
    arbitrator_flops_per_frame,
    conv_flops_per_frame,
    encoder_flops_per_frame,
    encoder_flops_per_second,
    ffn_flops_per_frame,
    frontend_flops_per_frame,
    measure_flops,
    mha_flops_per_frame,
    sliding_window_flops_per_second,
)
from shared.models.transformer import CausalTransformerEncoder, TransformerConfig


def _dense(config: TransformerConfig) -> CausalTransformerEncoder:
    torch.manual_seed(0)
    return CausalTransformerEncoder(config).eval()


def test_measure_flops_counts_cpu_attention() -> None:
    query, key = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 13, 8)
    mask = torch.rand(2, 1, 10, 13) > 0.5
    expected = 2 * (2 * 2 * 4 * 10 * 13 * 8)  # q.k and p.v, 2 FLOPs per multiply-add
    assert measure_flops(F.scaled_dot_product_attention, query, key, key, attn_mask=mask) == expected
    assert measure_flops(torch.nn.Linear(6, 5), torch.randn(3, 6)) == 2 * 3 * 6 * 5  # bias add not counted


@pytest.mark.parametrize("conv_kernel", [0, 15])
def test_dense_forward_of_four_seconds_matches_the_formulas(conv_kernel: int) -> None:
    config = TransformerConfig(conv_kernel=conv_kernel)
    with torch.no_grad():
        measured = measure_flops(_dense(config), torch.randn(1, 400, 80), torch.tensor([400]))
    frames = 99  # 4 s = 400 fbank frames -> 99 encoder frames; a whole-utterance forward scores 99 keys per query
    matrix = frames * encoder_flops_per_frame(config, keys=frames, elementwise=False)
    everything = frames * encoder_flops_per_frame(config, keys=frames)
    assert abs(matrix / measured - 1.0) < 0.01  # the only gap: the first conv runs 2T' + 1 times, not 2T'
    assert 1.0 < everything / measured < 1.05  # element-wise ops FlopCounterMode does not count: about 2%


def test_streaming_eight_seconds_matches_flops_per_second() -> None:
    config = TransformerConfig(num_layers=2, left_context=16)  # the default width; fewer layers keep it quick
    encoder = _dense(config)
    feats = torch.randn(1, 800, 80)

    def stream() -> None:
        state = encoder.init_state(batch_size=1)
        for chunk in feats.split(16, dim=1):
            _, state = encoder.infer(chunk, state)

    with torch.no_grad():
        measured = measure_flops(stream)
    # chunks of 4 encoder frames score W + 4 keys (the first W frames fewer), the formula W + 1: a few % apart
    assert abs(8 * encoder_flops_per_second(config, elementwise=False) / measured - 1.0) < 0.03


def test_per_frame_formulas() -> None:
    assert frontend_flops_per_frame(80, 144, elementwise=False) == 2 * 2 * 3 * 80 * 144 + 2 * 3 * 144 * 144
    assert mha_flops_per_frame(144, 4, 65, elementwise=False) == 8 * 144 * 144 + 4 * 65 * 144
    assert ffn_flops_per_frame(144, 576, elementwise=False) == 4 * 144 * 576
    assert arbitrator_flops_per_frame(144, 32, elementwise=False) == 2 * 144 * 32 + 2 * 32 * 2
    assert conv_flops_per_frame(144, 15, elementwise=False) == 4 * 144 * 144 + 2 * 15 * 144 + 2 * 144 * 144
    for flops in (frontend_flops_per_frame, ffn_flops_per_frame):
        assert flops(144, 576) > flops(144, 576, elementwise=False)
    block = mha_flops_per_frame(144, 4, 65) + ffn_flops_per_frame(144, 576)
    assert arbitrator_flops_per_frame(144, 32) < 0.05 * block


def test_encoder_level_formulas() -> None:
    config = TransformerConfig(num_layers=4)
    dense = encoder_flops_per_second(config)
    assert dense == ENCODER_FRAMES_PER_SECOND * encoder_flops_per_frame(config)
    assert sliding_window_flops_per_second(config, window=8) < dense
    assert sliding_window_flops_per_second(config, window=64) == dense
    half = encoder_flops_per_second(config, mha_on=0.5, ffn_on=[1.0, 0.0, 1.0, 0.0], arbitrator_dim=32)
    mha = mha_flops_per_frame(144, 4, 65)
    ffn = ffn_flops_per_frame(144, 576)
    arbitrators = 4 * arbitrator_flops_per_frame(144, 32)
    assert half == pytest.approx(dense - ENCODER_FRAMES_PER_SECOND * (2 * mha + 2 * ffn - arbitrators))
    nothing = encoder_flops_per_frame(config, mha_on=0.0, ffn_on=0.0)
    assert nothing == frontend_flops_per_frame(80, 144) + 8 * 144  # the front end and the final LayerNorm


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mha_on": 1.5}, "mha_on on-rates must lie in \\[0, 1\\], got 1.5"),
        ({"ffn_on": [1.0, 0.5]}, "ffn_on needs one on-rate per block \\(8\\), got 2"),
        ({"arbitrator_dim": -1}, "arbitrator_dim must be >= 0, got -1"),
        ({"keys": 0}, "keys must be positive, got 0"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encoder_flops_per_frame(TransformerConfig(), **kwargs)  # type: ignore[arg-type]
