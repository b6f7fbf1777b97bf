"""The privacy audit (shared/privacy/audit.py): the allowlist checks and the client mod that applies them."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto

from shared.privacy.audit import ALLOWED_METRICS, PrivacyViolation, audit_mod, audit_reply

MODEL = {"encoder.w": torch.zeros(4, 3), "joiner.b": torch.zeros(5)}
SENT = RecordDict({"arrays": ArrayRecord(MODEL), "config": ConfigRecord({"server-round": 1})})
METRICS = MetricRecord({"train-loss": 1.5, "num-examples": 30})


def reply(**records: object) -> RecordDict:
    return RecordDict(records)


def incoming(content: RecordDict = SENT, message_type: str = MessageType.TRAIN) -> Message:
    """A message as the server sends it (the ServerApp side would stamp this metadata)."""
    metadata = Metadata(
        run_id=1,
        message_id="m-1",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )
    return Message(metadata=metadata, content=content)


def context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def run_mod(handler, message_type: str = MessageType.TRAIN) -> Message:  # noqa: ANN001 - a ClientApp handler
    return audit_mod(incoming(message_type=message_type), context(), handler)


# --- audit_reply: what may leave ---------------------------------------------------------------------------


def test_allowlisted_reply_passes() -> None:
    audit_reply(reply(arrays=ArrayRecord(MODEL), metrics=METRICS), SENT)
    audit_reply(reply(metrics=MetricRecord({"word-errors": 3, "words": 40, "wer": 0.075})), SENT)
    assert {"num-examples", "train-loss", "word-errors", "words", "wer"} <= ALLOWED_METRICS


def test_config_record_is_refused() -> None:
    # A MetricRecord cannot even hold strings; a ConfigRecord can, and is refused outright.
    with pytest.raises(TypeError):
        MetricRecord({"text": "call mom"})  # type: ignore[dict-item]
    with pytest.raises(PrivacyViolation, match="config record 'extra'"):
        audit_reply(reply(metrics=MetricRecord({"wer": 0.1}), extra=ConfigRecord({"text": "call mom"})), SENT)


def test_unknown_metric_key_and_record_name_are_caught() -> None:
    with pytest.raises(PrivacyViolation, match="metric 'speaker-id' is not on the allowlist"):
        audit_reply(reply(metrics=MetricRecord({"speaker-id": 17})), SENT)
    with pytest.raises(PrivacyViolation, match="metric record 'stats' is not on the allowlist"):
        audit_reply(reply(stats=MetricRecord({"wer": 0.1})), SENT)


@pytest.mark.parametrize(
    "value, why",
    [
        ([12, 7, 99], "is a list"),
        ([0.5, 0.25], "is a list"),
        (float("nan"), "is not a finite"),
        (float("inf"), "is not a finite"),
    ],
)
def test_metric_values_must_be_finite_scalars(value: object, why: str) -> None:
    # A list of ints is a sequence of token ids; NaN/inf are no statistic at all.
    with pytest.raises(PrivacyViolation, match=f"metric 'wer' {why}"):
        audit_reply(reply(metrics=MetricRecord({"wer": value})), SENT)  # type: ignore[dict-item]


def test_token_ids_audio_or_embeddings_in_arrays_are_caught() -> None:
    with pytest.raises(PrivacyViolation, match=r"extra \['ids'\]"):
        audit_reply(reply(arrays=ArrayRecord({**MODEL, "ids": torch.arange(5)})), SENT)
    with pytest.raises(PrivacyViolation, match=r"extra \['audio'\]"):
        audit_reply(reply(arrays=ArrayRecord({**MODEL, "audio": torch.zeros(16000)})), SENT)
    with pytest.raises(PrivacyViolation, match="array record 'embedding' is not on the allowlist"):
        audit_reply(reply(embedding=ArrayRecord([np.zeros(192, dtype=np.float32)])), SENT)
    with pytest.raises(PrivacyViolation, match="dtype int64"):  # a model key, but token ids in it
        audit_reply(reply(arrays=ArrayRecord({**MODEL, "joiner.b": torch.arange(5)})), SENT)


def test_arrays_must_match_what_the_server_sent() -> None:
    with pytest.raises(PrivacyViolation, match=r"'encoder.w' is float32\[3, 4\], the global model's is float32\[4, 3"):
        audit_reply(reply(arrays=ArrayRecord({**MODEL, "encoder.w": torch.zeros(3, 4)})), SENT)
    with pytest.raises(PrivacyViolation, match=r"float64\[5\], the global model's is float32\[5\]"):
        audit_reply(reply(arrays=ArrayRecord({**MODEL, "joiner.b": torch.zeros(5, dtype=torch.float64)})), SENT)
    with pytest.raises(PrivacyViolation, match="missing 1 key"):
        audit_reply(reply(arrays=ArrayRecord({"encoder.w": MODEL["encoder.w"]})), SENT)
    # A message that sent no arrays may get none back.
    with pytest.raises(PrivacyViolation, match="the server sent no such arrays"):
        audit_reply(reply(arrays=ArrayRecord(MODEL)), RecordDict({"config": ConfigRecord({"server-round": 1})}))


def test_array_bytes_must_be_what_the_labels_say() -> None:
    def with_bias(bias: Array) -> RecordDict:
        return reply(arrays=ArrayRecord({"encoder.w": Array(np.zeros((4, 3), np.float32)), "joiner.b": bias}))

    honest = Array(np.zeros(5, dtype=np.float32))
    smuggled = Array(dtype="float32", shape=(5,), stype=honest.stype, data=honest.data + b"turn off the lights")
    with pytest.raises(PrivacyViolation, match="carries bytes beyond its values"):
        audit_reply(with_bias(smuggled), SENT)
    ids = Array(np.arange(5, dtype=np.int32))  # 5 token ids, labelled as float32[5]
    relabelled = Array(dtype="float32", shape=(5,), stype=ids.stype, data=ids.data)
    with pytest.raises(PrivacyViolation, match=r"labelled float32\[5\] but holds int32\[5\]"):
        audit_reply(with_bias(relabelled), SENT)
    raw = Array(dtype="float32", shape=(5,), stype="numpy.ndarray", data=b"call mom at 5 pm please")
    with pytest.raises(PrivacyViolation, match="does not decode"):
        audit_reply(with_bias(raw), SENT)


def test_fortran_ordered_arrays_pass() -> None:
    # A transposed weight serializes with fortran_order=True: still the canonical bytes of its values.
    transposed = {**MODEL, "encoder.w": torch.zeros(3, 4).t()}
    audit_reply(reply(arrays=ArrayRecord(transposed)), SENT)


def test_names_that_could_be_data_are_redacted_in_the_message() -> None:
    for name in ("call mom at five", "spk0003"):
        with pytest.raises(PrivacyViolation) as caught:
            audit_reply(reply(metrics=MetricRecord({name: 1.0})), SENT)
        assert name not in str(caught.value) and "redacted name of" in str(caught.value)
        assert caught.value.culprit == name  # for the device's own log
    labelled = Array(dtype="call mom", shape=(5,), stype="numpy.ndarray", data=b"")  # a dtype label is free text
    with pytest.raises(PrivacyViolation, match="has dtype <unrecognized dtype>") as caught:
        audit_reply(reply(arrays=ArrayRecord({"encoder.w": Array(MODEL["encoder.w"].numpy()), "joiner.b": labelled})), SENT)
    assert "call mom" not in str(caught.value)


# --- audit_mod: every reply passes the audit before it leaves -----------------------------------------------


def test_mod_lets_an_allowlisted_reply_through_unchanged() -> None:
    sent_reply: list[Message] = []

    def handler(msg: Message, ctx: Context) -> Message:
        sent_reply.append(Message(reply(arrays=ArrayRecord(MODEL), metrics=METRICS), reply_to=msg))
        return sent_reply[0]

    assert run_mod(handler) is sent_reply[0]


def test_mod_turns_a_violation_into_an_error_reply() -> None:
    def handler(msg: Message, ctx: Context) -> Message:
        return Message(reply(metrics=MetricRecord({"speaker-id": 3.0, "wer": 0.2})), reply_to=msg)

    out = run_mod(handler, MessageType.EVALUATE)
    assert out.has_error() and not out.has_content()
    assert out.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "privacy audit refused the device's evaluate reply: metric 'speaker-id'" in out.error.reason
    assert out.metadata.reply_to_message_id == "m-1" and out.metadata.message_type == MessageType.EVALUATE


def test_mod_keeps_exception_text_on_the_device(caplog: pytest.LogCaptureFixture) -> None:
    transcript = "remind me to call doctor patel"

    def handler(msg: Message, ctx: Context) -> Message:
        raise ValueError(f"utterance spk0003-0007: transcript {transcript!r} cannot be encoded")

    out = run_mod(handler)
    assert out.has_error() and out.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "raised ValueError" in out.error.reason
    wire = message_to_proto(out).SerializeToString()
    assert transcript.encode() not in wire and b"spk0003" not in wire
    assert transcript in caplog.text  # the device's own log keeps the detail


def test_mod_keeps_a_handler_error_reason_on_the_device() -> None:
    def handler(msg: Message, ctx: Context) -> Message:
        return Message(Error(code=0, reason="no audio for spk0003"), reply_to=msg)

    out = run_mod(handler)
    assert out.has_error() and out.error.code == 0 and "spk0003" not in out.error.reason
