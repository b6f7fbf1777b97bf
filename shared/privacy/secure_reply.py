"""What a train reply carries under SecAgg+ (``strategy.secure-aggregation``): all of it inside the masked vector.

Flower's ``secaggplus_mod`` masks a device's update and its weight, but the legacy ``FitRes`` it reads them from
also leaves in plain: ``num_examples`` and the metrics. Per device, those would tell the server how much it
trained (in a targeted round a weight of 0 names the devices outside the targeted cohorts), its training loss, and
ARW's scalars. So under SecAgg+ the plain part of every device's reply is the same (``num_examples`` 1, no
metrics; :data:`PLAIN_WEIGHT`), and the rest rides in the masked vector:

* **the weight** is SecAgg+'s own masked weight factor: the utterance count; 0 for a device outside a targeted
  round's cohorts; the ARL weight mass under population ARW; 1 for DP-SGD (:func:`secure_weight`);
* **each metric the server asks for** (:func:`train_metrics`) is a *slot*: a (1,) array named
  ``metric.<key>`` that the server appends, zero, to the instruction's arrays and the device fills in. SecAgg+
  unmasks the weighted mean ``sum_d w_d v_d / sum_d w_d`` of every array. For a metric, v_d is its value, so
  the slot holds the weighted mean Flower's strategies report for plain replies (train loss, epsilon...); for a
  *sum* (ARW's ``ScoreSums``, :data:`SUMMED_METRICS`) v_d = value / (divisor x w_d), and the server multiplies the
  slot by the divisor again (:func:`slot_metric`): (sum over devices) / (summed weight), whose ratios (the mean
  score, the score-weighted loss) are exactly ARW's.

SecAgg+ clips each weighted value to +-``secagg.clipping-range``, so a slot's v_d x w_d / ``max-weight`` must stay
inside it: a sum of up to ``sum_bound`` x its divisor (800 x 1,000 for the score x loss, a sum over utterances of
their summed token losses), a mean of up to ``clipping-range`` x ``max-weight`` / w_d. A value beyond it fails the
device's reply (:func:`slot_value`) instead of entering the sum clipped.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.config import RunConfig
from shared.fairness import protocol as p

__all__ = ["METRIC_SLOT", "PLAIN_WEIGHT", "SUMMED_METRICS", "secure_weight", "slot_metric", "slot_value", "train_metrics"]

METRIC_SLOT = "metric."  # an instruction's arrays: "metric.<key>", shape (1,), one per metric asked for
PLAIN_WEIGHT = 1  # the num_examples of every SecAgg+ reply, in plain: the same for every device
# ARW's ScoreSums (sums over a device's utterance-steps; the other metrics are means), each with a public divisor
# that keeps a device's sum inside the quantizer's range while its step (3.8e-4 x divisor) stays far below it.
SUMMED_METRICS = dict(zip(p.ARW_METRICS[:3], (10.0, 10.0, 1000.0), strict=True))


def train_metrics(cfg: RunConfig) -> tuple[str, ...]:
    """The train metrics a device of run ``cfg`` reports (``client/train.py``, ``client/fairness.py``), which the
    server asks for in slots: DP replies carry only what the guarantee covers."""
    if cfg.dp.enabled:
        return ("epsilon", "local-steps")
    keys = ("train-loss", "local-steps", "compute-cost", "skipped-utterances")
    return keys + tuple(SUMMED_METRICS) if cfg.fairness.enabled and cfg.fairness.arw else keys


def secure_weight(metrics: Mapping[str, float], cfg: RunConfig) -> float:
    """A device's masked weight: its ARL weight mass under population ARW (what the server weighs a plain
    reply by then), else ``num-examples`` (0: it did not train)."""
    f = cfg.fairness
    key = p.ARW_WEIGHT if f.enabled and f.arw and f.arw_normalization == "population" else "num-examples"
    if key not in metrics:
        raise p.ProtocolError(f"the train reply has no {key!r} to weigh the masked update by")
    weight = float(metrics[key])
    if not 0.0 <= weight <= cfg.secagg.max_weight:
        raise ValueError(
            f"the SecAgg+ weight {key}={weight:g} lies outside [0, secagg.max-weight={cfg.secagg.max_weight:g}]: "
            "the masked sum would overflow"
        )
    return weight


def slot_value(metrics: Mapping[str, float], key: str, weight: float, cfg: RunConfig) -> float:
    """What a device writes into the slot of metric ``key`` (see the module docstring); ValueError when SecAgg+
    would clip it."""
    if key not in metrics:
        raise p.ProtocolError(f"the server asked for the train metric {key!r}, which this device does not report")
    value = float(metrics[key])
    if weight == 0:
        return 0.0  # a device that did not train: its slots weigh nothing
    slot = value / (SUMMED_METRICS[key] * weight) if key in SUMMED_METRICS else value
    if abs(slot * weight / cfg.secagg.max_weight) > cfg.secagg.clipping_range:
        raise ValueError(
            f"train metric {key}={value:g} at weight {weight:g} lies beyond the SecAgg+ range "
            f"(secagg.clipping-range x secagg.max-weight): the masked sum would clip it"
        )
    return slot


def slot_metric(key: str, mean: float) -> float:
    """The server's reading of the unmasked slot of metric ``key``: the weighted mean, or for a sum, the sum over
    devices divided by the summed weight."""
    return mean * SUMMED_METRICS.get(key, 1.0)
