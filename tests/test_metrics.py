import pytest

from shared.metrics import ErrorCounts, error_counts, pooled_wer


def test_counts_match_hand_alignment() -> None:
    # "turn the light" vs "turn on the lights": 1 deletion (on) + 1 substitution (lights->light)
    c = error_counts(["turn on the lights"], ["turn the light"])
    assert (c.errors, c.words, c.utterances) == (2, 4, 1)
    assert error_counts(["set a timer"], ["set a timer please"]).errors == 1  # one insertion


def test_pooled_wer_equals_wer_of_the_union() -> None:
    refs = ["turn on the lights", "set a timer for five minutes", "call mom", "play jazz in the kitchen"]
    hyps = ["turn the light", "set timer for five minute", "call tom now", "play jazz in the kitchen"]
    parts = [error_counts([r], [h]) for r, h in zip(refs, hyps)]
    assert pooled_wer(parts) == pytest.approx(error_counts(refs, hyps).wer)
    assert sum(parts, ErrorCounts(0, 0, 0)) == error_counts(refs, hyps)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_counts(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        error_counts([" "], ["a"])
    with pytest.raises(ValueError, match="zero reference words"):
        ErrorCounts(0, 0, 0).wer
