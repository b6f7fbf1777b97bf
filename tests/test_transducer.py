"""Transducer: training signal, greedy / beam / streaming search agreement, Opacus per-sample gradients."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from shared.models.transducer import StatelessPredictor, StreamState, Transducer, TransducerConfig
from shared.models.transformer import CausalTransformerEncoder, TransformerConfig

TINY_ENCODER = TransformerConfig(input_dim=16, d_model=32, num_heads=2, ffn_dim=64, num_layers=2, left_context=8, dropout=0.0)
TINY = TransducerConfig(vocab_size=5, pred_dim=32, joint_dim=32)


class Batch(NamedTuple):
    feats: torch.Tensor
    feat_lens: torch.Tensor
    targets: torch.Tensor
    target_lens: torch.Tensor


class Overfitted(NamedTuple):
    model: Transducer
    batch: Batch
    losses: list[float]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(seed: int = 0) -> Transducer:
    torch.manual_seed(seed)
    return Transducer(CausalTransformerEncoder(TINY_ENCODER), TINY)


def _two_utterances() -> Batch:
    generator = torch.Generator().manual_seed(1)
    return Batch(
        feats=torch.randn(2, 80, TINY_ENCODER.input_dim, generator=generator),
        feat_lens=torch.tensor([80, 64]),
        targets=torch.tensor([[1, 2, 3, 4], [3, 3, 0, -1]]),  # -1: padding, never read
        target_lens=torch.tensor([4, 3]),
    )


@pytest.fixture(scope="module")
def overfitted(_one_thread: None) -> Overfitted:
    model, batch = _tiny_model(), _two_utterances()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(250):
        loss = model(*batch).loss_per_utt.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return Overfitted(model=model.eval(), batch=batch, losses=losses)


def _stream(model: Transducer, feats: torch.Tensor, sizes: list[int], beam: int = 1) -> StreamState:
    state, start = model.init_stream(batch_size=feats.shape[0]), 0
    for size in sizes:
        state = model.stream(feats[:, start : start + size], state, beam=beam)
        start += size
    assert start == feats.shape[1]
    return state


def test_loss_is_finite_and_decreases_while_overfitting(overfitted: Overfitted) -> None:
    losses = overfitted.losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[29] < 0.8 * losses[0]
    assert losses[-1] < 0.1 * losses[0]


def test_overfitted_model_decodes_its_targets(overfitted: Overfitted) -> None:
    feats, feat_lens, _, _ = overfitted.batch
    expected = [[1, 2, 3, 4], [3, 3, 0]]
    assert overfitted.model.greedy_search(feats, feat_lens) == expected
    assert overfitted.model.beam_search(feats, feat_lens, beam=4) == expected


@pytest.mark.parametrize("trained", [True, False])
@pytest.mark.parametrize("chunk", [5, 16, 33])
def test_streaming_greedy_equals_offline_greedy(overfitted: Overfitted, trained: bool, chunk: int) -> None:
    model = overfitted.model if trained else _tiny_model(seed=3).eval()
    feats = overfitted.batch.feats[:1]
    offline = model.greedy_search(feats, torch.tensor([feats.shape[1]]))
    sizes = [min(chunk, feats.shape[1] - start) for start in range(0, feats.shape[1], chunk)]
    state = _stream(model, feats, sizes)
    assert [list(tokens) for tokens in state.hypotheses] == offline
    assert len(offline[0]) > 0


@pytest.mark.parametrize("trained", [True, False])
@pytest.mark.parametrize("chunk", [5, 16, 33])
def test_streaming_beam_search_equals_offline_beam_search(overfitted: Overfitted, trained: bool, chunk: int) -> None:
    model = overfitted.model if trained else _tiny_model(seed=3).eval()
    feats = torch.cat([overfitted.batch.feats[:1], torch.randn_like(overfitted.batch.feats[:1])])
    lengths = torch.full((2,), feats.shape[1])
    sizes = [min(chunk, feats.shape[1] - start) for start in range(0, feats.shape[1], chunk)]
    state = _stream(model, feats, sizes, beam=4)
    offline = model.beam_search(feats, lengths, beam=4)
    assert [list(tokens) for tokens in state.hypotheses] == offline
    assert all(b.frames == int(model.encoder.subsampled_length(lengths)[0]) for b in state.beams)
    assert len(offline[0]) > 0 and len(state.beams[0].hypotheses) > 1  # a beam, not one path
    if trained:
        assert offline[0] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="beam"):
        model.stream(feats[:, :8], model.init_stream(batch_size=2), beam=0)


def test_batched_greedy_equals_greedy_per_utterance() -> None:
    model = _tiny_model(seed=3).eval()
    feats, feat_lens = torch.randn(3, 70, TINY_ENCODER.input_dim), torch.tensor([70, 45, 6])
    batched = model.greedy_search(feats, feat_lens)
    singles = [
        model.greedy_search(feats[b : b + 1, : int(length)], feat_lens[b : b + 1])[0] for b, length in enumerate(feat_lens)
    ]
    assert batched == singles
    assert batched[2] == []  # 6 input frames give no encoder frame


@pytest.mark.parametrize("seed", [3, 4])
def test_beam_one_equals_greedy_with_one_symbol_per_frame(seed: int) -> None:
    model = _tiny_model(seed=seed).eval()
    feats, feat_lens = torch.randn(2, 70, TINY_ENCODER.input_dim), torch.tensor([70, 50])
    greedy = model.greedy_search(feats, feat_lens, max_symbols_per_frame=1)
    assert model.beam_search(feats, feat_lens, beam=1) == greedy
    assert any(greedy)
    with torch.no_grad():  # and the frame of each token is the one greedy search emitted it at
        encoded = model.encoder(feats, feat_lens)
        context = model.predictor.start_context(2, feats.device)
        _, tokens, when = model.greedy_frames(encoded.frames, encoded.lengths, context, max_symbols_per_frame=1)
        for row in range(2):
            assert model.beam_frames(encoded.frames[row, : int(encoded.lengths[row])], beam=1) == (tokens[row], when[row])


def test_predictor_context_matches_decoding_context() -> None:
    # Training row u must see exactly the context decoding builds after emitting u tokens.
    torch.manual_seed(0)
    predictor = StatelessPredictor(vocab_size=5, pred_dim=8, context_size=2)
    targets, target_lens = torch.tensor([[1, 4, 2]]), torch.tensor([3])
    training = predictor(predictor.training_context(targets, target_lens))
    context = predictor.start_context(1, torch.device("cpu"))
    for u in range(4):
        torch.testing.assert_close(training[:, u : u + 1], predictor(context))
        if u < 3:
            context = torch.cat([context[:, 1:], targets[:, u : u + 1]], dim=1)


@pytest.mark.parametrize("context_size", [1, 2, 3])
def test_predictor_reset_token_starts_the_context_afresh_in_training_and_decoding(context_size: int) -> None:
    # With reset_token R, a context is what the tokens after its last R would give from the start; without an R
    # in sight the output is the plain convolution's.
    torch.manual_seed(0)
    predictor = StatelessPredictor(vocab_size=6, pred_dim=8, context_size=context_size)
    targets, target_lens = torch.tensor([[1, 2, 5, 3, 4, 5, 2]]), torch.tensor([7])
    plain = predictor(predictor.training_context(targets, target_lens))
    predictor.reset_token = 5
    training = predictor(predictor.training_context(targets, target_lens))
    context = predictor.start_context(1, torch.device("cpu"))
    segment: list[int] = []
    for u in range(8):
        fresh = predictor.start_context(1, torch.device("cpu"))
        fresh[0, context_size - len(segment[-context_size:]) :] = torch.tensor(segment[-context_size:], dtype=torch.long)
        torch.testing.assert_close(training[:, u : u + 1], predictor(context))  # decoding builds the same context
        torch.testing.assert_close(predictor(context), predictor(fresh))  # ... which is the segment's own
        if u < 7:
            token = int(targets[0, u])
            context = torch.cat([context[:, 1:], targets[:, u : u + 1]], dim=1)
            segment = [] if token == 5 else segment + [token]
    torch.testing.assert_close(training[:, :3], plain[:, :3])  # before the first reset: unchanged
    assert not torch.allclose(training[:, 3], plain[:, 3])


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the features need no gradient
def test_opacus_per_sample_gradients_equal_single_utterance_gradients() -> None:
    model, batch = _tiny_model(), _two_utterances()
    wrapped = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    wrapped(*batch).loss_per_utt.sum().backward()
    samples = {name: p.grad_sample for name, p in wrapped.named_parameters()}
    for b in range(2):
        model.zero_grad()
        frames, tokens = int(batch.feat_lens[b]), int(batch.target_lens[b])
        model(
            batch.feats[b : b + 1, :frames],
            batch.feat_lens[b : b + 1],
            batch.targets[b : b + 1, :tokens],
            batch.target_lens[b : b + 1],
        ).loss_per_utt.sum().backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None
            torch.testing.assert_close(samples[f"_module.{name}"][b], parameter.grad, atol=1e-5, rtol=1e-3)


def test_opacus_validator_finds_no_errors_in_default_transducer() -> None:
    model = Transducer(CausalTransformerEncoder(TransformerConfig()), TransducerConfig(vocab_size=256))
    assert ModuleValidator.validate(model, strict=False) == []


def test_forward_output_and_cost() -> None:
    out = _tiny_model()(*_two_utterances())
    assert out.loss_per_utt.shape == (2,)
    assert out.enc_lens.tolist() == [19, 15]
    assert float(out.compute_cost) == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feat_lens": torch.tensor([80, 6])}, "utterances \\[1\\] \\(feat_lens \\[6\\]\\) give no encoder frame"),
        ({"targets": torch.tensor([[1, 2, 3, 5], [3, 3, 0, 0]])}, "vocab_size=5\\), got \\[5\\]"),
        ({"target_lens": torch.tensor([5, 3])}, "target_lens must lie in \\[0, U=4\\], got \\[5, 3\\]"),
        ({"targets": torch.tensor([1, 2])}, "targets must be \\(B=2, U\\)"),
    ],
)
def test_invalid_inputs_raise(change: dict[str, torch.Tensor], message: str) -> None:
    batch = _two_utterances()._replace(**change)
    with pytest.raises(ValueError, match=message):
        _tiny_model()(*batch)


def test_invalid_search_arguments_raise() -> None:
    model, batch = _tiny_model().eval(), _two_utterances()
    with pytest.raises(ValueError, match="beam must be positive, got 0"):
        model.beam_search(batch.feats, batch.feat_lens, beam=0)
    with pytest.raises(ValueError, match="max_symbols_per_frame must be positive, got 0"):
        model.greedy_search(batch.feats, batch.feat_lens, max_symbols_per_frame=0)
    with pytest.raises(ValueError, match="vocab_size must be positive, got 0"):
        TransducerConfig(vocab_size=0)
