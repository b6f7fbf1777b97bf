"""Typed reads of Flower records: the record of the kind a message must carry, the number a key must hold.

``RecordDict`` holds any kind of record and a ``ConfigRecord`` / ``MetricRecord`` any of its value types (lists
included); these helpers say which one a reader expects and check it, instead of failing later with an
AttributeError (a ``MetricRecord`` has no ``to_torch_state_dict``) or in ``int()`` (of a list).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = ["array_record", "config_record", "metric_record", "scalar"]


def array_record(content: RecordDict, key: str) -> ArrayRecord:
    """``content[key]``, an ArrayRecord (KeyError when absent, TypeError when another kind of record)."""
    record = content[key]
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"record {key!r} is a {type(record).__name__}, not an ArrayRecord")
    return record


def config_record(content: RecordDict, key: str) -> ConfigRecord:
    """``content[key]``, a ConfigRecord (KeyError when absent, TypeError when another kind of record)."""
    record = content[key]
    if not isinstance(record, ConfigRecord):
        raise TypeError(f"record {key!r} is a {type(record).__name__}, not a ConfigRecord")
    return record


def metric_record(content: RecordDict, key: str) -> MetricRecord:
    """``content[key]``, a MetricRecord (KeyError when absent, TypeError when another kind of record)."""
    record = content[key]
    if not isinstance(record, MetricRecord):
        raise TypeError(f"record {key!r} is a {type(record).__name__}, not a MetricRecord")
    return record


def scalar(record: ConfigRecord | MetricRecord, key: str) -> int | float:
    """``record[key]``, one number (KeyError when absent, TypeError for a list, a string or bytes)."""
    value = record[key]
    if not isinstance(value, (int, float)):  # a bool is an int here, as for int() and float()
        raise TypeError(f"{key!r} is a {type(value).__name__}, not a number")
    return value
