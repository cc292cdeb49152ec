"""CheXpert-14 labels of report texts, used by data preparation (chain-of-thought targets of
reports without label files) and by evaluation (the CheXbert-style F1s and sweep objectives).

`rules` is the rule-based labeler, the default; `chexbert` runs the published CheXbert model when
its weights are on disk (imported only then: it needs torch and transformers).

The rule labeler's agreement with expert labels on real reports is measured by
benchmarks/labeler_agreement.py, which writes the figures (never report text) to
resources/labeler_agreement.json; evaluation pages quote them.
"""

from __future__ import annotations

import json
from importlib import resources

from m4cxr.labeler.rules import OBSERVATIONS, label_report, label_reports

__all__ = ["OBSERVATIONS", "label_report", "label_reports", "measured_agreement", "rule_labeler_name"]


def measured_agreement() -> dict | None:
    """The benchmark's figures for the rule labeler (micro_f1, per_observation_f1, reports, gold),
    or None when the package holds none."""
    path = resources.files("m4cxr").joinpath("resources/labeler_agreement.json")
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def rule_labeler_name() -> str:
    """How result pages name the rule labeler: what it is and how well it agrees with experts."""
    name = "rule-based CheXpert-14 labeler (m4cxr.labeler.rules, not CheXbert)"
    agreement = measured_agreement()
    if agreement is None:
        return name + ": agreement with expert labels not measured"
    return (f"{name}: micro-F1 {agreement['micro_f1']:.3f} against expert labels of {agreement['reports']:,} real "
            f"reports, {len(agreement['per_observation_f1'])} observations ({agreement['benchmark']})")
