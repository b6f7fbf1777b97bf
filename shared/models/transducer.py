"""RNN-transducer around any ``StreamingEncoder``: stateless predictor, joiner, loss, greedy / beam / streaming search.

Legend of tensor symbols (see also ``shared/models/encoder.py``):
    B   batch size;  K  hypotheses of one utterance in beam search
    T   input feature frames;  T'  encoder frames;  t  input frames of one streaming chunk
    F   feature dimension;  D  encoder output dimension
    U   target tokens (padded maximum)
    V   vocabulary size without blank; the blank id is V, so the joiner has V + 1 outputs
    P   predictor dimension (``pred_dim``);  J  joiner dimension (``joint_dim``)
    c   predictor context: the last ``context_size`` tokens, left-padded with blank

Example:
    >>> from shared.models.transformer import CausalTransformerEncoder, TransformerConfig
    >>> encoder = CausalTransformerEncoder(TransformerConfig(num_layers=2))
    >>> model = Transducer(encoder, TransducerConfig(vocab_size=30))
    >>> feats, feat_lens = torch.randn(2, 120, 80), torch.tensor([120, 90])
    >>> targets, target_lens = torch.tensor([[3, 7, 1], [4, 4, 0]]), torch.tensor([3, 2])
    >>> out = model(feats, feat_lens, targets, target_lens)
    >>> out.loss_per_utt.shape, out.enc_lens.tolist()
    (torch.Size([2]), [29, 21])
    >>> out.loss_per_utt.mean().backward()
    >>> model = model.eval()
    >>> state = model.init_stream(batch_size=1)
    >>> for chunk in feats[:1].split(32, dim=1):
    ...     state = model.stream(chunk, state)
    >>> list(state.hypotheses[0]) == model.greedy_search(feats[:1], feat_lens[:1])[0]
    True
    >>> state = model.init_stream(batch_size=1)
    >>> for chunk in feats[:1].split(32, dim=1):
    ...     state = model.stream(chunk, state, beam=4)
    >>> list(state.hypotheses[0]) == model.beam_search(feats[:1], feat_lens[:1], beam=4)[0]
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.models.encoder import StreamingEncoder
from shared.models.rnnt_loss import rnnt_loss

__all__ = ["Beam", "Joiner", "StatelessPredictor", "StreamState", "Transducer", "TransducerConfig", "TransducerOutput"]


@dataclass(frozen=True)
class TransducerConfig:
    """Sizes of the predictor and joiner; the encoder brings its own config."""

    vocab_size: int  # the tokenizer's vocabulary, blank excluded; blank gets id vocab_size
    pred_dim: int = 256  # icefall's decoder_dim for small models: a 2-token context needs no more
    joint_dim: int = 256  # icefall's joiner_dim; the (B, T', U + 1, J) grid dominates training memory
    context_size: int = 2  # bigram context: Ghodsi et al. 2020 found longer stateless contexts gain little

    def __post_init__(self) -> None:
        for name in ("vocab_size", "pred_dim", "joint_dim", "context_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def blank(self) -> int:
        """The blank id: one past the tokenizer's ids."""
        return self.vocab_size


class StatelessPredictor(nn.Module):
    """Stateless prediction network (Ghodsi et al. 2020, as in icefall): the last c tokens, not the whole history.

    Embedding(V + 1, P) of each context token (blank doubles as the start symbol), then a depthwise Conv1d over
    the c positions and ReLU. Why stateless: the predictor of an RNN-T mostly models label context, and a bigram
    costs little accuracy while (1) training runs in parallel over U with no recurrence, (2) it needs only
    Embedding and Conv1d, so Opacus computes per-sample gradients without a slow DPLSTM, and (3) a decoding state
    is just c token ids, so beam hypotheses with equal contexts share predictor outputs and merge.
    """

    def __init__(self, vocab_size: int, pred_dim: int, context_size: int) -> None:
        super().__init__()
        self.blank = vocab_size
        self.context_size = context_size
        self.embedding = nn.Embedding(vocab_size + 1, pred_dim)
        self.context_conv = nn.Conv1d(pred_dim, pred_dim, kernel_size=context_size, groups=pred_dim) if context_size > 1 else None
        # A token after which the context starts afresh: a window sees blank in place of it and everything before
        # it, as before the first token (set by models whose transcripts are runs of segments, e.g. turns).
        self.reset_token: int | None = None

    def start_context(self, batch_size: int, device: torch.device) -> Tensor:
        """(B, c) all-blank context: what the predictor sees before the first token."""
        return torch.full((batch_size, self.context_size), self.blank, dtype=torch.long, device=device)

    def training_context(self, targets: Tensor, target_lens: Tensor) -> Tensor:
        """Token ids whose c-wide windows are the contexts of every lattice row u = 0 .. U.

        Args:
            targets: (B, U) token ids in [0, V) within ``target_lens``; anything beyond.
            target_lens: (B,) in [0, U].

        Returns:
            (B, c + U): c blanks then the targets, padding replaced by blank.
        """
        if targets.dim() != 2 or target_lens.shape != (targets.shape[0],):
            raise ValueError(
                f"targets must be (B, U) and target_lens (B,), got {tuple(targets.shape)} and {tuple(target_lens.shape)}"
            )
        if targets.shape[0] > 0 and (int(target_lens.min()) < 0 or int(target_lens.max()) > targets.shape[1]):
            raise ValueError(f"target_lens must lie in [0, U={targets.shape[1]}], got {target_lens.tolist()}")
        valid = torch.arange(targets.shape[1], device=targets.device) < target_lens.to(targets.device)[:, None]
        labels = targets[valid]
        bad = (labels < 0) | (labels >= self.blank)
        if bool(bad.any()):
            raise ValueError(f"target ids must lie in [0, vocab_size={self.blank}), got {labels[bad].unique().tolist()}")
        padded = targets.long().masked_fill(~valid, self.blank)
        return torch.cat([self.start_context(targets.shape[0], targets.device), padded], dim=1)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, c + n - 1) ids -> (B, n, P); output i summarizes tokens i .. i + c - 1 (with ``reset_token``:
        those after the window's last reset token, blanks in place of the rest)."""
        if self.reset_token is not None:
            return F.relu(self._reset_windows(tokens, self.reset_token))
        embedded = self.embedding(tokens)
        if self.context_conv is not None:
            embedded = self.context_conv(embedded.transpose(1, 2)).transpose(1, 2)
        return F.relu(embedded)

    def _reset_windows(self, tokens: Tensor, reset_token: int) -> Tensor:
        """The depthwise convolution written out per window, each window blanked up to its last reset token."""
        windows = tokens.unfold(1, self.context_size, 1)  # (B, n, c)
        reset = (windows == reset_token).flip(-1).cumsum(dim=-1).flip(-1) > 0  # at or before the last reset
        embedded = self.embedding(windows.masked_fill(reset, self.blank))  # (B, n, c, P)
        if self.context_conv is None:
            return embedded[:, :, 0]
        weight = self.context_conv.weight[:, 0, :].t()  # (c, P)
        bias = self.context_conv.bias
        return (embedded * weight).sum(dim=2) + (bias if bias is not None else 0.0)


class Joiner(nn.Module):
    """Joint network: tanh(Linear(encoder) + Linear(predictor)), then Linear to V + 1 logits."""

    def __init__(self, enc_dim: int, pred_dim: int, joint_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder_proj = nn.Linear(enc_dim, joint_dim)
        self.predictor_proj = nn.Linear(pred_dim, joint_dim)
        self.output = nn.Linear(joint_dim, num_classes)

    def forward(self, encoder_out: Tensor, predictor_out: Tensor) -> Tensor:
        """encoder_out: (B, T', D), predictor_out: (B, n, P) -> logits (B, T', n, V + 1) over the whole grid.

        Each input is projected once; only the addition, tanh and output layer run on the grid.
        """
        hidden = self.encoder_proj(encoder_out).unsqueeze(2) + self.predictor_proj(predictor_out).unsqueeze(1)
        return self.output(torch.tanh(hidden))


class TransducerOutput(NamedTuple):
    """What ``Transducer.forward`` returns.

    Attributes:
        loss_per_utt: (B,) RNN-T negative log-likelihood per utterance (nats).
        compute_cost: scalar share of the encoder's gateable compute used (see ``EncoderOutput``).
        enc_lens: (B,) encoder frames per utterance.
        ctc_loss_per_utt: (B,) CTC negative log-likelihood of the encoder alone (``ctc=True``), else None.
    """

    loss_per_utt: Tensor
    compute_cost: Tensor
    enc_lens: Tensor
    ctc_loss_per_utt: Tensor | None = None


class Beam(NamedTuple):
    """Modified beam search between two frames, so that a stream can carry it from chunk to chunk.

    Attributes:
        hypotheses: the surviving hypotheses: (token ids, the encoder frame of each).
        scores: their log-probabilities.
        frames: encoder frames searched so far (the next frame's index).
    """

    hypotheses: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (((), ()),)
    scores: tuple[float, ...] = (0.0,)
    frames: int = 0

    def best(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The most probable hypothesis: (token ids, frame of each)."""
        return self.hypotheses[max(range(len(self.scores)), key=self.scores.__getitem__)]


class StreamState(NamedTuple):
    """Streaming decoding state of a ``Transducer``.

    Attributes:
        encoder: the encoder's own streaming state (e.g. ``TransformerState``).
        context: (B, c) last c emitted token ids, left-padded with blank (greedy search).
        hypotheses: token ids emitted so far, one tuple per stream (beam search: its best hypothesis so far).
        beams: beam search's ``Beam`` per stream; empty under greedy search.
    """

    encoder: Any
    context: Tensor
    hypotheses: tuple[tuple[int, ...], ...]
    beams: tuple[Beam, ...] = ()


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) of two finite floats."""
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


class Transducer(nn.Module):
    """RNN-T: a ``StreamingEncoder`` (transcriber), a ``StatelessPredictor`` and a ``Joiner``.

    Decoding methods run without gradients and in whatever mode the model is in: call ``eval()`` first.
    """

    encoder: StreamingEncoder

    def __init__(self, encoder: StreamingEncoder, config: TransducerConfig) -> None:
        super().__init__()
        if not all(hasattr(encoder, name) for name in ("output_dim", "init_state", "infer", "subsampled_length")):
            raise ValueError(f"encoder must implement StreamingEncoder, got {type(encoder).__name__}")
        self.config = config
        self.blank = config.blank
        self.encoder = encoder
        self.predictor = StatelessPredictor(config.vocab_size, config.pred_dim, config.context_size)
        self.joiner = Joiner(int(encoder.output_dim), config.pred_dim, config.joint_dim, config.vocab_size + 1)

    def forward(
        self,
        feats: Tensor,
        feat_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        fastemit_lambda: float = 0.0,
        ctc: bool = False,
    ) -> TransducerOutput:
        """Per-utterance RNN-T loss (and, with ``ctc``, the auxiliary CTC loss of the encoder).

        Args:
            feats: (B, T, F) features, padded.
            feat_lens: (B,) valid frames; each must yield at least one encoder frame.
            targets: (B, U) token ids in [0, V), padded with anything.
            target_lens: (B,) valid tokens.
            fastemit_lambda: FastEmit regularization of the RNN-T gradient (see ``rnnt_loss``).
            ctc: also return the CTC loss of ``ctc_logits``: it makes the encoder's frames peaky, so each token
                is decided at one frame, which greedy search needs (no extra parameters: the joiner's own layers).

        Returns:
            ``TransducerOutput``; the joiner runs once over the (B, T', U + 1) grid trimmed to the longest
            utterance and transcript of the batch.
        """
        if targets.dim() != 2 or targets.shape[0] != feats.shape[0]:
            raise ValueError(f"targets must be (B={feats.shape[0]}, U), got shape {tuple(targets.shape)}")
        encoded = self.encoder(feats, feat_lens)
        too_short = (encoded.lengths < 1).nonzero().flatten().tolist()
        if too_short:
            raise ValueError(f"utterances {too_short} (feat_lens {feat_lens[too_short].tolist()}) give no encoder frame")
        loss, ctc_loss = self.frames_loss(
            encoded.frames, encoded.lengths, targets, target_lens, fastemit_lambda=fastemit_lambda, ctc=ctc
        )
        return TransducerOutput(
            loss_per_utt=loss, compute_cost=encoded.compute_cost, enc_lens=encoded.lengths, ctc_loss_per_utt=ctc_loss
        )

    def frames_loss(
        self,
        frames: Tensor,
        frame_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        fastemit_lambda: float = 0.0,
        ctc: bool = False,
        emission_bonus: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(B,) RNN-T losses (and CTC losses with ``ctc``) of encoder ``frames`` (B, T', D) with ``frame_lens`` (B,),
        each >= 1, against ``targets`` (B, U): ``forward`` after the encoder, for models that transform its frames
        (e.g. a separator). ``emission_bonus`` (B, T'', U''), trimmed to the longest frames and transcript of the
        batch, goes to ``rnnt_loss``."""
        max_frames = int(frame_lens.max()) if frames.shape[0] > 0 else 0
        max_tokens = int(target_lens.max()) if target_lens.numel() > 0 else 0
        targets = targets[:, :max_tokens]
        predicted = self.predictor(self.predictor.training_context(targets, target_lens))
        logits = self.joiner(frames[:, :max_frames], predicted)
        bonus = emission_bonus[:, :max_frames, :max_tokens] if emission_bonus is not None else None
        loss = rnnt_loss(
            logits, targets, frame_lens, target_lens, blank=self.blank, fastemit_lambda=fastemit_lambda, emission_bonus=bonus
        )
        ctc_loss = None
        if ctc:
            log_probs = self.ctc_logits(frames[:, :max_frames]).log_softmax(dim=-1).float()
            ctc_loss = F.ctc_loss(
                log_probs.transpose(0, 1),
                targets,
                frame_lens,
                target_lens,
                blank=self.blank,
                reduction="none",
                zero_infinity=True,
            )
        return loss, ctc_loss

    def ctc_logits(self, frames: Tensor) -> Tensor:
        """(B, T', D) encoder frames -> (B, T', V + 1) CTC logits: the joiner with no predictor input."""
        return self.joiner.output(torch.tanh(self.joiner.encoder_proj(frames)))

    def greedy_frames(
        self,
        frames: Tensor,
        frame_counts: Tensor,
        context: Tensor,
        max_symbols_per_frame: int,
        bonus: Tensor | None = None,
    ) -> tuple[Tensor, list[list[int]], list[list[int]]]:
        """Batched greedy search over a run of encoder frames.

        Args:
            frames: (B, n, D) encoder frames.
            frame_counts: (B,) how many of the n frames are valid per row.
            context: (B, c) predictor context before the first frame.
            max_symbols_per_frame: labels one frame may emit before moving on.
            bonus: optional (V + 1,) scores added to the joiner's logits before the argmax (decoding only).

        Returns:
            The context after the last frame, the tokens each row emitted, and the frame (0 .. n - 1) of each.
        """
        emitted: list[list[int]] = [[] for _ in range(frames.shape[0])]
        when: list[list[int]] = [[] for _ in range(frames.shape[0])]
        predicted = self.predictor(context)
        for t in range(frames.shape[1]):
            frame = frames[:, t : t + 1]
            active = frame_counts > t
            for _ in range(max_symbols_per_frame):
                logits = self.joiner(frame, predicted)[:, 0, 0]
                tokens = (logits if bonus is None else logits + bonus).argmax(dim=-1)
                active = active & (tokens != self.blank)
                if not bool(active.any()):
                    break
                shifted = torch.cat([context[:, 1:], tokens[:, None]], dim=1)
                context = torch.where(active[:, None], shifted, context)
                predicted = torch.where(active[:, None, None], self.predictor(context), predicted)
                for row in active.nonzero().flatten().tolist():
                    emitted[row].append(int(tokens[row]))
                    when[row].append(t)
        return context, emitted, when

    @torch.no_grad()
    def greedy_search(self, feats: Tensor, feat_lens: Tensor, max_symbols_per_frame: int = 3) -> list[list[int]]:
        """Batched greedy decoding: feats (B, T, F), feat_lens (B,) -> B lists of token ids."""
        if max_symbols_per_frame < 1:
            raise ValueError(f"max_symbols_per_frame must be positive, got {max_symbols_per_frame}")
        encoded = self.encoder(feats, feat_lens)
        context = self.predictor.start_context(feats.shape[0], feats.device)
        _, emitted, _ = self.greedy_frames(encoded.frames, encoded.lengths, context, max_symbols_per_frame)
        return emitted

    def beam_frames(self, frames: Tensor, beam: int, bonus: Tensor | None = None) -> tuple[list[int], list[int]]:
        """Modified beam search over one utterance's (T', D) frames, at most one label per frame: the tokens of the
        most probable hypothesis and the frame of each. ``bonus``: optional (V + 1,) scores added to the joiner's
        logits before the softmax (decoding only, as in ``greedy_frames``)."""
        tokens, when = self.extend_beam(Beam(), frames, beam, bonus).best()
        return list(tokens), list(when)

    def extend_beam(self, state: Beam, frames: Tensor, beam: int, bonus: Tensor | None = None) -> Beam:
        """``state`` carried over the next (n, D) frames of one stream by modified beam search (``beam_frames``):
        searching a stream chunk by chunk gives the same beam as searching all of its frames at once."""
        num_classes = self.blank + 1
        hypotheses, scores = list(state.hypotheses), list(state.scores)
        padding = (self.blank,) * self.predictor.context_size
        for t, frame in enumerate(frames, start=state.frames):
            contexts = [(padding + tokens)[-self.predictor.context_size :] for tokens, _ in hypotheses]
            predicted = self.predictor(torch.tensor(contexts, device=frames.device))
            logits = self.joiner(frame.expand(len(hypotheses), 1, -1), predicted)[:, 0, 0]
            log_probs = (logits if bonus is None else logits + bonus).log_softmax(dim=-1)
            candidates = (log_probs.double() + torch.tensor(scores, device=frames.device)[:, None]).flatten()
            best_scores, best_indices = candidates.topk(min(beam, candidates.numel()))
            merged: dict[tuple[int, ...], tuple[float, tuple[int, ...]]] = {}
            for score, index in zip(best_scores.tolist(), best_indices.tolist(), strict=True):
                source, token = divmod(index, num_classes)
                tokens, when = hypotheses[source]
                if token != self.blank:
                    tokens, when = tokens + (token,), when + (t,)
                # Hypotheses with the same tokens merge: their probabilities add, the first one's frames stay.
                merged[tokens] = (_log_add(merged[tokens][0], score), merged[tokens][1]) if tokens in merged else (score, when)
            hypotheses = [(tokens, when) for tokens, (_, when) in merged.items()]
            scores = [score for score, _ in merged.values()]
        return Beam(hypotheses=tuple(hypotheses), scores=tuple(scores), frames=state.frames + frames.shape[0])

    def extend_beams(self, beams: tuple[Beam, ...], frames: Tensor, beam: int, bonus: Tensor | None = None) -> tuple[Beam, ...]:
        """Each row's beam carried over its (B, n, D) ``frames`` (``extend_beam``); ``beams`` empty: fresh ones."""
        return tuple(
            self.extend_beam(old, frames[row], beam, bonus) for row, old in enumerate(beams or (Beam(),) * frames.shape[0])
        )

    @torch.no_grad()
    def beam_search(self, feats: Tensor, feat_lens: Tensor, beam: int = 4) -> list[list[int]]:
        """Time-synchronous modified beam search (icefall), one utterance at a time.

        Each frame extends every hypothesis by blank or by one label; the ``beam`` best of all extensions survive,
        hypotheses with the same tokens merge (their probabilities add), and the most probable one is returned
        (no length normalization). With ``beam=1`` this is greedy search with one symbol per frame.

        Args:
            feats: (B, T, F); feat_lens: (B,).

        Returns:
            B lists of token ids.
        """
        if beam < 1:
            raise ValueError(f"beam must be positive, got {beam}")
        encoded = self.encoder(feats, feat_lens)
        return [self.beam_frames(encoded.frames[row, : int(encoded.lengths[row])], beam)[0] for row in range(feats.shape[0])]

    def init_stream(self, batch_size: int = 1) -> StreamState:
        """A fresh streaming-decoding state: empty encoder state, all-blank context, empty hypotheses."""
        device = next(self.parameters()).device
        return StreamState(
            encoder=self.encoder.init_state(batch_size, device),
            context=self.predictor.start_context(batch_size, device),
            hypotheses=((),) * batch_size,
        )

    @torch.no_grad()
    def stream(self, chunk: Tensor, state: StreamState, max_symbols_per_frame: int = 3, beam: int = 1) -> StreamState:
        """Decode the next chunk (B, t, F) of B streams; the tokens accumulate in ``state.hypotheses``.

        ``beam`` 1 is greedy search (up to ``max_symbols_per_frame`` labels a frame); after the last chunk the
        hypotheses equal ``greedy_search`` on the whole utterances. A wider ``beam`` is modified beam search
        carried from chunk to chunk (``state.beams``); the hypotheses are each stream's best so far (a later
        chunk may revise them) and after the last chunk equal ``beam_search``. Keep one width for a whole stream.
        """
        if max_symbols_per_frame < 1 or beam < 1:
            raise ValueError(f"max_symbols_per_frame and beam must be positive, got {max_symbols_per_frame} and {beam}")
        frames, encoder_state = self.encoder.infer(chunk, state.encoder)
        if beam > 1:
            beams = self.extend_beams(state.beams, frames, beam)
            hypotheses = tuple(b.best()[0] for b in beams)
            return StreamState(encoder=encoder_state, context=state.context, hypotheses=hypotheses, beams=beams)
        counts = torch.full((frames.shape[0],), frames.shape[1], device=frames.device)
        context, emitted, _ = self.greedy_frames(frames, counts, state.context, max_symbols_per_frame)
        hypotheses = tuple(old + tuple(new) for old, new in zip(state.hypotheses, emitted, strict=True))
        return StreamState(encoder=encoder_state, context=context, hypotheses=hypotheses)
