"""TextStream: incremental detokenization, held-back partial characters, stop strings cut and never shown."""

import pytest

from kiln.runtime.tokenizer import TextStream


class FakeTokenizer:
    """Each id is a byte string; decode joins them and decodes UTF-8 like a byte-level BPE tokenizer."""

    def __init__(self, pieces, special=()):
        self.pieces = {i: (p.encode() if isinstance(p, str) else p) for i, p in enumerate(pieces)}
        self.special = set(special)

    def decode(self, ids, skip_special_tokens=True):
        parts = [self.pieces[i] for i in ids if not (skip_special_tokens and i in self.special)]
        return b"".join(parts).decode("utf-8", errors="replace")


def stream_all(pieces, stop=(), special=(), ids=None):
    """Feed the ids one at a time as the engine does; the last update is final."""
    tok = FakeTokenizer(pieces, special)
    ts = TextStream(tok, tuple(stop))
    ids = list(range(len(pieces))) if ids is None else ids
    deltas = []
    for n in range(1, len(ids) + 1):
        deltas.append(ts.update(ids[:n], final=n == len(ids)))
        if ts.stop_hit:
            break
    return ts, deltas


def test_deltas_concatenate_to_full_text():
    pieces = ["Hello", ",", " wor", "ld", "!", " How", " are", " you?"]
    ts, deltas = stream_all(pieces)
    assert "".join(deltas) == "Hello, world! How are you?" == ts.text
    assert not ts.stop_hit


def test_without_stop_strings_nothing_is_held_back():
    ts, deltas = stream_all(["a", "bc", "d"])
    assert deltas == ["a", "bc", "d"]


def test_special_tokens_skipped():
    ts, deltas = stream_all(["<s>", "hi", "</s>"], special=(0, 2))
    assert "".join(deltas) == "hi" == ts.text


def test_incomplete_utf8_is_held_until_complete():
    e_acute = "é".encode()  # 2 bytes
    euro = "€".encode()  # 3 bytes
    pieces = [b"caf", e_acute[:1], e_acute[1:], b" ", euro[:1], euro[1:2], euro[2:], b"!"]
    ts, deltas = stream_all(pieces)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "café €!" == ts.text


def test_stop_string_inside_one_token():
    ts, deltas = stream_all(["Hi", " thereSTOPafter", " more"], stop=["STOP"])
    assert ts.stop_hit
    assert "".join(deltas) == "Hi there" == ts.text


@pytest.mark.parametrize(
    "pieces",
    [
        ["The end", " S", "T", "O", "P", " tail"],
        ["The end S", "TO", "P tail"],
        ["The end ST", "OP"],
        ["The end", " ", "S", "TOP"],
    ],
)
def test_stop_string_across_tokens_is_never_emitted(pieces):
    ts, deltas = stream_all(pieces, stop=["STOP"])
    assert ts.stop_hit
    assert ts.text == "The end "
    assert "".join(deltas) == "The end "
    assert all("S" not in d for d in deltas)  # not even the first letters of the stop string


def test_false_start_of_stop_string_is_released():
    pieces = ["go ", "ST", "AR", "T ", "now"]
    ts, deltas = stream_all(pieces, stop=["STOP"])
    assert not ts.stop_hit
    assert "".join(deltas) == "go START now" == ts.text


def test_held_text_is_short_enough():
    # Only the last len(stop) - 1 characters are held back while streaming.
    tok = FakeTokenizer(["abcdef", "ghij"])
    ts = TextStream(tok, ("XYZ",))
    assert ts.update([0]) == "abcd"
    assert ts.update([0, 1]) == "efgh"
    assert ts.update([0, 1], final=True) == "ij"


def test_stop_string_at_very_start():
    ts, deltas = stream_all(["</", "answer>", "more"], stop=["</answer>"])
    assert ts.stop_hit and ts.text == "" and "".join(deltas) == ""


def test_several_stop_strings_shortest_and_longest():
    ts, deltas = stream_all(["x = 1", "\n", "\n", "y"], stop=["\n\n", "END OF TEXT"])
    assert ts.stop_hit and "".join(deltas) == "x = 1" == ts.text


@pytest.mark.parametrize("stop", [("YZ", "cXY"), ("cXY", "YZ")])
def test_earliest_stop_string_wins_whatever_the_order(stop):
    # Both stop strings complete in the same token: the text is cut before the first one in the text.
    ts, deltas = stream_all(["ab", "cXYZ", "more"], stop=stop)
    assert ts.stop_hit
    assert ts.text == "ab" == "".join(deltas)


def test_update_after_final_without_stop_emits_rest():
    tok = FakeTokenizer(["hello wor", "ld"])
    ts = TextStream(tok, ("world!",))
    first = ts.update([0])
    assert first == "hell"  # 5 characters held back
    rest = ts.update([0, 1], final=True)
    assert first + rest == "hello world"


@pytest.mark.parametrize("text", [
    "In the beginning God created the heaven and the earth.",
    "日本語のテキスト 🙂 and emoji 👩‍👩‍👧 mixed with ASCII.",
    "def f(x):\n    return x  # two  spaces\n\n\tand a tab",
])
def test_incremental_decoding_equals_decoding_the_whole_output(smollm2_hf, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_hf))
    ids = tok.encode(text, add_special_tokens=False) + [2]  # <|im_end|>: special, never shown
    ts = TextStream(tok)
    deltas = [ts.update(ids[:n], final=n == len(ids)) for n in range(1, len(ids) + 1)]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == ts.text
    assert all("\ufffd" not in d for d in deltas)  # a character split over tokens is shown whole
