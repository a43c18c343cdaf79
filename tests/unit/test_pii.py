"""PII redaction on hand-made text: odd formats are caught, look-alikes (dates, ICD-10 codes and ranges, versions,
prices, hashes, identifiers) are left alone, and only the requested types are touched."""

import pytest

from honed.config import PII_TYPES
from honed.data.pii import is_card_number, looks_like_secret, redact
from honed.data.quality import text_of
from honed.data.sources import icd10_records, kjv_records

ALL = list(PII_TYPES)


@pytest.mark.parametrize("text, redacted, pii_type", [
    # e-mail
    ("mail john.doe@example.com now", "mail <EMAIL> now", "email"),
    ("John.Doe+newsletter@Mail.Example.CO.UK", "<EMAIL>", "email"),
    ("<a_b-c%d@sub-domain.example.museum>", "<<EMAIL>>", "email"),
    ("write to john [at] example [dot] com", "write to <EMAIL>", "email"),
    ("jane(at)example.org or bob (AT) foo (DOT) net", "<EMAIL> or <EMAIL>", "email"),
    ("x{at}y{dot}io.", "<EMAIL>.", "email"),
    # phone
    ("call +1 415 555 2671 today", "call <PHONE> today", "phone"),
    ("call (555) 123-4567.", "call <PHONE>.", "phone"),
    ("555-123-4567, 555.123.4567, 555 123 4567", "<PHONE>, <PHONE>, <PHONE>", "phone"),
    ("toll free 1-800-555-0199", "toll free <PHONE>", "phone"),
    ("+1 (555) 123-4567", "<PHONE>", "phone"),
    ("London +44 20 7946 0958 or 020 7946 0958", "London <PHONE> or <PHONE>", "phone"),
    ("Paris 01 23 45 67 89", "Paris <PHONE>", "phone"),
    ("Berlin +49 (0)30 12345678", "Berlin <PHONE>", "phone"),
    ("Mumbai +91-98765-43210", "Mumbai <PHONE>", "phone"),
    ("E.164: +15551234567", "E.164: <PHONE>", "phone"),
    # IP
    ("host 192.168.1.1, gateway 10.0.0.255.", "host <IP>, gateway <IP>.", "ip"),
    ("255.255.255.255 and 0.0.0.0", "<IP> and <IP>", "ip"),
    ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "full <IP>", "ip"),
    ("compressed 2001:db8::8a2e:370:7334, fe80::1 and ::1", "compressed <IP>, <IP> and <IP>", "ip"),
    ("mapped ::ffff:192.0.2.1", "mapped <IP>", "ip"),
    ("[2001:DB8::1]:8080", "[<IP>]:8080", "ip"),
    # card numbers that pass Luhn, with spaces, dashes or none
    ("visa 4111 1111 1111 1111", "visa <CREDIT_CARD>", "credit_card"),
    ("mc 5500-0000-0000-0004", "mc <CREDIT_CARD>", "credit_card"),
    ("amex 378282246310005 / 3782 822463 10005", "amex <CREDIT_CARD> / <CREDIT_CARD>", "credit_card"),
    ("discover 6011111111111117.", "discover <CREDIT_CARD>.", "credit_card"),
    # API keys
    ("OPENAI_API_KEY=sk-proj-abcDEF1234567890ghijKLMN", "OPENAI_API_KEY=<API_KEY>", "api_key"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc and pk_live_51HxYzAbCdEfGhIjKlMn",
     "stripe <API_KEY> and <API_KEY>", "api_key"),
    ("token ghp_16C7e42F292c6912E7710c838347Ae178B4a", "token <API_KEY>", "api_key"),
    ("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "<API_KEY>", "api_key"),
    ("aws AKIAIOSFODNN7EXAMPLE", "aws <API_KEY>", "api_key"),
    ("slack xoxb-123456789012-abcdefABCDEF", "slack <API_KEY>", "api_key"),
    ("google AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "google <API_KEY>", "api_key"),
    ("hf hf_AbCdEfGhIjKlMnOpQrStUvWxYz123456", "hf <API_KEY>", "api_key"),
    ("secret: aB3xY9kLm2Nq8Rt5Vw1Zc4Hj7Pd6Fs0Ge", "secret: <API_KEY>", "api_key"),   # no known prefix
    ("url https://x.io/dl?token=Zk8Qw2Lp5Rt9Xv3Bn7Mc1Hd6Jf4Gs0Ya", "url https://x.io/dl?token=<API_KEY>", "api_key"),
])
def test_pii_is_redacted(text, redacted, pii_type):
    assert redact(text, ALL) == (redacted, {pii_type: redacted.count(f"<{pii_type.upper()}>")})


@pytest.mark.parametrize("text", [
    "What does ICD-10-CM code E11.9 mean?",
    "Chapter 4: Endocrine, nutritional and metabolic diseases (E00-E89)",
    "Codes A00-B99, S00.00XA and Z99.89 are valid",
    "On 2024-01-15 and 01/15/2024 and 15.01.2024 at 10:30:45",
    "2024-01-15 2024-02-20 2024-03-01",                       # dates side by side
    "ts 2024-01-15T10:30:00Z",
    "version 1.2.3, v1.2.3.4, 1.2.3.4.5 and Python 3.11",
    "It costs $1,234,567.89 or €1.234.567,89 or 12345 units",
    "In 1999 and 2024; pages 100-200; list 10 20 30 40 50 60",
    "tel: 555-1234 (too short), ratio 1:2:3, John 3:16",
    "order #12345678901 and ISBN 978-3-16-148410-0, 0-306-40615-2",
    "pi is 3.14159265358979323846",
    "16 digits, not Luhn: 4111111111111112; starts with 1: 1234567812345670",
    "std::vector<int> and Face::Bead and ::",
    "sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709 md5 d41d8cd98f00b204e9800998ecf8427e",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sk-learn-compatible-estimator-wrapper and task-oriented-dialogue-system-v2",
    "test_quality_reason_with_all_rules_off_2 ThisIsAVeryLongClassNameForTesting2",
    "Pneumonoultramicroscopicsilicovolcanoconiosis is a long word",
    "email me at the office, look at example dot com",
    "In the beginning God created the heaven and the earth.",
])
def test_look_alikes_are_kept(text):
    assert redact(text, ALL) == (text, {})


def test_only_requested_types_are_redacted():
    text = "a@b.io 10.0.0.1 555-123-4567"
    assert redact(text, ["ip"]) == ("a@b.io <IP> 555-123-4567", {"ip": 1})
    assert redact(text, []) == (text, {})
    assert redact(text, ALL) == ("<EMAIL> <IP> <PHONE>", {"email": 1, "ip": 1, "phone": 1})
    with pytest.raises(ValueError, match="ssn"):
        redact(text, ["ssn"])


def test_keys_and_emails_go_before_their_digits_are_read_as_numbers():
    assert redact("k AKIA1234567890123456 e 5551234567@example.com", ALL) == (
        "k <API_KEY> e <EMAIL>", {"api_key": 1, "email": 1})
    # a card is a card, not a phone: 16 digits is over the phone limit anyway, but the card goes first
    assert redact("4111 1111 1111 1111", ["credit_card", "phone"]) == ("<CREDIT_CARD>", {"credit_card": 1})


def test_counts_add_up_across_patterns():
    text = "fe80::1 and 10.0.0.1, sk_test_abcdefghij0123456789 and aB3xY9kLm2Nq8Rt5Vw1Zc4Hj7Pd6Fs0Ge"
    assert redact(text, ALL)[1] == {"ip": 2, "api_key": 2}


@pytest.mark.parametrize("number, valid", [
    ("4111111111111111", True), ("4111 1111 1111 1111", True), ("378282246310005", True),
    ("4111111111111112", False),          # Luhn fails
    ("1234567812345670", False),          # Luhn passes, but no card network starts with 1
    ("0000000000000000", False),
])
def test_is_card_number(number, valid):
    assert is_card_number(number) is valid


@pytest.mark.parametrize("token, secret", [
    ("aB3xY9kLm2Nq8Rt5Vw1Zc4Hj7Pd6Fs0Ge", True),
    ("Zk8Qw2Lp5Rt9Xv3Bn7Mc1Hd6Jf4Gs0Ya_Qp", True),
    ("d41d8cd98f00b204e9800998ecf8427e", False),                 # hex digest
    ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa11", False),             # low entropy
    ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", False),             # no digits
    ("test_quality_reason_with_all_rules_off_22", False),        # snake_case identifier
])
def test_looks_like_secret(token, secret):
    assert looks_like_secret(token) is secret


def test_bundled_records_hold_no_pii():
    records = icd10_records(["4"]) + kjv_records(max_records=200, seed=0)
    hits = [(text_of(r), counts) for r in records for counts in [redact(text_of(r), ALL)[1]] if counts]
    assert hits == []
