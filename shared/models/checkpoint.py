"""Building a model from its config, and checkpoints that carry that config with the weights.

One path for every user (central training, the server, a device): ``build_model(ModelConfig)`` and
``load_checkpoint(path)``, so train and evaluate can never disagree about how a model is made.

A checkpoint written by ``chorus train`` also carries its **front end**: the sentencepiece tokenizer and the
CMVN statistics it was trained with (``Frontend``). A model is useless without them, so whoever starts from a
checkpoint (``model.init-checkpoint``) uses its front end instead of training a new one.

The trained base models that ship with Chorus live in ``shared/models/shipped/`` (float16, with
``manifest.json``: sha256, the command that made each one, data, time, hardware, measured WER).
``model.init-checkpoint = "shipped"`` (the default) picks the one whose architecture matches the model config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from shared.config import MODEL_NAMES, ModelConfig
from shared.data.features import GlobalCMVN
from shared.data.tokenizer import Tokenizer
from shared.files import torch_save_atomic
from shared.models.amortized_transformer import AmortizedConfig, AmortizedTransformerEncoder, is_arbitrator
from shared.models.convrnnt import ConvRNNTConfig, ConvRNNTEncoder
from shared.models.encoder import StreamingEncoder
from shared.models.transducer import Transducer, TransducerConfig
from shared.models.transformer import CausalTransformerEncoder, TransformerConfig, sliding_window_config

__all__ = [
    "MODEL_NAMES",
    "SHIPPED",
    "SHIPPED_DIR",
    "CheckpointError",
    "Checkpoint",
    "Frontend",
    "build_model",
    "load_state",
    "save_checkpoint",
    "load_checkpoint",
    "initial_model",
    "init_checkpoint_path",
    "shipped_manifest",
    "sha256_of",
    "checkpoint_frontend",
    "architecture",
    "average_checkpoints",
    "read_payload",
    "saveable_state",
]


_FORMAT = "chorus-checkpoint-v1"
# Sliding-window baseline (Xie et al.'s comparison): attention limited to this many past encoder frames.
SLIDING_WINDOW = 8
# ``model.init-checkpoint`` value that names the shipped base model of the configured architecture.
SHIPPED = "shipped"
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
# Models that can start from a dense transformer checkpoint of the same sizes (``initial_model``).
FROM_DENSE = ("amortized", "sliding-window")
# A model whose encoder is not the dense one's may still take a dense checkpoint's predictor and joiner (same
# vocabulary and d_model), so that its fresh encoder learns against a trained label model and joint network.
LABEL_MODEL_FROM_DENSE = ("convrnnt",)
LABEL_MODEL_PREFIXES = ("predictor.", "joiner.")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def build_model(cfg: ModelConfig) -> Transducer:
    """A fresh transducer for ``cfg`` (weights from torch's default init, seeded by the caller)."""
    enc_cfg = TransformerConfig(
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        left_context=cfg.left_context,
        dropout=cfg.dropout,
        conv_kernel=cfg.conv_kernel,
    )
    if cfg.name == "transformer":
        encoder: StreamingEncoder = CausalTransformerEncoder(enc_cfg)
    elif cfg.name == "sliding-window":
        encoder = CausalTransformerEncoder(sliding_window_config(enc_cfg, window=SLIDING_WINDOW))
    elif cfg.name == "amortized":
        encoder = AmortizedTransformerEncoder(AmortizedConfig(base=enc_cfg))
    elif cfg.name == "convrnnt":
        encoder = ConvRNNTEncoder(convrnnt_config(cfg))
    else:
        raise CheckpointError(f"model.name={cfg.name!r} is not a model; choose one of {', '.join(MODEL_NAMES)}")
    return Transducer(encoder, TransducerConfig(vocab_size=cfg.vocab_size))


def convrnnt_config(cfg: ModelConfig) -> ConvRNNTConfig:
    """ConvRNN-T sized to match the transformer of the same ``d_model`` in parameters (within ~10%):
    CNN widths 4/3 x d_model and LSTM width 2 x d_model (192 and 288 at the default d_model 144, 2.4 M)."""
    channels = max(8, round(cfg.d_model * 4 / 3 / 8) * 8)
    return ConvRNNTConfig(
        output_dim=cfg.d_model,
        local_channels=channels,
        global_channels=channels,
        lstm_hidden_size=2 * cfg.d_model,
        dropout=cfg.dropout,
    )


def shipped_manifest() -> dict[str, Any]:
    """``shared/models/shipped/manifest.json``: file name -> what it is, how it was made, what it scores."""
    path = SHIPPED_DIR / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _shipped_file(file_name: str) -> Path:
    """Where a shipped checkpoint is. A Flower app bundle (FAB) carries the code and the manifest but no weights,
    so when the app runs from one, the weights are found in the installed ``chorus`` distribution."""
    path = SHIPPED_DIR / file_name
    if path.is_file():
        return path
    try:
        dist = importlib.metadata.distribution("chorus")
    except importlib.metadata.PackageNotFoundError:
        return path
    relative = f"shared/models/shipped/{file_name}"
    direct_url = dist.read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):  # pip install -e
        source = Path(urlparse(json.loads(direct_url)["url"]).path) / relative
        if source.is_file():
            return source
    installed = Path(str(dist.locate_file(relative)))
    return installed if installed.is_file() else path


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that decide a model's weights' shapes and meaning (not where it starts or its dropout)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("init_checkpoint", "dropout")}


def init_checkpoint_path(cfg: ModelConfig) -> Path | None:
    """The checkpoint ``cfg.init_checkpoint`` names: None for "" (random init), the shipped base of the same
    architecture for "shipped" (an amortized or sliding-window model without one of its own takes the dense one:
    see ``initial_model``; a launch base, trained without some markets, is never it), else the path."""
    if not cfg.init_checkpoint:
        return None
    if cfg.init_checkpoint != SHIPPED:
        return Path(cfg.init_checkpoint).expanduser()
    wanted = [architecture(cfg)]
    if cfg.name in FROM_DENSE:
        wanted.append(architecture(dataclasses.replace(cfg, name="transformer")))
    manifest = shipped_manifest()
    for arch in wanted:
        for file_name, entry in manifest.items():
            if entry.get("model_config") == arch and not entry.get("withheld"):
                return _shipped_file(file_name)
    sizes = ", ".join(f"{k}={v}" for k, v in architecture(cfg).items())
    raise CheckpointError(
        f"model.init-checkpoint={SHIPPED!r}: no shipped base model has this architecture "
        f"({sizes}); shipped: {', '.join(sorted(manifest)) or 'none'}. Set "
        'model.init-checkpoint to a checkpoint of yours, or to "" for random weights'
    )


def initial_model(cfg: ModelConfig) -> Transducer:
    """``build_model``, with the weights of the checkpoint ``cfg.init_checkpoint`` names (``init_checkpoint_path``).

    An amortized model may start from a dense transformer checkpoint of the same sizes: its blocks take the
    dense weights and only the arbitrators start fresh (gates start mostly on, so it starts as the dense model).
    A sliding-window model has the dense model's very parameters (only its attention window is shorter). A
    ConvRNN-T may start from one too: it takes the predictor and joiner, and its encoder starts from random weights.
    """
    model = build_model(cfg)
    path = init_checkpoint_path(cfg)
    if path is None:
        return model
    ckpt = load_checkpoint(path)
    source = ckpt.model_config
    from_dense = cfg.name in FROM_DENSE + LABEL_MODEL_FROM_DENSE and source.name == "transformer"
    if source.name != cfg.name and not from_dense:
        raise CheckpointError(
            f"model.init-checkpoint {cfg.init_checkpoint} holds a {source.name!r} model, model.name is {cfg.name!r}"
        )
    state = dict(ckpt.state_dict)
    if from_dense and cfg.name in LABEL_MODEL_FROM_DENSE:
        own = model.state_dict()
        state = {k: state[k] if k.startswith(LABEL_MODEL_PREFIXES) else v for k, v in own.items()}
    if from_dense and cfg.name == "amortized":
        own = model.state_dict()
        state.update({k: v for k, v in own.items() if is_arbitrator(k)})
    load_state(model, state, source=f"model.init-checkpoint {cfg.init_checkpoint}")
    return model


@dataclass(frozen=True)
class Frontend:
    """What turns audio and text into a model's inputs and targets: its tokenizer and CMVN statistics."""

    tokenizer: Tokenizer
    cmvn: GlobalCMVN

    def digest(self) -> str:
        """sha256 of the tokenizer and the CMVN statistics: equal digests, interchangeable front ends."""
        return hashlib.sha256(self.tokenizer.model_proto + self.cmvn.to_json().encode()).hexdigest()

    def to_meta(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.model_proto, "cmvn_mean": self.cmvn.mean.tolist(), "cmvn_std": self.cmvn.std.tolist()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], *, source: str) -> Frontend:
        return cls(
            tokenizer=Tokenizer(bytes(meta["tokenizer"]), source=f"{source} (tokenizer)"),
            cmvn=GlobalCMVN(mean=np.asarray(meta["cmvn_mean"]), std=np.asarray(meta["cmvn_std"])),
        )


@dataclass
class Checkpoint:
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]  # step, round, metrics, optimizer/strategy state: whatever the writer needs back
    source: str = "checkpoint"

    def build(self) -> Transducer:
        model = build_model(self.model_config)
        load_state(model, self.state_dict, source=self.source)
        return model

    @property
    def frontend(self) -> Frontend | None:
        """The tokenizer and CMVN the model was trained with, when the writer stored them."""
        if "frontend" not in self.meta:
            return None
        return Frontend.from_meta(self.meta["frontend"], source=self.source)


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict`` with an error that lists the mismatching names and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own.keys() & state_dict.keys()
        if own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}"
        )
    model.load_state_dict(state_dict)


def _check_finite(state: dict[str, torch.Tensor], context: str) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{context}: weight {key!r} has {int((~torch.isfinite(value)).sum())} non-finite value(s)")


def saveable_state(model: nn.Module, path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``model``'s weights on the CPU, cast to ``dtype`` (floating point only) when given; CheckpointError naming
    the tensor if any is non-finite (every model file is finite by construction)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _check_finite(state, f"refusing to write checkpoint {path}")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def read_payload(path: Path, what: str) -> Any:
    """What ``torch.load`` reads from the model file ``path`` (tensors only); CheckpointError naming ``what`` and the
    file when it is missing or unreadable."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/garbage files
        raise CheckpointError(f"{what} {path} is corrupt or not a Chorus checkpoint: {err}") from err


def save_checkpoint(
    path: Path | str,
    model: nn.Module,
    model_config: ModelConfig,
    *,
    frontend: Frontend | None = None,
    dtype: torch.dtype | None = None,
    **meta: Any,
) -> Path:
    """Atomically write weights + config + meta (a crash mid-write never leaves a torn checkpoint).

    ``frontend`` travels with the weights; ``dtype`` (e.g. float16 for shipping) casts floating-point weights
    (loading casts them back to the model's dtype). A model with a non-finite weight is refused (CheckpointError
    naming the tensor): a checkpoint is finite by construction, so no run ever resumes from a broken model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frontend is not None:
        meta = {**meta, "frontend": frontend.to_meta()}
    state = saveable_state(model, path, dtype)
    payload = {"format": _FORMAT, "model_config": dataclasses.asdict(model_config), "state_dict": state, "meta": meta}
    return torch_save_atomic(path, payload)


def load_checkpoint(path: Path | str, *, expect: ModelConfig | None = None) -> Checkpoint:
    """Read a checkpoint; with ``expect``, refuse one whose architecture differs (naming the fields)."""
    path = Path(path)
    payload = read_payload(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {_FORMAT} file")
    try:
        model_config = ModelConfig(**payload["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable model config: {err}") from err
    if expect is not None:
        own, wanted = architecture(model_config), architecture(expect)
        diffs = [f"{name}: checkpoint {own[name]!r} vs expected {wanted[name]!r}" for name in own if own[name] != wanted[name]]
        if diffs:
            raise CheckpointError(f"checkpoint {path} is a different model: " + "; ".join(diffs))
    _check_finite(payload["state_dict"], f"checkpoint {path} is unusable")
    return Checkpoint(model_config=model_config, state_dict=payload["state_dict"], meta=payload["meta"], source=str(path))


def average_checkpoints(paths: Sequence[Path | str]) -> Checkpoint:
    """The element-wise mean of the weights of ``paths`` (icefall's checkpoint averaging: the last few checkpoints
    of a run's low-learning-rate tail generalize better than any one of them).

    All must be the same architecture (the first one's) and carry the same front end; the result keeps the last
    one's meta (step, front end) without its optimizer and RNG states.
    """
    if not paths:
        raise CheckpointError("checkpoint averaging needs at least one checkpoint")
    first = load_checkpoint(paths[0])
    checkpoints = [first] + [load_checkpoint(p, expect=first.model_config) for p in paths[1:]]
    digests = {c.source: c.frontend.digest() if c.frontend is not None else None for c in checkpoints}
    if len(set(digests.values())) > 1:
        raise CheckpointError(f"checkpoints with different front ends (tokenizer, CMVN) cannot be averaged: {digests}")
    state: dict[str, torch.Tensor] = {}
    for key, value in first.state_dict.items():
        if value.is_floating_point():
            mean = torch.stack([c.state_dict[key].double() for c in checkpoints]).mean(dim=0)
            state[key] = mean.to(torch.float32)
        else:
            state[key] = checkpoints[-1].state_dict[key]
    meta = {k: v for k, v in checkpoints[-1].meta.items() if k not in ("optimizer", "rng")}
    meta["averaged"] = [c.source for c in checkpoints]
    return Checkpoint(model_config=first.model_config, state_dict=state, meta=meta, source="average")


def checkpoint_frontend(path: Path | str) -> Frontend | None:
    """The front end stored in the checkpoint at ``path`` (memoized per file version; None if it has none)."""
    stat = Path(path).stat()
    return _frontend_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _frontend_cached(path: str, size: int, mtime_ns: int) -> Frontend | None:
    return load_checkpoint(path).frontend


def sha256_of(path: Path | str) -> str:
    """Hex sha256 of a file (what the shipped manifest records)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
