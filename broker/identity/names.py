"""Names of tenants and workloads: what is accepted, how it is stored, and when two are the same.

A name is shown to people (consoles, audit logs, invoices) who decide by looking at it, so two
names that *look* the same must not name two different things. Three layers see to that:

* :func:`normalize_name` stores every name in one form (NFKC, whitespace trimmed and collapsed),
  so ``café`` typed composed, decomposed or in fullwidth letters is the same stored text;
* it refuses what cannot be shown honestly: invisible and control characters, bidirectional
  overrides, stacks of combining marks, and letters of scripts that do not belong together
  (Unicode TS #39, "highly restrictive"), so ``café`` spelt with a Cyrillic ``\u0441`` and
  ``\u0430`` is refused;
* :func:`name_key` is what must be unique in a scope (tenants in the organisation, workloads in
  their tenant): it is case-insensitive, so ``Prod`` and ``prod`` cannot both exist.

A refusal is a ``ValueError`` whose message says what is wrong (a 422 at the API).
"""

from __future__ import annotations

import unicodedata

MAX_LENGTH = 128
# The key of a normalised name is at most twice as long: full case folding turns one character
# into at most two that NFKC leaves apart (ß -> ss, İ -> i and a combining dot).
MAX_KEY_LENGTH = 2 * MAX_LENGTH
# Input this long is refused before any per-character work: trimming whitespace and composing
# accents never shrink a real name to a sixteenth.
_MAX_RAW_LENGTH = 16 * MAX_LENGTH

# Bidirectional embeddings, overrides and isolates: they reorder how the rest is displayed
# ("evil\u202egpj.exe" shows as "evilexe.jpg"). All are Cf, refused below; named for the message.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

# Control, format (zero-width, soft hyphen, direction marks), surrogate, private-use, unassigned,
# line and paragraph separators: invisible, shown differently everywhere, or meaningless.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

# Default-ignorable characters that are not Cf (letters and marks that render as nothing), plus
# the braille blank: "admin" and "admin\u3164" must not be two names. NFKC maps U+3164 and U+FFA0
# to U+1160, listed anyway.
_INVISIBLE = (
    (0x034F, 0x034F),  # COMBINING GRAPHEME JOINER
    (0x115F, 0x1160),  # HANGUL CHOSEONG / JUNGSEONG FILLER
    (0x17B4, 0x17B5),  # KHMER VOWEL INHERENT AQ / AA
    (0x180B, 0x180F),  # MONGOLIAN FREE VARIATION SELECTORS
    (0x2800, 0x2800),  # BRAILLE PATTERN BLANK
    (0x3164, 0x3164),  # HANGUL FILLER
    (0xFE00, 0xFE0F),  # VARIATION SELECTORS
    (0xFFA0, 0xFFA0),  # HALFWIDTH HANGUL FILLER
    (0xE0100, 0xE01EF),  # VARIATION SELECTORS SUPPLEMENT
)

# More combining marks than this in a row is "zalgo" text that paints over its neighbours.
# Legitimate text rarely needs more than two (NFKC composes most Latin accents into one letter).
_MAX_MARK_RUN = 2

# TS #39 "highly restrictive": the letters of a name are of one script, or of one of these sets.
_SCRIPT_SETS = (
    frozenset({"Latin", "Han", "Hiragana", "Katakana"}),  # Japanese
    frozenset({"Latin", "Han", "Bopomofo"}),  # Chinese
    frozenset({"Latin", "Han", "Hangul"}),  # Korean
)

# A letter's script is read from the leading word of its Unicode name ("CYRILLIC SMALL LETTER
# ES"), Python's unicodedata having no script property. Leading words that are not the script's
# own name, or that several scripts share, are mapped here.
_SCRIPT_OF_WORD = {
    "LATIN": "Latin",
    "CJK": "Han",  # CJK UNIFIED / COMPATIBILITY IDEOGRAPH-xxxx
    "IDEOGRAPHIC": "Han",  # 々 (iteration mark, as in 佐々木) and 〆
    "HIRAGANA": "Hiragana",
    "HENTAIGANA": "Hiragana",  # historic hiragana
    "KATAKANA": "Katakana",
    "KATAKANA-HIRAGANA": "Katakana",  # ー, the prolonged sound mark of both kana (as in チーム)
    "BOPOMOFO": "Bopomofo",
    "HANGUL": "Hangul",
    "ARABIC-INDIC": "Arabic",  # ARABIC-INDIC DIGIT n
    "EXTENDED": "Arabic",  # EXTENDED ARABIC-INDIC DIGIT n (the only Nd/L name starting so)
    "OLD CHINESE": "Han",  # OLD CHINESE ITERATION MARK
}
# Leading words several scripts share: their script is named by the first two words.
_SHARED_WORDS = frozenset({"OLD", "TAI", "LINEAR", "INSCRIPTIONAL"})
# Letters unicodedata gives no name: ranges of one script.
_UNNAMED = ((0x17000, 0x18AFF, "Tangut"), (0x18D00, 0x18D8F, "Tangut"))


def _script(ch: str) -> str | None:
    """The script ``ch`` counts for, or None when it counts for none.

    Letters count, and so do decimal digits other than ASCII ones (Bengali four, U+09EA, looks
    like ``8``). Everything else (ASCII digits, punctuation, symbols, spaces, combining marks) is
    common to all scripts. A letter of a script we cannot tell gets a script of its own (its name's
    leading word, or the character itself), which therefore mixes with no other.
    """
    category = unicodedata.category(ch)
    if not (category[0] == "L" or (category == "Nd" and not ch.isascii())):
        return None
    words = unicodedata.name(ch, "").split()
    for word in ("FULLWIDTH", "HALFWIDTH"):  # the form of a script, not a script (NFKC maps most)
        if words and words[0] == word:
            words = words[1:]
    if not words:
        code = ord(ch)
        for low, high, script in _UNNAMED:
            if low <= code <= high:
                return script
        return f"U+{code:04X}"
    leading = " ".join(words[:2]) if words[0] in _SHARED_WORDS else words[0]
    return _SCRIPT_OF_WORD.get(leading, leading.title())


def _scripts_allowed(scripts: set[str]) -> bool:
    return len(scripts) <= 1 or any(scripts <= allowed for allowed in _SCRIPT_SETS)


def _invisible(code: int) -> bool:
    return any(low <= code <= high for low, high in _INVISIBLE)


def normalize_name(value: str) -> str:
    """The name as stored, or ValueError saying what is wrong with it.

    NFKC, then leading and trailing whitespace removed and inner runs of it made one space. The
    result must be 1 to 128 characters, not only whitespace, with no control, format, invisible,
    surrogate, private-use or unassigned character and no line separator, at most two combining
    marks in a row, and letters of one script or of one TS #39 "highly restrictive" combination.
    """
    if len(value) > _MAX_RAW_LENGTH:
        raise ValueError(f"must be 1 to {MAX_LENGTH} characters")
    text = unicodedata.normalize("NFKC", value)
    # Before whitespace is collapsed, which would otherwise silently eat tabs and newlines.
    for ch in text:
        if ch in _BIDI:
            raise ValueError("must not contain bidirectional override or isolate characters")
        category = unicodedata.category(ch)
        if category in _REFUSED_CATEGORIES or _invisible(ord(ch)):
            raise ValueError(
                f"must not contain control, format, invisible, private-use or unassigned "
                f"characters (found U+{ord(ch):04X})"
            )
    # No Cc, Zl or Zp is left: the only whitespace here is Zs, which NFKC made U+0020 but for
    # the Ogham space mark.
    text = " ".join(text.split())
    if not text:
        raise ValueError("must not be empty or only whitespace")
    if len(text) > MAX_LENGTH:
        raise ValueError(f"must be 1 to {MAX_LENGTH} characters")
    run = 0
    scripts: set[str] = set()
    for ch in text:
        run = run + 1 if unicodedata.category(ch) in ("Mn", "Me") else 0
        if run > _MAX_MARK_RUN:
            raise ValueError(f"must not have more than {_MAX_MARK_RUN} combining marks in a row")
        script = _script(ch)
        if script is not None:
            scripts.add(script)
    if not _scripts_allowed(scripts):
        raise ValueError(
            "must not mix letters of different scripts (one script, or Latin with Han and kana, "
            "Han and Bopomofo, or Han and Hangul); found " + ", ".join(sorted(scripts))
        )
    return text


def name_key(name: str) -> str:
    """The key two names of one scope must not share, of a name :func:`normalize_name` returned.

    Uniqueness is case-insensitive: ``Prod`` beside ``prod`` (or ``STRASSE`` beside ``straße``)
    would be two names a reader cannot tell apart at a glance, which is what an impostor wants.
    ``casefold`` can undo NFKC (``İ`` folds to ``i`` and a combining dot), hence NFKC again.
    """
    return unicodedata.normalize("NFKC", name.casefold())
