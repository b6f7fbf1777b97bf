"""What a device may send in each stage of SecAgg+, checked by ``audit_mod`` (``shared/privacy/audit.py``).

With ``strategy.secure-aggregation`` a device answers four protocol stages (Flower's ``secaggplus_mod``) instead of
one train instruction. Each reply carries one ConfigRecord, ``secaggplus_configs``, whose keys are fixed by the
stage the server asked for; the collect-masked-vectors reply also carries the legacy ``fitres.*`` records.
The audit allows exactly this, and checks every value that it can:

    setup                   ``pk1``, ``pk2``: two public keys, each bytes that parse as an elliptic-curve public key
                            and are exactly its canonical PEM encoding (nothing rides along)
    share keys              ``dsts``: node ids, distinct, each a neighbour the server named in its request;
                            ``ctxts``: one ciphertext per destination, all of one length, at most
                            ``MAX_SECRET_BYTES``: Shamir shares of this device's mask seed and key, encrypted
                            for the neighbour (the server only relays them and cannot read them)
    collect masked vectors  ``masked_params``: the weight factor (shape [1]) and one array per array the server
                            sent (the global model's, or a fairness phase's secure-sum zeros), of its shape,
                            integer, each entry in [0, 2^32), in canonical numpy bytes: the update (with its
                            metric slots, ``shared/privacy/secure_reply.py``), quantized and masked by pairwise and
                            private masks that cancel only in the sum; ``fitres.parameters`` empty;
                            ``fitres.num_examples`` exactly 1 and ``fitres.metrics`` empty (the weight and the
                            metrics leave masked only); ``fitres.status`` exactly code 0 with an empty message
    unmask                  ``nids``: exactly the active and then the dead neighbours the server listed; ``shares``:
                            one per node id, at most ``MAX_SECRET_BYTES``: shares of the survivors' mask seeds (one
                            length) and of the dropped devices' keys (one length): what lets the server cancel the
                            masks of the sum, no more

Anything else (another record, key or type, a free-form string) is a :class:`PrivacyViolation`.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

from shared.privacy.audit import PrivacyViolation
from shared.privacy.secure_reply import PLAIN_WEIGHT

__all__ = ["MAX_SECRET_BYTES", "SecAggRequest", "audit_secagg_reply", "secagg_request"]

# A share or an encrypted pair of shares of a 32-byte seed and a PEM private key: a few hundred bytes.
MAX_SECRET_BYTES = 4096
_FITRES = ("fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status")


class SecAggRequest:
    """What the audit needs of a SecAgg+ request, copied before ``secaggplus_mod`` consumes it (it pops the
    stage key off the received record)."""

    def __init__(self, stage: str, configs: Mapping[str, Any], arrays: ArrayRecord | None) -> None:
        self.stage, self.configs, self.arrays = stage, dict(configs), arrays


def secagg_request(content: RecordDict) -> SecAggRequest | None:
    """The SecAgg+ stage a server message asks for (None: not a SecAgg+ message)."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return None
    arrays = content.get("arrays")
    return SecAggRequest(str(configs.get(Key.STAGE, "")), configs, arrays if isinstance(arrays, ArrayRecord) else None)


def _ints(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise PrivacyViolation(f"SecAgg+ {name!r} must be a list of node ids", name)
    return value


def _secrets(name: str, value: Any, count: int, *, uniform: bool = True) -> list[bytes]:
    """``value``, checked to be ``count`` byte strings of bounded size, of one length if ``uniform`` (secrets of
    one kind)."""
    if not isinstance(value, list) or any(not isinstance(v, bytes) for v in value) or len(value) != count:
        raise PrivacyViolation(f"SecAgg+ {name!r} must be {count} byte strings", name)
    if (uniform and len({len(v) for v in value}) > 1) or any(len(v) > MAX_SECRET_BYTES for v in value):
        raise PrivacyViolation(f"SecAgg+ {name!r}: secrets of unequal or over-long ({MAX_SECRET_BYTES}+) sizes", name)
    return value


def _public_key(name: str, value: Any) -> None:
    try:
        canonical = public_key_to_bytes(bytes_to_public_key(value))
    except Exception:  # noqa: BLE001 - anything that does not parse is refused
        raise PrivacyViolation(f"SecAgg+ {name!r} is not a public key", name) from None
    if canonical != value:
        raise PrivacyViolation(f"SecAgg+ {name!r} is not exactly a public key's encoding", name)


def _masked_vectors(value: Any, sent: ArrayRecord | None) -> None:
    name = Key.MASKED_PARAMETERS
    if sent is None:
        raise PrivacyViolation("SecAgg+ masked vectors, but the server sent no global model", name)
    shapes = [(1,)] + [tuple(a.shape) for a in sent.values()]
    if not isinstance(value, list) or len(value) != len(shapes) or any(not isinstance(v, bytes) for v in value):
        raise PrivacyViolation(f"SecAgg+ {name!r} must be {len(shapes)} arrays (the weight and the model's)", name)
    for index, (blob, shape) in enumerate(zip(value, shapes, strict=True)):
        try:
            array = bytes_to_ndarray(blob)
        except Exception:  # noqa: BLE001 - anything that does not decode is refused
            raise PrivacyViolation(f"SecAgg+ masked array {index} does not decode", name) from None
        if array.dtype.kind not in "iu" or tuple(array.shape) != shape:
            raise PrivacyViolation(
                f"SecAgg+ masked array {index} is {array.dtype}{list(array.shape)}, expected integers of shape {list(shape)}",
                name,
            )
        if array.size and (int(array.min()) < 0 or int(array.max()) >= 2**32):
            raise PrivacyViolation(f"SecAgg+ masked array {index} leaves the modulus range [0, 2^32)", name)
        if ndarray_to_bytes(array) != blob:
            raise PrivacyViolation(f"SecAgg+ masked array {index} carries bytes beyond its values", name)


def _fitres(content: RecordDict) -> None:
    parameters = content.get("fitres.parameters")
    if not isinstance(parameters, ArrayRecord) or len(parameters):
        raise PrivacyViolation(
            "SecAgg+ reply: 'fitres.parameters' must be an empty ArrayRecord (the update leaves masked only)", "fitres.parameters"
        )
    count = content.get("fitres.num_examples")
    if not isinstance(count, MetricRecord) or dict(count) != {"num_examples": PLAIN_WEIGHT}:
        raise PrivacyViolation(
            f"SecAgg+ reply: 'fitres.num_examples' must be {PLAIN_WEIGHT} on every device (the weight leaves masked only)",
            "fitres.num_examples",
        )
    metrics = content.get("fitres.metrics")
    if not isinstance(metrics, ConfigRecord) or len(metrics):
        raise PrivacyViolation("SecAgg+ reply: 'fitres.metrics' must be empty (metrics leave masked only)", "fitres.metrics")
    status = content.get("fitres.status")
    if not isinstance(status, ConfigRecord) or dict(status) != {"code": 0, "message": ""}:
        raise PrivacyViolation("SecAgg+ reply: 'fitres.status' must be code 0 with an empty message", "fitres.status")


_REPLY_KEYS = {
    Stage.SETUP: {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS},
    Stage.UNMASK: {Key.NODE_ID_LIST, Key.SHARE_LIST},
}


def audit_secagg_reply(content: RecordDict, request: SecAggRequest) -> None:
    """Raise ``PrivacyViolation`` unless ``content`` is exactly what the stage of ``request`` lets a device send."""
    stage = request.stage
    if stage not in _REPLY_KEYS:
        raise PrivacyViolation("the server asked for an unknown SecAgg+ stage", RECORD_KEY_CONFIGS)
    allowed_records = {RECORD_KEY_CONFIGS, *(_FITRES if stage == Stage.COLLECT_MASKED_VECTORS else ())}
    extra = sorted(set(content.keys()) - allowed_records)
    if extra:
        raise PrivacyViolation(f"SecAgg+ {stage} reply carries a record outside the protocol", extra[0])
    configs = content.get(RECORD_KEY_CONFIGS)
    if not isinstance(configs, ConfigRecord) or set(configs) != _REPLY_KEYS[stage]:
        raise PrivacyViolation(f"SecAgg+ {stage} reply must carry exactly {sorted(_REPLY_KEYS[stage])}", RECORD_KEY_CONFIGS)
    if stage == Stage.SETUP:
        _public_key(Key.PUBLIC_KEY_1, configs[Key.PUBLIC_KEY_1])
        _public_key(Key.PUBLIC_KEY_2, configs[Key.PUBLIC_KEY_2])
    elif stage == Stage.SHARE_KEYS:
        neighbours = {int(k) for k in request.configs if k.isdigit()}
        destinations = _ints(Key.DESTINATION_LIST, configs[Key.DESTINATION_LIST])
        if len(set(destinations)) != len(destinations) or not set(destinations) <= neighbours:
            raise PrivacyViolation(
                "SecAgg+ shares addressed to devices that are not this device's neighbours", Key.DESTINATION_LIST
            )
        _secrets(Key.CIPHERTEXT_LIST, configs[Key.CIPHERTEXT_LIST], len(destinations))
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        _masked_vectors(configs[Key.MASKED_PARAMETERS], request.arrays)
        _fitres(content)
    else:
        active = _ints(Key.ACTIVE_NODE_ID_LIST, request.configs.get(Key.ACTIVE_NODE_ID_LIST, []))
        dead = _ints(Key.DEAD_NODE_ID_LIST, request.configs.get(Key.DEAD_NODE_ID_LIST, []))
        if _ints(Key.NODE_ID_LIST, configs[Key.NODE_ID_LIST]) != active + dead:
            raise PrivacyViolation("SecAgg+ unmask shares for devices the server did not list", Key.NODE_ID_LIST)
        shares = _secrets(Key.SHARE_LIST, configs[Key.SHARE_LIST], len(active) + len(dead), uniform=False)
        # seed shares of the survivors, then key shares of the dropped devices: each kind of one length
        _secrets(Key.SHARE_LIST, shares[: len(active)], len(active))
        _secrets(Key.SHARE_LIST, shares[len(active) :], len(dead))
