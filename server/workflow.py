"""The coordinator's rounds: sample devices, aggregate with a built-in Flower strategy, evaluate, record.

The round loop calls the strategy's own ``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` /
``aggregate_evaluate`` (Flower's aggregation, not ours) and adds what ``Strategy.start`` lacks: a checkpoint
of the global model and the strategy's state after every round, resume after a crash (server/checkpoint.py),
per-round JSONL, a progress display, and the server-side evaluation on held-out speakers.

Who trains: the strategy's uniform sample, or with ``strategy.selection = "power-of-choice"`` the devices the
global model serves worst among candidates asked for their loss (server/selection.py).

Privacy options of the train phase (run config): ``strategy.secure-aggregation`` runs it through SecAgg+
(server/secagg.py: the server gets only the aggregate); ``strategy.central-dp`` wraps the strategy in Flower's
fixed-clipping DP wrapper (server- or device-side clipping, Gaussian noise on the aggregate).

Device failures: a device that replies with an error (its ClientApp raised) or does not reply within
``strategy.timeout`` (it dropped out) is logged with its node id and counted (``train_failures`` /
``eval_failures``). A reply the server refuses (server/exchange.py: outside the allowlist, non-finite, an
update norm or weight out of bounds) is logged and counted too (``rejected_updates`` / ``rejected_evaluations``)
and never aggregated. The round aggregates the valid updates when at least ``strategy.min-train-nodes`` sent
one. With fewer, the round keeps the previous global model (and strategy state) and records
``"aggregated": false``: a handful of devices is not a trustworthy update.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.checkpoint import load_round, rewind_metrics, save_round
from server.exchange import Exchange, exchange
from server.fairness import FairnessRounds, FairStrategy
from server.report import MetricsLog, write_report
from server.secagg import secure_train_round
from server.selection import PowerOfChoice
from shared.config import STRATEGIES, CentralDPConfig, RunConfig, StrategyConfig, TrainConfig
from shared.data.corpora import Utterance, read_speakers_tsv
from shared.data.dataset import FeatureCache
from shared.data.prepare import Prepared, prepare
from shared.metrics import ErrorCounts
from shared.models.checkpoint import Frontend, initial_model, load_state, save_checkpoint, sha256_of
from shared.privacy.dp import WIDE_ORDERS, AccountantState
from shared.privacy.secure_reply import train_metrics
from shared.records import metric_record, scalar
from shared.training import score

__all__ = ["TrainRound", "make_strategy", "run_federation", "stateful_strategy", "sum_error_counts", "train_round"]

log = logging.getLogger("chorus.server")


def sum_error_counts(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Evaluation aggregation: pool word-error counts (exact WER), not a weighted mean of device WERs."""
    metrics = [metric_record(r, "metrics") for r in records]
    errors = sum(int(scalar(m, "word-errors")) for m in metrics)
    words = sum(int(scalar(m, "words")) for m in metrics)
    examples = sum(int(scalar(m, weighted_by_key)) for m in metrics)
    return MetricRecord(
        {"word-errors": errors, "words": words, "num-examples": examples, "wer": errors / words if words else 0.0}
    )


def make_strategy(
    cfg: StrategyConfig, central_dp: CentralDPConfig | None = None, *, client_lr: float | None = None
) -> flwr_strategy.Strategy:
    """The run's Flower strategy; with ``strategy.central-dp`` wrapped in Flower's fixed-clipping DP wrapper.
    ``client_lr`` is the devices' learning rate (``train.lr``), q-FedAvg's Lipschitz estimate."""
    base = _base_strategy(cfg, TrainConfig().lr if client_lr is None else client_lr)
    if cfg.central_dp == "none":
        return base
    dp = central_dp or CentralDPConfig()
    wrapper = (
        flwr_strategy.DifferentialPrivacyServerSideFixedClipping
        if cfg.central_dp == "server"
        else flwr_strategy.DifferentialPrivacyClientSideFixedClipping
    )
    return wrapper(
        base, noise_multiplier=dp.noise_multiplier, clipping_norm=dp.clipping_norm, num_sampled_clients=dp.sampled_clients
    )


def stateful_strategy(strategy: flwr_strategy.Strategy) -> flwr_strategy.Strategy:
    """The strategy that holds the cross-round state (a DP wrapper keeps none; the strategy it wraps does)."""
    if isinstance(
        strategy,
        (flwr_strategy.DifferentialPrivacyServerSideFixedClipping, flwr_strategy.DifferentialPrivacyClientSideFixedClipping),
    ):
        return strategy.strategy
    return strategy


def _base_strategy(cfg: StrategyConfig, client_lr: float) -> flwr_strategy.Strategy:
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        evaluate_metrics_aggr_fn=sum_error_counts,
    )
    if cfg.name == "fedavg":
        return flwr_strategy.FedAvg(**common)
    if cfg.name == "fedavgm":
        return flwr_strategy.FedAvgM(**common, server_learning_rate=cfg.server_lr)
    if cfg.name == "fedadam":
        return flwr_strategy.FedAdam(**common, eta=cfg.server_lr)
    if cfg.name == "fedyogi":
        return flwr_strategy.FedYogi(**common, eta=cfg.server_lr)
    if cfg.name == "fedadagrad":
        return flwr_strategy.FedAdagrad(**common, eta=cfg.server_lr)
    if cfg.name == "fedmedian":
        return flwr_strategy.FedMedian(**common)
    if cfg.name == "fedtrimmedavg":
        return flwr_strategy.FedTrimmedAvg(**common, beta=cfg.trim_beta)
    if cfg.name == "krum":
        return flwr_strategy.Krum(**common, num_malicious_nodes=cfg.num_malicious)
    if cfg.name == "multikrum":
        return flwr_strategy.MultiKrum(
            **common, num_malicious_nodes=cfg.num_malicious, num_nodes_to_select=max(1, cfg.min_train_nodes - cfg.num_malicious)
        )
    if cfg.name == "bulyan":
        return flwr_strategy.Bulyan(**common, num_malicious_nodes=cfg.num_malicious)
    if cfg.name == "qfedavg":
        step = cfg.qffl_lr or client_lr
        return flwr_strategy.QFedAvg(**common, client_learning_rate=step, q=cfg.qffl_q, train_loss_key="train-loss")
    raise ValueError(f"strategy.name={cfg.name!r} is not supported; choose one of {', '.join(STRATEGIES)}")


def device_level_dp(
    central_dp: CentralDPConfig, population: int, earlier: list[dict[str, Any]], *, released: bool
) -> dict[str, float | None]:
    """The run's device-level (user-level) privacy after this round, for the round record.

    Opacus' RDP accountant for the subsampled Gaussian mechanism: one step per round that released a model, at
    ``central-dp.noise-multiplier`` (the noise std is that multiple of one device's clipped contribution) and sample
    rate ``sampled-clients / population``, the devices the server could sample from. Flower samples a fixed number
    without replacement; Poisson sampling at the same rate is the standard approximation. Earlier rounds come from
    their records, so a resumed run counts them. ``central_dp_epsilon`` is None without noise (no guarantee).
    """
    rate = min(1.0, central_dp.sampled_clients / max(1, population))
    if central_dp.noise_multiplier == 0.0:
        return {"central_dp_sample_rate": rate if released else None, "central_dp_epsilon": None}
    state = AccountantState()
    for record in earlier:
        if record.get("central_dp_sample_rate"):
            state = state.after(
                noise_multiplier=central_dp.noise_multiplier, sample_rate=record["central_dp_sample_rate"], steps=1
            )
    if released:
        state = state.after(noise_multiplier=central_dp.noise_multiplier, sample_rate=rate, steps=1)
    return {
        "central_dp_sample_rate": rate if released else None,
        "central_dp_epsilon": state.epsilon(central_dp.delta, orders=WIDE_ORDERS),
    }


def _heldout_utterances(prepared: Prepared, budget: int) -> list[Utterance]:
    """An even spread of utterances over the held-out speakers, so every speaker counts in each round."""
    by_speaker = prepared.corpus.by_speaker()
    per_speaker = max(1, budget // max(1, len(prepared.split.heldout)))
    return [u for s in prepared.split.heldout for u in by_speaker.get(s, [])[:per_speaker]]


def _metric(aggregated: MetricRecord | None, key: str) -> float | None:
    """One key of the strategy's aggregated reply metrics (weighted by num-examples), None where absent."""
    if aggregated is None or key not in aggregated:
        return None
    return float(scalar(aggregated, key))


def _breakdowns(
    prepared: Prepared, per_utt: dict[str, ErrorCounts], utterances: list[Utterance]
) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluation harness only: held-out WER grouped by the hidden attributes in speakers.tsv."""
    attributes = read_speakers_tsv(prepared.corpus.root)
    if not attributes:
        return {}
    speaker_of = {u.id: u.speaker for u in utterances}
    columns = [c for c in next(iter(attributes.values())) if c in ("accent", "gender", "age_group", "age", "channel_rate")]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for column in columns:
        groups: dict[str, tuple[ErrorCounts, set[str]]] = {}
        for uid, counts in per_utt.items():
            speaker = speaker_of[uid]
            value = attributes.get(speaker, {}).get(column, "?")
            total, speakers = groups.get(value, (ErrorCounts(0, 0, 0), set()))
            groups[value] = (total + counts, speakers | {speaker})
        out[column] = {v: {"wer": c.wer, "words": c.words, "speakers": len(s)} for v, (c, s) in groups.items() if c.words}
    return out


@dataclass(frozen=True)
class TrainRound:
    """One round's training: the new global arrays (None: the global model is kept), the strategy's aggregated
    metrics, the valid replies (none under SecAgg+, where the server sees only the sum), and how many devices
    answered (their update is in the aggregate), failed, or had their reply rejected."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    replies: list[Message]
    answered: int
    failed: int
    rejected: int

    def fields(self) -> dict[str, Any]:
        """The round's entry in an evaluation's report."""
        return {
            "replies": self.answered,
            "failed": self.failed,
            "rejected": self.rejected,
            "aggregated": self.arrays is not None,
            "train_loss": None if (loss := _metric(self.metrics, "train-loss")) is None else round(loss, 5),
        }


def train_round(
    grid: Grid,
    strategy: flwr_strategy.Strategy | FairStrategy | PowerOfChoice,
    server_round: int,
    arrays: ArrayRecord,
    limits: StrategyConfig,
    *,
    config: ConfigRecord | None = None,
    content: Mapping[str, ArrayRecord] | None = None,
    phase: str = "",
) -> TrainRound:
    """The plain train phase of every federation: the strategy's messages (``config`` their instruction,
    ``content`` records added to each), the server's one send/receive path (``limits``: timeout, in-flight window,
    reply validation), and the strategy's aggregation when at least ``limits.min_train_nodes`` valid updates came
    back; with fewer, the global model is kept."""
    messages = list(strategy.configure_train(server_round, arrays, config or ConfigRecord(), grid))
    for message in messages:
        for name, record in (content or {}).items():
            message.content[name] = record
    replies = exchange(grid, messages, phase=phase or f"round {server_round} train", strategy=limits)
    needed = limits.min_train_nodes if messages else 0  # no messages: fraction-train is 0
    if len(replies.ok) < needed:  # too few updates to trust: keep the global model and the strategy's state
        log.warning(
            "round %d: %d valid update(s), fewer than strategy.min-train-nodes=%d: the global model is kept",
            server_round,
            len(replies.ok),
            needed,
        )
        return TrainRound(None, None, replies.ok, len(replies.ok), replies.failed, replies.rejected)
    new_arrays, metrics = strategy.aggregate_train(server_round, replies.ok)
    return TrainRound(new_arrays, metrics, replies.ok, len(replies.ok), replies.failed, replies.rejected)


def _train_phase(
    grid: Grid,
    strategy: flwr_strategy.Strategy | FairStrategy | PowerOfChoice,
    cfg: RunConfig,
    server_round: int,
    arrays: ArrayRecord,
) -> TrainRound:
    """One round's training, plainly or with ``strategy.secure-aggregation`` through SecAgg+ (server/secagg.py),
    where a device counts as answered when its masked update is in the sum (the server sees no single reply)."""
    if not cfg.strategy.secure_aggregation:
        return train_round(grid, strategy, server_round, arrays, cfg.strategy)
    if isinstance(strategy, PowerOfChoice):  # shared/config.py refuses the pair; a guard for direct callers
        raise ValueError("Power-of-Choice selection needs each device's loss in plain, which SecAgg+ runs do not send")
    secure = secure_train_round(
        grid,
        strategy,
        server_round,
        arrays,
        cfg.secagg,
        timeout=cfg.strategy.timeout,
        min_contributors=cfg.strategy.min_train_nodes,
        metric_keys=train_metrics(cfg),
    )
    return TrainRound(secure.arrays, secure.metrics, [], secure.contributed, secure.failed, 0)


def same_run_config(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir`` holds a run of exactly ``cfg`` (its config.json), so an experiment may reuse it instead of
    training it again. The starting checkpoint is compared by content: the same shipped file reached from another
    checkout, under another absolute path, starts the same run."""
    try:
        stored = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    now = json.loads(json.dumps(cfg.to_flat()))
    key = "model.init-checkpoint"
    old, new = stored.get(key), now.get(key)
    if old != new and old and new:
        if not (Path(old).is_file() and Path(new).is_file() and sha256_of(old) == sha256_of(new)):
            return False
        stored[key] = new
    return bool(stored == now)


def run_federation(grid: Grid, cfg: RunConfig, *, resume: bool = False) -> Path:
    """Run ``cfg.num_server_rounds`` rounds (or finish them, with ``resume``); returns the run directory."""
    prepared = prepare(cfg)
    run_id = cfg.run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = cfg.workdir_path / "runs" / run_id
    ckpt_dir = run_dir / "checkpoints"
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    (run_dir / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_flat(), indent=1, sort_keys=True) + "\n")

    torch.manual_seed(cfg.train.seed)
    model = initial_model(cfg.model)  # always holds the global model (``arrays`` is its wire copy)
    strategy = make_strategy(cfg.strategy, cfg.central_dp, client_lr=cfg.train.lr)
    global_ckpt = ckpt_dir / "global.pt"
    frontend = Frontend(prepared.tokenizer, prepared.cmvn)  # round models carry it: `chorus eval wer` scores them as is
    first_round = 1
    if resume and global_ckpt.exists():
        # The checkpoint commits a round; metrics lines of later rounds (a kill after the line, before the
        # checkpoint) belong to a round that runs again, so they go.
        first_round = (
            load_round(global_ckpt, model, cfg.model, strategy_name=cfg.strategy.name, strategy=stateful_strategy(strategy)) + 1
        )
        rewind_metrics(metrics.path, before=first_round)
        log.info("resuming run %s after round %d", run_id, first_round - 1)
        print(f"resuming run {run_id} after round {first_round - 1}", flush=True)
    else:
        metrics.path.unlink(missing_ok=True)
        global_ckpt.unlink(missing_ok=True)  # an earlier run's under this id must never be resumed into this one
        save_checkpoint(ckpt_dir / "initial.pt", model, cfg.model, round=0)
        if cfg.eval.keep_round_models:
            save_checkpoint(ckpt_dir / "round-0.pt", model, cfg.model, frontend=frontend, round=0)

    heldout = _heldout_utterances(prepared, cfg.eval.heldout_utterances)
    features = FeatureCache(prepared.corpus, prepared.cmvn)
    arrays = ArrayRecord(model.state_dict())
    # Fairness without demographics (fairness.enabled): cohort discovery (and EWC's Fisher) before round 1, then
    # the strategy's round methods with the fairness additions (server/fairness.py).
    fairness = (
        FairnessRounds.start(grid, cfg, prepared=prepared, model=model, run_dir=run_dir, resume=resume)
        if cfg.fairness.enabled
        else None
    )
    fair = strategy if fairness is None else fairness.wrap(strategy)
    # strategy.selection: who trains each round (Power-of-Choice asks candidates for their loss first).
    selection = PowerOfChoice(fair, cfg.strategy, seed=cfg.train.seed) if cfg.strategy.selection == "power-of-choice" else None
    rounds = fair if selection is None else selection

    def evaluate_heldout() -> tuple[ErrorCounts, dict[str, ErrorCounts]]:
        return score(model, heldout, features=features, tokenizer=prepared.tokenizer, beam=cfg.eval.beam)

    def evaluate_devices(server_round: int) -> tuple[dict[str, Any], Exchange]:
        """The global model on the devices' own utterances: the record's device fields, and the exchange."""
        eval_msgs = list(rounds.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        evaluated = exchange(grid, eval_msgs, phase=f"round {server_round} evaluate", strategy=cfg.strategy)
        aggregated = rounds.aggregate_evaluate(server_round, evaluated.ok)
        return {
            "device_wer": None if aggregated is None else float(scalar(aggregated, "wer")),
            "device_words": None if aggregated is None else int(scalar(aggregated, "words")),
        }, evaluated

    if first_round == 1:  # the starting model, on the held-out speakers and on the devices' own utterances
        start = time.monotonic()
        device_fields, _ = evaluate_devices(0)
        counts, _ = evaluate_heldout()
        record: dict[str, Any] = {
            "round": 0,
            **device_fields,
            "heldout_wer": counts.wer,
            "heldout_words": counts.words,
            "seconds": round(time.monotonic() - start, 3),
            **({} if fairness is None else fairness.round_fields(0)),
        }
        metrics.append(record)
        print(f"round 0 (the starting model): device WER {record['device_wer']}, held-out WER {counts.wer:.4f}", flush=True)

    columns = [
        TextColumn("[bold]federated rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    per_utt: dict[str, ErrorCounts] = {}
    # `flwr run --stream` relays our stdout line by line: a live bar only on a terminal, a line per round always.
    with Progress(*columns, transient=False, disable=not sys.stdout.isatty()) as progress:
        task = progress.add_task("rounds", total=cfg.num_server_rounds, completed=first_round - 1, status="")
        for server_round in range(first_round, cfg.num_server_rounds + 1):
            start = time.monotonic()
            trained = _train_phase(grid, rounds, cfg, server_round, arrays)
            if trained.arrays is not None:
                load_state(model, trained.arrays.to_torch_state_dict(), source="aggregated global model")
                arrays = ArrayRecord(model.state_dict())  # in the model's dtypes (FedAdam & co. return float64)
            train_seconds = time.monotonic() - start  # sampling, devices' training, aggregation
            released = trained.arrays is not None  # a round that kept the old model released nothing
            central = (
                device_level_dp(cfg.central_dp, len(list(grid.get_node_ids())), metrics.records(), released=released)
                if cfg.strategy.central_dp != "none"
                else {}
            )
            device_fields, evaluated = evaluate_devices(server_round)
            counts, per_utt = evaluate_heldout()
            record = {
                "round": server_round,
                "aggregated": trained.arrays is not None,
                # DP replies carry no training loss (it lies outside the guarantee) but their epsilon spent
                "train_loss": _metric(trained.metrics, "train-loss"),
                "train_epsilon": _metric(trained.metrics, "epsilon"),
                "train_replies": trained.answered,
                "train_failures": trained.failed,
                "rejected_updates": trained.rejected,
                "eval_replies": len(evaluated.ok),
                "eval_failures": evaluated.failed,
                "rejected_evaluations": evaluated.rejected,
                **device_fields,
                "heldout_wer": counts.wer,
                "heldout_words": counts.words,
                "seconds": round(time.monotonic() - start, 3),
                "train_seconds": round(train_seconds, 3),
                **central,
                **({} if selection is None else selection.round_fields(server_round)),
                **({} if fairness is None else fairness.round_fields(server_round)),
            }
            metrics.append(record)  # first the line, then the checkpoint that commits the round (see rewind_metrics)
            save_round(
                global_ckpt,
                model,
                cfg.model,
                server_round=server_round,
                run_id=run_id,
                strategy_name=cfg.strategy.name,
                strategy=stateful_strategy(strategy),
            )
            if cfg.eval.keep_round_models:
                save_checkpoint(ckpt_dir / f"round-{server_round}.pt", model, cfg.model, frontend=frontend, round=server_round)
            if fairness is not None:
                fairness.save(run_dir)  # the federated adversary, beside the checkpoint
            progress.update(
                task, advance=1, status=f"loss {record['train_loss'] or float('nan'):.3f}  held-out WER {counts.wer:.3f}"
            )
            kept = "" if record["aggregated"] else " (too few: global model kept)"
            print(
                f"round {server_round}/{cfg.num_server_rounds}: train loss {record['train_loss']}, "
                f"devices {trained.answered} ok / {trained.failed} failed / {trained.rejected} rejected{kept}, "
                f"device WER {record['device_wer']}, "
                f"held-out WER {counts.wer:.4f} ({record['seconds']:.1f} s)"
                + (f", device-level epsilon {central['central_dp_epsilon']}" if central else ""),
                flush=True,
            )

    if not per_utt:  # resumed after the last round: evaluate once for the report
        _, per_utt = evaluate_heldout()
    report = write_report(
        run_dir,
        title=f"Chorus federated run {run_id}",
        config=cfg.to_flat(),
        records=metrics.records(),
        breakdowns=_breakdowns(prepared, per_utt, heldout),
    )
    if fairness is not None:
        fairness.finish(run_dir)  # fairness.json and the per-cohort section of report.md
    print(f"Report: {report}")
    return run_dir
