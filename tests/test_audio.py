"""Tests for shared.data.audio: decoding, mono mixing, resampling, and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from shared.data.audio import SAMPLE_RATE, AudioError, load_audio, probe_audio

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def sine(frequency: float, seconds: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    time = np.arange(int(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


def write(path: Path, samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> Path:
    soundfile.write(path, samples, sample_rate, subtype=subtype)
    return path


def dominant_frequency(samples: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(samples.shape[0], 1 / sample_rate)[spectrum.argmax()])


def test_loads_pcm16_wav_as_float32_mono(tmp_path: Path) -> None:
    original = sine(440, 0.5, SAMPLE_RATE)
    samples = load_audio(write(tmp_path / "a.wav", original, SAMPLE_RATE))
    assert samples.dtype == np.float32 and samples.shape == original.shape
    np.testing.assert_allclose(samples, original, atol=1 / 32768)


def test_multichannel_is_averaged(tmp_path: Path) -> None:
    left, right = sine(440, 0.25, SAMPLE_RATE), sine(440, 0.25, SAMPLE_RATE, amplitude=-0.25)
    samples = load_audio(write(tmp_path / "stereo.flac", np.stack([left, right], axis=1), SAMPLE_RATE))
    np.testing.assert_allclose(samples, (left + right) / 2, atol=2 / 32768)


def test_float_file_beyond_full_scale_is_clipped(tmp_path: Path) -> None:
    loud = sine(440, 0.1, SAMPLE_RATE, amplitude=3.0)
    samples = load_audio(write(tmp_path / "loud.wav", loud, SAMPLE_RATE, subtype="FLOAT"))
    assert samples.max() == 1.0 and samples.min() == -1.0


def test_wrong_sample_rate_is_rejected_without_resampling(tmp_path: Path) -> None:
    path = write(tmp_path / "narrowband.wav", sine(440, 0.5, 8000), 8000)
    with pytest.raises(AudioError) as error:
        load_audio(path)
    assert str(error.value) == f"{path}: sample rate 8000 Hz, expected 16000 Hz"
    with pytest.raises(AudioError, match="sample rate 8000 Hz, expected 16000 Hz"):
        probe_audio(path)


def test_resampling_8k_to_16k_keeps_duration_and_pitch(tmp_path: Path) -> None:
    path = write(tmp_path / "narrowband.wav", sine(440, 0.5, 8000), 8000)
    samples = load_audio(path, resample=True)
    assert samples.dtype == np.float32 and samples.shape == (8000,)
    assert dominant_frequency(samples, SAMPLE_RATE) == pytest.approx(440, abs=2)
    assert probe_audio(path, resample=True) == 8000


def test_resampling_uses_exact_non_trivial_ratio(tmp_path: Path) -> None:
    path = write(tmp_path / "cd.wav", sine(1000, 0.5, 44100), 44100)
    samples = load_audio(path, resample=True)
    assert samples.shape == (8000,)
    assert dominant_frequency(samples, SAMPLE_RATE) == pytest.approx(1000, abs=2)


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.wav"
    for read in (load_audio, probe_audio):
        with pytest.raises(AudioError, match="nowhere.wav: no such audio file"):
            read(path)


def test_corrupt_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    for read in (load_audio, probe_audio):
        with pytest.raises(AudioError) as error:
            read(path)
        assert str(error.value).startswith(f"{path}: unreadable audio file")


def test_empty_file_names_path(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    for read in (load_audio, probe_audio):
        with pytest.raises(AudioError) as error:
            read(path)
        assert str(error.value) == f"{path}: empty audio file (0 samples)"


def test_real_fsdd_recording_resamples_to_16k() -> None:
    recording = REAL_DATA / "fsdd" / "recordings" / "3_jackson_0.wav"
    if not recording.is_file():
        pytest.skip(f"real FSDD data not found at {recording.parent}")
    native = soundfile.info(str(recording))
    samples = load_audio(recording, resample=True)
    assert native.samplerate == 8000
    assert samples.shape == (native.frames * 2,)
    assert 0 < np.abs(samples).max() <= 1.0
