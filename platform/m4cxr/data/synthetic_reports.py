"""FINDINGS sections written from the synthetic world's findings by a varied phrase grammar.

Each finding has several phrasings, hedges ("may represent ...") for uncertain ones and
negations ("No pneumothorax.") for some absent ones. The CheXpert-14 label of every report is
known by construction: 1 positive, 0 negative, -1 uncertain, absent = not mentioned. Only
follow-up reports compare with the prior study.
"""

from __future__ import annotations

import numpy as np

from m4cxr.data.synthetic_xray import Finding

# finding kind -> (display name used in grounding and classification, CheXpert observation)
KINDS = {
    "cardiomegaly": ("Cardiomegaly", "Cardiomegaly"),
    "effusion": ("Pleural Effusion", "Pleural Effusion"),
    "pneumothorax": ("Pneumothorax", "Pneumothorax"),
    "consolidation": ("Consolidation", "Consolidation"),
    "opacity": ("Lung Opacity", "Lung Opacity"),
    "nodule": ("Nodule", "Lung Lesion"),
    "mass": ("Mass", "Lung Lesion"),
    "atelectasis": ("Atelectasis", "Atelectasis"),
    "edema": ("Edema", "Edema"),
    "devices": ("Support Devices", "Support Devices"),
    "fracture": ("Fracture", "Fracture"),
}
DISPLAY_NAMES = [v[0] for v in KINDS.values()]  # the synthetic dataset's own label set
PRECEDENCE = {1: 2, -1: 1, 0: 0}
PATHOLOGIES = [o for o in dict.fromkeys(v[1] for v in KINDS.values()) if o != "Support Devices"]


def severity_word(severity: float, kind: str) -> str:
    words = ("small", "moderate", "large") if kind in ("effusion", "pneumothorax") else ("mild", "moderate", "severe")
    return words[0] if severity < 0.45 else words[1] if severity < 0.75 else words[2]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _where(f: Finding) -> str:
    zone = {"upper": "upper", "mid": "mid", "lower": "lower"}.get(f.zone, "")
    return f"{f.side} {zone} lung".replace("  ", " ") if f.side != "both" else "both lungs"


def finding_sentence(f: Finding, rng: np.random.Generator) -> tuple[str, dict[str, int]]:
    """One sentence for a present finding and the labels it implies."""
    k, side, sev = f.kind, f.side, severity_word(f.severity, f.kind)
    obs = KINDS[k][1]
    if f.hedged:
        hedges = {
            "effusion": [f"Possible {sev} {side} pleural effusion.", f"Blunting of the {side} costophrenic angle may represent a small effusion."],
            "atelectasis": [f"Mild {side} basilar opacity may represent atelectasis."],
            "consolidation": [f"Patchy {side} lower lung opacity, possibly consolidation."],
            "pneumothorax": [f"A small {side} apical pneumothorax cannot be excluded."],
            "edema": ["Mild interstitial prominence may represent early edema."],
        }
        text = _pick(rng, hedges[k])
        labels = {obs: -1}
        if "opacity" in text.lower() and k != "consolidation":
            labels["Lung Opacity"] = 1
        if k == "consolidation":
            labels["Lung Opacity"] = 1
        return text, labels
    options = {
        "cardiomegaly": [f"There is {sev} cardiomegaly.", f"The heart is {'mildly' if sev == 'mild' else 'moderately' if sev == 'moderate' else 'severely'} enlarged.",
                         f"The cardiac silhouette is enlarged, consistent with {sev} cardiomegaly."],
        "effusion": [f"There is a {sev} {side} pleural effusion.", f"{sev.capitalize()} {side} pleural effusion.",
                     f"A {sev} {side} pleural effusion is present with adjacent basilar blunting."],
        "pneumothorax": [f"There is a {sev} {side} pneumothorax.", f"{sev.capitalize()} {side} apical pneumothorax is seen.",
                         f"A {side} pneumothorax is present, {sev} in size."],
        "consolidation": [f"Focal consolidation in the {_where(f)}.", f"There is consolidation in the {_where(f)} zone.",
                          f"Airspace consolidation is seen in the {_where(f)}."],
        "opacity": [f"Patchy opacity in the {_where(f)}.", f"There is a hazy opacity in the {_where(f)} zone."],
        "nodule": [f"A {0.5 + f.severity:.1f} cm nodule is seen in the {_where(f)}.", f"There is a small nodule in the {_where(f)}."],
        "mass": [f"There is a {2 + 3 * f.severity:.1f} cm mass in the {_where(f)}.", f"A mass is seen in the {_where(f)}."],
        "atelectasis": [f"Plate-like atelectasis at the {side} lung base.", f"There is {side} basilar atelectasis.",
                        f"Linear atelectasis in the {_where(f)}."],
        "edema": [f"There is {sev} pulmonary edema.", f"{sev.capitalize()} interstitial pulmonary edema.",
                  f"Pulmonary vascular congestion with {sev} edema."],
        "devices": ["An endotracheal tube terminates 4 cm above the carina." if f.severity <= 0.5 else
                    "An endotracheal tube terminates 4 cm above the carina. A right internal jugular central venous catheter ends in the SVC.",
                    "Endotracheal tube in standard position." if f.severity <= 0.5 else
                    "Endotracheal tube and right internal jugular line are in place."],
        "fracture": [f"There is an acute fracture of a {side} {'upper' if f.zone == 'upper' else 'mid' if f.zone == 'mid' else 'lower'} rib.",
                     f"A displaced {side} rib fracture is noted."],
    }[k]
    text = _pick(rng, options)
    labels = {obs: 1}
    if k == "consolidation" and rng.random() < 0.35:
        text = text[:-1] + ", which may represent pneumonia."
        labels["Pneumonia"] = -1
    return text, labels


NEGATIONS = [
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0}),
    ("There is no pneumothorax.", {"Pneumothorax": 0}),
    ("No pleural effusion.", {"Pleural Effusion": 0}),
    ("No focal consolidation.", {"Consolidation": 0}),
    ("There is no focal consolidation to suggest pneumonia.", {"Consolidation": 0, "Pneumonia": 0}),
    ("No pulmonary edema.", {"Edema": 0}),
    ("The heart size is normal.", {"Cardiomegaly": 0}),
    ("Heart size is within normal limits.", {"Cardiomegaly": 0}),
    ("No displaced rib fracture.", {"Fracture": 0}),
    ("The mediastinal contours are normal.", {"Enlarged Cardiomediastinum": 0}),
]


def change_sentence(f: Finding, rng: np.random.Generator) -> tuple[str, dict[str, int]]:
    """A follow-up sentence comparing with the prior study."""
    name = KINDS[f.kind][0].lower()
    where = f"{f.side} " if f.side in ("left", "right") else ""
    obs = KINDS[f.kind][1]
    if f.change == "resolved":
        return _pick(rng, [f"The previously seen {where}{name} has resolved.",
                           f"Interval resolution of the {where}{name}."]), {obs: 0}
    if f.change == "new":
        text, labels = finding_sentence(f, rng)
        return "New " + text[0].lower() + text[1:] if not f.hedged else text, labels
    if f.hedged:
        return finding_sentence(f, rng)
    phrase = {
        "increased": [f"The {where}{name} has increased compared to the prior study.", f"Worsening {where}{name}."],
        "decreased": [f"The {where}{name} has decreased since the prior study.", f"Improving {where}{name}."],
        "unchanged": [f"Unchanged {where}{name}.", f"The {where}{name} is stable compared to the prior study."],
    }[f.change or "unchanged"]
    return _pick(rng, phrase), {obs: 1}


def write_report(findings: list[Finding], rng: np.random.Generator, follow_up: bool = False) -> tuple[str, dict[str, int], dict[int, str]]:
    """FINDINGS text, its CheXpert-14 labels, and the sentence describing each finding (by index)."""
    order = ["devices", "consolidation", "opacity", "nodule", "mass", "atelectasis", "edema",
             "effusion", "pneumothorax", "cardiomegaly", "fracture"]
    labels: dict[str, int] = {}
    sentences: list[str] = []
    by_index: dict[int, str] = {}
    ranked = sorted(range(len(findings)), key=lambda i: order.index(findings[i].kind))
    for i in ranked:
        f = findings[i]
        text, lab = change_sentence(f, rng) if follow_up and f.change else finding_sentence(f, rng)
        sentences.append(text)
        if f.change != "resolved":
            by_index[i] = text
        for k, v in lab.items():  # CheXpert aggregation: positive over uncertain over negative
            labels[k] = max(labels.get(k, v), v, key=PRECEDENCE.__getitem__)
    present = {KINDS[f.kind][1] for f in findings if f.change != "resolved"}
    for text, lab in NEGATIONS:
        if not (set(lab) & (present | set(labels))) and rng.random() < 0.45:
            sentences.append(text)
            labels.update(lab)
    if not present and not any(v == 1 for v in labels.values()):
        sentences.insert(0, _pick(rng, ["The lungs are clear.", "Lungs are well expanded and clear.",
                                        "No acute cardiopulmonary process."]))
    pathology = [v for k, v in labels.items() if k in PATHOLOGIES or k == "Pneumonia" or k == "Enlarged Cardiomediastinum"]
    if not any(v in (1, -1) for v in pathology):
        labels["No Finding"] = 1
    return " ".join(sentences), labels, by_index


LAY_TERMS = {
    "cardiomegaly": "the heart looks larger than normal",
    "effusion": "there is some fluid around the lung",
    "pneumothorax": "there is air outside the lung, which can make it partly collapse",
    "consolidation": "part of the lung is filled in, as can happen with an infection",
    "opacity": "there is a hazy area in the lung",
    "nodule": "there is a small spot in the lung",
    "mass": "there is a larger lump in the lung",
    "atelectasis": "a small part of the lung is not fully inflated",
    "edema": "there is extra fluid in the lungs",
    "devices": "a breathing tube or line is in place",
    "fracture": "a rib is broken",
}


def summary_sentence(findings: list[Finding]) -> str:
    names = [KINDS[f.kind][0].lower() for f in findings if f.change != "resolved" and not f.hedged]
    if not names:
        return "The radiograph shows no acute abnormality."
    return "The radiograph shows " + (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + "."


def plain_language(findings: list[Finding]) -> str:
    parts = [LAY_TERMS[f.kind] for f in findings if f.change != "resolved" and not f.hedged]
    if not parts:
        return "In simple words: the picture of your chest looks normal."
    return "In simple words: " + "; ".join(parts) + "."
