"""Tests for shared.data.corpora: the three layouts, skipping of bad entries, errors, and the real corpora."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from shared.data.corpora import MANIFEST_FILE, Corpus, CorpusError, Utterance, load_corpus, read_speakers_tsv

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_tone(path: Path, seconds: float = 0.3, sample_rate: int = 16000, frequency: float = 440) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    time = np.arange(int(seconds * sample_rate)) / sample_rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * frequency * time)).astype(np.float32), sample_rate)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).bytes(2048))
    return path


def manifest_entry(utterance_id: str, speaker: str, text: str, sample_rate: int = 16000) -> dict[str, object]:
    return {
        "id": utterance_id,
        "speaker": speaker,
        "audio": f"audio/{utterance_id}.wav",
        "text": text,
        "duration": 0.3,
        "sample_rate": sample_rate,
    }


def write_manifest(root: Path, lines: list[dict[str, object] | str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST_FILE
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def manifest_corpus(tmp_path: Path) -> Path:
    """Four good utterances by two speakers, plus a corrupt file, a digit transcript and a wrong-rate file."""
    root = tmp_path / "synthetic"
    entries = [
        manifest_entry("b2", "bob", "Good MORNING."),
        manifest_entry("a1", "alice", "hello world"),
        manifest_entry("a2", "alice", "don't stop"),
        manifest_entry("b1", "bob", "see you"),
        manifest_entry("corrupt", "bob", "broken file"),
        manifest_entry("digits", "alice", "call 911"),
        manifest_entry("narrow", "bob", "wrong rate"),
    ]
    for entry in entries:
        if entry["id"] == "corrupt":
            write_corrupt(root / str(entry["audio"]))
        else:
            write_tone(root / str(entry["audio"]), sample_rate=8000 if entry["id"] == "narrow" else 16000)
    write_manifest(root, entries)
    return root


def test_manifest_corpus_loads_and_skips_bad_entries(manifest_corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="chorus.data"):
        corpus = load_corpus(manifest_corpus)
    assert corpus.name == "synthetic" and corpus.root == manifest_corpus
    assert [utt.id for utt in corpus.utterances] == ["b2", "a1", "a2", "b1"]
    assert corpus.utterances[0] == Utterance(
        id="b2", speaker="bob", audio=manifest_corpus / "audio" / "b2.wav", text="good morning", sample_rate=16000
    )
    reasons = dict(corpus.skipped)
    assert list(reasons) == ["corrupt", "digits", "narrow"]
    assert reasons["corrupt"].startswith(f"{manifest_corpus / 'audio' / 'corrupt.wav'}: unreadable audio file")
    assert reasons["digits"] == ("transcript 'call 911': characters '1', '9' cannot be encoded (spell numbers as words)")
    assert reasons["narrow"] == f"{manifest_corpus / 'audio' / 'narrow.wav'}: sample rate 8000 Hz, expected 16000 Hz"
    warnings = [record for record in caplog.records if record.name == "chorus.data"]
    assert len(warnings) == 1 and "skipped 3 of 7 entries" in warnings[0].getMessage()


def test_speaker_grouping_is_sorted(manifest_corpus: Path) -> None:
    corpus = load_corpus(manifest_corpus)
    assert corpus.speakers() == ["alice", "bob"]
    grouped = corpus.by_speaker()
    assert list(grouped) == ["alice", "bob"]
    assert [utt.id for utt in grouped["bob"]] == ["b1", "b2"]


def test_corpus_audio_is_16k_float32(manifest_corpus: Path) -> None:
    corpus = load_corpus(manifest_corpus)
    samples = corpus.load_audio(corpus.utterances[0])
    assert samples.dtype == np.float32 and samples.shape == (4800,)


def test_without_validation_bad_audio_is_kept(manifest_corpus: Path) -> None:
    corpus = load_corpus(manifest_corpus, validate=False)
    assert [utt.id for utt in corpus.utterances] == ["b2", "a1", "a2", "b1", "corrupt", "narrow"]
    assert [entry for entry, _ in corpus.skipped] == ["digits"]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"id": "x", "speaker": "s"', "invalid JSON"),
        (json.dumps({**manifest_entry("x", "s", "hi"), "gender": "f"}), "unknown key(s) gender"),
        (
            json.dumps({key: value for key, value in manifest_entry("x", "s", "hi").items() if key != "text"}),
            "missing key(s) text",
        ),
        (json.dumps({**manifest_entry("x", "s", "hi"), "sample_rate": "16k"}), "'sample_rate' must be an integer"),
        (json.dumps(manifest_entry("a1", "s", "hi")), "duplicate id 'a1' (first on line 1)"),
        ("[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_malformed_manifest_line_names_file_line_and_content(tmp_path: Path, bad_line: str, problem: str) -> None:
    manifest = write_manifest(tmp_path / "corpus", [manifest_entry("a1", "s", "hi"), "", bad_line])
    with pytest.raises(CorpusError) as error:
        load_corpus(tmp_path / "corpus", validate=False)
    assert str(error.value).startswith(f"{manifest}:3: {problem}")
    assert str(error.value).endswith(f": {bad_line!r}")


def write_kaldi(root: Path, *, text: str, utt2spk: str, wav_scp: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in (("text", text), ("utt2spk", utt2spk), ("wav.scp", wav_scp)):
        (root / name).write_text(content)
    return root


def test_kaldi_corpus_loads(tmp_path: Path) -> None:
    root = tmp_path / "kaldi"
    write_tone(root / "audio" / "u1.flac")
    write_tone(root / "audio" / "u2.flac", sample_rate=8000)
    absolute = write_tone(tmp_path / "elsewhere" / "u3.wav")
    write_corrupt(root / "audio" / "u4.flac")
    write_kaldi(
        root,
        text="u1 WE CALL IT BEAR\nu2 ZERO\tTHREE\nu3 TOM'S GOOSE\nu4 BROKEN\nu5\n",
        utt2spk="u1 s1\nu2 s1\nu3 s2\nu4 s2\nu5 s2\n",
        wav_scp=f"u1 audio/u1.flac\nu2 audio/u2.flac\nu3 {absolute}\nu4 audio/u4.flac\nu5 audio/u1.flac\nu6 audio/u1.flac\n",
    )
    corpus = load_corpus(root)
    assert [(utt.id, utt.speaker, utt.text, utt.sample_rate) for utt in corpus.utterances] == [
        ("u1", "s1", "we call it bear", 16000),
        ("u2", "s1", "zero three", 8000),
        ("u3", "s2", "tom's goose", 16000),
    ]
    assert corpus.utterances[2].audio == absolute
    assert corpus.load_audio(corpus.utterances[1]).shape == (4800,)
    reasons = dict(corpus.skipped)
    assert list(reasons) == ["u4", "u5", "u6"]
    assert str(root / "audio" / "u4.flac") in reasons["u4"]
    assert "is empty after normalization" in reasons["u5"]
    assert "has no transcript" in reasons["u6"]


@pytest.mark.parametrize(
    ("file_name", "bad_line", "problem"),
    [
        ("utt2spk", "u2 s1 extra", "expected 2 fields (utterance id and value), got 3"),
        ("wav.scp", "u2 sox audio/u2.wav -t wav - |", "piped commands are not supported"),
        ("wav.scp", "u2", "expected 2 fields (utterance id and value), got 1"),
        ("wav.scp", "u1 audio/again.wav", "duplicate utterance id 'u1' (first on line 1)"),
        ("text", "u9 NOT IN WAV SCP", "utterance 'u9' is not in"),
    ],
)
def test_malformed_kaldi_line_names_file_line_and_content(tmp_path: Path, file_name: str, bad_line: str, problem: str) -> None:
    files = {"text": "u1 HELLO\n", "utt2spk": "u1 s1\n", "wav.scp": "u1 audio/u1.wav\n"}
    files[file_name] += bad_line + "\n"
    root = write_kaldi(tmp_path / "kaldi", text=files["text"], utt2spk=files["utt2spk"], wav_scp=files["wav.scp"])
    with pytest.raises(CorpusError) as error:
        load_corpus(root, validate=False)
    message = str(error.value)
    assert message.startswith(f"{root / file_name}:2: {problem}")
    assert message.endswith(f": {bad_line!r}")


def test_fsdd_layout(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    for name in ("7_ann_0.wav", "0_ann_1.wav", "3_bo_b_12.wav"):
        write_tone(root / "recordings" / name, sample_rate=8000)
    write_corrupt(root / "recordings" / "5_ann_2.wav")
    write_tone(root / "recordings" / "notes.wav", sample_rate=8000)
    corpus = load_corpus(root)
    assert [(utt.id, utt.speaker, utt.text, utt.sample_rate) for utt in corpus.utterances] == [
        ("0_ann_1", "ann", "zero", 8000),
        ("3_bo_b_12", "bo_b", "three", 8000),
        ("7_ann_0", "ann", "seven", 8000),
    ]
    assert corpus.load_audio(corpus.utterances[0]).shape == (4800,)
    reasons = dict(corpus.skipped)
    assert "unreadable audio file" in reasons["5_ann_2"]
    assert reasons[str(root / "recordings" / "notes.wav")].endswith("does not match {digit}_{speaker}_{index}.wav")


def test_missing_directory_names_path(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=re.escape(f"{tmp_path / 'absent'}: no such corpus directory")):
        load_corpus(tmp_path / "absent")


def test_unknown_layout_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "text").write_text("u1 HELLO\n")
    with pytest.raises(CorpusError) as error:
        load_corpus(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path}: unknown corpus layout")
    for expected in (MANIFEST_FILE, "text + utt2spk + wav.scp", "found only text", "recordings/"):
        assert expected in message


def test_speakers_tsv(tmp_path: Path) -> None:
    assert read_speakers_tsv(tmp_path) == {}
    (tmp_path / "speakers.tsv").write_text("speaker\tgender\tage\n0001\tm\t6\n0002\tf\t31\n")
    assert read_speakers_tsv(tmp_path) == {"0001": {"gender": "m", "age": "6"}, "0002": {"gender": "f", "age": "31"}}
    (tmp_path / "speakers.tsv").write_text("speaker\tgender\tage\n0001\tm\n")
    with pytest.raises(CorpusError, match=re.escape(f"{tmp_path / 'speakers.tsv'}:2: 2 columns, expected 3")):
        read_speakers_tsv(tmp_path)


def test_corpus_carries_no_speaker_attributes() -> None:
    assert {field.name for field in dataclasses.fields(Corpus)} == {"name", "root", "utterances", "skipped"}
    assert {field.name for field in dataclasses.fields(Utterance)} == {"id", "speaker", "audio", "text", "sample_rate"}


def test_real_speechocean762_dev() -> None:
    root = REAL_DATA / "speechocean762-dev"
    if not root.is_dir():
        pytest.skip(f"real speechocean762-dev data not found at {root}")
    corpus = load_corpus(root)
    assert len(corpus.utterances) == 1600 and corpus.skipped == []
    assert len(corpus.speakers()) == 80
    assert {len(utterances) for utterances in corpus.by_speaker().values()} == {20}
    assert {utt.sample_rate for utt in corpus.utterances} == {16000}
    assert all(utt.audio.is_absolute() and utt.text == utt.text.lower() for utt in corpus.utterances)
    attributes = read_speakers_tsv(root)
    assert set(attributes) == set(corpus.speakers())
    assert {row["gender"] for row in attributes.values()} == {"m", "f"}
    samples = corpus.load_audio(corpus.utterances[0])
    assert samples.dtype == np.float32 and samples.shape[0] > 16000


def test_real_fsdd() -> None:
    root = REAL_DATA / "fsdd"
    if not root.is_dir():
        pytest.skip(f"real FSDD data not found at {root}")
    corpus = load_corpus(root)
    assert len(corpus.utterances) == 3000 and corpus.skipped == []
    assert len(corpus.speakers()) == 6
    assert {utt.sample_rate for utt in corpus.utterances} == {8000}
    assert {utt.text for utt in corpus.utterances} == {
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    }
    utterance = next(utt for utt in corpus.utterances if utt.id == "9_theo_49")
    assert utterance.text == "nine" and utterance.speaker == "theo"
    native_frames = soundfile.info(str(utterance.audio)).frames
    assert corpus.load_audio(utterance).shape == (2 * native_frames,)
    assert read_speakers_tsv(root)["theo"]["accent"] == "USA/neutral"
