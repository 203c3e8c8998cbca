"""Stop sequences found in a reply as it streams, whatever its pieces."""

from __future__ import annotations

import pytest

from inference_server.stop_sequences import StopSequences


def run(sequences: tuple[str, ...], pieces: list[str]) -> tuple[list[str], str, bool]:
    stops = StopSequences(sequences)
    released = [stops.feed(piece) for piece in pieces]
    if not stops.stopped:
        released.append(stops.flush())
    return released, stops.text, stops.stopped


@pytest.mark.parametrize(
    ("pieces", "text"),
    [
        (["Hello world. More"], "Hello world"),  # in one piece
        (["Hello", " world", ".", " More"], "Hello world"),  # a piece of its own
        (["Hello wor", "ld. M", "ore"], "Hello wor" + "ld"),  # inside a piece
    ],
)
def test_the_reply_ends_before_the_first_stop_sequence(pieces, text):
    released, kept, stopped = run((".",), pieces)
    assert stopped and kept == text and "".join(released) == text


def test_a_sequence_split_over_pieces_is_held_back_then_cut():
    stops = StopSequences(("END",))
    assert stops.feed("abc E") == "abc "  # "E" may begin "END"
    assert stops.feed("N") == ""  # "EN" still may
    assert stops.feed("D and more") == ""
    assert stops.stopped and stops.text == "abc "


def test_held_text_that_turns_out_not_to_stop_is_released():
    stops = StopSequences(("END",))
    assert stops.feed("abc EN") == "abc "
    assert stops.feed("ough") == "ENough"
    assert not stops.stopped
    assert stops.feed(" E") == " "
    assert stops.flush() == "E"  # the reply ended by itself: nothing is lost
    assert stops.text == "abc ENough E"


def test_the_earliest_of_several_sequences_wins_and_nothing_follows():
    released, kept, stopped = run(("world", "lo"), ["Hello world"])
    assert stopped and kept == "Hel" and released == ["Hel"]
    stops = StopSequences(("x",))
    stops.feed("ax")
    assert stops.feed("more") == "" and stops.text == "a"


def test_a_reply_without_stop_sequences_comes_out_whole():
    released, kept, stopped = run(("###",), ["a#", "b##", "c"])
    assert not stopped and "".join(released) == kept == "a#b##c"
