"""The one typed run configuration of Chorus.

Flower hands every app a flat ``run_config`` dict: ``[tool.flwr.app.config]`` of pyproject.toml with
``--run-config`` overrides fused in, nested keys flattened with dots, values bool/int/float/str only.
``RunConfig.from_flat`` turns that dict into frozen dataclasses exactly once, rejecting unknown keys and
wrong types with the key's name, so a typo in an override fails loudly instead of being ignored.

Every default here is also written in pyproject.toml (a test keeps the two equal), because Flower only
accepts ``--run-config`` keys that exist there.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "RunConfig",
    "SynthConfig",
    "SplitConfig",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "search_name",
    "StrategyConfig",
    "DPConfig",
    "SecAggConfig",
    "CentralDPConfig",
    "FairnessConfig",
    "TINY_MODEL",
    "TINY_RUN",
]


class ConfigError(ValueError):
    """A run-config key is unknown, or its value has the wrong type or range."""


@dataclass(frozen=True)
class SynthConfig:
    speakers: int = 60  # enough for 20 federated clients plus public and held-out speakers
    utterances: int = 40  # per speaker: ~30 to fine-tune on, ~10 to evaluate locally
    seed: int = 7


@dataclass(frozen=True)
class SplitConfig:
    # Public speakers pretrain centrally and train the tokenizer/CMVN; they never join the federation.
    public_speakers: int = 24
    # Held-out speakers are never trained on: the server scores the global model on them each round.
    heldout_speakers: int = 16
    # Share of each device's own utterances kept aside for its local evaluation.
    local_eval_fraction: float = 0.25
    seed: int = 7
    # "ATTRIBUTE=V1,V2" (speakers.tsv): devices and held-out speakers come only from the speakers whose ATTRIBUTE is
    # one of the values, public speakers only from the others: a market the vendor has no data from, e.g. the
    # launch base's withheld accents (`make simulate`). "" = every role from every speaker.
    market: str = ""

    def __post_init__(self) -> None:
        if self.market:
            from shared.data.corpora import parse_speaker_filter

            try:
                parse_speaker_filter(self.market)
            except ValueError as err:
                raise ConfigError(f"run config key 'split.market' = {err}") from None


MODEL_NAMES = ("transformer", "sliding-window", "amortized", "convrnnt")

# CI-sized runs (the `--quick` plans of the evaluations and benchmarks, and the tests): a 2-block Transformer
# trained from scratch, on 2 public and 2 held-out speakers of a small synthetic corpus, 2 local steps a round.
TINY_MODEL: dict[str, bool | int | float | str] = {
    "model.d-model": 64,
    "model.num-layers": 2,
    "model.num-heads": 2,
    "model.ffn-dim": 128,
    "model.vocab-size": 128,
    "model.init-checkpoint": "",
}
TINY_RUN: dict[str, bool | int | float | str] = {
    "synth.speakers": 8,
    "synth.utterances": 6,
    "synth.seed": 3,
    "split.public-speakers": 2,
    "split.heldout-speakers": 2,
    **TINY_MODEL,
    "train.local-steps": 2,
    "train.lr": 1e-3,
    "train.batch-frames": 3000,
    "eval.heldout-utterances": 6,
}


@dataclass(frozen=True)
class ModelConfig:
    name: str = "transformer"  # one of MODEL_NAMES
    d_model: int = 144
    num_layers: int = 6
    num_heads: int = 4
    ffn_dim: int = 576
    left_context: int = 64  # encoder frames (40 ms each): 2.56 s of history
    # 0: the shipped bases finished at 0, and fine-tuning one at 0.1 made the devices' own WER worse in
    # `chorus simulate` (README); training from random weights may want 0.1 (`--set model.dropout=0.1`).
    dropout: float = 0.0
    vocab_size: int = 256
    conv_kernel: int = 0  # transformer family: K of a causal convolution module in every block; 0 = none
    # "shipped" = the shipped base model of this architecture (shared/models/shipped/); "" = random init; else a
    # `chorus train` checkpoint. A run uses the starting checkpoint's tokenizer and CMVN.
    init_checkpoint: str = "shipped"

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ConfigError(f"model.name={self.name!r} is not a model; choose {', '.join(MODEL_NAMES)}")
        for key in ("d_model", "num_layers", "num_heads", "ffn_dim", "vocab_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.left_context < 0:
            raise ConfigError(f"model.left-context must be >= 0, got {self.left_context}")
        if self.conv_kernel < 0:
            raise ConfigError(f"model.conv-kernel must be >= 0, got {self.conv_kernel}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout}")


LOCAL_OPTIMIZERS = ("adamw", "sgd")
TRAINABLE = ("all", "biases-norms")


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 8  # optimizer steps per device per round
    # Local fine-tuning rate of the shipped base: of 1e-3 / 3e-4 / 1e-4 in `chorus simulate --clients 20 --rounds 3`,
    # 1e-4 kept both the devices' and the held-out speakers' WER below the starting model's in every round (README).
    # Runs from random weights need about 1e-3 (TINY_RUN sets it).
    lr: float = 1e-4
    # Local optimizer: "adamw" (its normalized steps move every device's weights about equally far) or "sgd" (a step
    # proportional to the device's gradient: devices the model serves worst, with the larger gradients, move the
    # average more; McMahan et al.'s FedAvg). SGD takes a far larger rate (0.1 where AdamW takes 1e-4).
    optimizer: str = "adamw"
    # What a device's local steps may change: "all" parameters, or "biases-norms" (every bias and normalization
    # parameter, 0.7% of the dense model; the rest stay as received). Under DP-SGD the noise grows with the square
    # root of the number of trained coordinates, so fewer coordinates carry more signal per unit of noise.
    trainable: str = "all"
    batch_frames: int = 4000  # padded feature frames per batch (B x T): bounds device memory
    spec_augment: bool = True
    # With SpecAugment: each utterance gets U(0, lead_silence_s) seconds of its own noise floor before it
    # (``prepend_silence``), so the model hears speech begin anywhere, as a device does; 0 turns it off.
    lead_silence_s: float = 1.0
    # The share of utterances that get it; the rest begin on cue, as a recording cut by a wake word or a tap does
    # (the shipped base's last two stages ran at 0.5: at 1 it learned to expect a lead-in and did worse on cue).
    lead_silence_prob: float = 0.5
    # With SpecAugment: the probability that an utterance is followed, after a pause, by the next one of its batch
    # (``concatenate_neighbours``), so the model goes on after a sentence ends. The shipped base's recipe sets 0.5;
    # 0 by default because a joined row costs its device twice the frames.
    concat_prob: float = 0.0
    # lambda of Xie et al.'s compute-cost loss: loss = transducer + lambda * expected executed compute share.
    # Only the amortized encoder's cost depends on its weights; for dense encoders the term is a constant.
    compute_weight: float = 0.0
    # Auxiliary CTC loss on the encoder (weight) and FastEmit (lambda): both concentrate each token's emission
    # on one frame, without which greedy search misses tokens that the full-sum loss already scores as likely.
    ctc_weight: float = 0.3
    fastemit_lambda: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in LOCAL_OPTIMIZERS:
            raise ConfigError(f"train.optimizer={self.optimizer!r} is not supported; choose {', '.join(LOCAL_OPTIMIZERS)}")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"train.trainable={self.trainable!r} is not supported; choose {', '.join(TRAINABLE)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.lead_silence_s <= 10.0:
            raise ConfigError(f"train.lead-silence-s must lie in [0, 10] seconds, got {self.lead_silence_s}")
        if not 0.0 <= self.lead_silence_prob <= 1.0:
            raise ConfigError(f"train.lead-silence-prob must lie in [0, 1], got {self.lead_silence_prob}")
        if not 0.0 <= self.concat_prob <= 1.0:
            raise ConfigError(f"train.concat-prob must lie in [0, 1], got {self.concat_prob}")

    @property
    def lead_silence_frames(self) -> int:
        """``lead_silence_s`` in feature frames (10 ms)."""
        from shared.data.features import FRAME_RATE  # the config module is read before any data code

        return round(FRAME_RATE * self.lead_silence_s)


@dataclass(frozen=True)
class EvalConfig:
    heldout_utterances: int = 120  # server-side evaluation budget per round (utterances)
    beam: int = 1  # 1 = greedy search
    # Also keep each round's global model (checkpoints/round-<r>.pt; round 0 = the starting model), for
    # measurements outside the run, e.g. `chorus eval federation`'s WER per market per round.
    keep_round_models: bool = False


def search_name(beam: int) -> str:
    """How reports and the device name ``eval.beam``'s search: "greedy search" or "beam N"."""
    return "greedy search" if beam == 1 else f"beam {beam}"


STRATEGIES = (
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "qfedavg",
)
# Strategies that need each device's update, which strategy.secure-aggregation hides.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
PER_UPDATE_STRATEGIES = (*ROBUST_STRATEGIES, "qfedavg")  # q-FedAvg weighs each update by its device's loss
SELECTIONS = ("uniform", "power-of-choice")  # strategy.selection


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"  # one of STRATEGIES
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    server_lr: float = 0.01  # eta of FedAdam/FedYogi/FedAdagrad; server learning rate of FedAvgM
    timeout: float = 3600.0  # seconds the server waits for device replies in one phase of a round
    # SecAgg+ (server/secagg.py, settings in `secagg.*`): the server learns only the sum of the sampled devices'
    # updates, never one device's. Off by default: it costs four message exchanges per round instead of one.
    secure_aggregation: bool = False
    # Central DP on the aggregate (Flower's DP strategy wrappers, settings in `central-dp.*`): "none"; "server"
    # (the server clips each update, so it sees them: not with SecAgg+); "client" (devices clip, the server adds
    # the noise: combines with SecAgg+, the server then never holds an unclipped or single update).
    central_dp: str = "none"
    # Messages waiting for devices at once (0: all of a phase at once, as Flower's send_and_receive). The
    # simulation engine's cost per 0.1 s grows with nodes x waiting messages: `chorus simulate` and
    # `chorus bench federation` set it to twice the devices that train at once (server/workflow.py says why).
    max_in_flight: int = 0
    # The server trusts no device (server/exchange.py): a train reply's weight (num-examples, distinct local
    # utterances) must be at most max-examples, and its update norm at most max-update-norm (0: no absolute
    # bound) and at most update-norm-factor x the round's median update norm (0: off).
    max_examples: int = 1000
    max_update_norm: float = 0.0
    update_norm_factor: float = 10.0
    # Byzantine-robust aggregation: f, the malicious devices Krum / MultiKrum / Bulyan are built to tolerate
    # (MultiKrum averages the min-train-nodes - f best-scored updates; Bulyan needs 4f + 3 replies a round), and
    # the share FedTrimmedAvg cuts from each end.
    num_malicious: int = 0
    trim_beta: float = 0.2
    # q of q-FedAvg (q-FFL, Li et al. 2020; Flower's QFedAvg): each update weighs by its device's training loss to
    # the power q, so devices served worse pull harder (0 = FedAvg).
    qffl_q: float = 0.1
    # The device step size q-FedAvg assumes (its Lipschitz estimate L = 1 / qffl-lr; 0 = train.lr, Flower's
    # choice). It reads L x (global - local weights) as a device's gradient: after AdamW's normalized steps that is
    # far larger than the gradient, the step comes out tiny, and the paper tunes L.
    qffl_lr: float = 0.0
    # Which devices train each round: "uniform" (Flower's sampling) or "power-of-choice" (Cho et al. 2022): ask
    # `candidates` devices sampled uniformly for the global model's loss on their training utterances, and train the
    # ones with the highest loss (as many as uniform sampling would take). It finds the devices served worst without
    # knowing who they are; each answer is one scalar, as a train reply's train-loss.
    selection: str = "uniform"
    candidates: int = 0  # devices asked each round (0: every connected device); at least the devices trained

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ConfigError(f"strategy.name={self.name!r} is not supported; choose {', '.join(STRATEGIES)}")
        if self.central_dp not in ("none", "server", "client"):
            raise ConfigError(f"strategy.central-dp must be none, server or client, got {self.central_dp!r}")
        if self.secure_aggregation and self.central_dp == "server":
            raise ConfigError(
                'strategy.central-dp = "server" clips each device\'s update on the server, which '
                'strategy.secure-aggregation hides from it: use strategy.central-dp = "client"'
            )
        if self.secure_aggregation and self.name in PER_UPDATE_STRATEGIES:
            raise ConfigError(
                f"strategy.name={self.name!r} needs each device's update, which "
                f"strategy.secure-aggregation hides: use a mean-based strategy (fedavg, fedavgm, "
                f"fedadam, fedyogi, fedadagrad)"
            )
        if self.selection not in SELECTIONS:
            raise ConfigError(f"strategy.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.selection == "power-of-choice" and self.secure_aggregation:
            raise ConfigError(
                'strategy.selection = "power-of-choice" ranks devices by the loss each one reports in plain, which '
                'strategy.secure-aggregation keeps to sums: use strategy.selection = "uniform"'
            )
        if self.candidates < 0:
            raise ConfigError(f"strategy.candidates must be >= 0 (0: every connected device), got {self.candidates}")
        if self.max_in_flight < 0:
            raise ConfigError(f"strategy.max-in-flight must be >= 0 (0: no limit), got {self.max_in_flight}")
        if self.num_malicious < 0:
            raise ConfigError(f"strategy.num-malicious must be >= 0, got {self.num_malicious}")
        if not self.qffl_q >= 0.0:
            raise ConfigError(f"strategy.qffl-q must be >= 0, got {self.qffl_q}")
        if not self.qffl_lr >= 0.0:
            raise ConfigError(f"strategy.qffl-lr must be >= 0 (0: train.lr), got {self.qffl_lr}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"strategy.trim-beta must lie in [0, 0.5), got {self.trim_beta}")
        if self.max_examples < 1:
            raise ConfigError(f"strategy.max-examples must be >= 1, got {self.max_examples}")
        for key, value in (("max-update-norm", self.max_update_norm), ("update-norm-factor", self.update_norm_factor)):
            if not value >= 0:
                raise ConfigError(f"strategy.{key} must be >= 0 (0: off), got {value}")


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ (Bell et al., CCS 2020) as Flower's ``SecAggPlusWorkflow`` runs it (``strategy.secure-aggregation``).

    Each device splits its secrets into ``num-shares`` Shamir shares for its neighbours; any
    ``reconstruction-threshold`` of them recover a dropped device's masks, fewer reveal nothing.
    """

    # Share of the sampled devices each device shares its secrets with (1.0: all of them, plain SecAgg).
    num_shares: float = 1.0
    # Share of a device's shares needed to unmask: the aggregate survives while at least this share of each
    # device's neighbours answers every stage; a coalition of fewer learns nothing of a device's update.
    reconstruction_threshold: float = 0.6
    # Upper bound of a device's aggregation weight (num-examples): weights are quantized as num-examples /
    # max-weight, so it must exceed every device's count (our devices hold ~30 training utterances; a DP reply
    # weighs 1), and a bound far above them wastes quantization precision.
    max_weight: float = 100.0
    # Weighted parameters are clipped to +-clipping-range before quantization: |parameter| x num-examples /
    # max-weight must stay inside it (a trained base model's largest |parameter| is a few units).
    clipping_range: float = 8.0
    # Integer levels over [-clipping-range, clipping-range]: 2^22, Flower's default, so that the sum of up to
    # 2^10 devices fits the 2^32 modulus. Step 2 x 8 / 2^22 = 3.8e-6 before the division by the weights.
    quantization_range: int = 4194304

    def __post_init__(self) -> None:
        if not 0.0 < self.num_shares <= 1.0:
            raise ConfigError(f"secagg.num-shares must lie in (0, 1], got {self.num_shares}")
        if not 0.0 < self.reconstruction_threshold <= 1.0:
            raise ConfigError(f"secagg.reconstruction-threshold must lie in (0, 1], got {self.reconstruction_threshold}")
        if not self.max_weight > 0.0:
            raise ConfigError(f"secagg.max-weight must be positive, got {self.max_weight}")
        if not self.clipping_range > 0.0:
            raise ConfigError(f"secagg.clipping-range must be positive, got {self.clipping_range}")
        if not 0 < self.quantization_range < 2**32:
            raise ConfigError(f"secagg.quantization-range must lie in (0, 2^32), got {self.quantization_range}")

    @property
    def sum_bound(self) -> float:
        """The largest magnitude a summand of a secure sum (weight 1) may have: a device weighs its values by
        1 / ``max-weight``, and the protocol clips weighted values to +-``clipping-range``."""
        return self.clipping_range * self.max_weight


@dataclass(frozen=True)
class CentralDPConfig:
    """Central DP with fixed clipping (Flower's ``DifferentialPrivacy{Server,Client}SideFixedClipping``,
    ``strategy.central-dp``): each update's change is clipped to L2 norm ``clipping-norm`` and the aggregate gets
    Gaussian noise of std ``noise-multiplier x clipping-norm / sampled-clients``. The privacy unit is a device."""

    noise_multiplier: float = 1.0  # Flower's recommended floor for meaningful device-level privacy
    # Bound of one round's model change per device (L2, all parameters). Measured: 4.6-4.9 after the default 8
    # AdamW steps from the 1,500-step base model (3 devices), so 5.0 clips rarely; lower it to trade bias for noise.
    clipping_norm: float = 5.0
    # Devices whose updates each round averages: the noise std divides by it. Must equal the sampled count.
    sampled_clients: int = 20
    # delta of the device-level (epsilon, delta) each round reports (Opacus' RDP accountant); below 1 / devices.
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0.0:
            raise ConfigError(f"central-dp.noise-multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.clipping_norm > 0.0:
            raise ConfigError(f"central-dp.clipping-norm must be positive, got {self.clipping_norm}")
        if not self.sampled_clients > 0:
            raise ConfigError(f"central-dp.sampled-clients must be positive, got {self.sampled_clients}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"central-dp.delta must lie in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class DPConfig:
    """Local DP-SGD on every device (``shared/privacy/dp.py``); the privacy unit is one training utterance.

    The defaults let a device with the default corpus (~30 training utterances, ``train.local-steps`` = 8) take
    part in 7 rounds before its budget is spent: epsilon 3.2 after one round, 5.2 after 3, 7.8 after 7
    (RDP accounting at delta 1e-5); the 8th round would pass 8 and is refused.
    """

    enabled: bool = False  # off by default: DP-SGD costs accuracy and ~1.3-2x step time; runs opt in
    # sigma: noise std = sigma x max-grad-norm. 1.5 with q = 0.25 buys ~7 rounds of 8 steps within epsilon 8;
    # 1.0 would spend the budget in 2 rounds, 2.0 would add a third more noise per step than 1.5.
    noise_multiplier: float = 1.5
    # C, the L2 bound of each utterance's gradient (all parameters together): Opacus' customary 1.0. Per-token
    # losses keep utterance gradients of a similar scale, so one C fits short and long utterances alike.
    max_grad_norm: float = 1.0
    # q, each utterance's chance to join a step's Poisson sample: ~7 of a device's ~30 utterances per step.
    # Larger q averages the noise over more utterances but weakens privacy amplification by subsampling.
    sample_rate: float = 0.25
    # delta of the (epsilon, delta) guarantee: well below 1 / (utterances on a device), as is customary.
    delta: float = 1e-5
    # A device refuses a round that would take its epsilon past this (8: the upper end of what deployed
    # DP-SGD systems report; 1e9 effectively disables the refusal, e.g. to trace epsilon vs WER).
    epsilon_budget: float = 8.0

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0.0:
            raise ConfigError(f"dp.noise-multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0.0:
            raise ConfigError(f"dp.max-grad-norm must be positive, got {self.max_grad_norm}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"dp.sample-rate must lie in (0, 1], got {self.sample_rate}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"dp.delta must lie in (0, 1), got {self.delta}")
        if not self.epsilon_budget > 0.0:
            raise ConfigError(f"dp.epsilon-budget must be positive, got {self.epsilon_budget}")


@dataclass(frozen=True)
class FairnessConfig:
    """Fairness without demographics (``server/fairness.py``, ``client/fairness.py``, ``shared/fairness``).

    With ``enabled``, ``chorus data prepare`` also provides the on-device speaker-embedding extractor (the shipped
    speaker verifier, or one trained on the public speakers: ``embedder``), and every run starts with federated
    k-means cohort discovery and evaluates per cohort each round.
    EWC (``ewc-lambda`` > 0), targeted rounds (``targeted-rounds`` > 0) and ARW (``arw``) are opt-in on top.
    """

    enabled: bool = False  # off by default: cohort discovery adds a prepare-time extractor and k-means round trips
    # C, the automatic cohorts (k-means clusters of device speaker embeddings); seeded from public speakers,
    # so split.public-speakers must be at least this large.
    num_cohorts: int = 4
    # Lloyd iterations of federated k-means (one round trip each, plus one assignment pass); 5 converge on tens
    # of speakers.
    kmeans_iterations: int = 5
    # The smallest cohort kept: a cluster with fewer devices is merged into its neighbours after k-means (its
    # centroid dropped, the rest re-centred once), so fewer than num-cohorts may remain. 0 keeps every cluster.
    min_cohort_devices: int = 0
    # std of the Gaussian noise each device adds to its k-means sums and counts (0 = exact; see the docs).
    kmeans_noise: float = 0.0
    # auto: the shipped speaker verifier (shared/models/shipped/speaker-sv.pt) when the run's CMVN is the one it
    # was trained with, as in every run from the shipped base; else (and with "train") an extractor trained here
    # on the public speakers for embedder-steps.
    embedder: str = "auto"
    # AAM-softmax training steps of the speaker-embedding extractor (~0.35 s each on one core at default sizes).
    embedder_steps: int = 300
    # lambda of the EWC penalty lambda * sum F (theta - theta*)^2, F normalized to mean 1 (0 = no EWC).
    ewc_lambda: float = 0.0
    fisher: str = "federated"  # federated (devices return Fisher sums) | public (server, public speakers)
    # The last N rounds train only the devices of the worst cohorts (each device decides locally).
    targeted_rounds: int = 0
    target_cohorts: int = 1  # how many of the worst cohorts a targeted round trains
    arw: bool = False  # adversarial reweighting (ARL weights; the adversary is federated with the model)
    arw_hidden: int = 0  # 0 = a linear adversary (ARL's finding for small data); else one hidden layer
    # The adversary's Adam learning rate on the device. At 0.01 its weights stay within ~10% of uniform for the
    # few rounds of a run and no decoded word changes; at 0.3 ARL's weights span most of [1, 1 + 1/m] (README: fairness).
    arw_lr: float = 0.3
    arw_warmup: int = 1  # rounds in which the adversary stays uniform (every learner weight 1) before the min-max starts
    # population (default): the federation's mean score (devices report summable score sums), so whole devices
    # are up- or down-weighted (the server weighs each update by its ARL weight mass); it needs arw-warmup >= 1:
    # the first round measures the population. batch: ARL's in-batch normalization on each device, which with one
    # speaker per device only reweights a speaker's own utterances: every device's weights sum to 2 x its
    # utterances, so the devices weigh exactly as in FedAvg.
    arw_normalization: str = "population"

    def __post_init__(self) -> None:
        if self.num_cohorts < 2:
            raise ConfigError(f"fairness.num-cohorts must be >= 2, got {self.num_cohorts}")
        if self.min_cohort_devices < 0:
            raise ConfigError(f"fairness.min-cohort-devices must be >= 0, got {self.min_cohort_devices}")
        if self.kmeans_iterations < 0 or self.embedder_steps < 1:
            raise ConfigError(
                f"need fairness.kmeans-iterations >= 0 and fairness.embedder-steps >= 1, got "
                f"{self.kmeans_iterations} and {self.embedder_steps}"
            )
        if self.embedder not in ("auto", "train"):
            raise ConfigError(f"fairness.embedder must be auto or train, got {self.embedder!r}")
        if not self.kmeans_noise >= 0.0:
            raise ConfigError(f"fairness.kmeans-noise must be >= 0, got {self.kmeans_noise}")
        if not self.ewc_lambda >= 0.0:
            raise ConfigError(f"fairness.ewc-lambda must be >= 0, got {self.ewc_lambda}")
        if self.fisher not in ("federated", "public"):
            raise ConfigError(f"fairness.fisher={self.fisher!r}: choose federated or public")
        if self.targeted_rounds < 0 or self.arw_warmup < 0 or self.arw_hidden < 0:
            raise ConfigError(
                f"fairness.targeted-rounds, fairness.arw-warmup and fairness.arw-hidden must be >= 0, "
                f"got {self.targeted_rounds}, {self.arw_warmup} and {self.arw_hidden}"
            )
        if not 1 <= self.target_cohorts <= self.num_cohorts:
            raise ConfigError(
                f"fairness.target-cohorts={self.target_cohorts} exceeds fairness.num-cohorts={self.num_cohorts}"
                if self.target_cohorts > self.num_cohorts
                else f"fairness.target-cohorts must be >= 1, got {self.target_cohorts}"
            )
        if not self.arw_lr > 0.0:
            raise ConfigError(f"fairness.arw-lr must be positive, got {self.arw_lr}")
        if self.arw_normalization not in ("batch", "population"):
            raise ConfigError(f"fairness.arw-normalization={self.arw_normalization!r}: choose batch or population")
        if self.arw_normalization == "population" and self.arw_warmup < 1:
            raise ConfigError(
                "fairness.arw-normalization=population needs fairness.arw-warmup >= 1 (the first round "
                f"measures the population's mean adversary score), got {self.arw_warmup}"
            )


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 3
    # Where corpora, artifacts (tokenizer, CMVN, checkpoints) and runs/ live. "" means $CHORUS_HOME, else
    # the current directory. `flwr run` executes the app from an installed copy, so pass an absolute path.
    workdir: str = ""
    run_id: str = ""  # "" = a timestamp chosen by the server
    resume: bool = False  # continue run `run-id` from its last completed round
    corpus: str = "synth"  # "synth" = the default synthetic corpus; else a corpus directory
    synth: SynthConfig = field(default_factory=SynthConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    fairness: FairnessConfig = field(default_factory=FairnessConfig)

    def __post_init__(self) -> None:
        if self.strategy.name == "qfedavg" and self.dp.enabled:
            raise ConfigError(
                'strategy.name = "qfedavg" weighs each update by its device\'s training loss, which DP-SGD replies '
                "do not carry (it lies outside their guarantee): turn dp.enabled off or choose another strategy"
            )
        if self.strategy.selection == "power-of-choice" and self.dp.enabled:
            raise ConfigError(
                'strategy.selection = "power-of-choice" asks each device for its training loss, which lies outside '
                'DP-SGD\'s guarantee: turn dp.enabled off or use strategy.selection = "uniform"'
            )

    @property
    def workdir_path(self) -> Path:
        root = self.workdir or os.environ.get("CHORUS_HOME", "") or "."
        return Path(root).expanduser().resolve()

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat run_config (keys like ``model.d-model``); unknown keys are errors."""
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            parts = key.replace("-", "_").split(".")
            node = nested
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"run config key {key!r}: {parts[0]!r} is not a section")
            node[parts[-1]] = value
        return _build(cls, nested, prefix="")

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """The inverse of ``from_flat``: kebab-case dotted keys, as in pyproject.toml."""
        flat: dict[str, bool | int | float | str] = {}
        _flatten(self, "", flat)
        return flat


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(repr(_kebab(prefix + name)) for name in unknown)
        raise ConfigError(f"unknown run config key(s) {names}; known: " + ", ".join(sorted(_kebab(prefix + k) for k in known)))
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        key = _kebab(prefix + name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"run config key {key!r} is a section, got value {value!r}")
            kwargs[name] = _build(hint, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(key, hint, value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    if isinstance(hint, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"run config key {key!r} must be {hint.__name__}, got {value!r} ({type(value).__name__})")


def _flatten(obj: Any, prefix: str, out: dict[str, bool | int | float | str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _flatten(value, prefix + f.name + ".", out)
        else:
            out[_kebab(prefix + f.name)] = value


def _kebab(name: str) -> str:
    return name.replace("_", "-")
