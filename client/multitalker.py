"""Federated fine-tuning of the two-talker model (``mt_app``) on devices whose data are two-talker sessions.

A device holds ``chorus data mix`` sessions (``shared/data/mix.py``: ``sessions.jsonl`` and ``audio/``) and the
multi-talker model file it transcribes with (``shared/multitalker.py``'s ``save_multitalker``: the architecture,
its kind, ``sts`` or ``mt-rnnt``, and its front end, tokenizer and CMVN). The server sends the global model's
float arrays and a :class:`MultitalkerRecipe` as ``mt.*`` config keys; the device loads the arrays into its
model, fine-tunes it with ``shared.multitalker.train_sessions`` on its own sessions (its references: the turns'
words framed by turn tokens, ``references``) and replies with the updated arrays, ``num-examples`` (its training
session count, FedAvg's weight), ``train-loss`` and ``local-steps``. Evaluation decodes the device's held-out
sessions (the last ``mt.heldout`` of its manifest, never trained on) and replies with the pooled counts the
recognizer's evaluation reports (``word-errors``, ``words``, ``num-examples``, ``wer``): the server's WER is
exact (sum of errors / sum of words). Nothing else leaves: no audio, features, transcripts, token ids, session
or speaker ids (the audit mod, ``shared/privacy/audit.py``, checks every reply).

Why a ClientApp of its own, as the verifier's (``client/verification.py``, whose pattern this follows): the
recognizer's handlers (``client/client_app.py``) are built around the run config and a single-talker corpus;
two-talker fine-tuning shares only the privacy audit. The device reads two ``node_config`` keys:
``sessions-dir`` (its sessions) and ``multitalker`` (the model file it holds; default: the shipped one).
``simulations/federated_multitalker.py`` runs the federation.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from shared.data.mix import MixError, Session, load_sessions
from shared.models.checkpoint import SHIPPED_DIR, CheckpointError, Frontend
from shared.models.separator_transducer import SeparatorTransducer
from shared.multitalker import (
    SHIPPED_MULTITALKER,
    decode_sessions,
    load_multitalker,
    make_session_batches,
    score_sessions,
    session_features,
    train_sessions,
)
from shared.privacy.audit import audit_mod
from shared.records import array_record, config_record, scalar

__all__ = ["MODEL_KEY", "SESSIONS_DIR_KEY", "MultitalkerDeviceError", "MultitalkerRecipe", "model_arrays", "mt_app"]

SESSIONS_DIR_KEY = "sessions-dir"  # node_config: the device's own two-talker sessions (a `chorus data mix` folder)
MODEL_KEY = "multitalker"  # node_config: the multi-talker model file the device holds (default: the shipped one)
_PREFIX = "mt."


class MultitalkerDeviceError(ValueError):
    """A device cannot fine-tune or evaluate as asked; the message names the file or directory (device log only)."""


@dataclass(frozen=True)
class MultitalkerRecipe:
    """What a device does with one message; the server sends it in the message's config as ``mt.*`` keys."""

    local_steps: int = 10
    lr: float = 1e-4  # AdamW peak, fresh each round: small, the global model is the starting point
    warmup: int = 0
    turn_penalty: float = 0.0  # the turn-token latency penalty of train_sessions
    max_frames: int = 4000  # padded feature frames per batch (B x T)
    heldout: int = 1  # the last sessions of the device's manifest: evaluated, never trained on
    seed: int = 0

    def __post_init__(self) -> None:
        if self.local_steps < 1 or self.max_frames < 1 or self.warmup < 0 or self.heldout < 0:
            raise MultitalkerDeviceError(
                f"need local_steps >= 1, max_frames >= 1, warmup >= 0 and heldout >= 0, got {self.local_steps}, "
                f"{self.max_frames}, {self.warmup}, {self.heldout}"
            )
        if not self.lr > 0 or not self.turn_penalty >= 0:
            raise MultitalkerDeviceError(f"need lr > 0 and turn_penalty >= 0, got {self.lr} and {self.turn_penalty}")

    def to_config(self) -> dict[str, int | float]:
        """``mt.local-steps`` = ..., one key per field: a message's ConfigRecord."""
        return {_PREFIX + f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> MultitalkerRecipe:
        """The recipe of a message's config (its ``mt.*`` keys; others, e.g. ``server-round``, are not ours)."""
        names = {_PREFIX + f.name.replace("_", "-"): f.name for f in fields(cls)}
        unknown = sorted(k for k in config if k.startswith(_PREFIX) and k not in names)
        if unknown:
            raise MultitalkerDeviceError(f"unknown multi-talker config key(s) {unknown}; known: {sorted(names)}")
        defaults, values = cls(), {}
        for key, name in names.items():
            if key not in config:
                continue
            value, kind = config[key], type(getattr(defaults, name))
            if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
                raise MultitalkerDeviceError(f"config {key}={value!r} is not of type {kind.__name__}")
            values[name] = kind(value)
        return cls(**values)


def model_arrays(model: SeparatorTransducer) -> dict[str, Tensor]:
    """The floating-point state: what travels (integer buffers, if a model has any, stay home)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


# -- the device ------------------------------------------------------------------------------------------------

mt_app = ClientApp(mods=[audit_mod])  # the audit wraps every handler: mods are bound when handlers register


@functools.lru_cache(maxsize=4)
def _device_model(path: Path) -> tuple[SeparatorTransducer, str, Frontend]:
    try:
        model, kind, frontend, _ = load_multitalker(path)
    except CheckpointError as err:
        raise MultitalkerDeviceError(str(err)) from err
    return model, kind, frontend


@functools.lru_cache(maxsize=128)  # a simulation process plays many devices over many rounds
def _device_sessions(folder: Path, model_path: Path) -> tuple[tuple[Session, ...], Mapping[str, np.ndarray]]:
    """The device's sessions and their normalized features (the model's CMVN)."""
    if not folder.is_dir():
        raise MultitalkerDeviceError(
            f"the device's sessions directory {folder} does not exist (node_config {SESSIONS_DIR_KEY!r})"
        )
    try:
        sessions = tuple(load_sessions(folder))
    except MixError as err:
        raise MultitalkerDeviceError(str(err)) from err
    return sessions, session_features(sessions, _device_model(model_path)[2].cmvn)


@dataclass(frozen=True)
class _Round:
    """One message's work: the global model loaded into the device's architecture, and the device's data."""

    recipe: MultitalkerRecipe
    model: SeparatorTransducer
    kind: str
    frontend: Frontend
    train: tuple[Session, ...]
    heldout: tuple[Session, ...]
    features: Mapping[str, np.ndarray]
    sent: dict[str, Tensor]
    seed: int


def _setup(msg: Message, context: Context) -> _Round:
    torch.set_num_threads(1)  # one core per simulated device, as the recognizer's app
    config = config_record(msg.content, "config")
    recipe = MultitalkerRecipe.from_config(config)
    if SESSIONS_DIR_KEY not in context.node_config:
        raise MultitalkerDeviceError(f"node_config names no {SESSIONS_DIR_KEY!r}: the device's own sessions")
    model_path = Path(str(context.node_config.get(MODEL_KEY, SHIPPED_DIR / SHIPPED_MULTITALKER))).resolve()
    folder = Path(str(context.node_config[SESSIONS_DIR_KEY])).resolve()
    base, kind, frontend = _device_model(model_path)
    sessions, features = _device_sessions(folder, model_path)
    if len(sessions) <= recipe.heldout:
        raise MultitalkerDeviceError(
            f"{folder} holds {len(sessions)} sessions: none left to train on after mt.heldout={recipe.heldout}"
        )
    sent = array_record(msg.content, "arrays").to_torch_state_dict()
    model = copy.deepcopy(base)
    expected = model_arrays(model)
    if set(sent) != set(expected) or any(sent[k].shape != v.shape for k, v in expected.items()):
        raise MultitalkerDeviceError(f"the server's arrays do not fit the device's model {model_path}")
    model.load_state_dict(sent, strict=False)
    device = int(context.node_config.get("partition-id", context.node_id % 1_000_003))
    cut = len(sessions) - recipe.heldout
    return _Round(
        recipe=recipe,
        model=model,
        kind=kind,
        frontend=frontend,
        train=sessions[:cut],
        heldout=sessions[cut:],
        features=features,
        sent=sent,
        seed=(recipe.seed * 1_000_003 + device) * 1009 + int(scalar(config, "server-round")),
    )


@mt_app.train()
def mt_train(msg: Message, context: Context) -> Message:
    """One round of fine-tuning on this device's training sessions; see the module docstring."""
    work = _setup(msg, context)
    tokenizer, recipe = work.frontend.tokenizer, work.recipe
    batches = make_session_batches(
        work.train, dict(work.features), tokenizer, work.kind, max_frames=recipe.max_frames, shuffle=True, seed=work.seed
    )
    log = train_sessions(
        work.model,
        batches,
        steps=recipe.local_steps,
        peak_lr=recipe.lr,
        warmup=recipe.warmup,
        turn_penalty=recipe.turn_penalty,
        seed=work.seed,
        log_every=recipe.local_steps,  # one entry: the mean loss over the round's steps
    )
    state = work.model.state_dict()
    arrays = {k: state[k].detach().to(sent.dtype) for k, sent in work.sent.items()}  # the sent keys, dtypes, shapes
    metrics = MetricRecord({"num-examples": len(work.train), "train-loss": log[0]["loss"], "local-steps": recipe.local_steps})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


@mt_app.evaluate()
def mt_evaluate(msg: Message, context: Context) -> Message:
    """Decode this device's held-out sessions with the global model; reply with the pooled word-error counts."""
    work = _setup(msg, context)
    if not work.heldout:
        raise MultitalkerDeviceError("mt.heldout=0: the device holds out no sessions to evaluate on")
    tokenizer = work.frontend.tokenizer
    batches = make_session_batches(
        work.heldout, dict(work.features), tokenizer, work.kind, max_frames=work.recipe.max_frames, shuffle=False, seed=0
    )
    scores = score_sessions(work.heldout, decode_sessions(work.model, batches), tokenizer, work.kind)["all"]
    words = int(scores["words"])
    errors = round(scores["wer"] * words) if words else 0  # score_sessions' wer is errors / words
    metrics = MetricRecord(
        {"word-errors": errors, "words": words, "num-examples": len(work.heldout), "wer": errors / words if words else 0.0}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
