"""Evaluate finished runs: per-run metrics and figures, then a comparison of methods with significance tests.

    uv run python -m src.evaluate results_dir={path} run_ids='["id-1","id-2"]' [skip_bad=true] \
        [hypotheses.H1.margin=0.01] [statistics.alpha=0.05] [seeds='[42,43]']

An entry of run_ids is a run folder name ({run_id} or {run_id}-seed{N}) or a config run_id (all its seeds). Each run
comes from W&B when it was logged online, else from its local record (config.yaml, history.jsonl, summary.json,
predictions.csv, rank_allocation.json). This module imports nothing from src: it runs in its own process.
Any number of method groups per task (a method's main config and its named variants/controls): the roles come from
the summary (`method`, `variant`), never from display names. The claims judged (H1-H4, with margins) and alpha come
from config/hypotheses.yaml, overridable on the command line. Layout: load -> per-run metrics -> comparison (groups,
roles, cost comparability, tests with their power, ablation) -> statistics (intervals, Holm, pooled test) ->
hypotheses (verdicts) -> figures -> report -> main.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import tempfile
import textwrap
import warnings
from dataclasses import dataclass
from datetime import datetime
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
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.yaml"
HYPOTHESES_CONFIG = REPO_CONFIG.parent / "hypotheses.yaml"  # evaluate-only: training never reads it
METHOD_NAMES = {"comparative-1": "AdaLoRA", "comparative-2": "LoRA", "proposed": "GLoRA", "comparative-3": "EVA"}
METHOD_ORDER = ["LoRA", "AdaLoRA", "EVA", "GLoRA"]  # then every other group (variants, controls) sorted by name
# AdaLoRA, EVA (data-driven ranks, 0 allowed) and GLoRA with all its variants: heterogeneous ranks
ADAPTIVE_METHODS = {"comparative-1", "comparative-3", "proposed"}
# A task's roles: the main config (variant null) of these methods. baseline = LoRA, reference = the method under test;
# adalora and eva: comparison methods (EVA: PEFT's explained-variance allocator). A role that is absent is None.
ROLE_OF_METHOD = {"comparative-2": "baseline", "comparative-1": "adalora", "comparative-3": "eva",
                  "proposed": "reference"}
ROLE_LABELS = {"baseline": "LoRA", "adalora": "AdaLoRA", "eva": "EVA", "reference": "GLoRA"}  # records without `method`
METHOD_OF_ROLE = {role: method for method, role in ROLE_OF_METHOD.items()}
# The roles GLoRA's share of AdaLoRA's gain needs (recovered_share): never EVA, whose absence must not block it
SHARE_ROLES = ("baseline", "adalora", "reference")
# The headline pairs by role, the newer method first: each task's seed-level tests (one Holm family per task) and the
# pooled tests (one Holm family) read this; a pair is tested only where both roles are held. EVA's pairs join the
# same families when EVA was run (so they make the other pairs' Holm adjustment stricter, never looser); without EVA
# the families are the three pairs they always were.
HEADLINE_ROLE_PAIRS = (("reference", "adalora"), ("reference", "baseline"), ("adalora", "baseline"),
                       ("reference", "eva"), ("eva", "baseline"))
COLORS = {"LoRA": "#0072B2", "AdaLoRA": "#E69F00", "EVA": "#CC79A7", "GLoRA": "#009E73"}  # Okabe-Ito: colour-blind
HATCHES = {"LoRA": "", "AdaLoRA": "//", "EVA": "xx", "GLoRA": ".."}  # bars stay apart when printed in grey
# Other groups, in sorted order: the rest of Okabe-Ito, then tab20 without its greys (grey marks "not comparable")
OTHER_COLORS = ["#56B4E9", "#D55E00", "#F0E442"] + [
    mpl.colors.to_hex(c) for c in mpl.colormaps["tab20"].colors if len(set(np.round(c, 3))) > 1]
OTHER_HATCHES = ["\\\\", "--", "++", "oo", "||", "**", "OO", "o-"]  # 8: with 21 colours every pair apart
RANK_PANELS_PER_ROW = 4  # rank heatmaps per figure row: many variants wrap instead of widening the page
TASKS = {"mnli": "MNLI", "sst2": "SST-2", "cola": "CoLA", "qqp": "QQP", "qnli": "QNLI", "rte": "RTE", "mrpc": "MRPC",
         "stsb": "STS-B", "wnli": "WNLI"}
ADALORA_TASKS = ["mnli", "sst2", "cola", "qqp", "qnli", "rte", "mrpc", "stsb"]  # the paper's GLUE average
GLUE_LABEL = {"mnli": "m/mm acc", "qqp": "acc/F1", "cola": "MCC", "stsb": "Pearson"}  # others: acc
CLASS_NAMES = {"mnli": ["entailment", "neutral", "contradiction"], "rte": ["entailment", "not_entailment"],
               "qnli": ["entailment", "not_entailment"], "sst2": ["negative", "positive"],
               "cola": ["unacceptable", "acceptable"], "mrpc": ["not_equivalent", "equivalent"],
               "qqp": ["not_duplicate", "duplicate"], "wnli": ["not_entailment", "entailment"]}
METRICS = ["accuracy", "mcc", "f1", "pearson", "spearman", "accuracy_mm", "mcc_mm", "glue_score"]
COST_KEYS = ["train_time_s", "eval_time_s", "total_steps", "trainable_params", "adapter_params",
             "adapter_params_effective", "head_params", "rank_budget_total", "budget_unit", "realloc_step",
             "realloc_seconds", "rebuild_pause_s", "trainable_params_initial", "step_time_s", "cpu_time_s",
             "environment", "eva_init_s", "eva_forward_passes", "timed_from", "timed_to"]
GROUP_KEYS = ["accuracy", "mcc", "glue_score", "f1", "pearson", "train_time_s", "trainable_params",
              "rank_budget_total", "adapter_params", "adapter_params_effective", "adapter_params_reported",
              "head_params", "step_time_median_s", "train_time_per_step_s", "cpu_time_s", "cpu_utilisation",
              "rebuild_pause_s", "best_validation_accuracy", "best_validation_glue_score",
              "eva_init_s", "eva_init_share", "eva_init_per_step_s", "eva_forward_passes"]
# W&B's summary also holds the last value of every logged history key; these are not part of summary.json
HISTORY_ONLY = {"train_loss", "lr", "epoch", "scores", "old_ranks", "new_ranks", "trainable_params_before",
                "trainable_params_after"}
MATRIX_TYPES = [("Wq", r"attention\.self\.query(_proj)?$"), ("Wk", r"attention\.self\.key(_proj)?$"),
                ("Wv", r"attention\.self\.value(_proj)?$"), ("Wo", r"attention\.output\.dense$"),
                ("Wf1", r"intermediate\.dense$"), ("Wf2", r"(?<!attention\.)output\.dense$")]
N_RESAMPLES, BOOT_SEED = 10_000, 0  # the per-example bootstrap (alpha, power and margins: config/hypotheses.yaml)
# Time ratios are marked "not comparable" when the runs' timing cannot be trusted; calibrate on a quiet machine.
# Calibrated on the demo (2 CPU cores, BENCHMARKS.md), idle vs a 2-thread process beside it: unexplained_jitter
# 0.039-0.055 idle, 0.206-0.483 loaded (a 30% phase at 1.3x the step cost, e.g. delta_grad's warm-up, keeps an idle
# run at 0.056); unexplained_iqr 0.08-0.14 idle, 0.22-0.61 loaded, but 0.21 idle with such a phase; CPU utilisation
# 0.97-0.99 idle, 0.49-0.50 loaded.
STEP_SPREAD_MAX = {     # a run's step-time spread above this, by what its record holds (best first): outside load
    "unexplained_jitter": 0.10,
    "unexplained_iqr": 0.20,   # records before unexplained_jitter
    "iqr/median": 0.20,        # records before per-step token counts
}
# (max - min)/median of one group's per-run median step times above this: seeds timed apart. Only for comparisons
# with a run that has no timing window: with windows, timed_apart checks each seed's pair directly, and drift between
# seeds (each pair timed back to back) moves both methods alike, so the per-seed ratio still measures the methods.
SEED_SPREAD_MAX = 0.10
CPU_UTIL_MIN = 0.75     # CPU runs: cpu_time_s / (train_time_s x cpu_threads) below this: cores were shared
# A seed's two runs timed further apart than max(PAIR_GAP_MIN_S, PAIR_GAP_RUNS x the longer run's timing window)
# measured the machine at two times: this VM's speed drifted 20% within an hour (BENCHMARKS.md), and a seed-major
# study times a seed's methods back to back (within a few runs' length of each other).
PAIR_GAP_MIN_S = 1800.0
PAIR_GAP_RUNS = 4
# Runs differing in any of these are not timed alike (the hostname alone does not matter: twin machines)
ENV_KEYS = ["device", "device_name", "cpu_threads", "gpu_model", "world_size", "precision", "torch", "transformers",
            "peft"]
ENV_DEFAULTS = {"precision": "fp32"}  # records older than the key computed in float32 (torch's default)
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

def parse_args(argv: list[str]) -> tuple[Path, list[str], bool, dict, list[int] | None]:
    """`results_dir=... run_ids=[...] skip_bad=... [seeds=[...]] [hypotheses.H1.margin=... statistics.alpha=...]`
    (Hydra-style dotlist) -> (results_dir, run_ids, skip_bad, settings: config/hypotheses.yaml with the overrides,
    seeds: only these seeds' runs, or None: every seed)."""
    try:
        cli = OmegaConf.to_container(OmegaConf.from_dotlist(list(argv)))
    except (OmegaConfBaseException, ValueError) as e:
        raise EvaluationError(f"cannot parse arguments {argv}: {e}") from None
    seeds = cli.get("seeds")  # one look of a sequential study: its seeds only, whatever later seeds exist
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise EvaluationError(f"seeds must be a non-empty list of integers, e.g. seeds='[42,43]'; got {seeds!r}")
    unknown = sorted(set(cli) - {"results_dir", "run_ids", "skip_bad", "seeds", "statistics", "hypotheses"})
    if unknown:
        raise EvaluationError(f"unknown argument(s) {unknown}; expected results_dir=PATH run_ids='[\"id\",...]' "
                              f"[skip_bad=true] [seeds='[42,43]'] [hypotheses.H1.margin=X statistics.alpha=X ...]")
    if not cli.get("results_dir"):
        raise EvaluationError("results_dir=PATH is required")
    run_ids = cli.get("run_ids")
    if not isinstance(run_ids, list) or not run_ids or not all(isinstance(r, str) and r for r in run_ids):
        raise EvaluationError(f"run_ids must be a non-empty list of strings, e.g. run_ids='[\"id-1\",\"id-2\"]'; "
                              f"got {run_ids!r}")
    skip_bad = cli.get("skip_bad", False)
    if not isinstance(skip_bad, bool):
        raise EvaluationError(f"skip_bad must be true or false; got {skip_bad!r}")
    settings = load_settings({k: cli[k] for k in ("statistics", "hypotheses") if k in cli})
    return Path(str(cli["results_dir"])), list(dict.fromkeys(run_ids)), skip_bad, settings, seeds


def load_settings(overrides: dict | None = None, path: Path = HYPOTHESES_CONFIG) -> dict:
    """config/hypotheses.yaml merged with command-line overrides (a key the file does not have is an error), checked:
    alpha in (0, 0.5), power in (0, 1), n_resamples >= 100, every margin a number (H3's and H4's in (0, 1))."""
    base = OmegaConf.load(path)
    OmegaConf.set_struct(base, True)
    try:
        settings = OmegaConf.to_container(OmegaConf.merge(base, overrides or {}))
    except OmegaConfBaseException as e:
        raise EvaluationError(f"bad hypotheses/statistics override ({str(e).splitlines()[0]}); the keys are those "
                              f"of {path}") from None
    st = settings["statistics"]
    checks = [("statistics.alpha", st["alpha"], 0 < _num(st["alpha"]) < 0.5, "in (0, 0.5)"),
              ("statistics.power", st["power"], 0 < _num(st["power"]) < 1, "in (0, 1)"),
              ("statistics.n_resamples", st["n_resamples"], isinstance(st["n_resamples"], int)
               and st["n_resamples"] >= 100, "an integer >= 100")]
    for hid, h in settings["hypotheses"].items():
        bounded = hid in ("H3", "H4")
        ok = 0 < _num(h["margin"]) < 1 if bounded else math.isfinite(_num(h["margin"]))
        checks.append((f"hypotheses.{hid}.margin", h["margin"], ok, "in (0, 1)" if bounded else "a number"))
    for key, value, ok, want in checks:
        if not ok:
            raise EvaluationError(f"{key}={value!r} must be {want}")
    check_sequential(st.get("sequential"))  # null: the fixed design; else one look of bench/study.py --until-decided
    return settings


def _num(value) -> float:
    """A config value as a float; NaN (fails every check) when it is not a number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


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


def resolve_run_names(results_dir: Path, run_ids: list[str], wb: WandbSource,
                      seeds: list[int] | None = None) -> tuple[list[str], list[str]]:
    """Run names to evaluate (config run_ids expanded to their seeds; only `seeds`' runs when given) and one line per
    unknown or broken id."""
    finished, broken = scan_results(results_dir)
    if seeds is not None:  # a later seed's runs, finished or still training, are no part of this look
        finished = {n: s for n, s in finished.items() if s.get("seed") in seeds}
        broken = {n: b for n, b in broken.items() if (m := re.search(r"-seed(\d+)$", n)) is None or int(m[1]) in seeds}
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


def load_runs(results_dir: Path, run_ids: list[str], skip_bad: bool, wb: WandbSource,
              seeds: list[int] | None = None, skipped: list[dict] | None = None) -> list[RunRecord]:
    """The runs to evaluate. `skipped` (a list, filled in place): the run folders skip_bad=true left out, as
    skipped_run gives them, so that the verdicts can name the seeds they lose."""
    names, problems = resolve_run_names(results_dir, run_ids, wb, seeds)
    if problems and not skip_bad:
        raise EvaluationError(" | ".join(problems) + " (pass skip_bad=true to evaluate the other runs)")
    folders = sorted(p for p in results_dir.iterdir() if p.is_dir()) if results_dir.is_dir() else []
    if skipped is not None:  # broken folders (no or an unreadable summary.json), as resolve_run_names names them
        skipped += [skipped_run(f, p) for p in problems for f in folders if p.startswith(f"run {f.name!r} ")]
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
            if skipped is not None:
                skipped.append(skipped_run(results_dir / name, message))
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


def method_key_of(rec: RunRecord) -> str | None:
    """comparative-2 (LoRA), comparative-1 (AdaLoRA), comparative-3 (EVA), proposed (GLoRA family); from the display
    name for old records."""
    method = rec.summary.get("method") or rec.config.get("method")
    return method or {name: key for key, name in METHOD_NAMES.items()}.get(method_of(rec))


def variant_of(rec: RunRecord) -> str | None:
    """The named variant/control of a method; null for the method's main config (and for records before variants)."""
    return rec.summary.get("variant", rec.config.get("variant")) or None


def is_adaptive(rec: RunRecord) -> bool:
    return method_key_of(rec) in ADAPTIVE_METHODS or len(set((rec.summary.get("final_ranks") or {}).values())) > 1


def ranks_of(summary: dict) -> dict:
    """final_ranks, plus EVA's matrices that got rank 0 (eva_ranks; they hold no adapter, so final_ranks may lack them):
    a 0 in the rank table and its means over seeds, not a blank."""
    ranks = dict(summary.get("final_ranks") or {})
    return {**{k: 0 for k, r in (summary.get("eva_ranks") or {}).items() if r == 0 and k not in ranks}, **ranks}


def rank_histogram(runs: list[list[int]], r: int) -> dict:
    """Final ranks of one group's runs (one list of per-matrix ranks per run) in bins around the uniform rank r:
    0 (no adapter), 1..r/2, r/2+1..r-1, r, r+1..2r, above 2r. Counts are means over the runs (matrices per run);
    bins that hold no integer at this r are left out."""
    if r < 1:
        raise ValueError(f"rank_histogram: r={r} must be at least 1")
    half = r // 2
    edges = [("0", 0, 0), (f"1–{half}", 1, half), (f"{half + 1}–{r - 1}", half + 1, r - 1), (str(r), r, r),
             (f"{r + 1}–{2 * r}", r + 1, 2 * r), (f">{2 * r}", 2 * r + 1, None)]
    edges = [(label.replace(f"{lo}–{hi}", str(lo)) if lo == hi else label, lo, hi) for label, lo, hi in edges
             if hi is None or lo <= hi]
    pooled = sorted(k for ranks in runs for k in ranks)
    counts = {label: sum(lo <= k and (hi is None or k <= hi) for k in pooled) / len(runs) for label, lo, hi in edges}
    return {"r": r, "bins": counts, "n_runs": len(runs), "matrices": len(pooled) / len(runs),
            "min": pooled[0], "median": float(np.median(pooled)), "max": pooled[-1]}


def rank_histograms(records: list[RunRecord]) -> dict:
    """task -> method -> rank_histogram of its runs' final ranks, binned around the task's uniform rank (LoRA's
    mean rank where LoRA ran, else the mean over every run of the task), so one task's rows share their bins."""
    out = {}
    for task in sort_tasks(task_of(r) for r in records):
        runs = [r for r in records if task_of(r) == task and ranks_of(r.summary)]
        if not runs:
            continue
        lora = [r for r in runs if method_key_of(r) == "comparative-2" and not variant_of(r)] or runs
        ref = [k for r in lora for k in ranks_of(r.summary).values()]
        r_uniform = max(1, round(sum(ref) / len(ref)))
        out[task] = {m: rank_histogram([list(ranks_of(r.summary).values()) for r in runs if method_of(r) == m],
                                       r_uniform)
                     for m in sort_methods(method_of(r) for r in runs)}
    return out


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


ONE_CLASS_SHARE = 0.98  # a classifier that gives one label to this share of a split has collapsed to that class


def one_class_checks(matrices: dict) -> list[str]:
    """A split whose predictions are (nearly) all one label: the model learned the label prior, not the task (e.g.
    CoLA at a learning rate too low for the method); its accuracy then equals that label's share."""
    out = []
    for split, m in matrices.items():
        predicted = np.asarray(m["matrix"]).sum(axis=0)
        top = int(predicted.argmax())
        share = predicted[top] / m["n"]
        if share >= ONE_CLASS_SHARE:
            truth = np.asarray(m["matrix"]).sum(axis=1)[top] / m["n"]
            out.append(f"{split}: predicts label {m['labels'][top]} for {100 * share:.1f}% of {m['n']} examples "
                       f"(its share of the labels: {100 * truth:.1f}%): a one-class model")
    return out


def run_metrics(rec: RunRecord) -> dict:
    """metrics.json of one run: final (headline) and best-step metrics, cost, ranks, confusion matrices."""
    s = rec.summary
    matrices = confusion_matrices(rec)
    recomputed = matrices.get("validation", {}).get("accuracy")
    checks = [] if recomputed is None or s.get("accuracy") is None or abs(recomputed - s["accuracy"]) < 1e-6 else [
        f"accuracy from predictions.csv ({recomputed:.6f}) differs from summary.json ({s['accuracy']:.6f})"]
    checks += one_class_checks(matrices)
    train_losses = [r["train_loss"] for r in rec.history if "train_loss" in r]
    return {
        "run_name": rec.name, "run_id": s.get("run_id"), "method": s.get("method"), "method_name": method_of(rec),
        "variant": variant_of(rec), "task": task_of(rec), "seed": s.get("seed"), "backbone": s.get("backbone"),
        "source": rec.source,
        "glue_metric": s.get("glue_metric"), "checkpoint_rule": CHECKPOINT_RULE,
        "final": {k: s[k] for k in METRICS if s.get(k) is not None},
        "best": {"step": s.get("best_step"), **{k.removeprefix("best_validation_"): v for k, v in s.items()
                                                 if k.startswith("best_validation_")}},
        "cost": {k: s[k] for k in COST_KEYS if s.get(k) is not None},
        "adaptive": is_adaptive(rec),
        "ranks_by_layer": {str(i): row.dropna().astype(int).to_dict()
                           for i, row in rank_table(ranks_of(s)).iterrows()},
        "history": {"train_rows": len(train_losses), "eval_rows": sum(any(k.startswith("validation_") for k in r)
                                                                      for r in rec.history),
                    "final_train_loss": train_losses[-1] if train_losses else None},
        "confusion_matrices": matrices, "checks": checks,
    }


# ---------------------------------------------------------------------------------------------------------------
# Comparison: groups and roles, derived metrics, GLUE average.

def sort_methods(methods) -> list[str]:
    """LoRA, AdaLoRA, GLoRA, then every other group (variants, controls) sorted by name."""
    return sorted(set(methods), key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))


def seed_key(seed) -> tuple:
    """Numeric seeds in numeric order, anything else after them."""
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def sort_tasks(tasks) -> list[str]:
    return sorted(set(tasks), key=lambda t: (list(TASKS).index(t) if t in TASKS else 99, t))


def cpu_utilisation(s: dict) -> float | None:
    """cpu_time_s / (train_time_s x cpu_threads) of a CPU run: near 1 when training had its threads to itself."""
    env = s.get("environment") if isinstance(s.get("environment"), dict) else {}
    if env.get("device") != "cpu" or not env.get("cpu_threads"):
        return None
    wall = s.get("train_time_s")
    return _ratio(s.get("cpu_time_s"), None if wall is None else wall * env["cpu_threads"])


def run_row(rec: RunRecord) -> dict:
    """One run's numbers for the comparison, the new summary fields (variant, budget, timing) when recorded."""
    s = rec.summary
    step = s.get("step_time_s") if isinstance(s.get("step_time_s"), dict) else {}
    effective = s.get("adapter_params_effective") is not None
    return {"run_name": rec.name, "run_id": s.get("run_id"), "task": task_of(rec), "method": method_key_of(rec),
            "backbone": s.get("backbone"),
            "method_name": method_of(rec), "variant": variant_of(rec), "seed": s.get("seed"),
            "source": rec.source.split()[0],
            **{k: s.get(k) for k in METRICS + COST_KEYS + ["best_step", "best_validation_accuracy",
                                                            "best_validation_glue_score"]},
            "adapter_params_reported": s.get("adapter_params_effective" if effective else "adapter_params"),
            "adapter_params_source": "adapter_params_effective" if effective else (
                "adapter_params" if s.get("adapter_params") is not None else None),
            "step_time_median_s": step.get("median"), "step_time_iqr_s": step.get("iqr"),
            # load shows as step-to-step jitter that the batches' padded lengths do not explain (training records
            # it as unexplained_jitter); older records: unexplained_iqr, then the raw iqr/median
            **step_time_spread(step),
            "train_time_per_step_s": _ratio(s.get("train_time_s"), s.get("total_steps") or s.get("final_step")),
            "cpu_utilisation": cpu_utilisation(s),
            # EVA's data pass (before the first step; inside train_time_s): its share, and amortised per step
            "eva_init_share": _ratio(s.get("eva_init_s"), s.get("train_time_s")),
            "eva_init_per_step_s": _ratio(s.get("eva_init_s"), s.get("total_steps") or s.get("final_step")),
            "one_class": one_class_checks({k: v for k, v in confusion_matrices(rec).items() if k == "validation"})}


def step_time_spread(step: dict) -> dict:
    for basis in ("unexplained_jitter", "unexplained_iqr"):
        if step.get(basis) is not None:
            return {"step_time_spread": step[basis], "step_time_spread_basis": basis}
    return {"step_time_spread": _ratio(step.get("iqr"), step.get("median")), "step_time_spread_basis": "iqr/median"}


def describe(values: list) -> dict:
    """mean, std (ddof=1; null for one value) and n of the values that are there."""
    v = np.array([x for x in values if x is not None], dtype=float)
    return {"mean": float(np.mean(v)) if len(v) else None, "std": float(np.std(v, ddof=1)) if len(v) >= 2 else None,
            "n": len(v)}


def _shared(values: list):
    """The one value all runs share (None when none has it), else "mixed"."""
    distinct = list(dict.fromkeys(json.dumps(v, sort_keys=True) for v in values))
    return json.loads(distinct[0]) if len(distinct) == 1 else "mixed"


def group_stats(rows: list[dict]) -> dict:
    """groups[task][method_name] = {n, seeds, runs, method, variant, budget_unit, adapter_params_source,
    <key>: {mean, std, n}}."""
    seen = {}
    for r in rows:  # a second run of one (task, method, seed) would be pooled into its means and overwrite its pair
        other = seen.setdefault((r["task"], r["method_name"], r["seed"]), r)
        if other is not r:
            raise EvaluationError(
                f"{other['run_name']} and {r['run_name']} are both {r['method_name']} on {r['task']} with seed "
                f"{r['seed']} (backbones {other.get('backbone')!r}, {r.get('backbone')!r}): evaluate them in separate "
                f"calls, or give one of them another method_name")
    groups = {}
    for task in sort_tasks(r["task"] for r in rows):
        groups[task] = {}
        for method in sort_methods(r["method_name"] for r in rows if r["task"] == task):
            runs = [r for r in rows if r["task"] == task and r["method_name"] == method]
            groups[task][method] = {"n": len(runs), "seeds": [r["seed"] for r in runs],
                                    "runs": [r["run_name"] for r in runs],
                                    **{k: _shared([r[k] for r in runs]) for k in
                                       ("method", "variant", "budget_unit", "adapter_params_source")},
                                    **{k: describe([r[k] for r in runs]) for k in GROUP_KEYS}}
    return groups


def role_of(method: str | None, variant: str | None, name: str) -> str | None:
    """baseline (LoRA), adalora, eva or reference (GLoRA): a method's main config; a variant has no role."""
    if variant is not None:
        return None
    return ROLE_OF_METHOD.get(method or {v: k for k, v in METHOD_NAMES.items()}.get(name))


def task_roles(by_method: dict) -> dict[str, str | None]:
    """role -> the group name that holds it on one task (the first in display order), None when absent. A method's
    main config (no variant) holds its role. When no main config is there at all, each method's only `tuned` group
    does (runs that are all tuned compare among themselves); tuned and untuned groups never share the roles (a tuned
    method against an untuned baseline is not a fair headline), and a control (shuffled, delta_grad, ...) never
    takes one: the headline numbers would otherwise describe the control under the method's name."""
    roles = dict.fromkeys(ROLE_LABELS)
    for name in sort_methods(by_method):
        group = by_method[name]
        role = role_of(group.get("method"), group.get("variant"), name)
        if role is not None and roles[role] is None:
            roles[role] = name
    return roles if any(roles.values()) else tuned_roles(by_method)


def tuned_roles(by_method: dict) -> dict[str, str | None]:
    """role -> each method's only `tuned` group on one task (None when it has none, or several to choose from)."""
    roles = {}
    for role, method in METHOD_OF_ROLE.items():
        tuned = [n for n, g in by_method.items() if g.get("method") == method and g.get("variant") == "tuned"]
        roles[role] = tuned[0] if len(tuned) == 1 else None
    return roles


def main_config_of(by_method: dict, method: str | None) -> str | None:
    """The group of a method's main config (no variant) on one task, None when it was not evaluated."""
    return next((n for n in sort_methods(by_method) if by_method[n].get("method") == method
                 and by_method[n].get("variant") is None), None) if method else None


def _mean(group: dict | None, key: str):
    return None if group is None else (group.get(key) or {}).get("mean")


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def relative_to_baseline(group: dict, base: dict, runs: list[dict], base_runs: list[dict], confidence: float) -> dict:
    """Gains (absolute and relative), budget ratios and time ratios of one group against LoRA on the same task."""
    out = {}
    for key in ("accuracy", "glue_score"):
        m, b = _mean(group, key), _mean(base, key)
        out[f"{key}_gain_abs"] = None if m is None or b is None else m - b
        out[f"{key}_gain_rel"] = _ratio(out[f"{key}_gain_abs"], b)
    for key in ("trainable_params", "rank_budget_total"):
        out[f"{key}_ratio"] = _ratio(_mean(group, key), _mean(base, key))
    out["adapter_params_ratio"] = _ratio(_mean(group, "adapter_params_reported"),
                                         _mean(base, "adapter_params_reported"))
    out["adapter_params_basis"] = _shared([r["adapter_params_source"] for r in runs + base_runs])
    return {**out, **time_ratios(runs, base_runs, confidence)}


def recovered_share(by_method: dict, key: str, roles: dict | None = None, absent: str = "") -> dict:
    """(GLoRA - LoRA) / (AdaLoRA - LoRA): the share of AdaLoRA's gain over LoRA that GLoRA recovers; the three
    groups are the roles (main configs, or the tuned groups), not display names; only these three (SHARE_ROLES:
    EVA, present or not, plays no part). `absent`: how a missing role's group is named (" (tuned)")."""
    roles = roles or task_roles(by_method)
    name = {role: roles[role] or f"{ROLE_LABELS[role]}{absent}" for role in SHARE_ROLES}
    missing = [name[r] for r in SHARE_ROLES if _mean(by_method.get(roles[r]) if roles[r] else None, key) is None]
    if missing:
        return {"value": None, "metric": key, "reason": f"no {key} for {', '.join(missing)}"}
    lora = _mean(by_method[name["baseline"]], key)
    denominator = _mean(by_method[name["adalora"]], key) - lora
    if abs(denominator) < 1e-9:
        return {"value": None, "metric": key,
                "reason": f"{name['adalora']} and {name['baseline']} have the same mean (denominator ~0)"}
    if denominator < 0:  # a ratio over a loss has no meaning as a share (its sign flips)
        return {"value": None, "metric": key, "reason": f"{name['adalora']} is below {name['baseline']} "
                                                        f"({100 * denominator:+.2f} points): no gain to recover"}
    return {"value": (_mean(by_method[name["reference"]], key) - lora) / denominator, "metric": key, "reason": None}


def derived_metrics(groups: dict, rows: list[dict], confidence: float) -> dict:
    """Per task: the roles, each group's gains, budget and time ratios against LoRA, the share of AdaLoRA's gain."""
    out = {}
    for task, by_method in groups.items():
        roles, tuned = task_roles(by_method), tuned_roles(by_method)
        beside = tuned != roles and any(tuned.values())  # tuned groups beside the main configs
        extra = {"tuned": {"roles": tuned, "glora_share_of_adalora_gain": {
            k: recovered_share(by_method, k, tuned, absent=" (tuned)") for k in ("accuracy", "glue_score")}}} \
            if beside else {}
        base = roles["baseline"]
        if base is None:
            out[task] = {"baseline": None, "reference": roles["reference"], "roles": roles, **extra,
                         "reason": "no LoRA run (method comparative-2, no variant) on this task"}
            continue
        runs = {m: [r for r in rows if r["task"] == task and r["method_name"] == m] for m in by_method}
        methods = {m: relative_to_baseline(g, by_method[base], runs[m], runs[base], confidence)
                   for m, g in by_method.items() if m != base}
        for m in methods:  # a tuned group's score gain is over tuned LoRA, never over an untuned baseline
            if beside and by_method[m].get("variant") == "tuned":
                t = tuned["baseline"]
                gains = relative_to_baseline(by_method[m], by_method[t], runs[m], runs[t], confidence) \
                    if t and t != m else {}
                methods[m].update({k: gains.get(k) for k in methods[m] if "_gain_" in k})
                methods[m]["gain_over"] = t if t != m else None
            else:
                methods[m]["gain_over"] = base
        out[task] = {"baseline": base, "reference": roles["reference"], "roles": roles, "methods": methods,
                     "glora_share_of_adalora_gain": {k: recovered_share(by_method, k, roles)
                                                     for k in ("accuracy", "glue_score")}, **extra}
    return out


def glue_average(groups: dict, rows: list[dict], confidence: float) -> dict:
    """Per method, the mean over tasks of the mean glue_score (AdaLoRA convention), on the tasks it has and on the
    tasks every method has; and `per_seed`: the GLUE average of each seed run on all of the method's tasks, with the
    interval of their mean (seeds are the units: one seed's tasks are averaged first)."""
    methods = sort_methods(m for by_method in groups.values() for m in by_method)
    has = {m: [t for t in groups if _mean(groups[t].get(m), "glue_score") is not None] for m in methods}
    common = [t for t in groups if all(t in has[m] for m in methods)]
    out = {}
    for m in methods:
        scores = {t: _mean(groups[t][m], "glue_score") for t in has[m]}
        runs = {t: [r for r in rows if r["task"] == t and r["method_name"] == m] for t in has[m]}
        per_seed = {s: float(np.mean(v)) for s, v in paired_values(runs, has[m], "glue_score").items()}
        iv = mean_interval(list(per_seed.values()), confidence)
        out[m] = {"value": float(np.mean(list(scores.values()))) if scores else None, "tasks": has[m],
                  "n_tasks": len(has[m]), "missing_from_paper_average": [t for t in ADALORA_TASKS if t not in has[m]],
                  "value_on_common_tasks": float(np.mean([scores[t] for t in common])) if common else None,
                  "common_tasks": common,
                  "per_seed": {"seeds": list(per_seed), "values": list(per_seed.values()), "mean": iv["estimate"],
                               "std": iv["sd"], "ci": iv["ci"], "confidence": confidence, "n": iv["n"],
                               "reason": iv["reason"] if per_seed else "no seed was run on every one of its tasks"}}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cost comparability: a time ratio is only a ratio of methods when both sides were timed alike.

def _missing_timing(groups: list[list[dict]]) -> str | None:
    runs = [r for g in groups for r in g]
    for what, bad in (("environment", [r for r in runs if not isinstance(r.get("environment"), dict)]),
                      ("step_time_s", [r for r in runs if not r["step_time_median_s"] or r["step_time_iqr_s"] is None]),
                      ("cpu_time_s", [r for r in runs if (r.get("environment") or {}).get("device") == "cpu"
                                      and r["cpu_utilisation"] is None])):
        if bad:
            return f"no {what} recorded ({', '.join(r['run_name'] for r in bad)})"
    return None


def _different_environment(groups: list[list[dict]]) -> str | None:
    runs = [r for g in groups for r in g]
    for key in ENV_KEYS:
        first = runs[0]
        other = next((r for r in runs if env_value(r, key) != env_value(first, key)), None)
        if other is not None:
            return (f"different environments: {key} {env_value(first, key)!r} ({first['run_name']}) vs "
                    f"{env_value(other, key)!r} ({other['run_name']})")
    return None


def env_value(run: dict, key: str):
    """A run's environment entry as compared for cost, with ENV_DEFAULTS for records older than the key."""
    return run["environment"].get(key, ENV_DEFAULTS.get(key))


def _loaded_run(groups: list[list[dict]]) -> str | None:
    for r in (r for g in groups for r in g):
        spread, limit = r["step_time_spread"], STEP_SPREAD_MAX[r["step_time_spread_basis"]]
        if spread is not None and spread > limit:
            return (f"outside load: step-time spread ({r['step_time_spread_basis']}) {spread:.3f} > {limit} "
                    f"in {r['run_name']} (median {r['step_time_median_s']:.4g} s)")
    return None


def _seed_spread(groups: list[list[dict]]) -> str | None:
    if all(has_timing_window(r) for g in groups for r in g):
        return None  # timed_apart has checked every pair
    for g in groups:
        medians = [r["step_time_median_s"] for r in g]
        spread = (max(medians) - min(medians)) / float(np.median(medians))
        if spread > SEED_SPREAD_MAX:
            return (f"seeds of {g[0]['method_name']} timed apart: per-run median step time (max - min)/median "
                    f"{spread:.3f} > {SEED_SPREAD_MAX} ({min(medians):.4g}-{max(medians):.4g} s)")
    return None


def _low_cpu_use(groups: list[list[dict]]) -> str | None:
    for r in (r for g in groups for r in g):
        if r["cpu_utilisation"] is not None and r["cpu_utilisation"] < CPU_UTIL_MIN:
            return (f"CPU utilisation {r['cpu_utilisation']:.2f} < {CPU_UTIL_MIN} in {r['run_name']} (cpu_time_s / "
                    f"(train_time_s x cpu_threads): another process shared the cores)")
    return None


RUN_TIMING_CHECKS = (_missing_timing, _loaded_run, _low_cpu_use)  # about one run's own timing


def has_timing_window(run: dict) -> bool:
    """Whether the run recorded when it was timed (timed_from/timed_to; older records did not)."""
    return bool(run.get("timed_from") and run.get("timed_to"))


def timed_apart(a: dict, b: dict) -> str | None:
    """Why two runs of one seed were not timed together, or None: the gap between their timing windows (timed_from
    .. timed_to) above max(PAIR_GAP_MIN_S, PAIR_GAP_RUNS x the longer window). Records without the window (older
    than timed_from) are not checked."""
    try:
        windows = sorted((datetime.fromisoformat(r["timed_from"]), datetime.fromisoformat(r["timed_to"]), r["run_name"])
                         for r in (a, b))
    except (KeyError, TypeError, ValueError):
        return None
    (_, end, first), (start, _, second) = windows
    gap = (start - end).total_seconds()
    limit = max(PAIR_GAP_MIN_S, PAIR_GAP_RUNS * max((w[1] - w[0]).total_seconds() for w in windows))
    if gap <= limit:
        return None
    return (f"timed apart: {second} started {gap / 60:.0f} min after {first} ended (> {limit / 60:.0f} min: the "
            f"machine's speed may have changed in between)")


def timed_runs(runs_a: list[dict], runs_b: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The runs whose own timing can be trusted: a run with no timing recorded, outside load or shared cores is left
    out, and so is its seed's run in the other group (the comparison stays paired); so is a seed whose two runs were
    timed far apart (timed_apart). Load and drift come from the machine, not the method, so the seeds left still
    compare the methods. Returns (kept_a, kept_b, excluded [{run, seed, reason}])."""
    excluded = []
    for r in runs_a + runs_b:
        why = next((w for w in (check([[r]]) for check in RUN_TIMING_CHECKS) if w), None)
        if why:
            excluded.append({"run": r["run_name"], "seed": r["seed"], "reason": why})
    dropped = {e["seed"] for e in excluded}
    by_seed = {r["seed"]: r for r in runs_b}
    for a in runs_a:
        b = by_seed.get(a["seed"])
        why = timed_apart(a, b) if b is not None and a["seed"] not in dropped else None
        if why:
            excluded.append({"run": b["run_name"], "seed": b["seed"], "reason": why})
    dropped = {e["seed"] for e in excluded}
    return ([r for r in runs_a if r["seed"] not in dropped], [r for r in runs_b if r["seed"] not in dropped],
            excluded)


def timed_comparability(runs_a: list[dict], runs_b: list[dict]) -> tuple[bool, str | None, list, list, list]:
    """timed_runs, then comparability on the runs kept: (comparable, reason, kept_a, kept_b, excluded); not
    comparable when a group has runs but none is left."""
    kept_a, kept_b, excluded = timed_runs(runs_a, runs_b)
    if (runs_a and not kept_a) or (runs_b and not kept_b):
        more = f" (and {len(excluded) - 1} more run(s) excluded)" if len(excluded) > 1 else ""
        return False, f"{excluded[0]['reason']}{more}; no seed left with both groups timed cleanly", kept_a, kept_b, \
            excluded
    return (*comparability(kept_a, kept_b), kept_a, kept_b, excluded)


def comparability(runs_a: list[dict], runs_b: list[dict]) -> tuple[bool, str | None]:
    """Whether the step times of two groups' runs measure the methods rather than the machine; else the first
    failing check, with its numbers: data recorded, same environment, no outside load within a run, seeds timed
    alike (for runs without a timing window: with one, timed_runs checked the pairs), CPU threads not shared
    (thresholds STEP_SPREAD_MAX, SEED_SPREAD_MAX, CPU_UTIL_MIN)."""
    groups = [g for g in (runs_a, runs_b) if g]
    for check in (_missing_timing, _different_environment, _loaded_run, _seed_spread, _low_cpu_use):
        reason = check(groups)
        if reason:
            return False, reason
    return True, None


def time_ratios(runs: list[dict], base_runs: list[dict], confidence: float) -> dict:
    """step_time_ratio (per-step medians, mean over seeds; train_time_s / total_steps for records without step
    times) and train_time_s_ratio (total), each {value, comparable, reason, basis} plus, for comparable runs, the
    paired interval: the geometric mean of the per-seed ratios and its `confidence` interval (log_ratio_interval)."""
    # LoRA's first run is the one the others are held to
    comparable, reason, kept_base, kept, excluded = timed_comparability(base_runs, runs)
    if comparable:
        runs, base_runs = kept, kept_base
    step_basis = "step_time_median" if all(r["step_time_median_s"] for r in runs + base_runs) else \
        "train_time_per_step"
    key = {"step_time_median": "step_time_median_s", "train_time_per_step": "train_time_per_step_s"}[step_basis]
    mean = {side: describe([r[key] for r in rs])["mean"] for side, rs in (("a", runs), ("b", base_runs))}
    totals = {side: describe([r["train_time_s"] for r in rs])["mean"] for side, rs in (("a", runs), ("b", base_runs))}
    common = {"comparable": comparable, "reason": reason, "excluded": excluded if comparable else [],
              "n_runs": [len(runs), len(base_runs)],
              # whether timed_apart could see every pair (records older than timed_from have no window)
              "drift_checked": all(has_timing_window(r) for r in runs + base_runs)}
    return {"step_time_ratio": {"value": _ratio(mean["a"], mean["b"]), **common, "basis": step_basis,
                                **paired_ratio(runs, base_runs, key, confidence, comparable)},
            "train_time_s_ratio": {"value": _ratio(totals["a"], totals["b"]), **common, "basis": "train_time_total",
                                   **paired_ratio(runs, base_runs, "train_time_s", confidence, comparable)}}


def paired_ratio(runs: list[dict], base_runs: list[dict], key: str, confidence: float, comparable: bool) -> dict:
    """{geometric_mean, ci, n_paired, confidence, ci_reason} of runs[key] / base_runs[key] paired by seed; no
    interval from runs that were not timed alike."""
    if not comparable:
        return {"geometric_mean": None, "ci": None, "n_paired": 0, "confidence": confidence,
                "ci_reason": "not comparable: no interval"}
    pairs = paired_values({"a": runs, "b": base_runs}, ["a", "b"], key)
    iv = log_ratio_interval([p[0] for p in pairs.values()], [p[1] for p in pairs.values()], confidence)
    return {"geometric_mean": iv["estimate"], "ci": iv["ci"], "n_paired": iv["n"], "confidence": confidence,
            "ci_reason": iv["reason"]}


# ---------------------------------------------------------------------------------------------------------------
# Statistics: pure functions on per-seed values (seeds are the units; a run's dev score is one observation).

def paired_values(runs_by_group: dict[str, list[dict]], groups: list[str], key: str) -> dict:
    """seed -> (value of groups[0], value of groups[1], ...) for the seeds every group ran with `key` recorded."""
    by_seed = [{r["seed"]: r[key] for r in runs_by_group.get(g, []) if r.get(key) is not None} for g in groups]
    seeds = sorted(set.intersection(*(set(d) for d in by_seed)) if by_seed else set(), key=seed_key)
    return {s: tuple(float(d[s]) for d in by_seed) for s in seeds}


def mean_interval(values, confidence: float) -> dict:
    """Two-sided t-interval of the mean of per-seed values (e.g. paired differences GLoRA - LoRA).

    Args:
        values (`array-like`): one value per seed.
        confidence (`float`): the interval's level, e.g. 0.95.

    Returns {estimate, ci: [low, high] or None, sd, n, confidence, reason}: mean ± t_{n-1,(1+c)/2} · sd/√n
    (scipy.stats.ttest_1samp(...).confidence_interval). No interval for n < 2 or zero spread (say why).
    """
    v = np.asarray(values, dtype=float)
    out = {"estimate": float(v.mean()) if len(v) else None, "ci": None, "sd": None, "n": len(v),
           "confidence": confidence, "reason": None}
    if len(v) < 2:
        return {**out, "reason": f"needs >= 2 seeds (has {len(v)})"}
    out["sd"] = float(np.std(v, ddof=1))
    if out["sd"] < 1e-12:  # equal up to float rounding
        return {**out, "reason": "the per-seed values have no spread (sd = 0): no interval"}
    ci = stats.ttest_1samp(v, 0.0).confidence_interval(confidence)
    return {**out, "ci": [float(ci.low), float(ci.high)]}


def log_ratio_interval(a, b, confidence: float) -> dict:
    """Geometric mean of the per-seed ratios a/b and its interval: mean_interval of log a - log b, exponentiated."""
    iv = mean_interval(np.log(a) - np.log(b), confidence) if len(a) else mean_interval([], confidence)
    return {**iv, "estimate": None if iv["estimate"] is None else math.exp(iv["estimate"]),
            "ci": None if iv["ci"] is None else [math.exp(iv["ci"][0]), math.exp(iv["ci"][1])]}


def fieller_interval(num, den, confidence: float) -> dict:
    """Interval of the ratio of means mean(num) / mean(den) for paired per-seed values (Fieller 1954).

    Args:
        num, den (`array-like`): per seed, e.g. GLoRA - LoRA and AdaLoRA - LoRA (the same seeds, in order).
        confidence (`float`): the interval's level.

    The interval is every ratio r for which a one-sample t-test of num - r·den = 0 is not rejected at 1 - confidence:
    (a - r·b)² ≤ t²·(v_aa - 2r·v_ab + r²·v_bb), with a, b the means and v the (co)variances of the means. It is a
    bounded interval only when mean(den) itself differs from 0 at that level (b² > t²·v_bb); otherwise the set is
    unbounded and no interval is given (`reason`). Returns {estimate, ci, n, confidence, reason}.
    """
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    n = len(num)
    out = {"estimate": None, "ci": None, "n": n, "confidence": confidence, "reason": None}
    if n < 2:
        return {**out, "reason": f"needs >= 2 seeds (has {n})"}
    a, b = float(num.mean()), float(den.mean())
    out["estimate"] = a / b if b != 0 else None
    (v_aa, v_ab), (_, v_bb) = np.cov(num, den, ddof=1) / n
    q = stats.t.ppf((1 + confidence) / 2, n - 1) ** 2
    quad, half, const = b * b - q * v_bb, a * b - q * v_ab, a * a - q * v_aa  # quad·r² - 2·half·r + const ≤ 0
    if quad <= 0:
        return {**out, "reason": f"the denominator's mean ({b:+.4g}) is not distinguishable from 0 at "
                                 f"{confidence:.4g}: the ratio's confidence set is unbounded"}
    root = math.sqrt(max(half * half - quad * const, 0.0))  # >= 0: the estimate a/b always lies inside
    return {**out, "ci": [(half - root) / quad, (half + root) / quad]}


def holm(results: list[dict], family: str) -> list[dict]:
    """Holm's step-down adjustment (statsmodels multipletests) over one family of test results, in place:
    `p_adjusted` (>= p_value; None where there is no p-value), `family`, `family_size` (tests with a p-value) and
    `adjustment`. Holm controls the family-wise error rate at alpha under any dependence between the tests."""
    tested = [r for r in results if r.get("p_value") is not None]
    adjusted = multipletests([r["p_value"] for r in tested], method="holm")[1] if tested else []
    for r in results:
        r.update(p_adjusted=None, family=family, family_size=len(tested), adjustment="holm")
    for r, p in zip(tested, adjusted):
        r["p_adjusted"] = max(float(p), r["p_value"])
    return results


def sign_flip_test(diffs: dict[str, list[float]], n_resamples: int, seed: int) -> dict:
    """Paired permutation test pooled over task x seed, stratified by task.

    Args:
        diffs (`dict`): task -> per-seed differences a - b on that task (the seeds may differ between tasks).
        n_resamples (`int`), seed (`int`): Monte Carlo sign flips; exact when 2^n is not more than n_resamples.

    Statistic: the GLUE-average difference, Σ_t mean_s(d_ts) / T (each difference weighted 1/(T·n_t), so every
    task counts once whatever its seed count or spread). Under H0 (a and b exchangeable within every run pair)
    each difference's sign flips independently (scipy.stats.permutation_test, one sample, permutation_type
    'samples'). Two-sided. Returns {test, statistic, p_value, n, n_tasks, reason}.
    """
    tasks = [t for t, d in diffs.items() if len(d)]
    values = np.concatenate([np.asarray(diffs[t], dtype=float) for t in tasks]) if tasks else np.array([])
    weights = np.concatenate([np.full(len(diffs[t]), 1 / (len(tasks) * len(diffs[t]))) for t in tasks]) \
        if tasks else np.array([])
    out = {"test": "stratified sign-flip permutation test over task x seed (scipy.stats.permutation_test)",
           "statistic": float(values @ weights) if tasks else None, "p_value": None, "n": len(values),
           "n_tasks": len(tasks), "reason": None}
    if not values.any():
        return {**out, "reason": "no non-zero difference" if len(values) else "no paired runs"}
    res = stats.permutation_test((values,), lambda d, axis=-1: np.sum(d * weights, axis=axis),
                                 permutation_type="samples", vectorized=True, n_resamples=n_resamples,
                                 alternative="two-sided", rng=np.random.default_rng(seed))
    return {**out, "p_value": float(res.pvalue)}


# ---------------------------------------------------------------------------------------------------------------
# Significance and power: seed level (paired by seed) and example level (paired by example).

def headline_pairs(roles: dict) -> list[tuple[str, str]]:
    """(GLoRA, AdaLoRA), (GLoRA, LoRA), (AdaLoRA, LoRA), then (GLoRA, EVA), (EVA, LoRA): HEADLINE_ROLE_PAIRS as group
    names, those whose two roles are held on the task; the newer method first."""
    return [(roles.get(a), roles.get(b)) for a, b in HEADLINE_ROLE_PAIRS if roles.get(a) and roles.get(b)]


def scipy_paired_test(name: str, fn, x: list, y: list, degenerate: str | None = None) -> dict:
    """What scipy gives (its small-sample warnings silenced), or its reason for giving nothing. `degenerate` says why
    what it would give is no test (t on equal differences is infinite and its p 0): then no p-value, so that it
    neither reads as a difference nor takes a place in a Holm family."""
    result = {"test": name, "statistic": None, "p_value": None, "n": len(x), "reason": degenerate}
    if degenerate:
        return result
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fn(x, y)
        if math.isfinite(res.pvalue):
            result.update(statistic=float(res.statistic), p_value=float(res.pvalue))
    except ValueError as e:
        result["reason"] = str(e)
    return result


def wilcoxon_test(x: list, y: list) -> dict:
    """scipy.stats.wilcoxon (zero_method 'wilcox' drops zero differences), its n being the non-zero differences it
    used, and the smallest two-sided p those allow (2 / 2^n, all signs alike): below alpha only from 6 on."""
    diff = np.subtract(x, y)
    nonzero = int(np.count_nonzero(diff))
    out = scipy_paired_test("Wilcoxon signed-rank (scipy.stats.wilcoxon)", stats.wilcoxon, x, y,
                            "all differences are zero" if not nonzero else None)
    return {**out, "n": nonzero, "n_zero": len(diff) - nonzero,
            "p_min_possible": min(1.0, 2 / 2 ** nonzero) if nonzero else None}


def minimum_detectable_effect(diff, alpha: float, power: float, margin: float) -> dict:
    """Power of the paired t-test at the seeds actually run (a one-sample t-test on the per-seed differences), and
    the seeds it would need for the hypothesis' margin (prospective, from the observed spread).

    Args:
        diff (`array-like`): per-seed differences a - b (fractions, e.g. of glue_score).
        alpha, power (`float`): two-sided level and power (config/hypotheses.yaml `statistics`).
        margin (`float`): the difference the claim is about (H1's margin), same unit as `diff`.

    Returns `mde` = `mde_d` × sd(diff, ddof=1), with `mde_d` the standardised effect statsmodels' `TTestPower`
    detects at nobs = n; `seeds_needed_for_margin`: prospective, the smallest n at which this pair's (1 - alpha)
    interval would exclude `margin` (decide "a - b >= margin", H1's question) with that power if the true difference
    and sd were the observed ones (`seeds_needed`: the whole answer; the sd of few seeds is itself rough). Null with
    a `reason` for n < 2 or zero spread.
    """
    diff = np.asarray(diff, dtype=float)
    out = {"mde": None, "mde_d": None, "sd_difference": None, "n": len(diff), "alpha": alpha, "power": power,
           "margin": margin, "seeds_needed_for_margin": None, "seeds_needed": None, "reason": None,
           "seeds_needed_reason": None, "method": "statsmodels TTestPower.solve_power (paired = one-sample t-test "
                                                  "on the per-seed differences)"}
    if len(diff) < 2:
        return {**out, "reason": "needs >= 2 shared seeds (the sd of the differences)",
                "seeds_needed_reason": "needs >= 2 shared seeds"}
    sd = float(np.std(diff, ddof=1))
    if sd < 1e-12:  # equal differences up to float rounding
        return {**out, "sd_difference": sd, "reason": "the per-seed differences have no spread (sd = 0)",
                "seeds_needed_reason": "no spread"}
    d = float(TTestPower().solve_power(effect_size=None, nobs=len(diff), alpha=alpha, power=power,
                                       alternative="two-sided"))
    needed = seeds_needed(float(diff.mean()), sd, [margin], 1 - alpha, power)
    out.update(sd_difference=sd, mde_d=d, mde=d * sd)
    return {**out, "seeds_needed": needed, "seeds_needed_for_margin": needed["n"],
            "seeds_needed_reason": needed["reason"]}


SEEDS_MAX = 10_000  # a verdict that needs more seeds than this is "not decidable" (the estimate sits on a bound)
SEEDS_ASSUME = "true value and sd = current estimates"


def exclusion_power(effect: float, n, alpha: float) -> float:
    """P(a two-sided (1 - 2·alpha) t-interval over n seeds excludes a bound on the estimate's side), for a true value
    |effect| sds from the bound: a one-sided t-test at alpha (statsmodels TTestPower, noncentral t). Leaves out the
    chance of excluding it on the wrong side (below alpha)."""
    return float(TTestPower().power(effect_size=effect, nobs=n, alpha=alpha, alternative="larger"))


def seeds_needed(estimate: float | None, sd: float | None, bounds: list[float], confidence: float, power: float,
                 n_max: int = SEEDS_MAX) -> dict:
    """Prospective: the smallest number of seeds at which the verdict's own interval would decide it.

    Args:
        estimate, sd (`float`): mean and sd (ddof 1) of the per-seed values on the interval's scale (a difference,
            a log ratio), taken as the truth.
        bounds (`list`): what the status compares the interval with: one margin (an at-least claim, H3b's 1) or two
            (equivalence: 1 ± margin), on the same scale.
        confidence (`float`): the verdict's level (1 - alpha on the GLUE average, 1 - alpha/k per task).
        power (`float`): the chance of deciding (config/hypotheses.yaml `statistics.power`).

    A status is reached when the two-sided `confidence` interval excludes the bound(s): each bound is a one-sided
    t-test at (1 - confidence)/2 with standardised effect |estimate - bound| / sd (exclusion_power). Estimate
    between two bounds: both must be excluded, and P_low + P_high - 1 (a lower bound on that chance) is used, so n
    is an upper bound; otherwise only the nearer bound counts. Returns {n, level, power, assumes, prospective,
    effect, reason}; n None ("not decidable") on a bound, beyond n_max seeds, or with no sd.
    """
    return seeds_to_decide([{"estimate": estimate, "sd": sd, "bounds": bounds}], confidence, power, n_max)


def seeds_to_decide(conditions: list[dict], confidence: float | dict[int, float], power: float,
                    n_max: int = SEEDS_MAX) -> dict:
    """seeds_needed for a status that needs every one of `conditions` ({estimate, sd, bounds} each, e.g. H2's
    Fieller test and AdaLoRA's gain above 0): the chance that all hold is bounded from below by the sum of their
    chances minus (k - 1), as for two bounds. `confidence` a dict: a sequential design's looks, n -> that look's
    level (the looks still to come); the answer is the first look whose interval alone would decide with `power`
    (the looks' levels differ, so the chance need not rise with n), and "not decidable" past the design's last
    look."""
    sequential = isinstance(confidence, dict)
    out = {"n": None, "level": None if sequential else confidence, "power": power, "assumes": SEEDS_ASSUME,
           "prospective": True, "effect": None, "reason": None}
    if sequential and not confidence:
        return {**out, "looks": None, "reason": "not decidable within the design: this was its last look"}
    if sequential:
        out["looks"] = {"first": min(confidence), "max_seeds": max(confidence)}
    effects = []
    for c in conditions:
        estimate, sd, bounds = c["estimate"], c["sd"], c["bounds"]
        if estimate is None or sd is None or not (math.isfinite(estimate) and math.isfinite(sd)):
            return {**out, "reason": "no estimate and sd (needs >= 2 seeds)"}
        if sd < 1e-12:
            return {**out, "reason": "no spread (sd = 0): no interval to decide with"}
        inside = len(bounds) == 2 and min(bounds) < estimate < max(bounds)
        effects += [abs(estimate - b) / sd
                    for b in (bounds if inside else [min(bounds, key=lambda b: abs(estimate - b))])]
    if not effects:
        return {**out, "reason": "no estimate and sd (needs >= 2 seeds)"}
    out["effect"] = min(effects)
    if out["effect"] < 1e-9:
        return {**out, "reason": "not decidable: the estimate sits on the margin, so no number of seeds excludes it"}

    def chance(n: int, level: float) -> float:
        return sum(exclusion_power(d, n, (1 - level) / 2) for d in effects) - (len(effects) - 1)

    if sequential:
        n = next((n for n in sorted(confidence) if n >= 2 and chance(n, confidence[n]) >= power), None)
        if n is None:
            last = max(confidence)
            return {**out, "reason": f"not decidable within the design: no look up to its {last} seeds reaches "
                                     f"power {power:g} (at {last}: {max(0.0, chance(last, confidence[last])):.2f})"}
        return {**out, "n": n, "level": confidence[n]}
    if chance(n_max, confidence) < power:
        return {**out, "reason": f"not decidable: needs more than {n_max:,} seeds (the estimate is "
                                 f"{out['effect']:.3g} sd from the margin)"}
    low, high = 1, n_max  # chance rises with n: chance(high) >= power, and n = 1 has no interval
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if chance(mid, confidence) >= power else (mid, high)
    return {**out, "n": high}


def reading(entry: dict, margin: float, alpha: float) -> str:
    """One phrase from the Holm-adjusted t-test and the interval against ±margin: a non-significant difference is
    evidence of absence only when its interval excludes differences as large as the margin."""
    mde, ci, t = entry["mde"], entry.get("ci"), entry["tests"][0]
    if mde.get("sd_difference") is not None and mde["mde"] is None:  # every seed gave the same difference
        return "no difference on any seed" if abs(entry["mean_difference"]) < 1e-12 else \
            "the same difference on every seed (no spread: no interval)"
    if t.get("p_value") is None:
        return "no test"
    if t["p_adjusted"] < alpha:
        return f"difference (Holm p < {alpha})"
    if ci is None:
        return "no difference shown (no interval)"
    if -margin < ci[0] and ci[1] < margin:
        return f"no difference beyond ±{100 * margin:.2f} points (interval inside, unadjusted)"
    unadjusted = f"p < {alpha} before Holm only; " if t["p_value"] < alpha else ""
    return f"{unadjusted}too few seeds to tell (interval reaches ±{100 * margin:.2f} points)"


def seed_level_tests(rows: list[dict], task: str, a: str, b: str, confidence: float, mde: dict) -> dict:
    """glue_score paired by seed: the mean difference with its t-interval, scipy.stats.ttest_rel and wilcoxon when
    both methods have >= 2 shared seeds, and the power at those seeds (`mde`: alpha, power, margin). p_adjusted and
    the reading come later, from the family (finish_seed_level)."""
    runs = {m: [r for r in rows if r["task"] == task and r["method_name"] == m] for m in (a, b)}
    pairs = paired_values(runs, [a, b], "glue_score")
    seeds = list(pairs)
    x, y = [p[0] for p in pairs.values()], [p[1] for p in pairs.values()]
    diff = np.subtract(x, y)
    iv = mean_interval(diff, confidence)
    entry = {"task": task, "method_a": a, "method_b": b, "metric": "glue_score", "seeds": seeds, "n": len(seeds),
             "mean_difference": iv["estimate"], "ci": iv["ci"], "confidence": confidence, "ci_reason": iv["reason"],
             "mde": minimum_detectable_effect(diff, **mde)}
    if len(seeds) < 2:
        entry["tests"] = [{"test": "paired t-test / Wilcoxon", "statistic": None, "p_value": None, "n": len(seeds),
                           "reason": "needs >= 2 seeds run by both methods"}]
    else:
        equal = "the differences are all equal: t is undefined or infinite" if np.ptp(diff) == 0 else None
        entry["tests"] = [scipy_paired_test("paired t-test (scipy.stats.ttest_rel)", stats.ttest_rel, x, y, equal),
                          wilcoxon_test(x, y)]
    return entry


def finish_seed_level(entries: list[dict], family: str, margin: float, alpha: float) -> None:
    """Holm over one family of seed-level comparisons, t-tests and Wilcoxon tests apart (two tests of the same
    hypotheses, not more hypotheses), then each entry's reading."""
    for k, kind in enumerate(("paired t-test", "Wilcoxon")):
        holm([e["tests"][k] for e in entries if len(e["tests"]) > k], f"{family}: {kind}")
    for e in entries:
        e["reading"] = reading(e, margin, alpha)


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


def paired_bootstrap(ca: np.ndarray, cb: np.ndarray, confidence: float = 0.95) -> dict:
    """`confidence` CI of accuracy(a) - accuracy(b), resampling examples (paired). Percentile interval: BCa's jackknife
    costs O(n^2) on MNLI/QQP-sized dev sets; batches bound the memory."""
    out = {"test": "paired bootstrap, percentile (scipy.stats.bootstrap)",
           "difference": float(_mean_difference(ca, cb)),
           "ci_low": None, "ci_high": None, "confidence_level": confidence, "n_resamples": N_RESAMPLES, "seed": BOOT_SEED,
           "n": len(ca), "reason": None}
    try:
        res = stats.bootstrap((ca.astype(float), cb.astype(float)), _mean_difference, paired=True, vectorized=True,
                              n_resamples=N_RESAMPLES, confidence_level=confidence, method="percentile",
                              batch=max(1, 2_000_000 // len(ca)), rng=np.random.default_rng(BOOT_SEED))
        out.update(ci_low=float(res.confidence_interval.low), ci_high=float(res.confidence_interval.high))
    except ValueError as e:  # e.g. a single example
        out["reason"] = str(e)
    return out


def example_level_tests(records: list[RunRecord], task: str, a: str, b: str, confidence: float = 0.95) -> list[dict]:
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
                                     "bootstrap": paired_bootstrap(*pair, confidence)})
    return out


def example_summary(entries: list[dict], alpha: float) -> dict:
    """The per-seed example-level tests of one pair in a few numbers: how many McNemar p < alpha, raw and after Holm
    over the pair's seeds and splits; the lowest and highest per-seed bootstrap CI bound (a span of intervals, not an
    interval of anything) and of the differences."""
    tested = [e for e in entries if "mcnemar" in e]
    cis = [e["bootstrap"] for e in tested if e["bootstrap"]["ci_low"] is not None]
    p = [e["mcnemar"]["p_value"] for e in tested]
    return {"n_tests": len(tested), "alpha": alpha, "n_mcnemar_significant": sum(v < alpha for v in p),
            "n_mcnemar_significant_adjusted": sum(e["mcnemar"]["p_adjusted"] < alpha for e in tested),
            "mcnemar_p_min": min(p, default=None), "mcnemar_p_max": max(p, default=None),
            "difference_min": min((e["bootstrap"]["difference"] for e in tested), default=None),
            "difference_max": max((e["bootstrap"]["difference"] for e in tested), default=None),
            "per_seed_ci_lowest_end": min((c["ci_low"] for c in cis), default=None),
            "per_seed_ci_highest_end": max((c["ci_high"] for c in cis), default=None),
            "paired_by": sorted({e["paired_by"] for e in tested}),
            "reason": None if tested else next((e.get("reason") for e in entries if e.get("reason")), "no test")}


def pooled_tests(rows: list[dict], derived: dict, confidence: float, n_resamples: int, seed: int) -> list[dict]:
    """The headline pairs (by role) pooled over the tasks that have both: the per-seed GLUE-average difference with
    its interval (seeds run on every one of those tasks), and the sign-flip test over task x seed; Holm over the
    pairs (HEADLINE_ROLE_PAIRS, those held). Only with >= 2 such tasks."""
    entries = []
    for role_a, role_b in HEADLINE_ROLE_PAIRS:
        names = {t: (d["roles"][role_a], d["roles"][role_b]) for t, d in derived.items()
                 if d["roles"].get(role_a) and d["roles"].get(role_b)}
        if len(names) < 2:
            continue
        pairs = {t: paired_values({n: [r for r in rows if r["task"] == t and r["method_name"] == n] for n in ab},
                                  list(ab), "glue_score") for t, ab in names.items()}
        diffs = {t: [a - b for a, b in p.values()] for t, p in pairs.items()}
        seeds = [s for s in next(iter(pairs.values())) if all(s in p for p in pairs.values())]
        per_seed = [float(np.mean([pairs[t][s][0] - pairs[t][s][1] for t in pairs])) for s in seeds]
        iv = mean_interval(per_seed, confidence)
        entries.append({"method_a": ROLE_LABELS[role_a], "method_b": ROLE_LABELS[role_b], "roles": [role_a, role_b],
                        "tasks": list(names), "groups": names, "metric": "glue_score",
                        "per_seed": {"seeds": seeds, "values": per_seed, "mean_difference": iv["estimate"],
                                     "ci": iv["ci"], "confidence": confidence, "n": iv["n"], "reason": iv["reason"]},
                        "test": sign_flip_test(diffs, n_resamples, seed)})
    holm([e["test"] for e in entries], "pooled headline pairs (GLUE average): sign-flip test")
    return entries


# ---------------------------------------------------------------------------------------------------------------
# Ablation and controls: every other group against LoRA and against GLoRA (a tuned group: its untuned self and the
# other tuned methods), with what it spent.

def group_budget(by_method: dict, name: str, derived: dict) -> dict:
    """What a group spent (means over seeds) and its ratios to LoRA on the same task."""
    g, rel = by_method[name], (derived.get("methods") or {}).get(name, {})
    return {"budget_unit": g["budget_unit"], "rank_budget_total": _mean(g, "rank_budget_total"),
            "adapter_params": _mean(g, "adapter_params_reported"), "adapter_params_source": g["adapter_params_source"],
            "trainable_params": _mean(g, "trainable_params"),
            **{k: (1.0 if name == derived.get("baseline") else rel.get(k)) for k in
               ("rank_budget_total_ratio", "adapter_params_ratio", "trainable_params_ratio")}}


def comparison_targets(by_method: dict, name: str, roles: dict) -> list[tuple[str, str | None]]:
    """(role, group) pairs one ablation group is tested against. A variant or control: LoRA and GLoRA (None when
    absent), then its own method's main config when that is neither (an AdaLoRA variant against AdaLoRA). A `tuned`
    group beside the main configs: its own method untuned, then the other tuned groups holding LoRA's and GLoRA's
    roles, when evaluated (a tuned group against an untuned baseline is not a fair contrast, so it has none)."""
    group = by_method[name]
    own = main_config_of(by_method, group.get("method"))
    if group.get("variant") == "tuned" and name not in roles.values():
        peers = tuned_roles(by_method)
        if name == peers["baseline"]:  # tuned GLoRA - tuned LoRA is GLoRA's row (the newer method first)
            return [("untuned", own)]
        return [("untuned", own), ("tuned_baseline", peers["baseline"])] + (
            [("tuned_reference", peers["reference"])] if name != peers["reference"] else [])
    targets = [("baseline", roles["baseline"]), ("reference", roles["reference"])]
    return targets + ([("method", own)] if own not in (None, name, roles["baseline"], roles["reference"]) else [])


def missing_target(by_method: dict, name: str, role: str) -> str:
    """Why a group has no partner for one of its comparisons."""
    if role in ROLE_LABELS:
        return f"no {ROLE_LABELS[role]} run (main config) on this task"
    if role == "untuned":
        return f"no untuned {METHOD_NAMES.get(by_method[name].get('method'), 'main config')} run on this task"
    base = role.removeprefix("tuned_")
    label, method = ROLE_LABELS[base], METHOD_OF_ROLE[base]
    several = sum(g.get("method") == method and g.get("variant") == "tuned" for g in by_method.values()) > 1
    return f"several tuned {label} groups: none chosen" if several else f"no tuned {label} group on this task"


def ablation(groups: dict, derived: dict, pair_tests, alpha: float) -> list[dict]:
    """Per task, every group other than the baseline and the reference, against its comparison_targets (seed-level tests
    with their MDE, per-seed example-level tests and their summary). `pair_tests(task, a, b)` -> (seed, example)."""
    entries = []
    for task, by_method in groups.items():
        roles = derived[task]["roles"]
        for name in (m for m in by_method if m not in (roles["baseline"], roles["reference"])):
            comparisons = []
            for role, other in comparison_targets(by_method, name, roles):
                if other is None:
                    comparisons.append({"role": role, "against": None, "reason": missing_target(by_method, name,
                                                                                                  role)})
                    continue
                seed_level, example_level = pair_tests(task, name, other)
                comparisons.append({"role": role, "against": other, "seed_level": seed_level,
                                    "example_level": example_level,
                                    "example_summary": example_summary(example_level, alpha)})
            entries.append({"task": task, "method_name": name, "method": by_method[name]["method"],
                            "variant": by_method[name]["variant"],
                            "budget": group_budget(by_method, name, derived[task]), "comparisons": comparisons})
    return entries


def ablation_families(entries: list[dict], headline: list[dict], margin: float, alpha: float) -> None:
    """Holm over each task's ablation table (family "ablation, {task}"). A comparison that is a headline pair (AdaLoRA
    against LoRA or GLoRA) keeps the headline family's adjustment: one hypothesis, one family."""
    done = {(e["task"], frozenset((e["method_a"], e["method_b"]))): e for e in headline}
    for task in dict.fromkeys(e["task"] for e in entries):
        family = []
        for c in (c for e in entries if e["task"] == task for c in e["comparisons"] if c["against"] is not None):
            twin = done.get((task, frozenset((c["seed_level"]["method_a"], c["seed_level"]["method_b"]))))
            if twin is None:
                family.append(c["seed_level"])
            elif twin is not c["seed_level"]:  # the same pair the other way round: the same two-sided p-values
                for mine, theirs in zip(c["seed_level"]["tests"], twin["tests"]):
                    mine.update({k: theirs.get(k) for k in ("p_adjusted", "family", "family_size", "adjustment")})
                c["seed_level"]["reading"] = reading(c["seed_level"], margin, alpha)
        finish_seed_level(list({id(e): e for e in family}.values()), f"ablation, {TASKS.get(task, task)}", margin,
                          alpha)


# ---------------------------------------------------------------------------------------------------------------
# Sequential design: seeds added until the primary verdicts are decided (bench/study.py --until-decided). Pure
# functions of the look, the planned maximum and alpha: neither scipy nor statsmodels has an alpha-spending function.

SPENDING_NAMES = {"obrien-fleming": "Lan–DeMets O'Brien–Fleming-type, α(t) = 2 − 2Φ(z_{1−α/2} / √t)",
                  "pocock": "Lan–DeMets Pocock-type, α(t) = α·ln(1 + (e − 1)·t)"}
SEQUENTIAL_KEYS = ("look_n", "first_look", "max_seeds")  # statistics.sequential: these, and optionally `spending`
SEQUENTIAL_RULE = (
    "Sequential design (bench/study.py --until-decided): seeds are added one at a time from the first look (n₀ "
    "seeds) up to a maximum N fixed in advance, and the verdicts are read after each (looks n = n₀, …, N; information "
    "fraction t = n / N). α is spent over the looks by a spending function (Lan & DeMets 1983, Biometrika 70:659–663; "
    "Jennison & Turnbull 2000, *Group Sequential Methods with Applications to Clinical Trials*, ch. 7): "
    "O'Brien–Fleming-type α(t) = 2 − 2Φ(z_{1−α/2} / √t) (little early, most late; the default) or Pocock-type "
    "α(t) = α·ln(1 + (e − 1)·t). Look k's intervals are read at 1 − (α(t_k) − α(t_{k−1})), the increment (per task "
    "divided by its tasks, as above): the increments add up to α, so by a union bound over the looks the chance that "
    "any look gives a wrong verdict is at most α (α/2 at each end), whatever stops the study and at any number of "
    "seeds (exact for t-intervals, no normal approximation); so a primary verdict decided at one look is kept "
    "(each look recomputes the earlier ones from its runs; a later look's own reading is shown beside it) and the "
    "looks stop once every primary verdict has been decided. It is conservative: exact group-sequential boundaries "
    "use the correlation between looks and would be narrower, but they assume normal statistics and a study that "
    "stops on that one statistic, while this one stops when every primary verdict is decided.")


def alpha_spent(t, alpha: float, spending: str = "obrien-fleming"):
    """The error a Lan-DeMets spending function allows by information fraction t (Lan & DeMets 1983, Biometrika).

    Args:
        t (`float` or `np.ndarray`): seeds so far over the planned maximum, n / N, in [0, 1].
        alpha (`float`): the error spent by t = 1 (statistics.alpha).
        spending (`str`): `"obrien-fleming"`: α(t) = 2 − 2Φ(z_{1−α/2} / √t); `"pocock"`: α(t) = α·ln(1 + (e − 1)·t).

    Returns α(t), a float for a float t: 0 at t = 0, α at t = 1, non-decreasing in t.
    """
    t = np.clip(np.asarray(t, dtype=float), 0.0, 1.0)
    if spending == "obrien-fleming":
        with np.errstate(divide="ignore"):  # t = 0: z / 0 = inf, whose normal tail is 0
            spent = 2 * stats.norm.sf(stats.norm.isf(alpha / 2) / np.sqrt(t))
    elif spending == "pocock":
        spent = alpha * np.log1p((math.e - 1) * t)
    else:
        raise ValueError(f"spending={spending!r} must be one of {list(SPENDING_NAMES)}")
    return float(spent) if np.ndim(spent) == 0 else spent


def look_alphas(first_look: int, max_seeds: int, alpha: float, spending: str = "obrien-fleming") -> dict[int, dict]:
    """n -> {alpha_spent: α(n / N), alpha_this_look: its increment over the look before} for the looks n = first_look,
    ..., max_seeds (the first look spends α(first_look / N) from 0), so the increments add up to alpha."""
    looks = np.arange(first_look, max_seeds + 1)
    spent = alpha_spent(looks / max_seeds, alpha, spending)
    return {int(n): {"alpha_spent": float(s), "alpha_this_look": float(a)}
            for n, s, a in zip(looks, spent, np.diff(spent, prepend=0.0))}


def check_sequential(seq) -> None:
    """statistics.sequential is null (the fixed design) or {look_n, first_look, max_seeds[, spending]}: integers with
    2 <= first_look <= look_n <= max_seeds, spending one of SPENDING_NAMES."""
    if seq is None:
        return
    keys = set(seq) if isinstance(seq, dict) else set()
    if not keys or keys - {*SEQUENTIAL_KEYS, "spending"} or set(SEQUENTIAL_KEYS) - keys:
        raise EvaluationError(f"statistics.sequential={seq!r} must be null or {{look_n: N, first_look: N, "
                              f"max_seeds: N[, spending: {'|'.join(SPENDING_NAMES)}]}}")
    n, first, most = (seq[k] for k in SEQUENTIAL_KEYS)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, first, most)) or not 2 <= first <= n <= most:
        raise EvaluationError(f"statistics.sequential needs integers 2 <= first_look <= look_n <= max_seeds; got "
                              f"first_look={first!r}, look_n={n!r}, max_seeds={most!r}")
    if seq.get("spending", "obrien-fleming") not in SPENDING_NAMES:
        raise EvaluationError(f"statistics.sequential.spending={seq['spending']!r} must be one of "
                              f"{list(SPENDING_NAMES)}")


def sequential_look(statistics: dict) -> dict | None:
    """The `sequential` record of every verdict at this look (its level: alpha_this_look), or None: the fixed design."""
    seq = statistics.get("sequential")
    if not seq:
        return None
    spending = seq.get("spending", "obrien-fleming")
    n, first, most = (seq[k] for k in SEQUENTIAL_KEYS)
    return {"look": n - first + 1, "looks_planned": most - first + 1, "n": n, "first_look": first, "max_seeds": most,
            "information_fraction": n / most, "alpha": statistics["alpha"],
            **look_alphas(first, most, statistics["alpha"], spending)[n], "spending": spending,
            "rule": f"{SPENDING_NAMES[spending]}, t = n / max_seeds; intervals at 1 − alpha_this_look (per task "
                    f"÷ its tasks): a union bound over the looks"}


def sequential_lines(agg: dict) -> list[str]:
    """The report's statement of the look, after the families (nothing for the fixed design)."""
    look = next((e["sequential"] for e in agg["hypotheses"] if e.get("sequential")), None)
    if not look:
        return []
    return [f"Sequential design, look {look['look']} of at most {look['looks_planned']}: n = {look['n']} seeds "
            f"(first look at {look['first_look']}, at most {look['max_seeds']}; t = {look['information_fraction']:.2f})"
            f"; {SPENDING_NAMES[look['spending']]}: α spent by this look {look['alpha_spent']:.4g} of "
            f"{look['alpha']:g}, so this look's intervals are at {100 * (1 - look['alpha_this_look']):.4g}% (per task "
            f"÷ its tasks) and a one-sided p reads against {look['alpha_this_look'] / 2:.4g} (per task ÷ its tasks too: "
            f"each verdict's rule_p_max), not α/2.", "",
            SEQUENTIAL_RULE, ""]


# ---------------------------------------------------------------------------------------------------------------
# Hypotheses: a verdict per claim, per task and on the GLUE average (hypotheses.yaml holds the claims and margins).

VERDICT_RULE = (
    "Each verdict reads a two-sided interval against the claim's margin; each end of a (1 - α) interval is a one-sided "
    "test at α/2. A claim of at least a margin (H1: GLoRA − LoRA ≥ margin; H2: share ≥ margin) is *supported* when "
    "the interval's lower end is at or above the margin (the data exclude every smaller effect), *contradicted* when "
    "its upper end is below the margin (they exclude the claimed one), *undecided* otherwise. A claim of "
    "equivalence (H3a: GLoRA / LoRA step time within 1 ± margin; H4: adapter parameters) is supported when the "
    "interval lies inside the bounds (this is TOST), contradicted when it lies wholly outside, undecided "
    "otherwise. H3b (GLoRA faster than AdaLoRA) is supported when the ratio's upper end is below 1, contradicted when "
    "its lower end is at or above 1. *Not testable* says why (too few seeds, no spread, runs missing, a non-finite "
    "score, its run and seed named (dropping the seed would flatter its method), times not comparable, budgets "
    "differing (H4), AdaLoRA's gain shown at or below 0: the upper end of its interval at or below 0, so there is "
    "no gain to share). Intervals: H1 a paired t-interval over seeds; H2 Fieller's interval "
    "of the ratio of mean gains, bounded only when AdaLoRA's gain is shown above 0 at that level; when the gain "
    "cannot be told from 0 (whatever the sign of its mean) Fieller's set is unbounded and holds shares on both sides "
    "of the margin: *undecided*, with that reason; H3 a "
    "t-interval of the per-seed log ratio of the runs' median step times (comparable runs only), exponentiated, or, "
    "where a timing record timed the task's groups (bench/overhead.py --record, in {results_dir}/timing/), of the "
    "per-pair log ratio of its interleaved blocks, a method's time per step in a pair being its phases' block mean "
    "times per step weighted by each phase's share of the run's steps (pairs are the units; the GLUE average "
    "averages pair i over the tasks, and uses the study runs unless every task has a record); H4 a t-interval of the per-seed log parameter ratio, exponentiated (when "
    "every seed gives the same ratio, that exact ratio is judged directly), AdaLoRA counted at its final ranks, the "
    "ratio to the parameters it trains (init_r) beside it. The GLUE average (the mean over the tasks that have the groups, per seed: seeds "
    "are the units) is the primary verdict, at 1 − α; per-task verdicts form one family per hypothesis and use "
    "Bonferroni intervals at 1 − α/k over its k tasks, so a task's verdict holds at α for the family. Each p is "
    "shown with the bound the rule puts on it: supported when p ≤ (1 − level)/2, α/(2k) per task (TOST's p is the "
    "larger of its two one-sided p's), so p and status agree (but for a sequential study's verdict kept from an "
    "earlier look: its line names that look). Each entry names the seeds it leaves out (`excluded`: "
    "no partner run, a run skip_bad skipped, a missing or non-finite value) and gives `seeds_needed`, prospective: "
    "the fewest seeds at which its own interval would exclude the margin with the configured power (jointly over "
    "the conditions its status needs: H2's two) if the true value and sd were the current estimates (not decidable "
    "on the margin, or beyond 10,000; in a sequential design, the first look whose own level would decide). H1–H4 are separate claims that must all hold for the "
    "question's claim (an intersection-union test): no adjustment across them.")
HYPOTHESIS_ROLES = {"H1": ("reference", "baseline"), "H2": ("reference", "adalora", "baseline"),
                    "H3a": ("reference", "baseline"), "H3b": ("reference", "adalora"), "H4": ("reference", "adalora")}
HYPOTHESIS_KEY = {"H1": "glue_score", "H2": "glue_score", "H3a": "step_time_median_s", "H3b": "step_time_median_s",
                  "H4": "adapter_params_reported"}
CLAIMS = {"H1": "GLoRA − LoRA ≥ margin (glue_score)", "H2": "(GLoRA − LoRA) / (AdaLoRA − LoRA) ≥ margin",
          "H3a": "GLoRA / LoRA step time within 1 ± margin", "H3b": "GLoRA / AdaLoRA step time < 1",
          "H4": "GLoRA / AdaLoRA adapter parameters within 1 ± margin, same rank budget"}


def status_at_least(ci: list, margin: float) -> str:
    return "supported" if ci[0] >= margin else "contradicted" if ci[1] < margin else "undecided"


def status_within(ci: list, low: float, high: float) -> str:
    return "supported" if low <= ci[0] and ci[1] <= high else \
        "contradicted" if ci[1] < low or ci[0] > high else "undecided"


def one_sided(res, name: str, alternative: str) -> dict:
    """A scipy/statsmodels one-sided result as a test entry (p_adjusted and family are set by the family)."""
    return {"test": name, "alternative": alternative, "statistic": float(res.statistic), "p_value": float(res.pvalue)}


def judge_h1(values: dict, margin: float, confidence: float) -> dict:
    """GLoRA - LoRA (glue_score, paired by seed): its t-interval against the margin; one-sided t-test of
    H0: difference <= margin."""
    diff = np.array([g - lo for g, lo in values.values()])
    iv = mean_interval(diff, confidence)
    out = {"estimate": iv["estimate"], "ci": iv["ci"], "n": iv["n"], "reason": iv["reason"],
           "interval": "paired t-interval over seeds", "bounds": [margin, None],
           "scales": [{"estimate": iv["estimate"], "sd": iv["sd"], "bounds": [margin]}]}
    if iv["ci"] is None:
        return out
    shown = "GLoRA above LoRA shown" if iv["ci"][0] > 0 else "GLoRA below LoRA shown" if iv["ci"][1] < 0 else None
    return {**out, "status": status_at_least(iv["ci"], margin), "detail": shown,
            "test": one_sided(stats.ttest_1samp(diff, margin, alternative="greater"),
                              "one-sided paired t-test, H0: GLoRA − LoRA ≤ margin", "greater")}


def judge_h2(values: dict, margin: float, confidence: float) -> dict:
    """(GLoRA - LoRA) / (AdaLoRA - LoRA) by Fieller; one-sided t-test of H0: (GLoRA - LoRA) - margin·(AdaLoRA - LoRA)
    <= 0 (the test Fieller inverts). AdaLoRA's gain (its `confidence` t-interval) decides what can be said: shown
    above 0, the share's interval is bounded and read against the margin; its upper end at or below 0 (every seed's
    gain <= 0 when the gains have no spread), a share of no gain is undefined: not testable; neither, Fieller's set
    is unbounded and holds shares on both sides of the margin: undecided."""
    num = np.array([g - lo for g, _, lo in values.values()])
    den = np.array([a - lo for _, a, lo in values.values()])
    f = fieller_interval(num, den, confidence)
    gain = mean_interval(den, confidence)
    tested = mean_interval(num - margin * den, confidence)  # the test Fieller inverts at r = margin
    out = {"estimate": f["estimate"], "ci": f["ci"], "n": f["n"], "reason": f["reason"],
           "interval": "Fieller interval of the ratio of mean gains, paired by seed", "bounds": [margin, None],
           "adalora_gain": gain["estimate"], "adalora_gain_ci": gain["ci"],
           # decided once the test Fieller inverts rejects at the margin and AdaLoRA's gain is shown above 0
           "scales": [{"estimate": tested["estimate"], "sd": tested["sd"], "bounds": [0.0]},
                      {"estimate": gain["estimate"], "sd": gain["sd"], "bounds": [0.0]}]}
    if f["n"] < 2:
        return out
    upper = gain["ci"][1] if gain["ci"] else gain["estimate"]
    if upper <= 0:
        where = f"{100 * confidence:.4g}% CI upper end {100 * upper:+.2f} points" if gain["ci"] else \
            "on every seed"
        return {**out, "estimate": None, "ci": None, "scales": [],
                "reason": f"AdaLoRA's gain over LoRA is {100 * gain['estimate']:+.2f} points ({where}), shown <= 0: "
                          f"no gain to share"}
    if f["ci"] is None:
        more = "not decidable: AdaLoRA's mean gain is <= 0, so more seeds would show no gain to share, not a share" \
            if gain["estimate"] <= 0 else None
        return {**out, "status": "undecided", "estimate": None if more else f["estimate"], "scales_reason": more,
                "reason": f"AdaLoRA's gain over LoRA ({100 * gain['estimate']:+.2f} points, {100 * confidence:.4g}% "
                          f"CI {fmt_ci(gain['ci'])}) cannot be told from 0: Fieller's set is unbounded and holds "
                          f"shares on both sides of the margin"}
    return {**out, "status": status_at_least(f["ci"], margin),
            "test": one_sided(stats.ttest_1samp(num - margin * den, 0.0, alternative="greater"),
                              "one-sided t-test of (GLoRA − LoRA) − margin·(AdaLoRA − LoRA) ≤ 0", "greater")}


def judge_h3(values: dict, margin: float | None, confidence: float) -> dict:
    """Step-time ratio a / b by seed (values: log step times): the geometric mean and its t-interval. With a margin
    (H3a): equivalence within 1 ± margin, TOST (statsmodels ttost_paired); without (H3b): a < b, one-sided t-test."""
    log_a, log_b = np.array([v[0] for v in values.values()]), np.array([v[1] for v in values.values()])
    iv = log_ratio_interval(np.exp(log_a), np.exp(log_b), confidence)
    bounds = [1 - margin, 1 + margin] if margin is not None else [None, 1.0]
    out = {"estimate": iv["estimate"], "ci": iv["ci"], "n": iv["n"], "reason": iv["reason"], "bounds": bounds,
           "interval": "t-interval of the per-seed log step-time ratio, exponentiated (geometric mean ratio)",
           "scales": [{"estimate": None if iv["estimate"] is None else math.log(iv["estimate"]), "sd": iv["sd"],
                       "bounds": [math.log(b) for b in bounds if b is not None]}]}
    if iv["ci"] is None:
        return out
    if margin is None:
        status = "supported" if iv["ci"][1] < 1 else "contradicted" if iv["ci"][0] >= 1 else "undecided"
        return {**out, "status": status, "test": one_sided(stats.ttest_1samp(log_a - log_b, 0.0, alternative="less"),
                                                           "one-sided paired t-test on log step time, H0: "
                                                           "GLoRA ≥ AdaLoRA", "less")}
    p, _, _ = ttost_paired(log_a, log_b, math.log(bounds[0]), math.log(bounds[1]))
    return {**out, "status": status_within(iv["ci"], *bounds),
            "test": {"test": "TOST on the paired log step-time ratio (statsmodels ttost_paired)",
                     "alternative": "equivalence", "statistic": None, "p_value": float(p)}}


H4_BASIS = ("H4 counts AdaLoRA at its final ranks (adapter_params_effective), the size the AdaLoRA paper reports for "
            "a budget (its 1.27M against LoRA's 1.33M); the init_r triplets it trains and masks down to them are the "
            "other count, given beside it.")


def judge_h4(values: dict, margin: float, confidence: float) -> dict:
    """Adapter parameters GLoRA / AdaLoRA, values seed -> (GLoRA, AdaLoRA at its final ranks, AdaLoRA trained): the
    t-interval of the per-seed log ratio, exponentiated, against 1 ± margin (TOST beside it, as for H3a); when every
    seed gives the same ratio (sd 0) that exact ratio is judged directly. The ratio to the parameters AdaLoRA trains
    (its init_r budget) is reported beside the one H4 uses (H4_BASIS)."""
    glora, final, trained = (np.array([v[min(k, len(v) - 1)] for v in values.values()], dtype=float)
                             for k in range(3))  # no third count: the one H4 uses
    bounds = [1 - margin, 1 + margin]
    if not values or not (glora > 0).all() or not (final > 0).all():
        return {"estimate": None, "ci": None, "n": len(values), "bounds": bounds,
                "reason": "a parameter count of 0: no ratio" if values else "no seed run by both"}
    iv = log_ratio_interval(glora, final, confidence)
    other = float(np.exp(np.mean(np.log(glora) - np.log(trained)))) if (trained > 0).all() else None
    counts = {"used": "adapter_params_effective (AdaLoRA at its final ranks)", "why": H4_BASIS,
              "adalora_final_ranks": float(final.mean()) if len(values) else None,
              "adalora_trained": float(trained.mean()) if len(values) else None, "ratio_to_trained": other}
    out = {"estimate": iv["estimate"], "ci": iv["ci"], "n": iv["n"], "reason": iv["reason"], "bounds": bounds,
           "interval": "t-interval of the per-seed log parameter ratio, exponentiated (geometric mean ratio)",
           "adalora_params": counts, "detail": (
               "AdaLoRA at its final ranks; its trained count is 0 on some seed: no ratio to it" if other is None else
               "AdaLoRA at its final ranks; its trained count equals it here" if np.allclose(trained, final) else
               f"AdaLoRA at its final ranks ({counts['adalora_final_ranks']:,.0f}); to the parameters it trains "
               f"({counts['adalora_trained']:,.0f}, init_r triplets): ×{other:.3f}"),
           "scales": [{"estimate": None if iv["estimate"] is None else math.log(iv["estimate"]), "sd": iv["sd"],
                       "bounds": [math.log(b) for b in bounds]}]}
    if iv["sd"] is not None and iv["ci"] is None:  # every seed the same ratio: nothing to estimate, judged exactly
        exact = iv["estimate"]
        return {**out, "reason": None, "exact": True, "scales": [], "status": status_within([exact, exact], *bounds),
                "scales_reason": "exact counts, the same on every seed: more seeds change nothing",
                "interval": "exact: every seed gives the same ratio (sd 0), judged directly against the bounds"}
    if iv["ci"] is None:
        return out
    p, _, _ = ttost_paired(np.log(glora), np.log(final), math.log(bounds[0]), math.log(bounds[1]))
    return {**out, "status": status_within(iv["ci"], *bounds),
            "test": {"test": "TOST on the paired log parameter ratio (statsmodels ttost_paired)",
                     "alternative": "equivalence", "statistic": None, "p_value": float(p)}}


# H3 from the interleaved timer: bench/overhead.py --record times a (backbone, task)'s LoRA, AdaLoRA and GLoRA run
# configs in one process on the task's own batches, their steps interleaved in blocks; the pairs are the units.
TIMING_DIR = "timing"  # {results_dir}/timing/{backbone}--{task folder}.json, beside the runs
TIMING_FORMAT = "glora-interleaved-timing/1"
H3_PAIR_INTERVAL = ("t-interval of the per-pair log step-time ratio (interleaved timer: block pairs are the units), "
                    "exponentiated (geometric mean ratio)")


def timing_record_path(results_dir, backbone: str, task_folder: str) -> Path:
    """Where a (backbone, task)'s timing record lives: `{results_dir}/timing/{backbone}--{task folder}.json` (e.g.
    results/study/timing/MiniLM-L6-22M--SST-2.json), beside the study's runs, where this module reads it."""
    return Path(results_dir) / TIMING_DIR / f"{backbone}--{task_folder}.json"


def load_timing_records(results_dir: Path) -> list[dict]:
    """Every timing record in {results_dir}/timing/, each with its `path` relative to results_dir (`timing/...`: a
    report re-derives the same wherever the folder lies); a file there that is not one is an error (a record is
    written atomically, so a half-written file is never seen)."""
    folder = Path(results_dir) / TIMING_DIR
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise EvaluationError(f"{path}: unreadable timing record ({e}); delete it or re-run bench/overhead.py "
                                  f"--record") from None
        if not isinstance(record, dict) or record.get("format") != TIMING_FORMAT:
            raise EvaluationError(f"{path}: not a timing record of format {TIMING_FORMAT!r} (bench/overhead.py "
                                  f"--record writes them)")
        records.append({**record, "path": f"{TIMING_DIR}/{path.name}"})
    return records


def role_step_times(record: dict, role: str) -> list[float]:
    """A method's step time in each pair of a timing record (seconds).

    Args:
        record (`dict`): a timing record (bench/overhead.py --record).
        role (`str`): "baseline" (LoRA), "adalora" or "reference" (GLoRA).

    Per pair, sum over the method's timed phases p of share_p x (block time_p / block steps): each phase's block
    mean (so AdaLoRA's masking steps count) weighted by the phase's share of the run's optimizer steps (the shares of
    a method sum to 1).
    """
    arms = [a for a in record["arms"] if a["role"] == role]
    return [sum(a["share"] * float(np.mean(pair["step_s"][a["name"]])) for a in arms) for pair in record["pairs"]]


def timing_values(record: dict, roles: tuple[str, ...]) -> dict:
    """pair index -> (log step time of roles[0], of roles[1]): judge_h3's values with the pairs as the units."""
    a, b = (role_step_times(record, r) for r in roles)
    return {i: (math.log(x), math.log(y)) for i, (x, y) in enumerate(zip(a, b))}


def timing_record_for(hid: str, task: str, roles: dict, rows: list[dict],
                      timing: list[dict] | None) -> tuple[dict | None, str | None]:
    """The timing record that timed this task's groups for H3a/H3b (the same run config per role, the same
    backbone: the same last two path parts, so one package installed in two checkouts is one backbone), or None and,
    when the task has a record that does not fit, why it is not used."""
    if hid not in ("H3a", "H3b") or not timing or any(roles.get(r) is None for r in HYPOTHESIS_ROLES[hid]):
        return None, None
    runs = {r: [x for x in rows if x["task"] == task and x["method_name"] == roles[r]] for r in HYPOTHESIS_ROLES[hid]}
    why = None
    for record in (t for t in timing if t.get("task") == task):
        timed = record.get("run_ids") or {}
        other = next((r for r, xs in runs.items() if {x.get("run_id") for x in xs} != {timed.get(r)}), None)
        backbones = {x.get("backbone") for xs in runs.values() for x in xs if x.get("backbone") is not None
                     and Path(str(x["backbone"])).parts[-2:] != Path(str(record.get("backbone"))).parts[-2:]}
        if other is None and not backbones:
            return record, None
        why = (f"{record['path']} timed {timed.get(other)}, the {ROLE_LABELS[other]} runs are "
               f"{', '.join(sorted({str(x.get('run_id')) for x in runs[other]}))}" if other else
               f"{record['path']} timed backbone {record.get('backbone')}, the runs {', '.join(sorted(backbones))}")
    return None, why


def h3_source(hid: str, task: str, roles: dict, rows: list[dict], timing: list[dict] | None) -> dict:
    """An H3 entry's instrument: `interleaved` (the record's path and n pairs; the pairs replace the seeds) when a
    timing record timed the task's groups, else `study runs` (the runs' per-seed step times); {} for H1, H2, H4."""
    if hid not in ("H3a", "H3b"):
        return {}
    record, why = timing_record_for(hid, task, roles, rows, timing)
    if record is None:
        return {"instrument": "study runs", "timing_record": None, "n_pairs": None, "timing_note": why}
    use = record.get("cpu_utilisation")
    return {"instrument": "interleaved", "timing_record": record["path"], "n_pairs": len(record["pairs"]),
            "seeds": [], "interval": H3_PAIR_INTERVAL,
            # the arms share any load, so it widens the interval rather than biasing it; said, not hidden
            "timing_note": f"CPU use {use:.2f} < {CPU_UTIL_MIN} while timing: other processes shared the cores"
            if use is not None and use < CPU_UTIL_MIN else None}


def pooled_h3_evidence(hid: str, evidence: dict, sources: dict, groups: dict, derived: dict,
                       rows: list[dict]) -> tuple[dict, dict]:
    """The GLUE average's H3 evidence and instrument. Interleaved when every task has a timing record: pair i's log
    ratio averaged over the tasks (pooled_verdict's mean per unit; pair i of each task is one draw, so the
    averaged pairs are independent units); else every task's study runs, per seed (one instrument per average)."""
    if hid not in ("H3a", "H3b"):
        return evidence, {}
    if all(sources[t]["instrument"] == "interleaved" for t in evidence):
        return evidence, {"instrument": "interleaved", "timing_record": [sources[t]["timing_record"] for t in evidence],
                          "n_pairs": min(sources[t]["n_pairs"] for t in evidence), "seeds": [],
                          "timing_note": "; ".join(f"{TASKS.get(t, t)}: {sources[t]['timing_note']}" for t in evidence
                                                   if sources[t]["timing_note"]) or None,
                          "interval": H3_PAIR_INTERVAL}
    mixed = any(sources[t]["instrument"] == "interleaved" for t in evidence)
    runs = {t: hypothesis_evidence(hid, t, derived[t]["roles"], groups[t], rows) for t in evidence}
    return runs, {"instrument": "study runs", "timing_record": None, "n_pairs": None,
                  "timing_note": "not every task has a timing record, so the average uses every task's study runs"
                  if mixed else None}


def hypothesis_evidence(hid: str, task: str, roles: dict, by_method: dict,
                        rows: list[dict], timing: list[dict] | None = None) -> tuple[dict, str | None]:
    """seed -> the hypothesis' values on one task (log step times for H3), or why there are none; for H3 with a
    timing record that timed the task's groups (timing_record_for), pair index -> log step times instead."""
    names = [roles[r] for r in HYPOTHESIS_ROLES[hid]]
    missing = [ROLE_LABELS[r] for r, n in zip(HYPOTHESIS_ROLES[hid], names) if n is None]
    if missing:
        return {}, f"no {' or '.join(missing)} run on this task"
    runs = {n: [r for r in rows if r["task"] == task and r["method_name"] == n] for n in names}
    record, _ = timing_record_for(hid, task, roles, rows, timing)
    if record is not None:  # the interleaved timer: the runs' own step times are not used
        return timing_values(record, HYPOTHESIS_ROLES[hid]), None
    if hid in ("H3a", "H3b"):
        comparable, why, kept_a, kept_b, _ = timed_comparability(runs[names[1]], runs[names[0]])
        if not comparable:
            return {}, f"step times not comparable: {why}"
        runs = {names[1]: kept_a, names[0]: kept_b}
    if hid == "H4":
        budgets = [_mean(by_method[n], "rank_budget_total") for n in names]
        units = [by_method[n].get("budget_unit") for n in names]
        if None in budgets or abs(budgets[0] - budgets[1]) > 0.5 or "params" in units:
            return {}, f"not the same rank budget: {names[0]} {budgets[0]} ({units[0]}), {names[1]} {budgets[1]}"
    values = paired_values(runs, names, HYPOTHESIS_KEY[hid])
    broken = nonfinite_values(runs, names, HYPOTHESIS_KEY[hid], values)
    if broken:  # e.g. STS-B's Pearson of constant predictions: dropping the seed would flatter that method
        return {}, "non-finite " + "; ".join(broken)
    if hid == "H4":  # beside the count H4 uses: the parameters AdaLoRA trains (all init_r triplets, masked)
        trained = paired_values(runs, [names[1]], "adapter_params")
        values = {s: (*v, trained[s][0] if s in trained else v[1]) for s, v in values.items()}
    return ({s: tuple(np.log(v)) for s, v in values.items()} if hid in ("H3a", "H3b") else values), None


def nonfinite_values(runs: dict[str, list[dict]], names: list[str], key: str, values: dict) -> list[str]:
    """`key (value) in run name (seed s)` for every paired seed whose value is NaN or infinite."""
    by_seed = {n: {r["seed"]: r for r in runs.get(n, [])} for n in names}
    return [f"{key} ({v}) in {by_seed[n][s]['run_name']} (seed {s})"
            for s, vs in values.items() for n, v in zip(names, vs) if not math.isfinite(v)]


DECIDED = ("supported", "contradicted")


def keep_sequential_decisions(entries: list[dict], rows: list[dict], settings: dict, timing: list[dict] | None,
                              skipped: list[dict] | tuple) -> None:
    """The rule's keeping, in place: each primary verdict's status is the one of the first look that decided it.
    The earlier looks are recomputed from this look's runs: look m reads the m smallest seeds (bench/study.py adds
    seeds above the first look's), at look m's level. Each decided primary entry gets `sequential_decision` {status,
    look, n}; where this look reads otherwise, its own reading is `status_this_look`."""
    look = sequential_look(settings["statistics"])
    if not look:
        return
    seeds, kept = sorted({r["seed"] for r in rows if r["seed"] is not None}), {}
    if len(seeds) != look["n"]:  # e.g. skip_bad left a whole seed out: the earlier looks' seeds would shift
        raise EvaluationError(f"statistics.sequential.look_n={look['n']} but the runs have {len(seeds)} seeds "
                              f"({seeds}): a look needs every run of its seeds")
    confidence = 1 - settings["statistics"]["alpha"]
    for m in range(look["first_look"], min(look["n"], len(seeds) + 1)):  # the looks before this one
        part = [r for r in rows if r["seed"] in seeds[:m]]
        earlier = {**settings["statistics"], "sequential": {**settings["statistics"]["sequential"], "look_n": m}}
        groups = group_stats(part)
        for e in hypotheses(groups, derived_metrics(groups, part, confidence), part,
                            {**settings, "statistics": earlier}, timing, skipped):
            if e["primary"] and e["status"] in DECIDED:
                kept.setdefault(e["id"], {"status": e["status"], "look": m - look["first_look"] + 1, "n": m})
    for e in entries:
        if not e["primary"]:
            continue
        if e["id"] not in kept and e["status"] in DECIDED:
            kept[e["id"]] = {"status": e["status"], "look": look["look"], "n": look["n"]}
        if e["id"] in kept:
            e["sequential_decision"] = kept[e["id"]]
            if e["status"] != kept[e["id"]]["status"]:
                e["status_this_look"], e["status"] = e["status"], kept[e["id"]]["status"]


def judge(hid: str, values: dict, margin: float, confidence: float) -> dict:
    if hid == "H1":
        return judge_h1(values, margin, confidence)
    if hid == "H2":
        return judge_h2(values, margin, confidence)
    if hid in ("H3a", "H3b"):
        return judge_h3(values, margin if hid == "H3a" else None, confidence)
    return judge_h4(values, margin, confidence)


def hypotheses(groups: dict, derived: dict, rows: list[dict], settings: dict,
               timing: list[dict] | None = None, skipped: list[dict] | tuple = ()) -> list[dict]:
    """The `hypotheses` list: per hypothesis, one entry per task and, when >= 2 tasks have its groups, one on the GLUE
    average (the primary verdict; else the one task that has them is); see VERDICT_RULE. `timing`: the timing records
    (load_timing_records), which H3 reads where they timed a task's groups (h3_source). `skipped`: the runs
    skip_bad left out (skipped_run), named in the entries' `excluded`."""
    look = sequential_look(settings["statistics"])  # None: the fixed design, at alpha
    alpha, out = look["alpha_this_look"] if look else settings["statistics"]["alpha"], []
    for hid in HYPOTHESIS_ROLES:
        margin = 0.0 if hid == "H3b" else settings["hypotheses"][hid[:2]]["margin"]  # H3b: faster at all
        tasks = [t for t in groups if all(derived[t]["roles"][r] for r in HYPOTHESIS_ROLES[hid])]
        k = max(1, len(tasks))  # the family: the tasks that can be tested (the others say why not)
        family = f"{hid} per task ({k} task{'s' * (k > 1)})"
        evidence = {t: hypothesis_evidence(hid, t, derived[t]["roles"], groups[t], rows, timing) for t in groups}
        sources = {t: h3_source(hid, t, derived[t]["roles"], rows, timing) for t in groups}  # {} but for H3
        for task, (values, why) in evidence.items():
            out.append({**verdict_entry(hid, task, values, why, margin, 1 - alpha / k, family, derived[task]["roles"]),
                        **sources[task],
                        "primary": len(tasks) == 1 and task in tasks, "family_size": k,
                        "adjustment": f"Bonferroni over {k} tasks" if k > 1 else "none"})
        if len(tasks) >= 2:
            pooled, source = pooled_h3_evidence(hid, {t: evidence[t] for t in tasks}, sources, groups, derived, rows)
            out.append({**pooled_verdict(hid, pooled, margin, 1 - alpha), **source,
                        "primary": True, "family_size": 1, "adjustment": "none"})
    for e in out:
        e["sequential"] = look
        e["seeds_needed"] = verdict_seeds(e, settings["statistics"]["power"])
        if e["test"]:  # Bonferroni: the p-value that matches the interval the status is read from
            e["test"].update(p_adjusted=min(1.0, e["test"]["p_value"] * e["family_size"]), family=e["family"],
                             family_size=e["family_size"], adjustment="bonferroni" if e["family_size"] > 1 else "none",
                             # the rule on the raw p: each end of the entry's two-sided interval is one-sided at
                             # (1 - level)/2 (alpha/2/k per task; TOST's p is the larger of its two one-sided p's)
                             rule_p_max=(1 - e["confidence"]) / 2)
    attach_excluded(out, derived, rows, list(skipped))
    return out


def pooled_verdict(hid: str, evidence: dict, margin: float, confidence: float) -> dict:
    """The GLUE-average verdict: per seed run on every task, the hypothesis' values averaged over the tasks."""
    blocked = next(((t, why) for t, (_, why) in evidence.items() if why), None)
    per_task = [v for v, _ in evidence.values()]
    seeds = [s for s in per_task[0] if all(s in v for v in per_task)] if not blocked else []
    values = {s: tuple(float(x) for x in np.mean([v[s] for v in per_task], axis=0)) for s in seeds}
    why = f"{TASKS.get(blocked[0], blocked[0])}: {blocked[1]}" if blocked else None
    entry = verdict_entry(hid, "GLUE average", values, why, margin, confidence, f"{hid} on the GLUE average", {})
    return {**entry, "tasks": list(evidence), "n_tasks": len(evidence)}


def verdict_entry(hid: str, task: str, values: dict, why: str | None, margin: float, confidence: float, family: str,
                  roles: dict) -> dict:
    """One `hypotheses` entry: {id, task, claim, status, reason, estimate, ci, margin, bounds, n, ...}."""
    judged = judge(hid, values, margin, confidence) if why is None else {"reason": why}
    status = judged.get("status", "not testable")
    return {"id": hid, "task": task, "claim": CLAIMS[hid], "status": status,
            "reason": judged.get("reason") if status in ("not testable", "undecided") else None,
            "estimate": judged.get("estimate"), "ci": judged.get("ci"), "margin": margin,
            "bounds": judged.get("bounds"), "confidence": confidence, "exact": judged.get("exact", False),
            # what seeds_needed reads: per-seed mean and sd on the interval's scale, and the bounds it must exclude
            "scales": judged.get("scales", []), "scales_reason": judged.get("scales_reason"),
            "adalora_params": judged.get("adalora_params"),
            "n": judged.get("n", len(values)), "seeds": list(values), "interval": judged.get("interval"),
            "unit": {"H1": "glue_score difference (fraction; x100 = points)", "H2": "share of AdaLoRA's gain",
                     "H4": "ratio of adapter parameters"}.get(hid, "ratio of step times"),
            "family": family, "detail": judged.get("detail"),
            "groups": {ROLE_LABELS[r]: roles.get(r) for r in HYPOTHESIS_ROLES[hid]} if roles else {},
            "test": judged.get("test")}


def verdict_seeds(entry: dict, power: float) -> dict:
    """An entry's `seeds_needed` (prospective, at its own level): seeds_to_decide over every condition its status
    needs (`scales`; H2: the test Fieller inverts and AdaLoRA's gain above 0, jointly at `power`), or why not. In a
    sequential design the seeds are its looks, each at its own level (per task ÷ the family); the interleaved
    timer's pairs (H3) are no look: they are read at the entry's level."""
    pairs = entry.get("instrument") == "interleaved"
    look = entry.get("sequential")
    level = entry["confidence"]
    if look and not pairs:  # the looks still to come: this one has been read
        level = {n: 1 - a["alpha_this_look"] / entry["family_size"] for n, a in
                 look_alphas(look["first_look"], look["max_seeds"], look["alpha"], look["spending"]).items()
                 if n > look["n"]}
    why = entry["scales_reason"] or (None if entry["scales"] else f"not testable: {entry['reason']}")
    answer = seeds_to_decide(entry["scales"] if not why else [], level, power)
    return {**answer, "unit": "pairs" if pairs else "seeds", "conditions": len(entry["scales"]),
            "reason": why or answer["reason"]}


def skipped_run(folder: Path, why: str) -> dict:
    """A run that skip_bad=true left out, as far as its folder tells: {run, task, method, method_name, variant,
    seed, why} (None where its config.yaml / summary.json cannot say)."""
    parts = []
    for name in ("config.yaml", "summary.json"):
        try:
            parts.append(OmegaConf.to_container(OmegaConf.load(folder / name)) if name.endswith("yaml") else
                         json.loads((folder / name).read_text()))
        except Exception:  # a crashed run may have no (or half a) file
            parts.append({})
    rec = RunRecord(folder.name, *parts, [], None)
    return {"run": folder.name, "task": task_of(rec), "method": method_key_of(rec), "method_name": method_of(rec),
            "variant": variant_of(rec), "seed": rec.summary.get("seed", rec.config.get("seed")), "why": why}


def excluded_seeds(entry: dict, roles: dict, rows: list[dict], skipped: list[dict]) -> list[dict]:
    """[{seed, why}] for every seed a group of a per-task entry ran (or tried: `skipped`) that its verdict does not
    use: another group has no run with that seed, the run failed (skip_bad), the value is missing or not finite.
    A not-testable entry lists only such per-seed defects (its reason covers the rest)."""
    hid, task, used = entry["id"], entry["task"], set(entry["seeds"])
    key, labels = HYPOTHESIS_KEY[hid], [ROLE_LABELS[r] for r in HYPOTHESIS_ROLES[hid]]
    names = [roles.get(r) for r in HYPOTHESIS_ROLES[hid]]
    runs = [{r["seed"]: r for r in rows if r["task"] == task and r["method_name"] == n} if n else {} for n in names]
    failed = [{s["seed"]: s for s in skipped if s["task"] == task and (
        s["method_name"] == n if n else role_of(s["method"], s["variant"], s["method_name"]) == r)}
        for r, n in zip(HYPOTHESIS_ROLES[hid], names)]
    out = []
    for seed in sorted(set().union(*runs, *failed) - used, key=seed_key):
        whys = []
        for label, got, bad in zip(labels, runs, failed):
            value = got[seed].get(key) if seed in got else None
            if seed in bad:
                whys.append(f"{label} run {bad[seed]['run']} failed, skipped (skip_bad): {bad[seed]['why']}")
            elif seed not in got and got:
                whys.append(f"no {label} run")
            elif seed in got and value is None and any(r.get(key) is not None for r in got.values()):
                whys.append(f"{label} run {got[seed]['run_name']} has no {key}")  # (none has: the reason says so)
            elif value is not None and not math.isfinite(value):
                whys.append(f"non-finite {key} ({value}) in {label} run {got[seed]['run_name']}")
        if not whys and entry["status"] != "not testable":
            whys = ["dropped by the step-time checks (see Cost)" if hid in ("H3a", "H3b") else "not used"]
        out += [{"seed": seed, "why": "; ".join(whys)}] if whys else []
    return out


def pooled_excluded(entry: dict, per_task: list[dict]) -> list[dict]:
    """[{seed, why}] of a GLUE-average entry: each seed some task's comparison used or excluded that the average
    does not use (it needs the seed on every task), with the tasks' reasons."""
    used, out, testable = set(entry["seeds"]), [], entry["status"] != "not testable"
    seeds = set().union(*({x["seed"] for x in e["excluded"]} | set(e["seeds"]) for e in per_task))
    for seed in sorted(seeds - used, key=seed_key):
        whys = [f"{TASKS.get(e['task'], e['task'])}: {why}" for e in per_task if seed not in e["seeds"] for why in (
            [x["why"] for x in e["excluded"] if x["seed"] == seed] or (["no run with this seed"] if testable else []))]
        out += [{"seed": seed, "why": "; ".join(whys)}] if whys else []
    return out


def attach_excluded(entries: list[dict], derived: dict, rows: list[dict], skipped: list[dict]) -> None:
    """Each entry's `excluded`, in place: per task first, then each GLUE average from its tasks' entries. None for
    H3 from a timing record (its units are the record's pairs, not seeds)."""
    for e in entries:
        if e.get("instrument") == "interleaved":
            e["excluded"] = []
        elif e["task"] != "GLUE average":
            e["excluded"] = excluded_seeds(e, derived[e["task"]]["roles"], rows, skipped)
    for e in entries:
        if e["task"] == "GLUE average" and e.get("instrument") != "interleaved":
            e["excluded"] = pooled_excluded(e, [x for x in entries if x["id"] == e["id"] and x["task"] in e["tasks"]])


def aggregate(records: list[RunRecord], settings: dict | None = None, timing: list[dict] | None = None,
              skipped: list[dict] | tuple = ()) -> dict:
    """Everything in comparison/aggregated_metrics.json; `settings`: load_settings() (hypotheses.yaml) by default;
    `timing`: the results dir's timing records (load_timing_records), for H3; `skipped`: the runs skip_bad left out
    (load_runs), named in the verdicts' `excluded` and listed as `skipped_runs`."""
    settings = settings or load_settings()
    st, margin = settings["statistics"], settings["hypotheses"]["H1"]["margin"]
    alpha, confidence = st["alpha"], 1 - st["alpha"]
    mde = {"alpha": alpha, "power": st["power"], "margin": margin}
    rows = [run_row(r) for r in records]
    groups = group_stats(rows)
    derived = derived_metrics(groups, rows, confidence)
    cache = {}

    def pair_tests(task: str, a: str, b: str) -> tuple[dict, list[dict]]:  # each pair once (AdaLoRA is in both)
        if (task, a, b) not in cache:
            examples = example_level_tests(records, task, a, b, confidence)
            holm([e["mcnemar"] for e in examples if "mcnemar" in e],
                 f"McNemar per seed and split, {TASKS.get(task, task)}: {a} − {b}")
            cache[(task, a, b)] = seed_level_tests(rows, task, a, b, confidence, mde), examples
        return cache[(task, a, b)]

    seed_level, example_level = [], []
    for task in groups:
        pairs = [pair_tests(task, a, b) for a, b in headline_pairs(derived[task]["roles"])]
        finish_seed_level([seed for seed, _ in pairs], f"headline pairs, {TASKS.get(task, task)}", margin, alpha)
        seed_level += [seed for seed, _ in pairs]
        example_level += [e for _, examples in pairs for e in examples]
    ablated = ablation(groups, derived, pair_tests, alpha)
    ablation_families(ablated, seed_level, margin, alpha)
    pooled = pooled_tests(rows, derived, confidence, st["n_resamples"], st["permutation_seed"])
    verdicts = hypotheses(groups, derived, rows, settings, timing, skipped)
    keep_sequential_decisions(verdicts, rows, settings, timing, skipped)
    return {"settings": settings, "verdict_rule": VERDICT_RULE,
            "hypotheses": verdicts, "skipped_runs": list(skipped),
            "scope": scope_notes(rows, groups),
            "checkpoint_rule": CHECKPOINT_RULE, "runs": rows, "groups": groups, "derived": derived,
            "glue_average": glue_average(groups, rows, confidence), "rank_histograms": rank_histograms(records),
            "significance": {"seed_level": seed_level, "example_level": example_level, "pooled": pooled},
            "ablation": ablated,
            "thresholds": {"alpha": alpha, "mde_power": st["power"], "margin": margin,
                           "step_spread_max": STEP_SPREAD_MAX, "seed_spread_max": SEED_SPREAD_MAX,
                           "cpu_util_min": CPU_UTIL_MIN, "env_keys": ENV_KEYS}}


def scope_notes(rows: list[dict], groups: dict) -> list[str]:
    """What no verdict here can say, from the runs themselves: backbone, tasks, seeds, schedule, tuning."""
    notes = []
    backbones = sorted({str(r.get("backbone") or "?") for r in rows})
    if not any("deberta-v3-base" in b.lower() for b in backbones):
        # a local folder: its package/model, once (the same package installed in two checkouts is one backbone)
        names = ", ".join(sorted({"/".join(Path(b).parts[-2:]) for b in backbones}))
        notes.append(f"Demo scale, not DeBERTa-v3-base: backbone {names}. The verdicts describe this backbone, "
                     f"schedule and data, not the question's setting or the published numbers.")
    missing = [TASKS[t] for t in ADALORA_TASKS if t not in groups]
    if missing:
        notes.append(f"Tasks: {', '.join(TASKS.get(t, t) for t in groups)}; the AdaLoRA paper's GLUE average also has "
                     f"{', '.join(missing)}. A \"GLUE average\" here is the mean over the tasks evaluated.")
    steps = sorted({r["total_steps"] for r in rows if r.get("total_steps")})
    if steps:
        notes.append(f"Schedule: {', '.join(map(str, steps))} optimizer steps per run.")
    n = sorted({g["n"] for by_method in groups.values() for g in by_method.values()})
    notes.append(f"Seeds per group: {', '.join(map(str, n))}. Seeds are the units of every interval; the sd of "
                 f"few seeds is itself rough.")
    if any(r.get("variant") == "tuned" for r in rows):
        notes.append("Tuned groups are present: their roles and gains are among tuned groups only.")
    return notes


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
    loss_label = "loss (train: incl. orthogonal regulariser)" if method_key_of(rec) == "comparative-1" else "loss"
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
    table = rank_table(ranks_of(rec.summary))
    fig, ax = new_figure(figsize=(4.8, 1.2 + 0.32 * max(len(table), 2)))
    if table.empty:
        ax.text(0.5, 0.5, "no final_ranks with layer/matrix names", ha="center", va="center")
    else:
        fig.colorbar(draw_ranks(ax, table), ax=ax, label="final rank")
        ax.set(xlabel="adapted matrix")
    ax.set_title(f"{rec.name}\n{method_of(rec)} final ranks (budget {rec.summary.get('rank_budget_total')})")
    save_figure(fig, path)


def method_styles(methods) -> dict[str, dict]:
    """Colour and hatch per group: Okabe-Ito for LoRA/AdaLoRA/GLoRA, the others in display order from a fixed
    palette (deterministic for a given set of groups; no grey, which marks 'not comparable')."""
    methods = sort_methods(methods)
    others = [m for m in methods if m not in COLORS]
    styles = {m: {"color": COLORS[m], "hatch": HATCHES[m]} for m in methods if m in COLORS}
    return {**styles, **{m: {"color": OTHER_COLORS[k % len(OTHER_COLORS)],
                             "hatch": OTHER_HATCHES[k % len(OTHER_HATCHES)]} for k, m in enumerate(others)}}


def legend_columns(n: int) -> int:
    """One legend column per 10 entries: a long list of variants stays one readable block."""
    return max(1, math.ceil(n / 10))


def bars_figsize(n_tasks: int, n_methods: int, height: float = 3.6) -> tuple[float, float]:
    """Each task gets room for its bars (0.35 in per method, at least 1.6 in) plus the legend on the right."""
    return 2.6 + 1.6 * (legend_columns(n_methods) - 1) + n_tasks * max(1.6, 0.35 * n_methods), height


def grouped_bars(ax, agg: dict, key: str, scale: float = 1.0, marked: set | None = None, legend: bool = True) -> dict:
    """Bars per task, one per method: mean with a std error bar and each run as a dot; `marked` (task, method)
    bars are drawn faded with a grey dashed edge (not comparable). Returns the bar x's."""
    groups, tasks = agg["groups"], list(agg["groups"])
    methods = sort_methods(m for g in groups.values() for m in g)
    styles = method_styles(methods)
    width, xs = 0.8 / len(methods), {}
    for k, method in enumerate(methods):
        x = np.arange(len(tasks)) + (k - (len(methods) - 1) / 2) * width
        stat = [(groups[t].get(method) or {}).get(key) or {} for t in tasks]
        means = [np.nan if s.get("mean") is None else s["mean"] * scale for s in stat]
        bars = ax.bar(x, means, width, yerr=[(s.get("std") or 0) * scale for s in stat], capsize=3, label=method,
                      edgecolor="black", lw=0.6, **styles[method])
        for xi, t, patch in zip(x, tasks, bars.patches):
            xs[(t, method)] = xi
            if (t, method) in (marked or set()):
                patch.set(alpha=0.35, edgecolor="0.4", linestyle="--")
            vals = [r[key] * scale for r in agg["runs"] if (r["task"], r["method_name"]) == (t, method)
                    and r[key] is not None]
            ax.plot([xi] * len(vals), vals, "o", color="black", ms=3, zorder=3)
    ax.set_xticks(range(len(tasks)), [task_label(t) for t in tasks])
    if legend:
        ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0), ncols=legend_columns(len(methods)))
    return xs


def n_methods(agg: dict) -> int:
    return len({m for g in agg["groups"].values() for m in g})


def plot_score_bars(agg: dict, path: Path) -> None:
    fig, ax = new_figure(figsize=bars_figsize(len(agg["groups"]), n_methods(agg)))
    grouped_bars(ax, agg, "glue_score", 100)
    values = [100 * r["glue_score"] for r in agg["runs"] if r["glue_score"] is not None]
    if values:  # zoom in: the methods differ by a point or two, invisible on a 0-100 axis
        ax.set_ylim(max(0, min(values) - 5), min(100, max(values) + 3))
    ax.set(ylabel="dev score (%), axis not from 0", title="Final dev score: mean ± std over seeds (dots: runs)")
    save_figure(fig, path)


def plot_score_boxes(agg: dict, path: Path) -> None:
    tasks = list(agg["groups"])
    width = max(3.2, 0.6 * max(len(g) for g in agg["groups"].values()) + 1)
    fig, axes = new_figure(1, len(tasks), figsize=(width * len(tasks) + 0.5, 3.4 + 0.4 * (n_methods(agg) > 3)),
                           squeeze=False)
    styles = method_styles(r["method_name"] for r in agg["runs"])
    rng = np.random.default_rng(0)  # jitter only
    for ax, task in zip(axes[0], tasks):
        methods = list(agg["groups"][task])
        data = [[100 * r["glue_score"] for r in agg["runs"] if (r["task"], r["method_name"]) == (task, m)
                 and r["glue_score"] is not None] for m in methods]
        boxes = ax.boxplot(data, patch_artist=True, widths=0.55, medianprops={"color": "black"})
        for k, (patch, m) in enumerate(zip(boxes["boxes"], methods)):
            patch.set(facecolor=styles[m]["color"], alpha=0.6, hatch=styles[m]["hatch"])
            ax.plot(k + 1 + rng.uniform(-0.08, 0.08, len(data[k])), data[k], "o", color="black", ms=3, zorder=3)
        many = len(methods) > 3  # long variant names: slanted, one line
        ax.set_xticks(range(1, len(methods) + 1), [f"{m}{' ' if many else chr(10)}(n={len(d)})"
                                                   for m, d in zip(methods, data)],
                      rotation=30 if many else 0, ha="right" if many else "center")
        ax.set(title=task_label(task, " "), ylabel="dev score (%)")
    fig.suptitle("Final dev score over seeds (box: quartiles; dots: runs)")
    save_figure(fig, path)


def plot_learning_curves(records: list[RunRecord], path: Path) -> None:
    """Rows: tasks; train loss and dev score; colour = method, line style = seed, one legend for the figure."""
    tasks = sort_tasks(task_of(r) for r in records)
    methods = sort_methods(method_of(r) for r in records)
    colors = {m: s["color"] for m, s in method_styles(methods).items()}
    seeds = sorted({str(r.summary.get("seed")) for r in records}, key=lambda s: (len(s), s))
    styles = dict(zip(seeds, itertools.cycle(["-", "--", ":", "-."])))
    fig, axes = new_figure(len(tasks), 2, figsize=(10, 3 * len(tasks) + 0.6 + 0.25 * (len(methods) // 6)),
                           squeeze=False)
    for row, task in zip(axes, tasks):
        for rec in (r for r in records if task_of(r) == task):
            style = {"color": colors[method_of(rec)], "ls": styles[str(rec.summary.get("seed"))], "lw": 1.3}
            steps, loss = series(rec.history, "train_loss")
            row[0].plot(steps, smooth(loss)[0], **style)
            steps, metric = series(rec.history, headline_key(rec.history))
            row[1].plot(steps, np.multiply(metric, 100), marker="o", ms=3, **style)
        adalora = any(method_key_of(r) == "comparative-1" for r in records if task_of(r) == task)
        regulariser = " (AdaLoRA's includes its orthogonal regulariser)" if adalora else ""
        row[0].set(xlabel="optimizer step", ylabel="train loss (moving avg)",
                   title=f"{TASKS.get(task, task)}: train loss{regulariser}")
        row[1].set(xlabel="optimizer step", ylabel="dev score (%)", title=f"{task_label(task, ' ')}: dev")
    handles = [Line2D([], [], color=colors[m], lw=2, label=m) for m in methods] + [
        Line2D([], [], color="0.3", ls=styles[s], label=f"seed {s}") for s in seeds]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6))
    save_figure(fig, path)


def time_ratio_label(ratio: dict | None) -> str | None:
    """'×1.23' for a comparable ratio, '×1.23 n/c' for one that is not; None when there is none."""
    if not ratio or ratio.get("value") is None:
        return None
    return f"×{ratio['value']:.2f}" + ("" if ratio["comparable"] else " n/c")


def not_comparable(agg: dict) -> dict[tuple[str, str], str]:
    """(task, method) -> reason, for each group whose time ratio to LoRA is not comparable."""
    return {(t, m): r["step_time_ratio"]["reason"] for t, d in agg["derived"].items()
            for m, r in (d.get("methods") or {}).items() if not r["step_time_ratio"]["comparable"]}


def plot_train_time(agg: dict, path: Path) -> None:
    """Per-step time (the ratio that survives a shared machine) and total training time, ratio to LoRA above each
    bar; non-comparable ratios are faded bars marked n/c, with the reasons below the figure. EVA's data pass (part of
    its training time) is drawn apart: the cross-hatched, outlined base of its total bar."""
    marked = not_comparable(agg)
    n_tasks, n = len(agg["groups"]), n_methods(agg)
    width, height = bars_figsize(n_tasks, n, 3.6)
    figsize = (2 * width - 1.5 - 1.2 * legend_columns(n), height + 0.3 * len(set(marked.values())))
    fig, axes = new_figure(1, 2, figsize=figsize)
    panels = (("step_time_median_s", "step_time_ratio", "median step time (s)", "Per optimizer step"),
              ("train_time_s", "train_time_s_ratio", "training time (s)", "Per run (total)"))
    for ax, (key, ratio_key, ylabel, title) in zip(axes, panels):
        if key == "step_time_median_s" and not any(r[key] for r in agg["runs"]):
            key, ylabel = "train_time_per_step_s", "train time / steps (s)\n(no step times recorded)"
        xs = grouped_bars(ax, agg, key, marked=set(marked), legend=ax is axes[-1])
        if key == "train_time_s":  # EVA's data pass, inside its total: its own outlined, hatched base
            drawn = False
            for (task, method), x in xs.items():
                seconds = _mean(agg["groups"][task].get(method), "eva_init_s")
                if seconds:
                    ax.bar(x, seconds, 0.8 / n, fill=False, hatch="////", edgecolor="black", lw=1.2,
                           label=None if drawn else "EVA data pass (in the total)")
                    drawn = True
            if drawn:
                ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0), ncols=legend_columns(n + 1))
        for (task, method), x in xs.items():
            label = time_ratio_label(agg["derived"][task].get("methods", {}).get(method, {}).get(ratio_key))
            stat = agg["groups"][task][method][key] if method in agg["groups"][task] else {}
            if label and stat.get("mean") is not None:
                ax.annotate(label, (x, stat["mean"] + (stat["std"] or 0)), xytext=(0, 3), textcoords="offset points",
                            ha="center", fontsize=7, rotation=90 if n > 4 else 0)
        ax.set(ylabel=ylabel, title=title)
        ax.margins(y=0.25 if n > 4 else 0.15)
    fig.suptitle("Training time: mean ± std over seeds (dots: runs; ×: ratio to LoRA; n/c: not comparable)")
    if marked:
        notes = [f"n/c = not comparable: {reason}" for reason in dict.fromkeys(marked.values())]
        fig.supxlabel("\n".join(textwrap.fill(note, int(16 * figsize[0])) for note in notes), fontsize=7,
                      ha="left", x=0.01)
    save_figure(fig, path)


def mean_rank_tables(records: list[RunRecord]) -> dict:
    """(task, method) -> (mean over seeds of the layer x matrix rank table, number of runs), adaptive runs only."""
    out = {}
    for task in sort_tasks(task_of(r) for r in records):
        for method in sort_methods(method_of(r) for r in records):
            tables = [rank_table(ranks_of(r.summary)) for r in records
                      if task_of(r) == task and method_of(r) == method and is_adaptive(r)]
            tables = [t for t in tables if not t.empty]
            if tables:
                out[(task, method)] = (pd.concat(tables).groupby(level=0).mean(), len(tables))
    return out


def rank_panels(tables: dict) -> list[list[tuple[str, str]]]:
    """Figure rows of (task, method) panels: per task its adaptive groups, RANK_PANELS_PER_ROW at most per row."""
    rows = []
    for task in sort_tasks(t for t, _ in tables):
        methods = sort_methods(m for t, m in tables if t == task)
        rows += [[(task, m) for m in methods[i:i + RANK_PANELS_PER_ROW]]
                 for i in range(0, len(methods), RANK_PANELS_PER_ROW)]
    return rows


def plot_rank_comparison(records: list[RunRecord], path: Path) -> None:
    """The adaptive groups (AdaLoRA, EVA, GLoRA and its variants) side by side per task, on one colour scale."""
    tables = mean_rank_tables(records)
    rows = rank_panels(tables) or [[("none", "none")]]
    ncols = max(len(r) for r in rows)
    n_layers = max((len(t) for t, _ in tables.values()), default=2)
    fig, axes = new_figure(len(rows), ncols, squeeze=False,
                           figsize=(4.2 * ncols + 1, (1.2 + 0.3 * n_layers) * len(rows) + 0.5))
    vmax = max((np.nanmax(t.to_numpy()) for t, _ in tables.values()), default=1)
    for ax_row, panels in zip(axes, rows):
        for ax in ax_row[len(panels):]:
            ax.axis("off")
        for ax, (task, method) in zip(ax_row, panels):
            if (task, method) not in tables:
                ax.axis("off")
                ax.text(0.5, 0.5, "no adaptive-rank run (AdaLoRA/EVA/GLoRA) was evaluated", ha="center", va="center")
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


def fmt_ci(ci: list | None, scale: float = 100.0, signed: bool = True, digits: int = 2) -> str:
    """`[low, high]` scaled (points by default); `–` when there is no interval."""
    if not ci:
        return "–"
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"[{ci[0] * scale:{spec}}, {ci[1] * scale:{spec}}]"


def main_table(agg: dict) -> list[str]:
    """The AdaLoRA paper's layout: a row per group (its adapter parameters beside the name), tasks as columns with
    mean ± sd (n) over seeds, the GLUE average last with the interval of its per-seed values."""
    groups, tasks = agg["groups"], list(agg["groups"])
    rows = []
    for m in sort_methods(r["method_name"] for r in agg["runs"]):
        avg, params = agg["glue_average"][m], describe([r["adapter_params_reported"] for r in agg["runs"]
                                                        if r["method_name"] == m])["mean"]
        per_seed = avg["per_seed"]
        conf = f"{100 * per_seed['confidence']:.4g}%"
        cell = fmt_stat({"mean": avg["value"], "std": None, "n": avg["n_tasks"]}, 100).replace(
            f"({avg['n_tasks']})", f"({avg['n_tasks']} task{'s' * (avg['n_tasks'] > 1)})")
        cell += f"; {conf} CI {fmt_ci(per_seed['ci'], signed=False)} over {per_seed['n']} seeds" if per_seed["ci"] \
            else f"; no CI: {per_seed['reason']}"
        rows.append([f"{m} ({'–' if params is None else f'{params:,.0f}'})"]
                    + [fmt_stat((groups[t].get(m) or {}).get("glue_score"), 100) for t in tasks] + [cell])
    return table(["Method (adapter params)"] + [task_label(t, " ") for t in tasks] + ["Avg."], rows)


def fmt_time_ratio(ratio: dict | None, notes: list[str]) -> str:
    """`×1.23 [1.20, 1.26]`: with a paired interval, the geometric mean of the per-seed ratios (the interval's own
    estimand); else the ratio of the groups' means; `×1.23†` on the train_time/steps basis; `×2.65 (not comparable,
    note k)`, the reason in notes."""
    if not ratio or ratio.get("value") is None:
        return "–"
    paired = ratio["comparable"] and ratio.get("ci") and ratio.get("geometric_mean") is not None
    text = f"×{ratio['geometric_mean' if paired else 'value']:.2f}" + (
        "†" if ratio["basis"] == "train_time_per_step" else "")
    if ratio["comparable"]:
        text += f" {fmt_ci(ratio['ci'], 1.0, False, 3)}" if ratio.get("ci") else ""
        if not ratio.get("excluded"):
            return text
        note = "timed on the other seeds: " + "; ".join(f"{e['run']} left out ({e['reason']})"
                                                        for e in ratio["excluded"])
        label = "note"
    else:
        note, label = f"not comparable: {ratio['reason']}", "not comparable, note"
    if note not in notes:
        notes.append(note)
    return f"{text} ({label} {notes.index(note) + 1})"


def fmt_data_pass(g: dict) -> str:
    """EVA's data pass apart: seconds (mean ± sd (n)), its mean share of the run's train time, and the seconds it adds
    per step amortised over the run; `–` for a group without one."""
    if _mean(g, "eva_init_s") is None:
        return "–"
    share, per_step = _mean(g, "eva_init_share"), _mean(g, "eva_init_per_step_s")
    return (f"{fmt_stat(g['eva_init_s'], digits=1)}; {'–' if share is None else f'{100 * share:.1f}%'}; "
            f"{'–' if per_step is None else f'+{per_step:.4f}'}")


def fmt_params(g: dict) -> str:
    """Adapter params at the final ranks; `‡` when only the trained count (adapter_params) was recorded."""
    return fmt_stat(g["adapter_params_reported"], digits=0) + (
        "" if g["adapter_params_source"] in ("adapter_params_effective", None) else "‡")


COST_NOTE = ("Step time: per run the median over training optimizer steps (step_time_s; evaluation, checkpoints and "
             "GLoRA's rebuild excluded), mean ± std over seeds; it is the primary time ratio because a shared machine "
             "shifts the total far more than the median. †: no step times recorded, train_time_s / total_steps "
             "instead. Adapter params: at the final ranks (adapter_params_effective); ‡: only adapter_params (every "
             "trained lora_* parameter, AdaLoRA's masked ones included) was recorded. A run is left out of a time "
             "ratio, with its seed's run in the other group, when its step-to-step time jitter that the batch lengths "
             f"do not explain (unexplained_jitter) exceeds {STEP_SPREAD_MAX['unexplained_jitter']} of its median "
             f"(older records: unexplained_iqr or iqr/median above {STEP_SPREAD_MAX['unexplained_iqr']}), a CPU run "
             f"used less than {CPU_UTIL_MIN} of its threads (cpu_time_s / (train_time_s × cpu_threads)), or its "
             "timing was not recorded (outside load is the machine's, not the method's), and a seed whose two runs "
             f"were timed more than max({PAIR_GAP_MIN_S / 60:.0f} min, {PAIR_GAP_RUNS} × the longer run) apart "
             "(timed_from/timed_to: the machine's speed drifts); the ratio is then taken "
             "on the seeds left (a note names the runs left out). It is not comparable when no seed is left, when "
             f"the runs' environments differ ({', '.join(ENV_KEYS)}), or, when a run has no timing window, when the "
             f"seeds' median step times spread by more than {SEED_SPREAD_MAX} of their median. Score gains are "
             "over LoRA; a tuned group's over tuned LoRA (never over an untuned baseline); they are differences of the groups' means, shown without an interval: the paired "
             "interval by seed is in the significance and ablation tables. A time ratio with an interval is the "
             "geometric mean of the per-seed ratios (what the interval is of); without one, the ratio of the groups' "
             "means.")
EVA_PASS_HEADER = "EVA data pass (s; share of train time; s/step)"
EVA_COST_NOTE = (" EVA data pass: EVA's forward passes and incremental SVD over training batches before its first "
                 "step (eva_init_s), mean ± sd over seeds, its mean share of the train time, and the seconds it adds "
                 "per optimizer step amortised over the run (eva_init_s / total_steps). It is included in EVA's train "
                 "time, its train-time ratio and the † basis (train_time_s / total_steps), not in the median step "
                 "time (it is no optimizer step).")


def environment_lines(agg: dict) -> list[str]:
    """The machines the runs were timed on (hostname included: reported, though it alone does not matter)."""
    envs = {}
    for r in agg["runs"]:
        env = r.get("environment")
        key = "not recorded" if not isinstance(env, dict) else ", ".join(
            f"{k}={env[k]}" for k in ENV_KEYS + ["hostname"] if env.get(k) is not None)
        envs.setdefault(key, []).append(r["method_name"])
    lines = ["Environments:", ""] + [f"- {key}: {len(names)} run(s) of {', '.join(sort_methods(names))}"
                                     for key, names in envs.items()]
    windows, unwindowed = {}, {}
    for r in agg["runs"]:
        group = (r["task"], r["method_name"])
        if has_timing_window(r):
            w = windows.setdefault(group, [r["timed_from"], r["timed_to"]])
            w[:] = [min(w[0], r["timed_from"]), max(w[1], r["timed_to"])]
        else:
            unwindowed[group] = unwindowed.get(group, 0) + 1
    if windows or unwindowed:
        lines += ["", "When each group was timed (UTC, first start to last end of its runs; a machine whose speed "
                  "drifts puts the drift into the ratio of groups timed in different windows, so a study command "
                  "runs each seed's methods back to back):", ""]
        lines += [f"- {TASKS.get(t, t)}, {m}: {a} to {b}" for (t, m), (a, b) in sorted(
            windows.items(), key=lambda kv: (sort_tasks([kv[0][0]]), kv[1][0]))]
        lines += [f"- {TASKS.get(t, t)}, {m}: no timing window on {n} run(s) (records older than timed_from): a time "
                  f"ratio with them cannot be checked for drift between sessions (drift_checked false)"
                  for (t, m), n in sorted(unwindowed.items(), key=lambda kv: (sort_tasks([kv[0][0]]), kv[0][1]))]
    return lines


def rank_histogram_tables(agg: dict) -> list[str]:
    """Per task: how many adapted matrices end at each rank, binned around the uniform rank r (mean per run)."""
    if not agg.get("rank_histograms"):
        return ["No run recorded final ranks."]
    lines = ["Adapted matrices per final-rank bin (mean per run over the group's seeds; r = the task's uniform rank, "
             "LoRA's; 0 = no adapter on that matrix, which EVA allows). The per-matrix layout is in "
             "comparison_rank_allocation.pdf.", ""]
    for task, by_method in (agg.get("rank_histograms") or {}).items():
        labels = list(next(iter(by_method.values()))["bins"])
        rows = [[TASKS.get(task, task), m, str(h["n_runs"]), f"{h['matrices']:g}",
                 *[f"{h['bins'][b]:.1f}".removesuffix(".0") for b in labels],
                 f"{h['min']} / {h['median']:g} / {h['max']}"] for m, h in by_method.items()]
        r = next(iter(by_method.values()))["r"]
        lines += table(["Task", "Method", "Runs", "Matrices", *[f"rank {b}" for b in labels], "min / median / max"],
                       rows) + ["", f"(r = {r})", ""]
    return lines


def cost_table(agg: dict) -> list[str]:
    """Cost and gains per group; a column for EVA's data pass, apart, when any group has one."""
    rows, notes = [], []
    eva = any(_mean(g, "eva_init_s") is not None for by_method in agg["groups"].values() for g in by_method.values())
    for t, by_method in agg["groups"].items():
        for m, g in by_method.items():
            d = agg["derived"][t].get("methods", {}).get(m, {})
            step = g["step_time_median_s"] if g["step_time_median_s"]["mean"] is not None else g[
                "train_time_per_step_s"]
            rows.append([TASKS.get(t, t), m, fmt_stat(step, digits=4) + ("" if step is g["step_time_median_s"]
                                                                          else "†"),
                         fmt_stat(g["train_time_s"], digits=1), *[fmt_data_pass(g)] * eva,
                         fmt_stat(g["rank_budget_total"], digits=0),
                         fmt_params(g), fmt_stat(g["trainable_params"], digits=0),
                         fmt_points(d.get("glue_score_gain_abs")), fmt_points(d.get("glue_score_gain_rel"), "%"),
                         fmt_time_ratio(d.get("step_time_ratio"), notes),
                         fmt_time_ratio(d.get("train_time_s_ratio"), notes)]
                        + [fmt_ratio(d.get(k)) for k in ("rank_budget_total_ratio", "adapter_params_ratio",
                                                         "trainable_params_ratio")])
    lines = [COST_NOTE + EVA_COST_NOTE * eva, ""] + table(
        ["Task", "Method", "Step time (s)", "Train time (s)", *[EVA_PASS_HEADER] * eva, "Rank total",
         "Adapter params", "Trainable params",
         "Score gain (points)", "Score gain (relative)", "Step-time ratio", "Train-time ratio", "Rank ratio",
         "Adapter-param ratio", "Trainable-param ratio"], rows)
    lines += [""] + [f"Note {k}: {note}." for k, note in enumerate(notes, 1)] * bool(notes)
    lines += [""] + environment_lines(agg)
    for t, d in agg["derived"].items():
        for label, block in (("", d), (" (tuned groups)", d.get("tuned") or {})):
            share = block.get("glora_share_of_adalora_gain", {}).get("glue_score")
            if share:
                lines.append(f"\n{TASKS.get(t, t)}{label}: share of AdaLoRA's gain over LoRA that GLoRA recovers = "
                             f"{fmt_num(share['value'])} (ratio of means; its interval: H2 in the Verdict)"
                             + (f" ({share['reason']})" if share["reason"] else ""))
    return lines


SCORES_NOTE = ("Scores in %, mean ± sd over seeds (n runs): MNLI mean of m/mm accuracy, QQP mean of accuracy and "
               "F1, CoLA MCC, STS-B Pearson, the others accuracy. Avg.: the mean over the group's tasks (the AdaLoRA "
               "paper's convention), and the interval of the mean of its per-seed averages (each seed's tasks averaged "
               "first; only seeds run on every task). Adapter params: mean over the group's runs, at the final ranks "
               "where recorded. Cost per task below.")
EXAMPLE_TESTS_NOTE = (f"Per example on the shared dev set (McNemar exact test, Holm over a pair's seeds and splits; "
                      "paired bootstrap {level:g}% CI of the accuracy difference, "
                      f"{N_RESAMPLES} resamples, "
                      f"seed {BOOT_SEED}):")
PUBLISHED_NOTE = ("Zhang et al., *Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning* (AdaLoRA), ICLR "
                  "2023, Table 1. Copied for reference only: a different backbone, budget or seed count makes them not "
                  "directly comparable with ours.")


def seed_tests_note(agg: dict) -> str:
    st, m = agg["settings"]["statistics"], agg["thresholds"]["margin"]
    return (f"Across seeds (glue_score paired by seed). Mean diff. with its {100 * (1 - st['alpha']):.4g}% t-interval "
            f"over seeds. p: raw, then Holm-adjusted within the family (each task's headline pairs, EVA's two pairs "
            f"included where EVA was run; each task's "
            f"ablation table; t-tests and Wilcoxon tests apart). Wilcoxon's n counts the non-zero differences (scipy "
            f"drops zeros); with n of them its two-sided p cannot go below 2/2^n, so below {st['alpha']} only from 6. "
            f"MDE: the smallest difference a paired t-test detects with power {st['power']} at α = {st['alpha']} with "
            f"the seeds run (statsmodels TTestPower × sd of the differences). Seeds needed: prospective, the seeds at "
            f"which this {100 * (1 - st['alpha']):.4g}% interval would exclude the margin (H1, {100 * m:.2f} points) "
            f"with that power if the true difference and sd were the observed ones ('not decidable' on the margin or "
            f"beyond {SEEDS_MAX:,}); each verdict line gives it at its own level. Reading: Holm "
            f"p < α: a difference; else, the interval inside ±margin: no difference that large; else too few seeds "
            f"to tell.")


def fmt_test(t: dict) -> str:
    """`stat (p = raw; Holm adj.)`."""
    if t.get("p_value") is None:
        return "–"
    adjusted = "" if t.get("p_adjusted") is None else f"; Holm {fmt_num(t['p_adjusted'], 3)}"
    return f"{fmt_num(t['statistic'], 3)} (p = {fmt_num(t['p_value'], 3)}{adjusted})"


def seed_cells(e: dict) -> list[str]:
    """Mean diff., interval, t-test, Wilcoxon, n, MDE, seeds needed, reading: one seed-level comparison."""
    tests, mde = e["tests"] + [{}] * (2 - len(e["tests"])), e["mde"]
    needed = mde["seeds_needed_for_margin"]
    undecidable = (mde.get("seeds_needed_reason") or "").startswith("not decidable")
    wilcoxon = fmt_test(tests[1]) + (f", n≠0 = {tests[1]['n']}" if tests[1].get("p_value") is not None else "")
    return [fmt_points(e["mean_difference"]), fmt_ci(e.get("ci")), fmt_test(tests[0]), wilcoxon, str(e["n"]),
            "–" if mde["mde"] is None else f"{100 * mde['mde']:.2f}",
            str(needed) if needed is not None else "not decidable" if undecidable else "–",
            e["reading"]]


def seed_note(e: dict) -> str:
    """Why a seed-level test, interval or the MDE is missing or means little (too few seeds: said once)."""
    if e["n"] < 2:
        return e["tests"][0]["reason"]
    return "; ".join(dict.fromkeys(x for x in [t["reason"] for t in e["tests"]] + [e.get("ci_reason"),
                                                                                   e["mde"]["reason"]] if x))


SEED_HEADER = ["Mean diff. (points)", "CI (points)", "t-test: t (p; Holm)", "Wilcoxon: W (p; Holm)", "n",
               "MDE (points)", "Seeds needed for the margin", "Reading"]


def pooled_table(agg: dict) -> list[str]:
    """The headline pairs pooled over tasks: per-seed GLUE-average difference and the sign-flip test."""
    pooled = agg["significance"]["pooled"]
    if not pooled:
        return ["Pooled over tasks: needs >= 2 tasks with both groups of a pair."]
    rows = [[f"{e['method_a']} − {e['method_b']}", ", ".join(TASKS.get(t, t) for t in e["tasks"]),
             fmt_points(e["per_seed"]["mean_difference"]), fmt_ci(e["per_seed"]["ci"]), str(e["per_seed"]["n"]),
             fmt_points(e["test"]["statistic"]), str(e["test"]["n"]),
             "–" if e["test"]["p_value"] is None else f"{fmt_num(e['test']['p_value'], 3)}; Holm "
                                                      f"{fmt_num(e['test']['p_adjusted'], 3)}",
             "; ".join(filter(None, [e["per_seed"]["reason"], e["test"]["reason"]]))] for e in pooled]
    return ["Pooled over tasks: the GLUE-average difference per seed (seeds run on every task; its t-interval), and "
            "a stratified sign-flip permutation test over every task × seed difference (statistic: the mean over "
            "tasks of each task's mean difference; no normality or equal spread across tasks assumed), Holm over the "
            "pairs.", ""] + table(["Pair", "Tasks", "Per-seed avg. diff. (points)", "CI (points)", "Seeds",
                                   "Pooled diff. (points)", "Task × seed n", "Sign-flip p; Holm", "Note"], rows)


def significance_tables(agg: dict) -> list[str]:
    sig = agg["significance"]
    rows = [[TASKS.get(e["task"], e["task"]), f"{e['method_a']} − {e['method_b']}", *seed_cells(e), seed_note(e)]
            for e in sig["seed_level"]]
    lines = [seed_tests_note(agg), ""] + table(["Task", "Pair", *SEED_HEADER, "Note"], rows)
    lines += ["", *pooled_table(agg)]
    rows = []
    level = 100 * next((e["bootstrap"]["confidence_level"] for e in sig["example_level"] if e.get("bootstrap")), 0.95)
    for e in sig["example_level"]:
        mc, bs = e.get("mcnemar") or {}, e.get("bootstrap") or {}
        ci = f"[{100 * bs['ci_low']:+.2f}, {100 * bs['ci_high']:+.2f}]" if bs.get("ci_low") is not None else "–"
        rows.append([TASKS.get(e["task"], e["task"]), f"{e['method_a']} − {e['method_b']}", e.get("paired_by", ""),
                     e.get("split", ""), str(e.get("n", "")), fmt_num(mc.get("statistic")), fmt_num(mc.get("p_value")),
                     fmt_num(mc.get("p_adjusted")), fmt_points(bs.get("difference")), ci,
                     e.get("reason") or bs.get("reason") or ""])
    lines += ["", EXAMPLE_TESTS_NOTE.format(level=level), ""]
    return lines + table(["Task", "Pair", "Paired by", "Split", "n", "McNemar stat.", "McNemar p", "Holm p",
                          "Acc. diff. (points)", f"{level:g}% CI", "Note"], rows)


ABLATION_NOTE = ("Every group other than LoRA and GLoRA (the main configs: method comparative-2 / proposed with no "
                 "variant) against each of them, and a variant of AdaLoRA also against AdaLoRA; a tuned group "
                 "(variant `tuned`) instead against its own untuned config and the tuned LoRA and GLoRA groups, never "
                 "an untuned baseline; paired by seed. Holm over each task's table (a headline pair keeps its "
                 "headline family). Example level: per shared seed, McNemar's exact test; the table counts the seeds "
                 "(and MNLI splits) with McNemar p < α, raw and after Holm over the pair's seeds (each seed's "
                 "bootstrap CI is in aggregated_metrics.json, key `ablation`).")


def budget_table(agg: dict) -> list[str]:
    """What each group spent, on the tasks that have an ablation: rank total, adapter params, ratios to LoRA."""
    rows = []
    for t in dict.fromkeys(e["task"] for e in agg["ablation"]):
        for m, g in agg["groups"][t].items():
            b = group_budget(agg["groups"][t], m, agg["derived"][t])
            rows.append([TASKS.get(t, t), m, str(g["method"]), str(g["variant"] or "–"),
                         str(g["budget_unit"] or "–"), fmt_stat(g["rank_budget_total"], digits=0), fmt_params(g)]
                        + [fmt_ratio(b[k]) for k in ("rank_budget_total_ratio", "adapter_params_ratio",
                                                     "trainable_params_ratio")])
    return table(["Task", "Group", "Method", "Variant", "Budget unit", "Rank total", "Adapter params",
                  "Rank ÷ LoRA", "Adapter params ÷ LoRA", "Trainable ÷ LoRA"], rows)


def ablation_tables(agg: dict) -> list[str]:
    if not agg["ablation"]:
        return ["No group other than LoRA and GLoRA (main configs) was evaluated."]
    alpha, rows = agg["settings"]["statistics"]["alpha"], []
    for entry in agg["ablation"]:
        for c in entry["comparisons"]:
            if c["against"] is None:
                rows.append([TASKS.get(entry["task"], entry["task"]), entry["method_name"],
                             ROLE_LABELS.get(c["role"], c["role"].replace("_", " "))]
                            + ["–"] * (len(SEED_HEADER) + 1) + [c["reason"]])
                continue
            s = c["example_summary"]
            rows.append([TASKS.get(entry["task"], entry["task"]), entry["method_name"], c["against"],
                         *seed_cells(c["seed_level"]),
                         f"{s['n_mcnemar_significant']} / {s['n_mcnemar_significant_adjusted']} of {s['n_tests']}",
                         "; ".join(filter(None, [seed_note(c["seed_level"]), s["reason"]]))])
    return [ABLATION_NOTE, "", *budget_table(agg), "", seed_tests_note(agg), ""] + table(
        ["Task", "Group", "vs", *SEED_HEADER, f"McNemar p < {alpha} (raw / Holm)", "Note"], rows)


def fmt_estimate(hid: str, value, unit: bool = True) -> str:
    """An estimate, interval end or margin in its hypothesis' unit: points (H1), a share (H2), a ratio (H3, H4)."""
    if value is None:
        return "–"
    if hid == "H1":
        return f"{100 * value:+.2f}" + (" points" if unit else "")
    return f"{value:.2f}" if hid == "H2" else f"×{value:.3f}"


def fmt_claim(e: dict) -> str:
    if e["id"] in ("H1", "H2"):
        return f"≥ {fmt_estimate(e['id'], e['margin'])}"
    if e["id"] == "H3b":
        return "< ×1.000"
    return f"within ×[{1 - e['margin']:.3f}, {1 + e['margin']:.3f}]"


def verdict_line(e: dict) -> str:
    """`- H1 SST-2: estimate, interval, claim, n, p → status`; not testable with its reason."""
    hid = e["id"]
    level = "exact (the same ratio on every seed)" if e.get("exact") else f"{100 * e['confidence']:.4g}% CI"
    ci = "" if e.get("exact") else " –" if not e["ci"] else (
        f" [{fmt_estimate(hid, e['ci'][0], False)}, {fmt_estimate(hid, e['ci'][1], False)}]"
        + (" points" if hid == "H1" else ""))
    test = e.get("test") or {}
    # the raw p against the bound the rule puts on it: each end of the (1 - level) interval is one-sided at half
    p = "" if test.get("p_value") is None else (
        f", {'TOST' if test['alternative'] == 'equivalence' else 'one-sided'} p = {fmt_num(test['p_value'], 3)}"
        + (f" (rule: supported when p ≤ {fmt_num(test['rule_p_max'], 3)} = (1 − {100 * e['confidence']:.4g}%)/2)"
           if test.get("rule_p_max") is not None else ""))
    unit = "pair" if e.get("instrument") == "interleaved" else "seed"
    n = f"n = {e['n']} {unit}{'s' * (e['n'] != 1)}" + (f" × {e['n_tasks']} tasks" if e.get("n_tasks") else "")
    needed = e.get("seeds_needed") or {}
    status = f"**{e['status']}**" + (f" ({e['reason']})" if e["reason"] else "") + (
        f"; {e['detail']}" if e.get("detail") else "") + (
        "" if e["status"] in ("not testable", "supported", "contradicted") or not needed else
        f"; {needed.get('unit', 'seeds')} to decide "
        f"{'at a look of this design, at its level' if needed.get('looks') else 'at this level'} (prospective: "
        f"power {needed['power']:g}, if the {needed['assumes']}): "
        + (str(needed["n"]) if needed["n"] is not None else needed["reason"])) + (
        "; seeds left out: " + "; ".join(f"{x['seed']} ({x['why']})" for x in e["excluded"])
        if e.get("excluded") else "") + fmt_decision(e)
    where = TASKS.get(e["task"], e["task"]) + (" (primary)" if e["primary"] else "")
    return (f"- **{hid}** {where}: {fmt_estimate(hid, e['estimate'])}, {level}{ci}, claim {fmt_claim(e)}, {n}{p} "
            f"→ {status}{fmt_instrument(e)}")


def fmt_decision(e: dict) -> str:
    """A sequential verdict's look of decision, and this look's own reading where the rule kept another."""
    d = e.get("sequential_decision")
    if not d:
        return ""
    return f"; decided at look {d['look']} (n = {d['n']})" + (
        f", kept: this look alone reads {e['status_this_look']} (its interval and p above)"
        if e.get("status_this_look") else "")


def fmt_instrument(e: dict) -> str:
    """An H3 line's instrument: the interleaved timer (its record(s) and pairs) or the study runs' step times."""
    if "instrument" not in e:
        return ""
    if e["instrument"] == "interleaved":
        paths = e["timing_record"] if isinstance(e["timing_record"], list) else [e["timing_record"]]
        return (f"; instrument: interleaved timer, {e['n_pairs']} block pairs "
                f"({', '.join(f'`{p}`' for p in paths)})" + (f"; {e['timing_note']}" if e.get("timing_note") else ""))
    return "; instrument: study runs' step times" + (f" ({e['timing_note']})" if e.get("timing_note") else "")


def comparison_lines(agg: dict) -> list[str]:
    """GLoRA − EVA beside the hypotheses: no claim in config/hypotheses.yaml, so no verdict, only the headline tests
    (per task: the seed-level entry, Holm within that task's headline pairs; pooled: the sign-flip entry, Holm over
    the pooled pairs). Nothing when no task has both."""
    pair = (ROLE_LABELS["reference"], ROLE_LABELS["eva"])
    roles = {t: d["roles"] for t, d in agg["derived"].items()}
    seed = [e for e in agg["significance"]["seed_level"] if roles[e["task"]].get("eva")
            and (e["method_a"], e["method_b"]) == (roles[e["task"]]["reference"], roles[e["task"]]["eva"])]
    pooled = [e for e in agg["significance"]["pooled"] if e.get("roles") == ["reference", "eva"]]
    if not seed:
        return []
    lines = [f"{pair[0]} − {pair[1]} (informational: no claim, no verdict; glue_score paired by seed; EVA is a "
             f"comparison method, never GLoRA's role):", ""]
    for e in seed:
        t = e["tests"][0]
        p = "" if t.get("p_value") is None else f", t-test p = {fmt_num(t['p_value'], 3)} (Holm " \
                                                 f"{fmt_num(t['p_adjusted'], 3)}, {t['family']})"
        lines.append(f"- {TASKS.get(e['task'], e['task'])}: {fmt_points(e['mean_difference'], ' points')}, "
                     f"{100 * e['confidence']:.4g}% CI {fmt_ci(e.get('ci'))}, n = {e['n']}{p}: {e['reading']}")
    for e in pooled:
        ps, t = e["per_seed"], e["test"]
        p = "" if t.get("p_value") is None else f", sign-flip p = {fmt_num(t['p_value'], 3)} (Holm " \
                                                 f"{fmt_num(t['p_adjusted'], 3)})"
        lines.append(f"- GLUE average over {len(e['tasks'])} tasks: {fmt_points(ps['mean_difference'], ' points')}, "
                     f"{100 * ps['confidence']:.4g}% CI {fmt_ci(ps['ci'])}, n = {ps['n']} seeds{p}")
    return lines + [""]


def verdict_section(agg: dict) -> list[str]:
    """The report's opening: one line per hypothesis per task and pooled, the families, what it cannot say."""
    entries, alpha = agg["hypotheses"], agg["settings"]["statistics"]["alpha"]
    lines = []
    for hid in HYPOTHESIS_ROLES:
        mine = [e for e in entries if e["id"] == hid]
        source = "no margin" if hid == "H3b" else f"margin {mine[0]['margin']:g}, config/hypotheses.yaml " \
                                                  f"`hypotheses.{hid[:2]}`"
        lines += [f"{hid}: {CLAIMS[hid]} ({source})", ""]
        lines += [verdict_line(e) for e in sorted(mine, key=lambda e: e["task"] != "GLUE average")] + [""]
    sizes = {e["id"]: e["family_size"] for e in entries if e["task"] != "GLUE average"}
    pooled = [hid for hid in sizes if any(e["id"] == hid and e["task"] == "GLUE average" for e in entries)]
    per_task = "one task each, so no adjustment" if set(sizes.values()) == {1} else \
        f"Bonferroni over its tasks ({', '.join(f'{h}: {k}' for h, k in sizes.items())}; 1: none)"
    lines += comparison_lines(agg)
    lines += [f"Families and adjustment (α = {alpha}): the per-task verdicts of one hypothesis are one family, "
              f"{per_task}"
              + (f"; the GLUE-average verdicts ({', '.join(pooled)}) are primary and unadjusted" if pooled else "")
              + "; no adjustment across H1–H4 (all must hold).", ""]
    lines += sequential_lines(agg)
    lines += ["What these verdicts cannot say:", ""] + [f"- {note}" for note in agg["scope"]] + ["", VERDICT_RULE]
    return lines


def report_markdown(agg: dict) -> str:
    groups, tasks = agg["groups"], list(agg["groups"])
    best = [[m] + [fmt_stat((groups[t].get(m) or {}).get("best_validation_glue_score"), 100) for t in tasks]
            for m in sort_methods(r["method_name"] for r in agg["runs"])]
    eva = any(d["roles"].get("eva") for d in agg["derived"].values())
    lines = [f"# LoRA vs AdaLoRA vs {'EVA vs ' * eva}GLoRA on GLUE (dev sets)", "", "## Verdict", "",
             *verdict_section(agg), ""]
    lines += [f"Checkpoint rule: {CHECKPOINT_RULE}", ""]
    lines += ["## Main results (ours)", "", SCORES_NOTE, "", *main_table(agg), ""]
    collapsed = [f"- {r['run_name']} ({r['method_name']}, {TASKS.get(r['task'], r['task'])}): {c}"
                 for r in agg["runs"] for c in r.get("one_class") or []]
    lines += ["Runs that collapsed to one class (their score is the label prior's, counted as it is):", "",
              *collapsed, ""] * bool(collapsed)
    lines += ["## Cost and gains per task (relative to LoRA on the same task)", "", *cost_table(agg), ""]
    lines += ["## Final ranks", "", *rank_histogram_tables(agg), ""]
    lines += ["## Best-step dev scores (optimistic: the step is chosen on the dev set itself)", ""]
    lines += [*table(["Method"] + [task_label(t, " ") for t in tasks], best), ""]
    lines += ["## Significance", "", *significance_tables(agg), ""]
    lines += ["## Ablation and controls", "", *ablation_tables(agg), ""]
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


def comparison_texts(agg: dict) -> dict[str, str]:
    """comparison/'s text files: aggregated_metrics.json (NaN/inf as null) and report.md."""
    return {"aggregated_metrics.json": json.dumps(_finite(agg), indent=2, allow_nan=False),
            "report.md": report_markdown(agg)}


def compare(records: list[RunRecord], results_dir: Path, settings: dict | None = None,
            skipped: list[dict] | tuple = ()) -> dict:
    """comparison/: aggregated_metrics.json, report.md and the comparison figures; `skipped`: load_runs'."""
    out = results_dir / "comparison"
    agg = aggregate(records, settings, load_timing_records(results_dir), skipped)
    for name, text in comparison_texts(agg).items():
        atomic_write(out / name, lambda tmp, text=text: Path(tmp).write_text(text))
    plot_score_bars(agg, out / "comparison_accuracy_bar_chart.pdf")
    plot_score_boxes(agg, out / "comparison_accuracy_box_plot.pdf")
    plot_learning_curves(records, out / "comparison_learning_curves.pdf")
    plot_train_time(agg, out / "comparison_train_time.pdf")
    plot_rank_comparison(records, out / "comparison_rank_allocation.pdf")
    return agg


def main(argv: list[str] | None = None, wandb_api=None) -> int:
    """The CLI; `wandb_api` replaces `wandb.Api()` (tests). Returns the exit status."""
    try:
        results_dir, run_ids, skip_bad, settings, seeds = parse_args(sys.argv[1:] if argv is None else argv)
        skipped = []  # runs skip_bad=true leaves out: the verdicts name the seeds they lose
        records = load_runs(results_dir, run_ids, skip_bad, WandbSource(wandb_api), seeds, skipped)
        for rec in records:
            evaluate_run(rec, results_dir)
        compare(records, results_dir, settings, skipped)
    except EvaluationError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"[evaluate] {len(records)} run(s) evaluated; comparison in {results_dir / 'comparison'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
