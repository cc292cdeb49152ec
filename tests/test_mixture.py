import csv

import numpy as np
import pytest

from m4cxr.config import MixtureConfig, PairWeight, load_experiment
from m4cxr.data.mixture import build_mixture
from m4cxr.cli import main

from conftest import ROOT

PAPER = load_experiment(ROOT / "experiments/m4cxr.yaml")


def table10():
    with open(ROOT / "platform/m4cxr/resources/mixture_table10.csv") as f:
        return list(csv.DictReader(f))


def test_paper_mixture_has_50_pairs_and_the_papers_shares():
    mix = build_mixture(PAPER.data.mixture)
    assert len(mix.pairs) == 50
    shares = mix.task_type_shares()
    assert [round(shares[t], 2) for t in ("mrg", "image_understanding", "vqa")] == [0.54, 0.35, 0.11]
    assert mix.probabilities.sum() == pytest.approx(1.0)
    # the experiment file and the packaged Table 10 agree
    assert {p.key: p.weight for p in build_mixture(MixtureConfig()).pairs} == {p.key: p.weight for p in mix.pairs}


def test_strategy_shares():
    rows = table10()
    sizes = {r["task_type"]: 0 for r in rows}
    counts = {r["task_type"]: 0 for r in rows}
    for r in rows:
        sizes[r["task_type"]] += int(r["train_instances"])
        counts[r["task_type"]] += 1
    total = sum(sizes.values())
    expected = {
        "d1": {t: counts[t] / 50 for t in counts},  # MRG 3 of 50, VQA 4 of 50
        "d2": {t: sizes[t] / total for t in sizes},
        "d3": {t: 1 / 3 for t in counts},
        "d4": {t: 1 / 3 for t in counts},
    }
    assert expected["d1"]["mrg"] == 0.06 and expected["d1"]["vqa"] == 0.08
    for strategy, want in expected.items():
        mix = build_mixture(PAPER.data.mixture, strategy=strategy)
        got = mix.task_type_shares()
        for t in want:
            assert got[t] == pytest.approx(want[t], abs=1e-9), (strategy, t)
    # within a task type: d3 uniform, d4 by size
    d3 = build_mixture(PAPER.data.mixture, strategy="d3")
    vqa = [q for p, q in zip(d3.pairs, d3.probabilities) if p.task_type == "vqa"]
    assert np.allclose(vqa, 1 / 12)
    d4 = build_mixture(PAPER.data.mixture, strategy="d4")
    prob = dict(zip([p.key for p in d4.pairs], d4.probabilities))
    assert prob["single_image/mimic_cxr"] == pytest.approx(270236 / (270236 + 151606 + 68373) / 3)


def test_seeded_draw_is_reproducible_and_resumable():
    mix = build_mixture(PAPER.data.mixture)
    a_pairs, a_within = mix.draw(10000)
    b_pairs, b_within = build_mixture(PAPER.data.mixture).draw(10000)
    assert (a_pairs == b_pairs).all() and (a_within == b_within).all()
    # resuming at position 6000 continues the same stream, across chunk boundaries
    c_pairs, c_within = mix.draw(4000, start=6000)
    assert (c_pairs == a_pairs[6000:]).all() and (c_within == a_within[6000:]).all()
    other = build_mixture(MixtureConfig(pairs=PAPER.data.mixture.pairs, seed=1)).draw(10000)[0]
    assert (other != a_pairs).mean() > 0.3
    # frequencies follow the probabilities
    freq = np.bincount(mix.draw(200000)[0], minlength=50) / 200000
    assert np.abs(freq - mix.probabilities).max() < 0.005


def test_pairs_without_data_are_reported_then_dropped_or_raise(caplog):
    available = {"single_image/mimic_cxr": 10, "vqa/mimic_cxr_vqa": 5}
    with caplog.at_level("WARNING", logger="m4cxr.data.mixture"):
        mix = build_mixture(PAPER.data.mixture, available)
    assert [p.key for p in mix.pairs] == ["single_image/mimic_cxr", "vqa/mimic_cxr_vqa"]
    assert len(mix.dropped) == 48 and "48 pair(s) without data dropped" in caplog.text
    assert mix.probabilities == pytest.approx([200 / 202, 2 / 202])
    strict = MixtureConfig(pairs=PAPER.data.mixture.pairs, on_missing_pair="error")
    with pytest.raises(ValueError, match="48 mixture pair\\(s\\) have no data at hand: multi_image/mimic_cxr"):
        build_mixture(strict, available)


def test_bad_pairs_are_errors():
    with pytest.raises(ValueError, match="unknown task 'report'"):
        build_mixture(MixtureConfig(pairs={"report/mimic": PairWeight(1.0)}))
    with pytest.raises(ValueError, match="must be written 'task/dataset'"):
        build_mixture(MixtureConfig(pairs={"vqa": PairWeight(1.0)}))
    with pytest.raises(ValueError, match="needs the size of every pair"):
        build_mixture(MixtureConfig(pairs={"vqa/x": PairWeight(1.0)}), strategy="d2")


def test_mixture_show_json(capsys):
    import json

    for strategy, mrg in [("empirical", 0.54), ("d1", 0.06), ("d2", 0.16), ("d3", 0.33), ("d4", 0.33)]:
        assert main(["mixture", "show", str(ROOT / "experiments/m4cxr.yaml"), "--strategy", strategy, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["pairs"] == 50 and len(info["probabilities"]) == 50
        assert round(info["task_type_shares"]["mrg"], 2) == mrg
        assert set(info["task_type_shares"]) == {"mrg", "image_understanding", "vqa"}
