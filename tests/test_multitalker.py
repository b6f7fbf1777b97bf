"""Two-talker sessions, the separator-transducer-segmenter, its scoring, and `chorus device transcribe --talkers 2`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from client.device import transcribe_talkers
from shared.data.audio import load_audio
from shared.data.features import compute_fbank
from shared.data.mix import (
    MixError,
    Session,
    Turn,
    load_sessions,
    mix_sessions,
    plan_timeline,
    single_talker_sessions,
    speech_span,
)
from shared.data.synth import SAMPLE_RATE, synthesize
from shared.models.checkpoint import SHIPPED_DIR, load_checkpoint, sha256_of, shipped_manifest
from shared.models.separator_transducer import SeparatorConfig, SeparatorTransducer, extended_vocabulary
from shared.models.transducer import Transducer, TransducerConfig
from shared.models.transformer import CausalTransformerEncoder
from shared.multitalker import (
    SHIPPED_MULTITALKER,
    decode_sessions,
    emission_seconds,
    heat_channels,
    routed_channels,
    load_multitalker,
    make_session_batches,
    references,
    save_multitalker,
    score_sessions,
    session_features,
    train_sessions,
)
from simulations.bench_multitalker import evaluate
from simulations.cli import app
from tests.conftest import TINY_ENCODER, real_corpus, tiny_transducer

BASE = load_checkpoint(SHIPPED_DIR / "dense-6.pt")
FRONTEND = BASE.frontend
WER_MARGIN = 0.15  # 10 sessions of 4 speakers against the manifest's 300 sessions of 40
assert FRONTEND is not None


@pytest.fixture(scope="module")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("corpus"), speakers=3, utterances=4, seed=5, workers=1, progress=False)


@pytest.fixture(scope="module")
def mixed(synth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mix_sessions(synth_corpus, tmp_path_factory.mktemp("mix"), sessions=6, seed=3, turns=(2, 3), workers=1)


def _turn(talker: int, start: float, end: float, text: str = "lights on") -> Turn:
    return Turn(talker=talker, speaker=f"s{talker}", start=start, end=end, text=text)


def test_timeline_without_overlap_has_pauses_and_with_overlap_never_overlaps_a_talker_with_itself() -> None:
    rng = np.random.default_rng(0)
    durations = [1.5, 2.0, 1.0, 2.5]
    starts = plan_timeline(durations, 0.0, rng)
    ends = [s + d for s, d in zip(starts, durations)]
    assert all(starts[i] >= ends[i - 1] + 0.1 - 1e-9 for i in range(1, 4))
    starts = plan_timeline(durations, 0.4, rng)
    ends = [s + d for s, d in zip(starts, durations)]
    assert any(starts[i] < ends[i - 1] for i in range(1, 4))  # some turn change overlaps
    assert all(starts[i] > ends[i - 2] for i in range(2, 4))  # each talker's turns follow each other
    assert all(ends[i - 1] - starts[i] <= 0.5 * min(durations[i - 1], durations[i]) + 1e-9 for i in range(1, 4))


def test_speech_span_finds_the_voiced_part() -> None:
    samples = np.zeros(SAMPLE_RATE, dtype=np.float32)
    samples[4000:12000] = 0.5 * np.sin(np.arange(8000) * 0.3)
    assert speech_span(samples) == (4000, 12000)


def test_heat_routes_each_turn_to_the_first_free_channel() -> None:
    turns = [_turn(0, 0.0, 2.0), _turn(1, 1.5, 3.0), _turn(0, 3.2, 4.0), _turn(1, 3.5, 5.0)]
    channels = heat_channels(turns, 2)
    assert [[t.start for t in c] for c in channels] == [[0.0, 3.2], [1.5, 3.5]]
    assert [[t.start for t in c] for c in heat_channels(turns[:1] + turns[2:3], 2)] == [[0.0, 3.2], []]


def test_talker_routing_gives_each_talker_a_channel_the_first_to_speak_channel_0() -> None:
    turns = [_turn(1, 0.0, 2.0), _turn(0, 1.5, 3.0), _turn(1, 3.2, 4.0), _turn(0, 4.5, 5.0)]
    # HEAT puts talker 0's last turn, which overlaps no one, on channel 0 beside talker 1's turns; talker routing
    # keeps every turn of a talker on that talker's channel.
    assert [[t.start for t in c] for c in routed_channels(turns, "sts")] == [[0.0, 3.2, 4.5], [1.5]]
    assert [[(t.talker, t.start) for t in c] for c in routed_channels(turns, "sts-talker")] == [
        [(1, 0.0), (1, 3.2)],
        [(0, 1.5), (0, 4.5)],
    ]
    no_overlap = [_turn(0, 0.0, 1.0), _turn(1, 1.5, 2.0)]
    assert [len(c) for c in routed_channels(no_overlap, "sts")] == [2, 0]
    assert [len(c) for c in routed_channels(no_overlap, "sts-talker")] == [1, 1]
    assert [len(c) for c in routed_channels(no_overlap, "mt-rnnt")] == [2]


def test_references_frame_turns_with_turn_tokens_or_serialize_them_with_speaker_changes() -> None:
    tokenizer = FRONTEND.tokenizer
    ids = extended_vocabulary(tokenizer.vocab_size)
    session = Session("x", Path("x.flac"), 5.0, 0.2, ("s0", "s1"), (_turn(0, 0.0, 2.0, "play jazz"), _turn(1, 1.5, 3.0, "stop")))
    sts = references(session, tokenizer, "sts")
    assert sts == [
        [ids["<sot>"], *tokenizer.encode("play jazz"), ids["<eot>"]],
        [ids["<sot>"], *tokenizer.encode("stop"), ids["<eot>"]],
    ]
    assert references(session, tokenizer, "mt-rnnt") == [[*tokenizer.encode("play jazz"), ids["<sc>"], *tokenizer.encode("stop")]]


def test_batches_anchor_each_turn_token_at_the_frame_its_event_becomes_audible() -> None:
    tokenizer = FRONTEND.tokenizer
    session = Session("x", Path("x.flac"), 5.0, 0.2, ("s0", "s1"), (_turn(0, 0.4, 2.0, "play jazz"), _turn(1, 1.5, 3.0, "stop")))
    features = {"x": np.zeros((500, 80), dtype=np.float32)}
    (sts,) = make_session_batches([session], features, tokenizer, "sts", max_frames=1000, shuffle=False, seed=0)
    words = len(tokenizer.encode("play jazz"))
    anchors = sts.turn_frames[0, 0, : words + 2]
    assert [emission_seconds(anchors[0].item()), emission_seconds(anchors[-1].item())] == pytest.approx([0.4, 2.0])
    assert bool(anchors[1:-1].isnan().all()) and bool(sts.turn_frames[0, 0, words + 2 :].isnan().all())
    stop = len(tokenizer.encode("stop"))
    assert [emission_seconds(sts.turn_frames[1, 0, i].item()) for i in (0, stop + 1)] == pytest.approx([1.5, 3.0])
    (mt,) = make_session_batches([session], features, tokenizer, "mt-rnnt", max_frames=1000, shuffle=False, seed=0)
    assert emission_seconds(mt.turn_frames[0, 0, words].item()) == pytest.approx(1.5)  # <sc>: the next talker starts
    assert int(mt.turn_frames[0, 0].isnan().logical_not().sum()) == 1


def test_turn_activity_marks_each_channels_turns_from_their_start_to_their_end() -> None:
    tokenizer = FRONTEND.tokenizer
    turns = (_turn(0, 0.4, 2.0, "play jazz"), _turn(1, 1.5, 3.0, "stop"), _turn(0, 3.5, 4.2, "louder"))
    session = Session("x", Path("x.flac"), 5.0, 0.2, ("s0", "s1"), turns)
    features = {"x": np.zeros((500, 80), dtype=np.float32)}
    (batch,) = make_session_batches([session], features, tokenizer, "sts", max_frames=1000, shuffle=False, seed=0)
    model = SeparatorTransducer.from_transducer(BASE.build(), SeparatorConfig(channels=2, layers=1))
    activity = model.turn_activity(batch.targets, batch.turn_frames, 124)
    seconds = torch.tensor([emission_seconds(t) for t in range(124)])  # when each encoder frame's audio has arrived
    heard = [(turns[0], turns[2]), (turns[1],)]  # HEAT: the third turn takes channel 0 again, free since 2.0 s
    for channel, routed in enumerate(heard):
        expected = torch.zeros(124, dtype=torch.bool)
        for turn in routed:
            expected |= (seconds >= turn.start - 1e-6) & (seconds <= turn.end + 1e-6)
        assert activity[channel].bool().tolist() == expected.tolist()
    with pytest.raises(ValueError, match="two-channel"):
        SeparatorTransducer.from_transducer(BASE.build(), SeparatorConfig(channels=1, layers=1)).turn_activity(
            batch.targets[:1], batch.turn_frames[:1], 124
        )


def test_mix_is_deterministic_cached_and_records_turns_that_fit_the_audio(
    synth_corpus: Path, mixed: Path, tmp_path: Path
) -> None:
    sessions = load_sessions(mixed)
    assert len(sessions) == 6
    words = {json.loads(line)["text"] for line in (synth_corpus / "manifest.jsonl").read_text().splitlines()}
    for session in sessions:
        audio, rate = sf.read(session.audio)
        assert rate == SAMPLE_RATE and abs(len(audio) / rate - session.duration) < 1e-3
        assert 2 <= len(session.turns) <= 3 and session.speakers[0] != session.speakers[1]
        assert [t.talker for t in session.turns] in ([0, 1], [1, 0], [0, 1, 0], [1, 0, 1])
        assert all(0 < t.start < t.end < session.duration and t.text in words for t in session.turns)
        assert 0.0 <= session.overlap <= 0.5
    again = mix_sessions(synth_corpus, tmp_path / "again", sessions=6, seed=3, turns=(2, 3), workers=2)
    assert (again / "sessions.jsonl").read_text().replace(str(again), "") == (mixed / "sessions.jsonl").read_text().replace(
        str(mixed), ""
    )
    before = (mixed / "mix.json").stat().st_mtime_ns
    mix_sessions(synth_corpus, mixed, sessions=6, seed=3, turns=(2, 3), workers=1)
    assert (mixed / "mix.json").stat().st_mtime_ns == before  # same arguments: reused


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"sessions": 0}, "--sessions"),
        ({"turns": (3, 2)}, "--turns"),
        ({"max_overlap": 0.9}, "--max-overlap"),
        ({"level_db": -1.0}, "--level-db"),
        ({"lead": (0.5, 0.2)}, "--lead"),
    ],
)
def test_bad_mix_arguments_name_the_option(tmp_path: Path, kwargs: dict[str, object], culprit: str) -> None:
    arguments: dict[str, object] = {"sessions": 2, "seed": 0} | kwargs
    with pytest.raises(MixError, match=culprit):
        mix_sessions(tmp_path, tmp_path / "out", **arguments)  # type: ignore[arg-type]
    with pytest.raises(MixError, match="no such directory"):
        mix_sessions(tmp_path / "missing", tmp_path / "out", sessions=1, seed=0)


def test_single_talker_sessions_can_start_with_the_audio(synth_corpus: Path, tmp_path: Path) -> None:
    sessions = load_sessions(
        mix_sessions(synth_corpus, tmp_path / "one", sessions=3, seed=5, turns=(1, 1), lead=(0.0, 0.0), workers=1)
    )
    for session in sessions:
        (turn,) = session.turns
        assert turn.start == 0.0 and turn.end < session.duration and session.overlap == 0.0
        audio, _ = sf.read(session.audio)
        first = np.abs(audio[: SAMPLE_RATE // 20])  # speech from the first 50 ms on: no silence before it
        assert first.max() > 0.1 * np.abs(audio).max()


def test_mixing_real_recordings(tmp_path: Path) -> None:
    corpus = real_corpus("speechocean762-dev")
    sessions = load_sessions(mix_sessions(corpus, tmp_path / "so", sessions=3, seed=1, turns=(2, 2), workers=1))
    assert len(sessions) == 3 and all(len(s.turns) == 2 for s in sessions)
    assert all(sf.info(str(s.audio)).samplerate == SAMPLE_RATE for s in sessions)


def _tiny_model(
    channels: int = 2, recognition_layers: int = 0, turn_reset: bool = False, turn_bonus: tuple[float, float] = (0.0, 0.0)
) -> SeparatorTransducer:
    torch.manual_seed(0)
    if recognition_layers:
        encoder = CausalTransformerEncoder(dataclasses.replace(TINY_ENCODER, num_layers=3))
        base = Transducer(encoder, TransducerConfig(vocab_size=5, pred_dim=16, joint_dim=16))
    else:
        base = tiny_transducer()
    config = SeparatorConfig(
        channels=channels, layers=2, recognition_layers=recognition_layers, turn_reset=turn_reset, turn_bonus=turn_bonus
    )
    return SeparatorTransducer.from_transducer(base, config).eval()


@pytest.mark.parametrize(("recognition_layers", "turn_reset"), [(0, False), (2, False), (0, True)])
def test_streaming_equals_the_whole_input_for_any_chunking(recognition_layers: int, turn_reset: bool) -> None:
    model = _tiny_model(
        recognition_layers=recognition_layers, turn_reset=turn_reset, turn_bonus=(0.5, 0.2) if turn_reset else (0, 0)
    )
    eot = extended_vocabulary(5)["<eot>"]
    with torch.no_grad():
        for p in model.separator.parameters():  # the zero-initialized projections would hide a broken cache
            p.add_(0.1 * torch.randn_like(p))
        if turn_reset:  # emit <eot> now and then, so that decoding passes through reset contexts
            model.transducer.joiner.output.bias[eot] = model.transducer.joiner.output.bias[: model.blank].max()
        feats = torch.randn(2, 150, TINY_ENCODER.input_dim)
        whole, lengths = model.channel_frames(feats, torch.tensor([150, 150]))
        for size in (1, 7, 40):
            state, pieces = model.init_stream(2).separator, []
            for chunk in feats.split(size, dim=1):
                frames, state = model.infer(chunk, state)
                pieces.append(frames)
            torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-5)
        decoded = model.greedy_search(feats, torch.tensor([150, 150]))
        state = model.init_stream(2)
        for chunk in feats.split(13, dim=1):
            state = model.stream(chunk, state)
        assert [[(list(state.hypotheses[c * 2 + b]), list(state.frames[c * 2 + b])) for c in range(2)] for b in range(2)] == [
            [(tokens, frames) for tokens, frames in session] for session in decoded
        ]
        searched = model.beam_search(feats, torch.tensor([150, 150]), beam=4)  # and beam search, chunk by chunk
        state = model.init_stream(2)
        for chunk in feats.split(13, dim=1):
            state = model.stream(chunk, state, beam=4)
        assert [[(list(state.hypotheses[c * 2 + b]), list(state.frames[c * 2 + b])) for c in range(2)] for b in range(2)] == [
            [(tokens, frames) for tokens, frames in session] for session in searched
        ]
        assert any(tokens for session in searched for tokens, _ in session)
        if turn_reset:
            assert any(eot in tokens and tokens[-1] != eot for session in decoded for tokens, _ in session)
    assert lengths.tolist() == [36, 36, 36, 36]


def test_turn_bonus_makes_greedy_search_emit_turn_tokens_more_and_is_checked() -> None:
    sot = extended_vocabulary(5)["<sot>"]
    feats, lengths = torch.randn(1, 150, TINY_ENCODER.input_dim), torch.tensor([150])

    def sot_count(bonus: float) -> int:
        model = _tiny_model(turn_bonus=(bonus, 0.0))
        with torch.no_grad():
            return sum(tokens.count(sot) for tokens, _ in model.greedy_search(feats, lengths)[0])

    assert sot_count(0.0) < sot_count(20.0)
    mt = _tiny_model(channels=1, turn_bonus=(40.0, 0.0))  # MT-RNN-T's turn start is <sc>
    with torch.no_grad():
        assert mt.greedy_search(feats, lengths)[0][0][0][:1] == [extended_vocabulary(5)["<sc>"]]
    for bad in ((1.0,), (math.inf, 0.0)):
        with pytest.raises(ValueError, match="turn_bonus"):
            SeparatorConfig(turn_bonus=bad)  # type: ignore[arg-type]


def test_beam_search_decodes_each_channel_with_the_reset_and_the_bonus() -> None:
    model = _tiny_model(turn_reset=True, turn_bonus=(0.5, 0.2))
    eot = extended_vocabulary(5)["<eot>"]
    feats, lengths = torch.randn(2, 150, TINY_ENCODER.input_dim), torch.tensor([150, 120])
    with torch.no_grad():
        for p in model.separator.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.transducer.joiner.output.bias[eot] = model.transducer.joiner.output.bias[: model.blank].max()
        greedy = model.greedy_search(feats, lengths, max_symbols_per_frame=1)
        assert model.beam_search(feats, lengths, beam=1) == greedy  # tokens and frames, every channel
        assert any(eot in tokens and tokens[-1] != eot for session in greedy for tokens, _ in session)
        wide = model.beam_search(feats, lengths, beam=4)
        limit = model.transducer.encoder.subsampled_length(lengths)
        for session, frames in zip(wide, limit.tolist(), strict=True):
            for tokens, when in session:
                assert len(tokens) == len(when) and when == sorted(when) and all(0 <= t < frames for t in when)
        sot = extended_vocabulary(5)["<sot>"]
        model.config = SeparatorConfig(turn_reset=True, turn_bonus=(40.0, 0.0))
        assert all(tokens[:1] == [sot] for session in model.beam_search(feats, lengths, beam=4) for tokens, _ in session)
    with pytest.raises(ValueError, match="beam"):
        model.beam_search(feats, lengths, beam=0)


@pytest.mark.parametrize("recognition_layers", [0, 3])
def test_a_model_made_from_a_base_starts_as_the_base_on_its_own_pieces(recognition_layers: int) -> None:
    base = BASE.build().eval()
    config = SeparatorConfig(channels=2, layers=2, recognition_layers=recognition_layers)
    model = SeparatorTransducer.from_transducer(base, config).eval()
    with torch.no_grad():
        model.channel_embedding.zero_()
        feats = torch.randn(1, 120, 80)
        frames, _ = model.channel_frames(feats, torch.tensor([120]))
        encoded = base.encoder(feats, torch.tensor([120])).frames
        torch.testing.assert_close(frames, encoded.repeat(2, 1, 1))
        context = base.predictor.start_context(1, feats.device)
        old = base.joiner(encoded, base.predictor(context))[..., : base.blank].log_softmax(-1)
        new = model.transducer.joiner(
            encoded, model.transducer.predictor(model.transducer.predictor.start_context(1, feats.device))
        )
        pieces = torch.cat([new[..., : base.blank], new[..., model.blank :]], dim=-1)
        assert new.shape[-1] == base.blank + 4  # three turn tokens and blank
        torch.testing.assert_close(pieces[..., :-1].log_softmax(-1), old)
        assert bool((new[..., base.blank : model.blank].amax() < new[..., : base.blank].amax()))


def test_turn_penalty_weighs_only_anchored_tokens_and_grows_with_lambda() -> None:
    model = _tiny_model().train()
    feats, feat_lens = torch.randn(1, 100, TINY_ENCODER.input_dim), torch.tensor([100])
    vocab = extended_vocabulary(5)
    targets = torch.tensor([[[vocab["<sot>"], 1, 2, vocab["<eot>"]]], [[3, 4, 0, 0]]])
    target_lens = torch.tensor([[4], [2]])
    words_only = torch.full(targets.shape, float("nan"))
    anchored = words_only.clone()
    anchored[0, 0, 0], anchored[0, 0, 3] = 2.0, 15.0  # <sot> at encoder frame 2, <eot> at 15 (of 25)
    torch.manual_seed(1)
    plain = model(feats, feat_lens, targets, target_lens)
    torch.testing.assert_close(model(feats, feat_lens, targets, target_lens, turn_frames=words_only, turn_penalty=1.0), plain)
    light, heavy = (model(feats, feat_lens, targets, target_lens, turn_frames=anchored, turn_penalty=lam) for lam in (0.1, 1.0))
    assert plain.item() < light.item() < heavy.item()  # weights <= 1 on alignments outside the slack
    with pytest.raises(ValueError, match="turn_frames"):
        model(feats, feat_lens, targets, target_lens, turn_penalty=1.0)
    with pytest.raises(ValueError, match=r"targets must be \(C=2, B=1, U\)"):  # one channel's targets for two
        model(feats, feat_lens, targets[:1], target_lens[:1])


def test_training_lowers_the_loss_and_scoring_counts_words_turns_and_times(mixed: Path) -> None:
    sessions = load_sessions(mixed)
    features = session_features(sessions, FRONTEND.cmvn)
    model = SeparatorTransducer.from_transducer(BASE.build(), SeparatorConfig(channels=2, layers=1))
    batches = make_session_batches(sessions, features, FRONTEND.tokenizer, "sts", max_frames=2500, shuffle=True, seed=0)
    assert sorted(i for b in batches for i in b.ids) == sorted(s.id for s in sessions)
    log = train_sessions(
        model,
        batches[:1],
        steps=6,
        peak_lr=1e-3,
        warmup=1,
        turn_penalty=0.1,
        seed=0,
        log_every=3,
    )
    assert log[1]["loss"] < log[0]["loss"]
    hyps = decode_sessions(model, batches)
    scores = score_sessions(sessions, hyps, FRONTEND.tokenizer, "sts")
    words = sum(len(t.text.split()) for s in sessions for t in s.turns)
    assert scores["all"]["sessions"] == 6 and scores["all"]["words"] == words
    assert sum(b["sessions"] for b in scores["by_overlap"].values()) == 6


def test_the_turn_activity_loss_is_learned_beside_the_transducer_loss(mixed: Path) -> None:
    sessions = load_sessions(mixed)
    features = session_features(sessions, FRONTEND.cmvn)
    model = SeparatorTransducer.from_transducer(BASE.build(), SeparatorConfig(channels=2, layers=1))
    batches = make_session_batches(sessions, features, FRONTEND.tokenizer, "sts", max_frames=2500, shuffle=True, seed=0)
    names = {name for name, _ in model.named_parameters()}
    log = train_sessions(
        model, batches[:1], steps=6, peak_lr=1e-3, warmup=1, turn_penalty=0.1, seed=0, log_every=3, activity_weight=1.0
    )
    assert log[1]["activity_loss"] < log[0]["activity_loss"] and log[1]["loss"] < log[0]["loss"]
    assert {name for name, _ in model.named_parameters()} == names  # the head is training's, not the model's
    with pytest.raises(ValueError, match="activity_weight"):
        train_sessions(model, batches[:1], steps=1, peak_lr=1e-3, warmup=1, turn_penalty=0.0, seed=0, activity_weight=-1.0)


def test_score_of_a_perfect_and_of_a_swapped_hypothesis() -> None:
    tokenizer = FRONTEND.tokenizer
    ids = extended_vocabulary(tokenizer.vocab_size)
    turns = (_turn(0, 0.5, 2.0, "play jazz"), _turn(1, 1.6, 3.0, "stop it"), _turn(0, 3.5, 4.4, "thanks"))
    session = Session("s", Path("s.flac"), 5.0, 0.15, ("s0", "s1"), turns)

    def channel(texts_frames: list[tuple[str, int, int]]) -> tuple[list[int], list[int]]:
        tokens, frames = [], []
        for text, start, end in texts_frames:
            pieces = tokenizer.encode(text)
            tokens += [ids["<sot>"], *pieces, ids["<eot>"]]
            frames += [start] * (len(pieces) + 1) + [end]
        return tokens, frames

    first = channel([("play jazz", 12, 50), ("thanks", 87, 110)])
    second = channel([("stop it", 40, 75)])
    for hyp in ([first, second], [second, first]):  # channels are matched to references by permutation
        scores = score_sessions([session], {"s": hyp}, tokenizer, "sts")["all"]
        assert scores["wer"] == 0.0 and scores["turn_counting_accuracy"] == 1.0
        ends = sorted([emission_seconds(50) - 2.0, emission_seconds(110) - 4.4, emission_seconds(75) - 3.0])
        assert scores["end_of_turn_latency_ms"]["median"] == pytest.approx(1000 * ends[1])
    wrong = score_sessions([session], {"s": [channel([("play jazz", 12, 50)]), second]}, tokenizer, "sts")["all"]
    assert wrong["wer"] == pytest.approx(1 / 5) and wrong["turn_counting_accuracy"] == 0.0
    serial = [*tokenizer.encode("play jazz"), ids["<sc>"], *tokenizer.encode("stop it"), ids["<sc>"], *tokenizer.encode("thanks")]
    mt = score_sessions([session], {"s": [(serial, list(range(len(serial))))]}, tokenizer, "mt-rnnt")["all"]
    assert mt["wer"] == 0.0 and mt["turn_counting_accuracy"] == 1.0


def test_saved_model_loads_and_device_transcribes_two_talkers(mixed: Path, tmp_path: Path) -> None:
    config = SeparatorConfig(channels=2, layers=1, turn_reset=True, turn_bonus=(1.5, 1.0))
    model = SeparatorTransducer.from_transducer(BASE.build(), config).eval()
    # shipped with the search chosen on validation speakers (here beam 4), which the device runs unless told otherwise
    path = save_multitalker(tmp_path / "sts.pt", model, BASE.model_config, "sts", frontend=FRONTEND, dtype=torch.float16, beam=4)
    loaded, kind, frontend, meta = load_multitalker(path)
    assert kind == "sts" and frontend.digest() == FRONTEND.digest() and meta["beam"] == 4
    eot = extended_vocabulary(BASE.model_config.vocab_size)["<eot>"]
    assert loaded.config == config and loaded.transducer.predictor.reset_token == eot
    session = load_sessions(mixed)[0]
    result = CliRunner().invoke(app, ["device", "transcribe", str(session.audio), "--talkers", "2", "--checkpoint", str(path)])
    assert result.exit_code == 0, result.output
    assert "final [1]:" in result.output and "final [2]:" in result.output and "beam 4)" in result.output
    searched = transcribe_talkers(session.audio, checkpoint=path)  # beam search as it streams = offline
    assert searched.beam == 4
    feats = torch.from_numpy(frontend.cmvn.apply(compute_fbank(load_audio(session.audio)))).float()[None]
    offline = loaded.beam_search(feats, torch.tensor([feats.shape[1]]), beam=4)[0]
    pieces = frontend.tokenizer.vocab_size
    assert searched.channels == tuple(frontend.tokenizer.decode([t for t in tokens if t < pieces]) for tokens, _ in offline)
    greedy = transcribe_talkers(session.audio, checkpoint=path, beam=1)
    offline = loaded.greedy_search(feats, torch.tensor([feats.shape[1]]))[0]
    assert greedy.beam == 1
    assert greedy.channels == tuple(frontend.tokenizer.decode([t for t in tokens if t < pieces]) for tokens, _ in offline)
    result = CliRunner().invoke(
        app, ["device", "transcribe", str(session.audio), "--talkers", "2", "--checkpoint", str(path), "--beam", "1"]
    )
    assert result.exit_code == 0 and "greedy search)" in result.output, result.output
    wrong = CliRunner().invoke(
        app, ["device", "transcribe", str(session.audio), "--talkers", "2", "--checkpoint", str(SHIPPED_DIR / "dense-6.pt")]
    )
    assert wrong.exit_code == 2 and "--talkers 1" in wrong.output


@pytest.mark.slow
def test_quick_benchmark_trains_and_measures_the_three_systems(tmp_path: Path) -> None:
    # --beam 2: scored and streamed by beam search (the pipeline end to end; greedy search is the default)
    args = ["bench", "multitalker", "--quick", "--beam", "2", "--activity-weight", "2", "--json", "--workdir", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert list(report["arms"]) == ["sts+penalty", "mt-rnnt", "sts"] and report["plan"]["beam"] == 2
    for arm in report["arms"].values():
        assert arm["all"]["sessions"] == 4 and arm["all"]["words"] > 0 and 0.0 <= arm["all"]["wer"]
        assert arm["training"]["steps"] == 2 and arm["batch1_streaming_rtf"] > 0
        # and on the test speakers' own utterances, one talker each (3 speakers x 3 utterances)
        assert arm["single_talker"]["sessions"] == 9 and arm["single_talker"]["words"] > 0
    arms = report["arms"]
    # two channels of separator blocks cost more than one, and all three share the encoder
    assert arms["sts"]["encoder_gflops_per_audio_second"] > arms["mt-rnnt"]["encoder_gflops_per_audio_second"]
    assert arms["sts"]["encoder_gflops_per_audio_second"] == pytest.approx(arms["sts+penalty"]["encoder_gflops_per_audio_second"])
    assert arms["sts+penalty"]["turn_penalty"] > 0 and arms["sts"]["turn_penalty"] == 0
    # the two-channel systems learn the turn-activity head beside the transducer loss; MT-RNN-T has no turns to route
    for name, arm in arms.items():
        stage = arm["training"]["stages"][-1]
        assert stage["activity_weight"] == (0.0 if name == "mt-rnnt" else 2.0)
        assert all(("activity_loss" in entry) == (name != "mt-rnnt") for entry in stage["loss_curve"])
    text = (tmp_path / "runs" / "bench-multitalker-quick" / "report.md").read_text()
    assert text.startswith("# Multi-talker benchmark") and "modified beam search, beam 2." in text
    assert "| mt-rnnt | 9 |" in text  # the single-talker table
    # Each system's decoding chosen on validation speakers (3 x 3 utterances, 4 sessions), then scored on the test ones:
    # every stage of the search keeps the previous choice among its candidates, so the choice makes the fewest errors.
    for name, arm in arms.items():
        chosen, tried = arm["validated"], arm["validated"]["tried"]
        assert chosen["val_errors"] == min(t["errors"] for t in tried) and chosen["val_words"] > 0
        assert {tuple(t["turn_bonus"]) for t in tried} >= {(0.0, 0.0), (1.0, 0.0)} and {t["beam"] for t in tried} == {1, 2}
        assert chosen["all"]["sessions"] == 4 and chosen["single_talker"]["sessions"] == 9
        assert name != "mt-rnnt" or all(t["turn_bonus"][1] == 0.0 for t in tried)  # MT-RNN-T has no <eot>
    assert "validated" in report["comparison"] and "chosen on validation data" in text
    # each session's errors add up to the WER; the paired interval of STS against MT-RNN-T resamples those sessions
    for arm in arms.values():
        assert len(arm["session_errors"]) == 4 and sum(arm["session_errors"]) == round(arm["all"]["wer"] * arm["all"]["words"])
    low, high = report["comparison"]["sts+penalty_vs_mt-rnnt_relative_wer_95ci"]
    assert low <= high


def test_shipped_two_talker_model_is_the_one_measured_and_scores_so_on_unseen_speakers(tmp_path: Path) -> None:
    entry = shipped_manifest()[SHIPPED_MULTITALKER]
    path = SHIPPED_DIR / SHIPPED_MULTITALKER
    assert sha256_of(path) == entry["sha256"], "the shipped file is not the one the manifest measured"
    model, kind, frontend, meta = load_multitalker(path)
    assert kind == entry["system"] == "sts" and model.config.channels == 2
    # the device runs the decoding chosen on validation speakers: the file carries its bonus and its beam
    chosen = entry["decoding_chosen_on"]
    assert list(model.config.turn_bonus) == chosen["turn_bonus"] and meta["beam"] == chosen["beam"]
    # The eval corpus's first speakers (`chorus data synth --seed 99`: no training session has them), new sessions.
    corpus = synthesize(tmp_path / "unseen", speakers=4, utterances=4, seed=99, workers=1, progress=False)
    sessions = load_sessions(mix_sessions(corpus, tmp_path / "mix", sessions=10, seed=98, turns=(2, 3), workers=1))
    alone = single_talker_sessions(corpus)  # and the same speakers one at a time, speech from the first frame on
    features = session_features(sessions + alone, frontend.cmvn)
    scores = evaluate(model, kind, sessions, features, frontend.tokenizer, batch_frames=4000)["all"]
    assert scores["wer"] <= entry["eval"]["all"]["wer"] + WER_MARGIN
    single = evaluate(model, kind, alone, features, frontend.tokenizer, batch_frames=4000)["all"]
    assert single["sessions"] == 16 and single["wer"] <= entry["eval"]["single_talker"]["wer"] + WER_MARGIN
