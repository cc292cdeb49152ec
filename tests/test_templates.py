"""Every task renders to the text of the authors' templates (written out here, not read from the
package's tasks.yaml), plus the chain-of-thought answer rules."""

import re

import pytest

from m4cxr.config import DEFAULT_SYSTEM_PROMPT
from m4cxr.tasks import (
    NOT_FOUND, chexbert_labels, cot_candidates, count_images, findings_answer, positive_findings,
    render_conversation, task_names,
)

# The authors' templates (deepnoid-ai/M4CXR-TNNLS, exp/cxr_llm/data_utils/templates.py and the
# dataset classes that fill them), written out here by hand from their text, not from tasks.yaml.
# Where it differs from the paper's Table 9 as printed: "radiology image?" in the single-image
# question, the comma after "Based on the previous conversation", "radiology images" in the
# multi-image report question, "prior report}," and "images}," in multi-study, the comma in
# difference VQA, the answers' periods, and "Yes. {bbox}." / "Not present." in finding grounding.
AUTHORS = {
    "single_image": "User: radiology image: <image> Which of the following findings are present in the radiology image? Findings: {findings} Assistant: {findings} User: Based on the previous conversation, provide a description of the findings in the radiology image. Assistant: {report}",
    "multi_image": "User: radiology images: {images} Which of the following findings are present in the radiology images? Findings: {findings} Assistant: {findings} User: Based on the previous conversation, provide a description of the findings in the radiology images. Assistant: {report}",
    "multi_study": "User: prior radiology images: {prior images}, prior radiology report: {prior report} follow-up images: {follow-up images}, The radiology studies are given in chronological order. Which of the following findings are present in the current follow-up radiology images? Findings: {findings} Assistant: {findings} User: Based on the previous conversation, provide a description of the findings in the current follow-up radiology images. Assistant: {report}",
    "disease_classification": "User: radiology image: <image> Which of the following findings are present in the radiology image? Findings: {findings} Assistant: {findings}",
    "finding_grounding": "User: radiology image: <image> Is {finding} present in the radiology image? If so, provide the bounding box coordinates of the region. Assistant: Yes. {bbox}.",
    "grounded_finding": "User: radiology image: <image> Provide a finding name for this region. {bbox} Assistant: {finding}.",
    "abnormality_detection": "User: radiology image: <image> Provide the bounding box coordinates of abnormal regions in the radiology image. Assistant: {bbox}.",
    "multi_finding_grounding": "User: radiology image: <image> Which of the following findings are present in the radiology image? Provide the bounding box coordinates if present. Findings: {findings} Assistant: {findings, bboxes}.",
    "organ_grounding": "User: radiology image: <image> Provide the bounding box coordinates of {organ} in the radiology image. Assistant: {bbox}",
    "grounded_organ": "User: radiology image: <image> Provide an organ name for this region. {bbox} Assistant: {organ}.",
    "grounded_phrase_generation": "User: radiology image: <image> Provide a radiology report phrase for the region. {bbox}. Assistant: {phrase}.",
    "phrase_grounding": "User: radiology image: <image> Provide the bounding box coordinate of the region this phrase describes: {phrase} Assistant: {bbox}.",
    "anatomical_region_grounding": "User: radiology image: <image> Provide the bounding box coordinate of the anatomical region. {name} Assistant: {bbox}.",
    "grounded_anatomical_region": "User: radiology image: <image> Provide an anatomical region name for this region. {bbox} Assistant: {name}.",
    "vqa": "User: radiology image: <image> Answer the question. {question} Assistant: {answer}",
    "difference_vqa": "User: reference: <image>, main: <image> Using the provided reference and main radiology images, answer the following question. {question} Assistant: {answer}",
    "visual_instruction_following": "User: radiology image: <image> {question} Assistant: {answer}",
}

CANDIDATES = ["Atelectasis", "Cardiomegaly", "Edema"]
FIELDS = {
    "images": 2, "prior_images": 3, "follow_up_images": 2, "findings": CANDIDATES, "positives": ["Edema", "Atelectasis"],
    "report": "Mild edema. Basilar atelectasis.", "prior_report": "Clear lungs.", "finding": "Nodule",
    "organ": "Left Lung", "phrase": "small left effusion", "name": "right apical zone",
    "question": "Is there an effusion?", "answer": "yes", "bbox": [10, 20, 30, 40],
    "findings_with_bboxes": [("Atelectasis", [[1, 2, 3, 4]]), ("Edema", [[5, 6, 7, 8], [9, 10, 11, 12]])],
}
VALUES = {  # what each placeholder becomes for FIELDS, written out by hand
    ("user", "findings"): "atelectasis, cardiomegaly, edema",
    ("assistant", "findings"): "atelectasis, edema.",
    "images": "<image> <image>", "prior images": "<image> <image> <image>", "follow-up images": "<image> <image>",
    "report": "Mild edema. Basilar atelectasis.", "prior report": "Clear lungs.", "finding": "nodule",
    "organ": "left lung", "phrase": "small left effusion", "name": "right apical zone",
    "question": "Is there an effusion?", "answer": "yes", "bbox": "[10,20,30,40]",
    "findings, bboxes": "atelectasis [1,2,3,4], edema [5,6,7,8], [9,10,11,12]",
}


def expected_turns(task):
    parts = re.split(r"(?:^| )(User|Assistant): ", AUTHORS[task])[1:]
    turns = []
    for role, text in zip(parts[0::2], parts[1::2]):
        role = role.lower()
        text = re.sub(r"\{([^}]+)\}", lambda m: VALUES.get((role, m.group(1)), VALUES.get(m.group(1))), text)
        turns.append({"role": role, "content": text})
    return turns


def test_the_package_knows_all_17_tasks():
    assert sorted(task_names()) == sorted(AUTHORS)


@pytest.mark.parametrize("task", sorted(AUTHORS))
def test_every_task_renders_to_the_authors_template(task):
    turns = render_conversation(task, FIELDS)
    assert turns[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT} == {"role": "system", "content": (
        "The following is a conversation between a curious human and an AI medical assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.")}
    assert turns[1:] == expected_turns(task)


def test_image_placeholders_match_the_images():
    assert count_images(render_conversation("single_image", FIELDS)) == 1
    assert count_images(render_conversation("multi_image", {**FIELDS, "images": 5})) == 5
    assert count_images(render_conversation("multi_study", FIELDS)) == 5
    assert count_images(render_conversation("difference_vqa", FIELDS)) == 2
    with pytest.raises(ValueError, match="at least one image"):
        render_conversation("multi_image", {**FIELDS, "images": 0})
    with pytest.raises(KeyError, match="needs {report}"):
        render_conversation("single_image", {k: v for k, v in FIELDS.items() if k != "report"})


def test_chain_of_thought_answer_rules():
    cands = cot_candidates()
    assert len(cands) == 13 and "No Finding" not in cands and chexbert_labels()[-1] == "No Finding"
    labels = {"Support Devices": 1, "Pleural Effusion": 1, "Atelectasis": -1, "Edema": 0, "No Finding": 0}
    # uncertain counts as absent; the answer follows the candidate order and ends with a period
    assert positive_findings(labels, cands) == ["Pleural Effusion", "Support Devices"]
    assert findings_answer(positive_findings(labels, cands)) == "pleural effusion, support devices."
    assert findings_answer([]) == NOT_FOUND == "Not found."
    assert findings_answer(["Edema", "Cardiomegaly"], cands) == "cardiomegaly, edema."
    turns = render_conversation("single_image", {**FIELDS, "findings": cands, "positives": []})
    assert turns[2]["content"] == "Not found."
    assert render_conversation("abnormality_detection", {"bbox": []})[-1]["content"] == "Not found."
    assert render_conversation("finding_grounding", {"finding": "Edema", "bbox": []})[-1]["content"] == "Not present."


def test_no_cot_variant_is_one_turn():
    turns = render_conversation("multi_study", FIELDS, cot=False)
    assert [t["role"] for t in turns] == ["system", "user", "assistant"]
    assert turns[1]["content"] == (  # the authors' "history" template
        "prior radiology images: <image> <image> <image>, prior radiology report: Clear lungs. follow-up images: "
        "<image> <image>, The radiology studies are given in chronological order. Provide a description of the "
        "findings in the current follow-up radiology images.")
    assert render_conversation("single_image", FIELDS, cot=False)[1]["content"] == (  # their "mrg"
        "radiology image: <image> Provide a description of the findings in the radiology image.")
    assert render_conversation("multi_image", FIELDS, cot=False)[1]["content"] == (  # their "frontal_lateral"
        "radiology images: <image> <image> Provide a description of the findings in the radiology images.")
    assert turns[2]["content"] == FIELDS["report"]


def test_follow_up_turns_are_appended():
    turns = render_conversation("visual_instruction_following", FIELDS, follow_ups=[("Summarise.", "Short.")])
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user", "assistant"]
    assert turns[-2:] == [{"role": "user", "content": "Summarise."}, {"role": "assistant", "content": "Short."}]
