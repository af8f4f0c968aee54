"""Personal data Presidio's stock recognizers miss or cannot be tuned to find in chat, as plain regex rules.

Street addresses, dates of birth (a date next to "born", "DOB", "birthday": production dates stay), passport and
national ID numbers (after their names, or in shapes with a check digit), IBANs in any case (mod-97 checked),
phone numbers after a phone word even when glued to it ("call630-596-1111") or after "line"/"job"/"po" when they
have 10+ digits, and e-mail addresses written as "name (at) host (dot) com". Each rule yields (kind, start, end).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator

Span = tuple[str, int, int]

STREET_ADDRESS, DATE_OF_BIRTH, PASSPORT, NATIONAL_ID = "STREET_ADDRESS", "DATE_OF_BIRTH", "PASSPORT", "NATIONAL_ID"
IBAN_CODE, PHONE_NUMBER, EMAIL_ADDRESS, CREDIT_CARD = "IBAN_CODE", "PHONE_NUMBER", "EMAIL_ADDRESS", "CREDIT_CARD"
RULE_ENTITIES = (STREET_ADDRESS, DATE_OF_BIRTH, PASSPORT, NATIONAL_ID)

_I = re.IGNORECASE

# --- dates of birth -------------------------------------------------------------------------------------------
_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
    r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_DATE = (
    rf"(?:\d{{4}}[-/.]\d{{1,2}}[-/.]\d{{1,2}}|\d{{1,2}}[-/.]\d{{1,2}}[-/.]\d{{2,4}}|{_MONTH}\s+{_DAY},?\s+\d{{4}}|"
    rf"{_DAY}\s+(?:of\s+)?{_MONTH},?\s+\d{{4}}|{_MONTH}\s+\d{{4}}|{_MONTH}\s+{_DAY}|{_DAY}\s+(?:of\s+)?{_MONTH}|"
    r"(?<=in\s)(?:19|20)\d{2})"
)
_BIRTH_CUE = (
    r"\b(?:born|b\.|dob|d\.o\.b\.?|date\s+of\s+birth|birth\s*date|birthdate|birthday|bday|b-day|"
    r"geboren|geburtsdatum|n[ée]e?\s+le|date\s+de\s+naissance|nacid[oa]|fecha\s+de\s+nacimiento|"
    r"data\s+di\s+nascita|nat[oa]\s+il|data\s+de\s+nascimento)"
)
_DOB = re.compile(rf"{_BIRTH_CUE}(?P<gap>[^.!?\n\d]{{0,25}}?)(?P<value>{_DATE})\b", _I)

# --- passports and national ids -------------------------------------------------------------------------------
_ID_VALUE = r"(?P<value>[A-Z0-9](?:[A-Z0-9]|[ ./-](?=[A-Z0-9])){4,22})"
_SAYS = r"(?:\s*(?:is|was|:|=|#|no\.?|number|num\.?)\s*){0,3}"
_PASSPORT = re.compile(rf"\bpassport(?:\s+(?:card|id))?{_SAYS}\s*{_ID_VALUE}", _I)
_NATIONAL_ID_NAMES = (
    r"national\s+(?:id|identity|identification|insurance|registration)(?:\s+(?:card|number|no\.?|code))?|"
    r"(?:personal|citizen|resident|identity|id)\s+(?:card\s+)?(?:id|identity|identification|number|no\.?|code)|"
    r"personalausweis(?:nummer)?|ausweisnummer|steuer-?id|steuernummer|"
    r"tax\s+(?:id|identification|file|payer|reference)(?:\s+(?:number|no\.?))?|taxpayer\s+id|"
    r"tin|itin|ein|social\s+security(?:\s+(?:number|no\.?))?|ssn|social\s+insurance(?:\s+number)?|sin|"
    r"ni\s+(?:number|no\.?)|nino|nin|nhs\s+(?:number|no\.?)|aadhaa?r(?:\s+(?:number|no\.?|card))?|"
    r"pan(?:\s+(?:card|number|no\.?))|dni|nie|nif|cpf|curp|rfc|bsn|codice\s+fiscale|nir|insee|pesel|"
    r"personnummer|henkilötunnus|hetu|cnp|emirates\s+id|iqama|nric|mykad|"
    r"driver'?s?\s+licen[cs]e(?:\s+(?:number|no\.?|#))?|driving\s+licen[cs]e(?:\s+(?:number|no\.?))?|dl\s*#|"
    r"licen[cs]e\s+(?:number|no\.?)|medicare(?:\s+(?:number|no\.?|card))?|"
    r"health\s+(?:card|insurance|id)\s*(?:number|no\.?)?|insurance\s+(?:number|no\.?)|"
    r"member(?:ship)?\s+(?:id|number|no\.?)|patient\s+(?:id|number|no\.?)|mrn|"
    r"student\s+(?:id|number|no\.?)|employee\s+(?:id|number|no\.?)|staff\s+(?:id|number|no\.?)|voter\s+id"
)
_NATIONAL_ID = re.compile(rf"\b(?:{_NATIONAL_ID_NAMES}){_SAYS}\s*{_ID_VALUE}", _I)
_NINO = re.compile(r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b", _I)
_DNI = re.compile(r"\b(?P<digits>[XYZ]?\d{7,8})-?(?P<letter>[A-Z])\b", _I)
_CPF = re.compile(r"\b\d{3}\.\d{3}\.\d{3}-\d{2}\b")
_CODICE_FISCALE = re.compile(r"\b[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]\b", _I)
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"

# --- IBANs, phones, e-mail ------------------------------------------------------------------------------------
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]{4}){2,7}(?:[ -]?[A-Z0-9]{1,4})?\b", _I)
_CARD_CUE = re.compile(
    r"\b(?:card|credit|debit|visa|master\s?card|amex|american\s+express|discover|diners|jcb|maestro|unionpay|cc|"
    r"pan)\b[^\d\n]{0,20}(?P<value>\d(?:[ -]?\d){12,18})\b",
    _I,
)
_PHONE_WORDS = (
    r"call|calls|calling|phone|phoned|tel|telephone|mobile|mob|cell|cellphone|text|txt|sms|whatsapp|signal|"
    r"viber|ring|fax|reach\s+me|contact\s+me|ph|hotline|landline"
)
_GLUED_PHONE = re.compile(
    rf"\b(?:{_PHONE_WORDS})\.?(?:\s+(?:me|us|him|her|them|my\s+\w+))?\s*(?:is|at|on|:|#)?\s*"
    r"(?P<value>\+?\(?\d[\d ().-]{5,20}\d)",
    _I,
)
_LINE_PHONE = re.compile(
    r"\b(?:line|direct\s+line|job|po|desk|office|home|work|extension|ext|cell|mobile)\.?\s*(?:is|at|on|:|#)?\s*"
    r"(?P<value>\+?\(?\d[\d ().-]{8,20}\d)",
    _I,
)
_SPELLED_EMAIL = re.compile(
    r"\b[\w.+-]+\s*(?:\(at\)|\[at\]|\{at\}|\s+at\s+)\s*[\w-]+(?:\s*(?:\(dot\)|\[dot\]|\{dot\}|\s+dot\s+)\s*[\w-]+)+",
    _I,
)

# --- street addresses -----------------------------------------------------------------------------------------
_STREET_TYPES = (
    r"street|st|avenue|ave|av|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|ter|close|"
    r"crescent|cres|parkway|pkwy|highway|hwy|square|sq|circle|cir|trail|trl|row|mews|gardens|grove|walk|alley|"
    r"plaza|loop|broadway|path|pike|parade|esplanade|quay|wharf|hill|rise|view"
)
_ADDRESS_WORD = (
    r"(?!(?:the|a|an|on|of|in|at|to|for|and|or|with|by|from|is|are|was|per|each|every)\b)[A-Za-z][\w'’.-]*"
)
_UNIT = r"(?:,?\s*(?:apt|apartment|suite|ste|unit|flat|floor|fl|room|rm|#)\.?\s*#?[\w-]{1,6})?"
_TOWN_TAIL = (
    r"(?:,\s*(?:[A-Z][\w'’-]+\s?){1,3}(?:,\s*|\s+)(?:[A-Z]{2}\s+\d{5}(?:-\d{4})?|\d{4,5}|"
    r"[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2})|,\s*\d{4,5}\s+[A-Z][\w'’-]+)?"
)
_ENGLISH_ADDRESS = re.compile(
    rf"\b\d{{1,5}}[A-Za-z]?(?:-\d{{1,4}})?\s+(?:{_ADDRESS_WORD}\s+){{1,4}}?(?:{_STREET_TYPES})\b\.?{_UNIT}{_TOWN_TAIL}",
    _I,
)
_GERMANIC_ADDRESS = re.compile(
    r"\b[\wÀ-ÿ'’-]*(?:stra(?:ß|ss)e|str\.|gasse|weg|allee|platz|ring|damm|ufer|straat|laan|gracht|plein|kade|"
    r"gatan|gata|vägen|veien|gade|vej|katu|tie)\s+\d{1,4}\s?[a-z]?\b(?:,?\s*\d{4,5}\s+[A-ZÄÖÜ][\wäöüß-]+)?",
    _I,
)
_ROMANCE_ADDRESS = re.compile(
    r"\b(?:\d{1,4}(?:\s?(?:bis|ter))?,?\s+)?(?:rue|avenue|boulevard|bd|chemin|allée|impasse|quai|calle|c/|avenida|"
    r"avda\.?|paseo|carrer|via|viale|corso|piazza|largo|rua|travessa|praça|ulica|ul\.|aleja)\s+"
    r"(?:[\wÀ-ÿ'’.-]+\s+){0,4}?(?:\d{1,4}[a-z]?\b|[\wÀ-ÿ'’-]+(?=,\s*\d{4,5}))"
    r"(?:,?\s*\d{4,5}\s+[A-ZÀ-Ý][\wÀ-ÿ-]+)?",
    _I,
)
_PO_BOX = re.compile(r"\b(?:p\.?\s?o\.?\s*box|post\s+office\s+box|postfach|apartado)\s+\d{1,6}\b", _I)
_UK_POSTCODE = re.compile(r"\b(?:[A-PR-UWYZ][A-HK-Y]?\d[A-HJKPSTUW\d]?)\s\d[ABD-HJLNP-UW-Z]{2}\b")
_ADDRESS_CUE = re.compile(
    r"\b(?:my\s+(?:home\s+|postal\s+|mailing\s+|billing\s+|shipping\s+|street\s+)?address\s+is|"
    r"(?:home|postal|mailing|billing|shipping|street|residential)\s+address\s*(?:is|:)?|address\s*:|"
    r"i\s+live\s+(?:at|on)|we\s+live\s+(?:at|on)|(?:he|she|they)\s+lives?\s+(?:at|on)|i'm\s+at|i\s+am\s+at)\s+"
    r"(?P<value>[^.!?\n]*?\d[^.!?\n]*?)(?=[.!?\n]|$)",
    _I,
)


def find_structured(text: str, entities: frozenset[str]) -> list[Span]:
    """Every rule span whose kind is in `entities`."""
    if not text:
        return []
    spans: list[Span] = []
    for kind, finder in _FINDERS:
        if kind in entities:
            spans.extend(finder(text))
    return spans


def _dates_of_birth(text: str) -> Iterator[Span]:
    for match in _DOB.finditer(text):
        yield DATE_OF_BIRTH, match.start("value"), match.end("value")


def _passports(text: str) -> Iterator[Span]:
    for match in _PASSPORT.finditer(text):
        if _id_like(match.group("value")):
            yield PASSPORT, match.start("value"), match.end("value")


def _national_ids(text: str) -> Iterator[Span]:
    for match in _NATIONAL_ID.finditer(text):
        if _id_like(match.group("value")):
            yield NATIONAL_ID, match.start("value"), match.end("value")
    for regex, valid in ((_NINO, None), (_CPF, _valid_cpf), (_CODICE_FISCALE, None), (_DNI, _valid_dni)):
        for match in regex.finditer(text):
            if valid is None or valid(match):
                yield NATIONAL_ID, match.start(), match.end()


def _id_like(value: str) -> bool:
    compact = _ID_SEPARATORS.sub("", value)
    return 5 <= len(compact) <= 20 and sum(c.isdigit() for c in compact) >= 3


def _valid_dni(match: re.Match) -> bool:
    digits = match.group("digits").upper().replace("X", "0").replace("Y", "1").replace("Z", "2")
    return _DNI_LETTERS[int(digits) % 23] == match.group("letter").upper()


def _valid_cpf(match: re.Match) -> bool:
    digits = [int(c) for c in match.group() if c.isdigit()]
    for n in (9, 10):
        check = sum(d * w for d, w in zip(digits[:n], range(n + 1, 1, -1))) * 10 % 11 % 10
        if check != digits[n]:
            return False
    return len(set(digits)) > 1


def _ibans(text: str) -> Iterator[Span]:
    for match in _IBAN.finditer(text):
        value = match.group().rstrip(" -")
        if _valid_iban(value):
            yield IBAN_CODE, match.start(), match.start() + len(value)


def _valid_iban(value: str) -> bool:
    compact = _IBAN_SEPARATORS.sub("", value).upper()
    if not 15 <= len(compact) <= 34:
        return False
    rotated = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rotated)) % 97 == 1


def _cards(text: str) -> Iterator[Span]:
    """Card numbers Presidio's prefix list rejects, after a card word and passing the Luhn check."""
    for match in _CARD_CUE.finditer(text):
        if _luhn([int(c) for c in match.group("value") if c.isdigit()]):
            yield CREDIT_CARD, match.start("value"), match.end("value")


def _luhn(digits: list[int]) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        total += (d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 else d
    return total % 10 == 0 and len(set(digits)) > 1


def _phones(text: str) -> Iterator[Span]:
    for regex, least in ((_GLUED_PHONE, 7), (_LINE_PHONE, 10)):
        for match in regex.finditer(text):
            value = match.group("value").rstrip(" .-(")
            digits = _NOT_DIGIT.sub("", value)
            if not least <= len(digits) <= 15 or _looks_like_date(value):
                continue
            if regex is _GLUED_PHONE or value.startswith("+") or _nanp_shaped(digits):
                yield PHONE_NUMBER, match.start("value"), match.start("value") + len(value)


def _nanp_shaped(digits: str) -> bool:
    """After "line", "job" or "po" only a number shaped like a North American one is a phone: an SAP order
    "PO 4500012345" has an exchange starting with 0 and stays."""
    digits = digits[1:] if len(digits) == 11 and digits[0] == "1" else digits
    return len(digits) == 10 and digits[0] in "23456789" and digits[3] in "23456789"


def _looks_like_date(value: str) -> bool:
    return _DATE_SHAPE.fullmatch(value.strip()) is not None


_PLAIN_EMAIL = re.compile(r"[\w.+%'-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")


def _plain_emails(text: str) -> Iterator[Span]:
    """Any local@domain.tld, whatever the top-level domain: internal ones (.example, .corp, .local, .internal)
    are not on the public suffix list that Presidio's e-mail recognizer checks, and are still personal."""
    if "@" not in text:
        return
    for match in _PLAIN_EMAIL.finditer(text):
        yield EMAIL_ADDRESS, match.start(), match.end()


def _spelled_emails(text: str) -> Iterator[Span]:
    if "dot" not in text.lower():  # every match has one; the search itself is slow
        return
    for match in _SPELLED_EMAIL.finditer(text):
        if _BRACKETED_AT.search(match.group()) or _SPACED_DOT.search(match.group()):
            yield EMAIL_ADDRESS, match.start(), match.end()


def _addresses(text: str) -> Iterator[Span]:
    for regex in (_ENGLISH_ADDRESS, _GERMANIC_ADDRESS, _ROMANCE_ADDRESS, _PO_BOX, _UK_POSTCODE):
        for match in regex.finditer(text):
            yield STREET_ADDRESS, match.start(), match.end()
    for match in _ADDRESS_CUE.finditer(text):
        yield STREET_ADDRESS, match.start("value"), match.end("value")


_ID_SEPARATORS = re.compile(r"[ ./-]")
_IBAN_SEPARATORS = re.compile(r"[ -]")
_NOT_DIGIT = re.compile(r"\D")
_DATE_SHAPE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}")
_BRACKETED_AT = re.compile(r"\(at\)|\[at\]|\{at\}", _I)
_SPACED_DOT = re.compile(r"\sdot\s", _I)

_FINDERS: tuple[tuple[str, Callable[[str], Iterator[Span]]], ...] = (
    (DATE_OF_BIRTH, _dates_of_birth),
    (PASSPORT, _passports),
    (NATIONAL_ID, _national_ids),
    (IBAN_CODE, _ibans),
    (CREDIT_CARD, _cards),
    (PHONE_NUMBER, _phones),
    (EMAIL_ADDRESS, _plain_emails),
    (EMAIL_ADDRESS, _spelled_emails),
    (STREET_ADDRESS, _addresses),
)
