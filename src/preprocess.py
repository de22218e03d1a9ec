"""Data layer: GLUE tasks from the hub or from a local GLUE folder, tokenisation, loaders and metrics."""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding


log = logging.getLogger("src.preprocess")


class DataError(ValueError):
    """Bad or missing data: the message names the file (and line) at fault."""


@dataclass(frozen=True)
class TaskSpec:
    hub_config: str                 # nyu-mll/glue config name
    folder: str                     # official GLUE folder name
    hub_keys: tuple[str, str | None]
    tsv_keys: tuple[str, str | None] | tuple[int, int | None]  # header names (or column numbers for CoLA)
    tsv_label: str | int
    labels: tuple[str, ...] | None  # file label strings in the hub's id order; None: regression
    dev_files: dict[str, str]       # eval split -> file name
    glue_metric: str                # the number the AdaLoRA paper reports for this task
    skip_short_rows: bool = False   # QQP only: skip rows with fewer fields than the header (see read_glue_tsv)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


# The official files (the GLUE zips at dl.fbaipublicfiles.com/glue/data/, as `download_glue_data.py` unpacks them;
# column layouts as the reference loaders read them: the GLUE baselines, HF `glue.py`, transformers' processors):
#   CoLA   train/dev: no header; 4 columns: source, label (0/1), original mark, sentence
#   SST-2  sentence, label (0/1)
#   MRPC   Quality, #1 ID, #2 ID, #1 String, #2 String. Built by download_glue_data.py from Microsoft's
#          msr_paraphrase_train.txt, whose header line (a UTF-8 byte-order mark included) it copies as read into
#          train.tsv and dev.tsv: both start with a BOM (HF's glue.py skips those 3 bytes by hand).
#   QQP    id, qid1, qid2, question1, question2, is_duplicate (0/1); see skip_short_rows for the older QQP.zip
#   STS-B  index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score (0-5, float)
#   MNLI   train: 12 columns (... sentence1, sentence2, label1, gold_label); dev_matched/dev_mismatched: 16
#          (label1 ... label5, then gold_label): columns are found by header name, never by position
#   QNLI   index, question, sentence, label (entailment/not_entailment), QNLIv2.zip
#   RTE    index, sentence1, sentence2, label (entailment/not_entailment)
#   WNLI   index, sentence1, sentence2, label (0/1)
# Text is unquoted (a quote is a literal character). Windows line ends (CRLF) are read like LF.
_DEV = {"validation": "dev.tsv"}
TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", "CoLA", ("sentence", None), (3, None), 1, ("0", "1"), _DEV, "mcc"),
    "sst2": TaskSpec("sst2", "SST-2", ("sentence", None), ("sentence", None), "label", ("0", "1"), _DEV, "accuracy"),
    "mrpc": TaskSpec("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                     ("0", "1"), _DEV, "accuracy"),
    "qqp": TaskSpec("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                    ("0", "1"), _DEV, "accuracy_f1_mean", skip_short_rows=True),
    "stsb": TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score",
                     None, _DEV, "pearson"),
    "mnli": TaskSpec("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"),
                     {"validation": "dev_matched.tsv", "validation_mm": "dev_mismatched.tsv"}, "accuracy_m_mm_mean"),
    "qnli": TaskSpec("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
                     ("entailment", "not_entailment"), _DEV, "accuracy"),
    "rte": TaskSpec("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                    ("entailment", "not_entailment"), _DEV, "accuracy"),
    "wnli": TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                     ("0", "1"), _DEV, "accuracy"),
}
HUB_EVAL_SPLITS = {"validation": "validation", "validation_mm": "validation_mismatched"}
# Rows of the official GLUE splits (train.tsv and each dev file, as read_glue_tsv reads them; the hub's nyu-mll/glue has
# the same): what a forecast takes for a task whose files are not at hand. tests/test_preprocess.py checks the tasks whose
# official files this repository can reach against them.
GLUE_SIZES: dict[str, dict[str, int]] = {
    "cola": {"train": 8551, "validation": 1043}, "sst2": {"train": 67349, "validation": 872},
    "mrpc": {"train": 3668, "validation": 408}, "qqp": {"train": 363846, "validation": 40430},
    "stsb": {"train": 5749, "validation": 1500},
    "mnli": {"train": 392702, "validation": 9815, "validation_mm": 9832},
    "qnli": {"train": 104743, "validation": 5463}, "rte": {"train": 2490, "validation": 277},
    "wnli": {"train": 635, "validation": 71},
}


def task_spec(dataset_name: str) -> tuple[str, TaskSpec]:
    """`glue_mnli` -> ("mnli", spec); a clear error for anything else."""
    task = dataset_name.removeprefix("glue_")
    if not dataset_name.startswith("glue_") or task not in TASKS:
        raise DataError(f"dataset.name={dataset_name!r} is not a GLUE task; use one of "
                        f"{', '.join('glue_' + t for t in TASKS)}")
    return task, TASKS[task]


# ---------------------------------------------------------------------------------------------------------------
# Loading: official GLUE TSV folders, or the hub.

def read_glue_tsv(path: Path, spec: TaskSpec) -> dict[str, list]:
    """Parse one official GLUE TSV file into text_a / text_b / label columns.

    GLUE files are unquoted tab-separated text (quotes are literal), so csv runs with QUOTE_NONE. A UTF-8 byte-order
    mark at the start (the official MRPC files have one) is dropped and CRLF line ends are read like LF. Every row
    must have exactly the header's number of fields and a label of the task's label set: anything else is a
    DataError naming the file and line.

    One exception, QQP (`skip_short_rows`): the QQP.zip GLUE first shipped has a few questions with a line break
    inside quotes, which a tab-separated reader does not honour, so such a row reads as two short lines (train.tsv
    line 97,931 is `"<tab>Was Muhammad a real historical figure? ...<tab>0`: 3 of 6 fields). Every reference loader
    drops them (HF's glue.py "filter out corrupted rows", transformers' QqpProcessor `except IndexError: continue`,
    the GLUE baselines' load_tsv; QQP-clean.zip, the current release, has 363,846 train rows), so they are skipped
    here too, with a warning naming the file, the count and the first line. A QQP row with too many fields is
    still an error.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
    skipped: list[int] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = None if isinstance(spec.tsv_label, int) else next(reader, None)
            if header is not None:
                missing = [k for k in (*spec.tsv_keys, spec.tsv_label) if k is not None and k not in header]
                if missing:
                    raise DataError(f"{path}:1: header lacks column(s) {missing} for task {spec.folder}; "
                                    f"got {header}")
                cols = [header.index(k) if k is not None else None for k in (*spec.tsv_keys, spec.tsv_label)]
                n_fields = len(header)
            else:
                cols, n_fields = [*spec.tsv_keys, spec.tsv_label], None
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if n_fields is None:
                    n_fields = len(row)
                if len(row) < n_fields and spec.skip_short_rows:
                    skipped.append(line)
                    continue
                if len(row) != n_fields:
                    raise DataError(f"{path}:{line}: malformed row: expected {n_fields} tab-separated fields, "
                                    f"found {len(row)}")
                a, b, label = (row[c] if c is not None else None for c in cols)
                rows["text_a"].append(a)
                rows["text_b"].append(b)
                rows["label"].append(_parse_label(label, spec, path, line))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{_first_undecodable_line(path)}: not UTF-8 text ({e.reason}); GLUE files are "
                        f"UTF-8") from None
    if skipped:
        log.warning("%s: skipped %d row(s) with fewer than %d fields (broken lines of the older QQP release; "
                    "the reference loaders drop them too), the first at line %d", path, len(skipped), n_fields,
                    skipped[0])
    if not rows["label"]:
        raise DataError(f"{path}: no data rows")
    if spec.tsv_keys[1] is None:
        del rows["text_b"]
    return rows


def _first_undecodable_line(path: Path) -> int:
    """The line of a decoding error (the decoder reads in blocks, so its own position is not a line)."""
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def _parse_label(raw: str, spec: TaskSpec, path: Path, line: int) -> float | int:
    if spec.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{path}:{line}: label {raw!r} is not a number (task {spec.folder} is regression)")
        if not math.isfinite(value):
            raise DataError(f"{path}:{line}: label {raw!r} is not finite")
        return value
    raw = raw.strip()
    if raw not in spec.labels:
        raise DataError(f"{path}:{line}: label {raw!r} does not belong to task {spec.folder} "
                        f"(expected one of {list(spec.labels)})")
    return spec.labels.index(raw)


def load_glue(task: str, data_dir: str | None, cache_dir: str) -> DatasetDict:
    """Train and eval splits with columns text_a, (text_b), label, idx.

    `data_dir` is a GLUE folder in the official layout (SST-2/train.tsv, MNLI/dev_matched.tsv, ...); None loads
    nyu-mll/glue from the hub into `cache_dir`.
    """
    spec = TASKS[task]
    if data_dir is None:
        return _load_glue_hub(spec, cache_dir)
    folder = Path(data_dir) / spec.folder
    if not folder.is_dir():
        raise DataError(f"GLUE folder not found: {folder} (dataset.data_dir={data_dir!r}; expected the official "
                        f"layout, e.g. {Path(data_dir) / spec.folder / 'train.tsv'})")
    files = {"train": "train.tsv", **spec.dev_files}
    splits = {split: Dataset.from_dict(read_glue_tsv(folder / name, spec)) for split, name in files.items()}
    return DatasetDict({k: v.add_column("idx", list(range(len(v)))) for k, v in splits.items()})


def _load_glue_hub(spec: TaskSpec, cache_dir: str) -> DatasetDict:
    from datasets import load_dataset

    try:
        raw = load_dataset("nyu-mll/glue", spec.hub_config, cache_dir=cache_dir)
    except (ConnectionError, OSError) as e:
        raise DataError(f"could not load nyu-mll/glue/{spec.hub_config} from the hub or {cache_dir}: "
                        f"{str(e).splitlines()[0]}; for local files pass dataset.data_dir=<GLUE folder>") from None
    out = {}
    for split in ("train", *spec.dev_files):
        ds = raw[HUB_EVAL_SPLITS.get(split, split)]
        a, b = spec.hub_keys
        cols = {"text_a": ds[a], "label": ds["label"], "idx": list(range(len(ds)))}
        if b is not None:
            cols["text_b"] = ds[b]
        out[split] = Dataset.from_dict(cols)
    return DatasetDict(out)


def subsample(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """The first n rows of a fixed permutation (seed 0 by default): the same subset for every method and run seed."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def tuning_split(train: Dataset, holdout_fraction: float, seed: int = 0) -> DatasetDict:
    """Hold out a fixed share of the training set for hyper-parameter search, so that the dev set, which the final
    run reports, never selects anything."""
    if not 0 < holdout_fraction < 1:
        raise DataError(f"optuna.holdout_fraction={holdout_fraction} must lie in (0, 1)")
    parts = train.train_test_split(test_size=holdout_fraction, seed=seed, shuffle=True)
    return DatasetDict({"train": parts["train"], "validation": parts["test"]})


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation and loaders.

def tokenize(ds: DatasetDict, tokenizer, max_length: int) -> DatasetDict:
    def encode(batch):
        texts = (batch["text_a"],) if "text_b" not in batch else (batch["text_a"], batch["text_b"])
        return tokenizer(*texts, truncation=True, max_length=max_length)

    drop = [c for c in ("text_a", "text_b") if c in ds["train"].column_names]
    out = ds.map(encode, batched=True, remove_columns=drop, desc="tokenize")
    return out.rename_column("label", "labels")


TOKENIZED_FORMAT = 1  # bump when tokenize() changes what it writes: older cache entries are then not read


def tokenized_key(ds: DatasetDict, tokenizer, max_length: int) -> str:
    """The tokenised splits' cache key: every split's content (its datasets fingerprint, which hashes the rows and
    every subsampling step), the tokenizer (its full serialisation, taken before its first call, which sets
    truncation state) and max_length."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok = backend.to_str() if backend is not None else Hasher.hash(tokenizer)
    h = hashlib.sha256(f"v{TOKENIZED_FORMAT}|{type(tokenizer).__name__}|{max_length}|".encode())
    h.update(tok.encode())
    for split in sorted(ds):
        h.update(f"|{split}:{ds[split]._fingerprint}:{len(ds[split])}".encode())
    return h.hexdigest()[:32]


def tokenize_cached(ds: DatasetDict, tokenizer, max_length: int, cache_dir: str | Path | None,
                    write: bool = True) -> tuple[DatasetDict, str]:
    """tokenize(), read from `{cache_dir}/tokenized/{key}/` when an earlier run (a trial, another seed, another
    process) wrote it. `write`: tokenise and store it when absent (to a temp folder renamed into place, so a reader
    never sees half of one and concurrent writers keep one); False: read only, tokenising here when absent (a
    data-parallel process that is not the writer, after the writer). Returns the splits and 'read', 'written' or
    'tokenized' (no cache_dir)."""
    if cache_dir is None:
        return tokenize(ds, tokenizer, max_length), "tokenized"
    from datasets import load_from_disk

    folder = Path(cache_dir) / "tokenized" / tokenized_key(ds, tokenizer, max_length)
    if (folder / "dataset_dict.json").exists():
        return load_from_disk(str(folder)), "read"
    out = tokenize(ds, tokenizer, max_length)
    if not write:
        return out, "tokenized"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        out.save_to_disk(str(tmp))
        os.rename(tmp, folder)
    except OSError:  # another process renamed its copy first: keep that one
        if not (folder / "dataset_dict.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(folder)), "written"


def sample_lengths(ds: Dataset, tokenizer, max_length: int, n: int = 1024, seed: int = 0) -> tuple[np.ndarray, float]:
    """Token lengths of a fixed random sample of up to n examples of an untokenised split, and the tokenizer's
    seconds per example: what a forecast of a run on the whole split needs."""
    sample = subsample(ds, n, seed)
    texts = (list(sample["text_a"]),) + ((list(sample["text_b"]),) if "text_b" in sample.column_names else ())
    tic = time.perf_counter()
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    seconds = (time.perf_counter() - tic) / max(1, len(sample))
    return np.array([len(ids) for ids in encoded["input_ids"]]), seconds


def padded_tokens(lengths, batch_size: int) -> int:
    """Tokens a loader without shuffling feeds the model when it pads each batch to its longest example."""
    lengths = list(lengths)
    return sum(len(b) * max(b) for b in (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)))


class EvalOrder(list):
    """A permutation of an eval split's examples that its loader reads in (a list is a sampler): evaluate_split puts
    the predictions read in this order back in the split's order."""


def eval_order(lengths) -> EvalOrder:
    """An eval split's examples longest first (ties in file order): each batch pads to about its own length, and the
    largest batch comes first, so a memory limit shows at the first batch. Metrics do not depend on the order; the
    predictions are put back in file order (src.train.evaluate_split)."""
    return EvalOrder(sorted(range(len(lengths)), key=lambda i: -lengths[i]))


def make_loaders(ds: DatasetDict, tokenizer, batch_size: int, eval_batch_size: int, seed: int,
                 num_workers: int = 0, pin_memory: bool = False, group_by_length: bool = False,
                 start_method: str = "fork") -> tuple[DataLoader, dict[str, DataLoader]]:
    """Shuffled train loader driven by its own seeded generator, so every method sees the same data order for a
    given seed whatever its parameter initialisation consumed from the global RNG. The eval loaders get their own
    generator too: a loader without one draws a seed from the global RNG at every pass, so evaluating during
    training would shift the dropout masks of every later step. The order does not depend on `num_workers` (the
    sampler runs in this process); `pin_memory` (for a GPU) lets the batches be copied without blocking. No
    persistent workers: a persistent iterator skips the seed draw a fresh one makes from the generator at every
    epoch, so the order of later epochs (and of a resumed run) would depend on it.

    `group_by_length`: transformers' LengthGroupedSampler on the same generator: a random order cut into
    mega-batches of 50 batches, each sorted by length, so a batch pads to about its own examples' length (less
    padding on tasks whose lengths vary, e.g. MNLI); still one order per seed and epoch; the eval splits are read
    longest first (eval_order: about a third of the padded tokens of file order on MNLI). `start_method`: how loader
    processes start on Linux ("fork"; "forkserver" from a data-parallel process, whose communication threads a fork
    would copy into the child mid-lock)."""
    collate = DataCollatorWithPadding(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    workers = dict(num_workers=num_workers, pin_memory=pin_memory)
    if num_workers and sys.platform == "linux":  # named: a joblib (loky) sweep job replaces the default context
        workers["multiprocessing_context"] = start_method  # with one that cannot start loader processes
        if start_method == "forkserver":  # the server imports these once; its workers are forked with them loaded
            multiprocessing.set_forkserver_preload(["torch", "transformers", "datasets", "src.preprocess"])
    lengths = {split: [len(ids) for ids in ds[split]["input_ids"]] for split in ds} if group_by_length else {}
    ds = ds.with_format("torch")
    if group_by_length:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        order = dict(sampler=LengthGroupedSampler(batch_size, lengths=lengths["train"], generator=generator))
    else:
        order = dict(shuffle=True)
    train = DataLoader(ds["train"], batch_size=batch_size, generator=generator, collate_fn=collate, **order,
                       **workers)
    evals = {split: DataLoader(ds[split], batch_size=eval_batch_size, collate_fn=collate,
                               **(dict(sampler=eval_order(lengths[split])) if group_by_length else dict(shuffle=False)),
                               generator=torch.Generator().manual_seed(seed), **workers)
             for split in ds if split != "train"}
    return train, evals


# ---------------------------------------------------------------------------------------------------------------
# Metrics (scikit-learn / scipy: `evaluate.load("glue")` would need the hub).

def compute_metrics(spec: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Task metrics for one eval split: accuracy and MCC (and F1 for MRPC/QQP), or Pearson/Spearman for STS-B."""
    if spec.is_regression:
        return {"pearson": float(pearsonr(predictions, labels)[0]),
                "spearman": float(spearmanr(predictions, labels)[0])}
    out = {"accuracy": float(accuracy_score(labels, predictions)),
           "mcc": float(matthews_corrcoef(labels, predictions))}
    if spec.folder in ("MRPC", "QQP"):
        out["f1"] = float(f1_score(labels, predictions))
    return out


def glue_score(spec: TaskSpec, metrics: dict[str, float]) -> float:
    """The task's number in the AdaLoRA paper's GLUE average: MNLI mean of m/mm accuracy, QQP mean of accuracy/F1,
    CoLA MCC, STS-B Pearson, the rest accuracy."""
    if spec.glue_metric == "accuracy_m_mm_mean":
        return (metrics["accuracy"] + metrics["accuracy_mm"]) / 2
    if spec.glue_metric == "accuracy_f1_mean":
        return (metrics["accuracy"] + metrics["f1"]) / 2
    return metrics[spec.glue_metric]


def primary_metric(spec: TaskSpec) -> str:
    """The validation metric that picks the best step."""
    return "pearson" if spec.is_regression else ("mcc" if spec.folder == "CoLA" else "accuracy")
