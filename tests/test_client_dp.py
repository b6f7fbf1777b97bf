"""Local DP-SGD in the ClientApp: the accountant persists in the device's context.state across rounds, epsilon is
reported each round (equal to Opacus' own accountant fed the same steps), and a device whose budget is spent
refuses to train with an error reply that names only the exception type.

Fast: no Ray. The real ClientApp (privacy audit mod included) is called with one Context for 3 rounds, as a
SuperNode calls it, on the tiny synthesized corpus.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from opacus.accountants import RDPAccountant

from client.client_app import app
from client.train import ACCOUNTANT_KEY, load_accountant
from shared.config import RunConfig
from shared.models.checkpoint import build_model
from tests.conftest import TINY_RUN, TinyWorkdir, needs_espeak

pytestmark = needs_espeak

SIGMA, RATE, STEPS, DELTA = 1.0, 0.5, 2, 1e-5  # TINY_RUN: train.local-steps = 2


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory, tiny_workdir: TinyWorkdir) -> dict[str, object]:
    flat = {
        **RunConfig().to_flat(),
        **TINY_RUN,
        "workdir": str(tmp_path_factory.mktemp("client-dp")),
        "dp.enabled": True,
        "dp.noise-multiplier": SIGMA,
        "dp.sample-rate": RATE,
        "dp.delta": DELTA,
        "dp.epsilon-budget": 1e9,
    }
    tiny_workdir(Path(str(flat["workdir"])), flat)
    return flat


def train_message(global_state: ArrayRecord, server_round: int) -> Message:
    """A train message as the server's strategy sends it."""
    metadata = Metadata(
        run_id=1,
        message_id=f"m-{server_round}",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict({"arrays": global_state, "config": ConfigRecord({"server-round": server_round})})
    return Message(metadata=metadata, content=content)


def device(flat: dict[str, object]) -> Context:
    return Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config=dict(flat)
    )


def global_model(flat: dict[str, object]) -> ArrayRecord:
    return ArrayRecord(build_model(RunConfig.from_flat(flat).model).state_dict())


def opacus_epsilon(steps: int) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=SIGMA, sample_rate=RATE)
    return accountant.get_epsilon(delta=DELTA)


def test_epsilon_accumulates_across_rounds_in_the_device_state(flat: dict[str, object]) -> None:
    context = device(flat)
    arrays = global_model(flat)
    epsilons = []
    for server_round in (1, 2, 3):
        reply = app(train_message(arrays, server_round), context)
        assert not reply.has_error(), reply.error.reason
        metrics = reply.content["metrics"]
        # Only what the DP guarantee covers or what is public: no noiseless train-loss, no counts of the data.
        assert set(metrics) == {"epsilon", "local-steps", "num-examples"}
        assert metrics["num-examples"] == 1 and metrics["local-steps"] == STEPS
        epsilons.append(float(metrics["epsilon"]))
        assert epsilons[-1] == pytest.approx(opacus_epsilon(server_round * STEPS), rel=1e-9)
        # The ledger lives in the device's persistent state, as a ConfigRecord, one run of (sigma, q, steps).
        assert isinstance(context.state[ACCOUNTANT_KEY], ConfigRecord)
        assert load_accountant(context.state).history == ((SIGMA, RATE, server_round * STEPS),)
        arrays = reply.content["arrays"]  # the next round starts from this device's update
    assert epsilons[0] < epsilons[1] < epsilons[2]


def test_spent_budget_refuses_training_with_an_error(flat: dict[str, object], caplog: pytest.LogCaptureFixture) -> None:
    budget = (opacus_epsilon(2 * STEPS) + opacus_epsilon(3 * STEPS)) / 2  # room for 2 rounds, not for 3
    small = {**flat, "dp.epsilon-budget": budget}
    context = device(small)
    arrays = global_model(small)
    for server_round in (1, 2):
        reply = app(train_message(arrays, server_round), context)
        assert not reply.has_error(), reply.error.reason
        assert float(reply.content["metrics"]["epsilon"]) <= budget
    with caplog.at_level(logging.WARNING):
        refused = app(train_message(arrays, 3), context)
    assert refused.has_error() and not refused.has_content()
    # What the server sees: the exception type, nothing of the device's data.
    assert "raised PrivacyBudgetExhausted" in refused.error.reason
    assert "epsilon" not in refused.error.reason
    # The device's own log says why, with its epsilon and budget.
    said = [r.getMessage() for r in caplog.records if r.name == "chorus.client"]
    assert any(
        "privacy budget exhausted" in line and f"{budget:.4g}" in line and f"{opacus_epsilon(2 * STEPS):.4g}" in line
        for line in said
    ), said
    # Refused before training: nothing charged.
    assert load_accountant(context.state).history == ((SIGMA, RATE, 2 * STEPS),)


def test_without_dp_the_reply_is_unchanged_and_no_ledger_is_kept(flat: dict[str, object]) -> None:
    plain = {**flat, "dp.enabled": False}
    context = device(plain)
    reply = app(train_message(global_model(plain), 1), context)
    assert not reply.has_error(), reply.error.reason
    assert set(reply.content["metrics"]) == {"train-loss", "local-steps", "num-examples", "compute-cost", "skipped-utterances"}
    assert ACCOUNTANT_KEY not in context.state


@pytest.mark.parametrize("dp", [True, False])
def test_trainable_biases_norms_changes_only_biases_and_normalization_parameters(flat: dict[str, object], dp: bool) -> None:
    from torch import nn

    from client.train import trainable_parameters

    chosen = {**flat, "dp.enabled": dp, "train.trainable": "biases-norms"}
    arrays = global_model(chosen)
    reply = app(train_message(arrays, 1), device(chosen))
    assert not reply.has_error(), reply.error.reason
    before, after = arrays.to_torch_state_dict(), reply.content["arrays"].to_torch_state_dict()
    model = build_model(RunConfig.from_flat(chosen).model)
    trained = {id(p) for p in trainable_parameters(model, "biases-norms")}
    names = {name for name, p in model.named_parameters() if id(p) in trained}
    norms = {f"{m}.{p}" for m, layer in model.named_modules() if isinstance(layer, nn.LayerNorm) for p in ("weight", "bias")}
    assert names == {n for n in before if n.endswith(".bias")} | norms
    assert sum(p.numel() for p in model.parameters() if id(p) in trained) < 0.05 * sum(p.numel() for p in model.parameters())
    moved = {name for name in before if not (before[name] == after[name]).all()}
    assert moved and moved <= names, f"frozen parameters changed: {sorted(moved - names)[:5]}"
