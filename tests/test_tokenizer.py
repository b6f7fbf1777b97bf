"""Tests for shared.data.tokenizer: normalization, training determinism, round trips and rejections."""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import pytest
import sentencepiece

from shared.data.tokenizer import ALPHABET, Tokenizer, TokenizerError, normalize_text

WORDS = """
the a to and of in is it you that he was for on are with as i his they be at one have this from or had by
word but what some we can out other were all there when up use your how said an each she which do their time
if will way about many then them write would like so these her long make thing see him two has look more day
could go come did number sound no most people my over know water than call first who may down side been now
find any new work part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line differ turn cause
much mean before move right boy old too same tell does set three want air well also play small end put home
read hand port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father don't can't
he's it's zero four five six seven eight nine elephant goose boxing bear tom jane
""".split()


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    rng = random.Random(11)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(400)]


@pytest.fixture(scope="module")
def trained(sentences: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Path]:
    path = tmp_path_factory.mktemp("tokenizer") / "chorus.model"
    return Tokenizer.train(sentences, path), path


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("WE CALL IT BEAR", "we call it bear"),
        ("  Hello,   world!  ", "hello world"),
        ('He said: "don\u2019t-stop"; ok?', "he said don't stop ok"),
        ("tab\tand\nnewline", "tab and newline"),
        ("ANN'S", "ann's"),
    ],
)
def test_normalize_text(raw: str, normalized: str) -> None:
    assert normalize_text(raw) == normalized


def test_normalize_rejects_digits_naming_character_and_transcript() -> None:
    with pytest.raises(TokenizerError) as error:
        normalize_text("set 7 timers")
    assert str(error.value) == "transcript 'set 7 timers': character '7' cannot be encoded (spell numbers as words)"


def test_normalize_rejects_accented_letters_and_symbols() -> None:
    with pytest.raises(TokenizerError) as error:
        normalize_text("Café & crème")
    assert str(error.value) == "transcript 'Café & crème': characters '&', 'è', 'é' cannot be encoded"


def test_normalize_rejects_empty_transcripts() -> None:
    with pytest.raises(TokenizerError, match=re.escape("transcript ' ?!' is empty after normalization")):
        normalize_text(" ?!")


def test_vocabulary_properties(trained: tuple[Tokenizer, Path]) -> None:
    tokenizer, _ = trained
    assert tokenizer.vocab_size == 256
    assert tokenizer.blank_id == 256
    for character in ALPHABET:
        assert tokenizer.encode(character), character


def test_round_trip(trained: tuple[Tokenizer, Path], sentences: list[str]) -> None:
    tokenizer, _ = trained
    for sentence in sentences[:100] + ["quiz jazz vex xylophone", "Zero, FIVE... nine?"]:
        ids = tokenizer.encode(sentence)
        assert all(0 < piece_id < tokenizer.vocab_size for piece_id in ids)
        assert tokenizer.decode(ids) == normalize_text(sentence)


def test_training_is_deterministic_and_load_matches(
    trained: tuple[Tokenizer, Path], sentences: list[str], tmp_path: Path
) -> None:
    _, first_path = trained
    second = Tokenizer.train(sentences, tmp_path / "again.model")
    assert (tmp_path / "again.model").read_bytes() == first_path.read_bytes()
    loaded = Tokenizer.load(first_path)
    assert loaded.encode(sentences[0]) == second.encode(sentences[0])


def test_encode_rejects_characters_the_model_lacks(tmp_path: Path) -> None:
    # A model trained outside Tokenizer.train, on only a, b and c: d, o, g map to <unk>.
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["abc cab bca"] * 20),
        model_writer=model,
        model_type="unigram",
        vocab_size=7,
        character_coverage=1.0,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    (tmp_path / "abc.model").write_bytes(model.getvalue())
    tokenizer = Tokenizer.load(tmp_path / "abc.model")
    assert tokenizer.decode(tokenizer.encode("cab")) == "cab"
    with pytest.raises(TokenizerError, match="transcript 'cab dog': 'dog' not in the tokenizer vocabulary"):
        tokenizer.encode("cab dog")
    with pytest.raises(TokenizerError, match="'7' cannot be encoded"):
        tokenizer.encode("cab 7")


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'missing.model'}: no such tokenizer model file"):
        Tokenizer.load(tmp_path / "missing.model")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00\xff not a model " * 10)
    with pytest.raises(TokenizerError, match=f"{corrupt}: not a sentencepiece model"):
        Tokenizer.load(corrupt)


def test_load_rejects_models_with_bos_eos(tmp_path: Path) -> None:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["abc cab bca"] * 20), model_writer=model, model_type="unigram", vocab_size=9, minloglevel=2
    )
    (tmp_path / "default.model").write_bytes(model.getvalue())
    with pytest.raises(TokenizerError, match="default.model: special ids .*expected unk_id=0 and no bos/eos/pad"):
        Tokenizer.load(tmp_path / "default.model")


def test_decode_rejects_blank_and_out_of_range_ids(trained: tuple[Tokenizer, Path]) -> None:
    tokenizer, _ = trained
    with pytest.raises(TokenizerError, match=r"ids \[256, -1\] are outside the vocabulary 0..255"):
        tokenizer.decode([5, 256, -1])


def test_train_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="vocab_size=5000 on 2 texts"):
        Tokenizer.train(["hello world", "good bye"], tmp_path / "big.model", vocab_size=5000)
    with pytest.raises(TokenizerError, match="no training texts"):
        Tokenizer.train([], tmp_path / "empty.model")
    with pytest.raises(TokenizerError, match="character '3'"):
        Tokenizer.train(["route 3"], tmp_path / "digit.model")
