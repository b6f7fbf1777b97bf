"""What a device has: its own speaker's utterances, split into local train and local eval, as features.

Two ways to find them, chosen by the SuperNode's ``node_config`` (:func:`node_data`):

* **Simulation** (``partition-id``): the device is node ``partition-id`` and its data is that federated
  speaker's part of the prepared corpus under the run's workdir (:func:`device_data`).
* **Deployment** (``data-dir``, ``artifacts-dir``): a real device (``chorus device join``) holds its own
  recordings in ``data-dir`` (any layout :func:`shared.data.corpora.load_corpus` reads; every utterance in it
  is this device's) and the public artifacts ``chorus data prepare`` wrote in ``artifacts-dir``
  (``tokenizer-<vocab>.model`` and ``cmvn.json``) (:func:`local_device_data`).

Either way the local train / eval split is :func:`shared.data.prepare.local_split`. Loading is memoized per
process because a device process may serve many rounds.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.data.corpora import CorpusError, Utterance, load_corpus
from shared.data.dataset import FeatureCache
from shared.data.features import FeatureError, GlobalCMVN
from shared.data.prepare import Prepared, local_split, open_prepared
from shared.data.tokenizer import Tokenizer, TokenizerError

__all__ = ["DATA_DIR_KEY", "ARTIFACTS_DIR_KEY", "DeviceData", "DeviceDataError", "device_data", "local_device_data", "node_data"]

DATA_DIR_KEY = "data-dir"
ARTIFACTS_DIR_KEY = "artifacts-dir"
_PARTITION_KEY = "partition-id"


class DeviceDataError(ValueError):
    """A device's node_config does not point at usable data or artifacts (the message names the path)."""


@dataclass(frozen=True)
class DeviceData:
    train: list[Utterance]
    eval: list[Utterance]
    features: FeatureCache
    tokenizer: Tokenizer


def node_data(cfg: RunConfig, node_config: Mapping[str, Any]) -> DeviceData:
    """The device's data as its SuperNode's ``node_config`` says: ``data-dir`` (deployment) or
    ``partition-id`` (simulation)."""
    if DATA_DIR_KEY in node_config:
        if ARTIFACTS_DIR_KEY not in node_config:
            raise DeviceDataError(
                f"node_config has {DATA_DIR_KEY!r} but no {ARTIFACTS_DIR_KEY!r}: start the "
                f"SuperNode with --node-config \"{DATA_DIR_KEY}='...' {ARTIFACTS_DIR_KEY}='...'\""
            )
        return local_device_data(cfg, data_dir=str(node_config[DATA_DIR_KEY]), artifacts_dir=str(node_config[ARTIFACTS_DIR_KEY]))
    if _PARTITION_KEY in node_config:
        return device_data(cfg, int(node_config[_PARTITION_KEY]))
    raise DeviceDataError(
        f"node_config {dict(node_config)!r} names no data: a deployed device needs "
        f"{DATA_DIR_KEY!r} and {ARTIFACTS_DIR_KEY!r}, a simulated one {_PARTITION_KEY!r}"
    )


# -- simulation ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _opened(data_cfg: RunConfig) -> tuple[Prepared, FeatureCache]:
    """What ``prepare`` built for a corpus and front end, with one feature cache over it."""
    prepared = open_prepared(data_cfg)
    return prepared, FeatureCache(prepared.corpus, prepared.cmvn)


def device_data(cfg: RunConfig, partition_id: int) -> DeviceData:
    # Memoized by the settings that choose the corpus and front end, not the whole run config: runs that differ
    # only in training or strategy (the arms of an evaluation) share one corpus and its features.
    data_cfg = RunConfig(workdir=str(cfg.workdir_path), corpus=cfg.corpus, synth=cfg.synth, split=cfg.split, model=cfg.model)
    prepared, features = _opened(data_cfg)
    speaker = prepared.speaker_for_partition(partition_id)
    train, evaluation = local_split(prepared.corpus.by_speaker()[speaker], cfg.split.local_eval_fraction)
    return DeviceData(train=train, eval=evaluation, features=features, tokenizer=prepared.tokenizer)


# -- deployment ---------------------------------------------------------------------------------------------


def local_device_data(cfg: RunConfig, *, data_dir: str | Path, artifacts_dir: str | Path) -> DeviceData:
    """A deployed device's own utterances (all of ``data_dir``) with the public tokenizer and CMVN.

    Raises:
        DeviceDataError: a directory or artifact file is missing or unusable, or the corpus is empty; the
            message names the path.
    """
    return _local_device_data(
        Path(data_dir).expanduser().resolve(),
        Path(artifacts_dir).expanduser().resolve(),
        cfg.model.vocab_size,
        cfg.split.local_eval_fraction,
    )


@functools.lru_cache(maxsize=2)
def _local_device_data(data_dir: Path, artifacts_dir: Path, vocab_size: int, eval_fraction: float) -> DeviceData:
    if not data_dir.is_dir():
        raise DeviceDataError(f"{DATA_DIR_KEY} {data_dir}: no such directory (the device's own recordings)")
    if not artifacts_dir.is_dir():
        raise DeviceDataError(
            f"{ARTIFACTS_DIR_KEY} {artifacts_dir}: no such directory (copy the artifacts "
            "`chorus data prepare` wrote: tokenizer-<vocab>.model and cmvn.json)"
        )
    tokenizer_path = artifacts_dir / f"tokenizer-{vocab_size}.model"
    cmvn_path = artifacts_dir / "cmvn.json"
    for needed in (tokenizer_path, cmvn_path):
        if not needed.is_file():
            raise DeviceDataError(
                f"{needed} is missing: {ARTIFACTS_DIR_KEY} must hold the files `chorus data "
                f"prepare` wrote for model.vocab-size={vocab_size}"
            )
    try:
        tokenizer = Tokenizer.load(tokenizer_path)
        cmvn = GlobalCMVN.load(cmvn_path)
        corpus = load_corpus(data_dir)
    except (TokenizerError, FeatureError, CorpusError) as err:
        raise DeviceDataError(str(err)) from err
    if tokenizer.vocab_size != vocab_size:
        raise DeviceDataError(f"{tokenizer_path} has {tokenizer.vocab_size} pieces, the run's model.vocab-size is {vocab_size}")
    if not corpus.utterances:
        raise DeviceDataError(f"{DATA_DIR_KEY} {data_dir}: no usable utterances ({len(corpus.skipped)} skipped)")
    train, evaluation = local_split(corpus.utterances, eval_fraction)
    return DeviceData(train=train, eval=evaluation, features=FeatureCache(corpus, cmvn), tokenizer=tokenizer)
