"""Stop strings over text deltas: matches across token boundaries, hold-back and release."""

from __future__ import annotations

import pytest

from sambay.generate.stops import StopStringMatcher


def run(stops: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stops)
    out, stopped = [], False
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return out, stopped


def test_stop_string_inside_one_delta_truncates_there():
    assert run(["END"], ["abcENDxyz"]) == (["abc"], True)


def test_stop_string_spanning_deltas():
    assert run(["\n##"], ["Hello", "\n", "#", "#", "more"]) == (["Hello", "", "", ""], True)


def test_stop_string_starting_inside_one_token_and_ending_in_the_next():
    assert run(["\n##"], ["lo\n#", "#x"]) == (["lo", ""], True)


def test_held_back_text_is_released_once_it_cannot_be_a_stop():
    out, stopped = run(["\n##"], ["a\n", "#", "b"])
    assert out == ["a", "", "\n#b", ""] and not stopped


def test_held_back_text_is_released_at_the_end():
    assert run(["STOP"], ["go ST"]) == (["go ", "ST"], False)


def test_earliest_of_several_stop_strings_wins():
    assert run(["cd", "b"], ["abcd"]) == (["a"], True)
    assert run(["xyz", "yq"], ["..xy", "q"]) == ([".." , "x"], True)


def test_no_stop_strings_pass_everything_through():
    assert run([], ["a", "b"]) == (["a", "b", ""], False)


def test_after_a_stop_nothing_more_is_emitted():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("ax") == ("a", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher([""])
