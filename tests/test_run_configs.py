"""Every shipped run config (config/run/*.yaml, so new ones are covered when they land) can run:

- a trial run of each, in-process, on tiny fixtures: DeBERTa configs on a 12-layer tiny DeBERTa-v2 and MiniLM configs
  on a 6-layer tiny BERT (the real layer counts, so the shipped rank budgets are checked as they are), every task's
  small GLUE folder in the official layout;
- the MNLI configs in full mode at every batch size of their own search space (256 MNLI examples), so their
  schedules (epochs, shares of the run) hold at each;
- every config's schedule at the real GLUE training-set sizes, for the final run and for an Optuna trial, at every
  combination of the categorical values (and integer-range ends) its search space can draw (batch size, schedule,
  budget);
- the matrix itself: every task x method for both backbones, one schedule per task, the AdaLoRA paper's Table 8
  values where the configs say so, an Optuna metric the task reports.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import src.main as main
from src import preprocess as P
from tests.conftest import write_glue
from tests.test_config import CONFIG_DIR, RUN_IDS, compose_run

METHODS = ("comparative-2", "comparative-1", "proposed")
TASK_FOLDERS = ("MNLI", "SST-2", "RTE", "CoLA", "QQP", "QNLI", "MRPC", "STS-B", "WNLI")
BACKBONES = ("DeBERTa-v3-base-86M", "MiniLM-L6-22M")
# official GLUE training-set sizes (nyu-mll/glue)
TRAIN_SIZES = {"mnli": 392702, "sst2": 67349, "rte": 2490, "cola": 8551, "qqp": 363846, "qnli": 104743,
               "mrpc": 3668, "stsb": 5749, "wnli": 635}


def raw(run_id: str):
    return OmegaConf.load(CONFIG_DIR / "run" / f"{run_id}.yaml")


def task_of(run_id: str) -> str:
    return run_id.split("--GLUE-")[1]


pytestmark = pytest.mark.usefixtures("one_thread_no_bars")  # tests/conftest.py


@pytest.fixture(scope="module")
def backbones(tiny_deberta12, tiny_bert) -> dict[str, Path]:
    return {"DeBERTa-v3-base-86M": tiny_deberta12, "MiniLM-L6-22M": tiny_bert}


def backbone_of(run_id: str) -> str:
    """The tiny stand-in for a config: BERT-named matrices for MiniLM, DeBERTa's for the rest."""
    return "MiniLM-L6-22M" if "-MiniLM-" in run_id else "DeBERTa-v3-base-86M"


# ---------------------------------------------------------------------------------------------------------------
# Runs.

def _delta_on_another_task(run_id: str) -> bool:
    """EVA's and the equal-params variant's configs are deltas on configs whose trials run here: CI keeps their
    SST-2 trials (the delta itself) and leaves the other tasks' to -m slow."""
    return run_id.startswith(("comparative-3-", "proposed-params-")) and not run_id.endswith("--GLUE-SST-2")


@pytest.mark.parametrize("run_id", [pytest.param(r, marks=pytest.mark.slow) if _delta_on_another_task(r) else r
                                    for r in RUN_IDS])
def test_every_run_config_runs_in_trial_mode(run_id, backbones, glue_dir, tmp_path):
    cfg = compose_run(run_id, "mode=trial", f"model.backbone={backbones[backbone_of(run_id)]}",
                      f"dataset.data_dir={glue_dir}", f"results_dir={tmp_path}")
    main.run(cfg)
    summary = json.loads((tmp_path / run_id / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["run_id"] == run_id and summary["total_steps"] == 2
    spec = P.task_spec(cfg.dataset.name)[1]
    assert P.primary_metric(spec) in summary and summary["task"] == spec.hub_config
    assert summary["rank_budget_total"] == sum(summary["final_ranks"].values())


MNLI_RUNS = [(run_id, b) for run_id in RUN_IDS if run_id.endswith("DeBERTa-v3-base-86M--GLUE-MNLI")
             and "defaults" not in raw(run_id)  # a delta config (EVA) shares its base's schedule
             for b in raw(run_id).optuna.search_space.batch_size.choices]


@pytest.fixture(scope="module")
def mnli256(tmp_path_factory) -> Path:
    return write_glue(tmp_path_factory.mktemp("mnli256"),
                      {"MNLI": [("train.tsv", 256), ("dev_matched.tsv", 32), ("dev_mismatched.tsv", 32)]})


@pytest.mark.parametrize(("run_id", "batch_size"), MNLI_RUNS)
def test_mnli_configs_train_in_full_mode_at_every_searched_batch_size(run_id, batch_size, backbones, mnli256,
                                                                      tmp_path):
    cfg = compose_run(run_id, "mode=full", "wandb.mode=disabled", "optuna.n_trials=0",
                      f"dataset.batch_size={batch_size}", f"model.backbone={backbones['DeBERTa-v3-base-86M']}",
                      f"dataset.data_dir={mnli256}", f"results_dir={tmp_path}")
    main.run(cfg)
    summary = json.loads((tmp_path / run_id / "summary.json").read_text())
    per_epoch = math.ceil(256 / batch_size)
    assert summary["status"] == "finished" and "accuracy_mm" in summary
    assert (summary["steps_per_epoch"], summary["total_steps"]) == (per_epoch, 3 * per_epoch)
    steps = {k: v["steps"] for k, v in summary["schedule_steps"].items()}
    for key in ("adalora.adaptation_start_step", "adalora.final_steps", "glo_ra.warmup_steps"):
        if key in steps:  # "1 epoch", whatever the batch size
            assert steps[key] == per_epoch, (key, steps)
    if "glo_ra.warmup_steps" in steps:
        assert summary["realloc_step"] == per_epoch


# ---------------------------------------------------------------------------------------------------------------
# Schedules at the real sizes, for every value the search space can draw.

@pytest.fixture(scope="module")
def base_models(backbones) -> dict:
    from transformers import AutoModelForSequenceClassification

    return {name: AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
            for name, path in backbones.items()}


@pytest.mark.parametrize("run_id", RUN_IDS)
def test_schedule_is_feasible_at_real_sizes_for_every_searched_value(run_id, base_models):
    from src import model as M
    from src import train as T

    cfg = compose_run(run_id, "mode=full")
    space = main.resolve_search_space(cfg)
    # categorical values, and both ends of an integer range (the constraints are monotone in each value)
    drawn = {key: spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
             for key, (_, spec) in space.items() if spec["type"] in ("categorical", "int")}
    task = cfg.dataset.name.removeprefix("glue_")
    n = min(TRAIN_SIZES[task], cfg.dataset.max_train_samples or TRAIN_SIZES[task])
    n_trial = n - math.ceil(n * cfg.optuna.holdout_fraction)  # the tuning split trains on the rest
    final = ("final run", n, cfg.training.epochs, cfg.training.max_steps)
    trial = ("trial", n_trial, cfg.optuna.trial_epochs or cfg.training.epochs,
             cfg.optuna.trial_max_steps or cfg.training.max_steps)

    def check(c, what, n_train, epochs, max_steps, values):
        per_epoch = math.ceil(n_train / c.dataset.batch_size)
        total = per_epoch * epochs if max_steps is None else min(per_epoch * epochs, max_steps)
        resolved, _ = T.resolve_schedules(c, total, per_epoch)
        try:
            M.check_budget(resolved, base_models[backbone_of(run_id)], total)
        except M.ModelError as e:
            pytest.fail(f"{run_id}, {what} with {values or 'the configured values'}: {e}")

    check(cfg, *final, None)
    tcfg = copy.deepcopy(cfg)
    for values in itertools.product(*drawn.values()) if drawn else []:  # every drawn key is set anew each time
        for key, value in zip(drawn, values):
            OmegaConf.update(tcfg, space[key][0], value, merge=False)
        for run in (final, trial):  # the best values train the final run
            check(tcfg, *run, dict(zip(drawn, values)))


# ---------------------------------------------------------------------------------------------------------------
# The matrix.

def test_every_task_and_method_ships_for_both_backbones():
    expected = {f"{m}-{b}--GLUE-{t}" for m in METHODS for b in BACKBONES for t in TASK_FOLDERS}
    assert expected <= set(RUN_IDS), sorted(expected - set(RUN_IDS))


@pytest.mark.parametrize("run_id", sorted(r for r in RUN_IDS if r.startswith("comparative-3-") and "-tuned-" not in r))
def test_every_eva_config_tunes_loras_space_and_its_own_rho(run_id):
    """As AdaLoRA's and GLoRA's configs tune their own knobs, every EVA config searches rho beside LoRA's space."""
    eva = compose_run(run_id, "mode=full")
    lora = compose_run(run_id.replace("comparative-3-", "comparative-2-", 1), "mode=full")
    space = OmegaConf.to_container(eva.optuna.search_space)
    if eva.optuna.sampler.type == "grid":  # the one-epoch arm checks each method's transferred lr and its half only
        lr = eva.training.learning_rate
        assert space == {"learning_rate": {"type": "categorical", "choices": [lr, lr / 2]}}
        assert lora.optuna.sampler.type == "grid" and set(OmegaConf.to_container(lora.optuna.search_space)) == {
            "learning_rate"}
        eva.training.learning_rate = lora.training.learning_rate  # EVA's own transferred value; the rest shared
        eva.optuna.search_space = lora.optuna.search_space
    else:
        assert space.pop("rho") == {"type": "uniform", "low": 1.0, "high": 3.0}
        assert space == OmegaConf.to_container(lora.optuna.search_space)
    assert eva.training == lora.training and eva.dataset == lora.dataset


GROUPS = sorted({(b, task_of(r)) for r in RUN_IDS for b in BACKBONES
                 if r.startswith(METHODS) and f"-{b}--GLUE-" in r and task_of(r) in TASK_FOLDERS})


@pytest.mark.parametrize(("backbone", "task"), GROUPS)
def test_the_three_methods_of_a_task_share_one_schedule(backbone, task):
    lora, ada, glora = (compose_run(f"{m}-{backbone}--GLUE-{task}", "mode=full") for m in METHODS)
    spec = P.task_spec(ada.dataset.name)[1]
    assert spec.folder == task
    for cfg in (lora, glora):
        assert cfg.training == ada.training and cfg.dataset == ada.dataset
        assert cfg.optuna.metric == ada.optuna.metric and cfg.evaluation == ada.evaluation
        assert cfg.optuna.search_space.get("batch_size") == ada.optuna.search_space.get("batch_size") or \
            backbone == "MiniLM-L6-22M"  # the demo searches the batch size for LoRA only
    assert glora.glo_ra.warmup_steps == ada.adalora.adaptation_start_step  # GLoRA's warm-up = AdaLoRA's tinit
    tinit_space = ada.optuna.search_space.get("adaptation_start_step")
    if tinit_space is not None:
        assert glora.optuna.search_space.warmup_steps == tinit_space
    # positions in the run are epochs or shares of it, so that they hold at any batch size or subsample
    for value in (ada.adalora.adaptation_start_step, ada.adalora.final_steps, glora.glo_ra.warmup_steps):
        assert isinstance(value, str), value
    # the Optuna metric is one the task reports
    reported = ({"pearson", "spearman"} if spec.is_regression else
                {"accuracy", "mcc", *(["f1"] if task in ("MRPC", "QQP") else [])}) | {"glue_score", "loss"}
    assert ada.optuna.metric.removeprefix("validation_") in reported
    if task == "STS-B":
        assert ada.optuna.metric == "validation_pearson" and "accuracy" not in ada.evaluation.metrics
    if task == "CoLA":
        assert ada.optuna.metric == "validation_mcc"


# AdaLoRA paper Table 8 (batch 32): lr, epochs, gamma, tinit steps, deltaT, tfinal steps; max_length from the
# authors' run_debertav3_{task}.sh
TABLE8 = {"CoLA": (5e-4, 25, 0.5, 800, 10, 3500, 64), "QQP": (5e-4, 5, 0.1, 8000, 100, 25000, 320),
          "QNLI": (1.2e-3, 5, 0.1, 2000, 100, 8000, 512), "MRPC": (1e-3, 30, 0.1, 600, 1, 1800, 320),
          "STS-B": (2.2e-3, 25, 0.1, 800, 10, 2000, 128)}


@pytest.mark.parametrize("task", sorted(TABLE8))
def test_deberta_configs_carry_the_adalora_paper_values(task):
    from src import train as T

    lr, epochs, gamma, tinit, delta_t, tfinal, max_length = TABLE8[task]
    cfg = compose_run(f"comparative-1-DeBERTa-v3-base-86M--GLUE-{task}", "mode=full")
    assert (cfg.training.learning_rate, cfg.training.epochs, cfg.dataset.max_length) == (lr, epochs, max_length)
    a = cfg.adalora
    assert (a.orth_reg_weight, a.mask_interval, a.beta1, a.beta2, cfg.dataset.batch_size) == (
        gamma, delta_t, 0.85, 0.85, 32)
    per_epoch = math.ceil(TRAIN_SIZES[cfg.dataset.name.removeprefix("glue_")] / 32)
    _, record = T.resolve_schedules(cfg, per_epoch * epochs, per_epoch)
    for key, paper in (("adalora.adaptation_start_step", tinit), ("adalora.final_steps", tfinal)):
        assert record[key]["steps"] == pytest.approx(paper, rel=0.01), (key, record[key])
