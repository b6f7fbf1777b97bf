"""The one allowlist of what a device may send to the server, and the audit that enforces it.

A reply from a device may carry only:
    - ArrayRecords under allowlisted names (``ALLOWED_ARRAY_RECORDS``), each the counterpart of a record the
      server sent: exactly the keys, and for every key a floating-point array of exactly the dtype and shape
      that the sent record implies (``_expected_arrays``), stored in Flower's numpy serialization with nothing
      after the array (so nothing can ride along: no token ids, no audio, no embeddings, no trailing bytes).
      ``arrays`` (the model update) and ``fisher-sums`` (EWC: squared gradients) mirror the sent ``arrays``;
      the fairness phases' aggregate-only statistics (``kmeans-stats``, ``cohort-eval``) are dense over all
      clusters, their shapes derived from the sent ``centroids`` (C, E), so their form says nothing about the
      device (its cluster or cohort shows only in which entry is non-zero: SecAgg+ hides that; see
      ``server/fairness.py`` for what the server learns without it);
    - MetricRecords under allowlisted names (``ALLOWED_METRIC_RECORDS``) whose keys are all in
      ``ALLOWED_METRICS`` and whose values are finite int/float scalars (no lists: a list of ints is a
      sequence of token ids).
No ConfigRecord (free-form strings could carry a transcript or a speaker id) and no other record.

:func:`audit_mod` is a Flower client mod, attached to the ClientApp (``client/client_app.py``), so every reply
of every run, simulated or deployed, passes the audit on the device before it leaves. A reply that fails
becomes an error reply (the device's round fails, nothing of its content leaves) whose reason names the
offending record/key (a name that could itself be data, e.g. a transcript used as a metric key, is redacted
there and logged on the device). The mod also keeps exception text off the wire: Flower would send
``str(exception)`` of a failing handler to the server, and our errors name local files, utterance ids and
transcripts; the device logs them and the server gets only the exception's type.

SecAgg+ (``strategy.secure-aggregation``): a reply to a stage of the protocol is checked against that stage's own
allowlist instead (``shared/privacy/secagg_audit.py``: public keys, encrypted shares for neighbours, the masked
integer update, allowlisted metrics), because under SecAgg+ the plain update never leaves the device.

What the audit cannot see: data encoded in the values of the model weights themselves (the arrays have the
global model's exact form, but their numbers are the device's). It stops accidental and structural leaks;
bounding what weights reveal is a job for differential privacy.
"""

from __future__ import annotations

import logging
import math
import re

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

__all__ = ["ALLOWED_ARRAY_RECORDS", "ALLOWED_METRIC_RECORDS", "ALLOWED_METRICS", "PrivacyViolation", "audit_mod", "audit_reply"]

log = logging.getLogger("chorus.privacy")

# Record names are spelled here, not imported from shared.fairness.protocol: the allowlist stays readable in
# one place, and tests/test_fairness_federated.py checks the two agree.
ALLOWED_ARRAY_RECORDS = frozenset(
    {
        "arrays",  # model parameters (with ARW, plus the adversary's "arw.*" parameters the server sent)
        "fisher-sums",  # EWC: summed squared minibatch gradients of the sent global model, one per its keys
        "kmeans-stats",  # federated k-means: dense per-cluster embedding sums (C, E) and counts (C,)
        "cohort-eval",  # disaggregated evaluation: dense per-cohort word errors, words, speakers, (C,) each
    }
)
ALLOWED_METRIC_RECORDS = frozenset({"metrics"})
ALLOWED_METRICS = frozenset(
    {
        "num-examples",  # utterances used: the aggregation weight
        "train-loss",  # mean per-token transducer loss over the local steps
        "local-steps",
        "compute-cost",  # mean executed share of gateable encoder compute
        "word-errors",  # evaluation: summed word edit counts over the device's held-out utterances
        "words",  # evaluation: reference word count (pooled WER = sum errors / sum words)
        "wer",
        "skipped-utterances",  # bad local files skipped (a count, never which)
        # DP-SGD (dp.enabled): the device's epsilon spent so far at dp.delta. RDP accounting is a function of the
        # public noise multiplier, sample rate and step count only, never of the data, so it reveals nothing private.
        "epsilon",
        # EWC's federated Fisher: how many minibatches a device's Fisher sums cover (the divisor of the average; a
        # count the server could already infer from the training num-examples).
        "fisher-batches",
        # ARW (fairness.arw): the device's summed adversary scores, utterance-steps, score x loss, and its ARL weight
        # mass. Scalars, like the loss; a score is a projection of the device's inputs that the adversary's own update
        # (inside "arrays") already carries. Summable, so SecAgg+ could hide them per device.
        "arw-score",
        "arw-count",
        "arw-score-loss",
        "arw-weight",
    }
)
_FLOAT_DTYPES = frozenset({"float16", "float32", "float64", "bfloat16"})
_KNOWN_DTYPES = (
    _FLOAT_DTYPES
    | {f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64)}
    | {"bool", "complex64", "complex128"}
)

# A name that looks like a code identifier may be quoted in the reason sent to the server; anything else (a
# transcript with spaces, a speaker id with digits, a long string) is quoted only in the device's own log.
_QUOTABLE = re.compile(r"[a-z][a-z_.-]{0,31}")


class PrivacyViolation(RuntimeError):
    """A device reply carries something outside the allowlist.

    ``str(violation)`` is safe to send to the server (record/key names that could be data are redacted);
    ``culprit`` is the unredacted offending name, for the device's own log.
    """

    def __init__(self, message: str, culprit: str = "") -> None:
        super().__init__(message)
        self.culprit = culprit


def _q(name: str) -> str:
    """``name`` quoted for a reason that leaves the device, or a redaction if it might be data."""
    return repr(name) if _QUOTABLE.fullmatch(name) else f"<redacted name of {len(name)} characters>"


def _dtype(dtype: object) -> str:
    """A dtype for a reason that leaves the device: a label is free text, a structured dtype has field names."""
    return str(dtype) if str(dtype) in _KNOWN_DTYPES else "<unrecognized dtype>"


def _audit_array(name: str, key: str, array: Array, expected: tuple[str, tuple[int, ...]], reference: str) -> None:
    where, culprit = f"{_q(name)}/{_q(key)}", f"{name}/{key}"
    if array.dtype not in _FLOAT_DTYPES:
        raise PrivacyViolation(
            f"array {where} has dtype {_dtype(array.dtype)}: only float model parameters and statistics may leave a device",
            culprit,
        )
    dtype, shape = expected
    if (array.dtype, tuple(array.shape)) != (dtype, shape):
        raise PrivacyViolation(f"array {where} is {array.dtype}{list(array.shape)}, {reference} {dtype}{list(shape)}", culprit)
    # dtype/shape are only labels: the bytes must be exactly the canonical serialization of such an array.
    try:
        decoded = array.numpy()
    except Exception as ex:  # noqa: BLE001 - any undecodable payload is refused
        raise PrivacyViolation(f"array {where} does not decode as a numpy array ({type(ex).__name__})", culprit) from None
    if (str(decoded.dtype), tuple(decoded.shape)) != (array.dtype, tuple(array.shape)):
        raise PrivacyViolation(
            f"array {where} is labelled {array.dtype}{list(array.shape)} but holds {_dtype(decoded.dtype)}{list(decoded.shape)}",
            culprit,
        )
    if Array(decoded).data != array.data:  # np.save of what np.load gave back: the canonical bytes
        raise PrivacyViolation(f"array {where} carries bytes beyond its values", culprit)


def _expected_arrays(name: str, sent: RecordDict) -> tuple[dict[str, tuple[str, tuple[int, ...]]], str]:
    """What an allowlisted reply ArrayRecord must hold, derived from the sent content: key -> (dtype, shape),
    and how to name that reference in a reason."""
    source = "centroids" if name in ("kmeans-stats", "cohort-eval") else "arrays"
    sent_record = sent.get(source)
    if not isinstance(sent_record, ArrayRecord):
        if source == "arrays" and name == "arrays":
            raise PrivacyViolation(f"array record {_q(name)}: the server sent no such arrays to answer", name)
        raise PrivacyViolation(f"array record {_q(name)}: the server sent no {_q(source)} to answer", name)
    if source == "arrays":  # the model update and the Fisher sums mirror the global model exactly
        return {k: (a.dtype, tuple(a.shape)) for k, a in sent_record.items()}, "the global model's is"
    centroids = sent_record.get("centroids") if "centroids" in sent_record else None
    if centroids is None or len(centroids.shape) != 2 or centroids.dtype not in _FLOAT_DTYPES:
        raise PrivacyViolation(f"array record {_q(name)}: the server's 'centroids' are not a (C, E) float array", name)
    clusters, dim = (int(n) for n in centroids.shape)
    dtype = centroids.dtype
    if name == "kmeans-stats":
        return {"sums": (dtype, (clusters, dim)), "counts": (dtype, (clusters,))}, "expected"
    return {key: (dtype, (clusters,)) for key in ("errors", "words", "speakers")}, "expected"


def audit_reply(content: RecordDict, sent: RecordDict) -> None:
    """Raise :class:`PrivacyViolation` naming the first record/key of a reply that is not allowed.

    ``sent`` is the content of the message the server sent: a reply's ArrayRecord must match exactly (keys,
    dtypes, shapes) what the sent record it answers implies (``_expected_arrays``); with none sent, no arrays
    may go back.
    """
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            if name not in ALLOWED_ARRAY_RECORDS:
                raise PrivacyViolation(f"array record {_q(name)} is not on the allowlist", name)
            expected, reference = _expected_arrays(name, sent)
            got = set(record.keys())
            if got != set(expected):
                extra = sorted(got - set(expected))
                raise PrivacyViolation(
                    f"array record {_q(name)} does not match what the server sent: extra "
                    f"[{', '.join(_q(k) for k in extra[:5])}], missing "
                    f"{len(set(expected) - got)} key(s)",
                    extra[0] if extra else name,
                )
            for key, array in record.items():
                _audit_array(name, key, array, expected[key], reference)
        elif isinstance(record, MetricRecord):
            if name not in ALLOWED_METRIC_RECORDS:
                raise PrivacyViolation(f"metric record {_q(name)} is not on the allowlist", name)
            for key, value in record.items():
                if key not in ALLOWED_METRICS:
                    raise PrivacyViolation(f"metric {_q(key)} is not on the allowlist", key)
                if isinstance(value, list):
                    raise PrivacyViolation(f"metric {_q(key)} is a list: only scalars may leave a device", key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise PrivacyViolation(f"metric {_q(key)} is not a finite number", key)
        elif isinstance(record, ConfigRecord):
            raise PrivacyViolation(f"config record {_q(name)} in a device reply: free-form values may not leave", name)
        else:
            raise PrivacyViolation(f"record {_q(name)} of type {type(record).__name__} is not allowed", name)


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: the reply to ``msg`` leaves only if it passes :func:`audit_reply`.

    Otherwise the reply is an error (its content never leaves) whose reason names the offending record/key.
    A handler's exception becomes an error reply naming only the exception type; its text stays in the log.
    """
    # SecAgg+ stages (strategy.secure-aggregation) have their own allowlist; imported here because it builds on
    # this module's. The request is read before the handler runs: secaggplus_mod consumes part of it.
    from shared.privacy.secagg_audit import audit_secagg_reply, secagg_request

    kind = msg.metadata.message_type
    secagg = secagg_request(msg.content) if msg.has_content() else None
    try:
        reply = call_next(msg, context)
    except Exception as ex:  # noqa: BLE001 - every failure must be answered without its text
        log.exception("device %s handler failed; the server is told only the exception type", kind)
        return Message(
            Error(
                code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                reason=f"device {kind} handler raised {type(ex).__name__} (details in the device "
                f"log: exception text may name local data, so it does not leave)",
            ),
            reply_to=msg,
        )
    if reply.has_error():
        log.error("device %s handler replied with error %s: %s", kind, reply.error.code, reply.error.reason)
        return Message(
            Error(
                code=reply.error.code,
                reason=f"device {kind} handler replied with error code {reply.error.code} (reason in the device log)",
            ),
            reply_to=msg,
        )
    try:
        if secagg is not None:
            audit_secagg_reply(reply.content, secagg)
        else:
            audit_reply(reply.content, msg.content if msg.has_content() else RecordDict())
    except PrivacyViolation as violation:
        log.error("privacy audit refused the %s reply: %s (culprit %r)", kind, violation, violation.culprit)
        reason = f"privacy audit refused the device's {kind} reply: {violation}"
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
    return reply
