"""A rule-based CheXpert-14 labeler (the default when CheXbert's weights are not at hand).

Mentions come from the CheXpert labeler's phrase lists (resources/chexpert_phrases, MIT, Stanford
ML Group; "_" marks a word boundary, otherwise a phrase matches as a substring) minus their
unmention lists, plus a few additions of our own (EXTRA_MENTION, EXTRA_UNMENTION).

Most mentions name a finding ("cardiomegaly", "effusion"). Some name only a structure ("heart
size", "cardiac silhouette", "mediastinum"): such a mention says something abnormal only when its
clause calls the structure enlarged, widened or prominent ("the heart is mildly enlarged"); when
it does not ("heart size and mediastinal contour are within normal limits", "stable heart size")
the mention is negative.

Each mention is then classified in its clause by scoped triggers in the manner of NegEx, in the
upstream order: uncertainty that contains a negation ("cannot be excluded") first, then negation
("no", "without", "... is normal", "... has resolved"), then uncertainty ("may", "possible",
"suspicious for", "the differential includes"). A trigger before a mention reaches back to the
start of its clause ("but", "which", ";" end a clause); one after it reaches the end of the
mention's phrase ("with", "which", a comma, or a few words). A mention that names a sign rather
than the finding ("vascular congestion" for edema) is at most uncertain; an acute finding named as
past ("prior pneumonia") is negative. Aggregation follows upstream: positive if any mention is
positive, else uncertain, else negative, else blank.

Some conventions follow the expert labels of real reports (benchmarks/labeler_agreement.py)
rather than the CheXpert labeler: "borderline cardiomegaly" is positive; so are findings named as
alternatives ("atelectasis or scarring", "atelectasis versus infiltrate") and as probable
("probable small effusion"); and "No Finding" is 1 only when the report names nothing abnormal:
no pathology positive or uncertain and none of the other-finding phrases (the no_finding list and
ours: degenerative spine, low lung volumes, granulomas, ...) positive. Support devices alone keep
"No Finding", as in CheXpert.

Output per report: {observation: 1 | 0 | -1} for the observations mentioned (blank = absent).
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

from m4cxr.tasks import chexbert_labels

OBSERVATIONS = chexbert_labels()  # the 14 CheXpert observations (resources/tasks.yaml)
NOT_PATHOLOGY = {"No Finding", "Support Devices"}

# Our additions to the upstream mention lists.
EXTRA_MENTION = {
    "Cardiomegaly": ["heart enlargement", "_heart_"],
    "Pneumonia": ["pneumonitis"],
    # abnormal findings outside the 14 observations: a report naming one is not "No Finding"
    "No Finding": ["scar", "cicatri", "fibros", "granulomatous", "nodul", "tortuous", "tortuosity", "ectasia",
                   "spondyl", "osteophyt", "spur", "syndesmophyt", "_fusion", "sternotomy", "postoperative",
                   "post-operative", "hiatal", "bronchiectasis", "emphysematous", "low lung volume", "low volume",
                   "hypoinflat", "hyperexpan", "hyperaerat", "crowding", "elevated", "lucen"],
}
# Our additions to the upstream unmention lists: plate-like atelectasis is not a metal plate;
# swelling of the soft tissues is not pulmonary edema; healed granulomatous disease is not pneumonia.
EXTRA_UNMENTION = {
    "Support Devices": ["plate-like", "platelike", "plate like"],
    "Cardiomegaly": ["heart failure"],
    "Edema": ["soft tissue edema", "subcutaneous edema"],
    "Pneumonia": ["granulomatous infection", "postinfectious", "post-infectious", "post infectious"],
    "Consolidation": ["nonconsolidat", "non-consolidat"],
}

# Mentions that name a structure, not a finding, and the words that make them a finding.
STRUCTURE_MENTIONS = {
    "Cardiomegaly": {"the heart", "heart size", "cardiac size", "cardiac shadow", "cardiac contour",
                     "cardiac silhouette", "_heart_"},
    "Enlarged Cardiomediastinum": {"_mediastinum", "cardiomediastinum", "contour", "mediastinal configuration",
                                   "mediastinal silhouette", "pericardial silhouette", "cardiac silhouette and vascularity"},
}
# Mentions that name a sign pointing to the observation, not the observation itself: at most
# uncertain ("pulmonary vascular congestion" is not yet edema).
SIGN_MENTIONS = {"Edema": {"heart failure", "chf", "vascular congestion", "pulmonary congestion", "indistinctness",
                           "vascular prominence"}}
ABNORMAL_SIZE = re.compile(r"\benlarg|\blarge\b|\blarger\b|\bincreas|\bprominen|\bborderline\b|\bwiden|\bdilat"
                           r"|\bcardiomegaly\b|\bglobular\b|\bexaggerated\b")
# the structure's phrase ends here ("heart size is normal with enlarged ...", "stable heart size,
# enlarged aorta"); "heart and mediastinum are enlarged" goes on
STRUCTURE_PHRASE_END = re.compile(r"\bwith\b|\bwithout\b|,|\band\b(?! mediastin| cardiomediastin| pulmonary vascul)")
STRUCTURE_REACH_BEFORE = 3  # words before a structure in which its abnormal-size word may stand ("mildly enlarged heart")
STRUCTURE_REACH_AFTER = 8   # words after it ("the cardiac silhouette is at least moderately enlarged")

PRE_NEG_UNCERTAIN = [r"cannot be (?:excluded|ruled out)", r"can ?not be (?:excluded|ruled out)", r"not (?:be )?excluded",
                     r"not (?:be )?ruled out", r"cannot exclude", r"can ?not rule out", r"may not",
                     r"\bdifficult to exclude\b", r"\bno new\b"]
NEGATION_BEFORE = [r"\bno\b", r"\bwithout\b", r"\bnegative for\b", r"\bfree of\b", r"\babsence of\b", r"\babsent\b",
                   r"\bresolution of\b", r"\bresolved\b", r"\bno evidence of\b", r"\bnot\b", r"\bclear of\b",
                   r"\brather than\b", r"\bexclude[sd]?\b", r"\bno longer\b", r"\bnor\b"]
NEGATION_AFTER = [r"\b(?:is|are|appears?|remains?)?\s*(?:within )?normal\b", r"\bunremarkable\b", r"\b(?:has|have)? ?resolved\b",
                  r"\b(?:is|are|was|were) not\b", r"\b(?:is|are) absent\b", r"\bnormal limits\b",
                  r"\b(?:is|are|has|have) (?:no longer|not been) (?:seen|present|identified|visualized)\b"]
UNCERTAIN_BEFORE = [r"\bmay\b", r"\bmight\b", r"\bcould\b", r"\bpossibl[ey]\b", r"\bquestion(?:able)? (?:of )?",
                    r"\bconsider(?:ed)?\b", r"\bdifferential\b", r"\bequivocal\b", r"\bcannot exclude\b",
                    r"\bcan be seen with\b", r"\bsuspicious for\b", r"\bconcerning for\b", r"\bconcern for\b",
                    r"\bworrisome for\b", r"\bsuggest", r"\bsuspect"]
UNCERTAIN_AFTER = [r"\b(?:is|are) (?:possible|suspected|questioned)\b", r"\bcannot be (?:excluded|ruled out)\b",
                   r"\bnot (?:be )?excluded\b", r"\bsuspected\b"]
# An acute finding of the past, just before its mention ("prior tuberculous infection", "previous
# pneumonia"): negative, it is not there now. (A healed fracture or an old granuloma still is.)
ACUTE = {"Pneumonia", "Edema", "Pneumothorax"}
HISTORY_BEFORE = re.compile(r"\b(?:prior|previous|old|remote|healed|history of)\b")
HISTORY_REACH = 4  # words before a mention
CLAUSE_END = re.compile(r"\bbut\b|\bhowever\b|\balthough\b|\bwhich\b|\bexcept\b|\baside from\b|;")
AFTER_END = re.compile(r"\bwith\b|\bwithout\b|\bwhich\b|\bthat\b|,")  # a phrase ends here for triggers after a mention
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
    """{observation: [(pattern, kind)]} of mentions, kind "finding", "structure" or "sign";
    {observation: [pattern]} of unmentions."""
    phrases = _load("mention")
    for name, extra in EXTRA_MENTION.items():
        phrases.setdefault(name, []).extend(extra)
    mention = {name: [(_pattern(p), _kind(name, p)) for p in v] for name, v in phrases.items()}
    unmention = {k: [_pattern(p) for p in v] for k, v in _load("unmention").items()}
    for k, extra in EXTRA_UNMENTION.items():
        unmention.setdefault(k, []).extend(_pattern(p) for p in extra)
    return mention, unmention


def _kind(observation: str, phrase: str) -> str:
    """What a mention phrase names: a "structure", a "sign" of the observation, or the "finding"."""
    if phrase in STRUCTURE_MENTIONS.get(observation, ()):
        return "structure"
    return "sign" if phrase in SIGN_MENTIONS.get(observation, ()) else "finding"


def sentences(report: str) -> list[str]:
    text = re.sub(r"(?<=[a-z])\.(?=[A-Z])", ". ", report)  # "enlarged.There": a missing space
    text = re.sub(r"(?m)^\s*\d+\.\s+", " ", text.lower())  # list numbering
    text = re.sub(r"\s\d+\.\s+(?=[a-z])", ". ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def _first(patterns: list[str], text: str) -> str | None:
    """The first of the patterns found in text, or None."""
    return next((p for p in patterns if re.search(p, text)), None)


def _clause(sentence: str, start: int, end: int) -> tuple[int, int]:
    clause_start = max((m.end() for m in CLAUSE_END.finditer(sentence, 0, start)), default=0)
    next_end = CLAUSE_END.search(sentence, end)
    return clause_start, next_end.start() if next_end else len(sentence)


def _phrase_after(sentence: str, end: int, clause_end: int) -> str:
    stop = AFTER_END.search(sentence, end, clause_end)
    return " ".join(sentence[end:stop.start() if stop else clause_end].split()[:AFTER_WINDOW])


def explain(sentence: str, start: int, end: int, acute: bool = False) -> tuple[int, str]:
    """The label of the finding mentioned at sentence[start:end] and the trigger that decided it;
    `acute`: a finding that the past tense negates (ACUTE)."""
    clause_start, clause_end = _clause(sentence, start, end)
    before = sentence[clause_start:start]
    after = _phrase_after(sentence, end, clause_end)
    just_before = " ".join(before.split(",")[-1].split()[-HISTORY_REACH:]) if acute else ""
    for value, where, patterns in ((-1, after, PRE_NEG_UNCERTAIN), (-1, before, PRE_NEG_UNCERTAIN),
                                   (0, just_before, [HISTORY_BEFORE.pattern]),
                                   (0, before, NEGATION_BEFORE), (0, after, NEGATION_AFTER),
                                   (-1, before, UNCERTAIN_BEFORE), (-1, after, UNCERTAIN_AFTER)):
        trigger = _first(patterns, where)
        if trigger:
            return value, trigger
    return 1, ""


def classify(sentence: str, start: int, end: int, acute: bool = False) -> int:
    """1, 0 or -1 for the finding mentioned at sentence[start:end]."""
    return explain(sentence, start, end, acute)[0]


def classify_structure(sentence: str, start: int, end: int) -> int:
    """1, 0 or -1 for a structure named at sentence[start:end] ("heart size"): negative unless its
    clause calls it enlarged (before it: "enlarged heart"; after it, before "with": "the heart is
    enlarged"), and then classified as the finding from the structure to that word."""
    clause_start, clause_end = _clause(sentence, start, end)
    stop = STRUCTURE_PHRASE_END.search(sentence, end, clause_end)
    words_after = list(re.finditer(r"\S+", sentence[:stop.start() if stop else clause_end]))
    words_after = [w for w in words_after if w.start() >= end][:STRUCTURE_REACH_AFTER]
    found = ABNORMAL_SIZE.search(sentence, end, words_after[-1].end()) if words_after else None
    if found:
        between = sentence[end:found.start()]
        if re.search(r"\bnot\b|\bno\b|\bnormal\b", between):  # "is not enlarged", "no longer enlarged"
            return 0
        if _first(UNCERTAIN_BEFORE, between):  # "the heart may be enlarged"
            return -1
        return classify(sentence, start, found.end())
    before_words = sentence[clause_start:start].split()[-STRUCTURE_REACH_BEFORE:]
    if ABNORMAL_SIZE.search(" ".join(before_words)):
        return classify(sentence, start, end)
    return 0


def classify_mention(sentence: str, start: int, end: int, kind: str, observation: str) -> int:
    if kind == "structure":
        return classify_structure(sentence, start, end)
    value = classify(sentence, start, end, acute=observation in ACUTE)
    return -1 if kind == "sign" and value == 1 else value


def mentions(sentence: str, observation: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of each mention of the observation in the sentence."""
    mention, unmention = phrase_patterns()
    blocked = [m.span() for p in unmention.get(observation, []) for m in p.finditer(sentence)]
    spans = []
    for pattern, kind in mention.get(observation, []):
        for m in pattern.finditer(sentence):
            if not any(b0 <= m.start() < b1 or m.start() <= b0 < m.end() for b0, b1 in blocked):
                spans.append((m.start(), m.end(), kind))
    return spans


def label_report(report: str) -> dict[str, int]:
    found: dict[str, list[int]] = {}
    for sentence in sentences(report):
        for obs in OBSERVATIONS:
            for start, end, kind in mentions(sentence, obs):
                found.setdefault(obs, []).append(classify_mention(sentence, start, end, kind, obs))
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
