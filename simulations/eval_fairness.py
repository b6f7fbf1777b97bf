"""`chorus eval fairness`: fairness without demographics, measured. FedAvg fine-tuning vs +EWC vs +ARW vs +both.

From one base model per corpus (trained here on the public speakers, or ``--checkpoint``), the same federated
devices fine-tune it in each arm; every arm runs our ServerApp workflow (``server.workflow.run_federation``,
``fairness.enabled``: federated k-means cohort discovery, disaggregated evaluation) with:

    fedavg      plain FedAvg rounds
    ewc         the EWC penalty (Fisher of the base model, federated; anchored at each round's global model) on
                every local step of every round, and the last ``targeted_rounds`` rounds train only the devices of
                the worst automatic cohort, so the penalty holds the others' knowledge while it is fine-tuned for
                (Trinh et al.)
    arw         adversarial reweighting on every device (ARL weights from utterance statistics + the device's
                speaker embedding, normalized over the federation; the adversary is federated with the model)
    ewc+arw     both
    qfedavg     q-FedAvg (Li et al. 2020, Flower's ``QFedAvg``, ``strategy.qffl-q``): the fairness baseline a user would
                pick instead, which needs no cohorts: each update weighs by its device's training loss to the power q
    fedavg+personal  FedAvg's final global model personalized on every device, as ``chorus device personalize``
                does (``client.train.personalize``: ``personal_steps`` AdamW steps at ``personal_lr`` on the device's
                own training utterances, kept only where a check on set-aside ones says it helps; nothing of it leaves
                the device): the personalization answer to fairness (Li et al. 2021, Ditto), measured on the same
                devices and cohorts. It reuses the FedAvg arm's federation (``arw+personal``: the ARW arm's)
    (``arm_overrides`` also knows ``targeted``: the targeted rounds without EWC, what EWC adds to targeting alone,
    and ``arw-batch`` / ``ewc+arw-batch``: ARL's in-batch normalization, ``fairness.arw-normalization=batch``,
    which with one speaker per device reweights only a speaker's own utterances; pick arms with ``--arms``)

Measured per arm, on the federated devices' own local-eval utterances (what the devices evaluate), for the
final global model (and the base model once):

    automatic   cohorts = the federated k-means clusters of device speaker embeddings; per-cohort WER from the
                devices' dense per-cohort vectors, summed by the server (checked against a central recount)
    metadata    cohorts from ``speakers.tsv`` (evaluation harness only, never a device): each attribute alone
                (synthetic corpus: accent, gender, age group, channel; speechocean762: gender, child/adult, both
                crossed), the attribute partition with the largest base-model gap reported as "metadata", and
                Trinh et al.'s decision-tree partition ("tree", fitted to the base model's per-speaker WERs)

and for each: overall WER (pooled), worst-cohort WER, WER gap (worst - best) / best, bottom-cohort share of
words, variance of cohort WERs (``shared.fairness.cohorts.cohort_report``). Partitions are fixed per corpus
(centroids from k-means, tree from the base model), so the arms are compared on the same cohorts.

Targets (reported, never asserted): automatic cohorts reveal a larger WER gap than metadata cohorts (Dheram et
al.: 65.0% vs 41.7%); EWC and ARW lower the worst-cohort WER without raising the overall WER.

How the federation runs: every device is the real ClientApp (``client.client_app.app``, privacy audit included)
called in this process through ``simulations/harness.py``'s :class:`InProcessGrid` (a persistent
``context.state`` per device), and the server is the real workflow with the run's Flower strategy. Left out:
transport and Ray (whose start-up per arm alone would break ``--quick``'s budget on 2 shared cores); the
fairness phases through Ray are tested in ``tests/test_fairness_federated.py``.

Plans: ``QUICK`` is CI-sized (tiny corpus and model, 4 devices, 2 rounds per arm): its numbers prove the
pipeline only (a 20-step base model has WER 1 everywhere). ``FULL``: the default corpus from the shipped base,
100 devices in automatic cohorts of 5 devices or more (``fairness.min-cohort-devices``); speechocean762-dev's 24
federated speakers in 4, from a base trained here 1500 steps (or ``--checkpoint``, whose architecture then wins; it
needs ``--corpus``, since a base model belongs to one corpus' tokenizer); 3 rounds of local SGD per arm, the last
one targeted in the EWC arms.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from shared.config import TINY_MODEL, RunConfig
from shared.data.corpora import read_speakers_tsv
from shared.data.prepare import Prepared, prepare, speaker_embedder_path
from shared.fairness.cohorts import CohortReport, assign, cohort_report
from shared.models.checkpoint import init_checkpoint_path
from shared.metrics import ErrorCounts
from simulations.harness import InProcessGrid, server_identity
from simulations.metadata_cohorts import Cohorts, attribute_cohorts, cohort_counts_by_speaker, tree_cohorts

__all__ = ["ARMS", "FULL", "FairnessPlan", "QUICK", "check_inputs", "main", "run_fairness_eval"]

SPEECHOCEAN = "speechocean762-dev"
# The targets, reported next to the measurements.
TARGETS = {
    "automatic_gap_paper": 0.650,
    "metadata_gap_paper": 0.417,
    "claim": "automatic cohorts reveal a larger gap than metadata cohorts; EWC/ARW lower the worst-cohort WER "
    "with no overall loss",
}


@dataclass(frozen=True)
class FairnessPlan:
    name: str  # quick | full
    overrides: dict[str, Any]  # run-config overrides shared by every arm (model, training, fairness discovery)
    corpus_overrides: dict[str, dict[str, Any]]  # per corpus ("synth", "speechocean762-dev"): split sizes etc.
    devices: int
    rounds: int
    targeted_rounds: int
    base_steps: int
    ewc_lambda: float
    arms: tuple[str, ...]
    shipped_base: bool = False  # the default corpus starts from the shipped base (else one trained base_steps here)
    # The ``+personal`` arms: each device fine-tunes the arm's final global model with ``personal_steps`` AdamW steps
    # at ``personal_lr`` (the new-market evaluation's personalization recipe) and keeps it where a check says so.
    personal_steps: int = 24
    personal_lr: float = 3e-4

    def with_overrides(self, overrides: dict[str, Any]) -> FairnessPlan:
        """The plan with extra run-config keys (``--set``), checked against the run config at once; the plan's own
        fields that are run-config keys (rounds, the EWC arms' strength and targeted rounds) take them too."""
        merged = {**self.overrides, **overrides}
        RunConfig.from_flat(merged)  # ConfigError naming an unknown key or a bad value
        per_corpus = {
            corpus: {k: v for k, v in keys.items() if k not in overrides}  # the user's keys win
            for corpus, keys in self.corpus_overrides.items()
        }
        return replace(  # ... over the EWC arms' keys too
            self,
            overrides=merged,
            corpus_overrides=per_corpus,
            rounds=int(overrides.get("num-server-rounds", self.rounds)),
            ewc_lambda=float(overrides.get("fairness.ewc-lambda", self.ewc_lambda)),
            targeted_rounds=int(overrides.get("fairness.targeted-rounds", self.targeted_rounds)),
        )


QUICK = FairnessPlan(
    name="quick",
    overrides={
        **TINY_MODEL,
        "train.local-steps": 3,
        "train.batch-frames": 3000,
        "eval.heldout-utterances": 4,
        "fairness.num-cohorts": 3,
        "fairness.kmeans-iterations": 3,
        "fairness.embedder-steps": 20,
        "fairness.arw-warmup": 1,
        "fairness.arw-lr": 0.05,
    },
    corpus_overrides={
        "synth": {
            "synth.speakers": 12,
            "synth.utterances": 8,
            "synth.seed": 5,
            "split.public-speakers": 4,
            "split.heldout-speakers": 2,
        },
        SPEECHOCEAN: {"split.public-speakers": 12, "split.heldout-speakers": 4},
    },
    devices=4,
    rounds=2,
    targeted_rounds=1,
    base_steps=20,
    ewc_lambda=10.0,
    arms=("fedavg", "ewc", "arw", "ewc+arw", "qfedavg", "fedavg+personal"),
    personal_steps=2,
    personal_lr=1e-3,
)
# The full plan: the default corpus from the shipped base, 100 devices (one fresh federated speaker each: seed 7,
# none of them in the base's seed-1 pool) in automatic cohorts of at least 5 devices (9 k-means clusters, those
# under 5 merged: 8 on this corpus), 3 rounds of 8 local SGD steps at lr 0.1 per arm (the federation evaluation's
# local recipe; 2 FedAvg rounds, then 1 targeted round in the EWC arms); speechocean762-dev (24 federated speakers,
# 4 cohorts) from a base trained here 1,500 steps unless ``--checkpoint`` gives one (then its architecture is used).
FULL = FairnessPlan(
    name="full",
    overrides={
        "train.local-steps": 8,
        "train.optimizer": "sgd",
        "train.lr": 0.1,
        "fairness.min-cohort-devices": 5,
        "eval.heldout-utterances": 32,
        "fairness.kmeans-iterations": 5,
        "fairness.embedder-steps": 200,
        "fairness.arw-warmup": 1,
    },
    corpus_overrides={
        "synth": {
            "synth.speakers": 140,
            "synth.utterances": 20,
            "split.public-speakers": 24,
            "split.heldout-speakers": 16,
            "fairness.num-cohorts": 9,
        },
        SPEECHOCEAN: {"split.public-speakers": 48, "split.heldout-speakers": 8, "fairness.num-cohorts": 4},
    },
    devices=100,
    rounds=3,
    targeted_rounds=1,
    base_steps=1500,
    ewc_lambda=10.0,
    arms=("fedavg", "ewc", "arw", "ewc+arw", "qfedavg", "fedavg+personal"),
    shipped_base=True,
)


PERSONAL = "+personal"  # an arm's final global model, personalized on every device


def arm_overrides(arm: str, plan: FairnessPlan) -> dict[str, Any]:
    """The run-config keys that make an arm's federation (on top of the plan's shared ones); a ``+personal`` arm's
    are its federated arm's."""
    arm = arm.removesuffix(PERSONAL)
    targeted = {"fairness.targeted-rounds": plan.targeted_rounds}
    ewc = {**targeted, "fairness.ewc-lambda": plan.ewc_lambda, "fairness.fisher": "federated"}
    batch = {"fairness.arw": True, "fairness.arw-normalization": "batch"}
    arms: dict[str, dict[str, Any]] = {
        "fedavg": {},
        "targeted": targeted,
        "ewc": ewc,
        "arw": {"fairness.arw": True},
        "ewc+arw": {**ewc, "fairness.arw": True},
        "arw-batch": batch,
        "ewc+arw-batch": {**ewc, **batch},
        "qfedavg": {"strategy.name": "qfedavg"},
    }
    if arm not in arms:
        raise ValueError(f"arm {arm!r} is not one of {', '.join(arms)}")
    return arms[arm]


ARMS = (
    "fedavg",
    "targeted",
    "ewc",
    "arw",
    "ewc+arw",
    "arw-batch",
    "ewc+arw-batch",
    "qfedavg",
    "fedavg+personal",
    "arw+personal",
)


# -- measuring ---------------------------------------------------------------------------------------------------


def _device_counts(cfg: RunConfig, checkpoint: Path, devices: int) -> dict[str, ErrorCounts]:
    """speaker -> ErrorCounts of a model on each device's local-eval utterances, decoded as the device does."""
    from client.data import device_data
    from client.evaluate import evaluate_local
    from shared.data.prepare import open_prepared
    from shared.models.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint).state_dict
    prepared = open_prepared(cfg)
    return {prepared.speaker_for_partition(pid): evaluate_local(cfg, state, device_data(cfg, pid)) for pid in range(devices)}


def _personal_counts(cfg: RunConfig, plan: FairnessPlan, checkpoint: Path, devices: int) -> tuple[dict[str, ErrorCounts], int]:
    """speaker -> ErrorCounts, on each device's local-eval utterances, of the model the device keeps after
    personalizing ``checkpoint`` (``client.train.personalize`` with the plan's personalization recipe), and how
    many devices kept a personalized one."""
    from client.data import device_data
    from client.evaluate import evaluate_local
    from client.train import personalize
    from shared.data.prepare import open_prepared
    from shared.models.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint).state_dict
    prepared = open_prepared(cfg)
    recipe = RunConfig.from_flat(
        {**cfg.to_flat(), "train.optimizer": "adamw", "train.lr": plan.personal_lr, "train.local-steps": plan.personal_steps}
    )
    counts, kept = {}, 0
    for pid in range(devices):
        data = device_data(cfg, pid)
        weights, check = personalize(recipe, state, data, partition_id=pid)
        counts[prepared.speaker_for_partition(pid)] = evaluate_local(cfg, weights, data)
        kept += check.keep
    return counts, kept


def _automatic_cohorts(cfg: RunConfig, prepared: Prepared, centroids: np.ndarray, devices: int) -> Cohorts:
    """The harness's recount of each device's cohort: its embedding (same extractor, same utterances as on the
    device) assigned to the final centroids."""
    from client.data import device_data
    from shared.models.speaker_embedding import load_speaker_embedder

    embedder = load_speaker_embedder(speaker_embedder_path(prepared.artifacts, cfg))
    assignment = {}
    for pid in range(devices):
        data = device_data(cfg, pid)
        feats = [f for u in [*data.train, *data.eval] if (f := data.features.features(u)) is not None]
        embedding = embedder.embed_speaker(feats).numpy().astype(np.float64)
        assignment[prepared.speaker_for_partition(pid)] = int(assign(embedding, centroids)[0])
    return Cohorts(assignment=assignment, names=tuple(f"cluster {k}" for k in range(centroids.shape[0])))


def _metadata_attributes(prepared: Prepared, speakers: Sequence[str]) -> dict[str, dict[str, str]]:
    """speakers.tsv rows of ``speakers``, with an ``age_group`` column derived from a numeric ``age`` when the
    corpus has none (speechocean762: child <= 12, adult >= 18)."""
    table = read_speakers_tsv(prepared.corpus.root)
    rows = {}
    for speaker in speakers:
        row = dict(table.get(speaker, {}))
        if "age_group" not in row and row.get("age", "").isdigit():
            age = int(row["age"])
            row["age_group"] = "child" if age <= 12 else "adult" if age >= 18 else "teen"
        rows[speaker] = row
    return rows


_ATTRIBUTE_PARTITIONS: dict[str, list[tuple[str, ...]]] = {
    "synth": [("accent",), ("gender",), ("age_group",), ("channel_rate",)],
    SPEECHOCEAN: [("gender",), ("age_group",), ("gender", "age_group")],
}
_TREE_COLUMNS = {
    "synth": ["accent", "gender", "age_group", "channel_rate", "snr_db", "pitch", "rate"],
    SPEECHOCEAN: ["gender", "age"],
}


def _summary(report: CohortReport, cohorts: Cohorts | None = None) -> dict[str, Any]:
    def finite(value: float) -> float | None:
        return round(float(value), 6) if math.isfinite(value) else None

    return {
        "overall_wer": finite(report.overall_wer),
        "worst_wer": finite(report.worst_wer),
        "best_wer": finite(report.best_wer),
        "gap": finite(report.wer_gap),
        "bottom_share": finite(report.bottom_cohort_share),
        "variance": finite(report.wer_variance),
        "worst_cohort": report.worst_cohort if cohorts is None else cohorts.names[report.worst_cohort],
        "cohorts": len(report.wer),
        "ranked": len(report.eligible),
        "cohort_wer": [finite(w) for w in report.wer],
        "cohort_words": report.words.tolist(),
    }


def _report(cohorts: Cohorts, per_speaker: dict[str, ErrorCounts]) -> CohortReport:
    counts = cohort_counts_by_speaker(cohorts, per_speaker)
    return cohort_report(counts.errors, counts.words, speakers_per_cohort=counts.speakers)


# -- one corpus ----------------------------------------------------------------------------------------------------


def _corpus_key(corpus: str) -> str:
    return "synth" if corpus == "synth" else SPEECHOCEAN if Path(corpus).name == SPEECHOCEAN else Path(corpus).name


def _base_checkpoint(cfg: RunConfig, plan: FairnessPlan, out: Path, checkpoint: Path | None) -> Path:
    if checkpoint is not None:
        return checkpoint
    from simulations.train import base_model

    return base_model(cfg, plan.base_steps, out / "base", eval_utterances=cfg.eval.heldout_utterances)


def run_corpus(corpus: str, plan: FairnessPlan, *, workdir: Path, out: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    """Every arm of ``plan`` on one corpus; returns the corpus' JSON section."""
    from client.client_app import app as client_app
    from server.workflow import run_federation

    key = _corpus_key(corpus)
    start = time.monotonic()
    if checkpoint is None and plan.shipped_base and key == "synth":
        checkpoint = init_checkpoint_path(RunConfig().model)  # the shipped base
    model_keys: dict[str, Any] = {}
    if checkpoint is not None:  # the base model's architecture wins over the plan's
        from shared.models.checkpoint import load_checkpoint

        model_keys = {
            f"model.{k.replace('_', '-')}": v
            for k, v in asdict(load_checkpoint(checkpoint).model_config).items()
            if k != "init_checkpoint"
        }
    flat = {
        **RunConfig().to_flat(),
        **plan.overrides,
        **model_keys,
        **plan.corpus_overrides.get(key, {}),
        "corpus": corpus,
        "workdir": str(workdir),
        "fairness.enabled": True,
        "num-server-rounds": plan.rounds,
        "strategy.min-train-nodes": plan.devices,
        "strategy.min-evaluate-nodes": plan.devices,
        "strategy.min-available-nodes": plan.devices,
        "strategy.fraction-evaluate": 1.0,
    }
    base_cfg = RunConfig.from_flat(flat)
    prepared = prepare(base_cfg, progress=False)  # also trains the speaker-embedding extractor
    _note(f"{key}: prepared (corpus, tokenizer, CMVN, speaker embedder) at {time.monotonic() - start:.0f} s")
    devices = min(plan.devices, len(prepared.split.federated))
    base = _base_checkpoint(base_cfg, plan, out, checkpoint)
    flat["model.init-checkpoint"] = str(base)
    flat.update({f"strategy.min-{kind}-nodes": devices for kind in ("train", "evaluate", "available")})
    base_cfg = RunConfig.from_flat(flat)
    speakers = [prepared.speaker_for_partition(pid) for pid in range(devices)]
    _note(f"{key}: base model {base} at {time.monotonic() - start:.0f} s")
    base_counts = _device_counts(base_cfg, base, devices)
    attributes = _metadata_attributes(prepared, speakers)

    arms: dict[str, Any] = {}
    partitions: dict[str, Cohorts] = {}
    first_centroids: np.ndarray | None = None
    global_counts: dict[Path, dict[str, ErrorCounts]] = {}  # per federation: a +personal arm reuses its arm's
    for arm in plan.arms:
        arm_start = time.monotonic()
        federated = arm.removesuffix(PERSONAL)  # a +personal arm personalizes its federated arm's model
        cfg = RunConfig.from_flat({**flat, **arm_overrides(arm, plan), "run-id": f"{out.parent.name}/{key}/{federated}"})
        run_dir = _finished_run(cfg)
        if run_dir is None:
            grid = InProcessGrid(client_app, devices, flat)  # devices read only the shared keys; the rest: messages
            with server_identity():
                run_dir = run_federation(grid, cfg)
        else:
            _note(f"{key}: arm {arm} reused from {run_dir} (same config, all rounds done)")
        fairness = json.loads((run_dir / "fairness.json").read_text())
        centroids = np.asarray(fairness["centroids"])
        if first_centroids is None:  # the same embeddings and seeds give every arm the same cohorts
            first_centroids = centroids
            partitions["automatic"] = _automatic_cohorts(base_cfg, prepared, centroids, devices)
            partitions.update(_metadata_partitions(key, attributes, base_counts, len(centroids)))
        elif not np.allclose(centroids, first_centroids):
            raise RuntimeError(f"arm {arm}: federated k-means found other centroids than the first arm")
        final = run_dir / "checkpoints" / "global.pt"
        if run_dir not in global_counts:
            global_counts[run_dir] = _device_counts(base_cfg, final, devices)
        counts, kept = global_counts[run_dir], None
        if arm.endswith(PERSONAL):
            counts, kept = _personal_counts(base_cfg, plan, final, devices)
        last = [e for e in fairness["log"] if e["phase"] == "evaluate"][-1]
        # The federation's own per-cohort sums are of the global model: checked against its recount.
        recount = cohort_counts_by_speaker(partitions["automatic"], global_counts[run_dir])
        _note(f"{key}: arm {arm} done in {time.monotonic() - arm_start:.0f} s")
        arms[arm] = {
            "run_dir": str(run_dir),
            "seconds": round(time.monotonic() - arm_start, 1),
            "federated_matches_recount": bool(
                np.allclose(recount.errors, last["cohort_errors"]) and np.allclose(recount.words, last["cohort_words"])
            ),
            "targeted_cohorts": sorted({c for e in fairness["log"] for c in e.get("targeted_cohorts", [])}),
            "arw_weight_range": [  # per round: the lowest and highest device mean learner weight (ARL's, halved)
                [e["arw_weight_min"], e["arw_weight_max"]] for e in fairness["log"] if "arw_weight_min" in e
            ],
            "cohort_sizes": fairness["cohort_sizes"],
            "personalized_devices": kept,  # +personal arms: devices that kept a personalized model
            **{name: _summary(_report(cohorts, counts), cohorts) for name, cohorts in partitions.items()},
        }
    base_row = {name: _summary(_report(cohorts, base_counts), cohorts) for name, cohorts in partitions.items()}
    return {
        "corpus": str(prepared.corpus.root),
        "devices": devices,
        "base_checkpoint": str(base),
        "partitions": {
            name: {
                "cohorts": list(c.names),
                "sizes": np.bincount([c.assignment[s] for s in speakers if s in c.assignment], minlength=len(c)).tolist(),
            }
            for name, c in partitions.items()
        },
        "base": base_row,
        "arms": arms,
        "seconds": round(time.monotonic() - start, 1),
    }


def _finished_run(cfg: RunConfig) -> Path | None:
    """The run directory of an arm that already completed with exactly this config (an interrupted experiment
    restarts at the first unfinished arm), else None."""
    from server.workflow import same_run_config

    run_dir = cfg.workdir_path / "runs" / cfg.run_id
    try:
        rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError, KeyError):
        return None
    done = (
        same_run_config(run_dir, cfg) and (run_dir / "fairness.json").is_file() and rounds and rounds[-1] == cfg.num_server_rounds
    )
    return run_dir if done else None


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _metadata_partitions(
    key: str, attributes: dict[str, dict[str, str]], base_counts: dict[str, ErrorCounts], num_cohorts: int
) -> dict[str, Cohorts]:
    """Per-attribute partitions, the one with the largest base-model gap as "metadata", and Trinh's tree."""
    out: dict[str, Cohorts] = {}
    best_gap, best = -1.0, None
    for columns in _ATTRIBUTE_PARTITIONS.get(key, []):
        if not all(all(c in row for c in columns) for row in attributes.values()):
            continue
        cohorts = attribute_cohorts(attributes, list(columns))
        name = "meta:" + "+".join(columns)
        out[name] = cohorts
        gap = _report(cohorts, base_counts).wer_gap
        gap = gap if math.isfinite(gap) else 1e9
        if len(cohorts) > 1 and gap > best_gap:
            best_gap, best = gap, name
    if best is not None:
        out["metadata"] = out[best]
    tree_columns = [c for c in _TREE_COLUMNS.get(key, []) if all(c in row for row in attributes.values())]
    with_words = {s: c for s, c in base_counts.items() if c.words > 0}
    if tree_columns and len(with_words) >= 2:
        try:
            out["tree"] = tree_cohorts(
                attributes, with_words, columns=tree_columns, max_cohorts=max(2, num_cohorts), min_speakers=1
            )
        except ValueError as err:  # e.g. too few speakers to split
            print(f"tree cohorts skipped: {err}", file=sys.stderr)
    return out


# -- the report -------------------------------------------------------------------------------------------------

_SHOWN = ("automatic", "metadata", "tree")


def _plot(section: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("base", section["base"])] + list(section["arms"].items())
    labels = [name for name, _ in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 3.8))
    width = 0.2
    ax.bar(x - 1.5 * width, [r["automatic"]["overall_wer"] or 0 for _, r in rows], width, label="overall")
    for i, name in enumerate(_SHOWN):
        values = [(r.get(name) or {}).get("worst_wer") or 0 for _, r in rows]
        ax.bar(x + (i - 0.5) * width, values, width, label=f"worst cohort ({name})")
    ax.set(xticks=x, xticklabels=labels, ylabel="WER", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(summary: dict[str, Any], out: Path) -> Path:
    lines = [
        "# Fairness without demographics: FedAvg vs +EWC vs +ARW",
        "",
        f"Plan: `{summary['plan']}`. Duration {summary['seconds']} s. Targets (reported, not asserted): "
        f"{TARGETS['claim']} (paper gaps: automatic {TARGETS['automatic_gap_paper']:.1%}, metadata "
        f"{TARGETS['metadata_gap_paper']:.1%}).",
        "",
        "WER is pooled over each cohort's devices' local-eval utterances. gap = (worst - best) / best; bottom "
        "share = words in the worst cohort / all words; variance over cohort WERs. automatic = federated k-means "
        "clusters of device speaker embeddings; metadata = the speakers.tsv attribute partition with the largest "
        "base-model gap; tree = Trinh et al.'s decision tree on the metadata (fitted to the base model).",
        "",
    ]
    for name, section in summary["corpora"].items():
        lines += [f"## {name}", ""]
        if "skipped" in section:
            lines += [f"Skipped: {section['skipped']}", ""]
            continue
        lines += [
            f"{section['devices']} devices; base model `{section['base_checkpoint']}`. Partitions: "
            + "; ".join(f"{p}: {v['sizes']} devices" for p, v in section["partitions"].items()),
            "",
            "| arm | cohorts | overall WER | worst WER | gap | bottom share | variance | worst cohort |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        rows = [("base", section["base"])] + list(section["arms"].items())
        for arm, row in rows:
            for partition in _SHOWN:
                r = row.get(partition)
                if r is None:
                    continue
                gap = "inf" if r["gap"] is None else f"{r['gap']:.1%}"
                lines.append(
                    f"| {arm} | {partition} | {r['overall_wer']:.3f} | {r['worst_wer']:.3f} | {gap} | "
                    f"{r['bottom_share']:.1%} | {r['variance']:.4f} | {r['worst_cohort']} |"
                )
        checks = {arm: row["federated_matches_recount"] for arm, row in section["arms"].items()}
        lines += ["", f"Federated per-cohort counts equal the harness's central recount: {checks}.", ""]
        kept = {arm: n for arm, row in section["arms"].items() if (n := row.get("personalized_devices")) is not None}
        if kept:
            lines += [
                "Personalized arms: devices that kept a personalized model (the others kept the global one): "
                + "; ".join(f"{arm} {n} of {section['devices']}" for arm, n in kept.items()),
                "",
            ]
        spreads = {arm: row["arw_weight_range"] for arm, row in section["arms"].items() if row.get("arw_weight_range")}
        if spreads:
            lines += [
                "ARW: each round's lowest and highest device mean weight (1 everywhere = the devices weigh as in "
                "FedAvg): "
                + "; ".join(f"{arm} " + ", ".join(f"{lo:.3f}-{hi:.3f}" for lo, hi in r) for arm, r in spreads.items()),
                "",
            ]
        plot = _plot(section, out / f"fairness-{name}.png", name)
        lines += [f"![{name}]({plot.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def check_inputs(corpus: str | None, checkpoint: Path | None) -> None:
    """ValueError naming ``--corpus`` or ``--checkpoint`` when the evaluation cannot use it (before any work)."""
    if corpus and corpus != "synth" and not Path(corpus).is_dir():
        raise ValueError(f"--corpus {corpus!r}: neither 'synth' nor a corpus directory")
    if checkpoint is not None and not corpus:  # a base model's tokenizer belongs to one corpus
        raise ValueError("--checkpoint needs --corpus: a base model is trained on one corpus' tokenizer")
    if checkpoint is not None and not checkpoint.is_file():
        raise ValueError(f"--checkpoint {checkpoint}: no such file")


def run_fairness_eval(
    plan: FairnessPlan, *, workdir: Path, eval_id: str, corpus: str | None = None, checkpoint: Path | None = None
) -> dict[str, Any]:
    """Both corpora (or ``corpus`` alone); returns the summary written to ``runs/<eval-id>/fairness-eval.json``."""
    start = time.monotonic()
    out = workdir / "runs" / eval_id
    out.mkdir(parents=True, exist_ok=True)
    speechocean = Path(__file__).resolve().parents[1].parent / "shared" / "data" / SPEECHOCEAN
    check_inputs(corpus, checkpoint)
    if corpus and corpus != "synth":  # a directory named on the command line is relative to the shell, not the workdir
        corpus = str(Path(corpus).resolve())
    corpora = [corpus] if corpus else ["synth", str(speechocean)]
    summary: dict[str, Any] = {"experiment": "fairness", "plan": plan.name, "targets": TARGETS, "corpora": {}}
    for name in corpora:
        key = _corpus_key(name)
        if name != "synth" and not Path(name).is_dir():
            summary["corpora"][key] = {"skipped": f"corpus {name} is absent"}
            continue
        if name == "synth" and not _espeak_available():
            summary["corpora"][key] = {"skipped": "espeak-ng is not installed (sudo apt-get install espeak-ng)"}
            continue
        summary["corpora"][key] = run_corpus(name, plan, workdir=workdir, out=out / key, checkpoint=checkpoint)
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["report"] = str(write_report(summary, out))
    (out / "fairness-eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _espeak_available() -> bool:
    import shutil

    return shutil.which("espeak-ng") is not None


def main(
    plan: FairnessPlan,
    *,
    workdir: Path,
    eval_id: str,
    corpus: str | None = None,
    checkpoint: Path | None = None,
    as_json: bool = False,
) -> None:
    """Progress to stderr; stdout carries the report (markdown) or, ``as_json``, one JSON object."""
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_fairness_eval(plan, workdir=workdir, eval_id=eval_id, corpus=corpus, checkpoint=checkpoint)
    print(json.dumps(summary) if as_json else Path(summary["report"]).read_text())
