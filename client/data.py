"""What a device has: its own speaker's utterances, split into local train and local eval, as features.

In simulation the device is node ``partition-id`` and its data is that federated speaker's part of the
corpus. Loading is memoized per process because a simulated device process serves many rounds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from shared.config import RunConfig
from shared.data.corpora import Utterance
from shared.data.dataset import FeatureCache
from shared.data.prepare import Prepared, local_split, open_prepared
from shared.data.tokenizer import Tokenizer

__all__ = ["DeviceData", "device_data"]


@dataclass(frozen=True)
class DeviceData:
    train: list[Utterance]
    eval: list[Utterance]
    features: FeatureCache
    tokenizer: Tokenizer


@functools.lru_cache(maxsize=2)
def _prepared(cfg: RunConfig) -> Prepared:
    return open_prepared(cfg)


@functools.lru_cache(maxsize=2)
def _features(cfg: RunConfig) -> FeatureCache:
    prepared = _prepared(cfg)
    return FeatureCache(prepared.corpus, prepared.cmvn)


def device_data(cfg: RunConfig, partition_id: int) -> DeviceData:
    prepared = _prepared(cfg)
    speaker = prepared.speaker_for_partition(partition_id)
    train, evaluation = local_split(prepared.corpus.by_speaker()[speaker], cfg.split.local_eval_fraction)
    return DeviceData(train=train, eval=evaluation, features=_features(cfg), tokenizer=prepared.tokenizer)
