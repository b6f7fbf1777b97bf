"""Federated fine-tuning of the two-talker model: devices holding two-talker sessions fine-tune it through the real
ClientApp (``client.multitalker.mt_app``), Flower's FedAvg and the server's exchange, and only allowlisted
content leaves them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_to_proto

from client.multitalker import MODEL_KEY, SESSIONS_DIR_KEY, MultitalkerRecipe, model_arrays, mt_app
from shared.data.mix import load_sessions, mix_sessions
from shared.data.synth import synthesize
from shared.models.checkpoint import SHIPPED_DIR, load_checkpoint
from shared.models.separator_transducer import SeparatorConfig, SeparatorTransducer
from shared.multitalker import (
    decode_sessions,
    load_multitalker,
    make_session_batches,
    save_multitalker,
    score_sessions,
    session_features,
)
from shared.privacy.audit import ALLOWED_METRICS, audit_reply
from simulations.federated_multitalker import MultitalkerFederation, federate
from simulations.harness import server_identity
from tests.conftest import leaks, needs_espeak

pytestmark = needs_espeak

DEVICES, ROUNDS = 2, 2
RECIPE = MultitalkerRecipe(local_steps=2, lr=1e-3, heldout=1)
TRAIN_METRICS = {"num-examples", "train-loss", "local-steps"}
EVAL_METRICS = {"word-errors", "words", "num-examples", "wer"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A two-talker model made from the shipped base, and one folder of 4 two-talker sessions per device."""
    root = tmp_path_factory.mktemp("multitalker-federated")
    corpus = synthesize(root / "corpus", speakers=3, utterances=4, seed=5, workers=1, progress=False)
    devices = [mix_sessions(corpus, root / f"device{i}", sessions=4, seed=i, turns=(2, 2), workers=1) for i in range(DEVICES)]
    base = load_checkpoint(SHIPPED_DIR / "dense-6.pt")
    assert base.frontend is not None
    torch.manual_seed(0)
    model = SeparatorTransducer.from_transducer(base.build(), SeparatorConfig(channels=2, layers=1))
    return save_multitalker(root / "sts.pt", model, base.model_config, "sts", frontend=base.frontend), devices


@pytest.fixture(scope="module")
def federation(setup: tuple[Path, list[Path]]) -> MultitalkerFederation:
    init, devices = setup
    return federate(init, devices, RECIPE, rounds=ROUNDS)


def test_devices_fine_tune_the_global_model_and_the_server_pools_their_held_out_wer(
    setup: tuple[Path, list[Path]], federation: MultitalkerFederation
) -> None:
    init, devices = setup
    print(federation.rounds)
    assert [r["round"] for r in federation.rounds] == list(range(ROUNDS + 1))
    assert all(r["replies"] == DEVICES and r["failed"] == r["rejected"] == 0 and r["aggregated"] for r in federation.rounds[1:])
    before, _, frontend, _ = load_multitalker(init)
    start, end = model_arrays(before), model_arrays(federation.model)
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
    assert federation.rounds[-1]["train_loss"] < federation.rounds[1]["train_loss"]  # the devices' own loss falls
    # the server's pooled WER is that of the final global model on the union of the devices' held-out sessions
    heldout = [load_sessions(d)[-RECIPE.heldout :] for d in devices]
    sessions = [s for held in heldout for s in held]
    features = session_features(sessions, frontend.cmvn)
    batches = make_session_batches(
        sessions, features, frontend.tokenizer, "sts", max_frames=RECIPE.max_frames, shuffle=False, seed=0
    )
    local = score_sessions(sessions, decode_sessions(federation.model, batches), frontend.tokenizer, "sts")["all"]
    last = federation.rounds[-1]
    assert last["words"] == local["words"] == sum(len(t.text.split()) for s in sessions for t in s.turns)
    assert last["wer"] == pytest.approx(local["wer"], abs=1e-4)
    assert all(r["words"] == local["words"] and r["wer"] is not None for r in federation.rounds)


def test_every_reply_passed_the_audit_and_carries_no_session_content(
    setup: tuple[Path, list[Path]], federation: MultitalkerFederation
) -> None:
    _, devices = setup
    sessions = [s for d in devices for s in load_sessions(d)]
    sensitive = sorted(
        {s.id for s in sessions} | {sp for s in sessions for sp in s.speakers} | {t.text for s in sessions for t in s.turns}
    )
    kinds = [sent.metadata.message_type for sent, _ in federation.exchanges]
    assert kinds == ["evaluate"] * DEVICES + (["train"] * DEVICES + ["evaluate"] * DEVICES) * ROUNDS
    for sent, reply in federation.exchanges:
        assert not reply.has_error()
        audit_reply(reply.content, sent.content)  # raises PrivacyViolation on anything off the allowlist
        metrics = reply.content["metrics"]
        names = [*reply.content.keys(), *metrics.keys()]
        if sent.metadata.message_type == "train":
            assert set(reply.content) == {"arrays", "metrics"} and set(metrics) == TRAIN_METRICS
            arrays, expected = reply.content["arrays"], sent.content["arrays"]
            assert {k: (a.dtype, tuple(a.shape)) for k, a in arrays.items()} == {
                k: (a.dtype, tuple(a.shape)) for k, a in expected.items()
            }
            assert metrics["num-examples"] == 4 - RECIPE.heldout and metrics["local-steps"] == RECIPE.local_steps
            names += list(arrays.keys())
        else:
            assert set(reply.content) == {"metrics"} and set(metrics) == EVAL_METRICS
        assert set(metrics) <= ALLOWED_METRICS
        wire = message_to_proto(reply).SerializeToString()
        assert not leaks(wire, names, sensitive), leaks(wire, names, sensitive)


def test_a_device_without_its_sessions_fails_naming_the_directory_only_in_its_log(
    setup: tuple[Path, list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    init, _ = setup
    model, _, _, _ = load_multitalker(init)
    missing = tmp_path / "no-such-sessions"
    content = RecordDict(
        {"arrays": ArrayRecord(model_arrays(model)), "config": ConfigRecord({**RECIPE.to_config(), "server-round": 1})}
    )
    with server_identity():
        msg = Message(content, 1, "train")
    context = Context(
        run_id=1, node_id=1, node_config={SESSIONS_DIR_KEY: str(missing), MODEL_KEY: str(init)}, state=RecordDict(), run_config={}
    )
    with caplog.at_level(logging.ERROR, logger="chorus.privacy"):
        reply = mt_app(msg, context)
    assert reply.has_error() and "raised MultitalkerDeviceError" in reply.error.reason
    assert str(missing) not in reply.error.reason  # the server learns only the exception type
    assert f"sessions directory {missing} does not exist" in caplog.text  # the device's log names it


def test_simulate_multitalker_command_fine_tunes_and_writes_the_global_model(
    setup: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    init, devices = setup
    common = ["simulate-multitalker", "--checkpoint", str(init), "--workdir", str(tmp_path), "--local-steps", "2"]
    missing = CliRunner().invoke(app, [*common, str(devices[0]), str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere" in missing.output and len(missing.output.strip().splitlines()) == 1
    too_few = CliRunner().invoke(app, [*common, "--heldout", "4", *map(str, devices)])
    assert too_few.exit_code == 2 and str(devices[0]) in too_few.output
    assert not (tmp_path / "runs").exists(), "nothing runs before the inputs are checked"

    done = CliRunner().invoke(app, [*common, "--rounds", "1", "--json", *map(str, devices)])
    assert done.exit_code == 0, done.output
    result = json.loads(done.output)
    assert [r["round"] for r in result["rounds"]] == [0, 1] and result["rounds"][1]["replies"] == DEVICES
    assert result["rounds"][1]["words"] == result["rounds"][0]["words"] > 0
    trained, kind, _, _ = load_multitalker(result["model"])
    start = model_arrays(load_multitalker(init)[0])
    assert kind == "sts" and any(not torch.equal(start[k], v) for k, v in model_arrays(trained).items())
    assert json.loads((tmp_path / "runs" / "multitalker-federation" / "federation.json").read_text()) == result
