"""The synthetic CXR world: patients, studies, images, reports and samples for all 17 tasks.

It stands in for the credentialed datasets. Every patient has one study, or (for
`prior_share` of them) a prior and a follow-up study whose findings evolve. Each study has a
frontal image and usually a lateral (sometimes a second frontal), drawn by synthetic_xray.py
with findings at known places; reports come from synthetic_reports.py. Patients are split
train / validate / test, so no patient is in two splits. All samples carry dataset "synthetic".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m4cxr.boxes import to_relative
from m4cxr.config import DEFAULT_SYSTEM_PROMPT, SyntheticConfig
from m4cxr.data.schema import SPLITS, ImageStore, Sample, write_manifest, write_samples
from m4cxr.data.stats import corpus_stats
from m4cxr.data.synthetic_reports import (
    DISPLAY_NAMES, KINDS, plain_language, severity_word, summary_sentence, write_report,
)
from m4cxr.data.synthetic_xray import (
    IMAGENOME_REGIONS, ORGANS, Anatomy, Drawing, Finding, draw_frontal, draw_lateral, sample_anatomy,
)
from m4cxr.tasks import cot_candidates, positive_findings, render_conversation, task_type

DATASET = "synthetic"
FINDING_RATES = {  # relative frequency of each finding kind
    "effusion": 1.3, "cardiomegaly": 1.2, "consolidation": 1.0, "atelectasis": 1.0, "devices": 0.9,
    "pneumothorax": 0.8, "opacity": 0.8, "edema": 0.8, "nodule": 0.7, "mass": 0.5, "fracture": 0.6,
}
SIDED = ("effusion", "pneumothorax", "consolidation", "opacity", "nodule", "mass", "atelectasis", "fracture")
HEDGEABLE = ("effusion", "atelectasis", "consolidation", "pneumothorax", "edema")

log = logging.getLogger(__name__)


@dataclass
class Study:
    patient_id: str
    study_id: str
    split: str
    findings: list[Finding]
    follow_up: bool
    image_ids: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    report: str = ""
    labels: dict[str, int] = field(default_factory=dict)
    sentences: dict[int, str] = field(default_factory=dict)
    frontal: Drawing | None = None  # the first frontal image's drawing (boxes)
    prior: "Study | None" = None


# ----------------------------------------------------------------------------- the world


def sample_findings(rng: np.random.Generator) -> list[Finding]:
    count = int(rng.choice([0, 1, 2, 3, 4], p=[0.22, 0.3, 0.26, 0.15, 0.07]))
    kinds = list(FINDING_RATES)
    rates = np.array(list(FINDING_RATES.values()))
    chosen = rng.choice(kinds, size=count, replace=False, p=rates / rates.sum()) if count else []
    return [new_finding(str(k), rng) for k in chosen]


def new_finding(kind: str, rng: np.random.Generator) -> Finding:
    side = str(rng.choice(["right", "left"])) if kind in SIDED else ("both" if kind == "edema" else "")
    zone = {"effusion": "lower", "atelectasis": "lower", "pneumothorax": "upper"}.get(
        kind, str(rng.choice(["upper", "mid", "lower"])) if kind in SIDED else "")
    return Finding(
        kind=kind, side=side, zone=zone, severity=float(rng.uniform(0.25, 1.0)),
        hedged=bool(kind in HEDGEABLE and rng.random() < 0.15),
        offset=(float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))),
    )


def evolve(prior: list[Finding], rng: np.random.Generator) -> list[Finding]:
    """Follow-up findings: each prior finding resolves, shrinks, grows or stays; some are new."""
    out = []
    for f in prior:
        r = rng.random()
        if r < 0.2:
            change, sev = "resolved", f.severity
        elif r < 0.45:
            change, sev = "increased", min(1.0, f.severity + rng.uniform(0.2, 0.4))
        elif r < 0.7:
            change, sev = "decreased", max(0.2, f.severity - rng.uniform(0.2, 0.4))
        else:
            change, sev = "unchanged", f.severity
        out.append(Finding(f.kind, f.side, f.zone, sev, f.hedged, f.offset, change))
    if rng.random() < 0.5:
        kinds = [k for k in FINDING_RATES if k not in {f.kind for f in prior}]
        new = new_finding(str(rng.choice(kinds)), rng)
        new.change = "new"
        out.append(new)
    return out


def _views(rng: np.random.Generator) -> list[str]:
    views = ["PA" if rng.random() < 0.75 else "AP"]
    if rng.random() < 0.75:
        views.append("LATERAL")
    if rng.random() < 0.12:
        views.append("AP" if views[0] == "PA" else "PA")
    return views


def build_world(cfg: SyntheticConfig, store: ImageStore) -> list[Study]:
    """Draw every patient's studies into the image store; returns the studies in order."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.patients
    order = rng.permutation(n)
    shares = np.array(cfg.split_shares, dtype=float)
    if len(shares) != 3 or (shares <= 0).any():
        raise ValueError("data.synthetic.split_shares needs three positive shares (train, validate, test)")
    cuts = np.round(np.cumsum(shares / shares.sum()) * n).astype(int)
    split_of = {}
    for rank, p in enumerate(order):
        split_of[int(p)] = SPLITS[int(np.searchsorted(cuts, rank, side="right"))]
    studies: list[Study] = []
    for p in range(n):
        prng = np.random.default_rng([cfg.seed, p])
        anat = sample_anatomy(prng)
        pid = f"p{p:05d}"
        first = Study(pid, f"{pid}_s1", split_of[p], sample_findings(prng), follow_up=False)
        chain = [first]
        if prng.random() < cfg.prior_share:
            chain.append(Study(pid, f"{pid}_s2", split_of[p], evolve(first.findings, prng), follow_up=True, prior=first))
        for study in chain:
            _draw_study(study, anat, cfg.image_size, prng, store)
            studies.append(study)
    return studies


def _draw_study(study: Study, anat: Anatomy, size: int, rng: np.random.Generator, store: ImageStore) -> None:
    visible = [f for f in study.findings if f.change != "resolved"]
    study.report, study.labels, study.sentences = write_report(study.findings, rng, follow_up=study.follow_up)
    for k, view in enumerate(_views(rng)):
        image_id = f"{study.study_id}_{k}_{view.lower()}"
        if view == "LATERAL":
            pixels = draw_lateral(anat, visible, size, rng)
        else:
            drawing = draw_frontal(anat, visible, size, rng, view=view)
            pixels = drawing.pixels
            if study.frontal is None:
                study.frontal = drawing
                # finding boxes are indexed into `visible`; re-index into study.findings
                index_map = [i for i, f in enumerate(study.findings) if f.change != "resolved"]
                study.frontal.finding_boxes = [(index_map[i], b) for i, b in drawing.finding_boxes]
        store.put(image_id, pixels, view=view, dataset=DATASET, patient_id=study.patient_id,
                  study_id=study.study_id, split=study.split)
        study.image_ids.append(image_id)
        study.views.append(view)


# ----------------------------------------------------------------------------- samples


class SampleMaker:
    """Renders the samples of one study for every task it supports."""

    def __init__(self, study: Study, size: int, convention: str, system_prompt: str, rng: np.random.Generator):
        self.s, self.size, self.conv, self.system, self.rng = study, size, convention, system_prompt, rng
        self.out: list[Sample] = []
        frontal = [i for i, v in zip(study.image_ids, study.views) if v != "LATERAL"]
        self.frontal_id = frontal[0]

    def rel(self, box) -> list[int]:
        return list(to_relative(box, self.size, self.size, self.conv))

    def add(self, task: str, fields: dict, images: list[tuple[str, str]], *, boxes=(), labels=None,
            report=None, prior_report=None, follow_ups=()) -> None:
        turns = render_conversation(task, fields, self.system, follow_ups=follow_ups)
        s = self.s
        self.out.append(Sample(
            sample_id=f"{task}-{s.study_id}-{len(self.out)}", task=task, task_type=task_type(task),
            dataset=DATASET, split=s.split, patient_id=s.patient_id, study_id=s.study_id,
            images=[{"image_id": i, "role": r} for i, r in images], turns=turns,
            labels=labels or {}, boxes=list(boxes), report=report, prior_report=prior_report,
            answer=turns[-1]["content"],
        ))

    def report_generation(self) -> None:
        s, cands = self.s, cot_candidates()
        positives = positive_findings(s.labels, cands)
        common = dict(labels=s.labels, report=s.report)
        for image_id in s.image_ids:
            self.add("single_image", {"images": 1, "findings": cands, "positives": positives, "report": s.report},
                     [(image_id, "current")], **common)
        if len(s.image_ids) >= 2:
            self.add("multi_image", {"images": len(s.image_ids), "findings": cands, "positives": positives,
                                     "report": s.report}, [(i, "current") for i in s.image_ids], **common)
        if s.prior is not None:
            p = s.prior
            self.add("multi_study", {"prior_images": len(p.image_ids), "prior_report": p.report,
                                     "follow_up_images": len(s.image_ids), "findings": cands,
                                     "positives": positives, "report": s.report},
                     [(i, "prior") for i in p.image_ids] + [(i, "current") for i in s.image_ids],
                     prior_report=p.report, **common)

    def image_understanding(self) -> None:
        s, img = self.s, [(self.frontal_id, "current")]
        drawn = {i: box for i, box in s.frontal.finding_boxes}
        present = [KINDS[s.findings[i].kind][0] for i in drawn]
        truth = {name: int(name in present) for name in DISPLAY_NAMES}
        self.add("disease_classification", {"findings": DISPLAY_NAMES, "positives": present}, img, labels=truth)
        items = []
        for i, box in drawn.items():
            name = KINDS[s.findings[i].kind][0]
            b = {"label": name, "image_index": 0, "box": box}
            items.append((name, [self.rel(box)]))
            self.add("finding_grounding", {"finding": name, "bbox": self.rel(box)}, img, boxes=[b])
            self.add("grounded_finding", {"bbox": self.rel(box), "finding": name}, img, boxes=[b])
            if i in s.sentences:
                self.add("phrase_grounding", {"phrase": s.sentences[i], "bbox": self.rel(box)}, img, boxes=[b])
                self.add("grounded_phrase_generation", {"bbox": self.rel(box), "phrase": s.sentences[i]}, img, boxes=[b])
        absent = [n for n in DISPLAY_NAMES if n not in present]
        if absent and self.rng.random() < 0.5:
            self.add("finding_grounding", {"finding": str(self.rng.choice(absent)), "bbox": []}, img)
        all_boxes = [{"label": KINDS[s.findings[i].kind][0], "image_index": 0, "box": b} for i, b in drawn.items()]
        if drawn:
            self.add("abnormality_detection", {"bbox": [self.rel(b) for b in drawn.values()]}, img, boxes=all_boxes)
        ordered = [(n, bx) for n in DISPLAY_NAMES for (m, bx) in items if m == n]  # every kind has a box
        self.add("multi_finding_grounding", {"findings": DISPLAY_NAMES, "findings_with_bboxes": ordered}, img, boxes=all_boxes)
        for organ in ORGANS:
            box = s.frontal.organ_boxes[organ]
            b = [{"label": organ, "image_index": 0, "box": box}]
            self.add("organ_grounding", {"organ": organ, "bbox": self.rel(box)}, img, boxes=b)
            self.add("grounded_organ", {"bbox": self.rel(box), "organ": organ}, img, boxes=b)
        for name in self.rng.choice(IMAGENOME_REGIONS, size=4, replace=False):
            box = s.frontal.region_boxes[str(name)]
            b = [{"label": str(name), "image_index": 0, "box": box}]
            self.add("anatomical_region_grounding", {"name": str(name), "bbox": self.rel(box)}, img, boxes=b)
        for name in self.rng.choice(IMAGENOME_REGIONS, size=4, replace=False):
            box = s.frontal.region_boxes[str(name)]
            b = [{"label": str(name), "image_index": 0, "box": box}]
            self.add("grounded_anatomical_region", {"bbox": self.rel(box), "name": str(name)}, img, boxes=b)

    def vqa(self) -> None:
        s, img, rng = self.s, [(self.frontal_id, "current")], self.rng
        visible = [f for f in s.findings if f.change != "resolved"]
        names = [KINDS[f.kind][0].lower() for f in visible]
        pool = []
        kind = str(rng.choice(list(KINDS)))
        pool.append((f"Is there {KINDS[kind][0].lower()} in this image?", "yes" if KINDS[kind][0].lower() in names else "no"))
        pool.append(("Is the heart enlarged?", "yes" if "cardiomegaly" in names else "no"))
        pool.append(("What abnormalities are seen in this image?", ", ".join(names) if names else "no abnormality"))
        for f in visible:
            if f.side in ("left", "right"):
                where = f"{f.side} {f.zone} lung" if f.zone else f"{f.side} lung"
                pool.append((f"Where is the {KINDS[f.kind][0].lower()} located?", where))
            pool.append((f"How severe is the {KINDS[f.kind][0].lower()}?", severity_word(f.severity, f.kind)))
        for k in rng.choice(len(pool), size=min(3, len(pool)), replace=False):
            q, a = pool[int(k)]
            self.add("vqa", {"question": q, "answer": a}, img)
        # Instruction following: a short multi-turn dialogue about the study.
        follow = [("Explain this in plain language for the patient.", plain_language(visible))]
        if rng.random() < 0.5:
            name = str(rng.choice([n.lower() for n in DISPLAY_NAMES]))
            follow.append((f"Is there {name}? Answer yes or no.", "Yes." if name in names else "No."))
        self.add("visual_instruction_following",
                 {"question": "Summarize the findings of this radiograph in one sentence.",
                  "answer": summary_sentence(visible)}, img, follow_ups=follow)
        if s.prior is not None:
            prior_frontal = [i for i, v in zip(s.prior.image_ids, s.prior.views) if v != "LATERAL"][0]
            pair = [(prior_frontal, "reference"), (self.frontal_id, "main")]
            changes = [f"{f.change} {f.side + ' ' if f.side in ('left', 'right') else ''}{KINDS[f.kind][0].lower()}"
                       for f in s.findings if f.change != "unchanged"]
            self.add("difference_vqa", {"question": "What has changed compared to the reference image?",
                                        "answer": ", ".join(changes) if changes else "nothing has changed"}, pair)
            if s.findings:
                f = s.findings[int(rng.integers(len(s.findings)))]
                word = {"increased": "worse", "decreased": "better", "unchanged": "unchanged",
                        "resolved": "resolved", "new": "new"}[f.change]
                self.add("difference_vqa", {"question": f"Is the {KINDS[f.kind][0].lower()} better or worse than before?",
                                            "answer": word}, pair)


def study_samples(study: Study, size: int, convention: str = "resize",
                  system_prompt: str = DEFAULT_SYSTEM_PROMPT, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng([seed, int(study.patient_id[1:]), int(study.follow_up)])
    maker = SampleMaker(study, size, convention, system_prompt, rng)
    maker.report_generation()
    maker.image_understanding()
    maker.vqa()
    return maker.out


def synthesize(out_dir: str | Path, cfg: SyntheticConfig, convention: str = "resize",
               system_prompt: str = DEFAULT_SYSTEM_PROMPT, progress: bool = True) -> dict:
    """Write the synthetic corpus (images, samples, manifest) to out_dir; returns the manifest."""
    start = time.time()
    out = Path(out_dir)
    store = ImageStore(out)
    studies = build_world(cfg, store)
    if progress:
        log.info("synth: drew %d images of %d studies in %.1fs", len(store.index), len(studies), time.time() - start)
    samples = [s for study in studies for s in study_samples(study, cfg.image_size, convention, system_prompt, cfg.seed)]
    store.write_index()
    write_samples(samples, out)
    manifest = corpus_stats(out)
    manifest["source"] = {"kind": "synthetic", "patients": cfg.patients, "seed": cfg.seed,
                          "image_size": cfg.image_size, "prior_share": cfg.prior_share}
    manifest["skipped"] = []
    write_manifest(out, manifest)
    if progress:
        log.info("synth: wrote %d samples to %s in %.1fs", len(samples), out, time.time() - start)
    return manifest
