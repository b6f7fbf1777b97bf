"""Reading audio files into the pipeline's one waveform format: 16 kHz mono float32 in [-1, 1].

Every audio problem a user can cause (missing file, corrupt file, empty file, wrong sample rate) raises
:class:`AudioError`, whose message starts with the file's path, so that corpus loading can record the
reason and move on instead of crashing a whole client.

Example::

    >>> samples = load_audio("fsdd/recordings/0_george_0.wav", resample=True)  # 8 kHz file -> 16 kHz
    >>> samples.dtype, samples.ndim
    (dtype('float32'), 1)
"""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np
import soundfile

__all__ = ["SAMPLE_RATE", "AudioError", "load_audio", "probe_audio"]

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """An audio file that cannot be used: missing, unreadable, empty or at the wrong sample rate."""


def probe_audio(path: Path | str, *, sample_rate: int = SAMPLE_RATE, resample: bool = False) -> int:
    """Validate an audio file from its header alone and return its native sample rate.

    Cheap enough to run over thousands of files (no samples are decoded), so it cannot catch a file whose
    header is intact but whose data is truncated: :func:`load_audio` still raises for those.

    Args:
        path: the audio file.
        sample_rate: the rate the caller wants.
        resample: whether the caller will resample; when False a different native rate is an error.

    Returns:
        The file's native sample rate in Hz.

    Raises:
        AudioError: the file is missing, unreadable, has no samples, or (``resample=False``) has a
            sample rate other than ``sample_rate``.
    """
    path = Path(path)
    _check_target_rate(sample_rate)
    _check_exists(path)
    try:
        info = soundfile.info(str(path))
    except (soundfile.SoundFileError, RuntimeError) as error:
        raise AudioError(f"{path}: unreadable audio file ({error})") from error
    _check_header(path, native_rate=info.samplerate, num_frames=info.frames, sample_rate=sample_rate, resample=resample)
    return int(info.samplerate)


def load_audio(path: Path | str, *, sample_rate: int = SAMPLE_RATE, resample: bool = False) -> np.ndarray:
    """Decode an audio file into a mono float32 waveform in [-1, 1].

    Multi-channel files are averaged to mono. With ``resample=True`` a file at another rate is resampled
    with a polyphase filter at the exact integer ratio ``sample_rate / native_rate``.

    Args:
        path: the audio file (any format libsndfile reads: WAV, FLAC, OGG, ...).
        sample_rate: the rate of the returned waveform, in Hz.
        resample: whether a file at another rate is resampled (True) or rejected (False).

    Returns:
        ``(N,)`` float32 samples at ``sample_rate``.

    Raises:
        AudioError: the file is missing, unreadable, has no samples, contains non-finite samples, or
            (``resample=False``) has a sample rate other than ``sample_rate``.
    """
    path = Path(path)
    _check_target_rate(sample_rate)
    _check_exists(path)
    try:
        with soundfile.SoundFile(str(path)) as audio_file:
            native_rate = audio_file.samplerate
            # The header check runs before decoding, so a wrong-rate file costs no decoding work.
            _check_header(path, native_rate=native_rate, num_frames=audio_file.frames, sample_rate=sample_rate, resample=resample)
            samples = audio_file.read(dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as error:
        raise AudioError(f"{path}: unreadable audio file ({error})") from error
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: empty audio file (0 samples)")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    if native_rate != sample_rate:
        from scipy.signal import resample_poly  # here, not at the top: scipy.signal takes a second to import

        common = gcd(sample_rate, native_rate)
        mono = resample_poly(mono, sample_rate // common, native_rate // common).astype(np.float32)
    # Float-encoded files may exceed full scale and resampling can overshoot it slightly; the
    # contract of this function is [-1, 1].
    return np.clip(mono, -1.0, 1.0, out=mono)


def _check_target_rate(sample_rate: int) -> None:
    if sample_rate <= 0:
        raise AudioError(f"sample_rate must be a positive number of Hz, got {sample_rate}")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")


def _check_header(path: Path, *, native_rate: int, num_frames: int, sample_rate: int, resample: bool) -> None:
    if num_frames == 0:
        raise AudioError(f"{path}: empty audio file (0 samples)")
    if native_rate != sample_rate and not resample:
        raise AudioError(f"{path}: sample rate {native_rate} Hz, expected {sample_rate} Hz")
