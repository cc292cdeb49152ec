"""SLAKE (Slake1.0), test only: English, X-ray, closed-ended questions (DATASETS.md section 18;
114 samples in the paper). It is never trained on.

Slake1.0/test.json is a JSON list of questions (img_id, img_name relative to imgs/, question,
answer, q_lang, modality, answer_type); images are imgs/xmlab<N>/source.jpg.
"""

from __future__ import annotations

from m4cxr.data.sources.common import Collector, SourceError, read_json

DATASET = "slake"


def read(c: Collector) -> None:
    folder = c.root / "Slake1.0" if (c.root / "Slake1.0").is_dir() else c.root
    if not (folder / "test.json").exists():
        raise SourceError(f"{c.root}: no Slake1.0/test.json (is this the SLAKE folder?)")
    records = read_json(folder / "test.json")
    if not isinstance(records, list):
        raise SourceError(f"{folder / 'test.json'}: expected a JSON list of questions")
    for n, rec in enumerate(records):
        record = f"test.json[{n}]"
        try:
            lang, modality, kind = rec["q_lang"], rec["modality"], str(rec["answer_type"]).upper()
            question, answer = str(rec["question"]).strip(), str(rec["answer"]).strip()
            name, img = str(rec["img_name"]), str(rec["img_id"])
            if not question or not answer:
                raise ValueError("empty question or answer")
        except (KeyError, ValueError, TypeError) as err:
            c.skip(record, str(err) if isinstance(err, ValueError) else f"malformed question: missing {err}")
            continue
        if lang != "en":
            c.exclude("not English")
        elif modality != "X-Ray":
            c.exclude("not an X-ray")
        elif kind != "CLOSED":
            c.exclude("open-ended question")
        else:
            image = c.image(f"slake_{name.split('/')[0]}", folder / "imgs" / name, patient=f"slake_{img}", split="test")
            c.add("vqa", {"question": question, "answer": f"{answer}."}, [(image, "current")], split="test",
                  patient=f"slake_{img}", study=f"slake_{img}")
