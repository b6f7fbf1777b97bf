"""Acoustic features: 80-dim log-mel filterbanks, global CMVN and SpecAugment.

Filterbanks come from kaldi-native-fbank with Kaldi's defaults except: 80 mel bins, dither 0 (the same
audio must give the same features, on a server and on a device) and ``snip_edges=True``. With snip_edges
every frame lies wholly inside the signal, so a frame is ready as soon as its 400 samples have arrived:
:class:`StreamingFbank` emits frames with no end-of-input lookahead and its output is identical to
:func:`compute_fbank` on the whole waveform. (``snip_edges=False`` also streams exactly but holds back
the reflected last frames until the input ends.)

Waveforms are float samples in [-1, 1] (as :func:`shared.data.audio.load_audio` returns), not
int16-scaled as in Kaldi: global CMVN removes the constant offset this puts on log energies.

Legend: ``N`` samples, ``T`` frames, ``F = N_MELS`` mel bins, ``B`` batch size.

Example::

    >>> feats = compute_fbank(np.zeros(16000, dtype=np.float32))   # 1 s of silence
    >>> feats.shape
    (98, 80)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import torch

from shared.data.audio import SAMPLE_RATE

__all__ = [
    "FRAME_LENGTH",
    "FRAME_SHIFT",
    "N_MELS",
    "FeatureError",
    "GlobalCMVN",
    "StreamingFbank",
    "augment",
    "compute_fbank",
    "draw_lead",
    "noise_floor",
    "num_frames",
    "prepend_silence",
    "spec_augment",
]

N_MELS = 80
NOISE_FLOOR_FRAMES = 5  # the first 50 ms of a recording: what its device hears before anyone speaks (prepend_silence)
FRAME_LENGTH = 400
"""Samples per analysis window: 25 ms at 16 kHz."""
FRAME_SHIFT = 160
"""Samples between consecutive frames: 10 ms at 16 kHz."""
FRAME_RATE = SAMPLE_RATE // FRAME_SHIFT
"""Frames per second of audio (100)."""
_STD_FLOOR = 1e-5


class FeatureError(ValueError):
    """Input that cannot be turned into features, or a CMVN file that cannot be used."""


def num_frames(num_samples: int) -> int:
    """Number of fbank frames ``compute_fbank`` returns for ``num_samples`` samples (0 if too short)."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def compute_fbank(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Log-mel filterbank of a whole waveform.

    Args:
        samples: ``(N,)`` waveform in [-1, 1].
        sample_rate: must be 16000; resample when loading (:func:`shared.data.audio.load_audio`).

    Returns:
        ``(T, F)`` float32 with ``T = 1 + (N - 400) // 160``.

    Raises:
        FeatureError: wrong sample rate, input that is not 1-D or not finite, or fewer than 400 samples.
    """
    samples = _as_waveform(samples, sample_rate)
    if samples.shape[0] < FRAME_LENGTH:
        raise FeatureError(
            f"audio of {samples.shape[0]} samples is too short for one frame: at least "
            f"{FRAME_LENGTH} samples ({1000 * FRAME_LENGTH // SAMPLE_RATE} ms) are needed"
        )
    stream = StreamingFbank(sample_rate)
    return np.concatenate([stream.accept(samples), stream.finish()])


class StreamingFbank:
    """Incremental filterbank: feed audio chunks of any size, receive the frames each chunk completes.

    Concatenating everything :meth:`accept` and :meth:`finish` return equals :func:`compute_fbank` of the
    concatenated chunks. Frames are handed over once and then dropped, so memory stays bounded on
    arbitrarily long streams.

    Example::

        >>> stream = StreamingFbank()
        >>> stream.accept(np.zeros(560, dtype=np.float32)).shape   # frames at samples 0-400 and 160-560
        (2, 80)
        >>> stream.finish().shape
        (0, 80)
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        """Raises FeatureError if ``sample_rate`` is not 16000."""
        _check_sample_rate(sample_rate)
        self._fbank = knf.OnlineFbank(_fbank_options())
        self._frames_returned = 0
        self._finished = False

    def accept(self, samples: np.ndarray) -> np.ndarray:
        """Append ``(n,)`` samples (n may be 0); return the ``(t, F)`` frames now complete (t may be 0).

        Raises:
            FeatureError: the chunk is not 1-D or not finite, or :meth:`finish` was already called.
        """
        if self._finished:
            raise FeatureError("StreamingFbank.accept called after finish(): start a new StreamingFbank")
        samples = _as_waveform(samples, SAMPLE_RATE)
        if samples.shape[0] > 0:
            self._fbank.accept_waveform(SAMPLE_RATE, samples)
        return self._take_ready_frames()

    def finish(self) -> np.ndarray:
        """Mark the end of the input and return the ``(t, F)`` frames not yet returned."""
        if self._finished:
            raise FeatureError("StreamingFbank.finish called twice: start a new StreamingFbank")
        self._finished = True
        self._fbank.input_finished()
        return self._take_ready_frames()

    def _take_ready_frames(self) -> np.ndarray:
        ready = self._fbank.num_frames_ready
        if ready == self._frames_returned:
            return np.zeros((0, N_MELS), dtype=np.float32)
        # get_frame returns a view into knf's buffer, which pop() frees: np.stack copies before popping.
        frames = np.stack([self._fbank.get_frame(index) for index in range(self._frames_returned, ready)])
        self._fbank.pop(ready - self._frames_returned)
        self._frames_returned = ready
        return frames


@dataclass(eq=False)
class GlobalCMVN:
    """Per-bin mean and standard deviation over a training set, applied as ``(x - mean) / std``.

    Attributes:
        mean: ``(F,)`` float64.
        std: ``(F,)`` float64, floored at 1e-5.
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values.shape != (N_MELS,):
                raise FeatureError(f"GlobalCMVN.{name} has shape {values.shape}, expected ({N_MELS},)")
            if not np.isfinite(values).all():
                raise FeatureError(f"GlobalCMVN.{name} contains NaN or infinite values")
        if (self.std <= 0).any():
            raise FeatureError(f"GlobalCMVN.std must be positive, got minimum {self.std.min()}")

    @classmethod
    def fit(cls, feature_arrays: Iterable[np.ndarray]) -> GlobalCMVN:
        """Statistics over every frame of ``(T, F)`` arrays, in one pass and float64.

        Arrays are merged with Chan et al.'s pairwise update, which stays accurate where the textbook
        ``E[x^2] - E[x]^2`` loses digits to cancellation.

        Raises:
            FeatureError: an array is not ``(T, F)``, or there are no frames at all.
        """
        count = 0
        mean = np.zeros(N_MELS, dtype=np.float64)
        squared_deviations = np.zeros(N_MELS, dtype=np.float64)
        for index, feats in enumerate(feature_arrays):
            feats = np.asarray(feats, dtype=np.float64)
            if feats.ndim != 2 or feats.shape[1] != N_MELS:
                raise FeatureError(f"feature array {index} has shape {feats.shape}, expected (T, {N_MELS})")
            if feats.shape[0] == 0:
                continue
            batch_count = feats.shape[0]
            batch_mean = feats.mean(axis=0)
            batch_squared_deviations = ((feats - batch_mean) ** 2).sum(axis=0)
            total = count + batch_count
            delta = batch_mean - mean
            mean = mean + delta * (batch_count / total)
            squared_deviations += batch_squared_deviations + delta**2 * (count * batch_count / total)
            count = total
        if count == 0:
            raise FeatureError("cannot fit GlobalCMVN: no feature frames given")
        std = np.maximum(np.sqrt(squared_deviations / count), _STD_FLOOR)
        return cls(mean=mean, std=std)

    def apply(self, feats: np.ndarray) -> np.ndarray:
        """Normalize ``(..., F)`` features; returns float32.

        Raises:
            FeatureError: the last dimension is not ``F``.
        """
        if feats.ndim == 0 or feats.shape[-1] != N_MELS:
            raise FeatureError(f"features of shape {feats.shape} cannot be normalized: last dimension must be {N_MELS}")
        return ((feats - self.mean) / self.std).astype(np.float32)

    def to_json(self) -> str:
        """The statistics as JSON ``{"mean": [...], "std": [...]}`` (exact float round trip)."""
        return json.dumps({"mean": self.mean.tolist(), "std": self.std.tolist()}) + "\n"

    def save(self, path: Path | str) -> None:
        """Write :meth:`to_json` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> GlobalCMVN:
        """Read statistics written by :meth:`save`.

        Raises:
            FeatureError: naming the path and the problem: missing file, invalid JSON, missing or
                non-numeric fields, wrong dimension.
        """
        path = Path(path)
        if not path.is_file():
            raise FeatureError(f"{path}: no such CMVN file")
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FeatureError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(content, dict) or set(content) != {"mean", "std"}:
            found = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise FeatureError(f"{path}: expected an object with keys 'mean' and 'std', found {found}")
        fields: dict[str, np.ndarray] = {}
        for name in ("mean", "std"):
            values = content[name]
            if not isinstance(values, list) or not all(
                isinstance(value, (int, float)) and not isinstance(value, bool) for value in values
            ):
                raise FeatureError(f"{path}: '{name}' must be a list of numbers")
            if len(values) != N_MELS:
                raise FeatureError(f"{path}: '{name}' has {len(values)} values, expected {N_MELS}")
            fields[name] = np.array(values, dtype=np.float64)
        try:
            return cls(mean=fields["mean"], std=fields["std"])
        except FeatureError as error:
            raise FeatureError(f"{path}: {error}") from error


def spec_augment(
    feats: torch.Tensor,
    lengths: torch.Tensor,
    *,
    generator: torch.Generator,
    freq_masks: int = 2,
    freq_width: int = 15,
    time_masks: int = 2,
    time_width_ratio: float = 0.05,
) -> torch.Tensor:
    """SpecAugment frequency and time masking (Park et al., 2019) on a padded batch; masked values become 0.

    Features are CMVN-normalized, so 0 is the training-set mean: a masked region carries no information
    and no outlier. Each utterance gets ``freq_masks`` bands of width ``U{0..freq_width}`` and
    ``time_masks`` spans of width ``U{0..floor(time_width_ratio * length)}``, all inside its own
    ``length`` frames; padding frames are left untouched.

    Args:
        feats: ``(B, T, F)`` features.
        lengths: ``(B,)`` valid frames per utterance, each ``<= T``.
        generator: source of randomness (on the CPU or on ``feats``' device), for reproducible masks.
        freq_masks: bands per utterance.
        freq_width: widest band, in bins (at most ``F``).
        time_masks: spans per utterance.
        time_width_ratio: widest span as a fraction of the utterance's length, in [0, 1].

    Returns:
        A new ``(B, T, F)`` tensor; ``feats`` is not modified.

    Raises:
        FeatureError: shapes or mask parameters that do not fit.
    """
    if feats.ndim != 3:
        raise FeatureError(f"spec_augment expects (B, T, F) features, got shape {tuple(feats.shape)}")
    batch_size, max_frames, num_bins = feats.shape
    if lengths.shape != (batch_size,):
        raise FeatureError(f"lengths has shape {tuple(lengths.shape)}, expected ({batch_size},)")
    if batch_size and (lengths.min() < 0 or lengths.max() > max_frames):
        raise FeatureError(f"lengths must lie in 0..{max_frames} (T), got {lengths.tolist()}")
    if freq_masks < 0 or time_masks < 0:
        raise FeatureError(f"mask counts must be >= 0, got freq_masks={freq_masks}, time_masks={time_masks}")
    if not 0 <= freq_width <= num_bins:
        raise FeatureError(f"freq_width={freq_width} must lie in 0..{num_bins} (F)")
    if not 0.0 <= time_width_ratio <= 1.0:
        raise FeatureError(f"time_width_ratio={time_width_ratio} must lie in [0, 1]")

    lengths = lengths.to(device=generator.device, dtype=torch.float64)
    max_band = torch.full((batch_size, 1), float(freq_width), dtype=torch.float64, device=generator.device)
    freq_masked = _random_spans(max_band, torch.full_like(max_band, float(num_bins)), freq_masks, num_bins, generator)
    max_span = torch.floor(lengths * time_width_ratio)[:, None]
    time_masked = _random_spans(max_span, lengths[:, None], time_masks, max_frames, generator)
    valid = torch.arange(max_frames, device=generator.device)[None, :] < lengths[:, None]
    masked = (freq_masked[:, None, :] | time_masked[:, :, None]) & valid[:, :, None]
    return feats.masked_fill(masked.to(feats.device), 0.0)


def noise_floor(frames: torch.Tensor, count: int, *, generator: torch.Generator) -> torch.Tensor:
    """``count`` frames drawn at random (with replacement) from the first ``NOISE_FLOOR_FRAMES`` of an utterance's
    ``(n, F)`` ``frames`` (n >= 1): silence as its device hears it, its noise and room, not digital zeros."""
    drawn = torch.randint(0, min(NOISE_FLOOR_FRAMES, frames.shape[0]), (count,), generator=generator)
    return frames[drawn.to(frames.device)]


def draw_lead(count: int, max_frames: int, prob: float, *, generator: torch.Generator) -> torch.Tensor:
    """``(count,)`` lead-in lengths for ``prepend_silence``: U{0..``max_frames``} frames with probability ``prob``,
    else 0 (the utterance begins on cue, as a recording cut by a wake word or a tap does).

    At ``prob`` 1 nothing more is drawn than the uniform lengths, so runs made before ``prob`` existed replay exactly.
    """
    if max_frames < 0 or not 0.0 <= prob <= 1.0:
        raise FeatureError(f"draw_lead expects max_frames >= 0 and prob in [0, 1], got {max_frames} and {prob}")
    lead = torch.randint(0, max_frames + 1, (count,), generator=generator)
    if prob < 1.0:
        lead = torch.where(torch.rand(count, generator=generator) < prob, lead, 0)
    return lead


def prepend_silence(
    feats: torch.Tensor, lengths: torch.Tensor, lead: torch.Tensor, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each utterance of a padded batch with ``lead[b]`` frames of its own noise floor before it.

    A recording starts whenever the device starts listening, not when the talker does. A streaming encoder trained
    only on utterances whose speech begins a few frames in learns where speech begins (the causal attention's and
    convolution's left edge tell it how far in a frame is) and fails on speech that begins later. The silence is
    the utterance's own ``noise_floor``.

    Args:
        feats: ``(B, T, F)`` features.
        lengths: ``(B,)`` valid frames per utterance, each ``<= T``.
        lead: ``(B,)`` frames to prepend, each ``>= 0``.
        generator: source of randomness, on the CPU.

    Returns:
        ``(B, T + max(lead), F)`` features (padding is 0) and their ``(B,)`` lengths; an empty utterance stays empty.
    """
    if feats.ndim != 3 or lengths.shape != (feats.shape[0],) or lead.shape != lengths.shape:
        raise FeatureError(
            f"prepend_silence expects (B, T, F) features with (B,) lengths and leads, got {tuple(feats.shape)}, "
            f"{tuple(lengths.shape)} and {tuple(lead.shape)}"
        )
    if len(lead) and int(lead.min()) < 0:
        raise FeatureError(f"lead frames must be >= 0, got {lead.tolist()}")
    lengths = lengths.long().cpu()
    lead = torch.where(lengths > 0, lead.long().cpu(), 0)  # an empty utterance has no floor to draw from
    out = feats.new_zeros(feats.shape[0], feats.shape[1] + (int(lead.max()) if len(lead) else 0), feats.shape[2])
    for b, (n, k) in enumerate(zip(lengths.tolist(), lead.tolist(), strict=True)):
        if n:
            out[b, :k] = noise_floor(feats[b, :n], k, generator=generator)
            out[b, k : k + n] = feats[b, :n]
    return out, lengths + lead


def augment(
    feats: torch.Tensor, lengths: torch.Tensor, *, lead_frames: int, lead_prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training's augmentation of one padded ``(B, T, F)`` batch, the same under DP-SGD and without: each utterance,
    with probability ``lead_prob``, after U{0..``lead_frames``} frames of its noise floor (``prepend_silence``;
    ``lead_frames`` 0: none), then SpecAugment. Returns the features and their ``(B,)`` lengths."""
    if lead_frames > 0:
        lead = draw_lead(len(lengths), lead_frames, lead_prob, generator=generator)
        feats, lengths = prepend_silence(feats, lengths, lead, generator=generator)
    return spec_augment(feats, lengths, generator=generator), lengths


def _random_spans(
    max_width: torch.Tensor, extent: torch.Tensor, count: int, size: int, generator: torch.Generator
) -> torch.Tensor:
    """``(B, size)`` boolean union of ``count`` spans per row, width ``U{0..max_width}`` inside ``[0, extent)``."""
    batch_size = max_width.shape[0]
    draw = (batch_size, count)
    widths = torch.floor(torch.rand(draw, generator=generator, device=generator.device, dtype=torch.float64) * (max_width + 1))
    starts = torch.floor(
        torch.rand(draw, generator=generator, device=generator.device, dtype=torch.float64) * (extent - widths + 1)
    )
    positions = torch.arange(size, device=generator.device, dtype=torch.float64)[None, None, :]
    inside = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
    return inside.any(dim=1)


def _fbank_options() -> knf.FbankOptions:
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = SAMPLE_RATE
    options.frame_opts.frame_length_ms = 1000 * FRAME_LENGTH / SAMPLE_RATE
    options.frame_opts.frame_shift_ms = 1000 * FRAME_SHIFT / SAMPLE_RATE
    options.frame_opts.dither = 0.0
    options.frame_opts.snip_edges = True
    options.mel_opts.num_bins = N_MELS
    return options


def _check_sample_rate(sample_rate: int) -> None:
    if sample_rate != SAMPLE_RATE:
        raise FeatureError(f"sample rate {sample_rate} Hz, expected {SAMPLE_RATE} Hz: resample the audio when loading it")


def _as_waveform(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    _check_sample_rate(sample_rate)
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise FeatureError(f"expected 1-D mono samples, got an array of shape {samples.shape}")
    samples = samples.astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise FeatureError("samples contain NaN or infinite values")
    return samples
