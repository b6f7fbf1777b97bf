"""The device side without a federation: streaming transcription, deployment data, certificates and keys,
and the Flower configuration the deployment helpers write (checked with Flower's own parsers)."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from scipy.signal import resample_poly
from typer.testing import CliRunner, Result

from client.data import DeviceDataError, local_device_data, node_data
from client.device import device_cli, node_config_arg, transcribe
from server.deploy import make_dev_certificates, make_node_keys, write_flower_config
from shared.config import ModelConfig, RunConfig
from shared.data.features import GlobalCMVN, compute_fbank
from shared.data.tokenizer import Tokenizer
from shared.models.checkpoint import build_model, save_checkpoint
from tests.conftest import needs_espeak

VOCAB = 128
TINY_MODEL = dict(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, vocab_size=VOCAB, dropout=0.0)
TEXT = "turn on the kitchen lights"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthesized utterance (16 kHz and 8 kHz), public artifacts, and tiny random dense/amortized checkpoints."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (sudo apt-get install espeak-ng)")
    from shared.data.commands import sample_sentences
    from shared.data.synth import render_utterance, sample_population

    root = tmp_path_factory.mktemp("device")
    samples = render_utterance(sample_population(1, seed=3)[0], TEXT, noise_seed=0)
    wav16, wav8 = root / "utt16k.wav", root / "utt8k.wav"
    soundfile.write(wav16, samples, 16000)
    soundfile.write(wav8, resample_poly(samples, 1, 2).astype(np.float32), 8000)
    artifacts = root / "artifacts"
    Tokenizer.train(sample_sentences(300, seed=1) + [TEXT], artifacts / f"tokenizer-{VOCAB}.model", vocab_size=VOCAB)
    GlobalCMVN.fit([compute_fbank(samples)]).save(artifacts / "cmvn.json")
    paths = {"wav16": wav16, "wav8": wav8, "artifacts": artifacts}
    for name in ("transformer", "amortized"):
        torch.manual_seed(0)
        cfg = ModelConfig(name=name, **TINY_MODEL)
        paths[name] = save_checkpoint(root / f"{name}.pt", build_model(cfg), cfg, round=0)
    return paths


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(device_cli, [str(a) for a in args])


# -- transcription ------------------------------------------------------------------------------------------


@needs_espeak
def test_transcribe_cli_streams_and_reports_rtf(assets: dict[str, Path]) -> None:
    result = _run(
        "transcribe",
        assets["wav16"],
        "--checkpoint",
        assets["transformer"],
        "--artifacts",
        assets["artifacts"],
        "--chunk-ms",
        "160",
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    final = [line for line in lines if line.startswith("final:")]
    assert len(final) == 1
    partials = [line.removeprefix("partial: ") for line in lines if line.startswith("partial:")]
    if partials:  # a random model may emit nothing; when it does, the last partial is the final text
        assert final[0].removeprefix("final: ") == partials[-1]
    assert any(line.startswith("RTF ") for line in lines)
    assert "encoder compute skipped: 0.0% (dense transformer model)" in result.output
    assert "note:" not in result.output  # 16 kHz input: no resampling


@needs_espeak
def test_streaming_equals_offline_greedy_and_amortized_skip_share(assets: dict[str, Path]) -> None:
    from shared.models.checkpoint import load_checkpoint

    partials: list[str] = []
    result = transcribe(
        assets["wav16"], checkpoint=assets["amortized"], artifacts=assets["artifacts"], chunk_ms=80, on_partial=partials.append
    )
    assert result.model_name == "amortized" and 0.0 <= result.skipped_share <= 1.0
    assert result.audio_seconds == pytest.approx(soundfile.info(str(assets["wav16"])).duration, abs=1e-3)
    assert result.rtf > 0 and result.native_rate == 16000
    assert partials == [] or partials[-1] == result.text
    # Chunked streaming gives the same text as greedy search on the whole utterance.
    model = load_checkpoint(assets["amortized"]).build().eval()
    cmvn = GlobalCMVN.load(assets["artifacts"] / "cmvn.json")
    feats = torch.from_numpy(cmvn.apply(compute_fbank(soundfile.read(str(assets["wav16"]), dtype="float32")[0])))
    tokens = model.greedy_search(feats[None], torch.tensor([feats.shape[0]]))[0]
    tokenizer = Tokenizer.load(assets["artifacts"] / f"tokenizer-{VOCAB}.model")
    assert result.text == tokenizer.decode(tokens)
    # And beam search carried across chunks gives the text of beam search on the whole utterance.
    searched = transcribe(assets["wav16"], checkpoint=assets["amortized"], artifacts=assets["artifacts"], chunk_ms=80, beam=4)
    assert searched.text == tokenizer.decode(model.beam_search(feats[None], torch.tensor([feats.shape[0]]), beam=4)[0])


@needs_espeak
def test_transcribe_resamples_other_rates_with_a_note(assets: dict[str, Path]) -> None:
    result = _run("transcribe", assets["wav8"], "--checkpoint", assets["transformer"], "--artifacts", assets["artifacts"])
    assert result.exit_code == 0, result.output
    assert f"note: {assets['wav8']} is 8000 Hz; resampled to 16000 Hz" in result.output
    assert "final:" in result.output


@needs_espeak
def test_transcribe_bad_inputs_name_the_file(assets: dict[str, Path], tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    missing = tmp_path / "missing.wav"
    common = ["--checkpoint", assets["transformer"], "--artifacts", assets["artifacts"]]
    for bad in (missing, corrupt):
        result = _run("transcribe", bad, *common)
        assert result.exit_code == 2 and str(bad) in result.output, result.output
    result = _run("transcribe", assets["wav16"], "--checkpoint", tmp_path / "none.pt", "--artifacts", assets["artifacts"])
    assert result.exit_code == 2 and str(tmp_path / "none.pt") in result.output
    result = _run("transcribe", assets["wav16"], "--checkpoint", assets["transformer"], "--artifacts", tmp_path)
    assert result.exit_code == 2 and str(tmp_path / f"tokenizer-{VOCAB}.model") in result.output
    result = _run("transcribe", assets["wav16"], *common, "--beam", "0")
    assert result.exit_code == 2 and "--beam" in result.output


# -- deployment data ----------------------------------------------------------------------------------------


@needs_espeak
def test_deployment_data_from_node_config(assets: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "my recordings"  # a space: node_config paths must survive Flower's parser too
    data.mkdir()
    entries = []
    for index in range(4):
        name = f"u{index}.wav"
        (data / name).write_bytes(assets["wav16"].read_bytes())
        entries.append(
            {
                "id": f"u{index}",
                "speaker": f"anyone-{index % 2}",
                "audio": name,
                "text": TEXT,
                "duration": 1.0,
                "sample_rate": 16000,
            }
        )
    (data / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    cfg = RunConfig.from_flat({"model.vocab-size": VOCAB, "split.local-eval-fraction": 0.25})

    from flwr.common.config import parse_config_args

    node_config = parse_config_args([node_config_arg(data_dir=data, artifacts_dir=assets["artifacts"])])
    assert node_config == {"data-dir": str(data), "artifacts-dir": str(assets["artifacts"])}
    device = node_data(cfg, node_config)
    assert len(device.train) == 3 and len(device.eval) == 1  # every utterance is this device's, whatever speaker
    assert device.features.features(device.train[0]).shape[1] == 80

    with pytest.raises(DeviceDataError, match=str(tmp_path / "nowhere")):
        local_device_data(cfg, data_dir=tmp_path / "nowhere", artifacts_dir=assets["artifacts"])
    with pytest.raises(DeviceDataError, match=str(tmp_path / "tokenizer-128.model")):
        local_device_data(cfg, data_dir=data, artifacts_dir=tmp_path)
    with pytest.raises(DeviceDataError, match="artifacts-dir"):
        node_data(cfg, {"data-dir": str(data)})


def test_node_config_quoting_survives_flowers_parser(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    for name in ("plain", "with space", "it's here", 'say "hi"', "back\\slash"):
        arg = node_config_arg(data_dir=tmp_path / name, artifacts_dir=tmp_path / "a")
        assert parse_config_args([arg])["data-dir"] == str(tmp_path / name), arg


# -- certificates, keys, Flower configuration ---------------------------------------------------------------


def test_dev_certificates_are_ca_signed_with_the_right_sans(tmp_path: Path) -> None:
    certs = make_dev_certificates(tmp_path, hosts=("localhost", "127.0.0.1", "superlink.example"))
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.ca_key.stat().st_mode) == 0o600


def test_node_keys_are_what_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    pairs = make_node_keys(tmp_path, 2)
    assert len({p.public_key.read_bytes() for p in pairs}) == 2
    for pair in pairs:
        private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert try_load_public_key(pair.public_key)  # the check `flwr supernode register` runs
        assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600


def test_flower_config_names_the_superlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    write_flower_config(home, address="127.0.0.1:9443", root_cert=tmp_path / "ca.crt")
    monkeypatch.setenv("FLWR_HOME", str(home))
    connection = read_superlink_connection("chorus")
    assert connection.address == "127.0.0.1:9443"
    assert connection.root_certificates == str((tmp_path / "ca.crt").resolve()) and not connection.insecure
    assert read_superlink_connection(None).name == "chorus"  # made the default
    assert read_superlink_connection("local").address == ":local:"  # other connections kept


# -- personalization ----------------------------------------------------------------------------------------


def _recordings(assets: dict[str, Path], path: Path, count: int) -> Path:
    """``count`` recordings of one user, each the fixture's utterance."""
    path.mkdir()
    entries = []
    for index in range(count):
        (path / f"u{index}.wav").write_bytes(assets["wav16"].read_bytes())
        entries.append(
            {"id": f"u{index}", "speaker": "me", "audio": f"u{index}.wav", "text": TEXT, "duration": 1.0, "sample_rate": 16000}
        )
    (path / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


@needs_espeak
@pytest.mark.parametrize(("steps", "lr", "beam", "kept"), [(1, 1e-8, 1, False), (40, 1e-2, 2, True)])
def test_personalize_keeps_the_fine_tuned_model_only_where_it_helps(
    assets: dict[str, Path], tmp_path: Path, steps: int, lr: float, beam: int, kept: bool
) -> None:
    from shared.models.checkpoint import load_checkpoint, save_checkpoint

    data = _recordings(assets, tmp_path / "recordings", 8)  # 6 train (2 set aside for the check), 2 local-eval
    out = tmp_path / "mine.pt"
    base = load_checkpoint(assets["transformer"])  # saved in float16 below, as the shipped bases are
    meta = {k: v for k, v in base.meta.items() if k != "frontend"}
    half = save_checkpoint(
        tmp_path / "half.pt", base.build(), base.model_config, frontend=base.frontend, dtype=torch.float16, **meta
    )
    args = ["--checkpoint", half, "--data", data, "--artifacts", assets["artifacts"], "--out", out]
    result = _run("personalize", *args, "--steps", steps, "--lr", lr, "--beam", beam)
    assert result.exit_code == 0, result.output
    assert ("kept the personalized model" if kept else "kept the received model") in result.output
    assert "of the 6 training recordings set aside" in result.output and "local-eval recordings (2" in result.output
    mine, received = load_checkpoint(out), load_checkpoint(half)
    assert mine.meta["personalized"]["kept"] is kept and mine.meta["personalized"]["beam"] == beam
    assert ("(greedy search)" if beam == 1 else f"(beam {beam})") in result.output
    assert {v.dtype for v in mine.state_dict.values() if v.is_floating_point()} == {torch.float16}
    same = all(torch.equal(mine.state_dict[k], received.state_dict[k]) for k in received.state_dict)
    assert same is not kept


@needs_espeak
def test_personalize_bad_inputs_name_the_culprit(assets: dict[str, Path], tmp_path: Path) -> None:
    data = _recordings(assets, tmp_path / "recordings", 2)
    common = ["--artifacts", assets["artifacts"], "--out", tmp_path / "mine.pt"]
    result = _run("personalize", "--checkpoint", tmp_path / "none.pt", "--data", data, *common)
    assert result.exit_code != 0 and "none.pt" in result.output
    result = _run("personalize", "--checkpoint", assets["transformer"], "--data", tmp_path / "nowhere", *common)
    assert result.exit_code != 0 and "nowhere" in result.output
    result = _run("personalize", "--checkpoint", assets["transformer"], "--data", data, *common)
    assert result.exit_code != 0 and "1 training utterance(s)" in result.output
    assert not (tmp_path / "mine.pt").exists()
