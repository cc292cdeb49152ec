"""A rule-based CheXpert-14 labeler (the default when CheXbert's weights are not at hand).

Mentions come from the CheXpert labeler's phrase lists (resources/chexpert_phrases, MIT, Stanford
ML Group; "_" marks a word boundary, otherwise a phrase matches as a substring) minus their
unmention lists. Each mention is classified in its sentence by scoped triggers in the manner of
NegEx, in the upstream order: uncertainty that contains a negation ("cannot be excluded") first,
then negation ("no", "without", "... is normal", "... has resolved"), then uncertainty ("may",
"possible", "suspicious for"). A trigger before a mention reaches to the end of its clause
("but", "which", ";" end a clause); one after it covers the next few words. Aggregation follows
upstream: positive if any mention is positive, else uncertain, else negative, else blank.
"No Finding" is 1 when no pathology is positive or uncertain and none of the other-finding
phrases (the no_finding list) is mentioned positively.

Output per report: {observation: 1 | 0 | -1} for the observations mentioned (blank = absent).
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

OBSERVATIONS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices"]
NOT_PATHOLOGY = {"No Finding", "Support Devices"}

# Our additions to the upstream unmention lists (plate-like atelectasis is not a metal plate).
EXTRA_UNMENTION = {"Support Devices": ["plate-like", "platelike", "plate like"]}

PRE_NEG_UNCERTAIN = [r"cannot be (?:excluded|ruled out)", r"can ?not be (?:excluded|ruled out)", r"not (?:be )?excluded",
                     r"not (?:be )?ruled out", r"cannot exclude", r"can ?not rule out", r"may not"]
NEGATION_BEFORE = [r"\bno\b", r"\bwithout\b", r"\bnegative for\b", r"\bfree of\b", r"\babsence of\b", r"\babsent\b",
                   r"\bresolution of\b", r"\bresolved\b", r"\bno evidence of\b", r"\bnot\b", r"\bclear of\b",
                   r"\brather than\b", r"\bexclude[sd]?\b"]
NEGATION_AFTER = [r"\b(?:is|are|appears?|remains?)?\s*(?:within )?normal\b", r"\bunremarkable\b", r"\b(?:has|have)? ?resolved\b",
                  r"\b(?:is|are) not (?:seen|present|identified|visualized)\b", r"\b(?:is|are) absent\b", r"\bnormal limits\b"]
UNCERTAIN_BEFORE = [r"\bmay\b", r"\bmight\b", r"\bcould\b", r"\bpossibl[ey]\b", r"\bprobabl[ey]\b", r"\blikely\b",
                    r"\bsuspicious for\b", r"\bsuspect", r"\bconcerning for\b", r"\bconcern for\b", r"\bsuggest",
                    r"\bquestion(?:able)? (?:of )?", r"\bversus\b", r"\bvs\.?\b", r"\bconsider", r"\bdifferential\b",
                    r"\bborderline\b", r"\bequivocal\b", r"\bcannot exclude\b", r"\bcan be seen with\b"]
UNCERTAIN_AFTER = [r"\b(?:is|are) (?:possible|suspected|questioned|likely)\b", r"\bcannot be (?:excluded|ruled out)\b",
                   r"\bnot (?:be )?excluded\b"]
CLAUSE_END = re.compile(r"\bbut\b|\bhowever\b|\balthough\b|\bwhich\b|\bexcept\b|\baside from\b|;")
AFTER_WINDOW = 4  # words after a mention that a following trigger may reach


def _load(kind: str) -> dict[str, list[str]]:
    folder = resources.files("m4cxr").joinpath(f"resources/chexpert_phrases/{kind}")
    out = {}
    for name in OBSERVATIONS:
        path = folder.joinpath(name.lower().replace(" ", "_") + ".txt")
        if path.is_file():
            out[name] = [p.strip().lower() for p in path.read_text().splitlines() if p.strip()]
    return out


def _pattern(phrase: str) -> re.Pattern:
    body = re.escape(phrase.strip("_")).replace(r"\ ", r"\s+")
    return re.compile((r"\b" if phrase.startswith("_") else "") + body + (r"\b" if phrase.endswith("_") else ""))


@lru_cache(maxsize=1)
def phrase_patterns() -> tuple[dict, dict]:
    mention = {k: [_pattern(p) for p in v] for k, v in _load("mention").items()}
    unmention = {k: [_pattern(p) for p in v] for k, v in _load("unmention").items()}
    for k, extra in EXTRA_UNMENTION.items():
        unmention.setdefault(k, []).extend(_pattern(p) for p in extra)
    return mention, unmention


def sentences(report: str) -> list[str]:
    text = re.sub(r"(?m)^\s*\d+\.\s+", " ", report.lower())  # list numbering
    text = re.sub(r"\s\d+\.\s+(?=[a-z])", ". ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def _any(patterns: list[str], text: str) -> bool:
    return any(re.search(p, text) for p in patterns)


def classify(sentence: str, start: int, end: int) -> int:
    """1, 0 or -1 for the mention at sentence[start:end]."""
    clause_start = max((m.end() for m in CLAUSE_END.finditer(sentence, 0, start)), default=0)
    next_end = CLAUSE_END.search(sentence, end)
    clause_end = next_end.start() if next_end else len(sentence)
    before = sentence[clause_start:start]
    after = " ".join(sentence[end:clause_end].split()[:AFTER_WINDOW])
    if _any(PRE_NEG_UNCERTAIN, after) or _any(PRE_NEG_UNCERTAIN, before):
        return -1
    if _any(NEGATION_BEFORE, before) or _any(NEGATION_AFTER, after):
        return 0
    if _any(UNCERTAIN_BEFORE, before) or _any(UNCERTAIN_AFTER, after):
        return -1
    return 1


def mentions(sentence: str, observation: str) -> list[tuple[int, int]]:
    mention, unmention = phrase_patterns()
    blocked = [m.span() for p in unmention.get(observation, []) for m in p.finditer(sentence)]
    spans = []
    for p in mention.get(observation, []):
        for m in p.finditer(sentence):
            if not any(b0 <= m.start() < b1 or m.start() <= b0 < m.end() for b0, b1 in blocked):
                spans.append(m.span())
    return spans


def label_report(report: str) -> dict[str, int]:
    found: dict[str, list[int]] = {}
    for sentence in sentences(report):
        for obs in OBSERVATIONS:
            for start, end in mentions(sentence, obs):
                found.setdefault(obs, []).append(classify(sentence, start, end))
    labels: dict[str, int] = {}
    for obs, values in found.items():
        if obs == "No Finding":
            continue
        labels[obs] = 1 if 1 in values else -1 if -1 in values else 0
    other_findings = 1 in found.get("No Finding", [])
    if not other_findings and not any(v in (1, -1) for k, v in labels.items() if k not in NOT_PATHOLOGY):
        labels["No Finding"] = 1
    return labels


def label_reports(reports: list[str]) -> list[dict[str, int]]:
    return [label_report(r) for r in reports]
