"""Personal data in text: Presidio's pattern recognizers (e-mail, phone, IP, card, API keys) and typed placeholders.
01_curate scrubs the curated rows with them; the gateway's default output filter uses the same recognizers.
"""

from __future__ import annotations

import re
from collections import Counter

PII_PLACEHOLDERS = {"EMAIL_ADDRESS": "<EMAIL>", "PHONE_NUMBER": "<PHONE>", "IP_ADDRESS": "<IP_ADDRESS>",
                    "API_KEY": "<API_KEY>", "CREDIT_CARD": "<CREDIT_CARD>"}
_API_KEY_PATTERNS = [
    ("openai_style", r"\bsk-(?:live-|test-|proj-)?[A-Za-z0-9]{20,}\b", 0.9),
    ("aws_access_key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", 0.9),
    ("github_token", r"\bgh[pousr]_[A-Za-z0-9]{36,}\b", 0.9),
    ("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b", 0.9),
    # a value assigned to a key-like name; Presidio matches with `regex`, which allows this lookbehind
    ("assigned_secret", r"(?i)(?<=(?:api[_-]?key|secret(?:_access)?(?:_key)?|token|password)[\"']?\s*[:=]\s*[\"']?)"
                        r"[A-Za-z0-9_\-/+]{16,}", 0.6),
    ("aws_secret_key", r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*[/+])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])"
                       r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])", 0.6),
]


class PiiScrubber:
    """Presidio pattern recognizers (no NLP model, no download) and its anonymizer with typed placeholders.

    Kept as configuration rather than personal data: loopback, unspecified, link-local and RFC 1918
    networks, well-known public resolvers, and digit runs without separators (sizes, serials, LSNs),
    which Presidio's phone recognizer would otherwise flag.
    """

    KEEP_NETWORKS = ("127.0.0.0/8", "0.0.0.0/32", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                     "::1/128", "::/128", "::ffff:0:0/96", "fe80::/10", "fc00::/7",
                     "1.1.1.1/32", "1.0.0.1/32", "8.8.8.8/32", "8.8.4.4/32", "9.9.9.9/32")
    _PHONE_SHAPE = re.compile(r"^\+?[\d().\s-]+$")
    # cheap gates: a recognizer runs only where its entity could be (phone numbers need separators)
    _HINTS = {"PHONE_NUMBER": re.compile(r"\d{2,}[\s.)-]+\d{3,}"),
              "API_KEY": re.compile(r"sk-|AKIA|ASIA|gh[pousr]_|xox|(?i:key|secret|token|password)|[A-Za-z0-9/+]{40}")}

    # what every recognizer needs to match: an e-mail an "@", an IPv6 address a ":", every other number a digit, an
    # API key one of its hints; text with none of them has nothing to find (a regex search: microseconds)
    _ANY = re.compile(r"[@:\d]|" + _HINTS["API_KEY"].pattern)

    def __init__(self, min_score: float = 0.3):
        import ipaddress

        import tldextract
        from presidio_analyzer import Pattern, PatternRecognizer
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IpRecognizer,
            PhoneRecognizer,
        )
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig

        offline_tld = tldextract.TLDExtract(suffix_list_urls=())  # bundled public-suffix snapshot, no fetch

        class OfflineEmailRecognizer(EmailRecognizer):
            def validate_result(self, pattern_text):
                return bool(offline_tld(pattern_text).fqdn)

        self._ip = ipaddress
        self._keep = [ipaddress.ip_network(n) for n in self.KEEP_NETWORKS]
        self.min_score = min_score
        api = PatternRecognizer(supported_entity="API_KEY", name="ApiKeyRecognizer",
                                patterns=[Pattern(n, p, s) for n, p, s in _API_KEY_PATTERNS])
        self.recognizers = [OfflineEmailRecognizer(), PhoneRecognizer(supported_regions=("US", "GB", "DE", "FR", "IN")),
                            IpRecognizer(), CreditCardRecognizer(), api]
        self.anonymizer = AnonymizerEngine()
        self.operators = {k: OperatorConfig("replace", {"new_value": v}) for k, v in PII_PLACEHOLDERS.items()}

    def _keep_ip(self, text: str) -> bool:
        try:
            net = self._ip.ip_network(text, strict=False)
        except ValueError:
            return False
        return any(net.subnet_of(k) for k in self._keep if k.version == net.version)

    def _keep_phone(self, text: str) -> bool:
        return not self._PHONE_SHAPE.match(text) or not re.search(r"[\s().-]", text.strip())

    def may_contain(self, text: str) -> bool:
        """False only when no recognizer can match `text`: a cheap test before the costly `find`."""
        return bool(self._ANY.search(text))

    def find(self, text: str):
        if not self.may_contain(text):
            return []
        found = []
        for rec in self.recognizers:
            hint = self._HINTS.get(rec.supported_entities[0])
            if hint and not hint.search(text):
                continue
            for res in rec.analyze(text, entities=rec.supported_entities, nlp_artifacts=None):
                if res.score < self.min_score:
                    continue
                span = text[res.start:res.end]
                if res.entity_type == "IP_ADDRESS" and self._keep_ip(span):
                    continue
                if res.entity_type == "PHONE_NUMBER" and self._keep_phone(span):
                    continue
                found.append(res)
        return found

    def scrub(self, text: str) -> tuple[str, Counter]:
        found = self.find(text)
        if not found:
            return text, Counter()
        result = self.anonymizer.anonymize(text=text, analyzer_results=found, operators=self.operators)
        return result.text, Counter(item.entity_type for item in result.items)


def scrub_pii(rows: list[dict], scrubber: PiiScrubber) -> tuple[list[dict], Counter, int]:
    """Rows with PII replaced by placeholders, spans replaced per type, and rows changed."""
    out, counts, changed = [], Counter(), 0
    for r in rows:
        q, cq = scrubber.scrub(r["question"])
        a, ca = scrubber.scrub(r["answer"])
        counts += cq + ca
        changed += bool(cq or ca)
        out.append({**r, "question": q, "answer": a})
    return out, counts, changed
