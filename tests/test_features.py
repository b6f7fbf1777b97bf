"""Tests for shared.data.features: fbank shapes and errors, streaming == offline, CMVN, SpecAugment, leading silence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.data.features import (
    FRAME_LENGTH,
    N_MELS,
    FeatureError,
    GlobalCMVN,
    StreamingFbank,
    compute_fbank,
    draw_lead,
    NOISE_FLOOR_FRAMES,
    num_frames,
    prepend_silence,
    spec_augment,
)


@pytest.fixture(scope="module")
def speechlike() -> np.ndarray:
    """3.3 s of a gliding tone over noise: broadband, non-stationary, deterministic."""
    rng = np.random.default_rng(7)
    time = np.arange(52_873) / 16000
    glide = 0.4 * np.sin(2 * np.pi * (200 + 600 * time) * time)
    return (glide + 0.05 * rng.standard_normal(time.shape[0])).astype(np.float32)


def test_fbank_shape_dtype_and_determinism(speechlike: np.ndarray) -> None:
    feats = compute_fbank(speechlike)
    assert feats.dtype == np.float32
    assert feats.shape == (num_frames(speechlike.shape[0]), N_MELS) == (1 + (52_873 - 400) // 160, 80)
    assert np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, compute_fbank(speechlike))


def test_fbank_energy_lands_in_the_right_mel_bins() -> None:
    time = np.arange(8000) / 16000
    low = compute_fbank((0.5 * np.sin(2 * np.pi * 300 * time)).astype(np.float32)).mean(axis=0).argmax()
    high = compute_fbank((0.5 * np.sin(2 * np.pi * 4000 * time)).astype(np.float32)).mean(axis=0).argmax()
    assert low < 20 < 50 < high


def test_exactly_one_frame_at_400_samples() -> None:
    assert compute_fbank(np.zeros(FRAME_LENGTH, dtype=np.float32)).shape == (1, N_MELS)
    assert num_frames(FRAME_LENGTH - 1) == 0


@pytest.mark.parametrize(
    ("samples", "sample_rate", "message"),
    [
        (np.zeros(16000, dtype=np.float32), 8000, "sample rate 8000 Hz, expected 16000 Hz"),
        (np.zeros((2, 16000), dtype=np.float32), 16000, r"1-D mono samples, got an array of shape \(2, 16000\)"),
        (np.zeros(399, dtype=np.float32), 16000, "399 samples is too short for one frame: at least 400 samples"),
        (np.full(16000, np.nan, dtype=np.float32), 16000, "NaN or infinite"),
    ],
)
def test_fbank_rejects_bad_input(samples: np.ndarray, sample_rate: int, message: str) -> None:
    with pytest.raises(FeatureError, match=message):
        compute_fbank(samples, sample_rate)


def _streamed(samples: np.ndarray, chunk_sizes: list[int]) -> np.ndarray:
    stream = StreamingFbank()
    pieces, start = [], 0
    for size in chunk_sizes:
        frames = stream.accept(samples[start : start + size])
        assert frames.dtype == np.float32 and frames.shape[1:] == (N_MELS,)
        pieces.append(frames)
        start += size
    pieces.append(stream.finish())
    return np.concatenate(pieces)


@pytest.mark.parametrize("chunk", [160, 1000, 4000, "random"])
def test_streaming_equals_offline(speechlike: np.ndarray, chunk: int | str) -> None:
    total = speechlike.shape[0]
    if chunk == "random":
        rng = np.random.default_rng(3)
        sizes = [0]  # an empty chunk must be harmless too
        while sum(sizes) < total:
            sizes.append(int(rng.integers(1, 2500)))
    else:
        sizes = [chunk] * (total // chunk + 1)
    streamed = _streamed(speechlike, sizes)
    offline = compute_fbank(speechlike)
    assert streamed.shape == offline.shape
    assert np.abs(streamed - offline).max() < 1e-4


def test_streaming_emits_frames_without_lookahead() -> None:
    stream = StreamingFbank()
    assert stream.accept(np.zeros(399, dtype=np.float32)).shape == (0, N_MELS)
    assert stream.accept(np.zeros(1, dtype=np.float32)).shape == (1, N_MELS)
    assert stream.accept(np.zeros(160, dtype=np.float32)).shape == (1, N_MELS)
    assert stream.finish().shape == (0, N_MELS)
    with pytest.raises(FeatureError, match="after finish"):
        stream.accept(np.zeros(160, dtype=np.float32))
    with pytest.raises(FeatureError, match="sample rate 8000 Hz"):
        StreamingFbank(8000)


def test_cmvn_fit_matches_numpy_and_normalizes(speechlike: np.ndarray) -> None:
    arrays = [compute_fbank(speechlike[:20_000]), compute_fbank(speechlike[20_000:]), np.zeros((0, N_MELS))]
    cmvn = GlobalCMVN.fit(iter(arrays))
    everything = np.concatenate(arrays).astype(np.float64)
    np.testing.assert_allclose(cmvn.mean, everything.mean(axis=0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(cmvn.std, everything.std(axis=0), rtol=1e-10)
    normalized = cmvn.apply(everything.astype(np.float32))
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(normalized.std(axis=0), 1, atol=1e-4)


def test_cmvn_std_is_floored_for_constant_bins() -> None:
    cmvn = GlobalCMVN.fit([np.full((10, N_MELS), 3.0)])
    np.testing.assert_array_equal(cmvn.std, 1e-5)
    assert np.isfinite(cmvn.apply(np.full((2, N_MELS), 3.0, dtype=np.float32))).all()


def test_cmvn_fit_rejects_bad_arrays() -> None:
    with pytest.raises(FeatureError, match=r"feature array 1 has shape \(5, 40\)"):
        GlobalCMVN.fit([np.zeros((5, N_MELS)), np.zeros((5, 40))])
    with pytest.raises(FeatureError, match="no feature frames"):
        GlobalCMVN.fit([])


def test_cmvn_save_load_round_trip_is_exact(tmp_path: Path, speechlike: np.ndarray) -> None:
    cmvn = GlobalCMVN.fit([compute_fbank(speechlike)])
    cmvn.save(tmp_path / "stats" / "cmvn.json")
    loaded = GlobalCMVN.load(tmp_path / "stats" / "cmvn.json")
    np.testing.assert_array_equal(loaded.mean, cmvn.mean)
    np.testing.assert_array_equal(loaded.std, cmvn.std)


def test_cmvn_load_errors_name_path_and_problem(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(FeatureError, match=f"{missing}: no such CMVN file"):
        GlobalCMVN.load(missing)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{mean: oops")
    with pytest.raises(FeatureError, match=f"{bad_json}: not valid JSON"):
        GlobalCMVN.load(bad_json)
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"mean": [0.0] * 79, "std": [1.0] * 80}))
    with pytest.raises(FeatureError, match=f"{short}: 'mean' has 79 values, expected 80"):
        GlobalCMVN.load(short)
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps({"mean": [0.0] * 80, "std": [-1.0] * 80}))
    with pytest.raises(FeatureError, match=f"{negative}: .*std must be positive"):
        GlobalCMVN.load(negative)


def _augment_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([200, 120, 37, 0])
    feats = torch.randn(4, 200, N_MELS, generator=torch.Generator().manual_seed(0)).abs() + 0.1
    for row, length in enumerate(lengths.tolist()):
        feats[row, length:] = 7.0  # padding sentinel: must survive augmentation
    return feats, lengths


def test_spec_augment_is_reproducible_and_leaves_input_alone() -> None:
    feats, lengths = _augment_inputs()
    before = feats.clone()
    first = spec_augment(feats, lengths, generator=torch.Generator().manual_seed(1))
    second = spec_augment(feats, lengths, generator=torch.Generator().manual_seed(1))
    other = spec_augment(feats, lengths, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(feats, before)
    torch.testing.assert_close(first, second)
    assert not torch.equal(first, other)
    assert first.data_ptr() != feats.data_ptr()


def test_spec_augment_masks_stay_within_limits_and_lengths() -> None:
    feats, lengths = _augment_inputs()
    generator = torch.Generator().manual_seed(5)
    widest_time_masks = 0
    for _ in range(20):
        out = spec_augment(feats, lengths, generator=generator, freq_masks=2, freq_width=15, time_masks=2, time_width_ratio=0.1)
        changed = out != feats
        assert (out[changed] == 0).all()
        for row, length in enumerate(lengths.tolist()):
            assert not changed[row, length:].any(), "padding frames must not be masked"
            if length == 0:
                continue
            valid = changed[row, :length]
            masked_bins = valid.all(dim=0).sum().item()
            masked_frames = valid.all(dim=1).sum().item()
            assert masked_bins <= 2 * 15
            assert masked_frames <= 2 * int(0.1 * length)
            widest_time_masks = max(widest_time_masks, masked_frames)
    assert widest_time_masks > 0


def test_spec_augment_without_masks_is_identity_and_validates() -> None:
    feats, lengths = _augment_inputs()
    out = spec_augment(feats, lengths, generator=torch.Generator(), freq_masks=0, time_masks=0)
    torch.testing.assert_close(out, feats)
    with pytest.raises(FeatureError, match="expects \\(B, T, F\\)"):
        spec_augment(feats[0], lengths, generator=torch.Generator())
    with pytest.raises(FeatureError, match="lengths must lie in 0..200"):
        spec_augment(feats, torch.tensor([201, 1, 1, 1]), generator=torch.Generator())
    with pytest.raises(FeatureError, match="freq_width=81"):
        spec_augment(feats, lengths, generator=torch.Generator(), freq_width=81)


def test_prepend_silence_puts_each_utterances_own_noise_floor_before_it() -> None:
    feats, lengths = _augment_inputs()
    lead = torch.tensor([0, 3, 40, 7])
    before = feats.clone()
    out, out_lens = prepend_silence(feats, lengths, lead, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(feats, before)
    assert out.shape == (4, 200 + 40, N_MELS) and out_lens.tolist() == [200, 123, 77, 0]  # the empty one stays empty
    for row, (n, k) in enumerate(zip(lengths.tolist()[:3], lead.tolist(), strict=False)):
        torch.testing.assert_close(out[row, k : k + n], feats[row, :n])  # the utterance, whole, after its lead
        assert (out[row, k + n :] == 0).all()  # padding is zeros
        floor = feats[row, : min(NOISE_FLOOR_FRAMES, n)]
        for frame in out[row, :k]:  # every lead frame is one of the utterance's first frames
            assert (frame[None] == floor).all(dim=1).any()
    assert (out[3] == 0).all()
    assert len({tuple(f.tolist()) for f in out[2, :40]}) > 1, "the floor is drawn frame by frame, not one frame repeated"
    again, _ = prepend_silence(feats, lengths, lead, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)


def test_draw_lead_begins_the_rest_on_cue() -> None:
    uniform = draw_lead(4000, 100, 1.0, generator=torch.Generator().manual_seed(3))
    # prob 1 is the uniform draw alone: runs made before the setting existed replay exactly
    torch.testing.assert_close(uniform, torch.randint(0, 101, (4000,), generator=torch.Generator().manual_seed(3)))
    assert int(uniform.min()) == 0 and int(uniform.max()) == 100 and 45 < float(uniform.float().mean()) < 55
    half = draw_lead(4000, 100, 0.5, generator=torch.Generator().manual_seed(3))
    assert 0.45 < float((half == 0).float().mean()) < 0.56  # ~half on cue (plus the uniform's own zeros, 1%)
    assert 45 < float(half[half > 0].float().mean()) < 56 and int(half.max()) <= 100
    assert (draw_lead(50, 100, 0.0, generator=torch.Generator()) == 0).all()
    with pytest.raises(FeatureError, match="prob in \\[0, 1\\], got 100 and 1.5"):
        draw_lead(4, 100, 1.5, generator=torch.Generator())


def test_prepend_silence_validates() -> None:
    feats, lengths = _augment_inputs()
    with pytest.raises(FeatureError, match="lead frames must be >= 0"):
        prepend_silence(feats, lengths, torch.tensor([0, -1, 0, 0]), generator=torch.Generator())
    with pytest.raises(FeatureError, match="expects \\(B, T, F\\)"):
        prepend_silence(feats, lengths, torch.tensor([0, 1]), generator=torch.Generator())
