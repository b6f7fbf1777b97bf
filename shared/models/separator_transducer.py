"""Separator-transducer-segmenter (Sklyar et al., Interspeech 2022, arXiv 2205.05199): two overlapping talkers.

A streaming encoder hears the mixture; a **separator** splits its frames into C output channels (one causal
Transformer stack per channel, fed the encoder frames plus a learned channel embedding); every channel is decoded
by the **same** (tied) predictor and joiner. Each channel transcribes the turns routed to it, framed by the turn
tokens ``<sot>`` and ``<eot>``, so the words carry their own segmentation: when a turn starts, when it ends, how
many there were. Turns are routed by the heuristic error assignment of Sklyar et al. 2021 (``heat_channels`` in
``shared/multitalker.py``): in order of start time, each turn takes the first channel that is free.

With ``recognition_layers`` R > 0 (dense Transformer encoders) the separator sits inside the encoder, as in Sklyar
et al.'s mixture encoder / separator / recognition encoder: the encoder's blocks but its top R hear the mixture, and
its top R blocks and final norm then run on every channel with the same weights, so a single-talker base's upper
layers recognize each separated stream; the channels cost R more blocks each.

With ``channels=1`` and the speaker-change token ``<sc>`` between turns instead of ``<sot>``/``<eot>``, the same
module is the **MT-RNN-T** baseline of the issue (one serialized stream, no end-of-turn token).

**Turn-token latency penalty** (``turn_penalty``): the mix knows when every turn starts and ends, so each turn
token is anchored to the encoder frame r at which its event becomes audible (``turn_frames``): in the transducer
loss, emitting it at frame t gets the log-weight ``-lambda * (relu(r - TURN_SLACK[0] - t) + relu(t - r - TURN_SLACK[1]))``.
Among the alignments of a transcript, those that emit ``<eot>`` within ``TURN_SLACK[1]`` frames of the talker's end
weigh most (fast end-pointing), and a ``<sot>`` cannot drift to frame 0 before anyone speaks. It restricts only turn
tokens' alignments (Mahadeokar et al. 2021 restrict every token's this way), changes no parameter and costs nothing
at inference.

**Turns after the first** (``turn_reset``): the stateless predictor sees the last tokens, so after ``<eot>`` its
context would be a pair seen only mid-session; with the reset it starts afresh (all blank), and a channel opens its
next turn from the state it opened its first one in. ``turn_bonus`` adds a constant to the turn tokens' logits in
greedy search only (a word insertion bonus for turn tokens), chosen on validation sessions when a model ships.

The separator's blocks start with zero output projections, so at initialization every channel equals the encoder
output plus its embedding (with R > 0: the lower blocks' output plus it, through the top R blocks): a model made
``from_transducer`` a trained single-talker base starts as that base.

Legend of tensor symbols (see also ``shared/models/encoder.py`` and ``transducer.py``):
    B   sessions in a batch;  C  output channels
    T   input feature frames;  T'  encoder frames;  t  input frames of a streaming chunk, t' encoder frames
    F   feature dimension;  D  encoder dimension
    U   target tokens per channel (padded maximum)
    V   vocabulary without blank: the tokenizer's pieces, then ``<sot>``, ``<eot>``, ``<sc>``; blank is V

Example:
    >>> from shared.models.transformer import CausalTransformerEncoder, TransformerConfig
    >>> from shared.models.transducer import Transducer, TransducerConfig
    >>> base = Transducer(CausalTransformerEncoder(TransformerConfig(num_layers=2)), TransducerConfig(vocab_size=30))
    >>> model = SeparatorTransducer.from_transducer(base, SeparatorConfig(channels=2, layers=1))
    >>> feats, feat_lens = torch.randn(2, 120, 80), torch.tensor([120, 90])
    >>> targets = torch.tensor([[[30, 3, 31], [30, 5, 31]], [[30, 4, 31], [0, 0, 0]]])  # (C, B, U)
    >>> target_lens = torch.tensor([[3, 3], [3, 0]])
    >>> model(feats, feat_lens, targets, target_lens).shape
    torch.Size([2])
    >>> model = model.eval()
    >>> state = model.init_stream(batch_size=1)
    >>> for chunk in feats[:1].split(32, dim=1):
    ...     state = model.stream(chunk, state)
    >>> [list(h) for h in state.hypotheses] == [h for h, _ in model.greedy_search(feats[:1], feat_lens[:1])[0]]
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from shared.models.encoder import BlockList, check_batch, check_chunk
from shared.models.transducer import Beam, Transducer
from shared.models.transformer import BlockCache, CausalTransformerEncoder, TransformerBlock, TransformerConfig, TransformerState

__all__ = [
    "TURN_SLACK",
    "TURN_TOKENS",
    "SeparatorConfig",
    "SeparatorState",
    "SeparatorTransducer",
    "MultiStreamState",
    "extended_vocabulary",
]

TURN_TOKENS = ("<sot>", "<eot>", "<sc>")
"""Tokens appended to the tokenizer's vocabulary, in this order: start of turn, end of turn, speaker change."""
TURN_SLACK = (2, 5)
"""Encoder frames (40 ms) a turn token may come before / after its anchor at no cost under ``turn_penalty``."""


def extended_vocabulary(tokenizer_vocab: int) -> dict[str, int]:
    """Ids of ``TURN_TOKENS`` after a tokenizer of ``tokenizer_vocab`` pieces (blank comes after them)."""
    return {name: tokenizer_vocab + i for i, name in enumerate(TURN_TOKENS)}


@dataclass(frozen=True)
class SeparatorConfig:
    channels: int = 2  # talkers transcribed at once (Sklyar et al.: 2); 1 is the MT-RNN-T baseline
    layers: int = 2  # causal Transformer blocks per channel
    # The encoder's top blocks that run after the separator, on every channel with the same weights (Sklyar et
    # al.'s recognition encoder); 0: the separator follows the whole encoder.
    recognition_layers: int = 0
    # After ``<eot>`` the predictor's context starts afresh (all blank), so a channel's later turns begin in the
    # state its first one did; without it the context after ``<eot>`` is a pair seen only mid-session.
    turn_reset: bool = False
    # Scores added in greedy search to the logits of a turn's start (``<sot>``, or ``<sc>`` for MT-RNN-T) and of
    # its end (``<eot>``): decoding only, like a word insertion bonus, chosen on validation sessions.
    turn_bonus: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "turn_bonus", tuple(float(x) for x in self.turn_bonus))  # a saved file has a list
        if len(self.turn_bonus) != 2 or not all(math.isfinite(x) for x in self.turn_bonus):
            raise ValueError(f"turn_bonus must be two finite numbers (turn start, turn end), got {self.turn_bonus}")
        if self.channels < 1 or self.layers < 1 or self.recognition_layers < 0:
            raise ValueError(
                f"channels and layers must be positive and recognition_layers >= 0, got {self.channels}, "
                f"{self.layers} and {self.recognition_layers}"
            )


class SeparatorState(NamedTuple):
    """Streaming state of the encoder and the separator.

    Attributes:
        encoder: the encoder's own state (with ``recognition_layers``: of its blocks below the separator only).
        channels: per channel, one ``BlockCache`` per separator block.
        offset: encoder frames released so far (the separator blocks' absolute position).
        recognition: one ``BlockCache`` (C * B rows, channel-major) per recognition block.
    """

    encoder: Any
    channels: tuple[tuple[BlockCache, ...], ...]
    offset: int
    recognition: tuple[BlockCache, ...] = ()


class MultiStreamState(NamedTuple):
    """Streaming decoding state; rows are channel-major: row ``c * B + b`` is channel c of stream b.

    Attributes:
        separator: ``SeparatorState``.
        context: (C * B, c) predictor contexts (greedy search).
        hypotheses: tokens emitted so far per row (beam search: the row's best hypothesis so far).
        frames: the encoder frame (absolute) at which each of those tokens was emitted.
        beams: beam search's ``Beam`` per row; empty under greedy search.
    """

    separator: SeparatorState
    context: Tensor
    hypotheses: tuple[tuple[int, ...], ...]
    frames: tuple[tuple[int, ...], ...]
    beams: tuple[Beam, ...] = ()


class SeparatorTransducer(nn.Module):
    """Encoder, separator into C channels, and a transducer head (predictor, joiner) tied across channels."""

    def __init__(self, transducer: Transducer, config: SeparatorConfig, block: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.transducer = transducer
        if config.turn_reset:
            pieces = transducer.config.vocab_size - len(TURN_TOKENS)
            transducer.predictor.reset_token = extended_vocabulary(pieces)["<eot>"]
        width = int(transducer.encoder.output_dim)
        if block.d_model != width:
            raise ValueError(f"separator blocks must have d_model={width} (the encoder's), got {block.d_model}")
        if config.recognition_layers:
            blocks = getattr(transducer.encoder, "blocks", None)
            if not isinstance(transducer.encoder, CausalTransformerEncoder) or blocks is None:
                raise ValueError("recognition_layers needs the dense Transformer encoder (model.name=transformer)")
            if config.recognition_layers >= len(blocks):
                raise ValueError(f"recognition_layers={config.recognition_layers} leaves no encoder block before the separator")
        self.channel_embedding = nn.Parameter(torch.randn(config.channels, width) * 0.1)
        self.separator: BlockList[BlockList[TransformerBlock]] = BlockList(
            BlockList(TransformerBlock(block) for _ in range(config.layers)) for _ in range(config.channels)
        )
        for stack in self.separator:
            for layer in stack:
                nn.init.zeros_(layer.attention.out.weight)
                nn.init.zeros_(layer.attention.out.bias)
                nn.init.zeros_(layer.feed_forward.out.weight)
                nn.init.zeros_(layer.feed_forward.out.bias)
                if layer.conv is not None:
                    nn.init.zeros_(layer.conv.pointwise_out.weight)
                    nn.init.zeros_(layer.conv.pointwise_out.bias)

    @classmethod
    def from_transducer(
        cls, base: Transducer, config: SeparatorConfig, block: TransformerConfig | None = None
    ) -> SeparatorTransducer:
        """A model that starts as the single-talker ``base``: its encoder, and its predictor and joiner with the
        vocabulary extended by ``TURN_TOKENS`` (pieces and blank keep their weights; the new tokens' output rows
        start at the mean of the pieces' with a low bias, so the model does not emit them before it learns them)."""
        encoder = base.encoder
        if block is None:
            enc_cfg = getattr(encoder, "config", None)
            block = enc_cfg if isinstance(enc_cfg, TransformerConfig) else TransformerConfig(d_model=int(encoder.output_dim))
        pieces = base.config.vocab_size
        head = Transducer(encoder, dataclasses.replace(base.config, vocab_size=pieces + len(TURN_TOKENS)))
        with torch.no_grad():
            old_embedding, new_embedding = base.predictor.embedding.weight, head.predictor.embedding.weight
            new_embedding[:pieces] = old_embedding[:pieces]
            new_embedding[pieces : pieces + len(TURN_TOKENS)] = old_embedding[:pieces].mean(dim=0)
            new_embedding[head.blank] = old_embedding[base.blank]
            head.predictor.load_state_dict(base.predictor.state_dict() | {"embedding.weight": new_embedding.clone()})
            head.joiner.encoder_proj.load_state_dict(base.joiner.encoder_proj.state_dict())
            head.joiner.predictor_proj.load_state_dict(base.joiner.predictor_proj.state_dict())
            old_out, new_out = base.joiner.output, head.joiner.output
            new_out.weight[:pieces] = old_out.weight[:pieces]
            new_out.bias[:pieces] = old_out.bias[:pieces]
            new_out.weight[pieces : pieces + len(TURN_TOKENS)] = old_out.weight[:pieces].mean(dim=0)
            new_out.bias[pieces : pieces + len(TURN_TOKENS)] = old_out.bias[:pieces].min()
            new_out.weight[head.blank] = old_out.weight[base.blank]
            new_out.bias[head.blank] = old_out.bias[base.blank]
        return cls(head, config, block)

    @property
    def blank(self) -> int:
        return self.transducer.blank

    def _bonus(self) -> Tensor | None:
        """(V + 1,) greedy-search bonus of the turn tokens (``config.turn_bonus``); None when it is zero."""
        if not any(self.config.turn_bonus):
            return None
        reference = self.transducer.joiner.output.bias
        bonus = torch.zeros(self.blank + 1, dtype=reference.dtype, device=reference.device)
        ids = extended_vocabulary(self.blank - len(TURN_TOKENS))
        if self.config.channels == 1:  # MT-RNN-T: a turn starts with <sc> and has no end token
            bonus[ids["<sc>"]] = self.config.turn_bonus[0]
        else:
            bonus[ids["<sot>"]], bonus[ids["<eot>"]] = self.config.turn_bonus
        return bonus

    def _separate(
        self, frames: Tensor, caches: tuple[tuple[BlockCache, ...], ...], offset: int
    ) -> tuple[Tensor, tuple[tuple[BlockCache, ...], ...]]:
        """(B, t', D) encoder frames from ``offset`` on -> (C * B, t', D) channel frames (channel-major) and caches."""
        outputs, new_caches = [], []
        for c, stack in enumerate(self.separator):
            hidden = frames + self.channel_embedding[c]
            layer_caches = []
            for layer, cache in zip(stack, caches[c], strict=True):
                hidden, cache = layer(hidden, cache, offset)
                layer_caches.append(cache)
            outputs.append(hidden)
            new_caches.append(tuple(layer_caches))
        return torch.cat(outputs, dim=0), tuple(new_caches)

    def _empty_caches(self, batch_size: int, reference: Tensor) -> tuple[tuple[BlockCache, ...], ...]:
        return tuple(tuple(layer.empty_cache(batch_size, reference) for layer in stack) for stack in self.separator)

    def _split_encode(
        self, frames: Tensor, state: SeparatorState
    ) -> tuple[Tensor, tuple[BlockCache, ...], tuple[tuple[BlockCache, ...], ...], tuple[BlockCache, ...]]:
        """With ``recognition_layers`` R: (B, t', D) subsampled frames from ``state.offset`` on -> the encoder's
        blocks but the top R, the separator, the top R blocks on each channel (C * B rows) and the final norm:
        (C * B, t', D) channel frames and the new caches (below, separator, recognition)."""
        encoder = self.transducer.encoder
        assert isinstance(encoder, CausalTransformerEncoder)
        split = len(encoder.blocks) - self.config.recognition_layers
        frames = encoder.frontend_dropout(frames)
        below = []
        for block, cache in zip(encoder.blocks[:split], state.encoder.layers, strict=True):
            frames, cache = block(frames, cache, state.offset)
            below.append(cache)
        frames, separator = self._separate(frames, state.channels, state.offset)
        recognition = []
        for block, cache in zip(encoder.blocks[split:], state.recognition, strict=True):
            frames, cache = block(frames, cache, state.offset)
            recognition.append(cache)
        return encoder.final_norm(frames), tuple(below), separator, tuple(recognition)

    def _init_separator_state(self, batch_size: int, reference: Tensor) -> SeparatorState:
        encoder = self.transducer.encoder
        encoder_state = encoder.init_state(batch_size, reference.device)
        recognition: tuple[BlockCache, ...] = ()
        if self.config.recognition_layers:
            assert isinstance(encoder, CausalTransformerEncoder)
            split = len(encoder.blocks) - self.config.recognition_layers
            encoder_state = encoder_state._replace(layers=encoder_state.layers[:split])
            rows = self.config.channels * batch_size
            recognition = tuple(block.empty_cache(rows, reference) for block in encoder.blocks[split:])
        return SeparatorState(
            encoder=encoder_state, channels=self._empty_caches(batch_size, reference), offset=0, recognition=recognition
        )

    def channel_frames(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """feats (B, T, F), feat_lens (B,) -> channel frames (C * B, T', D), zero beyond each length, and (C * B,)
        lengths."""
        encoder = self.transducer.encoder
        check_batch(feats, feat_lens, int(encoder.input_dim))
        lengths = encoder.subsampled_length(feat_lens).repeat(self.config.channels)
        if self.config.recognition_layers:
            assert isinstance(encoder, CausalTransformerEncoder)
            subsampled = encoder.frontend(feats)
            frames = subsampled.new_zeros(self.config.channels * feats.shape[0], 0, subsampled.shape[2])
            if subsampled.shape[1] > 0:
                frames = self._split_encode(subsampled, self._init_separator_state(feats.shape[0], subsampled))[0]
        else:
            encoded = self.transducer.encoder(feats, feat_lens)
            frames, _ = self._separate(encoded.frames, self._empty_caches(feats.shape[0], encoded.frames), offset=0)
        valid = torch.arange(frames.shape[1], device=frames.device) < lengths.to(frames.device)[:, None]
        return frames * valid.unsqueeze(-1).to(frames.dtype), lengths

    def forward(
        self,
        feats: Tensor,
        feat_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        turn_frames: Tensor | None = None,
        turn_penalty: float = 0.0,
    ) -> Tensor:
        """(B,) transducer loss per session, summed over channels.

        Args:
            feats: (B, T, F); feat_lens: (B,).
            targets: (C, B, U) token ids of each channel's transcript (turn tokens included), padded.
            target_lens: (C, B); a channel with no turn has length 0 (it must emit only blanks).
            turn_frames: (C, B, U) the encoder frame each target token is anchored to, NaN for tokens that are not
                (words); needed when ``turn_penalty`` > 0.
            turn_penalty: lambda of the turn-token latency penalty, per encoder frame outside ``TURN_SLACK``
                (0: the plain negative log-likelihood).
        """
        frames, lengths = self.channel_frames(feats, feat_lens)
        return self.frames_loss(frames, lengths, targets, target_lens, turn_frames=turn_frames, turn_penalty=turn_penalty)

    def frames_loss(
        self,
        frames: Tensor,
        lengths: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        turn_frames: Tensor | None = None,
        turn_penalty: float = 0.0,
    ) -> Tensor:
        """``forward`` from the channel frames (C * B, T', D) and lengths of ``channel_frames``: (B,) loss."""
        channels = self.config.channels
        batch = frames.shape[0] // channels
        if targets.dim() != 3 or targets.shape[:2] != (channels, batch) or target_lens.shape != targets.shape[:2]:
            raise ValueError(
                f"targets must be (C={channels}, B={batch}, U) and target_lens (C, B), got "
                f"{tuple(targets.shape)} and {tuple(target_lens.shape)}"
            )
        if turn_penalty and (turn_frames is None or turn_frames.shape != targets.shape):
            raise ValueError(f"turn_penalty needs turn_frames of the targets' shape {tuple(targets.shape)}")
        flat_targets, flat_lens = targets.reshape(-1, targets.shape[2]), target_lens.reshape(-1)
        bonus = None
        if turn_penalty and turn_frames is not None:
            t = torch.arange(frames.shape[1], device=frames.device, dtype=torch.float64)[None, :, None]  # (1, T', 1)
            anchor = turn_frames.reshape(-1, 1, targets.shape[2]).to(t)  # (C * B, 1, U)
            early, late = TURN_SLACK
            outside = torch.relu(anchor - early - t) + torch.relu(t - anchor - late)  # (C * B, T', U), NaN: words
            bonus = torch.nan_to_num(-turn_penalty * outside, nan=0.0)
        loss, _ = self.transducer.frames_loss(frames, lengths, flat_targets, flat_lens, emission_bonus=bonus)
        return loss.view(channels, -1).sum(dim=0)

    def turn_activity(self, targets: Tensor, turn_frames: Tensor, frames: int) -> Tensor:
        """(C * B, T') 1.0 at the encoder frames where a turn of the row's channel is under way: from the anchor of
        each ``<sot>`` to that of the ``<eot>`` after it (``targets`` and ``turn_frames`` as in ``forward``); the
        target of a training-only per-frame head that tells each channel when its talker speaks."""
        if self.config.channels == 1:
            raise ValueError("turn activity needs <sot>/<eot> turns: a two-channel model (MT-RNN-T has no turn end)")
        ids = extended_vocabulary(self.blank - len(TURN_TOKENS))
        flat, anchors = targets.reshape(-1, targets.shape[2]), turn_frames.reshape(-1, targets.shape[2])
        starts = torch.where(flat == ids["<sot>"], anchors, torch.nan)
        ends = torch.where(flat == ids["<eot>"], anchors, torch.nan)
        # a turn is <sot> ... <eot> in order: the k-th start pairs with the k-th end of its row
        starts = starts.gather(1, torch.argsort(starts.isnan().to(torch.int8), dim=1, stable=True))
        ends = ends.gather(1, torch.argsort(ends.isnan().to(torch.int8), dim=1, stable=True))
        t = torch.arange(frames, device=targets.device, dtype=anchors.dtype)[None, :, None]  # (1, T', 1)
        inside = (t >= starts[:, None, :]) & (t <= ends[:, None, :])  # NaN compares False
        return inside.any(dim=2).to(torch.float32)

    @torch.no_grad()
    def greedy_search(
        self, feats: Tensor, feat_lens: Tensor, max_symbols_per_frame: int = 3
    ) -> list[list[tuple[list[int], list[int]]]]:
        """Per session, per channel: (token ids, encoder frame of each) by greedy search."""
        frames, lengths = self.channel_frames(feats, feat_lens)
        context = self.transducer.predictor.start_context(frames.shape[0], frames.device)
        _, emitted, when = self.transducer.greedy_frames(frames, lengths, context, max_symbols_per_frame, self._bonus())
        return self._by_session(list(zip(emitted, when, strict=True)), feats.shape[0])

    @torch.no_grad()
    def beam_search(self, feats: Tensor, feat_lens: Tensor, beam: int = 8) -> list[list[tuple[list[int], list[int]]]]:
        """Per session, per channel: (token ids, encoder frame of each) by modified beam search
        (``Transducer.beam_frames``, with the turn bonus), each channel on its own; ``stream(..., beam=N)`` gives
        the same chunk by chunk."""
        if beam < 1:
            raise ValueError(f"beam must be positive, got {beam}")
        frames, lengths = self.channel_frames(feats, feat_lens)
        bonus = self._bonus()
        decoded = [self.transducer.beam_frames(frames[row, : int(lengths[row])], beam, bonus) for row in range(frames.shape[0])]
        return self._by_session(decoded, feats.shape[0])

    def _by_session(self, rows: list[tuple[list[int], list[int]]], batch: int) -> list[list[tuple[list[int], list[int]]]]:
        """Channel-major rows (C * B) -> per session, per channel."""
        return [[rows[c * batch + b] for c in range(self.config.channels)] for b in range(batch)]

    def init_stream(self, batch_size: int = 1) -> MultiStreamState:
        """A fresh streaming state for ``batch_size`` sessions."""
        device = next(self.parameters()).device
        reference = next(self.parameters()).new_zeros((), device=device)
        rows = self.config.channels * batch_size
        return MultiStreamState(
            separator=self._init_separator_state(batch_size, reference),
            context=self.transducer.predictor.start_context(rows, device),
            hypotheses=((),) * rows,
            frames=((),) * rows,
        )

    def infer(self, chunk: Tensor, state: SeparatorState) -> tuple[Tensor, SeparatorState]:
        """chunk (B, t, F) -> channel frames (C * B, t', D) it completes and the new state; chunk by chunk equal to
        ``channel_frames`` on the whole input."""
        if self.config.recognition_layers:
            encoder = self.transducer.encoder
            assert isinstance(encoder, CausalTransformerEncoder)
            check_chunk(chunk, encoder.input_dim, state.encoder.pending.shape[0])
            subsampled, pending = encoder.frontend.stream(state.encoder.pending, chunk)
            offset = state.offset + subsampled.shape[1]
            if subsampled.shape[1] == 0:
                empty = subsampled.new_zeros(self.config.channels * chunk.shape[0], 0, subsampled.shape[2])
                return empty, state._replace(encoder=state.encoder._replace(pending=pending))
            frames, below, separator, recognition = self._split_encode(subsampled, state)
            encoder_state = TransformerState(pending=pending, layers=below, offset=offset)
            return frames, SeparatorState(encoder=encoder_state, channels=separator, offset=offset, recognition=recognition)
        frames, encoder_state = self.transducer.encoder.infer(chunk, state.encoder)
        if frames.shape[1] == 0:
            empty = frames.new_zeros(self.config.channels * frames.shape[0], 0, frames.shape[2])
            return empty, state._replace(encoder=encoder_state)
        channel_frames, caches = self._separate(frames, state.channels, state.offset)
        return channel_frames, SeparatorState(encoder=encoder_state, channels=caches, offset=state.offset + frames.shape[1])

    @torch.no_grad()
    def stream(self, chunk: Tensor, state: MultiStreamState, max_symbols_per_frame: int = 3, beam: int = 1) -> MultiStreamState:
        """Decode the next chunk (B, t, F); tokens and their frames accumulate per row (channel-major).

        ``beam`` 1 is greedy search (``greedy_search`` after the last chunk); a wider one is modified beam search
        per row carried from chunk to chunk, each row's best hypothesis so far shown (``beam_search`` after the
        last chunk). Keep one width for a whole stream.
        """
        if beam < 1:
            raise ValueError(f"beam must be positive, got {beam}")
        start = state.separator.offset
        frames, separator = self.infer(chunk, state.separator)
        if beam > 1:
            beams = self.transducer.extend_beams(state.beams, frames, beam, self._bonus())
            best = [b.best() for b in beams]
            return MultiStreamState(
                separator=separator,
                context=state.context,
                hypotheses=tuple(tokens for tokens, _ in best),
                frames=tuple(when for _, when in best),
                beams=beams,
            )
        counts = torch.full((frames.shape[0],), frames.shape[1], device=frames.device)
        context, emitted, when = self.transducer.greedy_frames(
            frames, counts, state.context, max_symbols_per_frame, self._bonus()
        )
        return MultiStreamState(
            separator=separator,
            context=context,
            hypotheses=tuple(old + tuple(new) for old, new in zip(state.hypotheses, emitted, strict=True)),
            frames=tuple(old + tuple(start + t for t in new) for old, new in zip(state.frames, when, strict=True)),
        )
