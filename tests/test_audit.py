import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.privacy.audit import PrivacyViolation, audit_reply

MODEL = {"encoder.w": torch.zeros(4, 3), "joiner.b": torch.zeros(5)}
SHAPES = {k: tuple(v.shape) for k, v in MODEL.items()}


def reply(**records: object) -> RecordDict:
    return RecordDict(records)


def test_allowlisted_reply_passes() -> None:
    audit_reply(reply(arrays=ArrayRecord(MODEL), metrics=MetricRecord({"train-loss": 1.5, "num-examples": 30})),
                expected_arrays=SHAPES)


def test_transcript_in_metrics_is_caught() -> None:
    # A MetricRecord cannot even hold strings; a ConfigRecord can, and is refused outright.
    with pytest.raises(PrivacyViolation, match="config record 'extra'"):
        audit_reply(reply(metrics=MetricRecord({"wer": 0.1}), extra=ConfigRecord({"text": "call mom"})))


def test_unknown_metric_key_is_caught() -> None:
    with pytest.raises(PrivacyViolation, match="'speaker-id'"):
        audit_reply(reply(metrics=MetricRecord({"speaker-id": 17})))


def test_token_ids_or_audio_in_arrays_are_caught() -> None:
    with pytest.raises(PrivacyViolation, match="dtype int64"):
        audit_reply(reply(arrays=ArrayRecord({**MODEL, "ids": torch.arange(5)})))
    with pytest.raises(PrivacyViolation, match="extra \\['audio'\\]"):
        audit_reply(reply(arrays=ArrayRecord({**MODEL, "audio": torch.zeros(16000)})), expected_arrays=SHAPES)
    with pytest.raises(PrivacyViolation, match="array record 'embedding'"):
        audit_reply(reply(embedding=ArrayRecord([np.zeros(192, dtype=np.float32)])))
