"""VQA answer normalisation, following the official VQA evaluation script (``vqaEval.py``).

The official script normalises an answer in two passes:

* ``process_punctuation``: every character in :data:`PUNCTUATION` is deleted when it touches a
  space (``"p "`` or ``" p"`` occurs in the text) *or* when the text contains a comma between
  two digits anywhere; otherwise it becomes a space.  Afterwards every period that is not
  followed by a digit is deleted (so ``"3.5"`` survives, ``"dog."`` loses its period).
* ``process_digit_article``: lower-case, split on whitespace, map number words to digits
  (:data:`MANUAL_MAP`), drop the articles a/an/the, then fix apostrophe-less contractions
  (:data:`CONTRACTIONS`), and re-join with single spaces.

Quirks of the reference are kept on purpose, since scores must be comparable with it:
the lookbehind in its period regex is mistyped as a lookahead (``(?!<=\\d)``), so it only
checks the character *after* the period; it passes ``re.UNICODE`` (= 32) positionally as the
substitution *count*; and the "digit comma digit" test switches *all* punctuation to deletion.
"""

from __future__ import annotations

import re

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "MANUAL_MAP",
    "PUNCTUATION",
    "normalize_vqa_answer",
    "process_digit_article",
    "process_punctuation",
]

# Punctuation the official script handles. Periods get their own rule; apostrophes, colons
# and the like are deliberately absent (they are left untouched by the reference).
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')

# Number words the reference maps to digits; note "none" -> "0" ("how many ...? none").
MANUAL_MAP: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})


def _build_contractions() -> dict[str, str]:
    """The reference's contraction table: apostrophe-less spelling -> canonical spelling.

    The reference table is regular, so it is generated here rather than spelled out: a word
    with one apostrophe is reached from its bare spelling ("dont" -> "don't"); a word with
    several is reached from each spelling that lacks exactly one of them ("couldnt've" and
    "couldn'tve" -> "couldn't've"). The one irregular entry is added at the end.
    """
    # One string (split below) keeps the ~100 words readable at a glance.
    words = (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't "
        "he'd he's how'd how'll how's I'm I've isn't it'd it'll ma'am mightn't might've "
        "mustn't must've needn't not've o'clock oughtn't shan't should've shouldn't "
        "somebody'll somebody's someone'd someone'll someone's something'd something'll "
        "that's there'd there're there's they'd they'll they're they've 'twas wasn't we've "
        "weren't what'll what're what's what've when's where'd where's where've who'd "
        "who'll who's who've why'll why're why's won't would've wouldn't y'all you'd "
        "you'll you're you've "
        # Words with several apostrophes.
        "couldn't've hadn't've he'd've I'd've it'd've mightn't've she'd've shouldn't've "
        "somebody'd've someone'd've something'd've there'd've they'd've we'd've who'd've "
        "wouldn't've y'all'd've y'all'll you'd've 'ow's'at"
    )
    table: dict[str, str] = {}
    for word in words.split():
        positions = [i for i, ch in enumerate(word) if ch == "'"]
        if len(positions) == 1:
            table[word.replace("'", "")] = word
        else:
            for i in positions:
                table[word[:i] + word[i + 1 :]] = word
    # Irregular entry of the reference, mapped "backwards"; kept so scores stay comparable.
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS: dict[str, str] = _build_contractions()

_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# Typo kept from the reference: "(?!<=\d)" is a negative *lookahead* for the text "<=d",
# which never blocks a match, so effectively this is r"\.(?!\d)".
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The reference calls sub("", text, re.UNICODE): re.UNICODE lands in the count argument.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Apply the reference ``processPunctuation`` (see the module docstring)."""
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        # The test looks at the *original* text, as in the reference.
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Apply the reference ``processDigitArticle``: numbers, articles, contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Full normalisation of one answer: whitespace, punctuation, digits/articles/contractions.

    >>> normalize_vqa_answer("Two dogs.")
    '2 dogs'
    >>> normalize_vqa_answer("1,000")
    '1000'
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))
