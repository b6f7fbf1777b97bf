"""On-device personalization keeps a fine-tuned model only where a check on the device's own set-aside training
utterances says it helps, and the local optimizer is the one the run config names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.data import device_data
from client.train import check_personalization, personalize
from shared.config import ConfigError, RunConfig
from shared.models.checkpoint import build_model
from shared.training import score
from tests.conftest import TINY_RUN, TinyWorkdir, needs_espeak

pytestmark = needs_espeak


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory, tiny_workdir: TinyWorkdir) -> dict[str, object]:
    flat = {**RunConfig().to_flat(), **TINY_RUN, "workdir": str(tmp_path_factory.mktemp("personalize"))}
    tiny_workdir(Path(str(flat["workdir"])), flat)
    return flat


def test_the_check_scores_both_models_on_training_utterances_set_aside(flat: dict[str, object]) -> None:
    cfg = RunConfig.from_flat(flat)
    data = device_data(cfg, 0)
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    check = check_personalization(cfg, state, data, partition_id=0, check_every=2)

    # The received model, scored on its own on every other training utterance, gives the check's counts.
    model = build_model(cfg.model)
    model.load_state_dict(state)
    with torch.inference_mode():
        expected, _ = score(model.eval(), data.train[::2], features=data.features, tokenizer=data.tokenizer)
    assert check.received == expected and check.received.utterances == len(data.train[::2]) > 0
    assert check.personal.words == check.received.words
    assert check.keep == (check.personal.errors < check.received.errors)


def test_a_device_keeps_the_received_model_when_personalizing_does_not_help(flat: dict[str, object]) -> None:
    # SGD at a rate of 1e-12 changes no decoded word: equal errors, and a tie keeps the received model.
    cfg = RunConfig.from_flat({**flat, "train.optimizer": "sgd", "train.lr": 1e-12})
    data = device_data(cfg, 1)
    state = build_model(cfg.model).state_dict()
    kept, check = personalize(cfg, state, data, partition_id=1)
    assert not check.keep and check.personal == check.received
    assert kept is state


def test_a_device_with_one_training_utterance_is_refused_by_name(flat: dict[str, object]) -> None:
    cfg = RunConfig.from_flat(flat)
    data = device_data(cfg, 0)
    one = type(data)(train=data.train[:1], eval=data.eval, features=data.features, tokenizer=data.tokenizer)
    with pytest.raises(ValueError, match="at least 2 training utterances, the device has 1"):
        check_personalization(cfg, build_model(cfg.model).state_dict(), one, partition_id=0)


def test_the_local_optimizer_is_checked_by_name() -> None:
    with pytest.raises(ConfigError, match=r"train.optimizer='adam' is not supported; choose adamw, sgd"):
        RunConfig.from_flat({"train.optimizer": "adam"})
    with pytest.raises(ConfigError, match="train.lr must be > 0, got 0.0"):
        RunConfig.from_flat({"train.lr": 0.0})
