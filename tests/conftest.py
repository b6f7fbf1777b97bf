"""Shared fixtures: locations of the real corpora beside the checkout, a tiny run config and its prepared corpus
(synthesized once per session), the server's task identity, a federation of scripted devices; and the helpers
several test modules use (a tiny transducer, the privacy scan, processes run and cleaned up by marker)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.task_identity import TaskIdentity

import client.client_app as client_app
from shared import config
from shared.config import RunConfig
from shared.data.corpora import read_speakers_tsv
from shared.data.dataset import Batch
from shared.models.transducer import Transducer, TransducerConfig
from shared.models.transformer import CausalTransformerEncoder, TransformerConfig
from simulations.harness import InProcessGrid

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# One intra-op thread in every process the tests start (the `chorus` runs, Flower's SuperLink and SuperNodes,
# Ray's workers, the xdist workers: all inherit this environment), as in the tests' own process
# (_one_torch_thread). Two xdist workers already fill the 2 cores; a second OpenMP thread per process only spins
# against the other worker's. An OMP_NUM_THREADS set by whoever runs the tests wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Longest file first. `make test` runs the files on two xdist workers, each file whole on one (`--dist loadfile`),
# handed out in collection order (`--no-loadscope-reorder` in pyproject.toml; xdist's default order is by number
# of tests, which sends the one-test end-to-end files out last, where a 2-minute file leaves the other worker
# idle for its whole length). So the end-to-end files start first and the many short ones fill in behind them.
# Seconds per file in a full run (`--durations`): only an order, a file not listed counts as 0, and a stale figure
# costs balance, never a result.
FILE_SECONDS = {
    "test_eval_federation.py": 151,
    "test_eval_fairness.py": 105,
    "test_resume.py": 82,
    "test_deployment.py": 77,
    "test_recognizer.py": 70,
    "test_bench_federation.py": 61,
    "test_bench_compute.py": 73,
    "test_failures.py": 57,
    "test_bench_robustness.py": 55,
    "test_verification.py": 53,
    "test_secagg.py": 52,
    "test_privacy_invariant.py": 49,
    "test_eval_privacy.py": 43,
    "test_multitalker.py": 33,
    "test_fairness_federated.py": 30,
    "test_train.py": 13,
    "test_multitalker_federated.py": 13,
    "test_central_dp.py": 11,
    "test_speaker_embedding.py": 8,
    "test_synth.py": 6,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort on a per-file key: each file's tests stay together and in their order.
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))


def real_corpus(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real corpus {path} is absent (it ships only beside the developers' checkout)")
    return path


needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (sudo apt-get install espeak-ng)"
)


def with_run_config(context: Context, run_config: dict[str, bool | int | float | str]) -> Context:
    """The device's context with the run's config added. run_simulation's Python API gives devices no run config
    (`flwr run` would); a copy, since Flower refuses a device context whose run_config changed (and turns the
    reply into an error)."""
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config={**context.run_config, **run_config},
    )


# A federation small enough for CI: shared/config.py's TINY_RUN (2 public and 2 held-out speakers, a 2-layer
# model) with 4 devices.
TINY_RUN = {
    **config.TINY_RUN,
    "strategy.min-train-nodes": 4,
    "strategy.min-evaluate-nodes": 4,
    "strategy.min-available-nodes": 4,
}


TinyWorkdir = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory: pytest.TempPathFactory) -> TinyWorkdir:
    """``tiny_workdir(path, flat=TINY_RUN) -> path``: ``path`` made a workdir in which ``flat``'s corpus and
    artifacts are already prepared, so that ``prepare`` finds them cached.

    Each distinct corpus, split and front end is synthesized and prepared once per session (per pytest worker);
    every workdir links that corpus (tests only read it) and gets its own copy of the artifacts (small, and runs
    may add to them).
    """
    from shared.data.prepare import artifact_dir, corpus_dir, prepare

    templates: dict[str, Path] = {}

    def make(path: Path, flat: Mapping[str, bool | int | float | str] = TINY_RUN) -> Path:
        probe = RunConfig.from_flat({**flat, "workdir": "/prepared"})
        fairness = probe.fairness
        key = (
            f"{corpus_dir(probe).name}/{artifact_dir(probe).name}/{probe.model.vocab_size}/"
            f"{fairness.enabled and (fairness.embedder, fairness.embedder_steps, probe.train.seed)}"
        )
        if key not in templates:
            template = tmp_path_factory.mktemp("prepared")
            prepare(RunConfig.from_flat({**flat, "workdir": str(template)}), progress=False)
            templates[key] = template
        template = templates[key]
        corpus = corpus_dir(RunConfig.from_flat({**flat, "workdir": str(template)}))
        linked = path / "data" / corpus.name
        if probe.corpus == "synth" and not linked.exists():  # another corpus is named by its own path
            linked.parent.mkdir(parents=True, exist_ok=True)
            linked.symlink_to(corpus, target_is_directory=True)
        shutil.copytree(template / "artifacts", path / "artifacts", dirs_exist_ok=True)
        return path

    return make


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # Tests run many small ops: one thread is faster than two fighting over a 2-core CI machine.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Play the server: outside a Flower process nobody sets the task identity every new instruction records."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class ScriptedGrid(InProcessGrid):
    """The harness's Grid over scripted devices: training adds a fixed pseudo-random step to the global model
    (seeded by round and node), so a run is exactly reproducible; evaluation reports fixed counts. ``failing``
    devices reply with an error, ``silent`` ones never reply; ``crash_at`` raises in that round, as a killed
    server would."""

    def __init__(
        self, nodes: int = 4, *, failing: Iterable[int] = (), silent: Iterable[int] = (), crash_at: int | None = None
    ) -> None:
        super().__init__(self._device, nodes, {})
        self.failing, self.silent, self.crash_at = set(failing), set(silent), crash_at

    def answers(self, msg: Message) -> bool:
        if int(msg.content["config"]["server-round"]) == self.crash_at:
            raise KeyboardInterrupt(f"server killed in round {self.crash_at}")
        return msg.metadata.dst_node_id not in self.silent

    def _device(self, msg: Message, context: Context) -> Message:
        node, server_round = context.node_id, int(msg.content["config"]["server-round"])
        if node in self.failing:
            return Message(Error(code=0, reason="scripted device fault"), reply_to=msg)
        if msg.metadata.message_type == "train":
            step = torch.Generator().manual_seed(1000 * server_round + node)
            state = {
                k: v + 0.01 * torch.randn(v.shape, generator=step) for k, v in msg.content["arrays"].to_torch_state_dict().items()
            }
            return Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord(state),
                        "metrics": MetricRecord({"train-loss": 1.0 / server_round, "num-examples": 2 + node}),
                    }
                ),
                reply_to=msg,
            )
        return Message(
            RecordDict({"metrics": MetricRecord({"word-errors": node, "words": 10, "num-examples": 3, "wer": node / 10})}),
            reply_to=msg,
        )


# -- helpers shared by test modules ---------------------------------------------------------------------------

TINY_ENCODER = TransformerConfig(input_dim=16, d_model=32, num_heads=2, ffn_dim=64, num_layers=1, left_context=8, dropout=0.0)


def tiny_transducer(seed: int = 0) -> Transducer:
    torch.manual_seed(seed)
    return Transducer(CausalTransformerEncoder(TINY_ENCODER), TransducerConfig(vocab_size=5, pred_dim=16, joint_dim=16))


def tiny_batches(count: int, seed: int = 1) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        feats = torch.randn(2, 48, TINY_ENCODER.input_dim, generator=generator)
        targets = torch.randint(0, 5, (2, 3), generator=generator)
        batches.append(
            Batch(
                feats=feats,
                feat_lens=torch.tensor([48, 40]),
                targets=targets,
                target_lens=torch.tensor([3, 2]),
                ids=[f"u{i}a", f"u{i}b"],
            )
        )
    return batches


def sensitive_strings(cfg: RunConfig) -> list[str]:
    """Everything a device holds that must never reach the server, as strings."""
    from shared.data.prepare import prepare

    prepared = prepare(cfg, progress=False)
    utterances = prepared.corpus.utterances
    attributes = read_speakers_tsv(prepared.corpus.root)
    assert utterances and attributes, "the scan needs transcripts and speakers.tsv attributes to look for"
    values = {u.text for u in utterances} | {u.id for u in utterances} | {u.speaker for u in utterances}
    values |= set(attributes) | {v for row in attributes.values() for v in row.values()}
    return sorted(v for v in values if v)


def leaks(wire: bytes, names: list[str], sensitive: list[str]) -> list[str]:
    """Sensitive strings found in a serialized reply or among its record names and keys.

    Long strings (transcripts, ids, accents) are searched for in all the bytes, model weights included; short
    ones ("53", "m1", "adult") would match float bytes by chance, so only the names and keys are checked for
    them (equal, or containing one of 4+ characters).
    """
    found = [s for s in sensitive if len(s) >= 6 and s.encode() in wire]
    found += [s for s in sensitive for n in names if n == s or (len(s) >= 4 and s in n)]
    return found


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line or environment holds ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.name == str(os.getpid()) or (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
                continue
            if marker.encode() in (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def wait_gone(marker: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def kill_marked(marker: str) -> None:
    for pid in processes_with(marker):  # only what this test started: it carries the test's marker
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_marked(code: str, *, name: str, env: dict[str, str], timeout: float = 840) -> tuple[int, str, list[int]]:
    """Run ``python -c code`` in a session of its own, every process it starts marked by an environment
    variable; returns (exit code, output, processes still alive 30 s after it ended — then killed)."""
    marker = f"chorus-{name}-test-{uuid.uuid4().hex}"
    env = {**os.environ, **env, "CHORUS_TEST_MARKER": marker, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = wait_gone(marker, 30)
        kill_marked(marker)
    return proc.returncode, output, left


SECAGG_DEVICES = 4


class SecAggGrid(InProcessGrid):
    """The harness's Grid over our real ClientApp, on the wire, for ``SECAGG_DEVICES`` devices (SecAgg+ and
    central-DP tests). A device in ``drop_at`` (node id -> SecAgg+ stage) stops answering from that stage on, as
    a device that lost its link."""

    def __init__(self, cfg: RunConfig, drop_at: dict[int, str] | None = None) -> None:
        super().__init__(client_app.app, SECAGG_DEVICES, cfg.to_flat(), on_wire=True)
        self.drop_at = drop_at or {}
        self.dropped: set[int] = set()

    @staticmethod
    def stage(msg: Message) -> str:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        return str(configs[Key.STAGE]) if configs is not None else "plain"

    def answers(self, msg: Message) -> bool:
        node = msg.metadata.dst_node_id
        if self.drop_at.get(node) == self.stage(msg):
            self.dropped.add(node)
        return node not in self.dropped

    @property
    def replies(self) -> list[tuple[str, Message]]:
        """(stage, reply) as each left its device."""
        return [(self.stage(msg), reply) for msg, reply in self.exchanges]
