"""A device's local round: fine-tune the received global model on its own utterances.

With ``dp.enabled`` the round is DP-SGD (``shared.privacy.dp.dp_train_steps``: per-utterance clipping, Poisson
sampling, Gaussian noise) and the device keeps its privacy ledger, an ``AccountantState``, in its own persistent
state (Flower's ``context.state``, a ConfigRecord under :data:`ACCOUNTANT_KEY`), so epsilon adds up over every
round the device trains in this run. The ledger is charged *before* the round trains (RDP accounting does not
depend on the data, so the round's cost is known in advance): a round that fails halfway is paid for, never
released for free. A round that would take epsilon past ``dp.epsilon-budget`` is refused before any training:
``fine_tune`` logs the epsilon and the budget on the device and raises ``PrivacyBudgetExhausted``; the privacy
audit mod (``shared/privacy/audit.py``) turns that into an error reply naming only the exception type, which the
server logs and counts as a failed device ("device train handler raised PrivacyBudgetExhausted").

What a DP reply carries (:meth:`LocalUpdate.metrics`): the update, ``epsilon``, ``local-steps`` (public) and
``num-examples`` = 1. Left out, because they are computed from the training utterances without noise and so lie
outside the DP guarantee (which covers the model update only): the training loss, the amortized encoder's compute
share, the number of skipped files and the exact number of training utterances (with add/remove-one-utterance
adjacency, an exact count alone tells neighbouring datasets apart). FedAvg therefore weighs DP devices equally.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, MetricRecordValues, RecordDict
from torch import nn

from client.data import DeviceData
from shared.config import DPConfig, RunConfig
from shared.data.corpora import Utterance
from shared.data.dataset import Batch, make_batches
from shared.models.checkpoint import build_model, load_state
from shared.models.transducer import Transducer
from shared.metrics import ErrorCounts
from shared.training import Reweighter, mean_loss, score, train_recipe, train_steps

if TYPE_CHECKING:
    from shared.privacy.dp import AccountantState

__all__ = [
    "ACCOUNTANT_KEY",
    "LocalUpdate",
    "PersonalCheck",
    "check_personalization",
    "device_errors",
    "fine_tune",
    "load_accountant",
    "local_optimizer",
    "trainable_parameters",
    "personalize",
    "store_accountant",
    "training_loss",
]

log = logging.getLogger("chorus.client")

# context.state key of the device's privacy ledger: a ConfigRecord of AccountantState.to_record().
ACCOUNTANT_KEY = "dp-accountant"


@dataclass(frozen=True)
class LocalUpdate:
    state_dict: dict[str, torch.Tensor]
    loss: float  # mean per-token training loss (under DP: of the Poisson-sampled utterances; never sent then)
    steps: int
    num_examples: int  # distinct local training utterances: the FedAvg weight without DP
    compute_cost: float
    skipped: int
    epsilon: float | None = None  # epsilon spent after this round (at dp.delta); None without DP

    def metrics(self) -> dict[str, MetricRecordValues]:
        """The reply's MetricRecord: every key is on the audit's allowlist."""
        if self.epsilon is None:
            return {
                "train-loss": self.loss,
                "local-steps": self.steps,
                "num-examples": self.num_examples,
                "compute-cost": self.compute_cost,
                "skipped-utterances": self.skipped,
            }
        # DP: only what the guarantee covers or what is public (see the module docstring).
        return {"epsilon": self.epsilon, "local-steps": self.steps, "num-examples": 1}


def load_accountant(device_state: RecordDict) -> AccountantState:
    """The device's privacy ledger from its persistent state (empty before its first DP round)."""
    from shared.privacy.dp import AccountantState  # Opacus: see _dp_fine_tune

    record = device_state.get(ACCOUNTANT_KEY)
    return AccountantState.from_record(dict(record) if record is not None else {})


def store_accountant(device_state: RecordDict, ledger: AccountantState) -> None:
    device_state[ACCOUNTANT_KEY] = ConfigRecord(ledger.to_record())


def fine_tune(
    cfg: RunConfig,
    global_state: dict[str, torch.Tensor],
    data: DeviceData,
    *,
    server_round: int,
    partition_id: int,
    device_state: RecordDict | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    reweighter: Reweighter | None = None,
) -> LocalUpdate:
    """``cfg.train.local_steps`` steps of ``cfg.train.optimizer`` from the global weights (a fresh optimizer each round: the
    device keeps no optimizer state between rounds, so a device may skip rounds without stale moments).

    With ``cfg.dp.enabled`` they are DP-SGD steps, accounted in ``device_state`` (the device's ``context.state``,
    required then). ``penalty`` (EWC) and ``reweighter`` (ARW) are ``train_steps``' hooks, set by the fairness
    phases (``client/fairness.py``); DP-SGD takes neither (its guarantee covers its own clipped steps only).

    Raises:
        PrivacyBudgetExhausted: DP only: the round would take epsilon past ``cfg.dp.epsilon_budget``; nothing
            was trained and the ledger is unchanged.
    """
    seed = cfg.train.seed * 1_000_003 + server_round * 1009 + partition_id
    torch.manual_seed(seed)  # dropout; DP-SGD draws its samples, masks and noise from OS entropy
    model = build_model(cfg.model)
    load_state(model, global_state, source="global model from the server")
    batches = make_batches(
        data.train, features=data.features, tokenizer=data.tokenizer, max_frames=cfg.train.batch_frames, shuffle=True, seed=seed
    )
    if cfg.dp.enabled:
        if penalty is not None or reweighter is not None:
            raise ValueError(
                "dp.enabled: DP-SGD rounds take no EWC penalty or ARW reweighter (fairness.ewc-lambda, fairness.arw)"
            )
        if device_state is None:
            raise ValueError(
                "dp.enabled: fine_tune needs the device's persistent state (context.state) to keep "
                "its privacy accountant across rounds"
            )
        return _dp_fine_tune(cfg, model, batches, data, server_round=server_round, device_state=device_state)
    optimizer = local_optimizer(cfg, model)
    stats = train_steps(
        model,
        batches,
        steps=cfg.train.local_steps,
        optimizer=optimizer,
        **train_recipe(cfg.train, seed),
        penalty=penalty,
        reweighter=reweighter,
    )
    return LocalUpdate(
        state_dict=model.state_dict(),
        loss=stats.loss,
        steps=stats.steps,
        num_examples=sum(len(b.ids) for b in batches),
        compute_cost=stats.compute_cost,
        skipped=len(data.features.skipped),
    )


def training_loss(cfg: RunConfig, global_state: dict[str, torch.Tensor], data: DeviceData) -> tuple[float, int]:
    """The global model's per-token loss on this device's training utterances, and how many they are: the answer
    to Power-of-Choice's loss query (``query.loss``). Deterministic: eval mode, batches in order."""
    model = build_model(cfg.model)
    load_state(model, global_state, source="global model from the server")
    batches = make_batches(
        data.train, features=data.features, tokenizer=data.tokenizer, max_frames=cfg.train.batch_frames, shuffle=False, seed=0
    )
    return mean_loss(model, batches), sum(len(b.ids) for b in batches)


@dataclass(frozen=True)
class PersonalCheck:
    """Whether personalizing helps this device, measured on training utterances set aside for the check."""

    keep: bool  # the fine-tuned model made fewer errors on the set-aside utterances than the received one
    received: ErrorCounts  # the received model on the set-aside utterances
    personal: ErrorCounts  # the received model fine-tuned on the device's other training utterances, on the same


def device_errors(
    model: Transducer, state: dict[str, torch.Tensor], utterances: list[Utterance], data: DeviceData, *, beam: int = 1
) -> ErrorCounts:
    """Word errors of ``state`` (loaded into ``model``, which the caller reuses) on ``utterances`` of this device."""
    load_state(model, state, source="a device's model")
    with torch.inference_mode():
        counts, _ = score(model.eval(), utterances, features=data.features, tokenizer=data.tokenizer, beam=beam)
    return counts


def check_personalization(
    cfg: RunConfig, global_state: dict[str, torch.Tensor], data: DeviceData, *, partition_id: int, check_every: int = 3
) -> PersonalCheck:
    """Set aside every ``check_every``-th training utterance, fine-tune the received model on the others
    (``cfg.train``'s recipe) and score both models on those set aside, which neither trained on."""
    check = data.train[::check_every]
    fit = [u for i, u in enumerate(data.train) if i % check_every]
    if not fit:
        raise ValueError(f"personalization needs at least 2 training utterances, the device has {len(data.train)}")
    model = build_model(cfg.model)
    received = device_errors(model, global_state, check, data, beam=cfg.eval.beam)
    trial = fine_tune(cfg, global_state, replace(data, train=fit), server_round=0, partition_id=partition_id)
    personal = device_errors(model, trial.state_dict, check, data, beam=cfg.eval.beam)
    return PersonalCheck(keep=personal.errors < received.errors, received=received, personal=personal)


def personalize(
    cfg: RunConfig, global_state: dict[str, torch.Tensor], data: DeviceData, *, partition_id: int
) -> tuple[dict[str, torch.Tensor], PersonalCheck]:
    """The model a device keeps for itself: the received one fine-tuned on all its training utterances where
    :func:`check_personalization` says that helps, else the received one unchanged. Nothing of it leaves the device."""
    check = check_personalization(cfg, global_state, data, partition_id=partition_id)
    if not check.keep:
        return global_state, check
    return fine_tune(cfg, global_state, data, server_round=0, partition_id=partition_id).state_dict, check


def local_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg.train.optimizer`` at ``cfg.train.lr``, fresh for this round's local steps, over the parameters
    ``cfg.train.trainable`` names (the others are frozen: ``requires_grad`` off, so DP-SGD neither clips nor noises
    them)."""
    params = trainable_parameters(model, cfg.train.trainable)
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.train.lr)
    return torch.optim.AdamW(params, lr=cfg.train.lr)


def trainable_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """``model``'s parameters that ``which`` (``train.trainable``) lets train; every other one gets ``requires_grad``
    off. "biases-norms": every parameter named ``bias`` and every parameter of a normalization layer."""
    if which == "all":
        return list(model.parameters())
    if which != "biases-norms":
        raise ValueError(f"train.trainable={which!r}: choose all or biases-norms")
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    chosen = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    chosen |= {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return [p for p in model.parameters() if p.requires_grad]


def _dp_fine_tune(
    cfg: RunConfig, model: Transducer, batches: list[Batch], data: DeviceData, *, server_round: int, device_state: RecordDict
) -> LocalUpdate:
    # Imported here, by DP rounds only: Opacus takes over a second to import, which every device process and
    # simulation actor would pay at start-up otherwise.
    from shared.privacy.dp import PrivacyBudgetExhausted, check_budget, dp_train_steps, make_dp_compatible

    dp: DPConfig = cfg.dp
    steps = cfg.train.local_steps
    ledger = load_accountant(device_state)
    try:
        check_budget(
            ledger,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=dp.sample_rate,
            steps=steps,
            delta=dp.delta,
            epsilon_budget=dp.epsilon_budget,
        )
    except PrivacyBudgetExhausted as refused:
        log.warning(
            "round %d: privacy budget exhausted, this device does not train: epsilon %.4g spent of its "
            "budget %.4g (delta %g); the round would bring it to %.4g",
            server_round,
            refused.epsilon,
            refused.budget,
            refused.delta,
            refused.next_epsilon,
        )
        raise
    planned = ledger.after(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate, steps=steps)
    store_accountant(device_state, planned)  # charged before training: a failed round is paid for too
    make_dp_compatible(model)  # ConvRNN-T: nn.LSTM -> DPLSTM (same weights and keys); before the optimizer
    optimizer = local_optimizer(cfg, model)
    result = dp_train_steps(
        model,
        batches,
        steps=steps,
        optimizer=optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        sample_rate=dp.sample_rate,
        accountant=ledger,
        delta=dp.delta,
        epsilon_budget=dp.epsilon_budget,
        batch_frames=cfg.train.batch_frames,
        spec_augment=cfg.train.spec_augment,
        lead_silence_frames=cfg.train.lead_silence_frames,
        lead_silence_prob=cfg.train.lead_silence_prob,
        compute_weight=cfg.train.compute_weight,
    )
    if result.accountant != planned:  # dp_train_steps checks this too; the ledger must hold what was spent
        raise RuntimeError(f"DP round spent {result.accountant}, the ledger was charged {planned}")
    log.info(
        "round %d: DP-SGD %d steps (sigma %g, q %g, C %g): epsilon %.4g of budget %.4g (delta %g)",
        server_round,
        steps,
        dp.noise_multiplier,
        dp.sample_rate,
        dp.max_grad_norm,
        result.epsilon,
        dp.epsilon_budget,
        dp.delta,
    )
    return LocalUpdate(
        state_dict=model.state_dict(),
        loss=result.stats.loss,
        steps=result.stats.steps,
        num_examples=sum(len(b.ids) for b in batches),
        compute_cost=result.stats.compute_cost,
        skipped=len(data.features.skipped),
        epsilon=result.epsilon,
    )
