"""A device on its own: join a federation as a Flower SuperNode, or transcribe a recording as it streams.

``chorus device join`` starts Flower 1.42's ``flower-supernode`` bound to this device's data:

* ``--superlink HOST:PORT`` is the SuperLink's one HTTPS port; ``--root-certificates`` the CA that signed
  its certificate; ``--auth-supernode-private-key`` this device's OpenSSH EC private key, whose public half
  the operator registered (``chorus server start`` / ``flwr supernode register``). An unregistered key is
  refused: the SuperNode logs "Exit Code: 305 ... Failed to activate SuperNode" and exits with status 1.
* ``--node-config "data-dir='...' artifacts-dir='...'"``: Flower parses the value as TOML ``key=value``
  pairs; single quotes make a TOML literal string, so paths need no escaping unless they contain a
  single quote. The ClientApp reads both keys (``client.data.node_data``).
* ``--port`` is the SuperNode's own Runtime API port (where its ClientApp processes connect): one per
  SuperNode on a machine.

``chorus device transcribe`` pushes audio through the on-device pipeline chunk by chunk, exactly as a
microphone would: StreamingFbank -> global CMVN -> ``Transducer.stream`` (greedy search, or with ``--beam N``
modified beam search carried from chunk to chunk); it prints partial hypotheses as they grow, the final text, the
real-time factor, and (amortized model) the share of encoder compute its gates skipped. With ``--talkers 2`` it
runs the separator-transducer-segmenter instead (a ``chorus bench multitalker`` model, the shipped one by default):
each channel's partial words and the turn boundaries (``<sot>``, ``<eot>``) as the chunks arrive.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from shared.config import search_name
from shared.console import fail
from shared.processes import interrupt, stop_tree

# torch, the model and the audio stack load inside `transcribe`: `chorus --help` and `device join` stay fast.
if TYPE_CHECKING:
    import numpy as np

    from shared.data.features import GlobalCMVN
    from shared.data.tokenizer import Tokenizer

__all__ = [
    "DeviceError",
    "MultiTalkerTranscript",
    "Personalization",
    "Transcript",
    "device_cli",
    "node_config_arg",
    "personalize_device",
    "start_supernode",
    "stop_supernode",
    "transcribe",
    "transcribe_talkers",
]


class DeviceError(ValueError):
    """A device command cannot run as asked; the message names the file, directory or address."""


# -- joining a federation -----------------------------------------------------------------------------------


def _toml_path(path: Path) -> str:
    text = str(path)
    if "'" not in text and "\n" not in text:
        return f"'{text}'"  # TOML literal string: taken verbatim
    if '"' not in text and "\\" not in text and "\n" not in text:
        return f'"{text}"'
    raise DeviceError(
        f"{text!r}: Flower's --node-config cannot carry a path with both quote kinds or a newline; move the directory"
    )


def node_config_arg(*, data_dir: Path, artifacts_dir: Path) -> str:
    """The ``--node-config`` value binding a SuperNode to this device's data and the public artifacts."""
    return f"data-dir={_toml_path(data_dir)} artifacts-dir={_toml_path(artifacts_dir)}"


def _flower_executable(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise DeviceError(f"`{name}` is not installed in {Path(sys.executable).parent} or on PATH (pip install flwr)")
    return found


def _check_file(path: Path, what: str) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DeviceError(f"{what} {path}: no such file")
    return path


def start_supernode(
    *,
    superlink: str,
    data_dir: Path,
    artifacts_dir: Path,
    root_cert: Path,
    auth_key: Path | None,
    port: int,
    host: str = "127.0.0.1",
    state_dir: Path | None = None,
    log_file: Path | None = None,
    max_retries: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``flower-supernode`` for this device (see the module docstring for the flags).

    Its FLWR_HOME (where it unpacks the app) and log (default ``state_dir/supernode.log``) live in
    ``state_dir`` (default ``data_dir/../.supernode-<port>``). It runs in its own session: stop it with
    :func:`stop_supernode`. Returns at once.

    Raises:
        DeviceError: a directory or key/certificate file is missing, or the address has no port.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    artifacts_dir = Path(artifacts_dir).expanduser().resolve()
    for directory, what in ((data_dir, "data directory"), (artifacts_dir, "artifacts directory")):
        if not directory.is_dir():
            raise DeviceError(f"{what} {directory}: no such directory")
    if ":" not in superlink:
        raise DeviceError(f"--superlink {superlink!r}: expected HOST:PORT of the SuperLink")
    root_cert = _check_file(root_cert, "root certificate")
    state_dir = Path(state_dir or data_dir.parent / f".supernode-{port}").resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_file) if log_file is not None else state_dir / "supernode.log"
    cmd = [
        _flower_executable("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(root_cert),
        "--host",
        host,
        "--port",
        str(port),
        "--node-config",
        node_config_arg(data_dir=data_dir, artifacts_dir=artifacts_dir),
    ]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(_check_file(auth_key, "SuperNode private key"))]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # flwr-clientapp by name
    env["FLWR_HOME"] = str(state_dir / "flwr")
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=state_dir, start_new_session=True
        )


def stop_supernode(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> int | None:
    """SIGTERM the SuperNode and the processes it started; SIGKILL what is left after ``timeout``.
    Returns the SuperNode's exit status (None if it could not be reaped)."""
    return stop_tree(proc, timeout)


@dataclass(frozen=True)
class Transcript:
    """What :func:`transcribe` returns.

    Attributes:
        text: the final hypothesis.
        audio_seconds: duration of the input.
        compute_seconds: wall time spent in features, encoder and search (not in loading).
        skipped_share: share of encoder sub-block executions the amortized model's gates skipped (0 for dense).
        native_rate: the file's sample rate (resampled to 16 kHz when different).
        model_name: the checkpoint's ``model.name``.
    """

    text: str
    audio_seconds: float
    compute_seconds: float
    skipped_share: float
    native_rate: int
    model_name: str

    @property
    def rtf(self) -> float:
        """Real-time factor: compute time / audio time (below 1 keeps up with a live microphone)."""
        return self.compute_seconds / self.audio_seconds if self.audio_seconds else 0.0


def _load_artifacts(artifacts: Path, vocab_size: int) -> tuple[Tokenizer, GlobalCMVN]:
    from shared.data.features import FeatureError, GlobalCMVN
    from shared.data.tokenizer import Tokenizer, TokenizerError

    artifacts = Path(artifacts).expanduser().resolve()
    if not artifacts.is_dir():
        raise DeviceError(f"artifacts directory {artifacts}: no such directory")
    try:
        return Tokenizer.load(artifacts / f"tokenizer-{vocab_size}.model"), GlobalCMVN.load(artifacts / "cmvn.json")
    except (TokenizerError, FeatureError) as err:
        raise DeviceError(
            f"{err} (expected the artifacts `chorus data prepare` wrote for model.vocab-size={vocab_size})"
        ) from err


def transcribe(
    audio: Path,
    *,
    checkpoint: Path,
    artifacts: Path,
    chunk_ms: int = 160,
    beam: int = 1,
    on_partial: Callable[[str], None] | None = None,
) -> Transcript:
    """Stream ``audio`` through the device pipeline in ``chunk_ms`` pieces; ``on_partial(text)`` is called each
    time the hypothesis changes. ``beam`` 1 is greedy search; wider is modified beam search carried across chunks
    (its best hypothesis so far is the partial text, which a later chunk may revise).

    Raises:
        DeviceError: a missing or unreadable audio file, checkpoint or artifact (the message names it), or a
            bad ``chunk_ms`` or ``beam``.
    """
    import torch

    from shared.data.audio import SAMPLE_RATE
    from shared.data.features import StreamingFbank
    from shared.models.amortized_transformer import AmortizedTransformerEncoder
    from shared.models.checkpoint import CheckpointError, load_checkpoint

    _check_search(chunk_ms, beam)
    audio = Path(audio).expanduser()
    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as err:
        raise DeviceError(str(err)) from err
    tokenizer, cmvn = _load_artifacts(artifacts, ckpt.model_config.vocab_size)
    if tokenizer.vocab_size != ckpt.model_config.vocab_size:
        raise DeviceError(
            f"tokenizer in {artifacts} has {tokenizer.vocab_size} pieces, checkpoint {checkpoint} "
            f"expects {ckpt.model_config.vocab_size}"
        )
    samples, native_rate = _load_samples(audio)

    model = ckpt.build().eval()
    gated = model.encoder if isinstance(model.encoder, AmortizedTransformerEncoder) else None  # it counts skipped work
    if gated is not None:
        gated.reset_gate_stats()
    chunk = SAMPLE_RATE * chunk_ms // 1000
    compute = 0.0
    text = ""
    fbank = StreamingFbank()
    state = model.init_stream(batch_size=1)

    def push(frames: np.ndarray) -> None:
        nonlocal state, text
        if frames.shape[0] == 0:
            return
        state = model.stream(torch.from_numpy(cmvn.apply(frames))[None], state, beam=beam)
        new_text = tokenizer.decode(state.hypotheses[0])
        if new_text != text:
            text = new_text
            if on_partial is not None:
                on_partial(text)

    for start in range(0, samples.shape[0], chunk):  # a live source would block here for chunk_ms
        began = time.perf_counter()
        push(fbank.accept(samples[start : start + chunk]))
        compute += time.perf_counter() - began
    began = time.perf_counter()
    push(fbank.finish())
    compute += time.perf_counter() - began
    stats = gated.gate_stats() if gated is not None else None
    skipped = 1.0 - stats.executed_share if stats is not None and stats.frames else 0.0
    return Transcript(
        text=text,
        audio_seconds=samples.shape[0] / SAMPLE_RATE,
        compute_seconds=compute,
        skipped_share=skipped,
        native_rate=native_rate,
        model_name=ckpt.model_config.name,
    )


@dataclass(frozen=True)
class MultiTalkerTranscript:
    """What :func:`transcribe_talkers` returns.

    Attributes:
        channels: the final words of each output channel.
        turns: (channel, start s, end s or None) of every turn, in order of its ``<sot>``; times are when the
            device had heard enough to emit the turn token.
        audio_seconds, compute_seconds, native_rate: as in ``Transcript``.
        beam: the search it ran (1: greedy).
    """

    channels: tuple[str, ...]
    turns: tuple[tuple[int, float, float | None], ...]
    audio_seconds: float
    compute_seconds: float
    native_rate: int
    beam: int

    @property
    def rtf(self) -> float:
        return self.compute_seconds / self.audio_seconds if self.audio_seconds else 0.0


def _check_search(chunk_ms: int, beam: int) -> None:
    if chunk_ms < 10:
        raise DeviceError(f"--chunk-ms {chunk_ms}: chunks must be at least 10 ms (one feature frame shift)")
    if beam < 1:
        raise DeviceError(f"--beam {beam}: the beam must hold at least one hypothesis (1 = greedy search)")


def _load_samples(audio: Path) -> tuple[np.ndarray, int]:
    from shared.data.audio import SAMPLE_RATE, AudioError, load_audio, probe_audio

    try:
        return load_audio(audio, sample_rate=SAMPLE_RATE, resample=True), probe_audio(audio, resample=True)
    except AudioError as err:
        raise DeviceError(str(err)) from err


def transcribe_talkers(
    audio: Path,
    *,
    checkpoint: Path | None = None,
    chunk_ms: int = 160,
    beam: int | None = None,
    on_partial: Callable[[tuple[str, ...], tuple[tuple[int, float, float | None], ...]], None] | None = None,
) -> MultiTalkerTranscript:
    """Stream ``audio`` through a two-talker model (``checkpoint``, default the shipped one) in ``chunk_ms`` pieces;
    ``on_partial(channel texts, turns)`` is called each time either changes. ``beam`` as in :func:`transcribe`,
    per channel; None takes the search the model file was shipped with (``chorus model ship-multitalker`` records
    the one chosen on validation speakers), greedy where it records none.

    Raises:
        DeviceError: a missing or unreadable audio file or model (named), or a bad ``chunk_ms`` or ``beam``.
    """
    import torch

    from shared.data.audio import SAMPLE_RATE
    from shared.data.features import StreamingFbank
    from shared.models.checkpoint import SHIPPED_DIR, CheckpointError
    from shared.models.separator_transducer import extended_vocabulary
    from shared.multitalker import SHIPPED_MULTITALKER, emission_seconds, load_multitalker

    _check_search(chunk_ms, 1 if beam is None else beam)
    try:
        model, _, frontend, meta = load_multitalker(checkpoint or SHIPPED_DIR / SHIPPED_MULTITALKER)
    except CheckpointError as err:
        raise DeviceError(str(err)) from err
    search = int(meta.get("beam", 1)) if beam is None else beam
    samples, native_rate = _load_samples(Path(audio).expanduser())
    tokenizer, ids = frontend.tokenizer, extended_vocabulary(frontend.tokenizer.vocab_size)
    channels = model.config.channels
    state = model.init_stream(batch_size=1)
    fbank = StreamingFbank()
    shown: tuple[tuple[str, ...], tuple[tuple[int, float, float | None], ...]] = ((), ())

    def view() -> tuple[tuple[str, ...], tuple[tuple[int, float, float | None], ...]]:
        texts: list[str] = []
        turns: list[tuple[int, float, float | None]] = []
        for c in range(channels):
            tokens, frames = state.hypotheses[c], state.frames[c]
            texts.append(tokenizer.decode([t for t in tokens if t < tokenizer.vocab_size]))
            for token, frame in zip(tokens, frames, strict=True):
                if token == ids["<sot>"]:
                    turns.append((c, emission_seconds(frame), None))
                elif token == ids["<eot>"] and turns and any(t[0] == c and t[2] is None for t in turns):
                    i = max(i for i, t in enumerate(turns) if t[0] == c and t[2] is None)
                    turns[i] = (c, turns[i][1], emission_seconds(frame))
        return tuple(texts), tuple(sorted(turns, key=lambda t: t[1]))

    def push(frames: np.ndarray) -> None:
        nonlocal state, shown
        if frames.shape[0] == 0:
            return
        state = model.stream(torch.from_numpy(frontend.cmvn.apply(frames)).float()[None], state, beam=search)
        now = view()
        if now != shown:
            shown = now
            if on_partial is not None:
                on_partial(*now)

    chunk = SAMPLE_RATE * chunk_ms // 1000
    began = time.perf_counter()
    for start in range(0, samples.shape[0], chunk):
        push(fbank.accept(samples[start : start + chunk]))
    push(fbank.finish())
    compute = time.perf_counter() - began
    texts, turns = view()
    return MultiTalkerTranscript(
        channels=texts,
        turns=turns,
        audio_seconds=samples.shape[0] / SAMPLE_RATE,
        compute_seconds=compute,
        native_rate=native_rate,
        beam=search,
    )


# -- command line: `chorus device ...` -----------------------------------------------

device_cli = typer.Typer(
    help="A device: join a federation, personalize its recognizer, transcribe as it streams, enroll and verify its user.",
    no_args_is_help=True,
)


RecordingsOption = Annotated[Path, typer.Option(help="This device's recordings (manifest.jsonl, Kaldi or FSDD layout).")]
ArtifactsOption = Annotated[Path, typer.Option(help="tokenizer-<vocab>.model and cmvn.json from `chorus data prepare`.")]


@device_cli.command("join")
def join_cmd(
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the SuperLink (its HTTPS port).")],
    data: RecordingsOption,
    artifacts: ArtifactsOption,
    root_cert: Annotated[Path, typer.Option(help="CA certificate that signed the SuperLink's certificate.")],
    auth_key: Annotated[Path, typer.Option(help="This device's OpenSSH EC private key (its .pub is registered).")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="This SuperNode's own Runtime API port.")] = 9094,
    state_dir: Annotated[
        Optional[Path], typer.Option(help="SuperNode log and FLWR_HOME (default: .supernode-<port> beside --data).")
    ] = None,
) -> None:
    """Join a federation as a Flower SuperNode training on this device's own recordings; Ctrl-C leaves."""
    from shared.data.corpora import CorpusError, load_corpus

    state_dir = (state_dir or data.resolve().parent / f".supernode-{port}").resolve()
    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the Flower processes too, as Ctrl-C does
    try:
        corpus = load_corpus(data)
        proc = start_supernode(
            superlink=superlink,
            data_dir=data,
            artifacts_dir=artifacts,
            root_cert=root_cert,
            auth_key=auth_key,
            port=port,
            state_dir=state_dir,
        )
    except (DeviceError, CorpusError) as err:
        fail(str(err))
    typer.echo(
        f"SuperNode {proc.pid} joining {superlink} with {len(corpus.utterances)} utterances from "
        f"{corpus.root} ({len(corpus.skipped)} skipped); log {state_dir / 'supernode.log'}. Ctrl-C leaves."
    )
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        stop_supernode(proc)
    if code:
        log = state_dir / "supernode.log"
        refused = "Exit Code: 305" in log.read_text(errors="replace") if log.is_file() else False
        reason = (
            'the SuperLink refused this device ("Failed to activate SuperNode", Flower exit code 305): its '
            ".pub is not registered, or the SuperLink still counts this node online after an unclean stop "
            "(retry in about a minute)"
            if refused
            else f"see {log}"
        )
        fail(f"the SuperNode exited with status {code}: {reason}", code=1)


@device_cli.command("transcribe")
def transcribe_cmd(
    audio: Annotated[Path, typer.Argument(help="Audio file (WAV, FLAC, ...; resampled to 16 kHz if needed).")],
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(
            help="A Chorus checkpoint (global.pt, best.pt, ...); with --talkers 2 a multi-talker model (default: shipped)."
        ),
    ] = None,
    artifacts: Annotated[Optional[Path], typer.Option(help="tokenizer-<vocab>.model and cmvn.json (--talkers 1).")] = None,
    chunk_ms: Annotated[int, typer.Option(min=10, help="Audio pushed per step, in ms.")] = 160,
    talkers: Annotated[int, typer.Option(min=1, max=2, help="2: two overlapping talkers, each turn's words and bounds.")] = 1,
    beam: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="1 = greedy search; more = modified beam search of that width, carried across chunks (default: 1; "
            "with --talkers 2 the search the model was shipped with).",
        ),
    ] = None,
) -> None:
    """Transcribe a recording as it streams: partial hypotheses, final text, real-time factor, compute skipped."""
    if talkers == 2:
        _transcribe_talkers_cmd(audio, checkpoint, chunk_ms, beam)
        return
    beam = 1 if beam is None else beam
    if checkpoint is None or artifacts is None:
        fail("--checkpoint and --artifacts are required (or use --talkers 2 for the shipped two-talker model)")
    from rich.console import Console

    from shared.data.audio import SAMPLE_RATE
    from rich.live import Live
    from rich.text import Text

    console = Console()
    live = Live(Text(""), console=console, auto_refresh=False, transient=True) if console.is_terminal else None

    def show(text: str) -> None:
        if live is not None:
            live.update(Text(f"… {text}"), refresh=True)
        else:
            typer.echo(f"partial: {text}")

    try:
        if live is not None:
            live.start()
        try:
            result = transcribe(audio, checkpoint=checkpoint, artifacts=artifacts, chunk_ms=chunk_ms, beam=beam, on_partial=show)
        finally:
            if live is not None:
                live.stop()
    except DeviceError as err:
        fail(str(err))
    if result.native_rate != SAMPLE_RATE:
        typer.echo(f"note: {audio} is {result.native_rate} Hz; resampled to {SAMPLE_RATE} Hz")
    typer.echo(f"final: {result.text}")
    typer.echo(
        f"RTF {result.rtf:.3f} ({result.compute_seconds:.2f} s compute for {result.audio_seconds:.2f} s "
        f"of audio, {chunk_ms} ms chunks, {search_name(beam)})"
    )
    kind = "gated sub-blocks" if result.model_name == "amortized" else f"dense {result.model_name} model"
    typer.echo(f"encoder compute skipped: {100 * result.skipped_share:.1f}% ({kind})")


def _turns_line(turns: tuple[tuple[int, float, float | None], ...]) -> str:
    return ", ".join(f"talker channel {c + 1} {start:.2f}-{'...' if end is None else f'{end:.2f}'} s" for c, start, end in turns)


def _transcribe_talkers_cmd(audio: Path, checkpoint: Path | None, chunk_ms: int, beam: int | None) -> None:
    """`chorus device transcribe --talkers 2`: each channel's words and the turns as they stream."""
    from shared.data.audio import SAMPLE_RATE

    def show(texts: tuple[str, ...], turns: tuple[tuple[int, float, float | None], ...]) -> None:
        words = " | ".join(f"[{c + 1}] {text}" for c, text in enumerate(texts))
        typer.echo(f"partial: {words}" + (f"  turns: {_turns_line(turns)}" if turns else ""))

    try:
        result = transcribe_talkers(audio, checkpoint=checkpoint, chunk_ms=chunk_ms, beam=beam, on_partial=show)
    except DeviceError as err:
        fail(str(err))
    if result.native_rate != SAMPLE_RATE:
        typer.echo(f"note: {audio} is {result.native_rate} Hz; resampled to {SAMPLE_RATE} Hz")
    for c, text in enumerate(result.channels):
        typer.echo(f"final [{c + 1}]: {text}")
    typer.echo(f"turns: {len(result.turns)}" + (f" ({_turns_line(result.turns)})" if result.turns else ""))
    typer.echo(
        f"RTF {result.rtf:.3f} ({result.compute_seconds:.2f} s compute for {result.audio_seconds:.2f} s "
        f"of audio, {chunk_ms} ms chunks, {search_name(result.beam)})"
    )


@dataclass(frozen=True)
class Personalization:
    kept: bool  # the personalized model was kept (it beat the received one on set-aside training utterances)
    check_wer: tuple[float, float]  # received, personalized: on the set-aside training utterances
    eval_wer: tuple[float, float] | None  # received, kept model: on the device's local-eval utterances (None: none)
    utterances: tuple[int, int]  # training, local-eval
    out: Path


def personalize_device(
    *, checkpoint: Path, data: Path, artifacts: Path, out: Path, steps: int = 48, lr: float = 3e-4, beam: int = 1
) -> Personalization:
    """Fine-tune ``checkpoint`` on this device's own recordings (``steps`` AdamW steps at ``lr``: the personalization
    ``chorus eval federation`` measures), keep it only where a check on set-aside training utterances, decoded with
    the search the device runs (``beam``; 1: greedy), says it helps (``client.train.personalize``), and write the kept
    model to ``out``. Nothing leaves the device.

    Raises:
        DeviceError: a missing or unusable checkpoint, data or artifacts directory (the message names it).
    """
    from client.data import DeviceDataError, local_device_data
    from client.train import device_errors, personalize
    from shared.config import RunConfig
    from shared.models.checkpoint import CheckpointError, build_model, load_checkpoint, load_state, save_checkpoint

    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as err:
        raise DeviceError(str(err)) from err
    model_keys = {f"model.{k.replace('_', '-')}": v for k, v in dataclasses.asdict(ckpt.model_config).items()}
    recipe = {"train.local-steps": steps, "train.lr": lr, "train.optimizer": "adamw", "eval.beam": beam}
    cfg = RunConfig.from_flat({**model_keys, **recipe, "model.init-checkpoint": str(checkpoint)})
    try:
        device = local_device_data(cfg, data_dir=data, artifacts_dir=artifacts)
    except DeviceDataError as err:
        raise DeviceError(str(err)) from err
    if ckpt.frontend is not None and ckpt.frontend.tokenizer.model_proto != device.tokenizer.model_proto:
        raise DeviceError(f"the tokenizer in {artifacts} is not the one {checkpoint} was trained with")
    if len(device.train) < 2:
        raise DeviceError(f"{data}: {len(device.train)} training utterance(s) after the local-eval split; need at least 2")
    kept_state, check = personalize(cfg, ckpt.state_dict, device, partition_id=0)
    model = build_model(cfg.model)
    evaluated = None
    if device.eval:
        before = device_errors(model, ckpt.state_dict, device.eval, device, beam=beam).wer
        after = device_errors(model, kept_state, device.eval, device, beam=beam).wer if check.keep else before
        evaluated = (before, after)
    load_state(model, kept_state, source=str(checkpoint))
    meta = {**ckpt.meta, "personalized": {"from": str(checkpoint), "kept": check.keep, "steps": steps, "lr": lr, "beam": beam}}
    meta.pop("frontend", None)
    # At the precision it came in: a shipped float16 base stays a 3.5 MB file on the device.
    dtype = next(v.dtype for v in ckpt.state_dict.values() if v.is_floating_point())
    save_checkpoint(out, model, ckpt.model_config, frontend=ckpt.frontend, dtype=dtype, **meta)
    return Personalization(
        kept=check.keep,
        check_wer=(check.received.wer, check.personal.wer),
        eval_wer=evaluated,
        utterances=(len(device.train), len(device.eval)),
        out=out,
    )


@device_cli.command("personalize")
def personalize_cmd(
    checkpoint: Annotated[Path, typer.Option(help="The model this device runs (a shipped base or a federation's global.pt).")],
    data: RecordingsOption,
    artifacts: ArtifactsOption,
    out: Annotated[Path, typer.Option(help="Where the model the device keeps is written (it never leaves the device).")],
    steps: Annotated[int, typer.Option(min=1, help="AdamW fine-tuning steps.")] = 48,
    lr: Annotated[float, typer.Option(min=1e-8, help="AdamW learning rate.")] = 3e-4,
    beam: Annotated[
        int, typer.Option(min=1, help="The search the device decodes with (1 = greedy; `transcribe --beam`): the check uses it.")
    ] = 1,
) -> None:
    """Personalize the recognizer to this device's user, keeping the result only where it helps."""
    try:
        result = personalize_device(checkpoint=checkpoint, data=data, artifacts=artifacts, out=out, steps=steps, lr=lr, beam=beam)
    except DeviceError as err:
        fail(str(err))
    received, personal = result.check_wer
    verdict = "kept the personalized model" if result.kept else "kept the received model (personalizing did not help)"
    typer.echo(
        f"{verdict}: WER on a third of the {result.utterances[0]} training recordings set aside {received:.3f} received, "
        f"{personal:.3f} personalized ({search_name(beam)})"
    )
    if result.eval_wer is not None:
        before, after = result.eval_wer
        typer.echo(f"local-eval recordings ({result.utterances[1]}, not trained on): WER {before:.3f} -> {after:.3f}")
    typer.echo(f"wrote {result.out}")


@device_cli.command("enroll")
def enroll_cmd(
    data: Annotated[
        Path, typer.Option(help="A few recordings of this device's user (manifest.jsonl, Kaldi or FSDD layout; one speaker).")
    ],
    out: Annotated[
        Optional[Path],
        typer.Option(help="Where the enrollment is kept (default: DATA/enrollment.json); it never leaves the device."),
    ] = None,
    verifier: Annotated[Optional[Path], typer.Option(help="Verifier (default: the shipped one).")] = None,
    max_utterances: Annotated[int, typer.Option(min=1, help="Recordings to enroll with, at most.")] = 10,
) -> None:
    """Enroll this device's user for speaker verification (the embedding stays on the device)."""
    from client.verification import VerificationError, enroll
    from shared.models.speaker_embedding import shipped_verifier

    verifier = verifier or shipped_verifier()
    out = out or data / "enrollment.json"
    try:
        enrollment = enroll(data, verifier_path=verifier, max_utterances=max_utterances)
    except VerificationError as err:
        fail(str(err))
    enrollment.save(out)
    typer.echo(f"enrolled from {enrollment.utterances} recordings in {data}: {out} (verifier {verifier.name})")


@device_cli.command("verify")
def verify_cmd(
    audio: Annotated[Path, typer.Argument(help="A recording (WAV, FLAC, ...; resampled to 16 kHz if needed).")],
    enrollment: Annotated[Path, typer.Option(help="What `chorus device enroll` wrote.")],
    verifier: Annotated[Optional[Path], typer.Option(help="Verifier (default: the shipped one).")] = None,
) -> None:
    """Is this recording the enrolled user? Cosine score and decision at the verifier's threshold."""
    from client.verification import Enrollment, VerificationError, verify
    from shared.models.speaker_embedding import shipped_verifier

    try:
        decision = verify(audio, Enrollment.load(enrollment), verifier_path=verifier or shipped_verifier())
    except VerificationError as err:
        fail(str(err))
    far = (
        f", chosen for a {100 * decision.target_far:g}% false-acceptance rate on public speakers"
        if decision.target_far is not None
        else ""
    )
    typer.echo(
        f"{'accept' if decision.accepted else 'reject'}: score {decision.score:.4f} "
        f"{'>=' if decision.accepted else '<'} threshold {decision.threshold:.4f}{far}"
    )
