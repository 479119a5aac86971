"""A prompt's token ids as make_request takes them: what is accepted and refused, and that a
long list of plain ints is checked in one C pass, not element by element (issue 31: the server
and the engine process each check every prompt, and a burst of 3,000-token prompts waited on
a per-element isinstance against numbers.Integral, 1.5 ms a prompt)."""

import numpy as np
import pytest

from qwen3_aot import Qwen3AotError
from qwen3_aot.runtime.core import request
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


def test_a_list_of_plain_ints_skips_the_per_element_check(monkeypatch):
    """The per-element isinstance check is for numpy ints and refusals only: a list of plain
    ints (what JSON and the engine process give) is checked by its types in one C pass."""
    def per_element(_t):
        raise AssertionError("the per-element check ran on plain ints")

    monkeypatch.setattr(request, "_is_int", per_element)
    ids = list(range(3000))
    assert prompt_ids(ids, None) == ids
