"""PII redaction: e-mail addresses, phone numbers, IP addresses, card numbers and API keys become typed
placeholders, with counts per type for the manifest.

    text, counts = redact("mail jo@x.org or call +44 20 7946 0958", ["email", "phone"])
    # "mail <EMAIL> or call <PHONE>", {"email": 1, "phone": 1}

Precision matters as much as recall here: a training corpus full of `<PHONE>` where ICD-10 code ranges, dates
and version numbers used to be is damaged data. So every pattern is anchored against the characters around
it, and candidates that a regex alone cannot judge (card numbers, IPv6, phones, generic keys) are checked in
Python before they are replaced.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable

from honed.config import PII_TYPES

PLACEHOLDERS = {pii_type: f"<{pii_type.upper()}>" for pii_type in PII_TYPES}

# ---------------------------------------------------------------------------------------------- API keys
_KNOWN_KEY = re.compile(r"""
    \b(?:
        (?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{20,}           # Stripe
      | sk-(?=[\w-]*\d)[\w-]{20,}                             # OpenAI / Anthropic; the digit keeps "sk-learn-..." out
      | gh[pousr]_[A-Za-z0-9]{20,} | github_pat_\w{22,}       # GitHub
      | AKIA[0-9A-Z]{16}                                      # AWS access key id
      | xox[bpoa]-[A-Za-z0-9-]{10,}                           # Slack
      | AIza[\w-]{35}                                         # Google
      | hf_[A-Za-z0-9]{30,}                                   # Hugging Face
    )(?![\w-])
""", re.VERBOSE | re.ASCII)
_LONG_TOKEN = re.compile(r"(?<![\w-])[\w-]{32,}(?![\w-])", re.ASCII)
_LETTER_AND_DIGITS = re.compile(r"(?=.*[A-Za-z])(?=(?:.*\d){2})")
_HEX_OR_UUID = re.compile(r"[0-9A-Fa-f-]+")
_SEPARATOR = re.compile(r"[_-]")
MIN_SECRET_ENTROPY = 3.5
"""Bits per character; random base62 tokens of 32+ characters score about 4.5, identifiers and words lower."""


def _entropy(token: str) -> float:
    return -sum(n / len(token) * math.log2(n / len(token)) for n in Counter(token).values())


def looks_like_secret(token: str) -> bool:
    """A 32+ character token of letters, digits, `_` and `-` with a letter and at least two digits (so
    `LongClassNameV2` stays), a run of 16+ characters without `_`/`-` (so snake_case identifiers stay) and
    high entropy. Hex strings and UUIDs are left alone: in a corpus they are almost always commit ids,
    checksums and record ids, not credentials; keys with a known prefix are caught whatever their alphabet."""
    return (bool(_LETTER_AND_DIGITS.match(token))
            and not _HEX_OR_UUID.fullmatch(token)
            and max(map(len, _SEPARATOR.split(token))) >= 16
            and _entropy(token) >= MIN_SECRET_ENTROPY)


# ------------------------------------------------------------------------------------------------ e-mail
_AT = r"(?:@|\s*[\[({<]\s*at\s*[\])}>]\s*)"      # john@x.org, john [at] x.org, john(at)x.org
_DOT = r"(?:\.|\s*[\[({<]\s*dot\s*[\])}>]\s*)"   # x.org, x [dot] org, x(dot)org
_EMAIL = re.compile(rf"(?<![\w.%+-])[\w.%+-]+{_AT}(?:[A-Za-z0-9-]+{_DOT})+[A-Za-z]{{2,}}(?![\w-])", re.IGNORECASE)

# ------------------------------------------------------------------------------------------- card number
_CARD = re.compile(r"""
    (?=\d)(?<![\d.-])                         # the lookahead first lets `re` skip to digits fast
    (?: \d{13,19}                              # 4111111111111111
      | \d{4}([ -])\d{4}\1\d{4}\1\d{1,7}        # 4111 1111 1111 1111, 4111-1111-1111-1111
      | \d{4}([ -])\d{6}\2\d{4,5}               # Amex 3782 822463 10005
    )
    (?!\d|[.-]\d)
""", re.VERBOSE)
_DOUBLED = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]          # digit → sum of the digits of 2 × digit


def is_card_number(candidate: str) -> bool:
    """13-19 digits that pass the Luhn checksum and start like a major network's card (2-6: Mastercard,
    Amex / Diners / JCB, Visa, Discover / UnionPay), so a random long number is kept 9 times in 10 or more."""
    digits = re.sub(r"\D", "", candidate)
    checksum = sum(map(int, digits[-1::-2])) + sum(_DOUBLED[int(d)] for d in digits[-2::-2])
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and checksum % 10 == 0


# ------------------------------------------------------------------------------------------- IP address
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not glued to a word, a dot or a digit on either side: "v1.2.3.4" and "1.2.3.4.5" are versions, not hosts.
_IPV4 = re.compile(rf"(?=\d)(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_IPV6_CANDIDATE = re.compile(r"(?=[0-9A-Fa-f:])(?<![\w:.])[0-9A-Fa-f]*:[0-9A-Fa-f]*:[0-9A-Fa-f:.]*(?<!\.)(?![\w:])")


def is_ipv6(candidate: str) -> bool:
    """Full or `::`-compressed IPv6 (with an optional trailing IPv4) holding a digit, so `::` alone and
    C++-like `Face::Bead` stay."""
    if not any(char.isdigit() for char in candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------- phone
_PHONE = re.compile(r"""
    (?=[+(\d])(?<![\w+.-])
    (?: \+\d{1,3}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,12}(?:[ .-]\d{1,8}){0,5}  # +44 20 7946 0958, +1 (555) 123-4567
      | (?:1[ .-])?\(\d{3}\)\ ?\d{3}[ .-]\d{4}                           # (555) 123-4567
      | (?:1([.-]))?\d{3}([.-])\d{3}\2\d{4}                              # 555-123-4567, 555.123.4567
      | \d{3}\ \d{3}\ \d{4}                                              # 555 123 4567
      | 0\d{1,4}([ .-])\d{2,4}(?:\3\d{2,4}){1,3}                         # 020 7946 0958, 01 23 45 67 89
    )
    (?![\w-]|\.\d)
""", re.VERBOSE)


def has_phone_digits(candidate: str) -> bool:
    """A phone number holds 10-15 digits (E.164 allows at most 15 with the country code)."""
    return 10 <= sum(char.isdigit() for char in candidate) <= 15


# ------------------------------------------------------------------------------------------------ redact
# Applied in this order: keys and e-mails first (they hold digit runs the number patterns would split),
# cards before IPs and phones, IPv6 before IPv4 (so "::ffff:192.0.2.1" goes whole).
_DETECTORS: dict[str, list[tuple[re.Pattern, Callable[[str], bool] | None]]] = {
    "api_key": [(_KNOWN_KEY, None), (_LONG_TOKEN, looks_like_secret)],
    "email": [(_EMAIL, None)],
    "credit_card": [(_CARD, is_card_number)],
    "ip": [(_IPV6_CANDIDATE, is_ipv6), (_IPV4, None)],
    "phone": [(_PHONE, has_phone_digits)],
}


def _replace(pattern: re.Pattern, is_match: Callable[[str], bool] | None, placeholder: str,
             text: str) -> tuple[str, int]:
    if is_match is None:
        return pattern.subn(placeholder, text)
    hits = 0

    def swap(match: re.Match) -> str:
        nonlocal hits
        if not is_match(match.group()):
            return match.group()
        hits += 1
        return placeholder

    return pattern.sub(swap, text), hits


def redact(text: str, types: list[str]) -> tuple[str, dict[str, int]]:
    """Replace each PII match of the given `types` (see `honed.config.PII_TYPES`) by its placeholder
    (`<EMAIL>`, `<PHONE>`, `<IP>`, `<CREDIT_CARD>`, `<API_KEY>`); returns the text and the count per type
    for types with at least one match."""
    unknown = set(types) - set(PII_TYPES)
    if unknown:
        raise ValueError(f"unknown PII types {sorted(unknown)}; allowed: {', '.join(PII_TYPES)}")
    counts = {}
    for pii_type, detectors in _DETECTORS.items():
        if pii_type not in types:
            continue
        total = 0
        for pattern, is_match in detectors:
            text, hits = _replace(pattern, is_match, PLACEHOLDERS[pii_type], text)
            total += hits
        if total:
            counts[pii_type] = total
    return text, counts
