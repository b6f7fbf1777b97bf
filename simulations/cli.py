"""The `chorus` command line: one front door for data, simulation, training, benchmarks and devices."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer

from client.device import device_cli
from server.deploy import server_cli
from shared.config import ConfigError, RunConfig
from shared.console import fail

app = typer.Typer(
    help="Chorus: federated edge learning for streaming speech recognition.", no_args_is_help=True, pretty_exceptions_enable=False
)
data_app = typer.Typer(help="Corpora and artifacts.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(server_cli, name="server")
app.add_typer(device_cli, name="device")
bench_app = typer.Typer(help="Benchmarks (JSON on stdout, measured side by side in one run).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
model_app = typer.Typer(help="Shipped base models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
eval_app = typer.Typer(help="Evaluations (JSON on stdout, a report under runs/<id>/).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Run-config override KEY=VALUE (keys as in pyproject's \\[tool.flwr.app.config]); repeatable."),
]


def _parse_sets(overrides: list[str] | None) -> dict[str, bool | int | float | str]:
    """``--set KEY=VALUE`` items -> {key: value}; VALUE is TOML (``3``, ``true``, ``"x"``) or a bare string."""
    parsed: dict[str, bool | int | float | str] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            fail(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string
        parsed[key.strip()] = value
    return parsed


def _config(overrides: list[str] | None, **fixed: bool | int | float | str) -> RunConfig:
    flat: dict[str, bool | int | float | str] = dict(RunConfig().to_flat())
    flat.update(_parse_sets(overrides))
    flat.update(fixed)
    try:
        return RunConfig.from_flat(flat)
    except ConfigError as err:
        fail(str(err))


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("data/synth"),
    speakers: Annotated[int, typer.Option(min=1)] = 200,
    utterances: Annotated[int, typer.Option(min=1, help="Utterances per speaker.")] = 40,
    seed: int = 7,
    workers: Annotated[Optional[int], typer.Option(help="Processes (default: all cores).")] = None,
) -> None:
    """Synthesize the default voice-assistant corpus (espeak-ng): audio, manifest.jsonl, speakers.tsv."""
    from shared.data.synth import synthesize

    path = synthesize(out, speakers=speakers, utterances=utterances, seed=seed, workers=workers)
    typer.echo(f"Corpus: {path}")


@data_app.command("mix")
def data_mix(
    corpus: Annotated[
        Path, typer.Option(help="Corpus whose speakers talk (a `chorus data synth` corpus re-speaks through one device).")
    ],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("data/mix"),
    sessions: Annotated[int, typer.Option(min=1)] = 200,
    turns: Annotated[str, typer.Option(help="Turns per session, MIN-MAX; talkers alternate.")] = "2-4",
    max_overlap: Annotated[float, typer.Option(help="Overlap ratio drawn per session in [0, this].")] = 0.4,
    level_db: Annotated[float, typer.Option(help="Second talker's level drawn in [-this, +this] dB of the first's.")] = 0.0,
    lead: Annotated[
        str, typer.Option(help="Silence before the first turn, MIN-MAX seconds (0-0.5: some start at once).")
    ] = "0.2-0.5",
    seed: int = 7,
    workers: Annotated[Optional[int], typer.Option(help="Processes (default: all cores).")] = None,
) -> None:
    """Two-talker sessions with pauses and overlaps: audio, sessions.jsonl (turns with times and text)."""
    from shared.data.mix import MixError, load_sessions, mix_sessions

    try:
        low, high = (int(x) for x in turns.split("-"))
    except ValueError:
        fail(f"--turns {turns!r}: expected MIN-MAX, e.g. 2-4")
    try:
        lead_min, lead_max = (float(x) for x in lead.split("-"))
    except ValueError:
        fail(f"--lead {lead!r}: expected MIN-MAX seconds, e.g. 0.2-0.5")
    try:
        path = mix_sessions(
            corpus,
            out,
            sessions=sessions,
            seed=seed,
            turns=(low, high),
            max_overlap=max_overlap,
            level_db=level_db,
            lead=(lead_min, lead_max),
            workers=workers,
        )
    except MixError as err:
        fail(str(err))
    made = load_sessions(path)
    mean_overlap = sum(s.overlap for s in made) / len(made)
    typer.echo(f"Sessions: {path} ({len(made)} sessions, mean overlap ratio {mean_overlap:.3f})")


@data_app.command("prepare")
def data_prepare(set_: SetOption = None) -> None:
    """Synthesize (if needed), split speakers, train the tokenizer and fit CMVN for a run config."""
    from shared.data.corpora import CorpusError
    from shared.data.prepare import PrepareError, prepare

    try:
        prepared = prepare(_config(set_))
    except (CorpusError, PrepareError) as err:
        fail(str(err))
    split = prepared.split
    typer.echo(
        f"Corpus {prepared.corpus.root}: {len(prepared.corpus.utterances)} utterances, "
        f"{len(prepared.corpus.skipped)} skipped; speakers public {len(split.public)}, federated "
        f"{len(split.federated)}, held-out {len(split.heldout)}; artifacts {prepared.artifacts}"
    )


@app.command("simulate")
def simulate_cmd(
    clients: Annotated[int, typer.Option(min=2, help="Simulated devices (one speaker each).")] = 20,
    per_round: Annotated[
        Optional[int],
        typer.Option(min=1, help="Devices sampled per round for training (and, separately, for evaluation); default: all."),
    ] = None,
    rounds: Annotated[int, typer.Option(min=1)] = 3,
    parallel: Annotated[
        Optional[int],
        typer.Option(min=1, help="Devices training at once (Ray actors, one CPU each); default: the cores available."),
    ] = None,
    run_id: Annotated[str, typer.Option(help="runs/<run-id>/ (default: a timestamp).")] = "",
    resume: Annotated[bool, typer.Option(help="Finish run --run-id from its last completed round.")] = False,
    set_: SetOption = None,
) -> None:
    """A federated run in Flower's simulation engine (Ray) on the default corpus; writes runs/<id>/."""
    from shared.data.corpora import CorpusError
    from shared.data.prepare import PrepareError
    from simulations.simulate import SimulationError, available_cores, sampling_overrides, simulate

    per_round = clients if per_round is None else per_round
    if per_round > clients:
        fail(f"--per-round {per_round} exceeds --clients {clients}")
    parallel = available_cores() if parallel is None else parallel
    explicit = _parse_sets(set_)
    fixed: dict[str, bool | int | float | str] = {  # an explicit --set strategy.* key wins over --per-round
        k: v for k, v in sampling_overrides(clients, per_round, parallel=parallel).items() if k not in explicit
    }
    fixed.update({"num-server-rounds": rounds, "run-id": run_id, "resume": resume})
    cfg = _config(set_, **fixed)
    if cfg.corpus == "synth":
        needed = clients + cfg.split.public_speakers + cfg.split.heldout_speakers
        if cfg.synth.speakers < needed:
            cfg = _config(set_, **fixed, **{"synth.speakers": needed})
    try:
        run_dir = simulate(cfg, num_supernodes=clients, parallel=parallel)
    except (CorpusError, PrepareError, SimulationError) as err:
        fail(str(err))
    typer.echo(f"Report: {run_dir / 'report.md'}")


@app.command("simulate-multitalker")
def simulate_multitalker_cmd(
    devices: Annotated[list[Path], typer.Argument(help="One `chorus data mix` sessions folder per device.")],
    rounds: Annotated[int, typer.Option(min=1, help="FedAvg rounds.")] = 3,
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Multi-talker model to start from (default: the shipped sts-2.pt).")
    ] = None,
    local_steps: Annotated[int, typer.Option(help="AdamW steps per device per round.")] = 10,
    lr: Annotated[float, typer.Option(help="Devices' AdamW learning rate.")] = 1e-4,
    heldout: Annotated[int, typer.Option(help="Each device's last sessions: evaluated, never trained on.")] = 1,
    run_id: Annotated[str, typer.Option(help="runs/<run-id>/ (default: multitalker-federation).")] = "multitalker-federation",
    workdir: Annotated[Path, typer.Option(help="Where runs/ lives.")] = Path("."),
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Federated fine-tuning of the two-talker model: each device holds two-talker sessions (only updates and word-error
    counts leave it); prints the devices' pooled held-out WER before the first round and after each."""
    import json

    from client.multitalker import MultitalkerDeviceError, MultitalkerRecipe
    from shared.data.mix import MixError
    from shared.models.checkpoint import SHIPPED_DIR, CheckpointError
    from shared.multitalker import SHIPPED_MULTITALKER
    from simulations.federated_multitalker import run

    run_dir = workdir.resolve() / "runs" / run_id
    try:
        recipe = MultitalkerRecipe(local_steps=local_steps, lr=lr, heldout=heldout)
        result = run(
            (checkpoint or SHIPPED_DIR / SHIPPED_MULTITALKER).resolve(),
            [d.resolve() for d in devices],
            recipe,
            rounds=rounds,
            run_dir=run_dir,
        )
    except (MixError, CheckpointError, MultitalkerDeviceError) as err:
        fail(str(err))
    if json_:
        typer.echo(json.dumps(result))
        return
    for row in result["rounds"]:
        typer.echo(
            f"round {row['round']}: held-out WER {row['wer']} ({row['word_errors']} errors / {row['words']} words)"
            + (f", {row['replies']} devices trained, loss {row['train_loss']}" if row["round"] else " (before training)")
        )
    typer.echo(f"Global model: {result['model']}")


@app.command("train")
def train_cmd(
    steps: Annotated[int, typer.Option(min=1)] = 3000,
    run_id: Annotated[str, typer.Option(help="runs/<run-id>/ (default: train-<timestamp>).")] = "",
    resume: Annotated[bool, typer.Option(help="Continue run --run-id from its last checkpoint.")] = False,
    speakers: Annotated[str, typer.Option(help="public (default) or train (public + federated).")] = "public",
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    arbitrator_lr: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Peak learning rate of an amortized model's arbitrators (default: --lr). Fresh arbitrators on a "
            "trained dense checkpoint need a from-scratch rate (e.g. 2e-3) while the blocks fine-tune gently.",
        ),
    ] = 0.0,
    eval_every: Annotated[int, typer.Option(min=1)] = 500,
    ckpt_every: Annotated[
        int,
        typer.Option(min=1, help="Steps between checkpoints (and reshuffles); a GPU run takes more, e.g. 1000."),
    ] = 250,
    device: Annotated[str, typer.Option(help="torch device to train on: cpu (default) or e.g. cuda.")] = "cpu",
    average: Annotated[
        int, typer.Option(min=0, help="Also write averaged.pt, the mean of the last N checkpoints (--ckpt-every apart).")
    ] = 0,
    max_minutes: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Wall-clock budget (0: none): after the first checkpoint the run fits --steps to it, so the whole "
            "learning-rate schedule ends in time (a leased GPU).",
        ),
    ] = 0.0,
    withhold: Annotated[
        str,
        typer.Option(
            help="ATTRIBUTE=V1,V2: train without the speakers whose speakers.tsv ATTRIBUTE is one of the values "
            "(e.g. accent=en-029,en-gb-scotland: a public pool collected without those markets)."
        ),
    ] = "",
    set_: SetOption = None,
) -> None:
    """Central pretraining on the public speakers (checkpoints, resume, SpecAugment, held-out WER)."""
    from datetime import datetime, timezone

    from simulations.train import TrainPlan, train_central

    cfg = _config(set_)
    run_id = run_id or "train-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        plan = TrainPlan(
            steps=steps,
            peak_lr=lr,
            arbitrator_lr=arbitrator_lr,
            eval_every=eval_every,
            ckpt_every=ckpt_every,
            speakers=speakers,
            device=device,
            average=average,
            withhold=withhold,
            max_minutes=max_minutes,
        )
        best = train_central(cfg, plan, run_dir=cfg.workdir_path / "runs" / run_id, resume=resume)
    except ValueError as err:  # a bad --speakers, --device or --withhold, named
        fail(str(err))
    typer.echo(f"Best checkpoint: {best}")


@bench_app.command("compute")
def bench_compute_cmd(
    quick: Annotated[bool, typer.Option(help="Tiny settings for CI (minutes); numbers prove the pipeline only.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    bench_id: Annotated[str, typer.Option(help="runs/<bench-id>/ (default: bench-compute[-quick]).")] = "",
    reuse: Annotated[bool, typer.Option(help="Reuse models already trained under runs/<bench-id>/.")] = True,
    workdir: Annotated[Path, typer.Option(help="Where data/, artifacts/ and runs/ live.")] = Path("."),
    train_device: Annotated[
        str, typer.Option(help="torch device for training the models (e.g. cuda); measurements always run on the CPU.")
    ] = "cpu",
    shipped: Annotated[
        bool, typer.Option(help="Measure the shipped dense, amortized and ConvRNN-T bases as they are (no training).")
    ] = False,
    beam: Annotated[
        int,
        typer.Option(
            min=1, help="Also measure every model under modified beam search of this width, streamed (1 = greedy only)."
        ),
    ] = 1,
    chunk_ms: Annotated[
        int, typer.Option(min=10, help="Audio per streaming call for FLOPs and wall time, ms (a multiple of 10).")
    ] = 160,
) -> None:
    """Dense vs sliding-window vs ConvRNN-T vs compute-amortized Transformer: WER, FLOPs, batch-1 RTF."""
    if chunk_ms % 10:
        fail(f"--chunk-ms {chunk_ms}: a chunk is a whole number of 10 ms feature frames")
    from simulations.bench_compute import main

    main(
        quick=quick,
        workdir=workdir.resolve(),
        bench_id=bench_id or ("bench-compute" + ("-shipped" if shipped else "") + ("-quick" if quick else "")),
        reuse=reuse,
        as_json=json_,
        train_device=train_device,
        shipped=shipped,
        beam=beam,
        chunk_ms=chunk_ms,
    )


@bench_app.command("multitalker")
def bench_multitalker_cmd(
    quick: Annotated[bool, typer.Option(help="Tiny settings for CI (minutes); numbers prove the pipeline only.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    bench_id: Annotated[str, typer.Option(help="runs/<bench-id>/ (default: bench-multitalker[-quick]).")] = "",
    reuse: Annotated[bool, typer.Option(help="Reuse models already trained under runs/<bench-id>/.")] = True,
    workdir: Annotated[Path, typer.Option(help="Where data/ and runs/ live.")] = Path("."),
    steps: Annotated[Optional[int], typer.Option(min=1, help="Training steps of each system (default: the plan's).")] = None,
    continue_from: Annotated[
        str,
        typer.Option(help="A run under WORKDIR/runs whose three systems this run trains further (default: start from the base)."),
    ] = "",
    train_device: Annotated[
        str, typer.Option(help="torch device for training the systems (e.g. cuda); measurements always run on the CPU.")
    ] = "cpu",
    beam: Annotated[
        int,
        typer.Option(
            min=1, help="Search for scored and streamed sessions: 1 = greedy; more = modified beam search, chunk by chunk."
        ),
    ] = 1,
    activity_weight: Annotated[
        Optional[float],
        typer.Option(min=0.0, help="Weight of the two-channel systems' turn-activity loss (default: the plan's; 0: none)."),
    ] = None,
) -> None:
    """Separator-transducer-segmenter vs MT-RNN-T on two-talker sessions: WER, turn counting, end-of-turn latency."""
    import json
    from dataclasses import replace

    from simulations.bench_multitalker import FULL, QUICK, run_multitalker_bench

    plan = QUICK if quick else FULL
    plan = replace(plan, steps=steps) if steps is not None else plan
    plan = replace(plan, init_run=f"runs/{continue_from}") if continue_from else plan
    plan = replace(plan, beam=beam)
    plan = replace(plan, activity_weight=activity_weight) if activity_weight is not None else plan
    workdir = workdir.resolve()
    run_dir = workdir / "runs" / (bench_id or ("bench-multitalker-quick" if quick else "bench-multitalker"))
    try:
        result = run_multitalker_bench(plan, run_dir=run_dir, workdir=workdir, reuse=reuse, train_device=train_device)
    except FileNotFoundError as err:
        fail(str(err))
    if json_:
        typer.echo(json.dumps(result))
    else:
        typer.echo((run_dir / "report.md").read_text())


@model_app.command("ship")
def model_ship_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A `chorus train` checkpoint (runs/<id>/checkpoints/best.pt).")],
    name: Annotated[str, typer.Option(help="File name under shared/models/shipped/ (without .pt).")],
    command: Annotated[str, typer.Option(help="The exact command that trained it (recorded in the manifest).")],
    hardware: Annotated[str, typer.Option(help="Where it trained, e.g. '2-core CPU'.")],
    eval_corpus: Annotated[Path, typer.Option(help="Unseen speakers to measure it on (a `chorus data synth` corpus).")],
    eval_command: Annotated[str, typer.Option(help="The command that made --eval-corpus.")],
    built_on: Annotated[
        str,
        typer.Option(
            help="What a fine-tuned checkpoint started from, e.g. 'dense-6.pt of commit C (sha256 S)': recorded as built_on."
        ),
    ] = "",
) -> None:
    """Ship a trained checkpoint: float16 copy with its front end, sha256 and measured WER in the manifest."""
    import json

    from simulations.ship import ship

    entry = ship(
        checkpoint.resolve(),
        name=name,
        command=command,
        hardware=hardware,
        eval_corpus=eval_corpus.resolve(),
        eval_command=eval_command,
        built_on=built_on,
    )
    print(json.dumps({k: entry[k] for k in ("sha256", "bytes", "parameters")} | {"wer": entry["eval"]["wer"]}))


@model_app.command("ship-multitalker")
def model_ship_multitalker_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A `chorus bench multitalker` run directory (runs/bench-multitalker).")],
    command: Annotated[str, typer.Option(help="The exact commands that made it (recorded in the manifest).")],
    hardware: Annotated[str, typer.Option(help="Where it trained, e.g. '2-core CPU'.")],
    arm: Annotated[str, typer.Option(help="Which of the run's systems ships.")] = "sts+penalty",
    turn_bonus: Annotated[
        str,
        typer.Option(
            help="START,END: added to the logits of <sot> (or MT-RNN-T's <sc>) and of <eot> in search (default: the "
            "bonus the run chose on validation sessions, else 0,0)."
        ),
    ] = "",
) -> None:
    """Ship a two-talker model as shared/models/shipped/sts-2.pt with its manifest entry (re-scored in float16)."""
    from simulations.ship import ship_multitalker

    bonus: tuple[float, float] | None = None
    if turn_bonus:
        try:
            sot, eot = (float(x) for x in turn_bonus.split(","))
        except ValueError:
            fail(f"--turn-bonus must be two numbers START,END, got {turn_bonus!r}")
        bonus = (sot, eot)
    if not (run_dir / f"{arm}.pt").is_file() or not (run_dir / "result.json").is_file():
        fail(f"{run_dir}: no {arm}.pt and result.json (run `chorus bench multitalker` first)")
    entry = ship_multitalker(run_dir, arm=arm, command=command, hardware=hardware, turn_bonus=bonus)
    typer.echo(f"shipped {arm}: WER {entry['eval']['all']['wer']:.3f} on {entry['eval']['sessions']} unseen sessions")


@model_app.command("average")
def model_average_cmd(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints of one model (e.g. a run's step<S>.pt).")],
    out: Annotated[Path, typer.Option(help="Where to write the averaged checkpoint.")],
) -> None:
    """Average the weights of checkpoints of one model (what `chorus train --average N` writes as averaged.pt)."""
    from shared.models.checkpoint import CheckpointError, average_checkpoints, save_checkpoint

    try:
        averaged = average_checkpoints(checkpoints)
    except CheckpointError as err:
        fail(str(err))
    meta = {k: v for k, v in averaged.meta.items() if k != "frontend"}
    path = save_checkpoint(out, averaged.build(), averaged.model_config, frontend=averaged.frontend, **meta)
    typer.echo(f"averaged {len(checkpoints)} checkpoints into {path}")


@model_app.command("train-verifier")
def model_train_verifier_cmd(
    corpus: Annotated[Path, typer.Option(help="Public speakers to train on (a `chorus data synth` corpus).")],
    out: Annotated[Path, typer.Option(help="Where baseline.pt, arw.pt and training.json go.")] = Path("runs/verifier"),
    quick: Annotated[bool, typer.Option(help="The CI-sized plan (tiny model, few steps).")] = False,
) -> None:
    """Train the on-device speaker verifier twice (pairwise loss; with and without pairwise ARW) and calibrate it."""
    import json

    from simulations.eval_verification import FULL, QUICK, VerificationError, train_verifiers

    try:
        record = train_verifiers(corpus.resolve(), QUICK if quick else FULL, out.resolve())
    except VerificationError as err:
        fail(str(err))
    print(json.dumps(record))


@model_app.command("ship-verifiers")
def model_ship_verifiers_cmd(
    trained: Annotated[Path, typer.Argument(help="What `chorus model train-verifier` wrote (its --out).")],
    command: Annotated[str, typer.Option(help="The exact command that trained them (recorded in the manifest).")],
    hardware: Annotated[str, typer.Option(help="Where they trained, e.g. '2-core CPU'.")],
    eval_corpus: Annotated[Path, typer.Option(help="Unseen speakers to measure them on (a `chorus data synth` corpus).")],
    eval_command: Annotated[str, typer.Option(help="The command that made --eval-corpus.")],
) -> None:
    """Ship both verifiers: float16 with CMVN and threshold, sha256 and measured EER in the manifest."""
    import json

    from simulations.eval_verification import VerificationError
    from simulations.ship import ship_verifiers

    if not (trained / "training.json").is_file():
        fail(f"{trained}: no training.json (run `chorus model train-verifier --out {trained}` first)")
    try:
        entries = ship_verifiers(
            trained.resolve(), command=command, hardware=hardware, eval_corpus=eval_corpus.resolve(), eval_command=eval_command
        )
    except VerificationError as err:
        fail(str(err))
    print(
        json.dumps(
            {
                name: {"sha256": e["sha256"], "bytes": e["bytes"], "eer": e["eval"]["eer"], "threshold": e["threshold"]}
                for name, e in entries.items()
            }
        )
    )


@model_app.command("center-verifier")
def model_center_verifier_cmd(
    corpus: Annotated[
        Path, typer.Option(help="Public speech of the domain the devices will hear (every speaker is the cohort).")
    ],
    out: Annotated[Path, typer.Option(help="The centered verifier file to write.")],
    verifier: Annotated[Optional[Path], typer.Option(help="The verifier to adapt (default: the shipped baseline).")] = None,
) -> None:
    """Adapt a verifier to a speech domain: subtract the cohort's mean embedding before scoring and recalibrate
    the threshold on the cohort's trials (same target false-acceptance rate)."""
    import json

    from shared.models.speaker_embedding import shipped_verifier
    from simulations.eval_verification import FULL, VerificationError, center_on_corpus

    try:
        source = (verifier or shipped_verifier("baseline")).resolve()
        record = center_on_corpus(source, corpus.resolve(), out.resolve(), plan=FULL)
    except VerificationError as err:
        fail(str(err))
    print(json.dumps(record))


@eval_app.command("wer")
def eval_wer_cmd(
    corpus: Annotated[Path, typer.Option(help="Any corpus directory `load_corpus` reads (e.g. `chorus data synth`'s).")],
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="A `chorus train` checkpoint (default: the shipped base model).")
    ] = None,
    by: Annotated[
        str, typer.Option(help="Comma-separated speakers.tsv attributes, e.g. accent,fleet,age_group (speaker: per speaker).")
    ] = "",
    beam: Annotated[int, typer.Option(min=1, help="1 = greedy search (streaming); more = modified beam search.")] = 1,
    limit: Annotated[int, typer.Option(min=0, help="Decode at most this many utterances (0 = all).")] = 0,
    lead_silence: Annotated[
        float,
        typer.Option(min=0.0, max=10.0, help="Seconds of each recording's own noise floor before it: speech that begins late."),
    ] = 0.0,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """WER of a checkpoint on a corpus, overall and per speaker attribute."""
    import json
    import sys

    from simulations.eval_wer import EvalWerError, default_checkpoint, evaluate_wer

    try:
        result = evaluate_wer(
            checkpoint or default_checkpoint(),
            corpus.resolve(),
            by=[b.strip() for b in by.split(",") if b.strip()],
            beam=beam,
            limit=limit,
            lead_silence_s=lead_silence,
        )
    except (EvalWerError, ValueError) as err:
        fail(str(err))
    if json_:
        print(json.dumps(result))
        return
    typer.echo(
        f"WER {result['wer']:.4f} over {result['words']} words, {result['utterances']} utterances "
        f"({result['skipped']} skipped), beam {beam}"
        + (f", {lead_silence:g} s of leading noise floor" if lead_silence else "")
        + (f"; sub-blocks executed {result['executed_share']:.1%}" if "executed_share" in result else "")
    )
    for name, values in result["by"].items():
        typer.echo(f"  by {name}: " + ", ".join(f"{v} {w:.4f}" for v, w in values.items()))
    sys.stdout.flush()


@eval_app.command("verification")
def eval_verification_cmd(
    quick: Annotated[
        bool, typer.Option(help="CI-sized: train tiny verifiers on a tiny corpus; proves the pipeline only.")
    ] = False,
    corpus: Annotated[
        Optional[Path],
        typer.Option(help="Unseen speakers (any corpus; speakers.tsv gives the cohorts). Default: a synthesized one."),
    ] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="Baseline verifier (default: the shipped one).")] = None,
    arw: Annotated[Optional[Path], typer.Option(help="ARW verifier (default: the shipped one).")] = None,
    public: Annotated[
        Optional[Path],
        typer.Option(
            help="Public speakers whose centroids are the devices' impostors in federated fine-tuning (default: the "
            "verifiers' public synthetic pool, synthesized)."
        ),
    ] = None,
    public_share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.99,
            help="Instead of --public: this share of the corpus' own speakers is the public pool (public speech of the "
            "devices' domain: the impostors, and the centering cohort), neither devices nor tested.",
        ),
    ] = 0.0,
    center: Annotated[
        bool,
        typer.Option(
            help="Also score every arm centered and recalibrated on a cohort never in a trial (the --public-share "
            "pool, else the federated half's speakers): arms baseline+center, arw+center, federated+center, ..."
        ),
    ] = False,
    tune: Annotated[
        bool,
        typer.Option(
            help="Also fine-tune the baseline centrally on the --public-share pool with the pairwise loss, plainly and "
            "with pairwise ARW: arms tuned, tuned+arw."
        ),
    ] = False,
    workdir: Annotated[Path, typer.Option(help="Where data/ and runs/ live.")] = Path("."),
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Speaker verification: EER, minDCF and their gaps across cohorts for the baseline, pairwise ARW, and the
    baseline fine-tuned federatedly on half of the corpus' speakers (plainly and with ARW); the other half is tested."""
    import json

    from shared.data.synth import synthesize
    from shared.models.speaker_embedding import shipped_verifier
    from simulations.eval_verification import FULL, QUICK, VerificationError, evaluate_verification, train_verifiers

    if tune and not public_share:  # before any synthesis
        fail("--tune trains on the in-domain public pool: it needs a public share (--public-share)")
    workdir = workdir.resolve()
    out = workdir / "runs" / ("eval-verification-quick" if quick else "eval-verification")
    plan = QUICK if quick else FULL
    try:
        if quick:
            train = synthesize(workdir / "data" / "synth-sv-quick-train", speakers=30, utterances=6, seed=5, progress=False)
            train_verifiers(train, plan, out / "models", log=lambda _: None)
            models = {"baseline": out / "models" / "baseline.pt", "arw": out / "models" / "arw.pt"}
            if not public_share:
                public = public or train  # the quick verifiers' own public training speakers
        else:
            models = {"baseline": baseline or shipped_verifier("baseline"), "arw": arw or shipped_verifier("arw")}
        if public is None and not public_share:  # the shipped verifiers' public population (seed 1)
            speakers, utterances = plan.federated.public_speakers, plan.federated.public_utterances
            public = synthesize(
                workdir / "data" / f"synth-sv-public-seed1-{speakers}x{utterances}",
                speakers=speakers,
                utterances=utterances,
                seed=1,
                progress=not json_,
            )
        if corpus is None:
            speakers, utterances = (16, 6) if quick else (120, 8)
            corpus = synthesize(
                workdir / "data" / f"synth-sv-seed98-{speakers}x{utterances}",
                speakers=speakers,
                utterances=utterances,
                seed=98,
                progress=not json_,
            )
        result = evaluate_verification(
            corpus.resolve(),
            {k: v.resolve() for k, v in models.items()},
            plan,
            out,
            public=public.resolve() if public else None,
            public_share=public_share,
            center=center,
            tune=tune,
        )
    except VerificationError as err:
        fail(str(err))
    if json_:
        print(json.dumps(result))
        return
    typer.echo((out / "report.md").read_text())
    typer.echo(f"report: {out / 'report.md'}")


@eval_app.command("privacy")
def eval_privacy_cmd(
    quick: Annotated[bool, typer.Option(help="Tiny settings for CI (under 5 min); numbers prove the pipeline only.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(help="Base model (a `chorus train` checkpoint) instead of training one on the public speakers."),
    ] = None,
    eval_id: Annotated[str, typer.Option(help="runs/<eval-id>/ (default: eval-privacy[-quick]).")] = "",
    reuse: Annotated[bool, typer.Option(help="Reuse a base model already trained under runs/<eval-id>/.")] = True,
    workdir: Annotated[Path, typer.Option(help="Where data/, artifacts/ and runs/ live.")] = Path("."),
    devices: Annotated[Optional[int], typer.Option(min=2, help="Federated devices (default: the plan's).")] = None,
    noise_multipliers: Annotated[
        str, typer.Option(help="DP noise multipliers, comma-separated, e.g. 0.5,1,1.5,2 (default: the plan's).")
    ] = "",
    markets: Annotated[
        Optional[str],
        typer.Option(
            help="Devices and held-out speakers only of these accents, comma-separated, or 'any' (default: the "
            "plan's; full: the launch base's new markets en-029,en-gb-scotland,en-gb-x-gbcwmd)."
        ),
    ] = None,
    set_: SetOption = None,
) -> None:
    """Local DP-SGD: epsilon vs held-out WER (non-DP + 3 noise levels), DP step time, membership-inference AUC."""
    from dataclasses import replace

    from shared.data.synth import ACCENTS
    from shared.data.corpora import CorpusError
    from shared.data.prepare import PrepareError
    from simulations.eval_privacy import FULL, QUICK, main

    plan = (QUICK if quick else FULL).with_overrides(_parse_sets(set_))
    if devices is not None:
        plan = replace(plan, devices=devices)
    if markets is not None:
        chosen = () if markets == "any" else tuple(m.strip() for m in markets.split(",") if m.strip())
        unknown = [m for m in chosen if m not in ACCENTS]
        if unknown or markets != "any" and not chosen:
            fail(f"--markets {markets!r}: {unknown or 'no accent'} is not one of {', '.join(ACCENTS)} (or 'any')")
        plan = replace(plan, markets=chosen)
    if noise_multipliers:
        try:
            sigmas = tuple(float(x) for x in noise_multipliers.split(","))
        except ValueError as err:
            fail(f"--noise-multipliers {noise_multipliers!r}: {err}")
        plan = replace(plan, noise_multipliers=sigmas)
    try:
        main(
            plan,
            workdir=workdir.resolve(),
            eval_id=eval_id or ("eval-privacy-quick" if quick else "eval-privacy"),
            checkpoint=checkpoint.resolve() if checkpoint else None,
            reuse=reuse,
            as_json=json_,
        )
    except (FileNotFoundError, CorpusError, PrepareError) as err:  # no launch base shipped and none given; too few devices
        fail(str(err))


@eval_app.command("device-dp")
def eval_device_dp_cmd(
    population: Annotated[str, typer.Option(help="Comma-separated device populations.")] = "200,1000,10000,100000,1000000",
    per_round: Annotated[int, typer.Option(min=1, help="Devices sampled per round (central-dp.sampled-clients).")] = 30,
    rounds: Annotated[str, typer.Option(help="Comma-separated numbers of rounds.")] = "5,50,500",
    noise: Annotated[str, typer.Option(help="Comma-separated noise multipliers (central-dp.noise-multiplier).")] = "0.5,1,2,4",
    delta: Annotated[float, typer.Option(help="delta of (epsilon, delta); keep it below 1 / population.")] = 1e-5,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Device-level epsilon of central DP (strategy.central-dp) by population, rounds and noise: what a run would
    spend, from Opacus' RDP accountant (the same accounting every central-DP round reports)."""
    from shared.privacy.dp import WIDE_ORDERS, AccountantState

    try:
        populations = [int(p) for p in population.split(",")]
        round_counts = [int(r) for r in rounds.split(",")]
        sigmas = [float(n) for n in noise.split(",")]
        if min(populations) < per_round or min(round_counts) < 1 or min(sigmas) <= 0 or not 0 < delta < 1:
            raise ValueError("populations must be >= --per-round, rounds >= 1, noise > 0 and delta in (0, 1)")
    except ValueError as err:
        fail(f"--population {population!r} --rounds {rounds!r} --noise {noise!r} --delta {delta}: {err}")
    table = [
        {
            "population": n,
            "rounds": r,
            "noise_multiplier": sigma,
            "sample_rate": per_round / n,
            "epsilon": round(
                AccountantState()
                .after(noise_multiplier=sigma, sample_rate=per_round / n, steps=r)
                .epsilon(delta, orders=WIDE_ORDERS),
                3,
            ),
        }
        for n in populations
        for r in round_counts
        for sigma in sigmas
    ]
    if json_:
        print(json.dumps({"per_round": per_round, "delta": delta, "accountant": "opacus RDP", "table": table}))
        return
    typer.echo(f"device-level epsilon at delta {delta}, {per_round} devices per round (Opacus RDP accountant)")
    typer.echo("population  rounds  " + "  ".join(f"sigma={s:g}".rjust(10) for s in sigmas))
    for n in populations:
        for r in round_counts:
            cells = [row["epsilon"] for row in table if row["population"] == n and row["rounds"] == r]
            typer.echo(f"{n:>10}  {r:>6}  " + "  ".join(f"{e:10.2f}" for e in cells))


@eval_app.command("federation")
def eval_federation_cmd(
    quick: Annotated[bool, typer.Option(help="Tiny settings for CI (minutes); numbers prove the pipeline only.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(help="The launch base (a `chorus train --withhold accent=...` checkpoint); default: the shipped one."),
    ] = None,
    devices: Annotated[Optional[int], typer.Option(min=1, help="Simulated devices (default: the plan's).")] = None,
    per_round: Annotated[Optional[int], typer.Option(min=1, help="Devices sampled per round (default: the plan's).")] = None,
    rounds: Annotated[Optional[int], typer.Option(min=1, help="Federated rounds (default: the plan's).")] = None,
    sweep: Annotated[
        bool,
        typer.Option(help="Choose the devices' local recipe by the plan's sweep first (--no-sweep: the plan's and --set's)."),
    ] = True,
    eval_id: Annotated[str, typer.Option(help="runs/<eval-id>/ (default: eval-federation[-quick]).")] = "",
    workdir: Annotated[Path, typer.Option(help="Where data/, artifacts/ and runs/ live.")] = Path("."),
    set_: SetOption = None,
) -> None:
    """New markets: a launch base that never heard them, federated with devices of every market; WER per market
    per round on the devices' own utterances and on held-out speakers."""
    from shared.models.checkpoint import CheckpointError, load_checkpoint
    from shared.data.corpora import CorpusError
    from shared.data.prepare import PrepareError
    from simulations.eval_federation import FULL, QUICK, main

    try:
        plan = (QUICK if quick else FULL).with_overrides(
            _parse_sets(set_), devices=devices, per_round=per_round, rounds=rounds, sweep=sweep
        )
        if checkpoint is not None:
            load_checkpoint(checkpoint)  # a missing or corrupt launch base, named before anything runs
    except (ConfigError, ValueError, CheckpointError) as err:
        fail(str(err))
    try:
        main(
            plan,
            workdir=workdir.resolve(),
            eval_id=eval_id or ("eval-federation-quick" if quick else "eval-federation"),
            checkpoint=checkpoint.resolve() if checkpoint else None,
            as_json=json_,
        )
    except (FileNotFoundError, CorpusError, PrepareError) as err:  # no launch base shipped and none given; too few devices
        fail(str(err))


@eval_app.command("fairness")
def eval_fairness_cmd(
    quick: Annotated[bool, typer.Option(help="Tiny settings for CI (under 5 min); numbers prove the pipeline only.")] = False,
    corpus: Annotated[
        Optional[str],
        typer.Option(
            help="Only this corpus ('synth' or a corpus directory); default: synth and ../shared/data/speechocean762-dev."
        ),
    ] = None,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(help="Base model (a `chorus train` checkpoint) instead of training one on the public speakers."),
    ] = None,
    eval_id: Annotated[str, typer.Option(help="runs/<eval-id>/ (default: eval-fairness[-quick]).")] = "",
    workdir: Annotated[Path, typer.Option(help="Where data/, artifacts/ and runs/ live.")] = Path("."),
    arms: Annotated[
        str,
        typer.Option(
            help="Comma-separated arms (default: fedavg,ewc,arw,ewc+arw,qfedavg,fedavg+personal); also targeted, "
            "arw-batch, ewc+arw-batch, arw+personal."
        ),
    ] = "",
    set_: SetOption = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object (default: the report).")] = False,
) -> None:
    """Fairness without demographics: FedAvg vs +EWC vs +ARW vs +both vs q-FedAvg vs on-device personalization;
    automatic vs metadata cohorts."""
    from dataclasses import replace

    from simulations.eval_fairness import ARMS, FULL, QUICK, check_inputs, main

    try:
        plan = (QUICK if quick else FULL).with_overrides(_parse_sets(set_))
    except ConfigError as err:
        fail(str(err))
    if arms:
        chosen = tuple(a.strip() for a in arms.split(",") if a.strip())
        unknown = [a for a in chosen if a not in ARMS]
        if unknown or not chosen:
            fail(f"--arms {arms!r}: {unknown or 'none'} not among {', '.join(ARMS)}")
        plan = replace(plan, arms=chosen)
    try:
        check_inputs(corpus, checkpoint)
    except ValueError as err:
        fail(str(err))
    main(
        plan,
        workdir=workdir.resolve(),
        eval_id=eval_id or ("eval-fairness-quick" if quick else "eval-fairness"),
        corpus=corpus,
        checkpoint=checkpoint.resolve() if checkpoint else None,
        as_json=json_,
    )


@bench_app.command("synth")
def bench_synth_cmd(
    quick: Annotated[bool, typer.Option(help="4 speakers x 3 utterances (CI); default 40 x 10.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Corpus synthesis throughput (utterances/s): one worker vs every core, side by side."""
    from simulations.bench_synth import main

    main(quick=quick, as_json=json_)


@bench_app.command("federation")
def bench_federation_cmd(
    quick: Annotated[bool, typer.Option(help="Tiny settings for CI (minutes); numbers prove the pipeline only.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    clients: Annotated[Optional[int], typer.Option(min=2, help="Simulated devices (default 1000; --quick 20).")] = None,
    per_round: Annotated[Optional[int], typer.Option(min=1, help="Devices per round (default 50; --quick 5).")] = None,
    rounds: Annotated[Optional[int], typer.Option(min=1, help="Rounds (default 2; --quick 2).")] = None,
    parallel: Annotated[
        Optional[int],
        typer.Option(min=1, help="Devices training at once, in Flower and in the baseline (default: the cores available)."),
    ] = None,
    bench_id: Annotated[str, typer.Option(help="runs/<bench-id>/ (default: bench-federation[-quick]).")] = "",
    workdir: Annotated[Path, typer.Option(help="Where data/, artifacts/ and runs/ live.")] = Path("."),
    set_: SetOption = None,
) -> None:
    """Flower at scale: round wall time, peak memory of the process tree, overhead vs pure local training."""
    from simulations.bench_federation import FULL, QUICK, main

    plan = QUICK if quick else FULL
    try:
        plan = plan.with_changes(
            clients=clients, per_round=per_round, rounds=rounds, parallel=parallel, overrides=_parse_sets(set_)
        )
    except (ValueError, ConfigError) as err:
        fail(str(err))
    main(
        plan,
        workdir=workdir.resolve(),
        bench_id=bench_id or ("bench-federation-quick" if quick else "bench-federation"),
        as_json=json_,
    )


@bench_app.command("robustness")
def bench_robustness_cmd(
    quick: Annotated[bool, typer.Option(help="Tiny settings for CI (about a minute); numbers prove the pipeline only.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    attacks: Annotated[str, typer.Option(help="Comma-separated subset of nan,scaled,sign-flip,noise,shuffled.")] = "",
    defenses: Annotated[
        str,
        typer.Option(
            help="Comma-separated subset of fedavg,fedavg-no-norm-bound,fedmedian,fedtrimmedavg,krum,multikrum,bulyan,"
            "norm-clipping."
        ),
    ] = "",
    shares: Annotated[str, typer.Option(help="Comma-separated shares of malicious devices (default 0.1,0.2; quick 0.2).")] = "",
    bench_id: Annotated[str, typer.Option(help="runs/<bench-id>/ (default: bench-robustness[-quick]).")] = "",
    workdir: Annotated[Path, typer.Option(help="Where data/, artifacts/ and runs/ live.")] = Path("."),
    set_: SetOption = None,
) -> None:
    """Attacks x defenses x share of malicious devices: held-out WER after the rounds, beside the clean runs."""
    from simulations.bench_robustness import FULL, QUICK, main

    try:
        plan = (QUICK if quick else FULL).with_changes(
            attacks=attacks, defenses=defenses, shares=shares, overrides=_parse_sets(set_)
        )
    except (ValueError, ConfigError) as err:
        fail(str(err))
    main(
        plan,
        workdir=workdir.resolve(),
        bench_id=bench_id or ("bench-robustness-quick" if quick else "bench-robustness"),
        as_json=json_,
    )


@bench_app.command("faults")
def bench_faults_cmd(
    json_: Annotated[bool, typer.Option("--json", help="Print the outcome as one JSON object.")] = False,
    bench_id: Annotated[str, typer.Option(help="runs/<bench-id>/ (default: bench-faults).")] = "bench-faults",
    workdir: Annotated[Path, typer.Option(help="Where data/, artifacts/ and runs/ live.")] = Path("."),
) -> None:
    """A TLS deployment on loopback that loses a device mid-round and its SuperLink mid-run: what it recorded."""
    from simulations.bench_faults import main

    main(workdir=workdir.resolve(), bench_id=bench_id, as_json=json_)


if __name__ == "__main__":
    app()
