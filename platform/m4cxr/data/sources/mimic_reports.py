"""MIMIC-CXR report text: the official section extraction (MIT-LCP/mimic-cxr txt/section_parser.py)
and the R2Gen cleaning (Chen et al.), as DATASETS.md sections 1b and C describe them.

The official script's hand-made overrides for about 54 individual studies are not reproduced:
those studies go through the same rules as every other report.
"""

from __future__ import annotations

import re

HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")

# Exact names (lower case) -> the normalised section name.
SECTION_NAMES = {
    "impression": "impression", "comparison": "comparison", "indication": "indication", "findings": "findings",
    "examination": "examination", "technique": "technique", "history": "history", "comparisons": "comparison",
    "clinical history": "history", "reason for examination": "indication", "notification": "notification",
    "reason for exam": "indication", "clinical information": "history", "exam": "examination",
    "clinical indication": "indication", "conclusion": "impression", "chest, two views": "findings",
    "recommendation(s)": "recommendations", "recommendation": "recommendations",
    "recommendations": "recommendations", "type of examination": "examination", "reference exam": "comparison",
    "patient history": "history", "addendum": "addendum", "comparison exam": "comparison", "date": "date",
    "comment": "comment", "findings and impression": "impression", "wet read": "wet read", "wetread": "wet read",
    "comparison film": "comparison", "findings/impression": "impression", "findings/ impression": "impression",
    "pfi": "history", "preamble": "preamble", "ndication": "impression",
    # misspellings seen in the reports
    "impresson": "impression", "imprression": "impression", "imoression": "impression",
    "impressoin": "impression", "imprssion": "impression", "impresion": "impression",
    "imperssion": "impression", "mpression": "impression", "impession": "impression",
    "finding": "findings", "findins": "findings", "findindgs": "findings", "findgings": "findings",
    "findngs": "findings", "findnings": "findings", "finidngs": "findings", "reference findings": "findings",
    "idication": "indication", "comparision": "comparison", "comparsion": "comparison",
    "comparrison": "comparison", "comparisions": "comparison",
}
SUBSTRING_NAMES = ("impression", "findings", "history", "comparison", "addendum")
VIEW_PHRASES = ("chest", "portable", "pa and lateral", "lateral and pa", "ap and lateral", "lateral and ap",
                "frontal and", "two views", "frontal view", "pa view", "ap view", "one view", "lateral view",
                "bone window", "frontal upright", "frontal semi-upright", "ribs", "pa and lat")


def normalise_section_name(name: str) -> str:
    name = name.lower().strip()
    if name in SECTION_NAMES:
        return SECTION_NAMES[name]
    for key in SUBSTRING_NAMES:
        if key in name:
            return key
    if any(phrase in name for phrase in VIEW_PHRASES):
        return "findings"  # headers naming the exam or view introduce the findings
    return name


def split_sections(text: str) -> list[tuple[str, str]]:
    """A report -> [(normalised section name, text)], in order."""
    first = HEADER.search(text)
    if first is None:
        sections = [("full report", text)]
    else:
        sections = [("preamble", text[:first.start(1)])]
        match = first
        while match:
            name, start = match.group(1), match.end()
            newline = text.find("\n", start)
            match = HEADER.search(text, newline if newline != -1 else start)  # never a header on its own line
            sections.append((name, text[start:match.start() if match else len(text)]))
    sections = [(normalise_section_name(n), t) for n, t in sections]
    sections = [(n, t) for n, t in sections if not (n in ("impression", "findings") and not t.strip())]
    names = {n for n, _ in sections}
    if "impression" not in names and "findings" not in names and "\n \n" in sections[-1][1]:
        name, body = sections[-1]
        head, _, rest = body.partition("\n \n")
        sections[-1] = (name, head)
        sections.append(("last_paragraph", rest))
    return sections


def findings_section(text: str) -> str | None:
    """The FINDINGS section of a report (the last one when there are several), or None."""
    found = [body for name, body in split_sections(text) if name == "findings"]
    return found[-1].strip() if found else None


def clean_report(text: str) -> str:
    """R2Gen's clean_report_mimic_cxr: numbering, special characters and extra spaces removed,
    lower case, sentences joined by " . "."""
    text = text.replace("\n", " ")
    for _ in range(7):
        text = text.replace("__", "_")
    for _ in range(6):
        text = text.replace("  ", " ")
    for _ in range(8):
        text = text.replace("..", ".")
    text = text.replace("1. ", "")
    for n in "2345":
        text = text.replace(f". {n}. ", ". ")
    for n in "2345":
        text = text.replace(f" {n}. ", ". ")
    sentences = text.strip().lower().split(". ")

    def clean(sentence: str) -> str:
        for ch in "\"/\\'":
            sentence = sentence.replace(ch, "")
        return re.sub(r"[.,?;*!%^&_+():-\[\]{}]", "", sentence.strip().lower())

    return " . ".join(clean(s) for s in sentences) + " ."
