"""JSON a user wrote: every way Python's reader fails on hostile text is one named error."""

import pytest

from llava_jax.json_input import JSONInputError, loads


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"question_id": ' + "7" * 5000 + "}", "a number of 5000 digits"),
        ('{"a": 1', "malformed JSON: Expecting ',' delimiter (line 1, column 8)"),
        (b"\xff\xff{}", "not UTF-8"),
    ],
)
def test_hostile_json_is_one_named_error(text, says):
    with pytest.raises(JSONInputError, match=None) as error:
        loads(text)
    assert says in str(error.value)
    assert isinstance(error.value, ValueError)


def test_json_reads_as_json():
    assert loads('{"a": [1, 2.5, "x"], "b": null}') == {"a": [1, 2.5, "x"], "b": None}
    assert loads("9" * 4000) == int("9" * 4000)
