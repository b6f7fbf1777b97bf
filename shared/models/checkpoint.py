"""Building a model from its config, and checkpoints that carry that config with the weights.

One path for every user (central training, the server, a device): ``build_model(ModelConfig)`` and
``load_checkpoint(path)``, so train and evaluate can never disagree about how a model is made.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.config import ModelConfig
from shared.models.amortized_transformer import AmortizedConfig, AmortizedTransformerEncoder
from shared.models.convrnnt import ConvRNNTConfig, ConvRNNTEncoder
from shared.models.transducer import Transducer, TransducerConfig
from shared.models.transformer import CausalTransformerEncoder, TransformerConfig, sliding_window_config

__all__ = ["MODEL_NAMES", "CheckpointError", "Checkpoint", "build_model", "load_state", "save_checkpoint",
           "load_checkpoint", "initial_model"]

MODEL_NAMES = ("transformer", "sliding-window", "amortized", "convrnnt")

_FORMAT = "chorus-checkpoint-v1"
# Sliding-window baseline (Xie et al.'s comparison): attention limited to this many past encoder frames.
SLIDING_WINDOW = 8


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def build_model(cfg: ModelConfig) -> Transducer:
    """A fresh transducer for ``cfg`` (weights from torch's default init, seeded by the caller)."""
    enc_cfg = TransformerConfig(d_model=cfg.d_model, num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim,
                                num_layers=cfg.num_layers, left_context=cfg.left_context, dropout=cfg.dropout)
    if cfg.name == "transformer":
        encoder: nn.Module = CausalTransformerEncoder(enc_cfg)
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
    return ConvRNNTConfig(output_dim=cfg.d_model, local_channels=channels, global_channels=channels,
                          lstm_hidden_size=2 * cfg.d_model, dropout=cfg.dropout)


def initial_model(cfg: ModelConfig) -> Transducer:
    """``build_model``, with ``cfg.init_checkpoint``'s weights when one is set.

    An amortized model may start from a dense transformer checkpoint of the same sizes: its blocks take the
    dense weights and only the arbitrators start fresh (gates start mostly on, so it starts as the dense model).
    """
    model = build_model(cfg)
    if not cfg.init_checkpoint:
        return model
    ckpt = load_checkpoint(cfg.init_checkpoint)
    source = ckpt.model_config
    dense_to_amortized = cfg.name == "amortized" and source.name == "transformer"
    if source.name != cfg.name and not dense_to_amortized:
        raise CheckpointError(f"model.init-checkpoint {cfg.init_checkpoint} holds a {source.name!r} model, "
                              f"model.name is {cfg.name!r}")
    state = dict(ckpt.state_dict)
    if dense_to_amortized:
        own = model.state_dict()
        state.update({k: v for k, v in own.items() if ".arbitrator." in k})
    load_state(model, state, source=f"model.init-checkpoint {cfg.init_checkpoint}")
    return model


@dataclass
class Checkpoint:
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]  # step, round, metrics, optimizer/strategy state: whatever the writer needs back

    def build(self) -> Transducer:
        model = build_model(self.model_config)
        load_state(model, self.state_dict, source="checkpoint")
        return model


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict`` with an error that lists the mismatching names and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source} does not fit the model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, shape mismatch {wrong[:5]}")
    model.load_state_dict(state_dict)


def save_checkpoint(path: Path | str, model: nn.Module, model_config: ModelConfig, **meta: Any) -> Path:
    """Atomically write weights + config + meta (a crash mid-write never leaves a torn checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": _FORMAT, "model_config": dataclasses.asdict(model_config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path | str, *, expect: ModelConfig | None = None) -> Checkpoint:
    """Read a checkpoint; with ``expect``, refuse one whose architecture differs (naming the fields)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/garbage files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a Chorus checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {_FORMAT} file")
    try:
        model_config = ModelConfig(**payload["model_config"])
    except TypeError as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable model config: {err}") from err
    if expect is not None:
        diffs = [f"{f.name}: checkpoint {getattr(model_config, f.name)!r} vs expected {getattr(expect, f.name)!r}"
                 for f in dataclasses.fields(ModelConfig)
                 if f.name not in ("init_checkpoint", "dropout")
                 and getattr(model_config, f.name) != getattr(expect, f.name)]
        if diffs:
            raise CheckpointError(f"checkpoint {path} is a different model: " + "; ".join(diffs))
    return Checkpoint(model_config=model_config, state_dict=payload["state_dict"], meta=payload["meta"])
