"""Evaluate finished runs: per-run metrics and figures, then a comparison of methods with significance tests.

    uv run python -m src.evaluate results_dir={path} run_ids='["id-1","id-2"]' [skip_bad=true]

An entry of run_ids is a run folder name ({run_id} or {run_id}-seed{N}) or a config run_id (all its seeds). Each run
comes from W&B when it was logged online, else from its local record (config.yaml, history.jsonl, summary.json,
predictions.csv, rank_allocation.json). This module imports nothing from src: it runs in its own process.
Layout: load -> per-run metrics -> comparison and tests -> figures -> report -> main.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend, nothing to close
from matplotlib.lines import Line2D
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from scipy import stats
from sklearn.metrics import confusion_matrix
from statsmodels.stats.contingency_tables import mcnemar

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.yaml"
METHOD_NAMES = {"comparative-1": "AdaLoRA", "comparative-2": "LoRA", "proposed": "GLoRA"}
METHOD_ORDER = ["LoRA", "AdaLoRA", "GLoRA"]
ADAPTIVE = {"AdaLoRA", "GLoRA"}
COLORS = {"LoRA": "#0072B2", "AdaLoRA": "#E69F00", "GLoRA": "#009E73"}  # Okabe-Ito: colour-blind safe
HATCHES = {"LoRA": "", "AdaLoRA": "//", "GLoRA": ".."}  # bars stay apart when printed in grey
TASKS = {"mnli": "MNLI", "sst2": "SST-2", "cola": "CoLA", "qqp": "QQP", "qnli": "QNLI", "rte": "RTE", "mrpc": "MRPC",
         "stsb": "STS-B", "wnli": "WNLI"}
ADALORA_TASKS = ["mnli", "sst2", "cola", "qqp", "qnli", "rte", "mrpc", "stsb"]  # the paper's GLUE average
GLUE_LABEL = {"mnli": "m/mm acc", "qqp": "acc/F1", "cola": "MCC", "stsb": "Pearson"}  # others: acc
CLASS_NAMES = {"mnli": ["entailment", "neutral", "contradiction"], "rte": ["entailment", "not_entailment"],
               "qnli": ["entailment", "not_entailment"], "sst2": ["negative", "positive"],
               "cola": ["unacceptable", "acceptable"], "mrpc": ["not_equivalent", "equivalent"],
               "qqp": ["not_duplicate", "duplicate"], "wnli": ["not_entailment", "entailment"]}
METRICS = ["accuracy", "mcc", "f1", "pearson", "spearman", "accuracy_mm", "mcc_mm", "glue_score"]
COST_KEYS = ["train_time_s", "eval_time_s", "total_steps", "trainable_params", "adapter_params", "head_params",
             "rank_budget_total", "realloc_step", "realloc_seconds", "trainable_params_initial"]
GROUP_KEYS = ["accuracy", "mcc", "glue_score", "f1", "pearson", "train_time_s", "trainable_params",
              "rank_budget_total", "best_validation_accuracy", "best_validation_glue_score"]
# W&B's summary also holds the last value of every logged history key; these are not part of summary.json
HISTORY_ONLY = {"train_loss", "lr", "epoch", "scores", "old_ranks", "new_ranks", "trainable_params_before",
                "trainable_params_after"}
MATRIX_TYPES = [("Wq", r"attention\.self\.query(_proj)?$"), ("Wk", r"attention\.self\.key(_proj)?$"),
                ("Wv", r"attention\.self\.value(_proj)?$"), ("Wo", r"attention\.output\.dense$"),
                ("Wf1", r"intermediate\.dense$"), ("Wf2", r"(?<!attention\.)output\.dense$")]
N_RESAMPLES, BOOT_SEED = 10_000, 0
CHECKPOINT_RULE = ("Headline numbers are the final evaluation after the last training step (no checkpoint picked on "
                   "the dev set). Best-step values (best_validation_*) pick the step by the dev metric itself and are "
                   "listed separately as optimistic.")
PUBLISHED = {  # Zhang et al., ICLR 2023 (AdaLoRA), Table 1: DeBERTa-v3-base, GLUE dev
    "columns": ["MNLI (m/mm)", "SST-2", "CoLA", "QQP (acc/F1)", "QNLI", "RTE", "MRPC", "STS-B", "Avg."],
    "LoRA r=8 (1.33M)": ["90.65/90.69", "94.95", "69.82", "91.99/89.38", "93.87", "85.20", "89.95", "91.60", "88.34"],
    "AdaLoRA (1.27M)": ["90.76/90.79", "96.10", "71.45", "92.23/89.74", "94.55", "88.09", "90.69", "91.84", "89.31"],
}
mpl.rcParams.update({"font.size": 10, "axes.titlesize": 9, "figure.titlesize": 10, "legend.fontsize": 8,
                     "pdf.fonttype": 42, "figure.constrained_layout.use": True,  # no overlapping labels
                     "axes.spines.top": False, "axes.spines.right": False})


class EvaluationError(RuntimeError):
    """Bad input; the message is one line that says what to fix."""


@dataclass
class RunRecord:
    """One run, the same whichever source it came from, so nothing downstream branches on the source."""
    name: str
    config: dict
    summary: dict
    history: list[dict]
    predictions: pd.DataFrame | None
    rank_allocation: dict | None = None
    source: str = "local"


# ---------------------------------------------------------------------------------------------------------------
# Load: arguments, run folders, local record, W&B.

def parse_args(argv: list[str]) -> tuple[Path, list[str], bool]:
    """`results_dir=... run_ids=[...] skip_bad=...` (Hydra-style dotlist) -> (results_dir, run_ids, skip_bad)."""
    try:
        cli = OmegaConf.to_container(OmegaConf.from_dotlist(list(argv)))
    except (OmegaConfBaseException, ValueError) as e:
        raise EvaluationError(f"cannot parse arguments {argv}: {e}") from None
    unknown = sorted(set(cli) - {"results_dir", "run_ids", "skip_bad"})
    if unknown:
        raise EvaluationError(f"unknown argument(s) {unknown}; expected results_dir=PATH run_ids='[\"id\",...]' "
                              f"[skip_bad=true]")
    if not cli.get("results_dir"):
        raise EvaluationError("results_dir=PATH is required")
    run_ids = cli.get("run_ids")
    if not isinstance(run_ids, list) or not run_ids or not all(isinstance(r, str) and r for r in run_ids):
        raise EvaluationError(f"run_ids must be a non-empty list of strings, e.g. run_ids='[\"id-1\",\"id-2\"]'; "
                              f"got {run_ids!r}")
    skip_bad = cli.get("skip_bad", False)
    if not isinstance(skip_bad, bool):
        raise EvaluationError(f"skip_bad must be true or false; got {skip_bad!r}")
    return Path(str(cli["results_dir"])), list(dict.fromkeys(run_ids)), skip_bad


def scan_results(results_dir: Path) -> tuple[dict[str, dict], dict[str, tuple[str | None, str]]]:
    """Finished runs (folder -> summary) and broken ones (folder -> (config run_id, why)). Folders that training
    moved aside (`name.old-*`) are ignored: they would duplicate a seed."""
    finished, broken = {}, {}
    folders = sorted(p for p in results_dir.iterdir() if p.is_dir()) if results_dir.is_dir() else []
    for folder in folders:
        if ".old-" in folder.name or not any((folder / f).exists() for f in ("summary.json", "config.yaml",
                                                                             "history.jsonl")):
            continue
        try:
            finished[folder.name] = json.loads((folder / "summary.json").read_text())
            continue
        except FileNotFoundError:
            why = "has no summary.json (the run crashed or is still running)"
        except (OSError, json.JSONDecodeError) as e:
            why = f"has an unreadable summary.json ({e})"
        broken[folder.name] = (_config_run_id(folder), why)
    return finished, broken


def _config_run_id(folder: Path) -> str | None:
    try:
        return OmegaConf.load(folder / "config.yaml").get("run_id")
    except Exception:  # a crashed run may have no (or half a) config: matched by folder name only
        return None


class WandbSource:
    """The W&B public API, created lazily (importing wandb is slow) or injected (tests); remembers why it is off."""

    def __init__(self, api=None):
        self._api, self.error = api, None

    def api(self):
        if self._api is None and self.error is None:
            if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
                self.error = f"WANDB_MODE={os.environ['WANDB_MODE']}"
                return None
            try:
                import wandb

                self._api = wandb.Api(timeout=30)
            except Exception as e:  # no key, no network, ...: the local record is used
                self.error = f"{type(e).__name__}: {e}".splitlines()[0]
        return self._api


def wandb_path(config: dict, api) -> str:
    """entity/project from the run's config, else from the repository's config/config.yaml."""
    wb = dict(config.get("wandb") or {})
    if not wb.get("project") and REPO_CONFIG.exists():
        wb = OmegaConf.to_container(OmegaConf.load(REPO_CONFIG).wandb)
    return f"{wb.get('entity') or api.default_entity}/{wb.get('project') or 'glora-glue'}"


def wandb_run_names(wb: WandbSource, run_id: str) -> list[str]:
    """W&B run ids (= run names) for a run name or a config run_id; [] when W&B is off or has none."""
    api = wb.api()
    if api is None:
        return []
    try:
        path = wandb_path({}, api)
        try:
            return [api.run(f"{path}/{run_id}").id]
        except Exception:
            return [r.id for r in api.runs(path, filters={"config.run_id": run_id})]
    except Exception as e:
        wb.error = f"{type(e).__name__}: {e}".splitlines()[0]
        return []


def resolve_run_names(results_dir: Path, run_ids: list[str], wb: WandbSource) -> tuple[list[str], list[str]]:
    """Run names to evaluate (config run_ids expanded to their seeds) and one line per unknown or broken id."""
    finished, broken = scan_results(results_dir)
    names, problems = [], []
    for rid in run_ids:
        found = sorted((n for n, s in finished.items() if rid in (n, s.get("run_id"))),
                       key=lambda n: (seed_key(finished[n].get("seed")), n))
        bad = [n for n, (cfg_id, _) in broken.items() if rid in (n, cfg_id)]
        problems += [f"run {n!r} in {results_dir} {broken[n][1]}" for n in bad]
        if not found and not bad:
            found = wandb_run_names(wb, rid)
        if not found and not bad:
            existing = ", ".join(finished) or ("none" if results_dir.is_dir() else "none (no such folder)")
            problems.append(f"unknown run id {rid!r}: no run folder or config run_id in {results_dir} "
                            f"(W&B: {wb.error or 'none found'}); existing runs: {existing}")
        names += [n for n in found if n not in names]
    return names, problems


def read_history(path: Path) -> list[dict]:
    """history.jsonl rows; a half-written last line (a killed run) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_local_extras(folder: Path) -> tuple[pd.DataFrame | None, dict | None]:
    """predictions.csv and rank_allocation.json, always from the local folder when present."""
    preds = pd.read_csv(folder / "predictions.csv") if (folder / "predictions.csv").exists() else None
    alloc = folder / "rank_allocation.json"
    return preds, (json.loads(alloc.read_text()) if alloc.exists() else None)


def load_local(folder: Path, note: str = "") -> RunRecord:
    cfg_path = folder / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True) if cfg_path.exists() else {}
    summary = json.loads((folder / "summary.json").read_text())
    preds, alloc = read_local_extras(folder)
    return RunRecord(folder.name, config, summary, read_history(folder / "history.jsonl"), preds, alloc,
                     f"local record{note}")


def split_wandb_row(raw: dict) -> list[dict]:
    """W&B merges everything logged at one step into one row; split it back into the local record's rows
    (event, train, eval), each with its `step`."""
    row = {k: v for k, v in raw.items() if not k.startswith("_") and v is not None}
    step = raw.get("_step", row.pop("step", None))
    epoch = row.pop("epoch", None)
    train = {k: row.pop(k) for k in ("train_loss", "lr") if k in row}
    evals = {k: row.pop(k) for k in list(row) if k.startswith("validation_")}
    out = []
    if row:
        out.append({"step": step, "event": "glora_reallocation" if "new_ranks" in row else "wandb", **row})
    out += [{"step": step, "epoch": epoch, **part} for part in (train, evals) if part]
    return out


def load_wandb(api, path: str, name: str, folder: Path, run_id: str | None = None) -> RunRecord:
    """A run from the W&B public API: full history via scan_history (history() samples), summary, config.
    `run_id`: the W&B id when it is not the run name (a run started over gets a fresh one)."""
    name_or_id = run_id or name
    run = api.run(f"{path}/{name_or_id}")
    config = {k: (v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v)
              for k, v in dict(run.config).items() if not k.startswith("_")}  # older servers wrap values
    summary = {k: v for k, v in dict(run.summary._json_dict).items()
               if not k.startswith(("_", "validation_")) and k not in HISTORY_ONLY}
    if summary.get("status") != "finished":  # training writes status=finished into the summary at the very end
        raise EvaluationError(f"W&B run {path}/{name_or_id} did not finish (state {getattr(run, 'state', '?')!r})")
    history = [row for raw in run.scan_history() for row in split_wandb_row(raw)]
    preds, alloc = read_local_extras(folder) if folder.is_dir() else (None, None)
    return RunRecord(name, config, summary, history, preds, alloc, f"wandb {path}/{name_or_id}")


def load_run(results_dir: Path, name: str, wb: WandbSource) -> RunRecord:
    """W&B first when the run was logged online (or exists only there), else (or on any W&B error) local."""
    folder = results_dir / name
    local_cfg = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml")) if (
        folder / "config.yaml").exists() else {}
    mode = (local_cfg.get("wandb") or {}).get("mode")
    has_local = (folder / "summary.json").exists()
    if has_local and mode != "online":
        return load_local(folder, f" (wandb.mode={mode})")
    api, why = wb.api(), wb.error
    if api is not None:
        try:
            run_id = json.loads((folder / "summary.json").read_text()).get("wandb_id") if has_local else None
            return load_wandb(api, wandb_path(local_cfg, api), name, folder, run_id)
        except Exception as e:
            why = f"{type(e).__name__}: {e}".splitlines()[0]
    if has_local:
        return load_local(folder, f" (W&B not used: {why})")
    raise EvaluationError(f"run {name!r}: no local summary.json and W&B failed ({why})")


def load_runs(results_dir: Path, run_ids: list[str], skip_bad: bool, wb: WandbSource) -> list[RunRecord]:
    names, problems = resolve_run_names(results_dir, run_ids, wb)
    if problems and not skip_bad:
        raise EvaluationError(" | ".join(problems) + " (pass skip_bad=true to evaluate the other runs)")
    records = []
    for name in names:
        try:
            rec = load_run(results_dir, name, wb)
            if rec.summary.get("status", "finished") != "finished":
                raise EvaluationError(f"run {name!r} has status {rec.summary.get('status')!r}, not finished")
        except Exception as e:  # a half-written or malformed record is a bad run, like a crashed one
            message = str(e) if isinstance(e, EvaluationError) else f"run {name!r} cannot be read ({e})"
            if not skip_bad:
                raise EvaluationError(message) from None
            problems.append(message)
            continue
        print(f"[evaluate] {name}: {task_of(rec)} {method_of(rec)} seed {rec.summary.get('seed')} <- {rec.source}")
        records.append(rec)
    for p in problems:
        print(f"[evaluate] WARNING: SKIPPED (skip_bad=true): {p}", file=sys.stderr)
    if not records:
        raise EvaluationError("no run left to evaluate")
    return records


# ---------------------------------------------------------------------------------------------------------------
# Per-run metrics.

def task_of(rec: RunRecord) -> str:
    return rec.summary.get("task") or str((rec.config.get("dataset") or {}).get("name", "?")).removeprefix("glue_")


def method_of(rec: RunRecord) -> str:
    method = rec.summary.get("method") or rec.config.get("method")
    return rec.summary.get("method_name") or rec.config.get("method_name") or METHOD_NAMES.get(method, str(method))


def is_adaptive(rec: RunRecord) -> bool:
    return method_of(rec) in ADAPTIVE or len(set((rec.summary.get("final_ranks") or {}).values())) > 1


def rank_table(final_ranks: dict) -> pd.DataFrame:
    """Final ranks as layer x matrix type (Wq Wk Wv Wo Wf1 Wf2); names that place in neither are left out."""
    rows = []
    for name, rank in (final_ranks or {}).items():
        layer = re.search(r"layer\.(\d+)\.", name)
        kind = next((t for t, pattern in MATRIX_TYPES if re.search(pattern, name)), None)
        if layer and kind:
            rows.append((int(layer.group(1)), kind, rank))
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows, columns=["layer", "type", "rank"]).pivot_table(
        index="layer", columns="type", values="rank", aggfunc="sum")
    return table.reindex(columns=[t for t, _ in MATRIX_TYPES if t in table.columns])


def confusion_matrices(rec: RunRecord) -> dict:
    """Per eval split: class labels, confusion matrix (rows true, columns predicted) and accuracy."""
    if rec.predictions is None or task_of(rec) == "stsb":
        return {}
    out = {}
    for split, part in rec.predictions.groupby("split", sort=True):
        y, p = part["label"].astype(int), part["prediction"].astype(int)
        labels = sorted(set(y) | set(p))
        out[str(split)] = {"labels": labels, "matrix": confusion_matrix(y, p, labels=labels).tolist(),
                           "n": len(part), "accuracy": float((y == p).mean())}
    return out


def run_metrics(rec: RunRecord) -> dict:
    """metrics.json of one run: final (headline) and best-step metrics, cost, ranks, confusion matrices."""
    s = rec.summary
    matrices = confusion_matrices(rec)
    recomputed = matrices.get("validation", {}).get("accuracy")
    checks = [] if recomputed is None or s.get("accuracy") is None or abs(recomputed - s["accuracy"]) < 1e-6 else [
        f"accuracy from predictions.csv ({recomputed:.6f}) differs from summary.json ({s['accuracy']:.6f})"]
    train_losses = [r["train_loss"] for r in rec.history if "train_loss" in r]
    return {
        "run_name": rec.name, "run_id": s.get("run_id"), "method": s.get("method"), "method_name": method_of(rec),
        "task": task_of(rec), "seed": s.get("seed"), "backbone": s.get("backbone"), "source": rec.source,
        "glue_metric": s.get("glue_metric"), "checkpoint_rule": CHECKPOINT_RULE,
        "final": {k: s[k] for k in METRICS if s.get(k) is not None},
        "best": {"step": s.get("best_step"), **{k.removeprefix("best_validation_"): v for k, v in s.items()
                                                 if k.startswith("best_validation_")}},
        "cost": {k: s[k] for k in COST_KEYS if s.get(k) is not None},
        "adaptive": is_adaptive(rec),
        "ranks_by_layer": {str(i): row.dropna().astype(int).to_dict()
                           for i, row in rank_table(s.get("final_ranks")).iterrows()},
        "history": {"train_rows": len(train_losses), "eval_rows": sum(any(k.startswith("validation_") for k in r)
                                                                      for r in rec.history),
                    "final_train_loss": train_losses[-1] if train_losses else None},
        "confusion_matrices": matrices, "checks": checks,
    }


# ---------------------------------------------------------------------------------------------------------------
# Comparison: groups, derived metrics, GLUE average, significance.

def sort_methods(methods) -> list[str]:
    return sorted(set(methods), key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))


def seed_key(seed) -> tuple:
    """Numeric seeds in numeric order, anything else after them."""
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def sort_tasks(tasks) -> list[str]:
    return sorted(set(tasks), key=lambda t: (list(TASKS).index(t) if t in TASKS else 99, t))


def run_row(rec: RunRecord) -> dict:
    s = rec.summary
    return {"run_name": rec.name, "run_id": s.get("run_id"), "task": task_of(rec), "method_name": method_of(rec),
            "seed": s.get("seed"), "source": rec.source.split()[0],
            **{k: s.get(k) for k in METRICS + COST_KEYS + ["best_step", "best_validation_accuracy",
                                                            "best_validation_glue_score"]}}


def describe(values: list) -> dict:
    """mean, std (ddof=1; null for one value) and n of the values that are there."""
    v = np.array([x for x in values if x is not None], dtype=float)
    return {"mean": float(np.mean(v)) if len(v) else None, "std": float(np.std(v, ddof=1)) if len(v) >= 2 else None,
            "n": len(v)}


def group_stats(rows: list[dict]) -> dict:
    """groups[task][method] = {n, seeds, runs, <key>: {mean, std, n}}."""
    groups = {}
    for task in sort_tasks(r["task"] for r in rows):
        groups[task] = {}
        for method in sort_methods(r["method_name"] for r in rows if r["task"] == task):
            runs = [r for r in rows if r["task"] == task and r["method_name"] == method]
            groups[task][method] = {"n": len(runs), "seeds": [r["seed"] for r in runs],
                                    "runs": [r["run_name"] for r in runs],
                                    **{k: describe([r[k] for r in runs]) for k in GROUP_KEYS}}
    return groups


def _mean(group: dict | None, key: str):
    return None if group is None else group[key]["mean"]


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def relative_to_lora(group: dict, base: dict) -> dict:
    """Gains (absolute and relative) and cost ratios of one method against LoRA on the same task."""
    out = {}
    for key in ("accuracy", "glue_score"):
        m, b = _mean(group, key), _mean(base, key)
        out[f"{key}_gain_abs"] = None if m is None or b is None else m - b
        out[f"{key}_gain_rel"] = _ratio(out[f"{key}_gain_abs"], b)
    for key in ("train_time_s", "trainable_params", "rank_budget_total"):
        out[f"{key}_ratio"] = _ratio(_mean(group, key), _mean(base, key))
    return out


def recovered_share(by_method: dict, key: str) -> dict:
    """(GLoRA - LoRA) / (AdaLoRA - LoRA): the share of AdaLoRA's gain over LoRA that GLoRA recovers."""
    missing = [m for m in ("LoRA", "AdaLoRA", "GLoRA") if _mean(by_method.get(m), key) is None]
    if missing:
        return {"value": None, "metric": key, "reason": f"no {key} for {', '.join(missing)}"}
    lora = _mean(by_method["LoRA"], key)
    denominator = _mean(by_method["AdaLoRA"], key) - lora
    if abs(denominator) < 1e-9:
        return {"value": None, "metric": key, "reason": "AdaLoRA and LoRA have the same mean (denominator ~0)"}
    if denominator < 0:  # a ratio over a loss has no meaning as a share (its sign flips)
        return {"value": None, "metric": key, "reason": f"AdaLoRA is below LoRA ({100 * denominator:+.2f} points): "
                                                        f"no gain to recover"}
    return {"value": (_mean(by_method["GLoRA"], key) - lora) / denominator, "metric": key, "reason": None}


def derived_metrics(groups: dict) -> dict:
    out = {}
    for task, by_method in groups.items():
        base = by_method.get("LoRA")
        if base is None:
            out[task] = {"baseline": None, "reason": "no LoRA run on this task"}
            continue
        out[task] = {"baseline": "LoRA",
                     "methods": {m: relative_to_lora(g, base) for m, g in by_method.items() if m != "LoRA"},
                     "glora_share_of_adalora_gain": {k: recovered_share(by_method, k)
                                                     for k in ("accuracy", "glue_score")}}
    return out


def glue_average(groups: dict) -> dict:
    """Per method, the mean over tasks of the mean glue_score (AdaLoRA convention), on the tasks it has and on the
    tasks every method has."""
    methods = sort_methods(m for by_method in groups.values() for m in by_method)
    has = {m: [t for t in groups if _mean(groups[t].get(m), "glue_score") is not None] for m in methods}
    common = [t for t in groups if all(t in has[m] for m in methods)]
    out = {}
    for m in methods:
        scores = {t: _mean(groups[t][m], "glue_score") for t in has[m]}
        out[m] = {"value": float(np.mean(list(scores.values()))) if scores else None, "tasks": has[m],
                  "n_tasks": len(has[m]), "missing_from_paper_average": [t for t in ADALORA_TASKS if t not in has[m]],
                  "value_on_common_tasks": float(np.mean([scores[t] for t in common])) if common else None,
                  "common_tasks": common}
    return out


def method_pairs(methods) -> list[tuple[str, str]]:
    """(GLoRA, AdaLoRA), (GLoRA, LoRA), (AdaLoRA, LoRA), ...: the first of each pair is the newer method."""
    return list(itertools.combinations(sort_methods(methods)[::-1], 2))


def scipy_paired_test(name: str, fn, x: list, y: list, degenerate: str | None = None) -> dict:
    """What scipy gives (its small-sample warnings silenced), or its reason for giving nothing; `degenerate` says
    why a number it gives means little."""
    result = {"test": name, "statistic": None, "p_value": None, "n": len(x), "reason": degenerate}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fn(x, y)
        result.update(statistic=float(res.statistic), p_value=float(res.pvalue))
    except ValueError as e:
        result["reason"] = str(e)
    return result


def seed_level_tests(rows: list[dict], task: str, a: str, b: str) -> dict:
    """glue_score paired by seed: scipy.stats.ttest_rel and wilcoxon when both methods have >= 2 shared seeds."""
    score = {m: {r["seed"]: r["glue_score"] for r in rows if r["task"] == task and r["method_name"] == m
                 and r["glue_score"] is not None} for m in (a, b)}
    seeds = sorted(set(score[a]) & set(score[b]), key=seed_key)
    x, y = [score[a][s] for s in seeds], [score[b][s] for s in seeds]
    entry = {"task": task, "method_a": a, "method_b": b, "metric": "glue_score", "seeds": seeds, "n": len(seeds),
             "mean_difference": float(np.mean(np.subtract(x, y))) if seeds else None}
    if len(seeds) < 2:
        entry["tests"] = [{"test": "paired t-test / Wilcoxon", "statistic": None, "p_value": None, "n": len(seeds),
                           "reason": "needs >= 2 seeds run by both methods"}]
        return entry
    diff = np.subtract(x, y)
    equal = "the differences are all equal: t is undefined or infinite" if np.ptp(diff) == 0 else None
    entry["tests"] = [
        scipy_paired_test("paired t-test (scipy.stats.ttest_rel)", stats.ttest_rel, x, y, equal),
        scipy_paired_test("Wilcoxon signed-rank (scipy.stats.wilcoxon)", stats.wilcoxon, x, y,
                          "all differences are zero" if not diff.any() else None)]
    return entry


def correctness(pred_a: pd.DataFrame, pred_b: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-example correct/wrong of two runs on the same examples of one split; None when the eval sets differ."""
    merged = pred_a[pred_a["split"] == split].merge(pred_b[pred_b["split"] == split], on="idx", suffixes=("_a", "_b"))
    if merged.empty or (merged["label_a"] != merged["label_b"]).any():
        return None
    label = merged["label_a"].astype(int)
    return (merged["prediction_a"].astype(int) == label).to_numpy(), (merged["prediction_b"].astype(int) == label
                                                                       ).to_numpy()


def mcnemar_test(ca: np.ndarray, cb: np.ndarray) -> dict:
    table = [[int(np.sum(ca & cb)), int(np.sum(ca & ~cb))], [int(np.sum(~ca & cb)), int(np.sum(~ca & ~cb))]]
    res = mcnemar(table, exact=True)
    return {"test": "McNemar exact (statsmodels mcnemar, exact=True)", "statistic": float(res.statistic),
            "p_value": float(res.pvalue), "n": len(ca), "table": table, "reason": None}


def _mean_difference(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def paired_bootstrap(ca: np.ndarray, cb: np.ndarray) -> dict:
    """95% CI of accuracy(a) - accuracy(b), resampling examples (paired). Percentile interval: BCa's jackknife
    costs O(n^2) on MNLI/QQP-sized dev sets; batches bound the memory."""
    out = {"test": "paired bootstrap, percentile (scipy.stats.bootstrap)",
           "difference": float(_mean_difference(ca, cb)),
           "ci_low": None, "ci_high": None, "confidence_level": 0.95, "n_resamples": N_RESAMPLES, "seed": BOOT_SEED,
           "n": len(ca), "reason": None}
    try:
        res = stats.bootstrap((ca.astype(float), cb.astype(float)), _mean_difference, paired=True, vectorized=True,
                              n_resamples=N_RESAMPLES, confidence_level=0.95, method="percentile",
                              batch=max(1, 2_000_000 // len(ca)), rng=np.random.default_rng(BOOT_SEED))
        out.update(ci_low=float(res.confidence_interval.low), ci_high=float(res.confidence_interval.high))
    except ValueError as e:  # e.g. a single example
        out["reason"] = str(e)
    return out


def example_level_tests(records: list[RunRecord], task: str, a: str, b: str) -> list[dict]:
    """Per-example tests on predictions.csv, runs paired by seed (or the first seed of each when none is shared)."""
    runs = {m: {r.summary.get("seed"): r for r in records if task_of(r) == task and method_of(r) == m
                and r.predictions is not None} for m in (a, b)}
    if not runs[a] or not runs[b]:
        return [{"task": task, "method_a": a, "method_b": b, "reason": "predictions.csv missing for a method"}]
    if task == "stsb":
        return [{"task": task, "method_a": a, "method_b": b, "reason": "regression task: no per-example correctness"}]
    seeds = sorted(set(runs[a]) & set(runs[b]), key=seed_key)
    first = min(runs[a], key=seed_key), min(runs[b], key=seed_key)
    pairs = [(runs[a][s], runs[b][s], f"seed {s}") for s in seeds] or [
        (runs[a][first[0]], runs[b][first[1]], "first seed of each (no shared seed)")]
    out = []
    for ra, rb, paired_by in pairs:
        head = {"task": task, "method_a": a, "method_b": b, "run_a": ra.name, "run_b": rb.name, "paired_by": paired_by}
        for split in sorted(set(ra.predictions["split"]) & set(rb.predictions["split"])):
            pair = correctness(ra.predictions, rb.predictions, split)
            out.append({**head, "split": split, "reason": "the two runs' eval sets differ (idx or labels)"} if pair
                       is None else {**head, "split": split, "n": len(pair[0]), "accuracy_a": float(pair[0].mean()),
                                     "accuracy_b": float(pair[1].mean()), "mcnemar": mcnemar_test(*pair),
                                     "bootstrap": paired_bootstrap(*pair)})
    return out


def aggregate(records: list[RunRecord]) -> dict:
    """Everything in comparison/aggregated_metrics.json."""
    rows = [run_row(r) for r in records]
    groups = group_stats(rows)
    seed_level, example_level = [], []
    for task, by_method in groups.items():
        for a, b in method_pairs(by_method):
            seed_level.append(seed_level_tests(rows, task, a, b))
            example_level += example_level_tests(records, task, a, b)
    return {"checkpoint_rule": CHECKPOINT_RULE, "runs": rows, "groups": groups, "derived": derived_metrics(groups),
            "glue_average": glue_average(groups),
            "significance": {"seed_level": seed_level, "example_level": example_level}}


# ---------------------------------------------------------------------------------------------------------------
# Output files (atomic) and figures.

def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)` into a temp file in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _finite(obj):
    """JSON has no NaN/inf: they become null."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(_finite(obj), indent=2, allow_nan=False)))


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="pdf", bbox_inches="tight"))


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple, squeeze: bool = True):
    fig = Figure(figsize=figsize)  # constrained layout from rcParams
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def smooth(values: list[float]) -> tuple[np.ndarray, int]:
    """Moving average over ~2% of the points: per-step train loss is too noisy to read."""
    window = max(1, len(values) // 50)
    return pd.Series(values, dtype=float).rolling(window, min_periods=1).mean().to_numpy(), window


def series(history: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in history if r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def headline_key(history: list[dict]) -> str:
    """The dev curve to compare: the task's GLUE number when logged, else accuracy or Pearson."""
    keys = {k for r in history for k in r}
    return next((k for k in ("validation_glue_score", "validation_accuracy", "validation_pearson") if k in keys),
                "validation_glue_score")


def task_label(task: str, sep: str = "\n") -> str:
    return f"{TASKS.get(task, task)}{sep}({GLUE_LABEL.get(task, 'acc')})"


def plot_learning_curve(rec: RunRecord, path: Path) -> None:
    fig, (ax_loss, ax_metric) = new_figure(1, 2, figsize=(9, 3.4))
    steps, loss = series(rec.history, "train_loss")
    if steps:
        smoothed, window = smooth(loss)
        if window > 1:
            ax_loss.plot(steps, loss, color="0.75", lw=0.8, label="train loss (per logged step)")
        ax_loss.plot(steps, smoothed, color="C0", lw=1.6,
                     label=f"train loss (moving avg, {window} points)" if window > 1 else "train loss")
    steps, vloss = series(rec.history, "validation_loss")
    if steps:
        ax_loss.plot(steps, vloss, "s-", color="C3", ms=4, label="validation loss")
    colors = {m: f"C{k}" for k, m in enumerate(["accuracy", "mcc", "f1", "pearson", "spearman"])}
    for metric in (m for m in METRICS if m != "glue_score"):
        steps, values = series(rec.history, f"validation_{metric}")
        if steps:  # a mismatched-split metric: its matched colour, dashed
            ax_metric.plot(steps, values, "o" + ("--" if metric.endswith("_mm") else "-"), ms=4,
                           color=colors[metric.removesuffix("_mm")], label=metric)
    loss_label = "loss (train: incl. orthogonal regulariser)" if method_of(rec) == "AdaLoRA" else "loss"
    for ax, ylabel in ((ax_loss, loss_label), (ax_metric, "validation metric")):
        for step in sorted({r["step"] for r in rec.history if r.get("event") == "glora_reallocation"}):
            ax.axvline(step, color="k", ls=":", lw=1, label="GLoRA reallocation")
        ax.set(xlabel="optimizer step", ylabel=ylabel)
        if ax.lines:
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "no rows in the history", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{rec.name}\n{method_of(rec)} on {TASKS.get(task_of(rec), task_of(rec))}")
    save_figure(fig, path)


def draw_matrix(ax, values, texts, xlabels, ylabels, cmap, vmin=None, vmax=None):
    """A heatmap with text in each cell, white on dark cells and black on light ones."""
    im = ax.imshow(np.asarray(values, dtype=float), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for (i, j), v in np.ndenumerate(np.asarray(values, dtype=float)):
        if np.isfinite(v):
            r, g, b, _ = im.cmap(im.norm(v))
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=8,
                    color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    ax.set_xticks(range(len(xlabels)), xlabels)
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.spines[:].set_visible(False)
    return im


def plot_confusion(rec: RunRecord, matrices: dict, path: Path) -> None:
    fig, axes = new_figure(1, len(matrices), figsize=(4.2 * len(matrices), 3.8), squeeze=False)
    names = CLASS_NAMES.get(task_of(rec), [])
    for ax, (split, cm) in zip(axes[0], matrices.items()):
        labels = [names[i] if 0 <= i < len(names) else str(i) for i in cm["labels"]]
        counts = np.asarray(cm["matrix"])
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # colour by row share: classes differ
        texts = [[f"{c}\n{s:.0%}" for c, s in zip(*row)] for row in zip(counts, share)]
        draw_matrix(ax, share, texts, labels, labels, "Blues", vmin=0, vmax=1)
        ax.set(xlabel="predicted", ylabel="true", title=f"{split} (n={cm['n']}, acc={cm['accuracy']:.3f})")
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{rec.name}: {method_of(rec)} on {TASKS.get(task_of(rec), task_of(rec))}")
    save_figure(fig, path)


def draw_ranks(ax, table: pd.DataFrame, vmax=None):
    texts = [[f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}" for v in row] for row in table.to_numpy()]
    return draw_matrix(ax, table.to_numpy(), texts, list(table.columns), [f"layer {i}" for i in table.index],
                       "viridis", vmin=0, vmax=vmax)


def plot_rank_allocation(rec: RunRecord, path: Path) -> None:
    table = rank_table(rec.summary.get("final_ranks"))
    fig, ax = new_figure(figsize=(4.8, 1.2 + 0.32 * max(len(table), 2)))
    if table.empty:
        ax.text(0.5, 0.5, "no final_ranks with layer/matrix names", ha="center", va="center")
    else:
        fig.colorbar(draw_ranks(ax, table), ax=ax, label="final rank")
        ax.set(xlabel="adapted matrix")
    ax.set_title(f"{rec.name}\n{method_of(rec)} final ranks (budget {rec.summary.get('rank_budget_total')})")
    save_figure(fig, path)


def grouped_bars(ax, agg: dict, key: str, scale: float = 1.0) -> dict:
    """Bars per task, one per method: mean with a std error bar and each run as a dot. Returns the bar x's."""
    groups, tasks = agg["groups"], list(agg["groups"])
    methods = sort_methods(m for g in groups.values() for m in g)
    width, xs = 0.8 / len(methods), {}
    for k, method in enumerate(methods):
        x = np.arange(len(tasks)) + (k - (len(methods) - 1) / 2) * width
        stat = [(groups[t].get(method) or {}).get(key) or {} for t in tasks]
        means = [np.nan if s.get("mean") is None else s["mean"] * scale for s in stat]
        ax.bar(x, means, width, yerr=[(s.get("std") or 0) * scale for s in stat], capsize=3, label=method,
               color=COLORS.get(method, f"C{k}"), hatch=HATCHES.get(method, ""), edgecolor="black", lw=0.6)
        for xi, t in zip(x, tasks):
            xs[(t, method)] = xi
            vals = [r[key] * scale for r in agg["runs"] if (r["task"], r["method_name"]) == (t, method)
                    and r[key] is not None]
            ax.plot([xi] * len(vals), vals, "o", color="black", ms=3, zorder=3)
    ax.set_xticks(range(len(tasks)), [task_label(t) for t in tasks])
    ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return xs


def plot_score_bars(agg: dict, path: Path) -> None:
    fig, ax = new_figure(figsize=(2.2 + 1.6 * len(agg["groups"]), 3.6))
    grouped_bars(ax, agg, "glue_score", 100)
    values = [100 * r["glue_score"] for r in agg["runs"] if r["glue_score"] is not None]
    if values:  # zoom in: the methods differ by a point or two, invisible on a 0-100 axis
        ax.set_ylim(max(0, min(values) - 5), min(100, max(values) + 3))
    ax.set(ylabel="dev score (%), axis not from 0", title="Final dev score: mean ± std over seeds (dots: runs)")
    save_figure(fig, path)


def plot_score_boxes(agg: dict, path: Path) -> None:
    tasks = list(agg["groups"])
    fig, axes = new_figure(1, len(tasks), figsize=(3.2 * len(tasks) + 0.5, 3.4), squeeze=False)
    rng = np.random.default_rng(0)  # jitter only
    for ax, task in zip(axes[0], tasks):
        methods = list(agg["groups"][task])
        data = [[100 * r["glue_score"] for r in agg["runs"] if (r["task"], r["method_name"]) == (task, m)
                 and r["glue_score"] is not None] for m in methods]
        boxes = ax.boxplot(data, patch_artist=True, widths=0.55, medianprops={"color": "black"})
        for k, (patch, m) in enumerate(zip(boxes["boxes"], methods)):
            patch.set(facecolor=COLORS.get(m, f"C{k}"), alpha=0.6, hatch=HATCHES.get(m, ""))
            ax.plot(k + 1 + rng.uniform(-0.08, 0.08, len(data[k])), data[k], "o", color="black", ms=3, zorder=3)
        ax.set_xticks(range(1, len(methods) + 1), [f"{m}\n(n={len(d)})" for m, d in zip(methods, data)])
        ax.set(title=task_label(task, " "), ylabel="dev score (%)")
    fig.suptitle("Final dev score over seeds (box: quartiles; dots: runs)")
    save_figure(fig, path)


def plot_learning_curves(records: list[RunRecord], path: Path) -> None:
    """Rows: tasks; train loss and dev score; colour = method, line style = seed, one legend for the figure."""
    tasks = sort_tasks(task_of(r) for r in records)
    methods = sort_methods(method_of(r) for r in records)
    seeds = sorted({str(r.summary.get("seed")) for r in records}, key=lambda s: (len(s), s))
    styles = dict(zip(seeds, itertools.cycle(["-", "--", ":", "-."])))
    fig, axes = new_figure(len(tasks), 2, figsize=(10, 3 * len(tasks) + 0.6), squeeze=False)
    for row, task in zip(axes, tasks):
        for rec in (r for r in records if task_of(r) == task):
            style = {"color": COLORS.get(method_of(rec), "C7"), "ls": styles[str(rec.summary.get("seed"))], "lw": 1.3}
            steps, loss = series(rec.history, "train_loss")
            row[0].plot(steps, smooth(loss)[0], **style)
            steps, metric = series(rec.history, headline_key(rec.history))
            row[1].plot(steps, np.multiply(metric, 100), marker="o", ms=3, **style)
        regulariser = " (AdaLoRA's includes its orthogonal regulariser)" if "AdaLoRA" in methods else ""
        row[0].set(xlabel="optimizer step", ylabel="train loss (moving avg)",
                   title=f"{TASKS.get(task, task)}: train loss{regulariser}")
        row[1].set(xlabel="optimizer step", ylabel="dev score (%)", title=f"{task_label(task, ' ')}: dev")
    handles = [Line2D([], [], color=COLORS.get(m, "C7"), lw=2, label=m) for m in methods] + [
        Line2D([], [], color="0.3", ls=styles[s], label=f"seed {s}") for s in seeds]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 8))
    save_figure(fig, path)


def plot_train_time(agg: dict, path: Path) -> None:
    fig, ax = new_figure(figsize=(2.2 + 1.6 * len(agg["groups"]), 3.6))
    xs = grouped_bars(ax, agg, "train_time_s")
    for (task, method), x in xs.items():  # the ratio to LoRA above each bar
        ratio = agg["derived"][task].get("methods", {}).get(method, {}).get("train_time_s_ratio")
        stat = agg["groups"][task][method]["train_time_s"] if method in agg["groups"][task] else {}
        if ratio is not None and stat.get("mean") is not None:
            ax.annotate(f"×{ratio:.2f}", (x, stat["mean"] + (stat["std"] or 0)), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=8)
    ax.set(ylabel="training time (s)", title="Training time per run: mean ± std (×: ratio to LoRA)")
    ax.margins(y=0.15)
    save_figure(fig, path)


def mean_rank_tables(records: list[RunRecord]) -> dict:
    """(task, method) -> (mean over seeds of the layer x matrix rank table, number of runs), adaptive runs only."""
    out = {}
    for task in sort_tasks(task_of(r) for r in records):
        for method in sort_methods(method_of(r) for r in records)[::-1]:
            tables = [rank_table(r.summary.get("final_ranks")) for r in records
                      if task_of(r) == task and method_of(r) == method and is_adaptive(r)]
            tables = [t for t in tables if not t.empty]
            if tables:
                out[(task, method)] = (pd.concat(tables).groupby(level=0).mean(), len(tables))
    return out


def plot_rank_comparison(records: list[RunRecord], path: Path) -> None:
    """GLoRA and AdaLoRA side by side (rows: tasks) on one colour scale; what there is when one is missing."""
    tables = mean_rank_tables(records)
    tasks = sort_tasks(t for t, _ in tables) or ["none"]
    methods = sort_methods(m for _, m in tables)[::-1] or ["none"]
    n_layers = max((len(t) for t, _ in tables.values()), default=2)
    fig, axes = new_figure(len(tasks), len(methods), squeeze=False,
                             figsize=(4.2 * len(methods) + 1, (1.2 + 0.3 * n_layers) * len(tasks) + 0.5))
    vmax = max((np.nanmax(t.to_numpy()) for t, _ in tables.values()), default=1)
    for row, task in zip(axes, tasks):
        for ax, method in zip(row, methods):
            if (task, method) not in tables:
                ax.axis("off")
                ax.text(0.5, 0.5, f"no {method} run on {TASKS.get(task, task)}" if tables else
                        "no adaptive-rank run (AdaLoRA/GLoRA) was evaluated", ha="center", va="center")
                continue
            table, n = tables[(task, method)]
            im = draw_ranks(ax, table, vmax)
            ax.set_title(f"{method} on {TASKS.get(task, task)}: mean of {n} run{'s' * (n > 1)}, "
                         f"budget {np.nansum(table.to_numpy()):.0f}")
    if tables:
        fig.colorbar(im, ax=axes, label="final rank")
        fig.suptitle("Final rank per layer and adapted matrix (one colour scale for all panels)")
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Report.

def fmt_stat(d: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    """`mean ± std (n)`; `mean (1)` for one run; `–` when there is nothing."""
    if not d or d.get("mean") is None:
        return "–"
    text = f"{d['mean'] * scale:,.{digits}f}"
    return f"{text} ± {d['std'] * scale:,.{digits}f} ({d['n']})" if d.get("std") is not None else f"{text} ({d['n']})"


def fmt_num(v, digits: int = 4) -> str:
    return "–" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def fmt_ratio(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def fmt_points(v, suffix: str = "") -> str:
    """A difference of fractions in points (x100), signed."""
    return "–" if v is None else f"{100 * v:+.2f}{suffix}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                             for r in rows]


def main_table(agg: dict) -> list[str]:
    """Rows methods; columns tasks, GLUE average, train time, trainable params: the table for the paper."""
    groups, tasks = agg["groups"], list(agg["groups"])
    rows = []
    for m in sort_methods(r["method_name"] for r in agg["runs"]):
        avg = agg["glue_average"][m]
        overall = {k: describe([r[k] for r in agg["runs"] if r["method_name"] == m])
                   for k in ("train_time_s", "trainable_params")}
        rows.append([m] + [fmt_stat((groups[t].get(m) or {}).get("glue_score"), 100) for t in tasks]
                    + [fmt_stat({"mean": avg["value"], "std": None, "n": avg["n_tasks"]}, 100)
                       + f" [{', '.join(TASKS.get(t, t) for t in avg['tasks'])}]",
                       fmt_stat(overall["train_time_s"], digits=1), fmt_stat(overall["trainable_params"], digits=0)])
    return table(["Method"] + [task_label(t, " ") for t in tasks]
                 + ["GLUE avg. (n tasks) [tasks]", "Train time (s)", "Trainable params"], rows)


def cost_table(agg: dict) -> list[str]:
    rows = []
    for t, by_method in agg["groups"].items():
        for m, g in by_method.items():
            d = agg["derived"][t].get("methods", {}).get(m, {})
            rows.append([TASKS.get(t, t), m, fmt_stat(g["train_time_s"], digits=1),
                         fmt_stat(g["trainable_params"], digits=0), fmt_stat(g["rank_budget_total"], digits=0)]
                        + [fmt_points(d.get("glue_score_gain_abs")), fmt_points(d.get("glue_score_gain_rel"), "%")]
                        + [fmt_ratio(d.get(k)) for k in ("train_time_s_ratio", "trainable_params_ratio")])
    lines = table(["Task", "Method", "Train time (s)", "Trainable params", "Rank budget", "Score gain (points)",
                   "Score gain (relative)", "Time ratio", "Param ratio"], rows)
    for t, d in agg["derived"].items():
        share = d.get("glora_share_of_adalora_gain", {}).get("glue_score")
        if share:
            lines.append(f"\n{TASKS.get(t, t)}: share of AdaLoRA's gain over LoRA that GLoRA recovers = "
                         f"{fmt_num(share['value'])}" + (f" ({share['reason']})" if share["reason"] else ""))
    return lines


SCORES_NOTE = ("Scores in %, mean ± std over seeds (n runs): MNLI mean of m/mm accuracy, QQP mean of accuracy and "
               "F1, CoLA MCC, STS-B Pearson, the others accuracy. GLUE average: mean over the tasks listed (AdaLoRA "
               "paper's convention). Train time and trainable parameters: over all of the method's runs (per task "
               "below).")
SEED_TESTS_NOTE = ("Across seeds (glue_score paired by seed; a two-sided Wilcoxon test cannot reach p < 0.05 with "
                   "fewer than 6 seeds):")
EXAMPLE_TESTS_NOTE = (f"Per example on the shared dev set (McNemar exact test; paired bootstrap 95% CI of the accuracy "
                      f"difference, {N_RESAMPLES} resamples, seed {BOOT_SEED}):")
PUBLISHED_NOTE = ("Zhang et al., *Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning* (AdaLoRA), ICLR "
                  "2023, Table 1. Copied for reference only: a different backbone, budget or seed count makes them not "
                  "directly comparable with ours.")


def significance_tables(agg: dict) -> list[str]:
    sig = agg["significance"]
    rows = [[TASKS.get(e["task"], e["task"]), f"{e['method_a']} − {e['method_b']}", fmt_points(e["mean_difference"]),
             t["test"], fmt_num(t["statistic"]), fmt_num(t["p_value"]), str(t["n"]), t["reason"] or ""]
            for e in sig["seed_level"] for t in e["tests"]]
    lines = [SEED_TESTS_NOTE, ""]
    lines += table(["Task", "Pair", "Mean diff. (points)", "Test", "Statistic", "p", "n", "Note"], rows)
    rows = []
    for e in sig["example_level"]:
        mc, bs = e.get("mcnemar") or {}, e.get("bootstrap") or {}
        ci = f"[{100 * bs['ci_low']:+.2f}, {100 * bs['ci_high']:+.2f}]" if bs.get("ci_low") is not None else "–"
        rows.append([TASKS.get(e["task"], e["task"]), f"{e['method_a']} − {e['method_b']}", e.get("paired_by", ""),
                     e.get("split", ""), str(e.get("n", "")), fmt_num(mc.get("statistic")), fmt_num(mc.get("p_value")),
                     fmt_points(bs.get("difference")), ci, e.get("reason") or bs.get("reason") or ""])
    lines += ["", EXAMPLE_TESTS_NOTE, ""]
    return lines + table(["Task", "Pair", "Paired by", "Split", "n", "McNemar stat.", "McNemar p",
                          "Acc. diff. (points)", "95% CI", "Note"], rows)


def report_markdown(agg: dict) -> str:
    groups, tasks = agg["groups"], list(agg["groups"])
    best = [[m] + [fmt_stat((groups[t].get(m) or {}).get("best_validation_glue_score"), 100) for t in tasks]
            for m in sort_methods(r["method_name"] for r in agg["runs"])]
    lines = ["# LoRA vs AdaLoRA vs GLoRA on GLUE (dev sets)", "", f"Checkpoint rule: {CHECKPOINT_RULE}", ""]
    lines += ["## Main results (ours)", "", SCORES_NOTE, "", *main_table(agg), ""]
    lines += ["## Cost and gains per task (relative to LoRA on the same task)", "", *cost_table(agg), ""]
    lines += ["## Best-step dev scores (optimistic: the step is chosen on the dev set itself)", ""]
    lines += [*table(["Method"] + [task_label(t, " ") for t in tasks], best), ""]
    lines += ["## Significance", "", *significance_tables(agg), ""]
    lines += ["## PUBLISHED numbers (not ours): AdaLoRA paper, DeBERTa-v3-base, GLUE dev", "", PUBLISHED_NOTE, ""]
    lines += table(["Method (params)"] + PUBLISHED["columns"], [[k] + v for k, v in PUBLISHED.items() if k != "columns"])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Main.

def evaluate_run(rec: RunRecord, results_dir: Path) -> None:
    """metrics.json and the figures of one run, in its folder."""
    folder = results_dir / rec.name
    metrics = run_metrics(rec)
    for check in metrics["checks"]:
        print(f"[evaluate] WARNING: {rec.name}: {check}", file=sys.stderr)
    write_json(folder / "metrics.json", metrics)
    plot_learning_curve(rec, folder / f"{rec.name}_learning_curve.pdf")
    if metrics["confusion_matrices"]:
        plot_confusion(rec, metrics["confusion_matrices"], folder / f"{rec.name}_confusion_matrix.pdf")
    if metrics["adaptive"]:
        plot_rank_allocation(rec, folder / f"{rec.name}_rank_allocation.pdf")


def compare(records: list[RunRecord], results_dir: Path) -> dict:
    """comparison/: aggregated_metrics.json, report.md and the comparison figures."""
    out = results_dir / "comparison"
    agg = aggregate(records)
    write_json(out / "aggregated_metrics.json", agg)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(report_markdown(agg)))
    plot_score_bars(agg, out / "comparison_accuracy_bar_chart.pdf")
    plot_score_boxes(agg, out / "comparison_accuracy_box_plot.pdf")
    plot_learning_curves(records, out / "comparison_learning_curves.pdf")
    plot_train_time(agg, out / "comparison_train_time.pdf")
    plot_rank_comparison(records, out / "comparison_rank_allocation.pdf")
    return agg


def main(argv: list[str] | None = None, wandb_api=None) -> int:
    """The CLI; `wandb_api` replaces `wandb.Api()` (tests). Returns the exit status."""
    try:
        results_dir, run_ids, skip_bad = parse_args(sys.argv[1:] if argv is None else argv)
        records = load_runs(results_dir, run_ids, skip_bad, WandbSource(wandb_api))
        for rec in records:
            evaluate_run(rec, results_dir)
        compare(records, results_dir)
    except EvaluationError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"[evaluate] {len(records)} run(s) evaluated; comparison in {results_dir / 'comparison'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
