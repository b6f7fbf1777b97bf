"""`chorus bench federation`: what Flower's simulation engine costs at scale, against the same work done bare.

One real federated run (``simulations.simulate.simulate``: a SuperLink in simulation mode, ``flwr run``, the
ServerApp, Ray) with N simulated speaker-devices of which K are sampled per round, then the same computation
again in this process without Flower. Reported in one JSON object (stdout; progress goes to stderr):

    round_seconds        wall time of each round as the server records it (``metrics.jsonl`` "seconds", timed by
                         ``server/workflow.py``: from sampling K devices through their training, aggregation, K
                         devices' local evaluation, to the server's held-out scoring)
    peak_rss_bytes       the largest sum of resident set sizes over the whole process tree of the run, sampled
                         every ``SAMPLE_INTERVAL`` s from /proc: this process and all its descendants — the
                         SuperLink, ``flwr run``, the SuperExec, ServerApp and simulation processes (also linked
                         by Flower's ``--parent-pid`` argument, in case one is re-parented), Ray's GCS, raylet,
                         dashboard and worker processes. RSS counts pages shared between processes (libtorch,
                         Ray's object store) once per process, so it over-states what the tree costs the machine;
                         ``peak_pss_gib`` (proportional set size: shared pages split between their users, read
                         every ``PSS_EVERY`` samples as it costs more to read) is the tighter figure.
    pure_round_seconds   the same work as each round, without Flower (the definition below)
    overhead_ratio       sum(round_seconds) / sum(pure_round_seconds); per round in ``overhead_ratio_per_round``.
                         Round 1 carries the simulation's cold start (Ray brings up its actors and they import
                         the ClientApp while the first devices wait), so ``overhead_ratio_steady`` gives the same
                         ratio over rounds 2..R (null with one round)
    train_overhead_ratio the training phase alone: the server's ``train_seconds`` (sampling, the K devices'
                         fine-tuning through Flower, aggregation) against the baseline's step 1 below
    timing_reliable      whether the machine's mean 1-minute load average stayed within ``parallel`` +
                         ``RELIABLE_EXTRA_LOAD`` during both sides. When it did not, other work competed with the
                         measured processes, unevenly over time, and the wall-time ratio mostly measures that:
                         ``targets.overhead_ratio_met`` is then null, not a verdict
    cpu_overhead_ratio   the same ratio for CPU time (user + system) of the whole process tree — every Flower and
                         Ray process against the baseline's workers and this process — which contention inflates
                         far less than wall time. A Flower round's CPU time runs from the first /proc sample that
                         sees the previous round's ``metrics.jsonl`` line to the first that sees its own (it also
                         holds the previous round's checkpoint write); ``cpu_overhead_ratio_steady`` for rounds 2..R

The pure baseline ("pure local-training time for the same work"), per round r:
    1. K devices fine-tune: for K partition ids drawn with a seeded RNG (the federated run draws its own K with
       Flower's unseeded ``random.sample``; every device has the same number of utterances, so the work is the
       same up to utterance lengths), ``client.train.fine_tune`` on ``client.data.device_data`` with the run's
       config, ``server_round=r`` and the partition id (so the same seeds, batches and steps as a device);
    2. K other devices evaluate locally (``client.evaluate.evaluate_local``), as the round's evaluate phase;
    3. the server's held-out scoring (``shared.training.score`` on the same utterances).
The baseline runs in a child process that leads a session of its own, as the Flower side's SuperLink does
(Linux's autogroup scheduler shares the CPU between sessions). Phases 1 and 2 run on a pool of P worker
processes (P = the devices Ray trains at once: one CPU per device, P CPUs given to Ray), one torch thread each
as in the ClientApp, each task pulled by the next free worker as Ray's actor pool does; phase 3 runs in the
baseline process itself with torch's default threads, as in the ServerApp. The workers are started and have
imported torch and the client code before the clock starts, and load the corpus index, tokenizer and features
on their first task; Ray's actors are started before round 1 too, but import the ClientApp (torch included)
with their first message: that is part of round 1's cold start. Weights: every task starts from the federated
run's final global model (training cost does not depend on the weights; greedy-decoding cost does, slightly),
loaded once per worker. Nothing is serialized or sent: what the baseline leaves out — messages and model
copies through the SuperLink and Ray, sampling, aggregation, checkpoints, process scheduling — is exactly what
the ratio measures.

The federated run keeps at most ``strategy.max-in-flight`` = 2 P messages waiting for devices
(``simulations.simulate.sampling_overrides``; ``--set strategy.max-in-flight=0`` measures Flower's own
send-everything-at-once, whose cost in the simulation engine grows with N x K: ``server/workflow.py``).

On a loaded machine both sides slow down together only roughly: run it on an otherwise idle machine for
numbers to quote. ``--quick`` is CI-sized; its numbers only prove the pipeline.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.config import TINY_RUN, RunConfig
from shared.console import progress_to_stderr
from shared.processes import SAMPLE_INTERVAL, TreeMemorySampler, sigterm_as_interrupt, tree_cpu_seconds
from simulations.simulate import available_cores, sampling_overrides, simulate

__all__ = ["FederationPlan", "QUICK", "FULL", "run_federation_bench", "main"]

TARGET_PEAK_RSS_GIB = 6.0
TARGET_OVERHEAD_RATIO = 1.25
RELIABLE_EXTRA_LOAD = 1.5  # mean 1-min load average above `parallel` beyond which wall times are not compared


@dataclass(frozen=True)
class FederationPlan:
    clients: int  # N simulated devices (one federated speaker each)
    per_round: int  # K devices sampled per round (training; K others, or the same, for evaluation)
    rounds: int
    overrides: Mapping[str, Any] = field(default_factory=dict)  # run-config overrides (corpus, model, training)
    parallel: int | None = None  # devices training at once; None = the cores available
    seed: int = 0  # draws the baseline's devices

    def with_changes(
        self,
        *,
        clients: int | None = None,
        per_round: int | None = None,
        rounds: int | None = None,
        parallel: int | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> FederationPlan:
        """A copy with the given fields changed (None keeps them); ``per_round`` is capped at ``clients`` when
        only ``clients`` changes. Raises ValueError / ConfigError on settings that cannot run."""
        clients = self.clients if clients is None else clients
        if per_round is None:
            per_round = min(self.per_round, clients)
        plan = replace(
            self,
            clients=clients,
            per_round=per_round,
            rounds=self.rounds if rounds is None else rounds,
            parallel=self.parallel if parallel is None else parallel,
            overrides={**self.overrides, **(overrides or {})},
        )
        plan.config(Path("."), run_id="check")  # validates
        return plan

    def config(self, workdir: Path, *, run_id: str) -> RunConfig:
        """The federated run's config: overrides, sampling of K of N, enough synthetic speakers."""
        if self.clients < 2 or self.rounds < 1 or (self.parallel is not None and self.parallel < 1):
            raise ValueError(f"need clients >= 2, rounds >= 1, parallel >= 1; got {self.clients}, {self.rounds}, {self.parallel}")
        sampling = sampling_overrides(self.clients, self.per_round, parallel=self.parallel or available_cores())
        # An explicit override wins over the plan's sampling, e.g. strategy.max-in-flight=0 to measure Flower's
        # own send-everything-at-once.
        flat = {
            **RunConfig().to_flat(),
            **sampling,
            **self.overrides,
            "num-server-rounds": self.rounds,
            "workdir": str(workdir),
            "run-id": run_id,
            "resume": False,
        }
        cfg = RunConfig.from_flat(flat)
        if cfg.corpus == "synth":
            needed = self.clients + cfg.split.public_speakers + cfg.split.heldout_speakers
            if cfg.synth.speakers < needed:
                cfg = RunConfig.from_flat({**flat, "synth.speakers": needed})
        return cfg


# CI-sized: the TINY_RUN corpus and model (shared/config.py) with 24 speakers, 20 devices, 5 per round.
QUICK = FederationPlan(
    clients=20,
    per_round=5,
    rounds=2,
    overrides={**TINY_RUN, "synth.speakers": 24},
)
# The target: 1,000 speaker-devices, 50 per round, the default model and training. 1,040 synthetic
# speakers (1,000 federated + 24 public + 16 held-out) with 8 utterances each keep synthesis to one pass of
# ~8,300 utterances; a device then fine-tunes on 6 and evaluates on 2.
FULL = FederationPlan(clients=1000, per_round=50, rounds=2, overrides={"synth.speakers": 1040, "synth.utterances": 8})


# -- the pure baseline: the same device and server work, without Flower -----------------------------------

_worker_state: dict[str, Any] = {}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # as the ClientApp: one core per device
    # imported before the clock, as a Ray actor has them loaded
    for module in ("client.data", "client.evaluate", "client.train"):
        importlib.import_module(module)


def _ping(_: int) -> int:
    time.sleep(0.2)  # long enough that every worker takes one
    return os.getpid()


def _global_state(checkpoint: str) -> Any:
    if _worker_state.get("path") != checkpoint:
        from shared.models.checkpoint import load_checkpoint

        _worker_state.update(path=checkpoint, state=load_checkpoint(Path(checkpoint)).state_dict)
    return _worker_state["state"]


def _device_task(args: tuple[str, dict[str, Any], str, int, int]) -> float:
    """One device's train or evaluate phase, as the ClientApp runs it minus Flower; returns its seconds."""
    from client.data import device_data
    from client.evaluate import evaluate_local
    from client.train import fine_tune

    kind, flat, checkpoint, partition_id, server_round = args
    start = time.perf_counter()
    cfg = RunConfig.from_flat(flat)
    state = _global_state(checkpoint)
    data = device_data(cfg, partition_id)
    if kind == "train":
        extra: dict[str, Any] = {}
        if getattr(getattr(cfg, "dp", None), "enabled", False):  # DP-SGD keeps its ledger in the device's state
            from flwr.app import RecordDict

            extra["device_state"] = RecordDict()
        fine_tune(cfg, state, data, server_round=server_round, partition_id=partition_id, **extra)
    else:
        evaluate_local(cfg, state, data)
    return time.perf_counter() - start


def _pure_rounds(cfg: RunConfig, plan: FederationPlan, parallel: int, checkpoint: Path, log: Any) -> list[dict[str, float]]:
    """Wall time of each round's work without Flower (the module docstring's definition)."""
    import torch

    from server.workflow import _heldout_utterances  # the very utterances the server scores each round
    from shared.data.dataset import FeatureCache
    from shared.data.prepare import open_prepared
    from shared.models.checkpoint import load_checkpoint
    from shared.training import score

    prepared = open_prepared(cfg)
    heldout = _heldout_utterances(prepared, cfg.eval.heldout_utterances)
    features = FeatureCache(prepared.corpus, prepared.cmvn)
    for utt in heldout:  # the server featurized them for round 0, before round 1's clock
        features.features(utt)
    model = load_checkpoint(checkpoint).build()
    flat = cfg.to_flat()
    rng = random.Random(plan.seed)
    rounds: list[dict[str, float]] = []
    with multiprocessing.get_context("spawn").Pool(parallel, initializer=_worker_init) as pool:
        started = {pid for pid in pool.map(_ping, range(4 * parallel), chunksize=1)}
        log(f"baseline: {len(started)} worker processes ready")
        for server_round in range(1, plan.rounds + 1):
            train_ids = rng.sample(range(plan.clients), plan.per_round)
            eval_ids = rng.sample(range(plan.clients), plan.per_round)
            c0, t0 = tree_cpu_seconds(), time.perf_counter()
            device_train = list(
                pool.imap_unordered(
                    _device_task, [("train", flat, str(checkpoint), p, server_round) for p in train_ids], chunksize=1
                )
            )
            t1 = time.perf_counter()
            device_eval = list(
                pool.imap_unordered(
                    _device_task, [("eval", flat, str(checkpoint), p, server_round) for p in eval_ids], chunksize=1
                )
            )
            t2 = time.perf_counter()
            with torch.no_grad():
                score(model, heldout, features=features, tokenizer=prepared.tokenizer, beam=cfg.eval.beam)
            t3, c3 = time.perf_counter(), tree_cpu_seconds()
            rounds.append(
                {
                    "seconds": t3 - t0,
                    "cpu_s": c3 - c0,
                    "train_s": t1 - t0,
                    "device_eval_s": t2 - t1,
                    "server_eval_s": t3 - t2,
                    "device_train_task_s_mean": statistics.fmean(device_train),
                    "device_eval_task_s_mean": statistics.fmean(device_eval),
                }
            )
            log(
                f"baseline round {server_round}/{plan.rounds}: {t3 - t0:.1f} s (train {t1 - t0:.1f}, device eval "
                f"{t2 - t1:.1f}, server eval {t3 - t2:.1f})"
            )
    return rounds


def _pure_rounds_in_own_session(
    cfg: RunConfig, plan: FederationPlan, parallel: int, checkpoint: Path, log: Any
) -> list[dict[str, float]]:
    """:func:`_pure_rounds` in a child process that leads a session of its own, as the Flower side's
    SuperLink does (``simulations.simulate``). Linux's autogroup scheduler (``kernel.sched_autogroup_enabled``)
    shares the CPU between sessions, not processes: run inside this process's session, the baseline would
    share one slice with whatever else that session runs (a test session, a shell's other jobs) while the
    Flower tree had a slice of its own. (On the busy shared machine this alone did not make the two sides'
    CPU shares equal: see the README's figures.)"""
    import subprocess
    import tempfile

    from shared.processes import stop_tree
    from simulations.simulate import REPO_ROOT

    with tempfile.TemporaryDirectory(prefix="chorus-baseline-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(
            json.dumps(
                {
                    "flat": cfg.to_flat(),
                    "clients": plan.clients,
                    "per_round": plan.per_round,
                    "rounds": plan.rounds,
                    "seed": plan.seed,
                    "parallel": parallel,
                    "checkpoint": str(checkpoint),
                }
            )
        )
        code = "import sys; from simulations.bench_federation import _baseline_child; _baseline_child(*sys.argv[1:])"
        proc = subprocess.Popen([sys.executable, "-c", code, str(spec), str(result)], cwd=REPO_ROOT, start_new_session=True)
        try:
            status = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: the child is in its own session, out of reach of Ctrl-C
                stop_tree(proc, timeout=10.0)
        if status != 0 or not result.exists():
            raise RuntimeError(f"the baseline process exited with {status} (its errors are above)")
        return json.loads(result.read_text())


def _baseline_child(spec_path: str, result_path: str) -> None:
    """Entry point of :func:`_pure_rounds_in_own_session`'s child: read the spec, write the rounds."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = RunConfig.from_flat(spec["flat"])
    plan = FederationPlan(clients=spec["clients"], per_round=spec["per_round"], rounds=spec["rounds"], seed=spec["seed"])
    rounds = _pure_rounds(
        cfg, plan, spec["parallel"], Path(spec["checkpoint"]), lambda msg: print(msg, file=sys.stderr, flush=True)
    )
    Path(result_path).write_text(json.dumps(rounds))


# -- the simulation engine's message poll --------------------------------------------------------------------

_RUN_ID, _TASK_ID, _SERVER_NODE_ID = 1, 7, 1  # the ServerApp's identity in a simulation (SuperLink node id 1)


def in_memory_federation(nodes: int) -> tuple[Any, Any, list[int]]:
    """(LinkState, Grid, node ids): ``nodes`` simulated devices registered in an in-memory LinkState holding
    one run, and the ServerApp's ``InMemoryGrid`` on it, as ``flwr-simulation`` sets them up
    (``flwr/simulation/run_simulation.py:_main_loop``, ``flwr/server/superlink/fleet/vce/vce_api.py``).
    Messages created while it is used need Flower's ``TaskIdentity`` set: see :func:`engine_poll_sweep_ms`."""
    import secrets

    from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord, Task
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    assert isinstance(state, InMemoryLinkState)  # FLWR_IN_MEMORY_DB_NAME; its tables are filled in below
    node_ids = []
    for _ in range(nodes):
        node_id = state.create_node(
            NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), heartbeat_interval=HEARTBEAT_INTERVAL_INF
        )
        state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        node_ids.append(node_id)
    run = Run.create_empty(run_id=_RUN_ID)
    run.primary_task_id, run.federation_id = _TASK_ID, NOOP_FEDERATION_ID
    state.run_ids[_RUN_ID] = RunRecord(run=run)
    state.task_store[_TASK_ID] = Task(task_id=_TASK_ID, run_id=_RUN_ID)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, node_ids


def engine_poll_sweep_ms(nodes: int, waiting: int, *, sweeps: int = 3) -> float:
    """CPU milliseconds of one sweep of the simulation engine's poll for work with ``waiting`` messages in the
    LinkState: ``vce_api.add_messages_to_queue`` asks the LinkState for each of the ``nodes`` nodes' next
    message in turn, then waits 0.1 s, for as long as the simulation runs, in the ServerApp's process."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = _RUN_ID, _SERVER_NODE_ID, _TASK_ID
    try:
        state, grid, node_ids = in_memory_federation(nodes)
        grid.push_messages(
            [
                Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node, message_type="train")
                for node in node_ids[:waiting]
            ]
        )
        start = time.thread_time()
        for _ in range(sweeps):
            for node_id in node_ids:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    msg.metadata.delivered_at = ""  # still waiting for its device, as during a phase
        return (time.thread_time() - start) * 1000 / sweeps
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# -- the benchmark ------------------------------------------------------------------------------------------


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


def run_federation_bench(
    plan: FederationPlan, *, workdir: Path, bench_id: str, progress: bool = False, log: Any = None
) -> dict[str, Any]:
    """Run the federation and its baseline; write ``runs/<bench-id>/bench.json`` and ``report.md``; return the
    summary."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.monotonic()
    parallel = plan.parallel or available_cores()
    root = workdir / "runs" / bench_id
    cfg = plan.config(workdir, run_id=f"{bench_id}/federation")
    root.mkdir(parents=True, exist_ok=True)

    from shared.data.prepare import prepare

    t = time.monotonic()
    log(f"preparing the corpus ({cfg.synth.speakers} speakers x {cfg.synth.utterances} utterances if synthetic)")
    prepare(cfg, progress=progress)
    prepare_s = time.monotonic() - t

    # What Flower's simulation engine spends per 0.1 s looking for work, with the whole sample waiting at once
    # and with our window (measured here, in this process, before the clocks start).
    window = cfg.strategy.max_in_flight
    poll: dict[str, Any] = {"nodes": plan.clients}
    for name, waiting in (("all_at_once", plan.per_round), ("windowed", window)):
        if 0 < waiting <= plan.per_round and (name == "all_at_once" or waiting < plan.per_round):
            poll[name] = {"waiting": waiting, "sweep_cpu_ms": round(engine_poll_sweep_ms(plan.clients, waiting), 2)}
    log(f"Flower's simulation engine, one poll sweep over {plan.clients} nodes: {poll}")

    log(f"federation: {plan.clients} devices, {plan.per_round} per round, {plan.rounds} rounds, {parallel} training at once")
    t = time.monotonic()
    metrics_file = cfg.workdir_path / "runs" / cfg.run_id / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)  # a previous run's lines would be taken for this one's rounds
    # The SuperLink and all it starts descend from this process.
    with TreeMemorySampler(watch=metrics_file) as federation_memory:
        run_dir = simulate(cfg, num_supernodes=plan.clients, progress=progress, parallel=parallel)
    simulation_s = time.monotonic() - t
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [r for r in records if r["round"] >= 1]
    round_seconds = [float(r["seconds"]) for r in rounds]

    log("baseline: the same work without Flower")
    with TreeMemorySampler() as baseline_memory:
        pure = _pure_rounds_in_own_session(cfg, plan, parallel, run_dir / "checkpoints" / "global.pt", log)
    pure_seconds = [p["seconds"] for p in pure]
    # CPU time of the whole tree in each round: from the first sample that saw round r-1's metrics line to the
    # first that saw round r's (line r holds round r - 1; line 1 is round 0, the initial evaluation).
    marks = federation_memory.cpu_at_lines
    round_cpu = [marks[r + 1] - marks[r] if r in marks and r + 1 in marks else None for r in range(1, len(rounds) + 1)]
    pure_cpu = [p["cpu_s"] for p in pure]
    known_cpu = [c for c in round_cpu if c is not None]
    cpu_ok = bool(round_cpu) and len(known_cpu) == len(round_cpu)
    cpu_ratio = sum(known_cpu) / sum(pure_cpu) if cpu_ok and sum(pure_cpu) > 0 else None
    cpu_steady = sum(known_cpu[1:]) / sum(pure_cpu[1:]) if cpu_ok and len(known_cpu) > 1 and sum(pure_cpu[1:]) > 0 else None

    ratio = sum(round_seconds) / sum(pure_seconds) if round_seconds and sum(pure_seconds) > 0 else None
    # The training phase alone ("pure local-training time"): from sampling to the aggregated model, against
    # the baseline's K devices' fine-tuning.
    train_phase = [float(r["train_seconds"]) for r in rounds if "train_seconds" in r]
    pure_train = [p["train_s"] for p in pure]
    train_ratio = sum(train_phase) / sum(pure_train) if len(train_phase) == len(pure_train) and sum(pure_train) > 0 else None
    train_steady = (
        sum(train_phase[1:]) / sum(pure_train[1:])
        if train_ratio is not None and len(train_phase) > 1 and sum(pure_train[1:]) > 0
        else None
    )
    loads = (statistics.fmean(federation_memory.loadavg), statistics.fmean(baseline_memory.loadavg))
    # Both sides load the machine with about `parallel` busy processes; much more means other work competed
    # with them, unevenly over time, and the wall-time ratio says more about that than about Flower.
    reliable = max(loads) <= parallel + RELIABLE_EXTRA_LOAD
    steady = sum(round_seconds[1:]) / sum(pure_seconds[1:]) if len(round_seconds) > 1 and sum(pure_seconds[1:]) > 0 else None
    summary: dict[str, Any] = {
        "clients": plan.clients,
        "per_round": plan.per_round,
        "rounds": plan.rounds,
        "parallel": parallel,
        "rounds_completed": len(rounds),
        "round_seconds": round_seconds,
        "mean_round_seconds": statistics.fmean(round_seconds) if round_seconds else None,
        "pure_round_seconds": [round(s, 3) for s in pure_seconds],
        "pure_breakdown": [{k: round(v, 3) for k, v in p.items() if k != "seconds"} for p in pure],
        "overhead_ratio": None if ratio is None else round(ratio, 4),
        "overhead_ratio_steady": None if steady is None else round(steady, 4),
        "overhead_ratio_per_round": [round(f / p, 4) for f, p in zip(round_seconds, pure_seconds)],
        "train_phase_seconds": train_phase,
        "pure_train_phase_seconds": [round(t, 3) for t in pure_train],
        "train_overhead_ratio": None if train_ratio is None else round(train_ratio, 4),
        "train_overhead_ratio_steady": None if train_steady is None else round(train_steady, 4),
        "round_cpu_seconds": [None if c is None else round(c, 1) for c in round_cpu],
        "pure_round_cpu_seconds": [round(c, 1) for c in pure_cpu],
        "cpu_overhead_ratio": None if cpu_ratio is None else round(cpu_ratio, 4),
        "cpu_overhead_ratio_steady": None if cpu_steady is None else round(cpu_steady, 4),
        "timing_reliable": reliable,
        # the whole `flwr run` (start-up, round 0, every round), per process: where Flower's extra CPU goes
        "federation_cpu_seconds_by_process": federation_memory.cpu_seconds_by_process(),
        "peak_rss_bytes": federation_memory.peak_rss,
        "peak_rss_gib": _gib(federation_memory.peak_rss),
        "peak_pss_gib": _gib(federation_memory.peak_pss),
        "peak_processes": federation_memory.peak_processes,
        "peak_rss_gib_by_process": {k: _gib(v) for k, v in federation_memory.peak_rss_by_process.items()},
        "memory_samples": federation_memory.samples,
        # CPU the /proc sampler itself used (inside this process, so inside both sides' CPU figures)
        "sampler_cpu_seconds": round(federation_memory.own_cpu_seconds + baseline_memory.own_cpu_seconds, 1),
        "max_in_flight": cfg.strategy.max_in_flight,
        # CPU of one sweep of the engine's poll for work (every 0.1 s, in the ServerApp's process), K vs window
        "engine_poll_sweep": poll,
        "baseline_peak_rss_gib": _gib(baseline_memory.peak_rss),
        "baseline_peak_pss_gib": _gib(baseline_memory.peak_pss),
        "train_replies": [r.get("train_replies") for r in rounds],
        "train_failures": [r.get("train_failures") for r in rounds],
        "eval_replies": [r.get("eval_replies") for r in rounds],
        "targets": {
            "peak_rss_gib_below": TARGET_PEAK_RSS_GIB,
            "overhead_ratio_at_most": TARGET_OVERHEAD_RATIO,
            "peak_rss_met": federation_memory.peak_rss < TARGET_PEAK_RSS_GIB * 2**30,
            # null: not measurable here (the machine was busy with other work, see timing_reliable)
            "overhead_ratio_met": (None if not reliable else ratio is not None and ratio <= TARGET_OVERHEAD_RATIO),
            "at_target_scale": plan.clients >= 1000 and plan.per_round >= 50,
        },
        "prepare_s": round(prepare_s, 1),
        "simulation_s": round(simulation_s, 1),  # `flwr run` from start to exit: Ray start, round 0, report
        "duration_s": round(time.monotonic() - started, 1),
        "cores_available": available_cores(),
        # Load on the machine while each side ran (1-minute average; this run alone would be about `parallel`):
        "loadavg_federation": round(loads[0], 2),
        "loadavg_baseline": round(loads[1], 2),
        "settings": {
            "plan": {**asdict(plan), "overrides": dict(plan.overrides)},
            "model": cfg.model.name,
            "d_model": cfg.model.d_model,
            "num_layers": cfg.model.num_layers,
            "local_steps": cfg.train.local_steps,
            "synth_speakers": cfg.synth.speakers,
            "synth_utterances": cfg.synth.utterances,
            "heldout_utterances": cfg.eval.heldout_utterances,
            "sample_interval_s": SAMPLE_INTERVAL,
        },
        "run_dir": str(root),
        "simulation_dir": str(run_dir),
    }
    (root / "bench.json").write_text(json.dumps(summary, indent=1) + "\n")
    _report(root, summary)
    return summary


def _report(root: Path, s: dict[str, Any]) -> None:
    lines = [
        "# Federation benchmark",
        "",
        f"{s['clients']} simulated devices, {s['per_round']} per round, {s['rounds_completed']}/{s['rounds']} rounds, "
        f"{s['parallel']} training at once ({s['cores_available']} cores available; mean 1-min load average "
        f"{s['loadavg_federation']} during the federated run, {s['loadavg_baseline']} during the baseline). "
        f"Duration {s['duration_s']} s (corpus {s['prepare_s']} s, `flwr run` {s['simulation_s']} s). "
        f"Federated run: `{s['simulation_dir']}`.",
        "",
        "| round | Flower round (s) | same work without Flower (s) | ratio | baseline: train / device eval / server eval (s) |",
        "|---:|---:|---:|---:|---|",
    ]
    for i, (f, p) in enumerate(zip(s["round_seconds"], s["pure_round_seconds"]), start=1):
        b = s["pure_breakdown"][i - 1]
        lines.append(
            f"| {i} | {f:.1f} | {p:.1f} | {f / p:.3f} | {b['train_s']:.1f} / {b['device_eval_s']:.1f} / "
            f"{b['server_eval_s']:.1f} |"
        )
    t = s["targets"]
    verdict = {
        True: "met",
        False: "not met",
        None: "not measurable here: the machine was busy with other work "
        "(load above `parallel` + "
        f"{RELIABLE_EXTRA_LOAD}), see the CPU-time ratio",
    }[t["overhead_ratio_met"]]
    lines += [
        "",
        f"- overhead ratio (sum of round times / sum of baseline times): **{s['overhead_ratio']}** "
        f"(target <= {t['overhead_ratio_at_most']}: {verdict}); rounds 2..R only (after the simulation's cold "
        f"start): {s['overhead_ratio_steady']}",
        f"- training phase alone (sampling to aggregated model, vs the K devices' fine-tuning): "
        f"**{s['train_overhead_ratio']}** (rounds 2..R: {s['train_overhead_ratio_steady']}); per round "
        f"{s['train_phase_seconds']} s vs {s['pure_train_phase_seconds']} s",
        f"- CPU time of the whole process tree, Flower / baseline: **{s['cpu_overhead_ratio']}** (rounds 2..R: "
        f"{s['cpu_overhead_ratio_steady']}); per round {s['round_cpu_seconds']} s vs {s['pure_round_cpu_seconds']} s",
        f"- peak RSS of the whole process tree: **{s['peak_rss_gib']} GiB** (PSS {s['peak_pss_gib']} GiB; target "
        f"< {t['peak_rss_gib_below']} GiB: {'met' if t['peak_rss_met'] else 'not met'}), {s['peak_processes']} "
        f"processes at most, {s['memory_samples']} samples (the sampler used {s['sampler_cpu_seconds']} CPU s)",
        f"- messages waiting for devices at once (`strategy.max-in-flight`, 0: all): {s['max_in_flight']}",
        f"- at the issue's scale (1,000 devices, 50 per round): {'yes' if t['at_target_scale'] else 'no'}",
        "",
        "RSS by process at the peak (GiB):",
        "",
        "| process | RSS |",
        "|---|---:|",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in s["peak_rss_gib_by_process"].items()]
    lines += [
        "",
        "CPU seconds by process over the whole `flwr run` (start-up, round 0 and every round):",
        "",
        "| process | CPU s |",
        "|---|---:|",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in s["federation_cpu_seconds_by_process"].items()]
    lines += ["", "Definitions: `simulations/bench_federation.py` (module docstring).", ""]
    (root / "report.md").write_text("\n".join(lines))


def main(plan: FederationPlan, *, workdir: Path, bench_id: str, as_json: bool) -> None:
    with progress_to_stderr(), sigterm_as_interrupt():  # `kill` stops its simulations and baseline child too
        summary = run_federation_bench(plan, workdir=workdir, bench_id=bench_id, progress=sys.stderr.isatty())
    if as_json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print((Path(summary["run_dir"]) / "report.md").read_text())
    sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover - use `chorus bench federation`
    raise SystemExit("use: chorus bench federation [--quick] [--json]")
