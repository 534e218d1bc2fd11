"""The one preprocessing both sides use: memoized tokenization is the same tokenization."""

import pytest

from fuseloop.preprocessing import InvalidInput


def test_a_memoized_preprocessor_tokenizes_as_the_original_and_hands_out_fresh_lists(quick_checkpoint):
    pre = quick_checkpoint.preprocessor
    memo = pre.memoized(maxsize=8)
    prompt, answer = "what colour is the circle ?", "a small red circle at top left"
    assert memo.prompt_ids(prompt) == pre.prompt_ids(prompt)
    assert memo.response_ids(answer) == pre.response_ids(answer)
    memo.prompt_ids(prompt).append(-1)  # a caller extending its list must not change the cache
    assert memo.prompt_ids(prompt) == pre.prompt_ids(prompt)
    assert (memo.responses([answer])[0] == pre.responses([answer])[0]).all()


def test_a_memoized_preprocessor_still_refuses_bad_prompts_every_time(quick_checkpoint):
    memo = quick_checkpoint.preprocessor.memoized()
    for _ in range(2):
        with pytest.raises(InvalidInput, match="prompt is empty"):
            memo.prompt_ids("   ")
