"""One record type for every corpus, and a loader that recognizes the three on-disk layouts Chorus reads.

Layouts, tried in this order:

* **Chorus manifest**: ``manifest.jsonl``, one JSON object per line with exactly the keys ``id``,
  ``speaker``, ``audio`` (path relative to the corpus directory), ``text``, ``duration`` (seconds) and
  ``sample_rate`` (Hz).
* **Kaldi data directory**: ``text`` (``utt-id TRANSCRIPT``), ``utt2spk`` (``utt-id speaker``) and
  ``wav.scp`` (``utt-id path``; plain paths, relative to the corpus directory or absolute).
* **Free Spoken Digit Dataset**: ``recordings/{digit}_{speaker}_{index}.wav`` at 8 kHz; the transcript is
  the digit as an English word.

A malformed corpus file is the corpus author's error and raises :class:`CorpusError` with the file, line
number and line. A bad entry (an unreadable audio file, a transcript outside the Chorus alphabet) is the
data's problem: it is skipped and recorded in :attr:`Corpus.skipped`, so one broken recording never stops a
client from training on the rest.

Speaker attributes (``speakers.tsv``: gender, age, accent) are deliberately not part of :class:`Corpus`:
training and client code must never see demographics. Evaluation code reads them with
:func:`read_speakers_tsv`.

Example::

    >>> corpus = load_corpus("../shared/data/fsdd")
    >>> corpus.utterances[0].text, corpus.utterances[0].sample_rate
    ('zero', 8000)
    >>> corpus.load_audio(corpus.utterances[0]).dtype   # resampled to 16 kHz
    dtype('float32')
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.data.audio import SAMPLE_RATE, AudioError, load_audio, probe_audio
from shared.data.tokenizer import TokenizerError, normalize_text

__all__ = [
    "MANIFEST_FILE",
    "Corpus",
    "CorpusError",
    "Utterance",
    "load_corpus",
    "read_speakers_tsv",
    "parse_speaker_filter",
    "speakers_matching",
]

_logger = logging.getLogger("chorus.data")

MANIFEST_FILE = "manifest.jsonl"
_KALDI_FILES = ("text", "utt2spk", "wav.scp")
_FSDD_DIR = "recordings"
_SPEAKERS_FILE = "speakers.tsv"
_FSDD_SAMPLE_RATE = 8000

# key -> (accepted JSON types, description for error messages)
_MANIFEST_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "id": ((str,), "a string"),
    "speaker": ((str,), "a string"),
    "audio": ((str,), "a string"),
    "text": ((str,), "a string"),
    "duration": ((int, float), "a number"),
    "sample_rate": ((int,), "an integer"),
}
_FSDD_NAME = re.compile(r"(?P<digit>[0-9])_(?P<speaker>.+)_(?P<index>[0-9]+)\.wav")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class CorpusError(ValueError):
    """A corpus directory that cannot be read: missing, of unknown layout, or with a malformed file."""


@dataclass(frozen=True)
class Utterance:
    """One recording and its transcript.

    Attributes:
        id: unique within the corpus.
        speaker: speaker id, unique within the corpus.
        audio: absolute path of the audio file.
        text: transcript, normalized by :func:`shared.data.tokenizer.normalize_text`.
        sample_rate: the file's native rate in Hz: read from the header when the corpus was validated,
            otherwise as the layout declares it (manifest field; 8000 for FSDD; 16000 assumed for Kaldi,
            whose files do not declare rates). :meth:`Corpus.load_audio` resamples from the file's real
            rate either way.
    """

    id: str
    speaker: str
    audio: Path
    text: str
    sample_rate: int


@dataclass
class Corpus:
    """The usable utterances of one corpus directory, and the entries that were skipped.

    Attributes:
        name: the directory's name.
        root: the directory's absolute path.
        utterances: in the order of the corpus files (FSDD: sorted by file name).
        skipped: ``(utterance id or file, reason)`` for every entry left out.
    """

    name: str
    root: Path
    utterances: list[Utterance]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def speakers(self) -> list[str]:
        """Sorted unique speaker ids."""
        return sorted({utterance.speaker for utterance in self.utterances})

    def by_speaker(self) -> dict[str, list[Utterance]]:
        """Utterances grouped per speaker (speakers in sorted order), each list sorted by utterance id."""
        groups: dict[str, list[Utterance]] = {speaker: [] for speaker in self.speakers()}
        for utterance in self.utterances:
            groups[utterance.speaker].append(utterance)
        for utterances in groups.values():
            utterances.sort(key=lambda utterance: utterance.id)
        return groups

    def load_audio(self, utt: Utterance) -> np.ndarray:
        """The utterance's waveform at 16 kHz, float32 in [-1, 1] (files at other rates are resampled).

        Raises:
            AudioError: the file cannot be read (see :func:`shared.data.audio.load_audio`).
        """
        return load_audio(utt.audio, sample_rate=SAMPLE_RATE, resample=True)


def load_corpus(path: Path | str, *, validate: bool = True) -> Corpus:
    """Load a corpus directory in any of the supported layouts (see the module docstring).

    Args:
        path: the corpus directory.
        validate: check every audio file's header (fast: nothing is decoded) and skip the bad ones. Without
            it, bad files surface later as :class:`~shared.data.audio.AudioError` from
            :meth:`Corpus.load_audio`.

    Raises:
        CorpusError: the directory is missing, matches no layout, or has a malformed file (the message
            names the file, the line number and the line).
    """
    root = Path(path).absolute()
    if not root.is_dir():
        raise CorpusError(f"{root}: no such corpus directory")
    if (root / MANIFEST_FILE).is_file():
        utterances, skipped = _load_manifest(root, validate=validate)
    elif all((root / name).is_file() for name in _KALDI_FILES):
        utterances, skipped = _load_kaldi(root, validate=validate)
    elif (root / _FSDD_DIR).is_dir():
        utterances, skipped = _load_fsdd(root, validate=validate)
    else:
        found_kaldi = [name for name in _KALDI_FILES if (root / name).is_file()]
        partial = f" (found only {', '.join(found_kaldi)})" if found_kaldi else ""
        raise CorpusError(
            f"{root}: unknown corpus layout: looked for {MANIFEST_FILE}, the Kaldi files "
            f"{' + '.join(_KALDI_FILES)}{partial}, or a {_FSDD_DIR}/ directory of FSDD wav files"
        )
    if skipped:
        first_entry, first_reason = skipped[0]
        _logger.warning(
            "%s: skipped %d of %d entries (first: %s: %s)",
            root,
            len(skipped),
            len(utterances) + len(skipped),
            first_entry,
            first_reason,
        )
    return Corpus(name=root.name, root=root, utterances=utterances, skipped=skipped)


def read_speakers_tsv(root: Path | str) -> dict[str, dict[str, str]]:
    """Speaker attributes from ``root/speakers.tsv``, for evaluation code (and `chorus train --withhold`, which
    leaves whole markets out of a public pool) only: no model ever sees them.

    The file has a header row; the first column is the speaker id, the others become attribute names.

    Returns:
        ``{speaker: {attribute: value}}``; empty when the corpus has no ``speakers.tsv``.

    Raises:
        CorpusError: a row with the wrong number of columns, or a speaker listed twice.
    """
    tsv_path = Path(root) / _SPEAKERS_FILE
    if not tsv_path.is_file():
        return {}
    with tsv_path.open(newline="", encoding="utf-8") as tsv_file:
        rows = list(csv.reader(tsv_file, delimiter="\t"))
    if not rows:
        return {}
    header, attributes = rows[0], {}
    for line_number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            line = "\t".join(row)
            raise CorpusError(
                f"{tsv_path}:{line_number}: {len(row)} columns, expected {len(header)} ({', '.join(header)}): {line!r}"
            )
        if row[0] in attributes:
            raise CorpusError(f"{tsv_path}:{line_number}: speaker {row[0]!r} listed twice")
        attributes[row[0]] = dict(zip(header[1:], row[1:]))
    return attributes


def parse_speaker_filter(spec: str) -> tuple[str, frozenset[str]]:
    """``"ATTRIBUTE=V1,V2"`` -> (attribute, values); a ValueError naming ``spec`` when it is not of that form."""
    key, _, values = spec.partition("=")
    chosen = frozenset(v for v in values.split(",") if v)
    if not key or not chosen:
        raise ValueError(f"{spec!r}: expected ATTRIBUTE=VALUE[,VALUE...], e.g. accent=en-029")
    return key, chosen


def speakers_matching(root: Path | str, spec: str, attributes: dict[str, dict[str, str]] | None = None) -> frozenset[str]:
    """The speakers of the corpus at ``root`` whose ``speakers.tsv`` attribute is one of the values of ``spec``
    (``"ATTRIBUTE=V1,V2"``): whole markets, for `chorus train --withhold` and ``split.market``. ``attributes``
    stands for the file where it is known before the file is written (a synthetic corpus not yet synthesized).

    Raises:
        ValueError: a malformed ``spec``, a column the file does not have, or a value no speaker has (a typo would
            otherwise select nobody), each named.
    """
    key, values = parse_speaker_filter(spec)
    attributes = read_speakers_tsv(root) if attributes is None else attributes
    columns = {column for row in attributes.values() for column in row}
    if key not in columns:
        raise ValueError(f"{spec!r}: {Path(root) / _SPEAKERS_FILE} has no column {key!r} ({sorted(columns)})")
    unknown = values - {row[key] for row in attributes.values()}
    if unknown:
        raise ValueError(f"{spec!r}: no speaker of {root} has {key} {sorted(unknown)}")
    return frozenset(speaker for speaker, row in attributes.items() if row.get(key) in values)


_Entries = tuple[list[Utterance], list[tuple[str, str]]]


class _EntryCollector:
    """Builds utterances one entry at a time, sending bad audio and bad transcripts to ``skipped``."""

    def __init__(self, *, validate: bool) -> None:
        self.validate = validate
        self.utterances: list[Utterance] = []
        self.skipped: list[tuple[str, str]] = []

    def add(
        self, *, utterance_id: str, speaker: str, audio: Path, raw_text: str, declared_rate: int, rate_is_declared: bool
    ) -> None:
        """Add one entry, or record why it was skipped.

        ``rate_is_declared``: the layout states the file's rate (manifest), so a header that disagrees makes
        the entry bad; otherwise ``declared_rate`` is only the layout's assumption and the header wins.
        """
        try:
            text = normalize_text(raw_text)
        except TokenizerError as error:
            self.skipped.append((utterance_id, str(error)))
            return
        sample_rate = declared_rate
        if self.validate:
            try:
                sample_rate = probe_audio(audio, sample_rate=declared_rate, resample=not rate_is_declared)
            except AudioError as error:
                self.skipped.append((utterance_id, str(error)))
                return
        self.utterances.append(Utterance(id=utterance_id, speaker=speaker, audio=audio, text=text, sample_rate=sample_rate))


def _load_manifest(root: Path, *, validate: bool) -> _Entries:
    manifest = root / MANIFEST_FILE
    collector = _EntryCollector(validate=validate)
    seen_lines: dict[str, int] = {}
    for line_number, line in _numbered_lines(manifest):
        fail = _line_error(manifest, line_number, line)
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise fail(f"invalid JSON ({error.msg} at column {error.colno})") from error
        if not isinstance(entry, dict):
            raise fail(f"expected a JSON object, got {type(entry).__name__}")
        unknown, missing = sorted(set(entry) - set(_MANIFEST_FIELDS)), sorted(set(_MANIFEST_FIELDS) - set(entry))
        if unknown:
            raise fail(f"unknown key(s) {', '.join(unknown)}")
        if missing:
            raise fail(f"missing key(s) {', '.join(missing)}")
        for key, (accepted, description) in _MANIFEST_FIELDS.items():
            # bool is an int subclass in Python, but `true` is no sample rate.
            if not isinstance(entry[key], accepted) or isinstance(entry[key], bool):
                raise fail(f"{key!r} must be {description}, got {entry[key]!r}")
        if entry["duration"] <= 0 or entry["sample_rate"] <= 0:
            raise fail("'duration' and 'sample_rate' must be positive")
        if not entry["id"] or not entry["speaker"] or not entry["audio"]:
            raise fail("'id', 'speaker' and 'audio' must be non-empty")
        if entry["id"] in seen_lines:
            raise fail(f"duplicate id {entry['id']!r} (first on line {seen_lines[entry['id']]})")
        seen_lines[entry["id"]] = line_number
        collector.add(
            utterance_id=entry["id"],
            speaker=entry["speaker"],
            audio=root / entry["audio"],
            raw_text=entry["text"],
            declared_rate=entry["sample_rate"],
            rate_is_declared=True,
        )
    return collector.utterances, collector.skipped


def _load_kaldi(root: Path, *, validate: bool) -> _Entries:
    if (root / "segments").exists():
        raise CorpusError(
            f"{root / 'segments'}: Kaldi segments files are not supported; cut the recordings into one file per utterance"
        )
    transcripts = _read_kaldi_table(root / "text", allow_empty_value=True)
    speakers = _read_kaldi_table(root / "utt2spk")
    audio_paths = _read_kaldi_table(root / "wav.scp", reject_pipes=True)
    collector = _EntryCollector(validate=validate)
    for utterance_id, (raw_text, line_number, line) in transcripts.items():
        for table, name in ((audio_paths, "wav.scp"), (speakers, "utt2spk")):
            if utterance_id not in table:
                raise _line_error(root / "text", line_number, line)(f"utterance {utterance_id!r} is not in {root / name}")
        speaker = speakers[utterance_id][0]
        collector.add(
            utterance_id=utterance_id,
            speaker=speaker,
            audio=root / audio_paths[utterance_id][0],
            raw_text=raw_text,
            declared_rate=SAMPLE_RATE,
            rate_is_declared=False,
        )
    for utterance_id in [key for key in audio_paths if key not in transcripts]:
        collector.skipped.append(
            (utterance_id, f"{root / 'wav.scp'}: utterance {utterance_id!r} has no transcript in {root / 'text'}")
        )
    return collector.utterances, collector.skipped


def _load_fsdd(root: Path, *, validate: bool) -> _Entries:
    collector = _EntryCollector(validate=validate)
    for audio in sorted((root / _FSDD_DIR).glob("*.wav")):
        match = _FSDD_NAME.fullmatch(audio.name)
        if match is None:
            collector.skipped.append((str(audio), f"{audio}: file name does not match {{digit}}_{{speaker}}_{{index}}.wav"))
            continue
        collector.add(
            utterance_id=audio.stem,
            speaker=match["speaker"],
            audio=audio,
            raw_text=_DIGIT_WORDS[int(match["digit"])],
            declared_rate=_FSDD_SAMPLE_RATE,
            rate_is_declared=False,
        )
    if not collector.utterances and not collector.skipped:
        raise CorpusError(f"{root / _FSDD_DIR}: no .wav recordings found")
    return collector.utterances, collector.skipped


def _read_kaldi_table(
    path: Path, *, allow_empty_value: bool = False, reject_pipes: bool = False
) -> dict[str, tuple[str, int, str]]:
    """``{utterance id: (value, line number, line)}`` from a ``key value`` Kaldi file.

    ``text`` values run to the end of the line; other tables take exactly one value field.
    """
    table: dict[str, tuple[str, int, str]] = {}
    for line_number, line in _numbered_lines(path):
        fail = _line_error(path, line_number, line)
        fields = line.split(maxsplit=1)
        key, value = fields[0], fields[1].strip() if len(fields) == 2 else ""
        if reject_pipes and value.endswith("|"):
            raise fail("piped commands are not supported; list a plain audio file path")
        if not allow_empty_value and len(line.split()) != 2:
            raise fail(f"expected 2 fields (utterance id and value), got {len(line.split())}")
        if key in table:
            raise fail(f"duplicate utterance id {key!r} (first on line {table[key][1]})")
        table[key] = (value, line_number, line)
    return table


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with 1-based line numbers; undecodable text is a CorpusError naming the file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise CorpusError(f"{path}: not UTF-8 text ({error})") from error
    for line_number, line in enumerate(lines, start=1):
        if line.strip():
            yield line_number, line


def _line_error(path: Path, line_number: int, line: str) -> Callable[[str], CorpusError]:
    return lambda problem: CorpusError(f"{path}:{line_number}: {problem}: {line!r}")
