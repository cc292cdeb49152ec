"""CheXpert-14 labels of report texts, used by data preparation (chain-of-thought targets of
reports without label files) and by evaluation (the CheXbert-style F1s and sweep objectives).

`rules` is the rule-based labeler, the default; `chexbert` runs the published CheXbert model when
its weights are on disk (imported only then: it needs torch and transformers).
"""

from m4cxr.labeler.rules import OBSERVATIONS, label_report, label_reports

__all__ = ["OBSERVATIONS", "label_report", "label_reports"]
