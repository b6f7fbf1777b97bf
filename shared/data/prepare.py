"""From a run config to everything a device or the server needs: corpus, speaker split, tokenizer, CMVN.

Speakers are split three ways, disjointly:
    public     pretraining, the tokenizer's text and the CMVN statistics (the "public" data a vendor owns)
    federated  one device each; their audio never leaves the device
    heldout    never trained on; the server scores every global model on them

``prepare`` (server / CLI) builds the artifacts once and caches them; ``open_prepared`` (devices) only loads
them, so many simulated devices starting at once never race to write the same file.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from typing import Collection, Sequence

from shared.config import RunConfig
from shared.data.corpora import Corpus, Utterance, load_corpus, read_speakers_tsv, speakers_matching
from shared.data.dataset import FeatureCache
from shared.data.features import GlobalCMVN
from shared.data.tokenizer import Tokenizer
from shared.files import write_bytes_atomic, write_text_atomic
from shared.models.checkpoint import Frontend, checkpoint_frontend, init_checkpoint_path

__all__ = [
    "PrepareError",
    "SpeakerSplit",
    "Prepared",
    "split_speakers",
    "plan_split",
    "prepare",
    "open_prepared",
    "corpus_dir",
    "local_split",
    "artifact_dir",
    "speaker_embedder_path",
    "build_speaker_embedder",
]

# How many public utterances estimate the global CMVN: plenty for 80 means and variances.
_CMVN_UTTERANCES = 400
# Extra public text for the tokenizer on the synthetic corpus: the command grammar is public knowledge.
_GRAMMAR_SENTENCES = 5000


class PrepareError(ValueError):
    """The corpus cannot be split or prepared as configured."""


@dataclass(frozen=True)
class SpeakerSplit:
    public: tuple[str, ...]
    federated: tuple[str, ...]
    heldout: tuple[str, ...]


@dataclass(frozen=True)
class Prepared:
    corpus: Corpus
    split: SpeakerSplit
    tokenizer: Tokenizer
    cmvn: GlobalCMVN
    artifacts: Path

    def speaker_for_partition(self, partition_id: int) -> str:
        """Simulation: node partition-id -> the one federated speaker whose device it plays."""
        if not 0 <= partition_id < len(self.split.federated):
            raise PrepareError(
                f"partition-id {partition_id} is out of range: the corpus has "
                f"{len(self.split.federated)} federated speakers (0..{len(self.split.federated) - 1})"
            )
        return self.split.federated[partition_id]


def split_speakers(
    speakers: Sequence[str], *, public: int, heldout: int, seed: int, market: Collection[str] | None = None
) -> SpeakerSplit:
    """A seeded shuffle of the speakers, cut into public / held-out / federated. With ``market`` (a set of speakers),
    held-out and federated speakers come from it and public ones from the rest (``split.market``)."""
    order = sorted(speakers)
    random.Random(seed).shuffle(order)
    if market is None:
        if public < 1 or heldout < 1 or public + heldout >= len(order):
            raise PrepareError(
                f"cannot split {len(order)} speakers into split.public-speakers={public}, "
                f"split.heldout-speakers={heldout} and at least one federated speaker"
            )
        inside, outside = order[public:], order[:public]
    else:
        inside, outside = [s for s in order if s in market], [s for s in order if s not in market]
        if public < 1 or public > len(outside) or heldout < 1 or heldout >= len(inside):
            raise PrepareError(
                f"cannot split {len(inside)} speakers of split.market and {len(outside)} others into "
                f"split.public-speakers={public} (others), split.heldout-speakers={heldout} and at least one "
                "federated speaker (the market's)"
            )
    return SpeakerSplit(
        public=tuple(sorted(outside[:public])),
        heldout=tuple(sorted(inside[:heldout])),
        federated=tuple(sorted(inside[heldout:])),
    )


def local_split(utterances: Sequence[Utterance], eval_fraction: float) -> tuple[list[Utterance], list[Utterance]]:
    """A device's own utterances -> (train, local eval); deterministic, at least one of each when possible."""
    ordered = sorted(utterances, key=lambda u: u.id)
    n_eval = min(len(ordered) - 1, max(1, round(len(ordered) * eval_fraction))) if len(ordered) > 1 else 0
    return ordered[n_eval:], ordered[:n_eval]


def corpus_dir(cfg: RunConfig) -> Path:
    if cfg.corpus == "synth":
        s = cfg.synth
        return cfg.workdir_path / "data" / f"synth-seed{s.seed}-{s.speakers}x{s.utterances}"
    path = Path(cfg.corpus).expanduser()
    return path if path.is_absolute() else (cfg.workdir_path / path).resolve()


def artifact_dir(cfg: RunConfig) -> Path:
    """Where ``prepare`` keeps the run's artifacts (split, tokenizer, CMVN, speaker embedder).

    A run that starts from a checkpoint carrying its front end uses that tokenizer and CMVN, so its artifacts are
    kept apart, named by the checkpoint's content.
    """
    sp = cfg.split
    name = f"{corpus_dir(cfg).name}-p{sp.public_speakers}-h{sp.heldout_speakers}-s{sp.seed}"
    if sp.market:  # another split of the same corpus
        name += "-m" + hashlib.sha256(sp.market.encode()).hexdigest()[:8]
    plain = cfg.workdir_path / "artifacts" / name
    init = init_checkpoint_path(cfg.model)
    frontend = checkpoint_frontend(init) if init is not None and init.is_file() else None
    if frontend is None:
        return plain
    digest = frontend.digest()
    tok_path, cmvn_path = _frontend_files(plain, cfg.model.vocab_size)
    if tok_path.is_file() and cmvn_path.is_file():  # e.g. a base model trained on this very split
        if Frontend(Tokenizer.load(tok_path), GlobalCMVN.load(cmvn_path)).digest() == digest:
            return plain
    return plain.with_name(f"{plain.name}-fe{digest[:12]}")


def _frontend_files(artifacts: Path, vocab_size: int) -> tuple[Path, Path]:
    """The tokenizer and CMVN files among a run's artifacts."""
    return artifacts / f"tokenizer-{vocab_size}.model", artifacts / "cmvn.json"


SHIPPED_EMBEDDER = "speaker-embedder-shipped.pt"


def speaker_embedder_path(artifacts: Path, cfg: RunConfig) -> Path:
    """The on-device speaker-embedding extractor among the artifacts: the shipped verifier's copy where ``prepare``
    put one (``fairness.embedder=auto``), else the one trained here, named by its training steps (so a changed
    ``fairness.embedder-steps`` trains a new one instead of reusing a stale one)."""
    shipped = artifacts / SHIPPED_EMBEDDER
    if cfg.fairness.embedder == "auto" and shipped.is_file():
        return shipped
    return artifacts / f"speaker-embedder-{cfg.fairness.embedder_steps}.pt"


def build_speaker_embedder(cfg: RunConfig, corpus: Corpus, public: Sequence[str], cmvn: GlobalCMVN, artifacts: Path) -> Path:
    """The on-device speaker-embedding extractor, once: with ``fairness.embedder=auto`` the shipped speaker verifier
    (copied beside the tokenizer and CMVN) when the run's CMVN is the one it was trained with, else an extractor
    trained (AAM-softmax) on the public speakers. The file travels to devices with the tokenizer and CMVN; its
    embeddings never leave a device."""
    from shared.models.speaker_embedding import (
        collect_features,
        load_verifier,
        save_speaker_embedder,
        shipped_verifier,
        train_speaker_embedding,
    )

    path = speaker_embedder_path(artifacts, cfg)
    if path.exists():
        return path
    verifier = shipped_verifier()
    if cfg.fairness.embedder == "auto" and verifier.is_file():
        trained_with = load_verifier(verifier).cmvn
        same = trained_with is not None and all(
            np.array_equal(getattr(trained_with, stat), getattr(cmvn, stat)) for stat in ("mean", "std")
        )
        if same:
            return write_bytes_atomic(artifacts / SHIPPED_EMBEDDER, verifier.read_bytes())
    by_speaker = corpus.by_speaker()
    feats, speakers = collect_features(
        [u for s in public for u in by_speaker.get(s, [])], FeatureCache(corpus, cmvn, max_items=0)
    )
    model = train_speaker_embedding(feats, speakers, steps=cfg.fairness.embedder_steps, seed=cfg.train.seed)
    return save_speaker_embedder(path, model)


def plan_split(cfg: RunConfig, speakers: Sequence[str] | None = None) -> tuple[SpeakerSplit, dict[str, dict[str, str]]]:
    """The split ``prepare`` makes and the speakers' ``speakers.tsv`` attributes, known before anything is
    synthesized or featurized (a synthetic corpus' speakers are drawn from its seed), so that a command asking for
    more devices than the split has fails before the expensive work. ``speakers``: the corpus' speakers where the
    caller has loaded it (default: the synthetic population, or the corpus listed without validating its audio)."""
    root = corpus_dir(cfg)
    if cfg.corpus == "synth":
        from shared.data.synth import SPEAKER_COLUMNS, sample_population

        population = sample_population(cfg.synth.speakers, cfg.synth.seed)
        attributes = {p.id: dict(zip(SPEAKER_COLUMNS[1:], p.tsv_row().split("\t")[1:], strict=True)) for p in population}
        speakers = list(attributes) if speakers is None else speakers
    else:
        attributes = read_speakers_tsv(root)
        speakers = load_corpus(root, validate=False).speakers() if speakers is None else speakers
    try:  # speakers.tsv alone names the market
        market = speakers_matching(root, cfg.split.market, attributes) if cfg.split.market else None
    except ValueError as err:
        raise PrepareError(f"split.market = {err}") from None
    split = split_speakers(
        speakers,
        public=cfg.split.public_speakers,
        heldout=cfg.split.heldout_speakers,
        seed=cfg.split.seed,
        market=market,
    )
    return split, attributes


def prepare(cfg: RunConfig, *, progress: bool = True) -> Prepared:
    """Synthesize (if needed), split, and build the tokenizer and CMVN artifacts (and, with ``fairness.enabled``,
    the speaker-embedding extractor); cached on disk."""
    root = corpus_dir(cfg)
    plan_split(cfg)  # a split the corpus cannot make fails here, before the synthesis or the audio's validation
    if cfg.corpus == "synth":
        from shared.data.synth import synthesize  # espeak-ng is only needed for the default corpus

        synthesize(root, speakers=cfg.synth.speakers, utterances=cfg.synth.utterances, seed=cfg.synth.seed, progress=progress)
    corpus = load_corpus(root)
    split, _ = plan_split(cfg, corpus.speakers())
    artifacts = artifact_dir(cfg)
    artifacts.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        artifacts / "split.json",
        json.dumps({"public": split.public, "federated": split.federated, "heldout": split.heldout}, indent=1) + "\n",
    )
    by_speaker = corpus.by_speaker()
    public_utts = [u for s in split.public for u in by_speaker.get(s, [])]

    tok_path, cmvn_path = _frontend_files(artifacts, cfg.model.vocab_size)
    init = init_checkpoint_path(cfg.model)
    frontend = checkpoint_frontend(init) if init is not None else None
    if frontend is not None:  # the starting model's own tokenizer and CMVN: a new one would not fit its weights
        if frontend.tokenizer.vocab_size != cfg.model.vocab_size:
            raise PrepareError(
                f"model.init-checkpoint {init} has a {frontend.tokenizer.vocab_size}-piece tokenizer, "
                f"model.vocab-size is {cfg.model.vocab_size}"
            )
        if not tok_path.exists():
            write_bytes_atomic(tok_path, frontend.tokenizer.model_proto)
        if not cmvn_path.exists():
            write_text_atomic(cmvn_path, frontend.cmvn.to_json())
    if not tok_path.exists():
        texts = [u.text for u in public_utts]
        if cfg.corpus == "synth":
            from shared.data.commands import sample_sentences

            texts += sample_sentences(_GRAMMAR_SENTENCES, seed=cfg.synth.seed + 1)
        Tokenizer.train(texts, tok_path, vocab_size=cfg.model.vocab_size)

    if not cmvn_path.exists():
        sample = public_utts[:: max(1, len(public_utts) // _CMVN_UTTERANCES)]
        raw = FeatureCache(corpus, None, max_items=0)  # raw fbank, skipping (and counting) bad files
        cmvn = GlobalCMVN.fit(f for f in (raw.features(u) for u in sample) if f is not None)
        write_text_atomic(cmvn_path, cmvn.to_json())
    if cfg.fairness.enabled:  # cohort discovery and ARW need the public speaker-embedding extractor
        build_speaker_embedder(cfg, corpus, split.public, GlobalCMVN.load(cmvn_path), artifacts)
    return open_prepared(cfg)


def open_prepared(cfg: RunConfig) -> Prepared:
    """Load what ``prepare`` built; a clear error if it has not run (devices never build artifacts)."""
    root = corpus_dir(cfg)
    artifacts = artifact_dir(cfg)
    tok_path, cmvn_path = _frontend_files(artifacts, cfg.model.vocab_size)
    for needed in (artifacts / "split.json", tok_path, cmvn_path):
        if not needed.exists():
            raise PrepareError(
                f"{needed} is missing: run `chorus data prepare` (or let the server prepare) for corpus {root} first"
            )
    split_json = json.loads((artifacts / "split.json").read_text())
    split = SpeakerSplit(**{k: tuple(v) for k, v in split_json.items()})
    return Prepared(
        corpus=load_corpus(root, validate=False),
        split=split,
        tokenizer=Tokenizer.load(tok_path),
        cmvn=GlobalCMVN.load(cmvn_path),
        artifacts=artifacts,
    )
