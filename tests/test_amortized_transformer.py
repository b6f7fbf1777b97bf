"""AmortizedTransformerEncoder: dense equivalence, real skipping, exact streaming, learnable compute cost."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from shared.models.amortized_transformer import (
    ActiveKVCache,
    AmortizedConfig,
    AmortizedState,
    AmortizedTransformerEncoder,
)
from shared.models.flops import ffn_flops_per_frame, measure_flops, mha_flops_per_frame
from shared.models.transformer import CausalTransformerEncoder, TransformerConfig

SMALL = TransformerConfig(input_dim=20, d_model=32, num_heads=4, ffn_dim=64, num_layers=3, left_context=6)


def _dense(seed: int = 0) -> CausalTransformerEncoder:
    torch.manual_seed(seed)
    return CausalTransformerEncoder(SMALL).eval()


def _mixed(seed: int = 0) -> AmortizedTransformerEncoder:
    """An eval-mode encoder whose arbitrators are random enough to switch sub-blocks on and off."""
    torch.manual_seed(seed)
    encoder = AmortizedTransformerEncoder(AmortizedConfig(base=SMALL)).eval()
    for block in encoder.blocks:
        torch.nn.init.normal_(block.arbitrator.out.weight, std=2.0)
        torch.nn.init.constant_(block.arbitrator.out.bias, 0.3)
    return encoder


def _stream(
    encoder: AmortizedTransformerEncoder | CausalTransformerEncoder, feats: torch.Tensor, sizes: list[int]
) -> torch.Tensor:
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


def _random_sizes(total: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(min(int(torch.randint(0, 30, (), generator=generator)), total - sum(sizes)))
    return sizes


@pytest.mark.parametrize("forced", [True, None])  # forced on, or left to the fresh arbitrators (init_bias 2)
def test_all_gates_on_equals_dense_model(forced: bool | None) -> None:
    dense = _dense()
    amortized = AmortizedTransformerEncoder.from_dense(dense)
    amortized.set_forced_gates(mha=forced, ffn=forced)
    feats, lengths = torch.randn(3, 150, SMALL.input_dim), torch.tensor([150, 97, 30])
    with torch.no_grad():
        expected = dense(feats, lengths)
        out = amortized(feats, lengths)
        torch.testing.assert_close(out.frames, expected.frames, atol=1e-5, rtol=0.0)
        assert torch.equal(out.lengths, expected.lengths)
        sizes = _chunk_sizes(150, 16)
        torch.testing.assert_close(_stream(amortized, feats, sizes), _stream(dense, feats, sizes), atol=1e-5, rtol=0.0)
    assert amortized.gate_stats().executed_share == 1.0


def test_dense_checkpoint_loads_with_only_arbitrator_keys_missing() -> None:
    dense = _dense()
    amortized = AmortizedTransformerEncoder(AmortizedConfig(base=SMALL))
    missing, unexpected = amortized.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(".arbitrator." in key for key in missing)
    assert set(amortized.state_dict()) - set(missing) == set(dense.state_dict())


@pytest.mark.parametrize(("sub_block", "layer"), [("ffn", 1), ("mha", 2)])
def test_forced_off_sub_block_is_never_called_and_its_flops_vanish(sub_block: str, layer: int) -> None:
    encoder = AmortizedTransformerEncoder.from_dense(_dense())
    encoder.set_forced_gates(mha=True, ffn=True)  # no arbitrator runs: the on/off difference is the sub-block alone
    feats, lengths = torch.randn(1, 203, SMALL.input_dim), torch.tensor([203])
    frames = int(encoder.subsampled_length(lengths)[0])
    with torch.no_grad():
        all_on = measure_flops(encoder, feats, lengths)
        block = encoder.blocks[layer]
        if sub_block == "ffn":
            encoder.set_forced_gates(mha=True, ffn=False, layers=[layer])
            watched = [block.feed_forward, block.feed_forward_norm]
            analytic = frames * ffn_flops_per_frame(SMALL.d_model, SMALL.ffn_dim, elementwise=False)
        else:
            encoder.set_forced_gates(mha=False, ffn=True, layers=[layer])
            watched = [block.attention.qkv, block.attention.out, block.attention_norm]
            # a whole-utterance forward scores each query against all T' keys (the band mask discards the rest)
            analytic = frames * mha_flops_per_frame(SMALL.d_model, SMALL.num_heads, frames, elementwise=False)
        calls: list[str] = []
        handles = [module.register_forward_hook(lambda *_: calls.append("called")) for module in watched]
        skipped = measure_flops(encoder, feats, lengths)
        _stream(encoder, feats, _chunk_sizes(203, 16))
        for handle in handles:
            handle.remove()
    assert calls == []
    assert abs((all_on - skipped) / analytic - 1.0) < 0.02
    rates = encoder.gate_stats().ffn_rate if sub_block == "ffn" else encoder.gate_stats().mha_rate
    assert rates[layer] == pytest.approx(1 / 3)  # on in the first pass, off in the forced forward and in streaming


@pytest.mark.parametrize("chunk", [7, 16, 40, "random"])
def test_chunked_infer_equals_forward_with_mixed_gates(chunk: int | str) -> None:
    encoder = _mixed()
    feats = torch.randn(2, 203, SMALL.input_dim)
    sizes = _random_sizes(203, seed=3) if chunk == "random" else _chunk_sizes(203, int(chunk))
    with torch.no_grad():
        offline = encoder(feats, torch.tensor([203, 203])).frames
        encoder.reset_gate_stats()
        streamed = _stream(encoder, feats, sizes)
        stats = encoder.gate_stats()
        alone = _stream(encoder, feats[1:], sizes)  # batch 1 takes other gather and cache paths
    assert stats.frames == 2 * 50
    assert 0.2 < stats.executed_share < 0.8 and 0 < min(stats.mha_on + stats.ffn_on) < max(stats.mha_on) < 100
    assert streamed.shape == offline.shape == (2, 50, SMALL.d_model)
    torch.testing.assert_close(streamed, offline, atol=1e-4, rtol=0.0)
    torch.testing.assert_close(alone[0], offline[1], atol=1e-4, rtol=0.0)


def test_gathered_path_equals_masked_path_in_eval_mode() -> None:
    encoder = _mixed(seed=1)
    feats, lengths = torch.randn(3, 180, SMALL.input_dim), torch.tensor([180, 121, 64])
    with torch.no_grad():
        gathered, gathered_gates = encoder.encode_with_gates(feats, lengths, gather=True)
        masked, masked_gates = encoder.encode_with_gates(feats, lengths, gather=False)
    torch.testing.assert_close(gathered.frames, masked.frames, atol=1e-5, rtol=0.0)
    for ours, theirs in zip(gathered_gates, masked_gates, strict=True):
        assert torch.equal(ours.mha, theirs.mha) and torch.equal(ours.ffn, theirs.ffn)
    assert float(gathered.compute_cost) == pytest.approx(float(masked.compute_cost))
    assert encoder(feats, lengths).frames.equal(gathered.frames)  # eval mode gathers by default


def test_batch_of_different_lengths_matches_single_utterances() -> None:
    encoder = _mixed(seed=2)
    lengths = torch.tensor([90, 57, 8, 0])
    feats = 100.0 * torch.randn(4, 90, SMALL.input_dim)  # loud garbage in the padding
    with torch.no_grad():
        out, gates = encoder.encode_with_gates(feats, lengths)
        assert out.lengths.tolist() == [21, 13, 1, 0]
        assert torch.isfinite(out.frames).all()
        for block_gates in gates:  # no compute on padding
            for b, valid in enumerate(out.lengths.tolist()):
                assert not block_gates.mha[b, valid:].any() and not block_gates.ffn[b, valid:].any()
        for b, length in enumerate(lengths.tolist()):
            single = encoder(feats[b : b + 1, :length], lengths[b : b + 1]).frames[0]
            valid = int(out.lengths[b])
            torch.testing.assert_close(out.frames[b, :valid], single, atol=1e-4, rtol=0.0)
            assert torch.all(out.frames[b, valid:] == 0)


def test_cache_holds_only_active_frames_of_the_window() -> None:
    encoder = _mixed(seed=4)
    feats = torch.randn(2, 120, SMALL.input_dim)
    with torch.no_grad():
        _, gates = encoder.encode_with_gates(feats, torch.tensor([120, 120]))
        state = encoder.init_state(batch_size=2)
        for chunk in feats.split(13, dim=1):
            _, state = encoder.infer(chunk, state)
    assert isinstance(state, AmortizedState) and state.offset == 29 and state.pending.shape == (2, 4, 20)
    for cache, block_gates in zip(state.layers, gates, strict=True):
        assert isinstance(cache, ActiveKVCache) and cache.key.shape[2] <= SMALL.left_context
        for b in range(2):
            expected = [s for s in range(29 - SMALL.left_context, 29) if block_gates.mha[b, s] > 0]
            assert cache.position[b][cache.active[b]].tolist() == expected


def test_train_mode_gates_are_hard_and_compute_cost_is_differentiable() -> None:
    torch.manual_seed(0)
    encoder = AmortizedTransformerEncoder(AmortizedConfig(base=SMALL)).train()
    feats, lengths = torch.randn(2, 120, SMALL.input_dim), torch.tensor([120, 80])
    out, gates = encoder.encode_with_gates(feats, lengths)
    for block_gates in gates:
        for gate in (block_gates.mha, block_gates.ffn):
            assert gate.requires_grad and set(gate.unique().tolist()) <= {0.0, 1.0}
    assert 0.85 < float(out.compute_cost.detach()) < 1.0  # p_on = sigmoid(init_bias 2) = 0.88, arbitrators always run
    (out.compute_cost + out.frames.square().mean()).backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="gather=True runs only in eval mode"):
        encoder(feats, lengths, gather=True)


def test_compute_cost_of_forced_gates() -> None:
    encoder = AmortizedTransformerEncoder(AmortizedConfig(base=dataclasses.replace(SMALL, dropout=0.0))).train()
    feats, lengths = torch.randn(2, 60, SMALL.input_dim), torch.tensor([60, 30])
    encoder.set_forced_gates(mha=True, ffn=True)
    assert float(encoder(feats, lengths).compute_cost) == 1.0
    encoder.set_forced_gates(mha=True, ffn=False)
    share = encoder.mha_flops / (encoder.mha_flops + encoder.ffn_flops)
    assert float(encoder(feats, lengths).compute_cost) == pytest.approx(share)
    encoder.set_forced_gates(mha=False, ffn=False)
    out = encoder(feats, lengths)
    assert float(out.compute_cost) == 0.0
    torch.testing.assert_close(out.frames, encoder.eval()(feats, lengths).frames)  # the front end and final norm


def test_compute_cost_loss_alone_drives_the_cost_down() -> None:
    torch.manual_seed(0)
    encoder = AmortizedTransformerEncoder(AmortizedConfig(base=SMALL)).train()
    feats, lengths = torch.randn(4, 80, SMALL.input_dim), torch.tensor([80, 80, 60, 40])
    optimizer = torch.optim.Adam(encoder.parameters(), lr=0.05)
    costs = []
    for _ in range(30):
        cost = encoder(feats, lengths).compute_cost
        optimizer.zero_grad()
        (10.0 * cost).backward()
        optimizer.step()
        costs.append(float(cost.detach()))
    assert costs[0] > 0.8 and costs[-1] < 0.4
    encoder.eval().reset_gate_stats()
    with torch.no_grad():
        encoder(feats, lengths)
    assert encoder.gate_stats().executed_share < 0.5


def test_off_frames_without_active_keys_stay_finite_in_training() -> None:
    torch.manual_seed(0)
    encoder = AmortizedTransformerEncoder(AmortizedConfig(base=SMALL, init_bias=-30.0)).train()  # every gate off
    out, gates = encoder.encode_with_gates(torch.randn(2, 60, SMALL.input_dim), torch.tensor([60, 45]))
    assert all(not g.mha.any() and not g.ffn.any() for g in gates)
    (out.frames.square().mean() + out.compute_cost).backward()
    assert torch.isfinite(out.frames).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in encoder.parameters())
    assert encoder.blocks[0].arbitrator.out.weight.grad.abs().sum() > 0  # the straight-through gradient


def test_opacus_validator_finds_no_errors() -> None:
    assert ModuleValidator.validate(AmortizedTransformerEncoder(AmortizedConfig()), strict=False) == []


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus hooks a model whose inputs need no grad
def test_opacus_per_sample_gradients_add_up_to_the_batch_gradient() -> None:
    torch.manual_seed(0)
    encoder = AmortizedTransformerEncoder(AmortizedConfig(base=dataclasses.replace(SMALL, dropout=0.0))).train()
    model = GradSampleModule(encoder, loss_reduction="sum")
    out = model(torch.randn(3, 60, SMALL.input_dim), torch.tensor([60, 50, 40]))
    (out.frames.square().sum() + 3.0 * out.compute_cost).backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad_sample is not None, name
        torch.testing.assert_close(parameter.grad_sample.sum(dim=0), parameter.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: AmortizedConfig(arbitrator_dim=0), "arbitrator_dim must be positive, got 0"),
        (lambda: AmortizedConfig(temperature=0.0), "temperature must be positive, got 0.0"),
        (lambda: AmortizedConfig(threshold=1.0), "threshold must lie in \\(0, 1\\), got 1.0"),
        (lambda: AmortizedConfig(init_bias=float("nan")), "init_bias must be finite, got nan"),
        (lambda: _mixed().set_forced_gates(mha=True, layers=[3]), "layer 3 is out of range \\[0, 3\\)"),
        (lambda: _mixed().set_forced_gates(ffn=1), "ffn must be True, False or None, got 1"),  # type: ignore[arg-type]
        (lambda: AmortizedTransformerEncoder.from_dense(_dense(), AmortizedConfig()), "differs from the dense"),
        (lambda: _mixed()(torch.randn(1, 20, 7), torch.tensor([20])), "F=20"),
        (lambda: _mixed()(torch.randn(1, 20, 20), torch.tensor([21])), "lengths must lie in \\[0, T=20\\]"),
        (lambda: _mixed().infer(torch.randn(3, 20, 20), _mixed().init_state(2)), "batch 3, the state has batch 2"),
    ],
)
def test_invalid_inputs_raise(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
