"""Data parsing for every GLUE task, bad files, and metrics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import f1_score, matthews_corrcoef

from src import preprocess as P
from tests.conftest import GLUE_FILES, REPO

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


# ---------------------------------------------------------------------------------------------------------------
# Official files as distributed: a byte-order mark (MRPC), Windows line ends, MNLI's 16-column dev files, QQP's
# broken rows. Anything else unexpected stays a file:line error.

def _write_variants(root, folder: str, lines: list[str], names=("train.tsv", "dev.tsv")) -> dict:
    """The same rows as plain LF, BOM + LF, CRLF and BOM + CRLF files, one GLUE folder each."""
    variants = {"plain": ("", "\n"), "bom": ("\ufeff", "\n"), "crlf": ("", "\r\n"), "bom+crlf": ("\ufeff", "\r\n")}
    out = {}
    for variant, (bom, end) in variants.items():
        (root / variant / folder).mkdir(parents=True)
        for name in names:
            (root / variant / folder / name).write_bytes((bom + end.join(lines) + end).encode("utf-8"))
        out[variant] = root / variant
    return out


@pytest.mark.parametrize("task", ["mrpc", "cola", "stsb", "sst2", "mnli"])
def test_bom_and_crlf_give_the_same_rows_as_the_plain_file(tmp_path, task):
    import random

    from tests.conftest import glue_rows

    spec = P.TASKS[task]
    lines = glue_rows(spec.folder, 12, random.Random(0))
    names = ("train.tsv", *spec.dev_files.values())
    folders = _write_variants(tmp_path, spec.folder, lines, names)
    loaded = {v: P.load_glue(task, str(d), "unused")["train"].to_dict() for v, d in folders.items()}
    assert len(loaded["plain"]["label"]) == 12
    for variant in ("bom", "crlf", "bom+crlf"):
        assert loaded[variant] == loaded["plain"], variant
    assert not any(t.endswith("\r") or t.startswith("\ufeff") for t in loaded["bom+crlf"]["text_a"])


def test_fixture_carries_the_official_quirks(glue_dir):
    train, dev = (glue_dir / "MRPC" / "train.tsv").read_bytes(), (glue_dir / "MRPC" / "dev.tsv").read_bytes()
    assert train.startswith(b"\xef\xbb\xbfQuality\t") and dev.startswith(b"\xef\xbb\xbf") and b"\r\n" in dev
    assert (glue_dir / "MNLI" / "dev_matched.tsv").read_text().splitlines()[0].count("\t") == 15
    ds = P.load_glue("mrpc", str(glue_dir), "unused")
    assert len(ds["validation"]) == GLUE_FILES["MRPC"][1][1]
    assert not any("\r" in t for t in ds["validation"]["text_b"])


@pytest.mark.parametrize("variant", ["bom", "crlf", "bom+crlf"])
def test_malformed_row_in_a_bom_or_crlf_file_is_still_a_file_line_error(tmp_path, variant):
    lines = ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\tonly two", "2\tc\td\tentailment"]
    root = _write_variants(tmp_path, "RTE", lines)[variant]
    with pytest.raises(P.DataError, match=r"RTE/train\.tsv:3: malformed row: expected 4 .* found 2"):
        P.load_glue("rte", str(root), "unused")
    lines[2] = "1\tc\td\tmaybe"
    root = _write_variants(tmp_path / "label", "RTE", lines)[variant]
    with pytest.raises(P.DataError, match=r"RTE/train\.tsv:3: label 'maybe' does not belong to task RTE"):
        P.load_glue("rte", str(root), "unused")


def test_bom_in_the_middle_or_a_header_typo_is_an_error(tmp_path):
    (tmp_path / "MRPC").mkdir()
    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    (tmp_path / "MRPC" / "train.tsv").write_text(f"{head}\n\ufeff1\t1\t2\ta\tb\n")
    with pytest.raises(P.DataError, match=r"MRPC/train\.tsv:2: label '\\ufeff1' does not belong"):
        P.load_glue("mrpc", str(tmp_path), "unused")
    (tmp_path / "MRPC" / "train.tsv").write_text(head.replace("Quality", "Qualty") + "\n1\t1\t2\ta\tb\n")
    with pytest.raises(P.DataError, match=r"MRPC/train\.tsv:1: header lacks column\(s\) \['Quality'\]"):
        P.load_glue("mrpc", str(tmp_path), "unused")


def test_cola_without_header_still_checks_every_row(tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_bytes(b"gj04\t1\t\tgood .\r\ngj04\t0\t*\r\n")
    with pytest.raises(P.DataError, match=r"CoLA/train\.tsv:2: malformed row: expected 4 .* found 3"):
        P.load_glue("cola", str(tmp_path), "unused")


def test_qqp_broken_rows_are_skipped_as_the_reference_loaders_do(tmp_path, caplog):
    (tmp_path / "QQP").mkdir()
    head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    rows = ["0\t1\t2\ta?\tb?\t0", '1\t3\t4\t"Why?', '"\tWas he real?\t0', "2\t5\t6\tc?\td?\t1"]
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "QQP" / name).write_text("\n".join([head, *rows]) + "\n")
    with caplog.at_level("WARNING", logger="src.preprocess"):
        ds = P.load_glue("qqp", str(tmp_path), "unused")
    assert ds["train"]["text_a"] == ["a?", "c?"] and ds["train"]["label"] == [0, 1]
    assert "QQP/train.tsv: skipped 2 row(s) with fewer than 6 fields" in caplog.text and "line 3" in caplog.text
    (tmp_path / "QQP" / "train.tsv").write_text("\n".join([head, rows[0], "3\t7\t8\te?\tf\tg?\t1"]) + "\n")
    with pytest.raises(P.DataError, match=r"QQP/train\.tsv:3: malformed row: expected 6 .* found 7"):
        P.load_glue("qqp", str(tmp_path), "unused")


def test_short_rows_are_an_error_outside_qqp(tmp_path):
    (tmp_path / "STS-B").mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    (tmp_path / "STS-B" / "train.tsv").write_text(f"{head}\n0\tg\tf\t2012\t0\tnone\tnone\ta\tb\n")
    with pytest.raises(P.DataError, match=r"STS-B/train\.tsv:2: malformed row: expected 10 .* found 9"):
        P.load_glue("stsb", str(tmp_path), "unused")


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9 \t1\n")
    with pytest.raises(P.DataError, match=r"SST-2/train\.tsv:3: not UTF-8 text"):
        P.load_glue("sst2", str(tmp_path), "unused")


def test_bundled_glue_files_are_the_official_ones():
    """data/glue holds the official files byte for byte (data/glue/SOURCES.md): a re-encoded or edited copy fails."""
    import hashlib
    expected = {
        "SST-2/train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
        "SST-2/dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
        "CoLA/train.tsv": "cb368ebeb9f27d7ad03720d27ddc95687a311bdb100781a2fe59a5f5b1bc0624",
        "CoLA/dev.tsv": "8c013e21dc39957cac37378d87bebe225b694a0d5fe13eded66c2856628833fd",
        "MRPC/train.tsv": "122becc469405bc16f9defcb8715d2a4b7ce600e9d9381e6dc42bfdd1494c51d",
        "MRPC/dev.tsv": "81c8a1a9e1dfe461dd2c1a4f98f43fe18bece44d2bf9e3d0b245b88e5aa5eaf7",
        "STS-B/train.tsv": "41c4d978b6162abdcada7e49a982211954cca5459c228db478af333124b257a2",
        "STS-B/dev.tsv": "fe7dc0632a5033562f3cadff991f6e8d9b9b6311861660e78c3c82eb7db67f59",
    }
    root = REPO / "data" / "glue"
    for name, digest in expected.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name
        assert digest in (root / "SOURCES.md").read_text(), name
    assert (root / "MRPC" / "Microsoft Shared Source License.htm").exists()


def test_the_official_split_sizes_table_matches_the_official_files():
    """GLUE_SIZES (a forecast's sizes for a task whose files are absent) against the four official tasks here."""
    for task in ("sst2", "cola", "mrpc", "stsb"):
        data = P.load_glue(task, str(REPO / "data" / "glue"), "unused")
        assert {split: len(ds) for split, ds in data.items()} == P.GLUE_SIZES[task], task
    assert set(P.GLUE_SIZES) == set(P.TASKS)
    assert all(set(sizes) == {"train", *P.TASKS[t].dev_files} for t, sizes in P.GLUE_SIZES.items())


def test_tokenised_splits_are_cached_by_content_tokenizer_and_length(glue_dir, tiny_model, tmp_path):
    """The first call tokenises and writes, the next reads the same rows back; other rows (a subsample), another
    max_length or no cache folder make their own; a reader that may not write tokenises itself."""
    from transformers import AutoTokenizer

    def fresh():  # a run loads its tokenizer fresh; calling it sets truncation state that the key must not see
        return AutoTokenizer.from_pretrained(tiny_model)

    raw = P.load_glue("rte", str(glue_dir), "unused")
    first, how = P.tokenize_cached(raw, fresh(), 32, tmp_path)
    assert how == "written" and len(list((tmp_path / "tokenized").iterdir())) == 1
    again, how = P.tokenize_cached(P.load_glue("rte", str(glue_dir), "unused"), fresh(), 32, tmp_path)
    assert how == "read"
    plain = P.tokenize(raw, fresh(), 32)
    for split in plain:
        assert again[split].to_dict() == plain[split].to_dict() == first[split].to_dict()
    sub = P.DatasetDict({**raw, "train": P.subsample(raw["train"], 10)})
    assert P.tokenize_cached(sub, fresh(), 32, tmp_path)[1] == "written"
    assert P.tokenize_cached(raw, fresh(), 16, tmp_path, write=False)[1] == "tokenized"
    assert P.tokenize_cached(raw, fresh(), 16, tmp_path)[1] == "written"
    assert len(list((tmp_path / "tokenized").iterdir())) == 3
    assert P.tokenize_cached(raw, fresh(), 32, None)[1] == "tokenized"
