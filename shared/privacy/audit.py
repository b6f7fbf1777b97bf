"""The one allowlist of what a device may send to the server, and the audit that enforces it.

A reply from a device may carry only:
    - ArrayRecords under allowlisted names, whose arrays are floating-point tensors with exactly the names
      and shapes of the global model the server sent (so nothing can ride along: no token ids, no audio);
    - one MetricRecord whose keys are all in ``ALLOWED_METRICS`` and whose values are numbers.
No ConfigRecord (free-form strings could carry a transcript or a speaker id) and no other record.
The audit runs on every reply in the tests (a client mod), and devices run it on their own replies before
sending, so a bug that would leak data fails the round on the device instead of leaking.
"""

from __future__ import annotations

from typing import Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = ["ALLOWED_ARRAY_RECORDS", "ALLOWED_METRICS", "PrivacyViolation", "audit_reply"]

ALLOWED_ARRAY_RECORDS = frozenset({"arrays"})
ALLOWED_METRICS = frozenset({
    "num-examples",  # utterances used: the aggregation weight
    "train-loss",  # mean per-token transducer loss over the local steps
    "local-steps",
    "compute-cost",  # mean executed share of gateable encoder compute
    "word-errors",  # evaluation: summed word edit counts over the device's held-out utterances
    "words",  # evaluation: reference word count (pooled WER = sum errors / sum words)
    "wer",
    "skipped-utterances",  # bad local files skipped (a count, never which)
})


class PrivacyViolation(RuntimeError):
    """A device reply carries something outside the allowlist."""


def audit_reply(content: RecordDict, expected_arrays: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise PrivacyViolation naming the first record/key that is not allowed.

    ``expected_arrays``: name -> shape of the model the server sent; when given, a reply's arrays must
    match it exactly.
    """
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            if name not in ALLOWED_ARRAY_RECORDS:
                raise PrivacyViolation(f"array record {name!r} is not on the allowlist")
            if expected_arrays is not None:
                got = {key: tuple(array.shape) for key, array in record.items()}
                if got != dict(expected_arrays):
                    extra = sorted(set(got) - set(expected_arrays))
                    reshaped = sorted(k for k in got.keys() & expected_arrays.keys() if got[k] != tuple(expected_arrays[k]))
                    raise PrivacyViolation(f"array record {name!r} does not match the global model: extra "
                                           f"{extra[:5]}, reshaped {reshaped[:5]}, missing "
                                           f"{sorted(set(expected_arrays) - set(got))[:5]}")
            for key, array in record.items():
                if array.dtype not in ("float32", "float64", "float16", "bfloat16"):
                    raise PrivacyViolation(f"array {name}/{key} has dtype {array.dtype}: only float model "
                                           f"parameters may leave a device")
        elif isinstance(record, MetricRecord):
            for key, value in record.items():
                if key not in ALLOWED_METRICS:
                    raise PrivacyViolation(f"metric {key!r} is not on the allowlist")
                values = value if isinstance(value, list) else [value]
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    raise PrivacyViolation(f"metric {key!r} is not numeric: {value!r}")
        elif isinstance(record, ConfigRecord):
            raise PrivacyViolation(f"config record {name!r} in a device reply: free-form values may not leave")
        else:
            raise PrivacyViolation(f"record {name!r} of type {type(record).__name__} is not allowed")
