"""Two-talker sessions: utterances of two speakers of one corpus placed on one timeline, with pauses and overlaps.

``chorus data mix`` calls :func:`mix_sessions`. What a device in a kitchen hears: talker A gives a command, talker
B answers or interrupts, A goes on; each *turn* is one utterance of the corpus.

Timeline of one session (all randomness from ``(seed, session index)``, so a mix does not depend on the workers):

1. Two speakers, a number of turns in ``turns`` (talkers alternate, the first one drawn at random; one turn is a
   session of a single talker, what a device mostly hears), an utterance per turn drawn from its speaker without
   repeats, the first turn after a silence drawn in ``lead`` (0: the speech starts with the audio, as when a device
   starts listening on a wake word); the **speech** of a turn is the part of its waveform above an
   energy floor (:func:`speech_span`), so turn times mark voice, not the silence espeak or a microphone adds.
2. A target overlap ratio ``r ~ U(0, max_overlap)``, where overlap ratio (LibriCSS's) is the time both talk over
   the time anyone talks. The overlap it needs is shared among the turn changes at random; a change given less
   than 50 ms becomes a pause of 0.1-0.6 s instead, and no turn overlaps more than half of either neighbour, nor
   the talker's own previous turn. The ratio the session ends with is measured on the timeline and recorded.
3. Talker B's level relative to A is drawn in ``[-level_db, +level_db]`` dB (levels compared on speech RMS).
4. **The same device channel for both talkers.** A synthetic corpus (``chorus data synth``, which records its
   seed) is re-spoken dry by espeak-ng with each talker's voice, mixed, and only then passed through the room,
   microphone and noise of talker A's device: one room, one microphone, as a device would hear them. A corpus of
   recordings (e.g. speechocean762) has no dry speech: its recordings are mixed as they are.

Output layout::

    out/audio/<session>.flac   16 kHz mono 16-bit FLAC, peak 0.9
    out/sessions.jsonl         one session per line: id, audio, duration, overlap, speakers, turns
                               (each turn: talker 0/1, speaker, start and end of its speech in s, text)
    out/mix.json               the arguments (the cache key), written last
"""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from shared.data.corpora import Corpus, Utterance, load_corpus
from shared.data.synth import PEAK_LEVEL, SAMPLE_RATE, Speaker, DeviceChannel, espeak_executable, sample_population, speak
from shared.files import write_text_atomic

__all__ = [
    "MixError",
    "Session",
    "Turn",
    "load_sessions",
    "mix_sessions",
    "plan_timeline",
    "single_talker_sessions",
    "speech_span",
]

FORMAT_VERSION = 1
_MIX_STREAM = 0x6D6978  # "mix": keeps session seeds apart from the synthesizer's streams
LEAD_S = (0.2, 0.5)  # default range of the silence before the first turn
_TAIL_S = 0.6  # silence after the last turn: room for a streaming model to end-point it
_PAUSE_S = (0.1, 0.6)
_MIN_OVERLAP_S = 0.05


class MixError(ValueError):
    """Arguments or a corpus that cannot make sessions (the message names the culprit)."""


@dataclass(frozen=True)
class Turn:
    """One talker's utterance within a session; ``start``/``end`` bound its speech, in seconds."""

    talker: int  # 0 or 1: which of the session's two speakers
    speaker: str
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Session:
    id: str
    audio: Path
    duration: float
    overlap: float  # time two talk / time anyone talks
    speakers: tuple[str, str]
    turns: tuple[Turn, ...]  # in order of start time


def speech_span(samples: np.ndarray, *, floor_db: float = 35.0) -> tuple[int, int]:
    """(first, last + 1) sample of the speech in ``samples``: 10 ms frames within ``floor_db`` of the loudest one
    and 6 dB above the quietest tenth (the noise floor of a recording)."""
    frame = SAMPLE_RATE // 100
    count = max(1, len(samples) // frame)
    energy = np.square(samples[: count * frame].reshape(count, frame)).mean(axis=1)
    level = 10.0 * np.log10(energy + 1e-12)
    threshold = max(float(level.max()) - floor_db, float(np.percentile(level, 10)) + 6.0)
    active = np.flatnonzero(level >= threshold)
    if active.size == 0:
        return 0, len(samples)
    return int(active[0]) * frame, min(len(samples), (int(active[-1]) + 1) * frame)


def plan_timeline(durations: list[float], target_overlap: float, rng: np.random.Generator) -> list[float]:
    """Start times (s, from the first turn's start) of turns of speech ``durations`` whose talkers alternate,
    overlapping by about ``target_overlap`` (see the module docstring)."""
    total = sum(durations)
    needed = target_overlap * total / (1.0 + target_overlap)
    shares = rng.dirichlet(np.ones(max(1, len(durations) - 1))) * needed
    starts = [0.0]
    ends = [durations[0]]
    for i in range(1, len(durations)):
        limit = 0.5 * min(durations[i - 1], durations[i])
        overlap = min(float(shares[i - 1]), limit)
        start = ends[-1] - overlap if overlap >= _MIN_OVERLAP_S else ends[-1] + float(rng.uniform(*_PAUSE_S))
        if i >= 2:  # a talker's turn starts after its own previous one ends
            start = max(start, ends[-2] + float(rng.uniform(*_PAUSE_S)))
        starts.append(start)
        ends.append(start + durations[i])
    return starts


def _overlap_ratio(turns: list[Turn]) -> float:
    """Time covered by two turns at once over time covered by any, on a 10 ms grid."""
    end = max(t.end for t in turns)
    grid = np.zeros(int(np.ceil(end * 100)) + 1, dtype=np.int32)
    for t in turns:
        grid[int(round(t.start * 100)) : int(round(t.end * 100))] += 1
    active = int((grid > 0).sum())
    return float((grid > 1).sum()) / active if active else 0.0


@dataclass(frozen=True)
class _Job:
    out: Path
    index: int
    seed: int
    turns: tuple[int, int]
    max_overlap: float
    level_db: float
    lead: tuple[float, float]


class _Mixer:
    """Per-process state: the corpus, its speakers (with voices and devices when it is synthetic)."""

    corpus: Corpus
    by_speaker: dict[str, list[Utterance]]
    voices: dict[str, Speaker] | None

    @classmethod
    def setup(cls, root: Path) -> None:
        cls.corpus = load_corpus(root, validate=False)
        cls.by_speaker = {s: u for s, u in cls.corpus.by_speaker().items() if len(u) >= 2}
        marker = root / "synth.json"
        cls.voices = None
        if marker.is_file():
            arguments = json.loads(marker.read_text())
            cls.voices = {s.id: s for s in sample_population(int(arguments["speakers"]), int(arguments["seed"]))}

    @classmethod
    def session(cls, job: _Job) -> Session:
        rng = np.random.default_rng(np.random.SeedSequence([job.seed, _MIX_STREAM, job.index]))
        names = sorted(cls.by_speaker)
        first, second = rng.choice(len(names), size=2, replace=False)
        speakers = (names[int(first)], names[int(second)])
        count = int(rng.integers(job.turns[0], job.turns[1] + 1))
        leader = int(rng.integers(2))
        talkers = [(leader + i) % 2 for i in range(count)]
        picks = {t: list(rng.permutation(len(cls.by_speaker[speakers[t]]))) for t in (0, 1)}
        utterances = [cls.by_speaker[speakers[t]][int(picks[t].pop() if picks[t] else 0)] for t in talkers]
        gains = {0: 1.0, 1: float(10 ** (rng.uniform(-job.level_db, job.level_db) / 20))}
        voices = cls.voices
        if voices is not None:
            executable = espeak_executable()
            signals = [speak(voices[u.speaker], u.text, executable) for u in utterances]
        else:
            signals = [cls.corpus.load_audio(u) for u in utterances]
        spans = [speech_span(s) for s in signals]
        speech = [s[a:b] for s, (a, b) in zip(signals, spans, strict=True)]
        durations = [len(s) / SAMPLE_RATE for s in speech]
        target = float(rng.uniform(0.0, job.max_overlap))
        lead = float(rng.uniform(*job.lead))
        starts = [lead + s for s in plan_timeline(durations, target, rng)]
        length = int((max(s + d for s, d in zip(starts, durations, strict=True)) + _TAIL_S) * SAMPLE_RATE)
        mixture = np.zeros(length, dtype=np.float32)
        for talker, piece, start in zip(talkers, speech, starts, strict=True):
            rms = float(np.sqrt(np.mean(np.square(piece)))) or 1.0
            begin = int(round(start * SAMPLE_RATE))
            mixture[begin : begin + len(piece)] += piece * (0.1 * gains[talker] / rms)
        if voices is not None:
            noise_seed = int(rng.integers(2**31))
            mixture = DeviceChannel(voices[speakers[0]].device)(mixture, noise_seed=noise_seed)
        mixture = mixture * (PEAK_LEVEL / max(float(np.max(np.abs(mixture))), 1e-9))
        turns = [
            Turn(talker=t, speaker=speakers[t], start=round(s, 3), end=round(s + d, 3), text=u.text)
            for t, s, d, u in zip(talkers, starts, durations, utterances, strict=True)
        ]
        session_id = f"mix{job.seed}-{job.index:06d}"
        path = job.out / "audio" / f"{session_id}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, mixture, SAMPLE_RATE, subtype="PCM_16")
        return Session(
            id=session_id,
            audio=path,
            duration=round(len(mixture) / SAMPLE_RATE, 3),
            overlap=round(_overlap_ratio(turns), 4),
            speakers=speakers,
            turns=tuple(turns),
        )


def _session_line(session: Session, root: Path) -> str:
    row = asdict(session)
    row["audio"] = session.audio.relative_to(root).as_posix()
    return json.dumps(row, sort_keys=True)


def mix_sessions(
    corpus: Path,
    out: Path,
    *,
    sessions: int,
    seed: int,
    turns: tuple[int, int] = (2, 4),
    max_overlap: float = 0.4,
    level_db: float = 0.0,
    lead: tuple[float, float] = LEAD_S,
    workers: int | None = None,
) -> Path:
    """Build (or reuse, when ``out/mix.json`` records the same arguments) ``sessions`` two-talker sessions of
    ``corpus`` in ``out``; returns ``out``. Arguments are checked before any audio is read."""
    corpus, out = Path(corpus), Path(out)
    if sessions < 1:
        raise MixError(f"--sessions must be >= 1, got {sessions}")
    if not 1 <= turns[0] <= turns[1]:
        raise MixError(f"--turns must be MIN-MAX with 1 <= MIN <= MAX, got {turns[0]}-{turns[1]}")
    if not 0.0 <= max_overlap <= 0.5:
        raise MixError(f"--max-overlap must lie in [0, 0.5], got {max_overlap}")
    if not 0.0 <= level_db <= 20.0:
        raise MixError(f"--level-db must lie in [0, 20], got {level_db}")
    if not 0.0 <= lead[0] <= lead[1] <= 5.0:
        raise MixError(f"--lead must be MIN-MAX seconds with 0 <= MIN <= MAX <= 5, got {lead[0]}-{lead[1]}")
    if not corpus.is_dir():
        raise MixError(f"--corpus {corpus}: no such directory")
    arguments = {
        "format_version": FORMAT_VERSION,
        "corpus": str(corpus.resolve()),
        "sessions": sessions,
        "seed": seed,
        "turns": list(turns),
        "max_overlap": max_overlap,
        "level_db": level_db,
        "lead": list(lead),
    }
    marker = out / "mix.json"
    if marker.is_file() and (out / "sessions.jsonl").is_file() and json.loads(marker.read_text()) == arguments:
        return out
    _Mixer.setup(corpus)
    if len(_Mixer.by_speaker) < 2:
        raise MixError(f"--corpus {corpus}: needs two speakers with two or more utterances each")
    marker.unlink(missing_ok=True)
    jobs = [_Job(out, i, seed, turns, max_overlap, level_db, lead) for i in range(sessions)]
    workers = min(sessions, (os.cpu_count() or 1) if workers is None else max(1, workers))
    if workers == 1:
        made = [_Mixer.session(job) for job in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            made = pool.map(_Mixer.session, jobs, chunksize=8)
    write_text_atomic(out / "sessions.jsonl", "".join(_session_line(s, out) + "\n" for s in made))
    write_text_atomic(marker, json.dumps(arguments, indent=2) + "\n")
    return out


def load_sessions(path: Path | str) -> list[Session]:
    """The sessions of a ``chorus data mix`` directory (MixError naming the file and line when malformed)."""
    root = Path(path)
    manifest = root / "sessions.jsonl"
    if not manifest.is_file():
        raise MixError(f"{manifest}: no such file (make it with `chorus data mix`)")
    out = []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
            turns = tuple(Turn(**t) for t in row["turns"])
            out.append(
                Session(
                    id=row["id"],
                    audio=root / row["audio"],
                    duration=float(row["duration"]),
                    overlap=float(row["overlap"]),
                    speakers=(row["speakers"][0], row["speakers"][1]),
                    turns=turns,
                )
            )
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise MixError(f"{manifest}:{number}: malformed session ({err})") from err
    return out


def single_talker_sessions(corpus: Path | str) -> list[Session]:
    """Every utterance of ``corpus`` as a one-turn session, as recorded (speech from its first frames on, no lead-in):
    what a two-talker model on a device hears most of the time. The turn's times bound its speech."""
    loaded = load_corpus(corpus, validate=False)
    out = []
    for utt in loaded.utterances:
        samples = loaded.load_audio(utt)
        first, last = speech_span(samples)
        turn = Turn(talker=0, speaker=utt.speaker, start=first / SAMPLE_RATE, end=last / SAMPLE_RATE, text=utt.text)
        out.append(
            Session(
                id=utt.id,
                audio=utt.audio,
                duration=len(samples) / SAMPLE_RATE,
                overlap=0.0,
                speakers=(utt.speaker, ""),
                turns=(turn,),
            )
        )
    return out
