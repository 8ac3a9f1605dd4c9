"""Questions built from one template: a long instruction shared word for word, and a short part that differs
(the ticket to classify, the text to translate). Their embeddings are close because the shared part dominates
them, so the semantic cache compares the parts that differ instead (semantic.py)."""
from __future__ import annotations

TEMPLATE_MIN_SHARED_WORDS = 8  # fewer shared words than this: an ordinary question, compared whole
TEMPLATE_MIN_SHARED_SHARE = 0.5  # the shared words must be at least this share of the shorter question


def differing_parts(question: str, cached: str) -> tuple[str, str] | None:
    """The two questions' parts that differ, once their common leading and trailing words are set aside; None
    when they do not share a template (too few words in common)."""
    a, b = question.split(), cached.split()
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    shared = prefix + suffix
    if shared < TEMPLATE_MIN_SHARED_WORDS or shared < TEMPLATE_MIN_SHARED_SHARE * min(len(a), len(b)):
        return None
    # NOTE: the template ends where a sentence or a label ends ("... only. Ticket: <payload>"): the payload keeps
    # the words after that boundary, which give its short text the sense it has in the question
    while prefix > 0 and not a[prefix - 1].endswith((".", ":", "?", "!", ";")):
        prefix -= 1
    return " ".join(a[prefix:len(a) - suffix]), " ".join(b[prefix:len(b) - suffix])
