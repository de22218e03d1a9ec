"""Data parsing for every GLUE task, bad files, and metrics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import f1_score, matthews_corrcoef

from src import preprocess as P
from tests.conftest import GLUE_FILES

EXPECTED_SPLITS = {"mnli": {"train", "validation", "validation_mm"}}


@pytest.mark.parametrize("task", sorted(P.TASKS))
def test_every_glue_task_parses(glue_dir, task):
    spec = P.TASKS[task]
    ds = P.load_glue(task, str(glue_dir), cache_dir="unused")
    assert set(ds) == EXPECTED_SPLITS.get(task, {"train", "validation"})
    assert len(ds["train"]) == GLUE_FILES[spec.folder][0][1]
    assert ("text_b" in ds["train"].column_names) == (spec.tsv_keys[1] is not None)
    labels = ds["train"]["label"]
    if spec.is_regression:
        assert all(isinstance(y, float) and 0 <= y <= 5 for y in labels)
    else:
        assert set(labels) <= set(range(spec.num_labels))
    assert ds["validation"]["idx"] == list(range(len(ds["validation"])))


def test_label_strings_map_to_the_hub_ids(tmp_path):
    (tmp_path / "MNLI").mkdir()
    head = "index\tsentence1\tsentence2\tgold_label"
    rows = ["0\ta\tb\tentailment", "1\tc\td\tneutral", "2\te\tf\tcontradiction"]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (tmp_path / "MNLI" / name).write_text("\n".join([head, *rows]) + "\n")
    ds = P.load_glue("mnli", str(tmp_path), "unused")
    assert ds["train"]["label"] == [0, 1, 2]  # nyu-mll/glue: entailment, neutral, contradiction
    assert ds["train"]["text_a"] == ["a", "c", "e"] and ds["train"]["text_b"] == ["b", "d", "f"]


def test_quotes_are_literal_text(tmp_path):
    (tmp_path / "SST-2").mkdir()
    text = "sentence\tlabel\nit 's \"great\" , isn't it \t1\n"
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "SST-2" / name).write_text(text)
    ds = P.load_glue("sst2", str(tmp_path), "unused")
    assert ds["train"]["text_a"] == ["it 's \"great\" , isn't it "]


def test_malformed_row_names_file_and_line(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two\n")
    with pytest.raises(P.DataError, match=r"RTE/train\.tsv:3: malformed row: expected 4 .* found 2"):
        P.load_glue("rte", str(tmp_path), "unused")


def test_wrong_label_set_names_file_and_line(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tneutral\n")
    with pytest.raises(P.DataError, match=r"train\.tsv:3: label 'neutral' does not belong to task SST-2"):
        P.load_glue("sst2", str(tmp_path), "unused")


def test_missing_folder_and_unknown_task(tmp_path):
    with pytest.raises(P.DataError, match="GLUE folder not found"):
        P.load_glue("sst2", str(tmp_path / "nowhere"), "unused")
    with pytest.raises(P.DataError, match="not a GLUE task"):
        P.task_spec("glue_foo")


def test_subsample_is_fixed_across_calls(glue_dir):
    ds = P.load_glue("sst2", str(glue_dir), "unused")["train"]
    assert P.subsample(ds, 10)["idx"] == P.subsample(ds, 10)["idx"]
    assert len(P.subsample(ds, 10)) == 10 and P.subsample(ds, None) is ds


def test_metrics_match_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    m = P.compute_metrics(P.TASKS["mrpc"], p, y)
    assert m["accuracy"] == pytest.approx((p == y).mean())
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    assert m["f1"] == pytest.approx(f1_score(y, p))
    assert "f1" not in P.compute_metrics(P.TASKS["sst2"], p, y)
    yr, pr = rng.normal(size=30), rng.normal(size=30)
    assert P.compute_metrics(P.TASKS["stsb"], pr, yr)["pearson"] == pytest.approx(pearsonr(pr, yr)[0])


def test_glue_score_follows_the_adalora_paper():
    assert P.glue_score(P.TASKS["mnli"], {"accuracy": 0.8, "accuracy_mm": 0.9}) == pytest.approx(0.85)
    assert P.glue_score(P.TASKS["qqp"], {"accuracy": 0.9, "f1": 0.8}) == pytest.approx(0.85)
    assert P.glue_score(P.TASKS["cola"], {"accuracy": 0.9, "mcc": 0.6}) == 0.6
    assert P.glue_score(P.TASKS["stsb"], {"pearson": 0.9, "spearman": 0.8}) == 0.9


def test_loaders_share_data_order_for_a_seed(glue_dir, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = P.tokenize(P.load_glue("sst2", str(glue_dir), "unused"), tok, 32)
    order = lambda seed: [b["idx"].tolist() for b in P.make_loaders(ds, tok, 16, 16, seed)[0]]  # noqa: E731
    assert order(3) == order(3) and order(3) != order(4)
