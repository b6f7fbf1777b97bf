"""Transcript normalization and the subword tokenizer that turns transcripts into transducer targets.

Chorus transcripts use a closed alphabet: lowercase ``a``-``z``, the apostrophe and single spaces.
:func:`normalize_text` maps raw transcripts into it and rejects, rather than silently drops, anything it
cannot represent (digits, accented letters, symbols): a dropped character would teach the model a wrong
target. :class:`Tokenizer` wraps a small sentencepiece unigram model whose vocabulary always contains
every character of that alphabet, so every normalized transcript encodes without ``<unk>``.

Ids: sentencepiece pieces are ``0 .. vocab_size - 1`` with ``<unk>`` at 0 and no bos/eos/pad; the
transducer's blank is the extra output index ``blank_id == vocab_size``.

Example::

    >>> tokenizer = Tokenizer.train(["we call it bear", "zero three five one"] * 50, Path("/tmp/tok.model"),
    ...                             vocab_size=32)
    >>> tokenizer.decode(tokenizer.encode("We call it BEAR!"))
    'we call it bear'
"""

from __future__ import annotations

import io
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece

__all__ = ["ALPHABET", "Tokenizer", "TokenizerError", "normalize_text"]

ALPHABET = string.ascii_lowercase + "'"
"""Every character a normalized transcript may contain, besides the space."""

_PUNCTUATION_AS_SPACE = re.compile(r"[.,?!;:\"\-\u2010-\u2015]")
_ALLOWED = frozenset(ALPHABET + " ")
# Typographic apostrophe (as in "don’t") is the same symbol as the ASCII one for speech.
_APOSTROPHE_VARIANTS = str.maketrans({"\u2019": "'"})
# A fixed seed for sentencepiece's (process-global) random generator: same texts -> same model bytes.
_TRAINING_SEED = 1234


class TokenizerError(ValueError):
    """A transcript that cannot be encoded, or a tokenizer model that cannot be trained or loaded."""


def normalize_text(text: str) -> str:
    """Map a raw transcript into the Chorus alphabet: lowercase a-z, apostrophe, single spaces.

    Lowercases; turns ``.,?!;:"`` and hyphens into spaces; collapses whitespace.

    Raises:
        TokenizerError: the transcript contains any other character (named in the message) or is empty
            after normalization.
    """
    normalized = " ".join(_PUNCTUATION_AS_SPACE.sub(" ", text.lower().translate(_APOSTROPHE_VARIANTS)).split())
    unsupported = sorted(set(normalized) - _ALLOWED)
    if unsupported:
        noun = "character" if len(unsupported) == 1 else "characters"
        hint = " (spell numbers as words)" if any(char.isdigit() for char in unsupported) else ""
        listed = ", ".join(repr(char) for char in unsupported)
        raise TokenizerError(f"transcript {text!r}: {noun} {listed} cannot be encoded{hint}")
    if not normalized:
        raise TokenizerError(f"transcript {text!r} is empty after normalization")
    return normalized


class Tokenizer:
    """A sentencepiece unigram model over normalized transcripts.

    Build one with :meth:`train` or :meth:`load`; the constructor takes a serialized model.
    """

    def __init__(self, model_proto: bytes, *, source: str = "<in-memory model>") -> None:
        """Wrap a serialized sentencepiece model.

        Args:
            model_proto: the model file's bytes.
            source: where the bytes came from, for error messages.

        Raises:
            TokenizerError: the bytes are not a sentencepiece model, or the model's special ids differ
                from the Chorus layout (unk at 0, no bos/eos/pad).
        """
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError, TypeError) as error:
            raise TokenizerError(f"{source}: not a sentencepiece model ({error})") from error
        special_ids = {
            "unk_id": processor.unk_id(),
            "bos_id": processor.bos_id(),
            "eos_id": processor.eos_id(),
            "pad_id": processor.pad_id(),
        }
        if special_ids != {"unk_id": 0, "bos_id": -1, "eos_id": -1, "pad_id": -1}:
            raise TokenizerError(
                f"{source}: special ids {special_ids}, expected unk_id=0 and no bos/eos/pad "
                "(the transducer's blank must be the one id past the vocabulary)"
            )
        self._processor = processor
        self.model_proto = bytes(model_proto)

    @classmethod
    def train(cls, texts: Iterable[str], out_path: Path | str, vocab_size: int = 256) -> Tokenizer:
        """Train a unigram model on transcripts, write it to ``out_path`` and return it.

        Texts are normalized first. The alphabet is added as one extra sentence so that rare letters
        (q, x, z in a small corpus) still get a piece. Training is single-threaded with a fixed seed, so
        the same texts give a byte-identical model file.

        Raises:
            TokenizerError: a text cannot be normalized, ``vocab_size`` is too small for the alphabet or too
                large for the amount of text, or no text was given.
        """
        out_path = Path(out_path)
        sentences = [normalize_text(text) for text in texts]
        if not sentences:
            raise TokenizerError(f"cannot train {out_path}: no training texts")
        sentences.append(" ".join(ALPHABET))
        model_bytes = io.BytesIO()
        sentencepiece.set_random_generator_seed(_TRAINING_SEED)
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model_bytes,
                model_type="unigram",
                vocab_size=vocab_size,
                character_coverage=1.0,
                # Texts are already normalized; identity keeps sentencepiece from rewriting them again.
                normalization_rule_name="identity",
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as error:
            raise TokenizerError(
                f"cannot train {out_path} with vocab_size={vocab_size} on {len(sentences) - 1} texts: {error}"
            ) from error
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(model_bytes.getvalue())
        return cls(model_bytes.getvalue(), source=str(out_path))

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        """Load a model file written by :meth:`train`.

        Raises:
            TokenizerError: the file is missing or is not a Chorus sentencepiece model.
        """
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer model file")
        return cls(path.read_bytes(), source=str(path))

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (ids ``0 .. vocab_size - 1``), not counting the blank."""
        return self._processor.get_piece_size()

    @property
    def blank_id(self) -> int:
        """The transducer's blank output index: one past the last piece."""
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Normalize a transcript and return its piece ids.

        Raises:
            TokenizerError: the transcript cannot be normalized, or a character has no piece in this
                model (only possible for a model not trained by :meth:`train`).
        """
        normalized = normalize_text(text)
        ids: list[int] = self._processor.encode(normalized, out_type=int)
        if 0 in ids:
            pieces: list[str] = self._processor.encode(normalized, out_type=str)
            unknown = sorted({piece for piece, piece_id in zip(pieces, ids) if piece_id == 0})
            raise TokenizerError(
                f"transcript {text!r}: {', '.join(map(repr, unknown))} not in the tokenizer vocabulary (maps to <unk>)"
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Turn piece ids back into a transcript.

        Raises:
            TokenizerError: an id is outside ``0 .. vocab_size - 1`` (the blank included: strip blanks first).
        """
        ids = [int(piece_id) for piece_id in ids]
        invalid = [piece_id for piece_id in ids if not 0 <= piece_id < self.vocab_size]
        if invalid:
            raise TokenizerError(
                f"ids {invalid} are outside the vocabulary 0..{self.vocab_size - 1} "
                f"(blank_id={self.blank_id} must be removed before decoding)"
            )
        return self._processor.decode(ids)
