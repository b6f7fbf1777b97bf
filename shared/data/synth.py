"""The default Chorus corpus: voice-assistant commands spoken by espeak-ng through simulated devices.

``chorus data synth`` calls :func:`synthesize`.  Every speaker is one federated device: one
voice, one room, one microphone, one noise floor, used for all of its utterances.

Generative story
================
A speaker is drawn in this order (:func:`sample_population`):

1. **Accent** (an espeak-ng voice), with unequal population shares: ``en-us`` is the majority,
   the regional voices are minorities.  Each accent stands for a *market* and each market
   is served by a *device fleet* (``FLEETS``):

   ==========  ===============================================  ==========  ========  ===========
   fleet       accents (population share)                       narrowband  SNR (dB)  RT60 (s)
   ==========  ===============================================  ==========  ========  ===========
   ``modern``  en-us 24 %, en-gb 14 %, en-gb-x-rp 10 %              10 %    18 .. 30  0.20 .. 0.45
   ``mixed``   en-us-nyc 10 %, en-gb-x-gbclan (Lancaster) 10 %      35 %    10 .. 22  0.30 .. 0.60
   ``legacy``  en-gb-scotland 11 %, en-029 (Caribbean) 11 %,        65 %    5 .. 15   0.40 .. 0.75
               en-gb-x-gbcwmd (West Midlands) 10 %
   ==========  ===============================================  ==========  ========  ===========

   The ``legacy`` markets mostly run older units: telephone-band (8 kHz) front ends, noisy
   homes, live rooms.  So the accents that are already minorities *and* phonetically
   furthest from ``en-us`` also get the hardest channels: the cohorts that fairness work
   must find (en-029 x narrowband x low SNR is the worst one).  The difficulty is acoustic
   only: transcripts are always the exact text that was spoken.

2. **Age group** (hidden; child 15 %, adult 65 %, senior 20 %), which sets the espeak
   pitch ``-p`` (0..99) and rate ``-s`` (words/min) ranges and the talker's geometry:

   ======  ==========  =============  =====================  ==============================
   group   pitch       rate (w/min)   talker-device (m)      channel effect
   ======  ==========  =============  =====================  ==============================
   child   70 .. 95    120 .. 160     1.0 .. 3.0             SNR 3 dB lower (noisier rooms)
   adult   35 .. 65    150 .. 200     0.8 .. 2.5             none
   senior  20 .. 45    110 .. 150     2.0 .. 4.0             further away: less direct sound
   ======  ==========  =============  =====================  ==============================

   Children and seniors overlap in rate but not in pitch, so neither attribute alone
   identifies the group.

3. **Gender** (50/50) and a **voice variant** of that gender (``_VOICE_GENDERS``: espeak's
   ``m1..m8``, ``f1..f5`` and a few named variants); ``grandma``/``grandpa`` are given to
   seniors only.

4. **Device**: the fleet's narrowband probability, SNR and RT60 ranges (plus the age shift);
   a microphone band (telephone-band capsules 200-400 Hz .. 3.0-3.7 kHz on narrowband units,
   50-200 Hz .. 5.5-7.6 kHz on wideband ones) with a 12/18/24 dB-per-octave roll-off; a noise
   colour between brown (-6 dB/octave) and white; a shoebox room, the device on a shelf near
   one wall and the talker somewhere in front of it.

Signal chain of one utterance (:func:`render_utterance`)
=======================================================
espeak-ng (22.05 kHz; fed ``commands.spoken_form`` of the transcript, e.g. "a.m." for
"a m") -> resample to 16 kHz -> convolve with the device's room impulse
response (pyroomacoustics image-source model, computed once per device) -> add coloured
noise at the device SNR (audiomentations ``AddColorNoise``; SNR relative to the RMS of the
whole reverberant utterance) -> microphone band-pass (audiomentations ``BandPassFilter``) ->
narrowband devices only: down to 8 kHz and back up to 16 kHz -> peak-normalise to 0.9.

Randomness: the population is seeded per speaker from ``(seed, speaker index)``; every
utterance's sentence and noise are seeded from ``(seed, speaker index, utterance index)``,
so a corpus does not depend on how many workers built it or in which order.

Output layout (``synthesize(out, ...)``)::

    out/audio/<speaker>/<speaker>-<i:04d>.flac   16 kHz mono 16-bit FLAC
    out/manifest.jsonl                           id, speaker, audio, text, duration, sample_rate
    out/speakers.tsv                             hidden attributes: for evaluation code only
    out/synth.json                               arguments + format version (the cache key)
"""

import dataclasses
import functools
import json
import math
import multiprocessing
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pyroomacoustics as pra
import soundfile as sf
from audiomentations import AddColorNoise, BandPassFilter
from scipy.signal import fftconvolve, firwin, resample_poly

from shared.data.commands import sample_sentence, spoken_form
from shared.files import write_text_atomic

__all__ = [
    "ACCENTS",
    "AGE_GROUPS",
    "FLEETS",
    "FORMAT_VERSION",
    "SAMPLE_RATE",
    "SPEAKER_COLUMNS",
    "AgeProfile",
    "DeviceChannel",
    "Device",
    "Fleet",
    "Speaker",
    "SynthError",
    "espeak_executable",
    "render_utterance",
    "room_impulse_response",
    "sample_population",
    "speak",
    "synthesize",
]

SAMPLE_RATE = 16_000
ESPEAK_SAMPLE_RATE = 22_050
NARROWBAND_SAMPLE_RATE = 8_000
# A speaker's finished rows, and the arguments of a run that has not finished (what makes it resumable).
_DONE_FILE = "done.json"
_IN_PROGRESS_FILE = "synth.partial.json"
# Bump when the audio, the manifest or the speaker table would change for the same arguments.
FORMAT_VERSION = 1
PEAK_LEVEL = 0.9
SPEAKER_COLUMNS = (
    "speaker",
    "accent",
    "voice",
    "gender",
    "age_group",
    "pitch",
    "rate",
    "channel_rate",
    "mic_low_hz",
    "mic_high_hz",
    "snr_db",
    "rt60_s",
)
# Ids are fixed-width so that sorting them as strings sorts them by index.
_MAX_SPEAKERS = 10_000
_MAX_UTTERANCES = 10_000
_ESPEAK_MISSING = "espeak-ng not found: install it with `sudo apt-get install espeak-ng`"


class SynthError(RuntimeError):
    """espeak-ng is missing or failed on a sentence."""


# ---------------------------------------------------------------------------------------
# The population's tables (see the module docstring for the story they tell).


@dataclass(frozen=True)
class Fleet:
    """The devices sold into one market."""

    narrowband_probability: float
    snr_db: tuple[float, float]
    rt60_s: tuple[float, float]


FLEETS: dict[str, Fleet] = {
    "modern": Fleet(narrowband_probability=0.10, snr_db=(18.0, 30.0), rt60_s=(0.20, 0.45)),
    "mixed": Fleet(narrowband_probability=0.35, snr_db=(10.0, 22.0), rt60_s=(0.30, 0.60)),
    "legacy": Fleet(narrowband_probability=0.65, snr_db=(5.0, 15.0), rt60_s=(0.40, 0.75)),
}

# accent -> (population share, fleet)
ACCENTS: dict[str, tuple[float, str]] = {
    "en-us": (0.24, "modern"),
    "en-gb": (0.14, "modern"),
    "en-gb-x-rp": (0.10, "modern"),
    "en-us-nyc": (0.10, "mixed"),
    "en-gb-x-gbclan": (0.10, "mixed"),
    "en-gb-scotland": (0.11, "legacy"),
    "en-gb-x-gbcwmd": (0.10, "legacy"),
    "en-029": (0.11, "legacy"),
}


@dataclass(frozen=True)
class AgeProfile:
    share: float
    pitch: tuple[int, int]
    rate_wpm: tuple[int, int]
    snr_shift_db: float
    talker_distance_m: tuple[float, float]
    mouth_height_m: tuple[float, float]


AGE_GROUPS: dict[str, AgeProfile] = {
    "child": AgeProfile(
        0.15, pitch=(70, 95), rate_wpm=(120, 160), snr_shift_db=-3.0, talker_distance_m=(1.0, 3.0), mouth_height_m=(0.8, 1.3)
    ),
    "adult": AgeProfile(
        0.65, pitch=(35, 65), rate_wpm=(150, 200), snr_shift_db=0.0, talker_distance_m=(0.8, 2.5), mouth_height_m=(1.1, 1.7)
    ),
    "senior": AgeProfile(
        0.20, pitch=(20, 45), rate_wpm=(110, 150), snr_shift_db=0.0, talker_distance_m=(2.0, 4.0), mouth_height_m=(1.0, 1.6)
    ),
}

# espeak-ng voice variants (files in espeak-ng-data/voices/!v) and the gender they speak with.
_VOICE_GENDERS: dict[str, str] = {
    **{f"m{i}": "male" for i in range(1, 9)},
    "Andy": "male",
    "Lee": "male",
    "grandpa": "male",
    **{f"f{i}": "female" for i in range(1, 6)},
    "steph": "female",
    "linda": "female",
    "grandma": "female",
}
_SENIOR_VOICES = frozenset({"grandpa", "grandma"})
# Share of seniors who get the elderly-sounding variant of their gender.
_SENIOR_VOICE_PROBABILITY = 0.4

_WIDEBAND_MIC_HZ = ((50, 200), (5_500, 7_600))
_TELEPHONE_MIC_HZ = ((200, 400), (3_000, 3_700))
_MIC_ROLLOFFS_DB_PER_OCTAVE = (12, 18, 24)
_NOISE_DECAY_DB_PER_OCTAVE = (-6.0, 0.0)  # brown .. white
_ROOM_M = ((3.5, 7.5), (3.0, 6.0), (2.4, 3.0))
# Keep talker and device this far from the walls.
_WALL_CLEARANCE_M = 0.4
# Image-source order cap: reflections of order > 60 arrive after >= 60 x 2.4 m / c = 0.42 s,
# late in the decay (on 40 sampled devices the capped RIR's T20 is within 1 % of the
# uncapped one), while the uncapped order (up to ~140 in a small live room) costs seconds.
_MAX_IMAGE_ORDER = 60

# Seed-sequence domains, so that a speaker's stream can never equal an utterance's stream
# (SeedSequence pads short entropy with zeros: [s, i] and [s, i, 0] would collide).
_POPULATION_STREAM = 0
_UTTERANCE_STREAM = 1


# ---------------------------------------------------------------------------------------
# Speakers and devices.


@dataclass(frozen=True)
class Device:
    """One device's acoustic channel; everything a listener would hear besides the voice."""

    sample_rate: int  # 8000 (telephone-band front end) or 16000; files are always 16 kHz
    mic_low_hz: int
    mic_high_hz: int
    mic_rolloff_db: int  # dB per octave, a multiple of 6
    snr_db: float
    noise_decay_db: float  # noise colour in dB per octave: 0 white, -3 pink, -6 brown
    rt60_s: float
    room_m: tuple[float, float, float]
    mic_m: tuple[float, float, float]
    talker_m: tuple[float, float, float]

    @property
    def narrowband(self) -> bool:
        return self.sample_rate == NARROWBAND_SAMPLE_RATE


@dataclass(frozen=True)
class Speaker:
    """One federated client: a voice and the device it speaks to.

    Everything but ``id`` is hidden: training code sees only the audio and transcripts,
    evaluation code reads the rest from ``speakers.tsv``.
    """

    id: str
    accent: str  # espeak-ng voice, one of ACCENTS
    voice: str  # espeak-ng variant, the part after "+"
    gender: str  # "male" | "female", the variant's gender
    age_group: str  # one of AGE_GROUPS
    pitch: int  # espeak -p, 0..99
    rate: int  # espeak -s, words per minute
    device: Device

    @property
    def espeak_voice(self) -> str:
        return f"{self.accent}+{self.voice}"

    def tsv_row(self) -> str:
        """This speaker's line in ``speakers.tsv`` (columns: SPEAKER_COLUMNS)."""
        device = self.device
        fields = (
            self.id,
            self.accent,
            self.voice,
            self.gender,
            self.age_group,
            str(self.pitch),
            str(self.rate),
            str(device.sample_rate),
            str(device.mic_low_hz),
            str(device.mic_high_hz),
            f"{device.snr_db:.1f}",
            f"{device.rt60_s:.2f}",
        )
        return "\t".join(fields)


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], decimals: int) -> float:
    return round(float(rng.uniform(*bounds)), decimals)


def _pick(rng: np.random.Generator, options: list[str], weights: list[float]) -> str:
    return options[int(rng.choice(len(options), p=np.asarray(weights) / sum(weights)))]


def _sample_device(rng: np.random.Generator, fleet: Fleet, age: AgeProfile) -> Device:
    narrowband = bool(rng.random() < fleet.narrowband_probability)
    (low_bounds, high_bounds) = _TELEPHONE_MIC_HZ if narrowband else _WIDEBAND_MIC_HZ
    length, width, height = (_uniform(rng, bounds, 2) for bounds in _ROOM_M)
    # The device sits on a shelf or table near the x = 0 wall, facing into the room.
    mic = (_uniform(rng, (0.3, 0.6), 2), _uniform(rng, (0.5, width - 0.5), 2), _uniform(rng, (0.7, 1.2), 2))
    distance = float(rng.uniform(*age.talker_distance_m))
    bearing = float(rng.uniform(-math.pi / 3, math.pi / 3))
    talker_x = np.clip(mic[0] + distance * math.cos(bearing), _WALL_CLEARANCE_M, length - _WALL_CLEARANCE_M)
    talker_y = np.clip(mic[1] + distance * math.sin(bearing), _WALL_CLEARANCE_M, width - _WALL_CLEARANCE_M)
    talker = (round(float(talker_x), 2), round(float(talker_y), 2), _uniform(rng, age.mouth_height_m, 2))
    return Device(
        sample_rate=NARROWBAND_SAMPLE_RATE if narrowband else SAMPLE_RATE,
        mic_low_hz=int(rng.integers(low_bounds[0], low_bounds[1] + 1)),
        mic_high_hz=int(rng.integers(high_bounds[0], high_bounds[1] + 1)),
        mic_rolloff_db=int(rng.choice(_MIC_ROLLOFFS_DB_PER_OCTAVE)),
        snr_db=round(float(rng.uniform(*fleet.snr_db)) + age.snr_shift_db, 1),
        noise_decay_db=_uniform(rng, _NOISE_DECAY_DB_PER_OCTAVE, 2),
        rt60_s=_uniform(rng, fleet.rt60_s, 2),
        room_m=(length, width, height),
        mic_m=mic,
        talker_m=talker,
    )


def _sample_speaker(index: int, seed: int) -> Speaker:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _POPULATION_STREAM, index]))
    accent = _pick(rng, list(ACCENTS), [share for share, _ in ACCENTS.values()])
    age_group = _pick(rng, list(AGE_GROUPS), [profile.share for profile in AGE_GROUPS.values()])
    age = AGE_GROUPS[age_group]
    gender = "male" if rng.random() < 0.5 else "female"
    everyday_voices = [v for v, g in _VOICE_GENDERS.items() if g == gender and v not in _SENIOR_VOICES]
    if age_group == "senior" and rng.random() < _SENIOR_VOICE_PROBABILITY:
        voice = next(v for v in _SENIOR_VOICES if _VOICE_GENDERS[v] == gender)
    else:
        voice = everyday_voices[int(rng.integers(len(everyday_voices)))]
    return Speaker(
        id=f"spk{index:04d}",
        accent=accent,
        voice=voice,
        gender=gender,
        age_group=age_group,
        pitch=int(rng.integers(age.pitch[0], age.pitch[1] + 1)),
        rate=int(rng.integers(age.rate_wpm[0], age.rate_wpm[1] + 1)),
        device=_sample_device(rng, FLEETS[ACCENTS[accent][1]], age),
    )


def sample_population(n: int, seed: int) -> list[Speaker]:
    """Draw ``n`` speakers ``spk0000..``; speaker ``i`` depends only on ``(seed, i)``."""
    if not 1 <= n <= _MAX_SPEAKERS:
        raise ValueError(f"sample_population: n must be in 1..{_MAX_SPEAKERS}, got {n}")
    _check_seed(seed)
    return [_sample_speaker(index, seed) for index in range(n)]


# ---------------------------------------------------------------------------------------
# Speech and channel.


@functools.cache
def _anti_aliasing_filter(up: int, down: int) -> np.ndarray:
    """The FIR filter resample_poly would design for ``up / down``, designed once per ratio.

    resample_poly designs it on every call, which costs about as much as the filtering.
    """
    max_rate = max(up, down)
    half_length = 10 * max_rate  # resample_poly's own default
    return firwin(2 * half_length + 1, 1 / max_rate, window=("kaiser", 5.0))


def _resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    # 22050 -> 16000 is 320 / 441 (160 / 441 would land on 8 kHz).
    common = math.gcd(from_rate, to_rate)
    up, down = to_rate // common, from_rate // common
    return resample_poly(samples, up, down, window=_anti_aliasing_filter(up, down)).astype(np.float32)


def espeak_executable() -> str:
    executable = shutil.which("espeak-ng")
    if executable is None:
        raise SynthError(_ESPEAK_MISSING)
    return executable


def speak(speaker: Speaker, text: str, executable: str) -> np.ndarray:
    """espeak-ng's rendering of ``text`` in ``speaker``'s voice, float32 at SAMPLE_RATE."""
    voice = speaker.espeak_voice
    command = [
        executable,
        "-v",
        voice,
        "-p",
        str(speaker.pitch),
        "-s",
        str(speaker.rate),
        "--stdout",
        spoken_form(text),
    ]
    completed = subprocess.run(command, capture_output=True, check=False)
    if completed.returncode != 0 or not completed.stdout:
        stderr = completed.stderr.decode(errors="replace").strip()
        raise SynthError(f"espeak-ng failed (exit {completed.returncode}) for voice {voice} on {text!r}: {stderr}")
    samples, rate = sf.read(BytesIO(completed.stdout), dtype="float32")
    if rate != ESPEAK_SAMPLE_RATE:
        raise SynthError(f"espeak-ng wrote {rate} Hz for voice {voice}, expected {ESPEAK_SAMPLE_RATE} Hz")
    return _resample(samples, ESPEAK_SAMPLE_RATE, SAMPLE_RATE)


def room_impulse_response(device: Device) -> np.ndarray:
    """The device's room impulse response at SAMPLE_RATE (pyroomacoustics image sources)."""
    absorption, max_order = pra.inverse_sabine(device.rt60_s, list(device.room_m))
    room = pra.ShoeBox(
        list(device.room_m),
        fs=SAMPLE_RATE,
        materials=pra.Material(absorption),
        max_order=min(max_order, _MAX_IMAGE_ORDER),
    )
    room.add_source(list(device.talker_m))
    room.add_microphone(list(device.mic_m))
    room.compute_rir()
    return np.asarray(room.rir[0][0], dtype=np.float32)


@contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed the global ``random`` and ``np.random`` that audiomentations draws from.

    The caller's global states are restored afterwards, so rendering in-process does not
    perturb anyone else's randomness.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class DeviceChannel:
    """A device's channel, built once (the RIR is the expensive part) and applied per utterance."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.rir = room_impulse_response(device)
        # Align the output with the dry speech: drop the propagation delay before the direct path.
        self._direct_path = int(np.argmax(np.abs(self.rir)))
        # Keep the reverberant tail for the first 30 dB of decay; the rest is under the noise.
        self._tail = int(device.rt60_s / 2 * SAMPLE_RATE)
        self._noise = AddColorNoise(
            min_snr_db=device.snr_db,
            max_snr_db=device.snr_db,
            min_f_decay=device.noise_decay_db,
            max_f_decay=device.noise_decay_db,
            p=1.0,
        )
        # audiomentations parametrises a band by its centre and its width relative to the centre.
        centre = (device.mic_low_hz + device.mic_high_hz) / 2
        bandwidth_fraction = (device.mic_high_hz - device.mic_low_hz) / centre
        self._microphone = BandPassFilter(
            min_center_freq=centre,
            max_center_freq=centre,
            min_bandwidth_fraction=bandwidth_fraction,
            max_bandwidth_fraction=bandwidth_fraction,
            min_rolloff=device.mic_rolloff_db,
            max_rolloff=device.mic_rolloff_db,
            p=1.0,
        )

    def __call__(self, speech: np.ndarray, *, noise_seed: int) -> np.ndarray:
        start = self._direct_path
        reverberant = fftconvolve(speech, self.rir)[start : start + len(speech) + self._tail]
        reverberant = reverberant.astype(np.float32)
        with _seeded_global_rngs(noise_seed):
            noisy = self._noise(reverberant, sample_rate=SAMPLE_RATE)
            captured = self._microphone(noisy, sample_rate=SAMPLE_RATE)
        if self.device.narrowband:
            telephone_band = _resample(captured, SAMPLE_RATE, NARROWBAND_SAMPLE_RATE)
            captured = _resample(telephone_band, NARROWBAND_SAMPLE_RATE, SAMPLE_RATE)
        peak = float(np.max(np.abs(captured)))
        if peak == 0.0:
            raise SynthError(f"channel of {self.device} produced silence")
        return (captured * (PEAK_LEVEL / peak)).astype(np.float32)


def render_utterance(speaker: Speaker, text: str, *, noise_seed: int) -> np.ndarray:
    """``text`` spoken by ``speaker`` through its device: float32 mono at SAMPLE_RATE, peak 0.9.

    Builds the device's RIR on every call; :func:`synthesize` builds it once per speaker.
    """
    return DeviceChannel(speaker.device)(speak(speaker, text, espeak_executable()), noise_seed=noise_seed)


# ---------------------------------------------------------------------------------------
# The corpus writer.


@dataclass(frozen=True)
class _SpeakerJob:
    out: Path
    index: int
    speaker: Speaker
    utterances: int
    seed: int


@dataclass(frozen=True)
class _Utterance:
    id: str
    speaker: str
    audio: str  # relative to the corpus root, POSIX separators
    text: str
    duration: float

    def manifest_line(self) -> str:
        # Written by hand rather than json.dumps(dict) so that the duration always has three
        # decimals and two runs produce byte-identical manifests.
        return (
            f'{{"id": {json.dumps(self.id)}, "speaker": {json.dumps(self.speaker)}, '
            f'"audio": {json.dumps(self.audio)}, "text": {json.dumps(self.text)}, '
            f'"duration": {self.duration:.3f}, "sample_rate": {SAMPLE_RATE}}}'
        )


def _utterance_seeds(seed: int, speaker_index: int, utterance_index: int) -> tuple[int, int]:
    """(sentence seed, noise seed) of one utterance."""
    entropy = [seed, _UTTERANCE_STREAM, speaker_index, utterance_index]
    text_seed, noise_seed = np.random.SeedSequence(entropy).generate_state(2)
    return int(text_seed), int(noise_seed)


def _synthesize_speaker(job: _SpeakerJob) -> list[_Utterance]:
    """Render and write all utterances of one speaker (the unit of work of the pool).

    A finished speaker leaves ``audio/<speaker>/done.json`` (its manifest rows, written last and atomically), so an
    interrupted ``synthesize`` resumes with the speakers it had not finished.
    """
    speaker = job.speaker
    folder = job.out / "audio" / speaker.id
    done = folder / _DONE_FILE
    if done.is_file():
        return [_Utterance(**row) for row in json.loads(done.read_text())]
    executable = espeak_executable()
    channel = DeviceChannel(speaker.device)
    folder.mkdir(parents=True, exist_ok=True)
    utterances: list[_Utterance] = []
    for utterance_index in range(job.utterances):
        text_seed, noise_seed = _utterance_seeds(job.seed, job.index, utterance_index)
        text = sample_sentence(random.Random(text_seed))
        audio = channel(speak(speaker, text, executable), noise_seed=noise_seed)
        utterance_id = f"{speaker.id}-{utterance_index:04d}"
        sf.write(folder / f"{utterance_id}.flac", audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        utterances.append(
            _Utterance(
                id=utterance_id,
                speaker=speaker.id,
                audio=f"audio/{speaker.id}/{utterance_id}.flac",
                text=text,
                duration=round(len(audio) / SAMPLE_RATE, 3),
            )
        )
    write_text_atomic(done, json.dumps([dataclasses.asdict(u) for u in utterances]))
    return utterances


def _run_jobs(jobs: list[_SpeakerJob], workers: int, progress: bool) -> list[_Utterance]:
    # Longest reverberation first: the slowest RIRs start early and the pool ends together.
    ordered = sorted(jobs, key=lambda job: -job.speaker.device.rt60_s)
    total = sum(job.utterances for job in jobs)
    results: list[_Utterance] = []
    with _progress_bar(enabled=progress, total=total) as advance:
        if workers == 1:
            for job in ordered:
                results.extend(_synthesize_speaker(job))
                advance(job.utterances)
        else:
            # forkserver: its one server process imports this module (pyroomacoustics, scipy: seconds) and forks
            # every pool's workers from itself. Not fork: the caller may hold threads (rich's refresher, torch's
            # pools); not spawn: each worker of each pool would import it all again.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            with context.Pool(workers) as pool:
                for utterances in pool.imap_unordered(_synthesize_speaker, ordered, chunksize=1):
                    results.extend(utterances)
                    advance(len(utterances))
    return results


@contextmanager
def _progress_bar(*, enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a rich progress bar on stderr when ``enabled``."""
    if not enabled:
        yield lambda _: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        SpinnerColumn(),
        TextColumn("[bold]synthesizing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("utterances"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("synthesize", total=total)
        yield lambda n: bar.advance(task, n)


def _arguments(speakers: int, utterances: int, seed: int) -> dict[str, int]:
    return {"format_version": FORMAT_VERSION, "speakers": speakers, "utterances": utterances, "seed": seed}


def _is_cached(out: Path, arguments: dict[str, int]) -> bool:
    marker = out / "synth.json"
    if not (marker.is_file() and (out / "manifest.jsonl").is_file() and (out / "speakers.tsv").is_file()):
        return False
    try:
        return json.loads(marker.read_text()) == arguments
    except json.JSONDecodeError:
        return False


def synthesize(
    out: Path,
    *,
    speakers: int,
    utterances: int,
    seed: int,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the corpus of ``speakers`` x ``utterances`` commands in ``out``.

    Returns ``out``.  If ``out/synth.json`` records the same arguments and the manifest is
    there, nothing is done.  An interrupted run with the same arguments resumes: speakers it finished
    are kept (``audio/<speaker>/done.json``); otherwise ``out/audio`` and the metadata files are replaced.
    ``synth.json`` is written last.  ``workers``
    (default ``os.cpu_count()``) and ``progress`` do not change the result.

    Example::

        >>> synthesize(Path("data/commands"), speakers=200, utterances=40, seed=0)  # doctest: +SKIP
        PosixPath('data/commands')
    """
    out = Path(out)
    if not 1 <= speakers <= _MAX_SPEAKERS:
        raise ValueError(f"synthesize: speakers must be in 1..{_MAX_SPEAKERS}, got {speakers}")
    if not 1 <= utterances <= _MAX_UTTERANCES:
        raise ValueError(f"synthesize: utterances must be in 1..{_MAX_UTTERANCES}, got {utterances}")
    _check_seed(seed)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"synthesize: workers must be >= 1, got {workers}")
    arguments = _arguments(speakers, utterances, seed)
    if _is_cached(out, arguments):
        return out
    espeak_executable()  # fail before touching `out` if espeak-ng is missing

    out.mkdir(parents=True, exist_ok=True)
    (out / "synth.json").unlink(missing_ok=True)
    in_progress = out / _IN_PROGRESS_FILE
    resumable = in_progress.is_file() and json.loads(in_progress.read_text()) == arguments
    if (out / "audio").exists() and not resumable:
        shutil.rmtree(out / "audio")
    write_text_atomic(in_progress, json.dumps(arguments))
    population = sample_population(speakers, seed)
    jobs = [_SpeakerJob(out, index, speaker, utterances, seed) for index, speaker in enumerate(population)]
    rows = _run_jobs(jobs, min(workers, speakers), progress)

    rows.sort(key=lambda row: row.id)
    write_text_atomic(out / "manifest.jsonl", "".join(row.manifest_line() + "\n" for row in rows))
    table = ["\t".join(SPEAKER_COLUMNS)] + [speaker.tsv_row() for speaker in population]
    write_text_atomic(out / "speakers.tsv", "\n".join(table) + "\n")
    write_text_atomic(out / "synth.json", json.dumps(arguments, indent=2) + "\n")
    in_progress.unlink()
    return out
