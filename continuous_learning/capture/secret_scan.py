"""Credentials in chat text, found before Presidio runs so that Presidio (and the log) never see them.

Two sources: the token formats of `detect-secrets` (Yelp; its regex plugins for AWS, GitHub, Slack, Stripe, JWT,
private keys, GitLab, PyPI, SendGrid, Twilio, ...) and patterns for what it misses in chat: current key formats
(`sk-proj-…`, `github_pat_…`, `hf_…`, `AIza…`), whole private-key blocks, URL credentials, assignments
(`password=…`, `export DB_PASSWORD='…'`), `Authorization:` headers and plain sentences ("the wifi password is
hunter22", "my pin is 4821"). detect-secrets' own keyword plugin is not used: its config regexes take everything
up to the end of the line, which in chat is the rest of the sentence. Its high-entropy plugins only look inside
quotes; here any long token that mixes cases and digits and has their entropy counts.

Every finding is a (kind, start, end) span; kinds are placeholder names in the `<UPPER_CASE>` shape.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

API_KEY, ACCESS_TOKEN, PRIVATE_KEY, PASSWORD, SECRET = "API_KEY", "ACCESS_TOKEN", "PRIVATE_KEY", "PASSWORD", "SECRET"
KINDS = (API_KEY, ACCESS_TOKEN, PRIVATE_KEY, PASSWORD, SECRET)

Span = tuple[str, int, int]

# detect-secrets plugins whose patterns are specific enough for chat text, and the kind each finds. Left out:
# KeywordDetector (see above), the high-entropy plugins (quoted strings only; replaced by _high_entropy), the
# public-IP plugin (Presidio's IP recognizer decides), and IBM/Softlayer/Cloudant (keyword-led, covered below).
_DETECT_SECRETS_PLUGINS = {
    "aws.AWSKeyDetector": API_KEY,
    "github_token.GitHubTokenDetector": API_KEY,
    "gitlab_token.GitLabTokenDetector": API_KEY,
    "slack.SlackDetector": API_KEY,
    "stripe.StripeDetector": API_KEY,
    "openai.OpenAIDetector": API_KEY,
    "pypi_token.PypiTokenDetector": API_KEY,
    "npm.NpmDetector": API_KEY,
    "sendgrid.SendGridDetector": API_KEY,
    "twilio.TwilioKeyDetector": API_KEY,
    "discord.DiscordBotTokenDetector": API_KEY,
    "telegram_token.TelegramBotTokenDetector": API_KEY,
    "mailchimp.MailchimpDetector": API_KEY,
    "square_oauth.SquareOAuthDetector": API_KEY,
    "azure_storage_key.AzureStorageKeyDetector": SECRET,
    "jwt.JwtTokenDetector": ACCESS_TOKEN,
    "basic_auth.BasicAuthDetector": PASSWORD,
}

# Current formats detect-secrets 1.5.0 does not know (its OpenAI pattern wants the old 'T3BlbkFJ' marker, its
# GitHub pattern exactly 36 characters and no github_pat_).
_TOKEN_PATTERNS = [
    (API_KEY, r"(?<![\w-])sk-(?:proj-|svcacct-|admin-|ant-(?:api|admin)\d\d-|or-v1-)?[A-Za-z0-9_-]{20,}"),
    (API_KEY, r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    (API_KEY, r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
    (API_KEY, r"\bgl(?:pat|dt|ft|rt|cbt|ptt)-[A-Za-z0-9_-]{16,}"),
    (API_KEY, r"\bxox[abposre]-[A-Za-z0-9-]{10,}"),
    (API_KEY, r"\bxapp-\d-[A-Za-z0-9-]{10,}"),
    (API_KEY, r"\bhf_[A-Za-z0-9]{20,}"),
    (API_KEY, r"\b[rsp]k_(?:live|test)_[A-Za-z0-9]{10,}"),
    (API_KEY, r"\bwhsec_[A-Za-z0-9]{20,}"),
    (API_KEY, r"\bAIza[0-9A-Za-z_-]{30,}"),
    (API_KEY, r"\bya29\.[0-9A-Za-z_-]{20,}"),
    (API_KEY, r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b"),
    (API_KEY, r"\bnpm_[A-Za-z0-9]{30,}"),
    (API_KEY, r"\bpypi-[A-Za-z0-9_-]{40,}"),
    (API_KEY, r"\bSG\.[\w-]{16,}\.[\w-]{20,}"),
    (API_KEY, r"\bdop_v1_[a-f0-9]{40,}"),
    (ACCESS_TOKEN, r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
    (PRIVATE_KEY,
     r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)"),
    (PRIVATE_KEY, r"PuTTY-User-Key-File-\d.*?(?:Private-MAC: *\S+|\Z)"),
]

_VALUE = r"""(?P<value>"[^"\n]{1,200}"|'[^'\n]{1,200}'|`[^`\n]{1,200}`|“[^”\n]{1,200}”|[^\s"'`“”<>]{1,200})"""
# A secret-bearing identifier in code or config: DB_PASSWORD, db.password, apiKey, client-secret, X-Api-Key.
_SECRET_WORDS = (
    r"pass(?:word|wd|wort|phrase|code)?|pwd|secret|token|api[_-]?key|apikey|auth[_-]?key|access[_-]?key|"
    r"secret[_-]?key|private[_-]?key|client[_-]?secret|signing[_-]?key|master[_-]?key|encryption[_-]?key|"
    r"license[_-]?key|app[_-]?key|credentials?|pin|contrase[nñ]a|mot[_-]de[_-]passe|kennwort|senha"
)
# Identifier parts that turn a secret word into a harmless setting: token_limit, password_file, max_tokens.
_HARMLESS_PARTS = frozenset(
    "limit limits count counts len length size max min num number type ttl expiry expires timeout url uri endpoint "
    "file path name id ids policy policies hash hashed hint reset rule rules field prompt label mode format env "
    "header location dir budget window rotation age".split()
)
_ASSIGNMENT = re.compile(  # the optional quote closes a JSON key: {"password": "..."}
    rf"(?P<name>(?<![\w.-])[\w.-]{{0,40}}?(?i:{_SECRET_WORDS})(?:[_.-]?[A-Za-z0-9]+)*)"
    rf"(?P<sep>[\"'`]?\s*(?::=|=>|=|:)\s*){_VALUE}",
    re.IGNORECASE,
)
_AUTH_HEADER = re.compile(
    r"\b(?:authorization|proxy-authorization|x-api-key|x-auth-token|api-key|x-access-token)\b\s*[:=]\s*"
    r"(?:(?:basic|bearer|token|digest|apikey|key)\s+)?(?P<value>[A-Za-z0-9._~+/=:-]{6,})",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(?:bearer|token)\s+(?P<value>[A-Za-z0-9._~+/-]{20,}=*)", re.IGNORECASE)
# The password runs to the last '@' before the host: users type '#', '?' and '@' unescaped ("root:p#ss@db").
_URL_CREDENTIALS = re.compile(
    r"\b[a-z][a-z0-9+.-]{1,20}://[^\s:/?#@]{1,100}:(?P<value>[^\s/]{1,200})@[\w.-]", re.IGNORECASE
)
# Chat phrasings: "the wifi password is hunter22", "password for the router: x", "my pin is 4821".
_SAYING = (
    r"(?:is|was|=|:|'s|’s|is\s+now|is\s+still|is\s+set\s+to|set\s+to|reset\s+to|"
    r"(?:has\s+been\s+|was\s+)?changed\s+to|"
    r"is\s+just|is\s+simply|would\s+be|will\s+be|should\s+be)"
)
_SPOKEN_PASSWORD = re.compile(
    r"\b(?:pass\s?words?|passwd|passcodes?|passphrases?|pwd|pw|credentials)"
    r"(?:\s+(?:for|to|of|on)\s+(?:the\s+|my\s+|our\s+|your\s+|his\s+|her\s+)?[\w.'-]+(?:\s+[\w.'-]+)?)?"
    rf"\s*{_SAYING}\s+(?:just\s+|simply\s+|literally\s+)?{_VALUE}",
    re.IGNORECASE,
)
_BARE_PASSWORD = re.compile(
    rf"\b(?:password|passwd|passcode|passphrase|pwd)\s+{_VALUE}", re.IGNORECASE
)
_USED_AS_PASSWORD = re.compile(
    rf"\b(?:use|used|using|try|tried|type|typed|enter|entered|set|chose|picked)\s+{_VALUE}\s+as\s+"
    r"(?:the\s+|my\s+|a\s+|our\s+|your\s+)?(?:new\s+)?(?:password|passcode|pin|passphrase)\b",
    re.IGNORECASE,
)
_SET_PASSWORD = re.compile(
    r"\b(?:set|changed?|reset|updated?|made)\s+(?:the\s+|my\s+|our\s+|his\s+|her\s+|their\s+)?(?:[\w-]+\s+){0,2}?"
    rf"(?:password|passcode|pin|passphrase)\s+(?:to|as)\s+{_VALUE}",
    re.IGNORECASE,
)
_MYSQL_PASSWORD = re.compile(r"\bmysql(?:dump|admin|sh)?\b[^\n]*?\s-p(?P<value>[^\s'\"]+)")
_SPOKEN_PIN = re.compile(
    r"\b(?:pin(?:\s?(?:code|number|no\.?))?|passcode|door\s+code|alarm\s+code|gate\s+code|access\s+code|"
    r"security\s+code|verification\s+code|one[-\s]time\s+(?:code|password)|otp|2fa\s+code|cvv2?|cvc)"
    rf"(?:\s*{_SAYING})?\s*(?:#\s*)?(?P<value>\d[\d -]{{2,10}}\d)\b",
    re.IGNORECASE,
)
# Words a password sentence ends on that are not the password: "the password is wrong".
_NOT_A_PASSWORD = frozenset(
    """wrong incorrect invalid expired correct right too not required empty missing case the a an set stored saved
    same different weak strong long short hidden encrypted hashed reset changed new old it this that there here in
    on at for to and or but what how fine ok okay working broken gone lost forgotten unknown still also now just
    changing expiring being rejected accepted ignored there's it's please you your my our their his her its is was
    be been displayed shown visible printed sent needed necessary mandatory optional blank none null true false
    yes no on off protected managed case-sensitive sensitive secure insecure complex simple easy hard""".split()
)
_PLACEHOLDER = re.compile(
    r"<[A-Z][A-Z0-9_]{2,}>|\*{3,}|x{4,}|\.{3,}|…|\$\{?[A-Za-z_]\w*\}?|%[A-Za-z_]\w*%|\{\{.*\}\}"
)
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9+/_=.~-]{20,}")
_ENTROPY_LIMIT = 4.0  # bits per character over the base64 alphabet; detect-secrets uses 4.5 for quoted strings
_TRIGGER = re.compile(
    r"[=:@]|-----|PuTTY|"
    r"\b(?:sk|gh[pousr]|github|gl\w{2,4}|xox\w|xapp|hf|[rsp]k|whsec|AIza\w|ya29|A3T|AKIA|ASIA|ABIA|ACCA|"
    r"npm|pypi|SG|dop|eyJ\w*|bearer|token|pass\w*|pwd|pw|pin|login|credentials|otp|cvv2?|cvc|2fa|"
    r"use|used|using|try|tried|type|typed|enter|entered|set|chose|picked|changed?|reset|updated?|made|mysql\w*)"
    r"|(?:door|alarm|gate|access|security|verification|one.time)\s+code|[A-Za-z0-9+/_=.~-]{20}",
    re.IGNORECASE,
)


def find_secrets(text: str) -> list[Span]:
    """Every credential in `text` as (kind, start, end), overlaps merged (the earlier, longer span wins)."""
    if not text or not _TRIGGER.search(text):
        return []
    spans = [*_detect_secrets_spans(text), *_token_spans(text), *_context_spans(text)]
    taken = [(s, e) for _, s, e in spans]
    spans += [(SECRET, s, e) for s, e in _high_entropy(text) if not _overlaps(s, e, taken)]
    return _merge(spans)


def redact_secrets(text: str) -> tuple[str, list[str]]:
    """(text with each credential replaced by its placeholder, sorted kinds found)."""
    spans = find_secrets(text)
    return replace_spans(text, spans), sorted({kind for kind, _, _ in spans})


def replace_spans(text: str, spans: list[Span]) -> str:
    pieces, last = [], 0
    for kind, start, end in sorted(spans, key=lambda s: s[1]):
        pieces += [text[last:start], f"<{kind}>"]
        last = end
    return "".join(pieces) + text[last:]


# --- detect-secrets -------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _plugins() -> tuple:
    import importlib

    plugins = []
    for dotted, kind in _DETECT_SECRETS_PLUGINS.items():
        module, name = dotted.rsplit(".", 1)
        plugin = getattr(importlib.import_module(f"detect_secrets.plugins.{module}"), name)()
        plugins.append((plugin, kind))
    return tuple(plugins)


def _detect_secrets_spans(text: str) -> Iterator[Span]:
    for plugin, kind in _plugins():
        for regex in plugin.denylist:
            for match in regex.finditer(text):
                group = 1 if regex.groups and match.start(1) >= 0 else 0
                value = match.group(group)
                if kind == ACCESS_TOKEN and not plugin.is_formally_valid(value):
                    continue
                if value.strip():
                    yield kind, *match.span(group)


# --- own patterns ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _compiled_tokens() -> tuple:
    return tuple((kind, re.compile(pattern, re.DOTALL)) for kind, pattern in _TOKEN_PATTERNS)


def _token_spans(text: str) -> Iterator[Span]:
    for kind, regex in _compiled_tokens():
        for match in regex.finditer(text):
            yield kind, match.start(), match.end()


def _context_spans(text: str) -> Iterator[Span]:
    for match in _ASSIGNMENT.finditer(text):
        if _names_a_secret(match.group("name")):
            yield from _value_span(match, PASSWORD if _is_password_name(match.group("name")) else SECRET)
    for regex, kind in ((_AUTH_HEADER, ACCESS_TOKEN), (_BEARER, ACCESS_TOKEN), (_URL_CREDENTIALS, PASSWORD)):
        for match in regex.finditer(text):
            yield from _value_span(match, kind, strip=False)
    for regex in (_SPOKEN_PASSWORD, _BARE_PASSWORD, _USED_AS_PASSWORD, _SET_PASSWORD, _MYSQL_PASSWORD):
        for match in regex.finditer(text):
            if regex is not _BARE_PASSWORD or _looks_generated(match.group("value")):
                yield from _value_span(match, PASSWORD)
    for match in _SPOKEN_PIN.finditer(text):
        yield PASSWORD, match.start("value"), match.end("value")


def _names_a_secret(name: str) -> bool:
    parts = {p.lower() for p in _NAME_PARTS.split(name) if p}
    return not parts & _HARMLESS_PARTS and not _NOT_SECRET_NAME.search(name)


_NAME_PARTS = re.compile(r"[_.\-]|(?<=[a-z])(?=[A-Z])")
_NOT_SECRET_NAME = re.compile(r"(?i)tokens\b|tokeniz|passenger|compass|bypass|keyboard")
_PASSWORD_NAME = re.compile(r"(?i)pass|pwd|pin|contrase|kennwort|senha")
_GENERATED = re.compile(r"\d|[^\w\s]|[a-z][A-Z]")
_CHAR_CLASSES = (re.compile(r"[a-z]"), re.compile(r"[A-Z]"), re.compile(r"\d"))


def _is_password_name(name: str) -> bool:
    return _PASSWORD_NAME.search(name) is not None


def _value_span(match: re.Match, kind: str, strip: bool = True) -> Iterator[Span]:
    value, start, end = match.group("value"), match.start("value"), match.end("value")
    if value[:1] in "\"'`“" and len(value) >= 2:
        value, start, end = value[1:-1], start + 1, end - 1
    elif strip:
        trimmed = value.rstrip(".,;:)?]}")
        value, end = trimmed, start + len(trimmed)
    if value and not _PLACEHOLDER.fullmatch(value) and value.lower() not in _NOT_A_PASSWORD:
        yield kind, start, end


def _looks_generated(value: str) -> bool:
    """A bare word after 'password' is the password only if it is not plain prose ("password reset link")."""
    value = value.rstrip(".,;:)?]}")
    return bool(_GENERATED.search(value)) and value.lower() not in _NOT_A_PASSWORD


def _high_entropy(text: str) -> Iterator[tuple[int, int]]:
    for match in _TOKEN_CHARS.finditer(text):
        token = match.group().strip(".=-_~/")
        if _is_random_token(token):
            yield match.start(), match.end()


def _is_random_token(token: str) -> bool:
    if len(token) < 20 or "://" in token or token.count("/") > 3 or token.count(".") > 2:
        return False
    classes = sum(bool(regex.search(token)) for regex in _CHAR_CLASSES)
    return classes == 3 and _entropy(token) >= _ENTROPY_LIMIT and not _joined_words(token)


_PARTS = re.compile(r"[-_./:]+")


def _joined_words(token: str) -> bool:
    """Short parts joined by separators, one of them a dictionary word: a model or package name such as
    "SmolLM2-135M-Instruct" or "Mistral-7B-Instruct-v0.3", not a generated secret."""
    from .names import is_english

    parts = [p for p in _PARTS.split(token) if p]
    return len(parts) >= 2 and max(len(p) for p in parts) <= 12 and any(
        p.isalpha() and len(p) >= 4 and is_english(p.lower()) for p in parts)


@lru_cache(maxsize=1)
def _entropy_plugin():
    from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString

    return Base64HighEntropyString()


def _entropy(token: str) -> float:
    return _entropy_plugin().calculate_shannon_entropy(token)


# --- spans ----------------------------------------------------------------------------------------------------
def _overlaps(start: int, end: int, others: list[tuple[int, int]]) -> bool:
    return any(start < e and s < end for s, e in others)


def _merge(spans: list) -> list[Span]:
    """Overlapping findings become one span covering both, with the kind of the longest."""
    merged: list[list] = []
    for kind, start, end in sorted(spans, key=lambda s: (s[1], -s[2])):
        if merged and start < merged[-1][2]:
            last = merged[-1]
            if end - start > last[2] - last[1]:
                last[0] = kind
            last[2] = max(last[2], end)
        else:
            merged.append([kind, start, end])
    return [tuple(m) for m in merged]  # type: ignore[misc]
