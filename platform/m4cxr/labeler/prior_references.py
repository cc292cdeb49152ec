"""Removing references to prior studies from report text, keeping the findings and their labels.

A model trained on reports that say "Stable cardiomegaly", "compared to the prior study" or
"Interval resolution of ..." learns to describe comparisons with a prior study it was never
shown. CXR-PRO (Ramesh et al. 2022, "Improving radiology report generation systems by removing
hallucinated references to non-existent priors") showed that rewriting the training reports to
remove such references reduces these hallucinations; we do the same, with rules, for the report
targets of scenarios that have no prior study.

Each sentence that speaks of an earlier study is rewritten:
  - a sentence that only compares goes ("No interval change.", "Comparison: XXXX.");
  - comparison clauses go ("..., compared to the prior study", "since the last exam");
  - a finding stated through a change keeps the finding: "Stable moderate cardiomegaly." becomes
    "Moderate cardiomegaly.", "The left pleural effusion has increased." becomes "Left pleural
    effusion.", "New small effusion." becomes "Small effusion.";
  - a resolved finding is a negative finding: "Interval resolution of the left pleural effusion."
    becomes "No left pleural effusion." (its label 0 is kept).
Untouched sentences, case and punctuation are kept as they are.

The CheXpert-14 labels of the report must not change. A rewritten sentence is accepted only when
the report's labels with it (and the sentences accepted before it) equal the original report's;
otherwise the sentence is kept as written and counted in `kept_for_labels`. The labeler is a
parameter (default: the rule labeler).

Choices about words that do not always speak of a prior study:
  - "prior"/"previous" name a study only before a study word ("prior exam", "previous chest
    radiograph", "prior XXXX") or at the end of a comparison ("compared with prior."); before a
    disease or procedure they are history and are kept ("prior granulomatous disease", "previous
    sternotomy", "prior CABG");
  - "increased"/"decreased" before a noun describe density or volume, not change ("increased
    opacity", "decreased lung volumes"); as a change ("has increased", "increase in size",
    "increased since ...", "increasing") they are comparisons;
  - "stable" after "hemodynamically"/"clinically" is the patient's state; "worse than the left"
    and "compared to the left" compare sides, not studies;
  - "new", "newly placed", "persistent", "again", "redemonstrated", "remains", "no longer",
    "interval", "since", "unchanged", "resolved", "improving", "worsening" all imply a prior study;
  - "old", "chronic", "residual", "known", "healed" speak of the patient's history and are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from m4cxr.labeler.rules import label_report

I = re.IGNORECASE

# ----------------------------------------------------------------------------- what a prior study is

# the nouns that name a study ("XXXX" is the anonymisation token, in these reports mostly a date or "CT")
STUDY_WORD = (r"(?:stud(?:y|ies)|exams?|examinations?|radiographs?|radiography|films?|images?|imaging|"
              r"x-(?:XXXX|rays?)|CTs?(?:\s+(?:scans?|chest))?|scans?|views?|ones?|comparisons?|"
              r"chest(?:\s+(?:x-XXXX|x-rays?|radiographs?|films?|CT|XXXX))?|XXXX)")
PRIOR_WORD = r"(?:prior|previous|preceding|earlier|last|comparison|most\s+recent|recent\s+prior)"
DATE = r"(?:XXXX|\d[\d/\-.]*)(?:,?\s+(?:XXXX|\d[\d/\-.]*))*"
# a reference to an earlier study: "the prior exam", "previous chest radiograph of XXXX", "prior."
STUDY = (rf"(?:(?:the|a|an|this|that|these|those)\s+)?(?:(?:multiple|several|numerous|all|two|2|outside|remote)\s+)?(?:XXXX\s+)?{PRIOR_WORD}"
         rf"(?:\s+(?:outside|portable|frontal|PA(?:\s+and\s+lateral)?|lateral|two-view|2-view|radiographic|chest))*"
         rf"(?:\s+{STUDY_WORD}(?:\s+{STUDY_WORD})?(?:\s+(?:of|from|dated|on|in|performed\s+on)\s+{DATE})?"
         rf"|(?=\s*(?:[,.;:)]|$|\s(?:and|with|without|which|but|or|is|are|in|of|exam)\b)))")
# a study named by its date: "the exam of XXXX", "CT from XXXX"
DATED_STUDY = rf"(?:(?:the|a|an)\s+)?(?:\w+\s+)?{STUDY_WORD}\s+(?:of|from|dated|on)\s+{DATE}"
SIDE = r"(?:the\s+)?(?:left|right|contralateral|other\s+side|opposite|normal)\b"

PRIOR_REFERENCE = re.compile(
    r"\b(?:"
    rf"(?:compared|comparing|comparison)\b(?!\s+(?:to|with)\s+{SIDE})"
    rf"|{PRIOR_WORD}\s+(?:(?:outside|portable|frontal|PA|lateral|radiographic|chest)\s+)*{STUDY_WORD}\b"
    rf"|(?:on|from|to|with|than|since|versus|vs|and)\s+(?:the\s+)?(?:prior|previous|earlier)(?=\s*(?:[,.;:)]|$))"
    r"|previously\b(?!\s+(?:treated|resected|operated|diagnosed|known)\b)"
    r"|unchanged|(?:no|significant|interval|appreciable|gross|relevant)\s+(?:(?:significant|interval|appreciable|gross|"
    r"relevant|substantial|radiographic|definite)\s+)*change\b|(?:has|have|had)\s+(?:not\s+)?changed"
    r"|interval|in\s+the\s+interim"
    r"|stable\b(?<!hemodynamically stable)(?<!clinically stable)"
    r"|new(?:ly)?\b"
    r"|again\b|re-?demonstrat\w*|persist\w*|remain(?:s|ed)?\b|continue[sd]?\s+to\b|still\b|no\s+longer\b"
    r"|resolv(?:ed|ing)|resolution\s+of"
    r"|worsen\w*|worse\b(?!\s+(?:(?:on|in|at)\s+the\s+)?(?:than\s+)?(?:on\s+)?(?:the\s+)?(?:left|right))|improv\w*"
    r"|increasing|decreasing|progress(?:ed|ion|ing)\b|enlarging|developing"
    r"|(?:has|have|had)\s+(?:\w+\s+)?(?:increased|decreased|enlarged|developed|grown|progressed)"
    r"|(?:increase|decrease|reduction)\s+in\b|(?:increased|decreased)\s+(?:in\s+size|size|since|from)"
    r"|similar\s+(?:to|in\s+appearance|appearance)|as\s+before|dating\s+back|since\b|now\b"
    r")", I)


def mentions_prior(text: str) -> bool:
    """Whether the text speaks of an earlier study (or of a change since one)."""
    return bool(PRIOR_REFERENCE.search(text or ""))


# ----------------------------------------------------------------------------- sentences, case kept

# a sentence ends at ".", "!" or "?" before white space, or at a line break
_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\s*\n\s*|(?<=[a-z]\.)(?=[A-Z][a-z])")
_LIST_NUMBER = re.compile(r"^\s*\d{1,2}[.)]$")


def split_sentences(text: str) -> tuple[list[str], list[str]]:
    """The sentences of the text and the gaps around them: text == gaps[0] + s[0] + gaps[1] + ...
    + s[-1] + gaps[-1]. A list number ("2.") stays with the sentence it numbers."""
    sentences, gaps = [], []
    start = len(text) - len(text.lstrip())
    gaps.append(text[:start])
    pos = start
    for m in _BOUNDARY.finditer(text, start):
        if m.start() <= pos or _LIST_NUMBER.match(text[pos:m.start()]):
            continue
        sentences.append(text[pos:m.start()])
        gaps.append(m.group())
        pos = m.end()
    body = text[pos:].rstrip()
    if body:
        sentences.append(body)
        gaps.append(text[pos + len(body):])
    elif not sentences:
        gaps.append(text[pos:])
    else:
        gaps[-1] += text[pos:]
    return sentences, gaps


def join_sentences(sentences: list[str | None], gaps: list[str]) -> str:
    """The text again, without the sentences set to None. Between two kept sentences stands the
    widest of the gaps that were between them (a paragraph break is kept over a space)."""
    kept = [i for i, s in enumerate(sentences) if s is not None]
    if not kept:
        return ""
    text = gaps[0] + sentences[kept[0]]
    for a, b in zip(kept, kept[1:]):
        text += max(gaps[a + 1:b + 1], key=lambda g: g.count("\n")) + sentences[b]
    return text + gaps[-1]


# ----------------------------------------------------------------------------- the rewrite rules

ADV = (r"(?:(?:slightly|mildly|minimally|markedly|significantly|substantially|somewhat|grossly|essentially|"
       r"relatively|largely|overall|otherwise|probably|likely|apparently|radiographically|also|very|only|"
       r"fairly|not\s+significantly|not|now)\s+)")
CHANGE_ADJ = (r"(?:stable|unchanged|persistent|persisting|new|increasing|decreasing|worsening|improving|improved|"
              r"worsened|progressive|progressing|enlarging|resolving|developing|continued|similar)")
# a change stated of what precedes: "..., unchanged", "is slightly more prominent", "increased in size"
COMPARATIVE = (rf"(?:(?:is|are|was|were|appears?|seems?|looks?|has|have|may\s+be|be)\s+)?(?:(?:been|become)\s+)?{ADV}*"
               r"(?:unchanged|stable|different|changed|similar|improved|worse|better|increased|decreased|larger|"
               r"smaller|(?:more|less)\s+\w+|progressed|enlarged|XXXX)(?:\s+in\s+(?:size|appearance|extent|position))?"
               rf"(?:\s+{ADV}*)?(?:\s+XXXX)?")
# the end of a phrase: punctuation, the end, or a word that starts another phrase
PHRASE_END = (r"(?=\s*(?:[,;:.)]|$)|\s+(?:without|with|and|but|which|however|although|otherwise|consistent|"
              r"compatible|suggest\w*|may|likely|most|no|or|allowing|given|XXXX\s+represent\w*|now|measuring)\b)")
CHANGE_NOUN = r"(?:increase|decrease|improvement|worsening|progression|reduction|clearing)"
CHANGE_NOUN_ADJ = (r"(?:(?:slight|mild|moderate|marked|significant|apparent|minimal|further|continued|interval|"
                   r"substantial|gradual|small|large|overall|some|definite|gross)\s+)")
INTERVAL = r"(?<!appropriate )(?<!short )(?<!short-)\binterval\b(?!\s+follow)"
# words that say nothing of their own once the comparison is gone ("Stable appearance of the chest.")
FILLER = (r"(?:the|a|an|this|that|these|those|it|they|there|is|are|was|were|has|have|been|appears?|seems?|"
          r"looks?|also|otherwise|essentially|grossly|overall|largely|findings?|exam(?:ination)?|study|chest|"
          r"radiographs?|radiographic|view|appearance|of|x-XXXX|x-ray|film|and|in|position|"
          r"as|well|both|which|we|note|noted|seen|see|above|aside|from|to|on|with|it|"
          r"cardiopulmonary|volumes?|aeration|inflation|expansion|bilaterally|given|technique|remainder)")
EMPTY = re.compile(rf"^(?:\W|\d+|{FILLER}\b)*$", I)
# A structure named only to be called stable ("The mediastinum is stable.") keeps its name: the
# labelers read a named structure that is not called enlarged as normal, so dropping it would drop
# that label, and anything more than its name would be invented.
STRUCTURE = (r"(?:heart|cardiac|cardio|cardiomediastinal|mediastinal|hilar|hila|hilum|mediastinum|silhouettes?|"
             r"contours?|size|lungs?|pulmonary|vasculature|vascularity|osseous|bony|structures?|soft|tissues?|"
             r"visualized|thorax|configuration|paramediastinal|superior|aorta)")
STRUCTURE_ONLY = re.compile(rf"^(?:\W|{FILLER}\b|{STRUCTURE}\b)*$", I)
TRAILING_VERB = re.compile(r"(?:\s+(?:is|are|was|were|has|have|appears?|seems?|looks?|been|given|the|lung|volumes?|"
                           r"technique|in|and|with))+\s*$", I)
ONLY_XXXX = re.compile(r"^(?:\W|XXXX|\d+|is|are|this|it|the|since|and|of)*$", I)
VERB = re.compile(r"\b(?:is|are|was|were|has|have|had|appears?|shows?|demonstrates?|seen|noted|present|measur\w*|"
                  r"project\w*|terminat\w*|overl\w*|extends?|courses?|represents?|suggest\w*|may|can|could|"
                  r"identified|visualized|evident|unremarkable|normal|clear)\b", I)
FINITE = re.compile(r"\b(?:is|are|was|were|has|have|had|appears?|shows?|demonstrates?|measures?|projects?|terminates?|"
                    r"overlies|extends?|may|can|could|represents?)\b", I)
# sentences that ask for a comparison rather than report one: left as written
REQUEST = re.compile(r"\b(?:recommend\w*|consider|suggest\s+(?:reference|comparison)|correlat\w*|"
                     r"(?:would|may)\s+be\s+(?:helpful|useful|of)|if\s+(?:available|possible|there\s+(?:are|is))|"
                     r"if\s+no|no\s+films\s+were)\b", I)


def _sub(pattern: str, repl):
    return re.compile(pattern, I), repl


def _no(m: re.Match) -> str:
    """ "No <finding>" for a resolved or removed finding, without its article or "previously seen"."""
    finding = re.sub(r"^(?:\W+|(?:the|a|an|previously\s+\w+|previous|prior|known|interval)\s+)+", "",
                     m.group("f"), flags=I)
    if re.match(r"[A-Z][a-z]", finding):
        finding = finding[0].lower() + finding[1:]
    return "no " + finding


def _there_is(m: re.Match) -> str:
    return "there are " if m.group(0).lower().rstrip().endswith("are") else "there is "


def _present(m: re.Match) -> str:
    return "are present" if m.group(1).lower() == "have" else "is present"


def _keep_verb(m: re.Match) -> str:
    """ "X are unchanged from prior and within normal limits": the verb stays before an adjective,
    "X are unchanged from prior and indicate ...": it goes before a verb."""
    verb, following = m.group(1), m.group(2)
    if re.match(r"(?:within|normal|unremarkable|clear|intact|in\s)", following, I):
        return f" {verb} "
    return " "


# Rules in order, each (pattern, replacement) applied to the sentence without its final punctuation.
RULES = [
    # sentences that only compare ("Comparison: XXXX.", "No comparison chest x-XXXX.")
    _sub(r"^(?:\w+\s+)?(?:no\s+)?comparisons?\s*(?::\s*)?(?:(?:XXXX|\d[\d/.\-]*|none|chest|x-XXXX|stud(?:y|ies)|exams?|"
         r"examinations?|prior|previous|available|is|are|made|to|with|the|radiographs?|films?|of|and|from|dated|"
         r"CT|PA|lateral|views?|two|2)\b[\s,.:]*)*(?=(?-i:[A-Z][a-z])|$)", ""),
    _sub(r"^(?:\w+\s+)?comparisons?\s+(?:to|with|is\s+made)\b.*$", ""),
    _sub(r"^(?:without|in\s+the\s+absence\s+of|no)\s+(?:an?\s+|any\s+)?(?:prior\s+|previous\s+)?comparisons?(?:\s+\w+)?\s*,\s*", ""),
    _sub(r",?\s*(?:as|since|because)\s+no\s+(?:prior|previous|comparison)\s+\w+\s+(?:are|is)\s+available(?:\s+for\s+comparison)?", ""),
    _sub(r"^on\s+(?:" + STUDY + "|" + DATED_STUDY + r")(?:\s*\([^)]*\))?\s*,.*$", ""),  # what a prior study showed
    # leading comparison clause: "Compared to the previous radiograph, ..."; "Since the prior exam, ..."
    _sub(r"^(?:as\s+|when\s+)?(?:compared|in\s+comparison)\s+(?:to|with)\s+[^,]*,\s*", ""),
    _sub(r"^(?:since|from)\s+(?:" + STUDY + "|" + DATED_STUDY + r"|XXXX)\s*,\s*", ""),
    _sub(r"^(?:in\s+the\s+(?:interval|interim))\s*,?\s*", ""),
    # "not seen on the prior": saying the finding is new; the whole clause goes
    _sub(r"\s*\([^()]*\b(?:prior|previous|comparison)\b[^()]*\)", ""),
    _sub(r"^(this|these|it|they)\s+(?:was|were|is|are)\s+not\s+(?:\w+\s+){0,4}?(?:on|in)\s+" + STUDY + r"(?:\s+and\s+|$)",
         r"\1 "),
    _sub(r",?\s*\(?(?:(?:which|that|and)\s+)?(?:(?:is|are|was|were|does|do|did|has|have)\s+)?not\s+(?:\w+\s+){0,5}?"
         r"(?:on|in|from)\s+(?:" + STUDY + "|" + DATED_STUDY + r")\)?" + PHRASE_END, ""),
    # "X are unchanged from prior and within normal limits"
    _sub(r"\s+(is|are|appears?|appear)\s+" + ADV + r"*(?:unchanged|stable|similar)\s+(?:(?:from|to|since|compared\s+"
         r"(?:to|with))\s+(?:" + STUDY + "|" + DATED_STUDY + r"|XXXX))\s+and\s+(?=(\w+\s?))", _keep_verb),
    # comparison tails: "..., compared to the prior study", "unchanged from prior exam", "since XXXX"
    _sub(r",?\s*(?:(?:and|which|that|but)\s+)?(?:" + COMPARATIVE + r"\s+)?(?:(?:as|when)\s+)?(?:compared|in\s+comparison|"
         r"comparison)\s+(?:to|with)\s+(?!" + SIDE + r")(?:" + STUDY + "|" + DATED_STUDY + r"|[^,;]*?)" + PHRASE_END, ""),
    _sub(r",?\s*(?:(?:and|which|that)\s+)?(?:(?:is|are|was|were)\s+)?(?:also\s+|as\s+|well\s+|better\s+|more\s+readily\s+)*"
         r"(?:seen|noted|present|visible|evident|demonstrated|identified|appreciated|visualized|described|shown|"
         r"characterized|depicted)\s+(?:well\s+)?(?:on|in|at)\s+(?:" + STUDY + "|" + DATED_STUDY + r")" + PHRASE_END, ""),
    _sub(r",?\s*(?:(?:and|which|that)\s+)?(?:" + COMPARATIVE + r"\s+)?(?:(?:has|have)\s+been\s+(?:present\s+)?)?"
         r"since\s+[^,;]*?" + PHRASE_END, ""),
    _sub(r",?\s*(?:(?:and|which|that)\s+)?(?:(?:is|are)\s+)?dating\s+back\s+to\s+[^,;]*?" + PHRASE_END, ""),
    _sub(r",?\s*(?:(?:and|which|that|but)\s+)?(?:" + COMPARATIVE + r"\s+)?(?:from|than(?:\s+on)?|to|versus|vs\.?|"
         r"relative\s+to|on|over)\s+(?:" + STUDY + r")" + PHRASE_END, ""),
    _sub(r",?\s*(?:(?:and|which|that|but)\s+)?" + COMPARATIVE + r"\s+(?:from|since|to|than)\s+(?:" + DATED_STUDY + r"|" + DATE + r")"
         + PHRASE_END, ""),
    _sub(r",?\s*(?:(?:as|when)\s+)?(?:compared|in\s+comparison|comparison)\s+(?:to|with)\s*$", ""),
    _sub(r"\s*,?\s*\b(?:in\s+the\s+(?:interval|interim)|as\s+before|(?:as\s+)?(?:seen|noted|identified|described|"
         r"demonstrated)\s+previously|as\s+previously(?:\s+(?:seen|noted|described|demonstrated|identified|reported))?)\b", ""),
    _sub(r"\b(?:has|have)\s+XXXX\s+XXXX$", ""),  # "The heart and lungs have [remained stable] in the interval"
    _sub(r"\s+(?:unchanged|stable)(?:\s+(?:\d+|XXXX))+$", ""),  # "This is unchanged 31 17 XXXX" (a date)
    # a change that is all the sentence says: "No interval change.", "There has been no significant change."
    _sub(r"^(?:(?:overall|otherwise|and)\s*,?\s+)?(?:there\s+(?:is|has\s+been)\s+|there's\s+been\s+)?(?:no|without)\s+" + ADV + r"*(?:(?:relevant|significant|"
         r"appreciable|substantial|radiographic|acute|interval|definite|gross|visible|other)\s+)*(?:interval\s+)?changes?"
         r"(?:\s+in\s+(?:the\s+)?(?:appearance|position)(?:\s+of\s+(?:the\s+)?)?)?(?:\s+(?:in|of)\s+(?:the\s+)?)?", ""),
    _sub(r"\s*,?\s*(?:and\s+|or\s+)?(?:without|with)\s+" + ADV + r"*(?:(?:significant|appreciable|interval|gross)\s+)*"
         r"(?:interval\s+)?(?:change|improvement|worsening|progression)\b" + PHRASE_END, ""),
    _sub(r"\s+(?:or|and)\s+(?:(?:significant|appreciable|interval|gross)\s+)+change\b", ""),
    # resolved or removed findings are negative findings
    _sub(r"^(?:there\s+(?:has\s+been|is)\s+)?(?:an?\s+)?(?:(?:interval|complete|near[- ]complete|partial|"
         r"significant|near|nearly|essentially)\s+)*resolution\s+of\s+(?P<f>.+)$", _no),
    _sub(r"^(?P<f>.+?)\s+(?:has|have|had|is|are)\s+(?:since\s+|now\s+|completely\s+|nearly\s+|essentially\s+|"
         r"interval\s+|been\s+)*resolved$", _no),
    _sub(r"^(?:interval\s+)?resolved\s+(?P<f>.+)$", _no),
    _sub(r"\bwith\s+(?:interval\s+|complete\s+)?resolution\s+of\b", "without"),
    # a removed device: the patient's history ("status post removal of"), as the labels have it
    _sub(r"^(?:there\s+(?:has\s+been|is)\s+|there's\s+been\s+)?(?:an?\s+)?(?:interval\s+)?removal\s+of\s+",
         "status post removal of "),
    _sub(r"^(?P<f>.+?)\s+(?:has|have)\s+(?:since\s+|now\s+|interval\s+)*been\s+removed$",
         lambda m: "status post removal of " + _no(m)[3:]),
    _sub(r"\b(?:is|are)\s+no\s+longer\b", lambda m: m.group(0).split()[0] + " not"),
    _sub(r"\bno\s+longer\b", "no"),
    _sub(r"\b(has|have)\s+(?:since\s+)?developed\b", _present),
    # "There has been interval placement of X" -> "There is X"
    _sub(r"\b(?:there\s+has\s+been|there's\s+been|there\s+is|there\s+are)\s+(?:an?\s+)?(?:apparent\s+)?(?:interval\s+)?"
         r"(?:development|placement|insertion|appearance|performance)\s+of\s+", _there_is),
    _sub(r"^(?:interval\s+)?(?:development|placement|insertion|performance)\s+of\s+", ""),
    _sub(r"\b(?:there\s+has\s+been|there's\s+been)\s+(?:an?\s+)?" + INTERVAL + r"\s+", "there is "),
    # change nouns: "interval decrease in the right effusion" -> "the right effusion";
    # "increase in opacities" -> "increased opacities"; "increase in size of X" -> "enlargement of X"
    _sub(r"\b(?:an?\s+)?(" + CHANGE_NOUN_ADJ + r"*)increase\s+in\s+(?:the\s+)?size(?:\s+and\s+number)?\s+of\s+",
         lambda m: re.sub(r"\binterval\s+", "", m.group(1), flags=I) + "enlargement of "),
    _sub(r"\b(?:an?\s+)?" + CHANGE_NOUN_ADJ + r"*increase\s+in\s+(?!(?:the\s+)?size)", "increased "),
    _sub(r"(?<!no )(?<!without )\b(?:an?\s+)?" + CHANGE_NOUN_ADJ + r"*" + CHANGE_NOUN + r"\s+(?:in\s+(?:the\s+)?(?:size|"
         r"extent|degree|amount|prominence|conspicuity)(?:\s+and\s+number)?\s+of|in|of)\s+", ""),
    _sub(r"\b(?:there\s+(?:is|are)\s+)?" + ADV + r"*(?:improved|improving|worsening|worsened|better)\s+(?:lung\s+volumes?|"
         r"aeration|inspiration|inflation|expansion)(?:\s+(?:of|in)\s+(?:the\s+)?(?:(?:right|left|both|bilateral)\s+)?"
         r"(?:and\s+(?:right|left)\s+)?(?:lungs?|lung\s+bases?|bases?))?(?:\s+bilaterally)?(?:\s*,?\s*with\s+)?", ""),
    _sub(r"\b(?:" + INTERVAL + r"|new(?:ly)?)\s+(?=enlargement|development|placement|insertion|removal|sternotomy|fixation)", ""),
    _sub(INTERVAL + r"\s+", ""),
    # "again", "redemonstrated", "persists", "remains"
    _sub(r"^(?:once\s+)?again\s+(?:seen|noted|demonstrated|visualized|identified|present)\s+(?:is|are)\s+", _there_is),
    _sub(r"\b(?:once\s+)?again,?\s+", ""),
    _sub(r"\bpersistently\s+", ""),
    _sub(r"\bpersistence\s+of\s+", ""),
    _sub(r"\b(?:stable|unchanged)\s*/\s*", ""),
    _sub(r",\s*again\b", ""),
    _sub(r"\bre-?demonstration\s+(?:and\s+stable\s+appearance\s+|without\s+(?:significant\s+)?(?:interval\s+)?change\s+)?"
         r"(?:of|in)\s+", ""),
    _sub(r"\b(is|are)\s+re-?demonstrated\b", r"\1 seen"),
    _sub(r"\bre-?demonstrated\s+(?:is|are)\s+", ""),
    _sub(r"\s*,?\s*re-?demonstrated(?=\s*(?:[,;]|$))", ""),
    _sub(r"\bre-?demonstrated\s+", ""),
    _sub(r"\bpersists\b", "is present"),
    _sub(r"\bpersist\b", "are present"),
    _sub(r"\bremains\b", "is"),
    _sub(r"\bremain\b", "are"),
    _sub(r"\bremained\b", "was"),
    _sub(r"\bcontinues\s+to\s+be\b", "is"),
    _sub(r"\bcontinue\s+to\s+be\b", "are"),
    _sub(r"\bcontinue[sd]?\s+to\s+", ""),
    _sub(r"\b(?:still|now)\s+", ""),
    _sub(r",?\s*\b(?:still|now)\b", ""),
    _sub(r"\b(?:as\s+)?previously\s+(?:seen|noted|described|demonstrated|identified|visualized|reported|present|"
         r"placed|mentioned)\s*,?\s*", ""),
    _sub(r"\bpreviously\s+", ""),
    _sub(r"\s+previously\b", ""),
    # "stable"/"unchanged" as a predicate: "X is stable", "normal and stable", "stable and unremarkable"
    _sub(r",?\s+and\s+" + ADV + r"*(?:in\s+)?(?:stable|unchanged)\b(?:\s+(?:in\s+)?(?:appearance|position|size|"
         r"configuration))?" + PHRASE_END, ""),
    _sub(r"\b" + ADV + r"*(?:stable|unchanged)\s*(?:,\s*|\s+and\s+)(?=" + ADV + r"*(?:normal|unremarkable|within|clear|"
         r"intact|appropriate|satisfactory|mild|moderate|severe|small|large|enlarged|in\s+(?:good|normal)|"
         r"upper\s+normal|top\s+normal))", ""),
    _sub(r",?\s+(?:which|that)\s+(?:is|are|appears?|remains?|seems?)\s+" + ADV + r"*(?:stable|unchanged|similar)"
         r"(?:\s+in\s+(?:appearance|position|size|configuration))?", ""),
    _sub(r",?\s*(?:in|with)\s+" + ADV + r"*(?:stable|unchanged)\s+(?:position(?:ing)?|appearance|alignment)" + PHRASE_END, ""),
    _sub(r"\s+(?:is|are|appears?|appear|remains?|remain|has\s+been|have\s+been|seems?|looks?)\s+"
         + ADV + r"*(?:stable|unchanged|similar|not\s+changed)(?:\s+in\s+(?:appearance|position|size|configuration|"
         r"size\s+and\s+contour))?" + PHRASE_END, ""),
    _sub(r",?\s*(?:(?:with|both|but)\s+)?" + ADV + r"*(?:stable|unchanged)(?:\s+in\s+(?:appearance|position|size))?"
         r"(?=\s*(?:[,;]|$))", ""),
    _sub(r"\s+(?:(?:has|have)\s+)?(?:been\s+)?(?:stable|unchanged)\s*(?=[,;]|$)", ""),
    # change as a predicate: "X has increased", "X appears worse", "X is slightly more prominent"
    _sub(r"\s+(?:has|have|had)\s+(?:(?:also|since|further)\s+)?" + ADV + r"*(?:increased|decreased|improved|worsened|"
         r"progressed|enlarged|grown|changed|cleared|diminished)(?:\s+" + ADV + r"*)?"
         r"(?:\s+in\s+(?:size|extent|conspicuity|prominence|severity|volume|number)(?:\s+and\s+(?:size|number))?)?"
         + PHRASE_END, ""),
    _sub(r",?\s+(?:which\s+)?(?:is|are|appears?|appear|seems?|looks?)\s+" + ADV + r"*(?:improved|worse|better|worsened|"
         r"increased\s+in\s+size|decreased\s+in\s+size|larger|smaller|more\s+prominent|less\s+prominent|"
         r"less\s+distinct|more\s+conspicuous|less\s+conspicuous)" + PHRASE_END, ""),
    _sub(r"\b(?:increased|decreased)\s+size\s+of\s+", ""),
    # comparison adjectives before a finding: "Stable moderate cardiomegaly", "New small effusion"
    _sub(r"\b" + ADV + r"*(?:stable|unchanged|similar)\s+(?:appearance|appearing|position(?:ing)?|positions)\s+"
         r"(?!(?:of\s+)?(?:the\s+)?chest\b)(?:of\s+)?(?:the\s+)?", ""),
    _sub(r"\b" + CHANGE_ADJ + r"\s+(?:or|and|/)\s+" + CHANGE_ADJ + r"\s+", ""),
    _sub(r"(?<!hemodynamically )(?<!clinically )\b" + ADV + r"*(?:" + CHANGE_ADJ + r"|newly\s+(?:seen|noted|placed|"
         r"inserted|visualized|identified|demonstrated|apparent))(?:\s*,)?\s+(?=\w)", ""),
    _sub(r"\b(?:newly|recently)\s+(?=placed|inserted)", ""),
]

# Cleaning up what the rules leave (only in sentences they changed)
CLEANUP = [
    _sub(r"\s{2,}", " "),
    _sub(r"\s+([,;:])", r"\1"),
    _sub(r"([,;:])(?:\s*[,;:])+", r"\1"),
    _sub(r"\(\s*\)", ""),
    _sub(r"^\s*(?:[,;:\-]|and\b|with\b|which\b|but\b|or\b)\s*", ""),
    _sub(r"(?:\s*[,;:\-]|\s+(?:and|with|which|that|is|are|has|have|been|was|were|appears?|also|as|but|from|of|in|"
         r"to|the|a|an|or|both|than))+\s*$", ""),
    _sub(r"\b(there)\s+(?:has|have)\s+been\s+(?!(?:no|previous|prior|remote)\b)", r"\1 is "),
    _sub(r"\b(a)n\s+(?=[b-df-hj-np-tv-z][a-z])", r"\1 "),
    _sub(r"\b(a)\s+(?=[aeio][a-z])", r"\1n "),
    # what is left of a "stable chest": "chest without acute abnormality" -> "No acute abnormality"
    _sub(r"^(?:(?:the|this)\s+)?(?:appearance\s+of\s+|appearing\s+)?(?:the\s+)?(?:chest|exam(?:ination)?|study|radiograph|"
         r"radiographic\s+view\s+of\s+(?:the\s+)?chest|chest\s+(?:x-XXXX|radiograph|x-ray))(?:\s+x-XXXX)?,?\s+"
         r"(?=with(?:out)?\b)", ""),
    _sub(r"^with\s+no\s+", "no "),
    _sub(r"^without\s+", "no "),
    _sub(r"^with\s+", ""),
]


def _rewrite_body(body: str) -> str:
    """The sentence (without its final punctuation) with its references to a prior study removed;
    "" when nothing of its own is left."""
    if REQUEST.search(body) and re.search(r"compar|prior|previous|old\s+films", body, I):
        return body
    text = body
    for pattern, repl in RULES:
        text = pattern.sub(repl, text)
    if text == body:
        return body
    for pattern, repl in CLEANUP:
        text = pattern.sub(repl, text)
    text = text.strip()
    if EMPTY.match(text) or ONLY_XXXX.match(text) or re.fullmatch(r"there\s+(?:is|are)|no", text, I):
        return ""
    if STRUCTURE_ONLY.match(text):
        text = TRAILING_VERB.sub("", re.sub(r"^(?:the|this|there|is|are)\s+", "", text, flags=I))
    if re.match(r"the\s", text, I) and (not VERB.search(text) or (not FINITE.search(text) and not re.match(r"the\s", body, I))):
        text = text[4:]  # "The left pleural effusion has increased." -> "Left pleural effusion."
    return text


_LIST_PREFIX = re.compile(r"^(\s*\d{1,2}[.)]\s+)?(.*?)([.!?\s]*)$", re.S)


def rewrite_sentence(sentence: str) -> str | None:
    """The sentence without references to a prior study (its list number, case of the first
    letter and final punctuation kept), or None when it goes whole."""
    m = _LIST_PREFIX.match(sentence)
    prefix, body, end = m.group(1) or "", m.group(2), m.group(3)
    new = _rewrite_body(body)
    if not new:
        return None
    if new == body:
        return sentence
    if body[:1].isupper() or prefix or not body[:1].isalpha():
        new = new[0].upper() + new[1:]
    return prefix + new + (end or ".")


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Rewrite:
    text: str
    changed: int  # sentences rewritten or removed
    removed: int  # sentences removed whole
    kept_for_labels: int  # sentences that speak of a prior but were kept because the labels would change

    @property
    def changed_report(self) -> bool:
        return self.changed > 0


def remove_prior_references(report: str, labeler: Callable[[str], dict] = label_report,
                            check_labels: bool = True) -> Rewrite:
    """The report with its references to prior studies removed, sentence by sentence. With
    `check_labels`, a sentence whose rewrite would change the report's labels (by `labeler`)
    is kept as it was and counted in `kept_for_labels`."""
    if not mentions_prior(report):
        return Rewrite(report, 0, 0, 0)
    sentences, gaps = split_sentences(report)
    rewrites = {i: new for i, s in enumerate(sentences)
                if PRIOR_REFERENCE.search(s) and (new := rewrite_sentence(s)) != s}
    if not rewrites:
        return Rewrite(report, 0, 0, 0)
    everything = [rewrites.get(i, s) for i, s in enumerate(sentences)]
    if not check_labels:
        return _rewrite(everything, gaps, rewrites, 0)
    original_labels = labeler(report)
    if labeler(join_sentences(everything, gaps)) == original_labels:  # the usual case: one more labelling
        return _rewrite(everything, gaps, rewrites, 0)
    # else sentence by sentence: each rewrite is kept only if the labels stay those of the original
    current: list[str | None] = list(sentences)
    accepted, kept = {}, 0
    for i, new in rewrites.items():
        trial = current[:i] + [new] + current[i + 1:]
        if labeler(join_sentences(trial, gaps)) != original_labels:
            kept += 1
            continue
        current, accepted[i] = trial, new
    if not accepted:
        return Rewrite(report, 0, 0, kept)
    return _rewrite(current, gaps, accepted, kept)


def _rewrite(sentences: list[str | None], gaps: list[str], rewrites: dict, kept: int) -> Rewrite:
    removed = sum(new is None for new in rewrites.values())
    return Rewrite(join_sentences(sentences, gaps), len(rewrites), removed, kept)
