"""The semantic cache's guard against known false hits: two questions that embed close together but ask for
different answers.

Sentence embeddings place "turn on two-factor authentication" and "turn off two-factor authentication" closer
than most real paraphrases, and they barely see a changed order number, amount, date or name. So a near neighbour
only becomes a hit when both questions carry the same *signature*: the same polarity (negation, on/off,
enable/disable, with/without, add/remove, ...), the same numbers and codes (order numbers, amounts, ids), the same
dates, emails and proper names. `refusal(a, b)` says why two questions differ, or None when the hit may stand.

NOTE: the guard is deliberately one-sided: when in doubt it refuses, since a miss costs one model call while a
false hit gives a customer the wrong answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# -- normalisation -----------------------------------------------------------------------------------------------
_CONTRACTIONS = ((re.compile(r"\bcan[’']t\b"), "cannot"), (re.compile(r"\bwon[’']t\b"), "will not"),
                 (re.compile(r"\bshan[’']t\b"), "shall not"), (re.compile(r"n[’']t\b"), " not"),
                 (re.compile(r"\bcan not\b"), "cannot"))
# Spellings of one thing that would otherwise look like a changed code ("2FA" against "two-factor").
_SYNONYMS = ((re.compile(r"\b(?:two|2|multi)[- ]?(?:factor|step)(?: authentication| verification| auth)?\b|"
                         r"\b(?:2fa|mfa|2sv)\b", re.I), "twofactor"),
             (re.compile(r"\be-?mail\b", re.I), "email"),
             (re.compile(r"\blog[- ]?in\b|\bsign[- ]?in\b", re.I), "login"),
             (re.compile(r"\blog[- ]?out\b|\bsign[- ]?out\b|\blog[- ]?off\b", re.I), "logout"))
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_ORDINAL = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b", re.I)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[-_/.][A-Za-z0-9]+)*")
_NUMBER_WORDS = {"two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                 "nine": "9", "ten": "10", "twelve": "12", "twenty": "20", "fifty": "50", "hundred": "100"}
_CURRENCIES = {"$": "usd", "usd": "usd", "dollar": "usd", "dollars": "usd", "€": "eur", "eur": "eur",
               "euro": "eur", "euros": "eur", "£": "gbp", "gbp": "gbp", "pound": "gbp", "pounds": "gbp"}
_CURRENCY = re.compile(r"[$€£]|\b(?:usd|eur|gbp|dollars?|euros?|pounds?)\b", re.I)


def _forms(*words: str) -> set[str]:
    """A word's regular inflections: enable -> enables, enabled, enabling; stop -> stopped, stopping."""
    forms = set()
    for w in words:
        forms |= {w, w + "s", w + "es", w + "ed", w + "ing"}
        if w.endswith("e"):
            forms |= {w + "d", w[:-1] + "ing"}
        if len(w) <= 4 and w[-1] not in "aeiouwy" and w[-2] in "aeiou":
            forms |= {w + w[-1] + "ed", w + w[-1] + "ing"}
    return forms


# -- polarity ----------------------------------------------------------------------------------------------------
# Marked dimensions: the marked pole ("off", "not", "without") must agree; its absence means the plain pole, so
# "set up 2FA" and "disable 2FA" differ.
_NEGATION = {"not", "no", "never", "cannot", "unable", "nothing", "none", "nobody", "neither", "nor", "unpaid",
             "unsupported", "unverified", "unavailable", "unsuccessful", "invalid", "inactive", "fail", "fails",
             "failed", "failing"}
_MARKED = {
    "negation": _NEGATION,
    "activation": _forms("disable", "deactivate") | {"off", "inactive"},
    "with": {"without"},
    "include": _forms("exclude") | {"excluding"},
}
# Contrasts: two or more poles, none the default; they differ only when both questions name a pole.
_CONTRASTS = {
    "activation": {"on": _forms("enable", "activate") | {"on", "active"},
                   "off": _forms("disable", "deactivate") | {"off", "inactive"}},
    "plan_change": {"up": _forms("upgrade"), "down": _forms("downgrade")},
    "membership": {"add": _forms("add", "invite"), "remove": _forms("remove") | {"removal"}},
    "transfer": {"in": _forms("import", "upload"), "out": _forms("export", "download")},
    "visibility": {"show": _forms("show", "unhide", "reveal") | {"shown", "visible"},
                   "hide": _forms("hide") | {"hidden", "invisible"}},
    "amount": {"up": _forms("increase", "raise") | {"higher", "more", "larger", "bigger"},
               "down": _forms("decrease", "lower", "reduce") | {"less", "fewer", "smaller"}},
    "access": {"allow": _forms("allow", "permit", "unblock"), "block": _forms("block", "prevent", "forbid")},
    "decision": {"yes": _forms("accept", "approve"), "no": _forms("decline", "reject", "deny") | {"denied"}},
    "running": {"start": _forms("start", "resume", "continue"), "stop": _forms("stop", "pause", "suspend")},
    "time": {"before": {"before", "prior", "earlier"}, "after": {"after", "later", "once"}},
    "period": {"month": {"monthly", "month-to-month"}, "year": {"annual", "annually", "yearly"}},
    "exposure": {"public": {"public", "publicly"}, "private": {"private", "privately"}},
    "session": {"in": {"login"}, "out": {"logout"}},
    "lock": {"lock": _forms("lock"), "unlock": _forms("unlock")},
    "archive": {"archive": _forms("archive"), "unarchive": _forms("unarchive", "restore")},
    "subscription": {"sub": _forms("subscribe", "join"), "unsub": _forms("unsubscribe", "leave", "opt-out")},
}
# "on" is mostly a preposition ("charged on Monday"): it is a pole only after a switching verb, as is "off"
# ("20% off" is a discount).
_SWITCH = re.compile(r"\b(?:turn|switch|toggle|shut|set|flip)(?:s|ed|ing)?\b(?:\s+\w+){0,4}?\s+(on|off)\b", re.I)

# -- dates -------------------------------------------------------------------------------------------------------
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december")
_MONTH_ABBREVIATIONS = {m[:3]: m for m in _MONTHS if m != "may"} | {"sept": "september"}
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_RELATIVE_DAYS = {"yesterday", "today", "tonight", "tomorrow", "weekend", "weekday", "weekdays"}
_RELATIVE = re.compile(r"\b(last|this|next|previous|current|coming)\s+(day|week|month|quarter|year)\b", re.I)

# -- names -------------------------------------------------------------------------------------------------------
# Sentence openers that are capitalised only because they open the sentence.
_OPENERS = {
    "how", "what", "why", "when", "where", "which", "who", "whom", "whose", "can", "could", "do", "does", "did",
    "is", "are", "was", "were", "will", "would", "should", "shall", "may", "might", "must", "have", "has", "had",
    "i", "my", "me", "we", "our", "you", "your", "the", "a", "an", "this", "that", "these", "those", "there",
    "it", "its", "if", "am", "any", "all", "please", "hi", "hello", "hey", "thanks", "ok", "so", "and", "but",
    "or", "also", "just", "still", "yes", "no", "not", "help", "send", "give", "add", "remove", "transfer",
    "update", "cancel", "resend", "track", "export", "import", "change", "refund", "delete", "show", "tell",
    "explain", "let", "make", "set", "get", "need", "want", "is", "in", "on", "at", "for", "from", "to", "with",
    "without", "after", "before", "since", "every", "each", "some", "where's", "what's", "who's", "how's",
}
_SENTENCE_END = re.compile(r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)[.!?:;]+\s+")


@dataclass(frozen=True, slots=True)
class Signature:
    """What a question must share with a cached one for its answer to apply."""

    marked: frozenset[str]  # marked polarity dimensions present ("negation", "activation", ...)
    poles: frozenset[tuple[str, str]]  # (contrast dimension, pole) pairs present
    codes: frozenset[str]  # numbers and ids, normalised ("48213", "inv-2024-0031", "9.99")
    currencies: frozenset[str]  # "usd", "eur", "gbp"
    dates: frozenset[str]  # months, weekdays, relative days ("last month")
    emails: frozenset[str]  # lower-cased addresses
    names: frozenset[str]  # proper nouns and acronyms, lower-cased ("sarah", "slack", "csv")
    words: frozenset[str]  # every lower-cased word, to look a name from the other question up in


def _normalised(text: str) -> str:
    text = text.replace("’", "'")
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    for pattern, replacement in _SYNONYMS:
        text = pattern.sub(replacement, text)
    text = _THOUSANDS.sub("", text)
    return _ORDINAL.sub(r"\1", text)


def _names(text: str) -> set[str]:
    names = set()
    for sentence in _SENTENCE_END.split(text):
        for position, token in enumerate(_TOKEN.findall(sentence)):
            if not token[0].isupper() or token == "I":
                continue
            if position == 0 and token.lower() in _OPENERS:
                continue
            names.add(token.lower())
    return names


def signature(text: str) -> Signature:
    """The signature of one question (any casing, punctuation and spacing)."""
    text = _normalised(text)
    emails = {e.lower() for e in _EMAIL.findall(text)}
    text = _EMAIL.sub(" ", text)
    currencies = {_CURRENCIES[c.lower()] for c in _CURRENCY.findall(text)}
    tokens = _TOKEN.findall(text)
    words = [t.lower() for t in tokens]
    word_set = set(words)

    marked = {dim for dim, markers in _MARKED.items() if dim != "activation" and word_set & markers}
    poles = set()
    for dim, by_pole in _CONTRASTS.items():
        if dim == "activation":
            continue
        for pole, markers in by_pole.items():
            if word_set & markers:
                poles.add((dim, pole))
    switched = {m.lower() for m in _SWITCH.findall(text)}
    activation_words = word_set - {"on", "off"} | switched
    if activation_words & _MARKED["activation"]:
        marked.add("activation")
    for pole, markers in _CONTRASTS["activation"].items():
        if activation_words & markers:
            poles.add(("activation", pole))

    codes = {w.replace(",", "") for w in words if any(c.isdigit() for c in w)}
    codes |= {_NUMBER_WORDS[w] for w in words if w in _NUMBER_WORDS}
    dates = {w for w in words if w in _MONTHS or w in _WEEKDAYS or w in _RELATIVE_DAYS}
    dates |= {_MONTH_ABBREVIATIONS[w] for w in words if w in _MONTH_ABBREVIATIONS}
    dates |= {f"{a.lower()} {b.lower()}" for a, b in _RELATIVE.findall(text)}
    if "may" in dates and not re.search(r"\bMay\b(?=\s+\d)|\d\s+May\b|\bin\s+May\b", text):
        dates.discard("may")  # "may I ..." is not a month
    return Signature(marked=frozenset(marked), poles=frozenset(poles), codes=frozenset(codes),
                     currencies=frozenset(currencies), dates=frozenset(dates), emails=frozenset(emails),
                     names=frozenset(_names(text) - dates - codes), words=frozenset(word_set))


def _pole_conflict(a: Signature, b: Signature) -> str | None:
    for dim in {d for d, _ in a.poles} & {d for d, _ in b.poles}:
        a_poles = {p for d, p in a.poles if d == dim}
        b_poles = {p for d, p in b.poles if d == dim}
        if a_poles != b_poles:
            return f"{dim}: {'/'.join(sorted(a_poles))} vs {'/'.join(sorted(b_poles))}"
    return None


def refusal(a: Signature, b: Signature) -> str | None:
    """Why the answer to one question must not be served for the other, or None when nothing known differs."""
    if a.marked != b.marked:
        return f"polarity: {', '.join(sorted(a.marked ^ b.marked))} in one question only"
    conflict = _pole_conflict(a, b)
    if conflict is not None:
        return f"polarity: {conflict}"
    if a.codes != b.codes:
        return f"numbers: {sorted(a.codes)} vs {sorted(b.codes)}"
    if a.currencies and b.currencies and a.currencies != b.currencies:
        return f"currency: {sorted(a.currencies)} vs {sorted(b.currencies)}"
    if a.dates != b.dates:
        return f"dates: {sorted(a.dates)} vs {sorted(b.dates)}"
    if a.emails != b.emails:
        return f"emails: {sorted(a.emails)} vs {sorted(b.emails)}"
    missing = sorted((a.names - b.words) | (b.names - a.words))
    if missing:
        return f"names: {', '.join(missing)} in one question only"
    return None


def refuse(question: str, cached_question: str) -> str | None:
    """`refusal` on two texts."""
    return refusal(signature(question), signature(cached_question))
