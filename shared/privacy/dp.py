"""Local differential privacy on a device: DP-SGD with Opacus, and the privacy accountant the device keeps.

Plain PyTorch, no Flower. A ClientApp keeps an ``AccountantState`` in ``context.state`` (``to_record`` gives
the plain lists a ``ConfigRecord`` holds), calls ``dp_train_steps`` instead of ``shared.training.train_steps``,
stores the returned state back and reports the returned epsilon. ``PrivacyBudgetExhausted`` is its refusal.

DP-SGD (Abadi et al. 2016) as Opacus implements it; the choices that make it valid here:
    * Privacy unit: one utterance of the device's training data (add/remove one utterance).
    * Sampling: every step draws a Poisson sample, each of the device's N utterances independently with
      probability q (``sample_rate``), as the subsampled-Gaussian RDP analysis assumes; a step whose sample is
      empty still adds noise and is still counted. A sample larger than ``batch_frames`` padded frames runs as
      several forward/backward passes of one optimizer step (Opacus' ``signal_skip_step``, as its
      ``BatchMemoryManager`` does), so memory stays bounded without changing the mechanism.
    * Per-sample loss: utterance i's RNN-T NLL divided by its own token count U_i. The non-private path divides
      the batch's summed NLL by the batch's total tokens, a factor that depends on which other utterances were
      drawn; here utterance i's gradient depends on utterance i alone, which is what a per-utterance
      sensitivity bound needs. The batch loss is the mean of these over the sampled utterances with Opacus'
      ``loss_reduction="mean"``: Opacus multiplies the backpropagated gradients by the batch size, so
      ``p.grad_sample[i]`` is exactly the gradient of utterance i's loss alone (tests check this against
      utterances run one at a time, padding and all).
    * Update: ``DPOptimizer`` clips each per-sample gradient to L2 norm C (``max_grad_norm``, over all
      parameters together), sums, adds N(0, (sigma C)^2) per coordinate, divides by the expected batch size qN,
      and the wrapped optimizer steps.
    * Per-sample gradients: Opacus' ``GradSampleModule`` in "hooks" mode. Every layer of the four models has a
      hooks grad sampler (Linear, Conv1d incl. depthwise, Embedding, LayerNorm; ConvRNN-T needs ``DPLSTM``,
      see ``make_dp_compatible``); ``chorus eval privacy`` reports a DP step's time against a plain one. Ghost
      clipping does not run on these models (Opacus' Linear norm sampler handles
      2-D and 3-D inputs only, the joiner's is 4-D (B, T', U + 1, J)).
    * Randomness: Poisson sampling, SpecAugment masks and noise come from one generator seeded from OS entropy
      unless ``seed`` is given (tests). Never derive them from the round number or partition id: the server
      knows those (``client/train.py`` seeds torch's global generator that way, so it is not used here).
    * Accounting: Opacus' ``RDPAccountant``, stepped by the optimizer's own step hook (noise multiplier, q).
      ``AccountantState`` is its history, ``(noise_multiplier, sample_rate, steps)`` runs, as plain values.
    * Budget: a device refuses a round BEFORE training when the round would take its epsilon past the budget
      (or it is already past it). RDP accounting does not depend on the data, so the epsilon after the round is
      known in advance; refusing then means the reported epsilon never exceeds the budget. The price: the last
      sliver of budget that cannot hold a full round stays unspent.
    * Outside the guarantee: the amortized encoder's compute-cost term is rejected (its ``compute_cost`` averages over the
      batch's frames, coupling utterances; see ``dp_train_steps``). The training loss in ``StepStats`` is
      computed from the private data without noise: reporting it leaves the DP guarantee, which covers the
      model update only.

Example:
    >>> from shared.config import ModelConfig
    >>> from shared.models.checkpoint import build_model
    >>> model = make_dp_compatible(build_model(ModelConfig(name="convrnnt", d_model=32, vocab_size=20)))
    >>> validate(model)  # raises DPCompatibilityError naming the offending layers; here none
    >>> ledger = AccountantState.from_record({})  # a device's first round: nothing spent
    >>> check_budget(ledger, noise_multiplier=1.0, sample_rate=0.1, steps=8, delta=1e-5, epsilon_budget=8.0) < 8.0
    True
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Mapping, NamedTuple, Sequence

import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from shared.data.dataset import Batch
from shared.data.features import augment
from shared.models.convrnnt import ConvRNNTEncoder
from shared.models.transducer import Transducer
from shared.training import StepStats

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues

__all__ = [
    "AccountantState",
    "DPCompatibilityError",
    "DPRound",
    "DPSGD",
    "GradSampleMode",
    "PrivacyBudgetExhausted",
    "check_budget",
    "dp_train_steps",
    "make_dp_compatible",
    "validate",
]

GradSampleMode = Literal["hooks", "functorch"]


class DPCompatibilityError(ValueError):
    """A model has layers Opacus cannot compute per-sample gradients for."""


class PrivacyBudgetExhausted(RuntimeError):
    """A device refuses to train: the next round would take its epsilon past its budget (or it already is).

    Attributes:
        epsilon: spent so far.
        next_epsilon: what the refused round would have brought it to.
        budget: the device's epsilon budget.
        delta: the delta of all three.
    """

    def __init__(self, *, epsilon: float, next_epsilon: float, budget: float, delta: float) -> None:
        self.epsilon, self.next_epsilon, self.budget, self.delta = epsilon, next_epsilon, budget, delta
        spent = "is spent" if epsilon >= budget else "cannot hold another round"
        super().__init__(
            f"privacy budget {spent}: this device has epsilon {epsilon:.4g} (delta {delta:g}) of its "
            f"budget {budget:.4g}; the next round would bring it to {next_epsilon:.4g}, so it refuses "
            f"to train"
        )


# --- Accountant state --------------------------------------------------------------------------------------------

_RECORD_KEYS = ("noise-multipliers", "sample-rates", "steps")


@dataclass(frozen=True)
class AccountantState:
    """The history of an Opacus ``RDPAccountant`` as plain values: runs of (noise multiplier, sample rate, steps).

    Consecutive steps with equal parameters form one run, exactly as ``RDPAccountant.step`` merges them, so the
    state stays a few entries long however many rounds a device trains.
    """

    history: tuple[tuple[float, float, int], ...] = ()

    def __post_init__(self) -> None:
        for noise_multiplier, sample_rate, steps in self.history:
            if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0.0):
                raise ValueError(f"noise multiplier must be finite and >= 0, got {noise_multiplier}")
            if not 0.0 < sample_rate <= 1.0:
                raise ValueError(f"sample rate must lie in (0, 1], got {sample_rate}")
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps of a history entry must be a positive int, got {steps!r}")

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far."""
        return sum(steps for _, _, steps in self.history)

    def accountant(self) -> RDPAccountant:
        """A fresh ``RDPAccountant`` holding this history."""
        accountant = RDPAccountant()
        accountant.history = [tuple(entry) for entry in self.history]
        return accountant

    @classmethod
    def from_accountant(cls, accountant: RDPAccountant) -> AccountantState:
        return cls(tuple((float(sigma), float(q), int(steps)) for sigma, q, steps in accountant.history))

    def epsilon(self, delta: float, *, orders: tuple[float, ...] | None = None) -> float:
        """Epsilon spent so far at ``delta`` (RDP accounting over ``orders``, default: Opacus' orders, up to 63);
        0 before any step."""
        _check_delta(delta)
        return _epsilon(self.history, delta, orders) if self.history else 0.0

    def after(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> AccountantState:
        """The state after ``steps`` more steps at (noise multiplier, sample rate), as the accountant records them."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        accountant = self.accountant()
        for _ in range(steps):
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return AccountantState.from_accountant(accountant)

    def to_record(self) -> dict[str, ConfigRecordValues]:
        """Plain lists for a Flower ``ConfigRecord``: {noise-multipliers, sample-rates, steps}, one entry per run."""
        return {
            "noise-multipliers": [sigma for sigma, _, _ in self.history],
            "sample-rates": [q for _, q, _ in self.history],
            "steps": [steps for _, _, steps in self.history],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AccountantState:
        """The inverse of ``to_record``; an empty mapping (a device's first round) is an empty history."""
        if not record:
            return cls()
        missing = [key for key in _RECORD_KEYS if key not in record]
        unknown = sorted(set(record) - set(_RECORD_KEYS))
        if missing or unknown:
            raise ValueError(
                f"accountant record must have exactly the keys {list(_RECORD_KEYS)}: missing {missing}, unknown {unknown}"
            )
        columns = [list(record[key]) for key in _RECORD_KEYS]
        if len({len(column) for column in columns}) != 1:
            raise ValueError(
                f"accountant record columns differ in length: "
                f"{ {key: len(column) for key, column in zip(_RECORD_KEYS, columns)} }"
            )
        return cls(tuple((float(sigma), float(q), steps) for sigma, q, steps in zip(*columns)))


def check_budget(
    state: AccountantState, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, epsilon_budget: float
) -> float:
    """The epsilon a device will have after a round of ``steps`` steps; raises if that exceeds its budget.

    Raises:
        PrivacyBudgetExhausted: the round would bring epsilon above ``epsilon_budget`` (or it already is above).
    """
    if not epsilon_budget > 0.0:
        raise ValueError(f"epsilon_budget must be positive (math.inf for none), got {epsilon_budget}")
    next_epsilon = state.after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps).epsilon(delta)
    if next_epsilon > epsilon_budget:
        raise PrivacyBudgetExhausted(epsilon=state.epsilon(delta), next_epsilon=next_epsilon, budget=epsilon_budget, delta=delta)
    return next_epsilon


# RDP orders for device-level accounting: at the small sample rates of large populations the best order lies far
# above Opacus' default maximum (63), where the default bound stalls near epsilon 0.1.
WIDE_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(11, 64),
    *(80, 100, 128, 160, 200, 256, 320, 400, 512, 640, 800, 1024, 2048, 4096),
)


@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, orders: tuple[float, ...] | None = None) -> float:
    """Opacus' RDP epsilon of a history, memoized: it costs ~0.1 s, and a simulation's devices share histories."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta, alphas=list(orders) if orders else None))


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


# --- Model compatibility -----------------------------------------------------------------------------------------


def make_dp_compatible(model: Transducer) -> Transducer:
    """Swap in Opacus-trainable layers, in place: ConvRNN-T's ``nn.LSTM`` becomes ``DPLSTM``; others unchanged.

    Same weights, same outputs, same state_dict keys (so the server's arrays load either way). Call it before
    creating the optimizer: the swapped layer has new parameter tensors. Returns ``model``.
    """
    encoder = model.encoder
    if isinstance(encoder, ConvRNNTEncoder) and not encoder.config.dp_compatible:
        reference = next(encoder.parameters())
        replacement = ConvRNNTEncoder(replace(encoder.config, dp_compatible=True))
        replacement.load_state_dict(encoder.state_dict())
        model.encoder = replacement.to(device=reference.device, dtype=reference.dtype).train(encoder.training)
    return model


def validate(model: nn.Module) -> None:
    """Check that Opacus can train ``model`` with DP-SGD (its ``ModuleValidator`` and ``GradSampleModule`` checks).

    Raises:
        DPCompatibilityError: listing each offending module by name, type and Opacus' reason.
    """
    was_training = model.training
    model.train()  # Opacus validates training mode; the models' training paths are what DP-SGD runs
    try:
        if not _opacus_errors(model):
            return
        offenders = _offenders(model)
    finally:
        model.train(was_training)
    lines = [f"  {name} ({type(module).__name__}): {reason}" for name, module, reason in offenders]
    raise DPCompatibilityError(
        f"{type(model).__name__} cannot be trained with Opacus DP-SGD; incompatible "
        f"modules:\n" + "\n".join(lines) + "\n(for ConvRNN-T, make_dp_compatible swaps its nn.LSTM for Opacus' DPLSTM)"
    )


def _opacus_errors(module: nn.Module) -> list[str]:
    errors = list(ModuleValidator.validate(module, strict=False)) + list(GradSampleModule.validate(module, strict=False))
    return [" ".join(str(error).split()) for error in errors]


def _offenders(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The innermost modules whose subtree fails validation: a module is blamed when none of its children is."""
    found: list[tuple[str, nn.Module, str]] = []

    def visit(name: str, module: nn.Module) -> None:
        errors = _opacus_errors(module)
        if not errors:
            return
        before = len(found)
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)
        if len(found) == before:
            found.append((name or "<model>", module, "; ".join(errors)))

    visit("", model)
    return found


# --- DP-SGD ------------------------------------------------------------------------------------------------------


class DPRound(NamedTuple):
    """What ``dp_train_steps`` returns.

    Attributes:
        stats: as ``train_steps``' (loss: mean per-token loss of the sampled utterances over non-empty steps;
            utterances: Poisson-sampled utterance visits).
        accountant: the accountant state after the round: store it back in the device's state.
        epsilon: epsilon spent after the round, at the ``delta`` given.
    """

    stats: StepStats
    accountant: AccountantState
    epsilon: float


class _Example(NamedTuple):
    feats: Tensor  # (T, F)
    targets: Tensor  # (U,)
    id: str


def _augmented(batch: Batch, lead_frames: int, lead_prob: float, generator: torch.Generator) -> Batch:
    feats, lens = augment(batch.feats, batch.feat_lens, lead_frames=lead_frames, lead_prob=lead_prob, generator=generator)
    return replace(batch, feats=feats, feat_lens=lens)


def dp_train_steps(
    model: Transducer,
    batches: Sequence[Batch],
    *,
    steps: int,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    accountant: AccountantState,
    delta: float,
    epsilon_budget: float = math.inf,
    batch_frames: int | None = None,
    spec_augment: bool = True,
    lead_silence_frames: int = 0,
    lead_silence_prob: float = 1.0,
    compute_weight: float = 0.0,
    seed: int | None = None,
    grad_sample_mode: GradSampleMode = "hooks",
) -> DPRound:
    """``steps`` DP-SGD steps on the utterances of ``batches``, each on a fresh Poisson sample of them.

    Args:
        model: trained in place (call ``make_dp_compatible`` before building ``optimizer`` for ConvRNN-T).
        batches: the device's training utterances (e.g. ``make_batches``' output); only the set of utterances
            matters, each is one sampling unit. N = their number.
        steps: DP-SGD steps (optimizer steps) this round.
        optimizer: over ``model``'s parameters; wrapped by Opacus' ``DPOptimizer`` for the round.
        noise_multiplier: sigma; the noise's standard deviation is sigma x ``max_grad_norm``.
        max_grad_norm: C, the L2 bound of each utterance's gradient (all parameters together).
        sample_rate: q, each utterance's probability of joining a step's sample (expected batch qN).
        accountant: the device's state so far (``AccountantState()`` at first).
        delta: the delta epsilon is reported at (below 1/N is customary).
        epsilon_budget: refuse the round if it would take epsilon above this (see the module docstring).
        batch_frames: padded-frame budget of one forward pass; a larger sample runs in several passes of one
            step. None: one pass.
        spec_augment: SpecAugment each sampled utterance, with masks from the same secret generator as the
            sampling and the noise. (Masks from a seed the server knows would tie each utterance's mask, hence
            its gradient, to which other utterances were drawn; secret i.i.d. masks keep the others'
            contributions identically distributed whether or not any one utterance is present.) With it, as in
            ``train_steps``: with probability ``lead_silence_prob``, U{0..``lead_silence_frames``} frames of the
            utterance's own noise floor before it. ``train_steps``' sentence concatenation has no place here: a
            joined row's one clipped gradient would carry two sampling units.
        compute_weight: must be 0 for encoders with a learnable compute cost (the amortized one): its batch-level
            ``compute_cost`` would make an utterance's gradient depend on the other sampled utterances'
            lengths. Ignored (as in ``train_steps``, its gradient is 0) for dense encoders.
        seed: seeds Poisson sampling, SpecAugment masks and noise, for tests only; None: OS entropy.
        grad_sample_mode: Opacus' per-sample gradient mode; "hooks" measured fastest.

    Returns:
        ``DPRound``: stats, the new accountant state, and epsilon after the round.

    Raises:
        PrivacyBudgetExhausted: before any training, if the round would exceed ``epsilon_budget``.
        DPCompatibilityError: ``model`` has layers Opacus cannot handle.
        ValueError: bad parameters, no training utterances, or a learnable compute cost with compute_weight > 0.
        FloatingPointError: a non-finite loss.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0.0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0.0):
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    if batch_frames is not None and batch_frames < 1:
        raise ValueError(f"batch_frames must be positive, got {batch_frames}")
    if grad_sample_mode not in ("hooks", "functorch"):
        raise ValueError(f"grad_sample_mode must be 'hooks' or 'functorch', got {grad_sample_mode!r}")
    epsilon = check_budget(
        accountant,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        epsilon_budget=epsilon_budget,
    )
    pool = _examples(batches)
    if not pool:
        raise ValueError("no training utterances: every utterance was skipped or the device has no data")
    validate(model)

    generator = torch.Generator()
    if seed is None:
        generator.seed()  # OS entropy: the server must not be able to predict the samples or the noise
    else:
        generator.manual_seed(seed)
    ledger = accountant.accountant()

    total_loss, total_cost, loss_steps, visits = 0.0, 0.0, 0, 0
    with DPSGD(
        model,
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=sample_rate * len(pool),
        generator=generator,
        grad_sample_mode=grad_sample_mode,
    ) as dpsgd:
        dpsgd.optimizer.attach_step_hook(ledger.get_optimizer_hook_fn(sample_rate=sample_rate))
        for _ in range(steps):
            chosen = (torch.rand(len(pool), generator=generator) < sample_rate).nonzero().flatten().tolist()
            passes = _physical_batches([pool[i] for i in chosen], batch_frames)
            if spec_augment:
                passes = [_augmented(batch, lead_silence_frames, lead_silence_prob, generator) for batch in passes]
            step = dpsgd.step(passes, compute_weight=compute_weight)
            visits += step.utterances
            if step.utterances:
                total_loss += step.loss
                total_cost += step.compute_cost
                loss_steps += 1
    state = AccountantState.from_accountant(ledger)
    planned = accountant.after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    assert state == planned, f"the optimizer's accountant counted {state}, the budget check planned {planned}"
    stats = StepStats(
        loss=total_loss / max(loss_steps, 1),
        steps=steps,
        utterances=visits,
        compute_cost=total_cost / loss_steps if loss_steps else 1.0,
    )
    return DPRound(stats=stats, accountant=state, epsilon=epsilon)


class DPSGD:
    """Opacus around a model for the length of a ``with`` block: per-sample gradients, clipping, noise.

    On exit the model is as before: no hooks, no per-sample attributes on its parameters.
    """

    def __init__(
        self,
        model: Transducer,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        generator: torch.Generator,
        grad_sample_mode: GradSampleMode,
    ) -> None:
        self.model = model
        self._optimizer_args = dict(
            optimizer=optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
        )
        self._force_functorch = grad_sample_mode == "functorch"
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> DPSGD:
        self.model.train()
        self.module = GradSampleModule(self.model, batch_first=True, loss_reduction="mean", force_functorch=self._force_functorch)
        try:
            self.optimizer = DPOptimizer(**self._optimizer_args)
        except BaseException:
            self._clean()
            raise
        self._warnings.__enter__()
        # The first layer's input (features) needs no gradient; torch warns about Opacus' backward hook then.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self._warnings.__exit__(exc_type, exc, traceback)
        self.optimizer.zero_grad(set_to_none=True)
        self._clean()

    def _clean(self) -> None:
        self.module.cleanup()  # removes the hooks and the per-sample attributes Opacus put on the parameters
        for p in self.model.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad
        for layer in self.model.modules():  # activations a forward pass left without a backward pass (an error)
            if hasattr(layer, "activations"):
                del layer.activations

    def step(self, passes: Sequence[Batch], *, compute_weight: float = 0.0) -> StepStats:
        """One DP-SGD step on the sampled utterances, in ``passes`` forward/backward passes (none: a noise step).

        Returns the step's per-token loss, utterances and compute cost (``steps`` = 1).
        """
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        if not passes:  # an empty Poisson sample: a step of pure noise, counted by the accountant
            for p in optimizer.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
            optimizer.step()
            return StepStats(loss=0.0, steps=1, utterances=0, compute_cost=0.0)
        nll, tokens, cost, visits = 0.0, 0, 0.0, 0
        for index, batch in enumerate(passes):
            out = self.module(batch.feats, batch.feat_lens, batch.targets, batch.target_lens)
            if compute_weight != 0.0 and out.compute_cost.requires_grad:
                raise ValueError(
                    f"compute_weight={compute_weight} with DP-SGD: this encoder's compute_cost averages over the "
                    f"batch's frames, so an utterance's gradient would depend on the other sampled utterances; "
                    f"train with compute_weight=0 (or give the encoder a per-utterance cost)"
                )
            per_utterance = out.loss_per_utt / batch.target_lens.clamp(min=1).to(out.loss_per_utt.dtype)
            if not bool(torch.isfinite(per_utterance).all()):
                raise FloatingPointError(f"non-finite transducer loss on batch {batch.ids[:3]}...")
            per_utterance.mean().backward()
            for p in optimizer.params:  # a layer the forward pass skipped: zero per-sample gradients
                if p.grad_sample is None:
                    p.grad_sample = p.new_zeros((len(batch), *p.shape))
            last = index == len(passes) - 1
            if not last:
                optimizer.signal_skip_step(do_skip=True)  # clip and accumulate now; noise and step after the last
            optimizer.step()
            if not last:
                optimizer.zero_grad(set_to_none=True)
            nll += float(out.loss_per_utt.detach().sum())
            tokens += int(batch.target_lens.sum())
            cost += float(out.compute_cost.detach()) * len(batch)
            visits += len(batch)
        return StepStats(loss=nll / max(tokens, 1), steps=1, utterances=visits, compute_cost=cost / visits)


def _examples(batches: Sequence[Batch]) -> list[_Example]:
    """The utterances of padded batches, unpadded, one sampling unit each."""
    pool = []
    for batch in batches:
        for row, uid in enumerate(batch.ids):
            pool.append(
                _Example(
                    feats=batch.feats[row, : int(batch.feat_lens[row])],
                    targets=batch.targets[row, : int(batch.target_lens[row])],
                    id=uid,
                )
            )
    ids = [example.id for example in pool]
    if len(set(ids)) != len(ids):
        raise ValueError("an utterance appears in several batches: each must be one sampling unit")
    return pool


def _physical_batches(sample: list[_Example], batch_frames: int | None) -> list[Batch]:
    """Padded forward passes of one Poisson sample: length-sorted, each under ``batch_frames`` padded frames."""
    sample = sorted(sample, key=lambda example: example.feats.shape[0])
    groups: list[list[_Example]] = []
    for example in sample:
        frames = example.feats.shape[0]  # sorted: the newest example is its group's longest
        if groups and (batch_frames is None or (len(groups[-1]) + 1) * frames <= batch_frames):
            groups[-1].append(example)
        else:
            groups.append([example])
    return [_collate(group) for group in groups]


def _collate(group: list[_Example]) -> Batch:
    feat_lens = torch.tensor([example.feats.shape[0] for example in group], dtype=torch.int64)
    target_lens = torch.tensor([example.targets.shape[0] for example in group], dtype=torch.int64)
    reference = group[0].feats
    feats = reference.new_zeros(len(group), int(feat_lens.max()), reference.shape[1])
    targets = torch.zeros(len(group), max(int(target_lens.max()), 1), dtype=torch.int64)
    for row, example in enumerate(group):
        feats[row, : example.feats.shape[0]] = example.feats
        targets[row, : example.targets.shape[0]] = example.targets
    return Batch(
        feats=feats, feat_lens=feat_lens, targets=targets, target_lens=target_lens, ids=[example.id for example in group]
    )
