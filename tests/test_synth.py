"""Tests of the command grammar and the synthetic corpus writer (shared/data/commands.py, synth.py)."""

import csv
import dataclasses
import json
import re
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import welch

from shared.data.commands import INTENTS, number_words, sample_sentences, spoken_form
from shared.data.synth import (
    ACCENTS,
    AGE_GROUPS,
    FLEETS,
    SAMPLE_RATE,
    SPEAKER_COLUMNS,
    Speaker,
    SynthError,
    render_utterance,
    sample_population,
    synthesize,
)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

MANIFEST_KEYS = ["id", "speaker", "audio", "text", "duration", "sample_rate"]
CORPUS = {"speakers": 5, "utterances": 4, "seed": 7}


# ---------------------------------------------------------------------------------------
# Grammar


def test_grammar_is_varied_and_uses_only_the_transcript_charset() -> None:
    sentences = sample_sentences(20_000, seed=0)
    assert len(set(sentences)) >= 3_000
    for sentence in sentences:
        assert re.fullmatch(r"[a-z']+( [a-z']+)*", sentence), sentence


def test_grammar_is_deterministic_per_seed() -> None:
    assert sample_sentences(200, seed=3) == sample_sentences(200, seed=3)
    assert sample_sentences(200, seed=3) != sample_sentences(200, seed=4)


def test_grammar_covers_every_intent() -> None:
    text = " ".join(sample_sentences(5_000, seed=1))
    # One phrase only that intent's templates produce.
    marker = {
        "lights": "lights",
        "timer": "timer",
        "alarm": "alarm",
        "music": "play",
        "volume": "volume",
        "weather": "weather",
        "shopping": "list",
        "call": "call",
        "message": "message",
        "reminder": "remind",
        "thermostat": "degrees",
    }
    assert set(marker) == set(INTENTS)
    for intent, phrase in marker.items():
        assert phrase in text, intent


def test_numbers_are_spelled() -> None:
    assert number_words(0) == "zero"
    assert number_words(45) == "forty five"
    assert number_words(300) == "three hundred"
    assert number_words(1_905) == "one thousand nine hundred five"
    with pytest.raises(ValueError, match="-1"):
        number_words(-1)


def test_spoken_form_spells_out_clock_abbreviations_for_the_tts() -> None:
    assert spoken_form("wake me up at seven thirty a m tomorrow") == "wake me up at seven thirty a.m. tomorrow"
    assert spoken_form("set an alarm for six p m") == "set an alarm for six p.m."
    assert spoken_form("add a mango to my list") == "add a mango to my list"


# ---------------------------------------------------------------------------------------
# Population


def test_population_is_deterministic_and_prefix_stable() -> None:
    assert sample_population(50, seed=11) == sample_population(50, seed=11)
    assert sample_population(200, seed=11)[:50] == sample_population(50, seed=11)
    assert sample_population(50, seed=11) != sample_population(50, seed=12)


def test_population_spans_all_accents_and_valid_attributes() -> None:
    population = sample_population(200, seed=0)
    assert [speaker.id for speaker in population[:2]] == ["spk0000", "spk0001"]
    assert {speaker.accent for speaker in population} == set(ACCENTS)
    assert {speaker.age_group for speaker in population} == set(AGE_GROUPS)
    assert {speaker.gender for speaker in population} == {"male", "female"}
    assert {speaker.device.sample_rate for speaker in population} == {8_000, 16_000}
    for speaker in population:
        age = AGE_GROUPS[speaker.age_group]
        assert age.pitch[0] <= speaker.pitch <= age.pitch[1]
        assert age.rate_wpm[0] <= speaker.rate <= age.rate_wpm[1]
        assert speaker.voice not in {"grandma", "grandpa"} or speaker.age_group == "senior"
        device = speaker.device
        assert 0 < device.mic_low_hz < device.mic_high_hz < device.sample_rate / 2
        assert all(0 < p < size for p, size in zip(device.talker_m, device.room_m, strict=True))


def test_legacy_fleet_accents_get_harder_channels() -> None:
    population = sample_population(3_000, seed=0)

    def cohort(fleet: str) -> list[Speaker]:
        return [s for s in population if ACCENTS[s.accent][1] == fleet]

    modern, legacy = cohort("modern"), cohort("legacy")
    assert FLEETS["legacy"].narrowband_probability > FLEETS["modern"].narrowband_probability

    def narrowband_share(speakers: list[Speaker]) -> float:
        return float(np.mean([s.device.narrowband for s in speakers]))

    assert narrowband_share(legacy) > narrowband_share(modern) + 0.4
    assert np.mean([s.device.snr_db for s in legacy]) < np.mean([s.device.snr_db for s in modern]) - 10
    assert np.mean([s.device.rt60_s for s in legacy]) > np.mean([s.device.rt60_s for s in modern]) + 0.2


# ---------------------------------------------------------------------------------------
# Corpus


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same corpus built twice: in-process and by a two-worker pool."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    first = synthesize(tmp_path_factory.mktemp("first"), **CORPUS, workers=1, progress=False)
    second = synthesize(tmp_path_factory.mktemp("second"), **CORPUS, workers=2, progress=False)
    return first, second


@needs_espeak
def test_corpus_is_byte_identical_across_runs_and_worker_counts(corpora: tuple[Path, Path]) -> None:
    first, second = corpora
    assert (first / "manifest.jsonl").read_bytes() == (second / "manifest.jsonl").read_bytes()
    assert (first / "speakers.tsv").read_bytes() == (second / "speakers.tsv").read_bytes()
    for line in (first / "manifest.jsonl").read_text().splitlines():
        audio = json.loads(line)["audio"]
        np.testing.assert_array_equal(sf.read(first / audio)[0], sf.read(second / audio)[0])


@needs_espeak
def test_manifest_layout(corpora: tuple[Path, Path]) -> None:
    corpus = corpora[0]
    lines = (corpus / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == CORPUS["speakers"] * CORPUS["utterances"]
    rows = [json.loads(line) for line in lines]
    assert [row["id"] for row in rows] == sorted(row["id"] for row in rows)
    assert rows[0]["id"] == "spk0000-0000"
    for line, row in zip(lines, rows, strict=True):
        assert list(row) == MANIFEST_KEYS
        assert re.search(r'"duration": \d+\.\d{3},', line), line
        assert row["audio"] == f"audio/{row['speaker']}/{row['id']}.flac"
        assert row["sample_rate"] == SAMPLE_RATE
        info = sf.info(corpus / row["audio"])
        assert (info.samplerate, info.channels, info.format, info.subtype) == (SAMPLE_RATE, 1, "FLAC", "PCM_16")
        assert row["duration"] == round(info.frames / SAMPLE_RATE, 3)
        samples, _ = sf.read(corpus / row["audio"])
        assert np.sqrt(np.mean(samples**2)) > 0.01
        assert 0.85 < np.max(np.abs(samples)) <= 0.91
    assert json.loads((corpus / "synth.json").read_text()) == {"format_version": 1, **CORPUS}


@needs_espeak
def test_speaker_table(corpora: tuple[Path, Path]) -> None:
    with (corpora[0] / "speakers.tsv").open() as table:
        rows = list(csv.DictReader(table, delimiter="\t"))
    assert list(rows[0]) == list(SPEAKER_COLUMNS)
    population = sample_population(CORPUS["speakers"], CORPUS["seed"])
    assert [row["speaker"] for row in rows] == [speaker.id for speaker in population]
    for row, speaker in zip(rows, population, strict=True):
        assert row["accent"] == speaker.accent and row["voice"] == speaker.voice
        assert int(row["channel_rate"]) == speaker.device.sample_rate
        assert float(row["snr_db"]) == speaker.device.snr_db


@needs_espeak
def test_cached_corpus_is_not_rewritten(corpora: tuple[Path, Path]) -> None:
    corpus = corpora[0]
    watched = [corpus / "manifest.jsonl", corpus / "synth.json", corpus / "audio/spk0000/spk0000-0000.flac"]
    before = [path.stat().st_mtime_ns for path in watched]
    assert synthesize(corpus, **CORPUS, workers=1, progress=False) == corpus
    assert [path.stat().st_mtime_ns for path in watched] == before


@needs_espeak
def test_narrowband_devices_have_no_energy_above_4_khz() -> None:
    speaker = sample_population(1, seed=0)[0]
    text = "set a timer for twenty five minutes"

    # Above the 4.0-4.5 kHz transition band of the 8 kHz resampler's anti-aliasing filter.
    def share_above_4_khz(sample_rate: int) -> float:
        device = dataclasses.replace(speaker.device, sample_rate=sample_rate, mic_low_hz=100, mic_high_hz=7_000, snr_db=20.0)
        audio = render_utterance(dataclasses.replace(speaker, device=device), text, noise_seed=0)
        frequencies, power = welch(audio, fs=SAMPLE_RATE, nperseg=1_024)
        return float(power[frequencies > 4_500].sum() / power.sum())

    assert share_above_4_khz(8_000) < 1e-4
    assert share_above_4_khz(16_000) > 1e-2


@needs_espeak
def test_rendering_keeps_espeak_timing() -> None:
    """Resampling 22.05 -> 16 kHz must keep the duration (a wrong ratio would halve it)."""
    speaker = sample_population(1, seed=0)[0]
    text = "remind me to water the plants tomorrow morning"
    voice, pitch, rate = speaker.espeak_voice, str(speaker.pitch), str(speaker.rate)
    command = ["espeak-ng", "-v", voice, "-p", pitch, "-s", rate, "--stdout", text]
    dry_samples, dry_rate = sf.read(BytesIO(subprocess.run(command, capture_output=True, check=True).stdout))
    rendered = render_utterance(speaker, text, noise_seed=0)
    reverberant_tail_s = speaker.device.rt60_s / 2
    assert len(rendered) / SAMPLE_RATE == pytest.approx(len(dry_samples) / dry_rate + reverberant_tail_s, abs=0.01)


def test_missing_espeak_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SynthError, match=r"^espeak-ng not found: install it with `sudo apt-get install espeak-ng`$"):
        synthesize(tmp_path / "corpus", speakers=1, utterances=1, seed=0, progress=False)
    assert not (tmp_path / "corpus").exists()


@needs_espeak
def test_an_interrupted_synthesis_resumes_with_the_speakers_it_had_not_finished(tmp_path: Path) -> None:
    args = {"speakers": 3, "utterances": 2, "seed": 11}
    whole = synthesize(tmp_path / "whole", **args, workers=1, progress=False)
    corpus = synthesize(tmp_path / "corpus", **args, workers=1, progress=False)
    # The state a kill leaves: no synth.json or manifest yet, one speaker finished, one half-written, one not begun.
    (corpus / "synth.json").unlink()
    (corpus / "manifest.jsonl").unlink()
    (corpus / "synth.partial.json").write_text(json.dumps({"format_version": 1, **args}))
    (corpus / "audio/spk0001/done.json").unlink()
    (corpus / "audio/spk0001/spk0001-0001.flac").unlink()
    shutil.rmtree(corpus / "audio/spk0002")
    kept = corpus / "audio/spk0000/spk0000-0000.flac"
    before = kept.stat().st_mtime_ns

    synthesize(corpus, **args, workers=1, progress=False)
    assert kept.stat().st_mtime_ns == before, "a finished speaker must not be rendered again"
    assert (corpus / "manifest.jsonl").read_bytes() == (whole / "manifest.jsonl").read_bytes()
    assert (corpus / "audio/spk0002/spk0002-0001.flac").is_file()
    assert not (corpus / "synth.partial.json").exists()


@needs_espeak
def test_synth_benchmark_runs_one_worker_and_every_core() -> None:
    from typer.testing import CliRunner

    from simulations.cli import app
    from simulations.simulate import available_cores

    result = CliRunner().invoke(app, ["bench", "synth", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["one_worker"]["workers"], out["all_cores"]["workers"]) == (1, available_cores())
    assert out["one_worker"]["utterances_per_second"] > 0 and out["all_cores"]["utterances_per_second"] > 0
