"""CausalTransformerEncoder, with and without its convolution module: exact streaming, causal masking, padding,
Opacus compatibility."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from opacus.validators import ModuleValidator

from shared.models.transformer import (
    CausalConvModule,
    CausalSelfAttention,
    CausalTransformerEncoder,
    ConvSubsampling,
    TransformerConfig,
    TransformerState,
    sliding_window_config,
    subsampled_length,
)

SMALL = TransformerConfig(input_dim=20, d_model=32, num_heads=4, ffn_dim=64, num_layers=3, left_context=6)
CONV = dataclasses.replace(SMALL, conv_kernel=5)


def _encoder(config: TransformerConfig = SMALL, seed: int = 0) -> CausalTransformerEncoder:
    torch.manual_seed(seed)
    return CausalTransformerEncoder(config).eval()


def _stream(encoder: CausalTransformerEncoder, feats: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state = encoder.init_state(batch_size=feats.shape[0])
    pieces, start = [], 0
    for size in sizes:
        frames, state = encoder.infer(feats[:, start : start + size], state)
        pieces.append(frames)
        start += size
    assert start == feats.shape[1]
    return torch.cat(pieces, dim=1)


def _chunk_sizes(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def test_subsampled_length_matches_front_end() -> None:
    front_end = ConvSubsampling(input_dim=4, d_model=8)
    for length in range(0, 40):
        expected = max(0, ((length - 3) // 2 + 1 - 3) // 2 + 1)
        assert int(subsampled_length(torch.tensor([length]))[0]) == expected
        assert front_end(torch.randn(1, length, 4)).shape == (1, expected, 8)


def test_front_end_frame_i_sees_input_frames_4i_to_4i_plus_6() -> None:
    front_end = ConvSubsampling(input_dim=4, d_model=8)
    feats = torch.randn(1, 40, 4)
    base = front_end(feats)
    for moved in (13, 14, 15):
        perturbed = feats.clone()
        perturbed[:, moved] += 10.0
        changed = (front_end(perturbed) - base).abs().amax(dim=(0, 2)) > 0
        reached = [i for i in range(base.shape[1]) if 4 * i <= moved <= 4 * i + 6]
        assert changed.nonzero().flatten().tolist() == reached


@pytest.mark.parametrize("left_context", [0, 3])
def test_attention_window_is_itself_and_left_context_predecessors(left_context: int) -> None:
    torch.manual_seed(0)
    attention = CausalSelfAttention(d_model=16, num_heads=2, left_context=left_context)
    x = torch.randn(1, 12, 16)
    cache = attention.empty_cache(1, x)
    base, _ = attention(x, cache, offset=0)
    perturbed = x.clone()
    perturbed[:, 5] += 1.0
    changed = (attention(perturbed, cache, offset=0)[0] - base).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.nonzero().flatten().tolist() == list(range(5, 5 + left_context + 1))


def test_convolution_module_sees_each_frame_and_its_kernel_minus_one_predecessors() -> None:
    torch.manual_seed(0)
    conv = CausalConvModule(d_model=16, kernel_size=4)
    x = torch.randn(1, 12, 16)
    history = conv.empty_history(1, x)
    base, _ = conv(x, history)
    perturbed = x.clone()
    perturbed[:, 5] += 1.0
    changed = (conv(perturbed, history)[0] - base).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.nonzero().flatten().tolist() == [5, 6, 7, 8]


def test_rope_makes_attention_independent_of_absolute_position() -> None:
    torch.manual_seed(0)
    attention = CausalSelfAttention(d_model=16, num_heads=2, left_context=4)
    x = torch.randn(2, 9, 16)
    cache = attention.empty_cache(2, x)
    at_start, _ = attention(x, cache, offset=0)
    much_later, _ = attention(x, cache, offset=10**7)  # ~4.6 days of 40 ms frames into a stream
    torch.testing.assert_close(much_later, at_start, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config", [SMALL, CONV], ids=["attention", "attention+conv"])
@pytest.mark.parametrize("chunk", [7, 16, 40, "random"])
def test_streaming_equals_forward(chunk: int | str, config: TransformerConfig) -> None:
    encoder = _encoder(config)
    feats = torch.randn(2, 203, SMALL.input_dim)
    offline = encoder(feats, torch.tensor([203, 203])).frames
    if chunk == "random":
        generator = torch.Generator().manual_seed(3)
        sizes, total = [], 0
        while total < 203:
            sizes.append(min(int(torch.randint(0, 30, (), generator=generator)), 203 - total))
            total += sizes[-1]
    else:
        sizes = _chunk_sizes(203, int(chunk))
    with torch.no_grad():
        streamed = _stream(encoder, feats, sizes)
    assert streamed.shape == offline.shape == (2, 50, SMALL.d_model)
    torch.testing.assert_close(streamed, offline, atol=1e-4, rtol=0.0)


def test_streaming_equals_forward_at_default_size() -> None:
    encoder = _encoder(TransformerConfig(num_layers=2))  # default width and window; 99 frames > 64
    feats = torch.randn(1, 400, 80)
    with torch.no_grad():
        offline = encoder(feats, torch.tensor([400])).frames
        streamed = _stream(encoder, feats, _chunk_sizes(400, 32))
    torch.testing.assert_close(streamed, offline, atol=1e-4, rtol=0.0)


def test_state_stays_bounded_and_typed() -> None:
    encoder = _encoder(CONV)
    state = encoder.init_state(batch_size=2)
    total = 0
    for size in (3, 2, 5, 40, 1, 33):
        frames, state = encoder.infer(torch.randn(2, size, SMALL.input_dim), state)
        total += size
        assert isinstance(state, TransformerState)
        assert state.offset == int(subsampled_length(torch.tensor(total)))
        assert state.pending.shape[1] == total - 4 * state.offset <= 6
        assert len(state.layers) == SMALL.num_layers
        for cache in state.layers:
            assert cache.attention.key.shape == cache.attention.value.shape == (2, 4, min(SMALL.left_context, state.offset), 8)
            assert cache.conv.shape == (2, SMALL.d_model, CONV.conv_kernel - 1)
    first_frames, _ = encoder.infer(torch.randn(2, 6, SMALL.input_dim), encoder.init_state(2))
    assert first_frames.shape == (2, 0, SMALL.d_model)


@pytest.mark.parametrize("config", [SMALL, CONV], ids=["attention", "attention+conv"])
def test_batch_of_different_lengths_matches_single_utterances(config: TransformerConfig) -> None:
    encoder = _encoder(config)
    lengths = torch.tensor([90, 57, 8, 0])
    feats = 100.0 * torch.randn(4, 90, SMALL.input_dim)  # loud garbage in the padding
    out = encoder(feats, lengths)
    assert out.lengths.tolist() == [21, 13, 1, 0]
    assert torch.isfinite(out.frames).all()
    for b, length in enumerate(lengths.tolist()):
        single = encoder(feats[b : b + 1, :length], lengths[b : b + 1]).frames[0]
        valid = int(out.lengths[b])
        torch.testing.assert_close(out.frames[b, :valid], single, atol=1e-4, rtol=0.0)
        assert torch.all(out.frames[b, valid:] == 0)
    assert float(out.compute_cost) == 1.0


def test_gradients_flow_to_every_parameter() -> None:
    encoder = _encoder(CONV).train()
    out = encoder(torch.randn(2, 60, SMALL.input_dim), torch.tensor([60, 41]))
    out.frames.square().sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("conv_kernel", [0, 15])
def test_opacus_validator_finds_no_errors(conv_kernel: int) -> None:
    encoder = CausalTransformerEncoder(TransformerConfig(conv_kernel=conv_kernel))
    assert ModuleValidator.validate(encoder, strict=False) == []


def test_sliding_window_config_only_shrinks_the_window() -> None:
    base = TransformerConfig()
    window = sliding_window_config(base)
    assert window.left_context == 8
    assert window == TransformerConfig(left_context=8)
    with pytest.raises(ValueError, match="window must be >= 0, got -1"):
        sliding_window_config(base, window=-1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e(torch.randn(1, 20, 7), torch.tensor([20])), "F=20"),
        (lambda e: e(torch.randn(1, 20, 20), torch.tensor([21])), "lengths must lie in \\[0, T=20\\], got \\[21\\]"),
        (lambda e: e(torch.randn(2, 20, 20), torch.tensor([20])), "lengths must be \\(B=2,\\)"),
        (lambda e: e.infer(torch.randn(3, 20, 20), e.init_state(2)), "batch 3, the state has batch 2"),
    ],
)
def test_invalid_inputs_raise(call: Callable[[CausalTransformerEncoder], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(_encoder())


def test_invalid_config_raises() -> None:
    with pytest.raises(ValueError, match="d_model=100 must split into num_heads=3"):
        TransformerConfig(d_model=100, num_heads=3)
    with pytest.raises(ValueError, match="d_model=12 must split into num_heads=4"):  # d_h = 3 is odd
        TransformerConfig(d_model=12, num_heads=4)
    with pytest.raises(ValueError, match="left_context must be >= 0, got -2"):
        TransformerConfig(left_context=-2)
    with pytest.raises(ValueError, match="conv_kernel must be >= 0, got -1"):
        TransformerConfig(conv_kernel=-1)
