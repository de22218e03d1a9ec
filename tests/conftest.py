"""Shared fixtures: a tiny DeBERTa-v2 and a tokenizer built offline, and small GLUE-format folders."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORDS = ("good bad great awful fine movie film plot actor story boring fun dull bright dark the a is was not very "
         "really quite and but with without man woman dog cat ran sat on under over house tree").split()


def _sentence(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 9)))


def _tiny_tokenizer(folder: Path):
    """A WordPiece tokenizer trained on WORDS (BERT-style: [CLS] a [SEP] b [SEP]), saved to `folder`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    rng = random.Random(0)
    tok.train_from_iterator([_sentence(rng) for _ in range(500)],
                            trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return tok


def _save_seeded(model_class, config, folder: Path) -> Path:
    """The same random weights in every session: a test's outcome must not depend on the draw."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model_class(config).save_pretrained(folder)
    return folder


def build_tiny_backbone(folder: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised DeBERTa-v2 (v3-style relative attention) and a WordPiece tokenizer trained on WORDS."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tok = _tiny_tokenizer(folder)
    config = DebertaV2Config(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128, relative_attention=True, position_buckets=16,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
        pooler_hidden_size=hidden, type_vocab_size=0, pad_token_id=0)
    return _save_seeded(DebertaV2ForSequenceClassification, config, folder)


def build_tiny_bert(folder: Path, hidden: int = 32, layers: int = 6) -> Path:
    """A randomly initialised BERT (the MiniLM configs' module names: query/key/value, attention.output.dense, ...)
    with the same WordPiece tokenizer; 6 layers as all-MiniLM-L6-v2, so its 36 adapted matrices and rank budgets
    are the real ones."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = _tiny_tokenizer(folder)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                        type_vocab_size=2, pad_token_id=0)
    return _save_seeded(BertForSequenceClassification, config, folder)


GLUE_FILES = {
    "SST-2": [("train.tsv", 96), ("dev.tsv", 24)],
    "RTE": [("train.tsv", 64), ("dev.tsv", 16)],
    "MNLI": [("train.tsv", 64), ("dev_matched.tsv", 16), ("dev_mismatched.tsv", 16)],
    "CoLA": [("train.tsv", 48), ("dev.tsv", 16)],
    "STS-B": [("train.tsv", 48), ("dev.tsv", 16)],
    "MRPC": [("train.tsv", 48), ("dev.tsv", 16)],
    "QQP": [("train.tsv", 48), ("dev.tsv", 16)],
    "QNLI": [("train.tsv", 48), ("dev.tsv", 16)],
    "WNLI": [("train.tsv", 48), ("dev.tsv", 16)],
}


def glue_rows(task: str, n: int, rng: random.Random, dev: bool = False) -> list[str]:
    """Rows in each task's official GLUE TSV layout (header included, CoLA has none), `dev` for a dev file's."""
    s = lambda: _sentence(rng)  # noqa: E731
    nli = ["entailment", "not_entailment"]
    if task == "SST-2":
        return ["sentence\tlabel"] + [f"{s()} \t{rng.randint(0, 1)}" for _ in range(n)]
    if task == "CoLA":
        return [f"gj04\t{rng.randint(0, 1)}\t\t{s()}" for _ in range(n)]
    if task in ("RTE", "WNLI"):
        labels = nli if task == "RTE" else ["0", "1"]
        return ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\t{s()}\t{s()}\t{rng.choice(labels)}" for i in range(n)]
    if task == "QNLI":
        return ["index\tquestion\tsentence\tlabel"] + [f"{i}\t{s()}?\t{s()}\t{rng.choice(nli)}" for i in range(n)]
    if task == "MRPC":  # write_glue adds the byte-order mark the official files start with
        return ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
            f"{rng.randint(0, 1)}\t{i}\t{i + 1000}\t{s()}\t{s()}" for i in range(n)]
    if task == "QQP":
        rows = [f"{i}\t{2 * i}\t{2 * i + 1}\t{s()}?\t{s()}?\t{rng.randint(0, 1)}" for i in range(n)]
        if not dev:  # the older QQP.zip: a quoted line break splits a row in two (4 + 3 fields); loaders drop both
            rows[n // 2:n // 2] = [f'{n}\t{2 * n}\t{2 * n + 1}\t"Why?', '"\tWas Muhammad a real figure?\t0']
        return ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"] + rows
    if task == "STS-B":
        head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
        return [head] + [f"{i}\tmain-news\tf\t2012\t{i}\tnone\tnone\t{s()}\t{s()}\t{rng.uniform(0, 5):.3f}"
                         for i in range(n)]
    if task == "MNLI":  # train: label1, gold_label; dev_*: label1 ... label5, gold_label (16 columns)
        votes = 5 if dev else 1
        head = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                "sentence2_parse\tsentence1\tsentence2\t" + "".join(f"label{k}\t" for k in range(1, votes + 1))
                + "gold_label")
        labels = ["entailment", "neutral", "contradiction"]
        rows = []
        for i in range(n):
            y = rng.choice(labels)
            rows.append(f"{i}\t{i}\t{i}n\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{s()}\t{s()}\t"
                        + f"{y}\t" * votes + y)
        return [head] + rows
    raise KeyError(task)


def write_glue(root: Path, files: dict[str, list[tuple[str, int]]] = GLUE_FILES) -> Path:
    """Small folders in the official layout, with the official files' quirks: MRPC starts with a UTF-8 byte-order
    mark (its dev.tsv has Windows line ends too), MNLI's dev files have 16 columns, QQP's train.tsv a broken row."""
    rng = random.Random(1)
    for task, task_files in files.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        for name, n in task_files:
            end = "\r\n" if (task, name) == ("MRPC", "dev.tsv") else "\n"
            bom = "\ufeff" if task == "MRPC" else ""
            text = bom + end.join(glue_rows(task, n, rng, dev=name != "train.tsv")) + end
            (root / task / name).write_bytes(text.encode("utf-8"))
    return root


def pytest_configure(config):
    """Under pytest-xdist (the README's `-n 2`) each worker is one of the machine's cores: one torch thread in the
    worker and in the CLI processes it starts, so that two workers do not each spin two OpenMP threads on 2 cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread_no_bars():
    """Tiny models run in-process: one torch thread (OpenMP threads spin against a busy machine's other jobs and
    make each tiny op milliseconds) and no progress bars, as the subprocess tests do."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TQDM_DISABLE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-deberta"))


@pytest.fixture(scope="session")
def tiny_deberta12(tmp_path_factory) -> Path:
    """DeBERTa-v3-base's 12 layers (72 adapted matrices, so the shipped rank budgets hold), 32 wide."""
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-deberta12"), layers=12)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"))


def run_cli(*args: str, cwd: Path = REPO, env_extra: dict | None = None, timeout: int = 300):
    """`python -m src.main ...` as a user runs it (the test's interpreter is the project's venv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # the config decides W&B's mode
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, "-u", "-m", "src.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
