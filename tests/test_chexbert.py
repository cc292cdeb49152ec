"""CheXbert from a local checkpoint, without the published weights: BERT-base with CheXbert's 14
heads, random weights, saved in the published checkpoint's layout (DataParallel `module.` keys
under `model_state_dict`, the encoder under `module.bert`, heads `module.linear_heads.{0..13}`:
13 of 4 classes blank/positive/negative/uncertain, No Finding's of 2), loaded by the platform
and run on reports. No download: the BERT shape comes from a local config.json, the tokenizer is
trained here."""

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from m4cxr.config import load_experiment
from m4cxr.eval.scoring import labeler_agreement, report_labeler
from m4cxr.labeler.chexbert import CheXbertLabeler

from conftest import ROOT

# the published head order (stanfordmlgroup/CheXbert src/constants.py)
PUBLISHED_CONDITIONS = ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                        "Pleural Other", "Fracture", "Support Devices", "No Finding"]
REPORTS = ["The heart is enlarged.\n\nNo pleural   effusion.", "no pleural effusion", "",
           " ".join(["mild bibasilar atelectasis"] * 300)]  # longer than 512 tokens


def word_piece_tokenizer(folder):
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(["the heart is enlarged", "no pleural effusion", "mild bibasilar atelectasis"] * 10,
                           trainers.WordPieceTrainer(vocab_size=80, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    wp.post_processor = processors.TemplateProcessing(  # [CLS] report [SEP], as bert-base-uncased's tokenizer
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", wp.token_to_id("[CLS]")), ("[SEP]", wp.token_to_id("[SEP]"))])
    PreTrainedTokenizerFast(tokenizer_object=wp, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    return str(folder)


def published_layout_checkpoint(path, config: BertConfig, heads: list[tuple[torch.Tensor, torch.Tensor]]):
    """A checkpoint laid out as the published chexbert.pth, built without the platform's class."""
    torch.manual_seed(0)
    encoder = BertModel(config, add_pooling_layer=True).eval()
    state = {f"module.bert.{k}": v for k, v in encoder.state_dict().items()}
    # checkpoints written by older transformers also hold the position ids as a weight
    state["module.bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    for i, (weight, bias) in enumerate(heads):
        state[f"module.linear_heads.{i}.weight"], state[f"module.linear_heads.{i}.bias"] = weight, bias
    torch.save({"epoch": 7, "model_state_dict": state}, path)
    return encoder


@pytest.fixture(scope="module")
def bert_base_checkpoint(tmp_path_factory):
    """BERT-base (a local config.json with the published shape) and 14 heads: Cardiomegaly always
    positive, Edema always uncertain, Lung Opacity always blank, Pneumonia decided by random weights
    on the [CLS] state, No Finding positive, the rest negative."""
    folder = tmp_path_factory.mktemp("chexbert")
    config = BertConfig()  # bert-base-uncased: 30522 words, 768 wide, 12 layers, 12 heads
    config.to_json_file(folder / "config.json")
    hidden = config.hidden_size
    heads = []
    for name in PUBLISHED_CONDITIONS:
        classes = 2 if name == "No Finding" else 4
        bias = {"Cardiomegaly": [0.0, 9.0, 0.0, 0.0], "Edema": [0.0, 0.0, 0.0, 9.0], "Lung Opacity": [9.0, 0, 0, 0],
                "No Finding": [0.0, 9.0]}.get(name, [0.0, 0.0, 9.0, 0.0])
        weight = torch.randn(classes, hidden) if name == "Pneumonia" else torch.zeros(classes, hidden)
        heads.append((weight, torch.tensor(bias if name != "Pneumonia" else [0.0] * 4)))
    encoder = published_layout_checkpoint(folder / "chexbert.pth", config, heads)
    return folder, encoder, heads


def test_each_head_is_read_as_its_observation_in_the_published_order(tmp_path):
    """A checkpoint whose head i alone answers (positive, negative or uncertain by i) labels a
    report with the i-th observation of the published order and that answer, nothing else."""
    config = BertConfig(vocab_size=80, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    tokenizer = word_piece_tokenizer(tmp_path / "tok")
    sizes = [2 if name == "No Finding" else 4 for name in PUBLISHED_CONDITIONS]

    def head(classes, answer):  # zero weights: the bias alone picks the class, whatever the report
        bias = torch.zeros(classes)
        bias[answer] = 9.0
        return torch.zeros(classes, config.hidden_size), bias

    for i, name in enumerate(PUBLISHED_CONDITIONS):
        answer = 1 if name == "No Finding" else 1 + i % 3  # classes: blank, positive, negative, uncertain
        folder = tmp_path / f"head{i}"
        folder.mkdir()
        config.to_json_file(folder / "config.json")
        published_layout_checkpoint(folder / "chexbert.pth", config,
                                    [head(size, answer if j == i else 0) for j, size in enumerate(sizes)])
        labeler = CheXbertLabeler(folder / "chexbert.pth", tokenizer)
        expected = {name: {1: 1, 2: 0, 3: -1}[answer]}
        assert labeler.label_reports(["the heart is enlarged", ""]) == [expected, expected]


def test_bert_base_checkpoint_in_the_published_layout_is_loaded_and_run(bert_base_checkpoint, tmp_path):
    folder, encoder, heads = bert_base_checkpoint
    labeler = CheXbertLabeler(folder / "chexbert.pth", word_piece_tokenizer(tmp_path / "tok"))
    assert torch.equal(labeler.model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    assert labeler.model.bert.config.num_hidden_layers == 12 and labeler.model.bert.config.hidden_size == 768

    labels = labeler.label_reports(REPORTS)
    assert len(labels) == len(REPORTS)
    for got in labels:
        assert got["Cardiomegaly"] == 1 and got["Edema"] == -1 and got["No Finding"] == 1
        assert "Lung Opacity" not in got and got["Pleural Effusion"] == 0 and got["Fracture"] == 0
        assert set(got.values()) <= {1, 0, -1} and set(got) <= set(PUBLISHED_CONDITIONS)

    # the Pneumonia head reads the encoder's [CLS] state: the same as BERT by hand on the cleaned text
    tokenizer = labeler.tokenizer
    weight, _ = heads[PUBLISHED_CONDITIONS.index("Pneumonia")]
    by_class = {0: None, 1: 1, 2: 0, 3: -1}
    for report, got in zip(REPORTS, labels):
        enc = tokenizer([CheXbertLabeler.clean(report)], truncation=True, max_length=512, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and len(ids) <= 512
        with torch.no_grad():
            cls = encoder(enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]
        assert got.get("Pneumonia") == by_class[int((cls @ weight.T).argmax())]


def test_checkpoint_of_another_shape_is_refused(bert_base_checkpoint, tmp_path):
    folder, _, _ = bert_base_checkpoint
    other = tmp_path / "other"
    other.mkdir()
    (other / "chexbert.pth").symlink_to(folder / "chexbert.pth")
    BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128).to_json_file(
        other / "config.json")
    with pytest.raises(ValueError, match="not a CheXbert checkpoint of this BERT shape .config.json beside it.: size"):
        CheXbertLabeler(other / "chexbert.pth", word_piece_tokenizer(tmp_path / "tok"))


def test_checkpoint_without_the_heads_is_refused(tmp_path):
    config = BertConfig(vocab_size=80, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.to_json_file(tmp_path / "config.json")
    published_layout_checkpoint(tmp_path / "chexbert.pth", config, heads=[])
    with pytest.raises(ValueError, match="not a CheXbert checkpoint.*missing"):
        CheXbertLabeler(tmp_path / "chexbert.pth", word_piece_tokenizer(tmp_path / "tok"))
    with pytest.raises(FileNotFoundError, match="chexbert_weights"):
        CheXbertLabeler(tmp_path / "missing.pth", str(tmp_path / "tok"))


def test_evaluation_uses_chexbert_when_its_weights_are_set(bert_base_checkpoint, tmp_path):
    folder, _, _ = bert_base_checkpoint
    exp = load_experiment(ROOT / "experiments/quickstart.yaml", [
        f"eval.chexbert_weights={folder / 'chexbert.pth'}", f"eval.chexbert_tokenizer={word_piece_tokenizer(tmp_path)}"])
    label, name = report_labeler(exp)
    assert name.startswith("CheXbert") and labeler_agreement(exp) is None
    assert label(["The heart is enlarged."])[0]["Cardiomegaly"] == 1
    rules_name = report_labeler(load_experiment(ROOT / "experiments/quickstart.yaml", []))[1]
    assert "not CheXbert" in rules_name and "micro-F1" in rules_name
