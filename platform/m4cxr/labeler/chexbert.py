"""CheXbert (Smit et al., 2020) as a report labeler, from a local weights file.

The published checkpoint (`chexbert.pth`) holds `model_state_dict` of the authors' `bert_labeler`
wrapped in DataParallel: a BERT-base encoder (keys `module.bert.*`) whose [CLS] state feeds 14
linear heads (`module.linear_heads.{0..13}`): 13 observations with 4 classes (blank, positive,
negative, uncertain) and "No Finding" with 2 (blank, positive). Reports are stripped of line
breaks and repeated spaces, and cut to 512 tokens. A `config.json` beside the weights gives
another BERT shape; otherwise BERT-base is assumed, as published.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel

from m4cxr.tasks import chexbert_labels

CONDITIONS = chexbert_labels()  # the head order of the published checkpoint, as tasks.yaml lists them
CLASS_TO_LABEL = {0: None, 1: 1, 2: 0, 3: -1}  # blank, positive, negative, uncertain


class CheXbert(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=True)
        heads = [nn.Linear(config.hidden_size, 4) for _ in range(13)] + [nn.Linear(config.hidden_size, 2)]
        self.linear_heads = nn.ModuleList(heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        cls = self.bert(input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return [head(cls) for head in self.linear_heads]


class CheXbertLabeler:
    def __init__(self, weights: str | Path, tokenizer: str = "bert-base-uncased", device: str = "cpu",
                 batch_size: int = 32):
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"eval.chexbert_weights: {weights} does not exist (the CheXbert chexbert.pth)")
        config_path = weights.parent / "config.json"
        config = BertConfig.from_json_file(config_path) if config_path.is_file() else BertConfig()
        self.model = CheXbert(config)
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
        state = checkpoint.get("model_state_dict", checkpoint)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        # transformers no longer keeps position ids as a weight
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        shape = "config.json beside it" if config_path.is_file() else "BERT-base, as published"
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # tensors of another size
            raise ValueError(f"{weights}: not a CheXbert checkpoint of this BERT shape ({shape}): "
                             f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
        if missing or unexpected:
            raise ValueError(f"{weights}: not a CheXbert checkpoint of this BERT shape ({shape}); missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.device, self.batch_size = device, batch_size

    @staticmethod
    def clean(report: str) -> str:
        return re.sub(r"\s+", " ", (report or "").replace("\n", " ")).strip()

    @torch.no_grad()
    def label_reports(self, reports: list[str]) -> list[dict[str, int]]:
        """{observation: 1 | 0 | -1} per report; blank observations are left out."""
        out = []
        for start in range(0, len(reports), self.batch_size):
            texts = [self.clean(r) for r in reports[start:start + self.batch_size]]
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
            logits = self.model(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            classes = torch.stack([l.argmax(-1) for l in logits], dim=1).tolist()
            for row in classes:
                labels = {name: CLASS_TO_LABEL[c] for name, c in zip(CONDITIONS, row)}
                out.append({k: v for k, v in labels.items() if v is not None})
        return out
