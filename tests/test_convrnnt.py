"""ConvRNN-T encoder: exact streaming, padding, receptive fields, Opacus compatibility, size."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from shared.models.convrnnt import ConvRNNTConfig, ConvRNNTEncoder, ConvRNNTState

FEATURES = 80


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tests run many tiny ops; on the shared 2-core machine intra-op threads only contend (up to 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder() -> ConvRNNTEncoder:
    torch.manual_seed(0)
    return ConvRNNTEncoder(ConvRNNTConfig()).eval()


def _tiny_config(**overrides: object) -> ConvRNNTConfig:
    sizes = dict(
        input_dim=8,
        output_dim=6,
        local_channels=8,
        global_channels=8,
        se_reduction=4,
        lstm_hidden_size=8,
        local_num_blocks=1,
        global_num_blocks=2,
        dropout=0.0,
    )
    return ConvRNNTConfig(**{**sizes, **overrides})


def _stream(encoder: ConvRNNTEncoder, feats: Tensor, chunk_sizes: list[int]) -> tuple[Tensor, ConvRNNTState]:
    state = encoder.init_state(batch_size=feats.size(0))
    pieces, start = [], 0
    for size in chunk_sizes:
        frames, state = encoder.infer(feats[:, start : start + size], state)
        pieces.append(frames)
        start += size
    assert start >= feats.size(1)
    return torch.cat(pieces, dim=1), state


def _random_chunks(total: int, generator: torch.Generator) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(torch.randint(0, 23, (1,), generator=generator)))  # 0-frame and sub-stride chunks included
    return sizes


@pytest.mark.parametrize("chunking", ["5", "16", "64", "random"])
def test_chunked_infer_equals_forward(encoder: ConvRNNTEncoder, chunking: str) -> None:
    torch.manual_seed(1)
    feats = torch.randn(2, 203, FEATURES)  # 203 = 4 * 50 + 3: the last 3 frames stay pending
    if chunking == "random":
        chunk_sizes = _random_chunks(203, torch.Generator().manual_seed(2))
    else:
        chunk_sizes = [int(chunking)] * -(-203 // int(chunking))
    with torch.no_grad():
        offline = encoder(feats, torch.tensor([203, 203]))
        streamed, state = _stream(encoder, feats, chunk_sizes)
    assert offline.frames.shape == (2, 50, encoder.output_dim)
    assert streamed.shape == offline.frames.shape
    torch.testing.assert_close(streamed, offline.frames, atol=1e-4, rtol=0)
    assert state.global_context.frames_seen.tolist() == [50, 50]
    assert state.local_context.subsampling.conv1.size(2) == 1 + 1  # left context K - 2 = 1 plus 1 pending frame


def test_padded_batch_equals_single_utterances(encoder: ConvRNNTEncoder) -> None:
    torch.manual_seed(3)
    lengths = torch.tensor([160, 97, 42, 3])
    feats = torch.randn(4, 160, FEATURES)
    padded = feats.clone()
    for b, length in enumerate(lengths.tolist()):
        padded[b, length:] = float("nan")  # padding must be ignored, whatever it holds
    with torch.no_grad():
        batch = encoder(padded, lengths)
        assert batch.lengths.tolist() == [40, 24, 10, 0]
        assert torch.isfinite(batch.frames).all()
        for b, length in enumerate(lengths.tolist()):
            single = encoder(feats[b : b + 1, :length], lengths[b : b + 1])
            valid = int(batch.lengths[b])
            torch.testing.assert_close(batch.frames[b, :valid], single.frames[0], atol=1e-5, rtol=0)
            assert batch.frames[b, valid:].abs().sum() == 0
    assert float(batch.compute_cost) == 1.0


def _branch(encoder: ConvRNNTEncoder, branch: str, feats: Tensor) -> Tensor:
    cnn = encoder.local_cnn if branch == "local" else encoder.global_cnn
    with torch.no_grad():
        out, _ = cnn(feats.transpose(1, 2), cnn.initial_state(feats.size(0), feats.device, feats.dtype))
    return out  # (B, C, T')


def test_global_branch_sees_the_whole_past_local_branch_does_not(encoder: ConvRNNTEncoder) -> None:
    torch.manual_seed(4)
    feats = torch.randn(1, 1000, FEATURES)
    perturbed = feats.clone()
    perturbed[:, 0] += 5.0
    global_change = (_branch(encoder, "global", feats) - _branch(encoder, "global", perturbed))[0, :, -1]
    assert global_change.abs().max() > 1e-5  # frame 0 reaches encoder frame 249 through the cumulative SE mean
    local_change = (_branch(encoder, "local", feats) - _branch(encoder, "local", perturbed))[0, :, -1]
    assert local_change.abs().max() == 0


def test_local_receptive_field_is_exactly_as_stated(encoder: ConvRNNTEncoder) -> None:
    field = encoder.local_receptive_field
    assert field == 7 + 2 * 4 * (5 - 1)  # two stride-2 convs (K=3) see 7 frames; each residual block 4 * (K - 1)
    torch.manual_seed(5)
    feats = torch.randn(1, 120, FEATURES)
    frame = 25  # sees input frames 4 * 25 + 4 - field .. 4 * 25 + 3
    reference = _branch(encoder, "local", feats)[0, :, frame]
    for position, inside in [
        (4 * frame + 4 - field, True),
        (4 * frame + 3 - field, False),
        (4 * frame + 3, True),
        (4 * frame + 4, False),
    ]:
        perturbed = feats.clone()
        perturbed[:, position] += 5.0
        changed = bool((_branch(encoder, "local", perturbed)[0, :, frame] != reference).any())
        assert changed == inside, f"input frame {position}"


def test_opacus_validates_dp_compatible_encoder_only() -> None:
    assert ModuleValidator.validate(ConvRNNTEncoder(ConvRNNTConfig(dp_compatible=True)), strict=False) == []
    assert ModuleValidator.validate(ConvRNNTEncoder(ConvRNNTConfig()), strict=False) != []  # nn.LSTM


def test_per_sample_gradients_match_single_utterance_gradients() -> None:
    torch.manual_seed(6)
    encoder = ConvRNNTEncoder(_tiny_config(dp_compatible=True))
    feats, lengths = torch.randn(3, 26, 8), torch.tensor([26, 19, 13])
    model = GradSampleModule(encoder, loss_reduction="sum")
    model(feats, lengths).frames.square().sum().backward()
    per_sample = {name: p.grad_sample.clone() for name, p in encoder.named_parameters()}
    model.disable_hooks()
    for b, length in enumerate(lengths.tolist()):
        encoder.zero_grad(set_to_none=True)
        encoder(feats[b : b + 1, :length], lengths[b : b + 1]).frames.square().sum().backward()
        for name, p in encoder.named_parameters():
            torch.testing.assert_close(per_sample[name][b], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dp_lstm_takes_the_same_state_dict_and_gives_the_same_frames(encoder: ConvRNNTEncoder) -> None:
    dp_encoder = ConvRNNTEncoder(ConvRNNTConfig(dp_compatible=True)).eval()
    assert set(dp_encoder.state_dict()) == set(encoder.state_dict())
    nested = nn.ModuleDict({"encoder": dp_encoder}).state_dict()  # as inside a transducer
    assert set(nested) == {f"encoder.{key}" for key in encoder.state_dict()}
    dp_encoder.load_state_dict(encoder.state_dict())  # strict, both ways
    ConvRNNTEncoder(ConvRNNTConfig()).load_state_dict(dp_encoder.state_dict())
    feats = torch.randn(2, 64, FEATURES)
    lengths = torch.tensor([64, 50])
    with torch.no_grad():
        torch.testing.assert_close(dp_encoder(feats, lengths).frames, encoder(feats, lengths).frames, atol=1e-5, rtol=0)


def test_parameter_count_matches_a_small_transformer(encoder: ConvRNNTEncoder) -> None:
    count = sum(p.numel() for p in encoder.parameters())
    assert 2_000_000 <= count <= 3_500_000, count


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(7)
    encoder = ConvRNNTEncoder(_tiny_config(dropout=0.1)).train()
    out = encoder(torch.randn(2, 40, 8), torch.tensor([40, 31]))
    out.frames.square().sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_subsampled_length_is_a_quarter(encoder: ConvRNNTEncoder) -> None:
    assert encoder.subsampled_length(torch.tensor([0, 3, 4, 7, 8, 401])).tolist() == [0, 0, 1, 1, 2, 100]


def test_invalid_inputs_raise_value_errors(encoder: ConvRNNTEncoder) -> None:
    with pytest.raises(ValueError, match=r"feats must be \(B, T, F="):
        encoder(torch.randn(1, 10, 40), torch.tensor([10]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=10\], got \[11\]"):
        encoder(torch.randn(1, 10, FEATURES), torch.tensor([11]))
    with pytest.raises(ValueError, match="the state has batch 2"):
        encoder.infer(torch.randn(1, 4, FEATURES), encoder.init_state(batch_size=2))
    with pytest.raises(ValueError, match="dropout must be in"):
        ConvRNNTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="subsampling_kernel_size"):
        ConvRNNTConfig(subsampling_kernel_size=1)
