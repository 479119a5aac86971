"""A prompt's token ids as make_request takes them: what is accepted and refused, and that a
long list of plain ints is checked at about the cost of one pass over it (issue 31: the server
and the engine process each check every prompt, and a burst of 3,000-token prompts waited on
a per-element isinstance against numbers.Integral, 1.5 ms a prompt)."""

import time

import numpy as np
import pytest

from qwen3_aot import Qwen3AotError
from qwen3_aot.runtime.core.request import prompt_ids


def test_token_ids_are_taken_as_plain_ints_and_bools_and_floats_refused():
    ids = [5, 0, 7]
    got = prompt_ids(ids, None)
    assert got == ids and got is not ids  # a copy: the request's tokens grow, the caller's list must not
    assert prompt_ids((5, 0, 7), None) == ids
    mixed = prompt_ids([5, np.int64(0), np.int32(7)], None)
    assert mixed == ids and all(type(t) is int for t in mixed)
    assert prompt_ids(np.array(ids), None) == ids
    assert prompt_ids([], None) == []  # make_request refuses it as empty
    for bad in ([1, True], [1, 2.0], [1, "2"]):
        with pytest.raises(Qwen3AotError, match="a list of token ids"):
            prompt_ids(bad, None)


def _best_seconds(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def test_a_long_prompt_of_ints_costs_about_one_pass_over_it():
    ids = list(range(3000)) * 10
    one_pass = _best_seconds(lambda: [t for t in ids])
    checked = _best_seconds(lambda: prompt_ids(ids, None))
    # measured on a 2-core CI machine: about 2.5 passes; the per-element isinstance check took 60
    assert checked < 10 * one_pass, f"prompt_ids took {checked / one_pass:.1f} passes over the list"
