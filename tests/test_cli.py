"""The contract CLI: a tiny end-to-end trial run per method, and bad input failing fast with one clear line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, run_cli

RUNS = {
    "LoRA": ("comparative-2-DeBERTa-v3-base-86M--GLUE-SST-2", []),
    "AdaLoRA": ("comparative-1-DeBERTa-v3-base-86M--GLUE-MNLI", ["adalora.total_rank_budget=40"]),
    "GLoRA": ("proposed-DeBERTa-v3-base-86M--GLUE-RTE", ["glo_ra.total_rank_budget=60"]),
}


def tiny_args(tiny_model, glue_dir, results):
    # a history row per step (the DeBERTa configs log every 10 steps: on a GPU a logged step is a host sync)
    return [f"model.backbone={tiny_model}", f"dataset.data_dir={glue_dir}", f"results_dir={results}",
            "training.log_every_steps=1"]


@pytest.mark.parametrize("method", sorted(RUNS))
def test_trial_run_end_to_end(tiny_model, glue_dir, tmp_path, method):
    run_id, extra = RUNS[method]
    proc = run_cli(f"run={run_id}", "mode=trial", *tiny_args(tiny_model, glue_dir, tmp_path), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / run_id
    assert {"config.yaml", "history.jsonl", "summary.json", "predictions.csv", "adapter"} <= {
        p.name for p in run_dir.iterdir()}
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("run_id", "method", "task", "seed", "accuracy", "mcc", "glue_score", "best_step", "train_time_s",
                "trainable_params", "adapter_params", "rank_budget_total", "final_ranks"):
        assert key in summary, key
    assert summary["run_id"] == run_id and summary["method_name"] == method and summary["total_steps"] == 2
    assert summary["rank_budget_total"] == sum(summary["final_ranks"].values())
    assert len(summary["final_ranks"]) == 12  # 2 layers x 6 matrices; the pooler is not adapted
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2] and all("lr" in r and "epoch" in r for r in train_rows)
    assert any("validation_accuracy" in r for r in rows)
    if method == "AdaLoRA":
        assert summary["rank_budget_total"] == 40 and "accuracy_mm" in summary
    if method == "GLoRA":
        assert summary["rank_budget_total"] == 60 and summary["realloc_step"] == 1
        assert summary["trainable_params"] != summary["trainable_params_initial"]
        event = json.loads((run_dir / "rank_allocation.json").read_text())
        assert sum(event["new_ranks"].values()) == 60
        assert any(r.get("event") == "glora_reallocation" for r in rows)
    if method == "LoRA":
        assert set(summary["final_ranks"].values()) == {8}
        # cost record and the forecast of the full run (the values mode=trial replaced put back) and of its study
        env = summary["environment"]
        assert env["device"] == "cpu" and env["cpu_threads"] >= 1 and env["world_size"] == 1 and env["torch"]
        assert summary["step_time_s"]["n"] == 1 and summary["cpu_time_s"] > 0  # the 2nd step (the 1st pays set-up)
        cfg = OmegaConf.merge(OmegaConf.load(REPO / "config" / "config.yaml"),
                              OmegaConf.load(REPO / "config" / "run" / f"{run_id}.yaml"))
        n_train, n_dev = 96, 24  # conftest's SST-2 folder
        steps = math.ceil(n_train / cfg.dataset.batch_size) * cfg.training.epochs
        shape = summary["forecast_full_run_shape"]
        assert (shape["train_examples"], shape["eval_examples"], shape["total_steps"]) == (n_train, n_dev, steps)
        assert shape["evaluations"] == cfg.training.epochs and shape["step_tokens"] > 0
        assert summary["forecast_full_run_s"] > summary["forecast_basis"]["imports_s"]
        assert summary["forecast_n_trials"] == cfg.optuna.n_trials and summary["forecast_study_s"] > 0
        holdout = math.ceil(cfg.optuna.holdout_fraction * n_train)
        assert summary["forecast_trial_shape"]["train_examples"] == n_train - holdout
        assert "forecast on this device" in proc.stdout + proc.stderr


def test_seeded_runs_do_not_overwrite_each_other(tiny_model, glue_dir, tmp_path):
    run_id = RUNS["LoRA"][0]
    proc = run_cli(f"run={run_id}", "mode=trial", "seed=7", *tiny_args(tiny_model, glue_dir, tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / f"{run_id}-seed7" / "summary.json").read_text())
    assert summary["run_id"] == run_id and summary["seed"] == 7
    assert not (tmp_path / run_id).exists()


BAD = {
    "unknown run id": (["run=no-such-run", "mode=trial"], "Could not find 'run/no-such-run'"),
    "unknown override key": ([f"run={RUNS['LoRA'][0]}", "mode=trial", "training.lerning_rate=1"],
                             "Could not override 'training.lerning_rate'"),
    "mode missing": ([f"run={RUNS['LoRA'][0]}"], "error: mode is missing"),
    "mode misspelt": ([f"run={RUNS['LoRA'][0]}", "mode=trail"], "error: mode='trail' is not a mode"),
    "wrong value type": ([f"run={RUNS['LoRA'][0]}", "mode=trial", "training.epochs=two"],
                         "error: training.epochs='two': expected an integer"),
    "online without key": ([f"run={RUNS['LoRA'][0]}", "mode=full"], "error: wandb.mode=online but no W&B key"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_fast_with_one_clear_line(tmp_path, case):
    args, message = BAD[case]
    results = tmp_path / "results"
    proc = run_cli(*args, f"results_dir={results}")
    assert proc.returncode != 0
    assert message in proc.stderr.splitlines()[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not results.exists()


@pytest.mark.slow  # 10-17 s: the README's test command stays within 6 minutes
def test_missing_data_folder_and_malformed_tsv(tiny_model, glue_dir, tmp_path):
    results = tmp_path / "results"
    base = [f"run={RUNS['LoRA'][0]}", "mode=trial", f"model.backbone={tiny_model}", f"results_dir={results}"]
    proc = run_cli(*base, f"dataset.data_dir={tmp_path / 'no-glue'}")
    assert proc.returncode != 0 and "error: GLUE folder not found" in proc.stderr, proc.stderr
    bad = tmp_path / "bad-glue" / "SST-2"
    bad.mkdir(parents=True)
    (bad / "train.tsv").write_text("sentence\tlabel\nfine\t1\nbroken row without label\n")
    (bad / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    proc = run_cli(*base, f"dataset.data_dir={bad.parent}")
    assert proc.returncode != 0
    assert "error: " in proc.stderr and "SST-2/train.tsv:3: malformed row" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not results.exists()


def test_infeasible_budget_fails_before_training(tiny_model, glue_dir, tmp_path):
    run_id, _ = RUNS["AdaLoRA"]
    proc = run_cli(f"run={run_id}", "mode=trial", *tiny_args(tiny_model, glue_dir, tmp_path / "r"),
                   "adalora.total_rank_budget=500")
    assert proc.returncode != 0
    assert "error: adalora.total_rank_budget=500 is infeasible" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # 10-17 s: the README's test command stays within 6 minutes
def test_full_run_with_offline_wandb_writes_no_secret(tiny_model, glue_dir, tmp_path):
    """The W&B key reaches neither the config, the logs, the history, the summary nor W&B's own files."""
    secret = "0123456789abcdef0123456789abcdef01234567"
    run_id, _ = RUNS["LoRA"]
    proc = run_cli(f"run={run_id}", "mode=full", "wandb.mode=offline", "optuna.n_trials=0", "training.epochs=1",
                   "training.max_train_batches=2", *tiny_args(tiny_model, glue_dir, tmp_path),
                   env_extra={"WANDB_API_KEY": secret, "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / run_id
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run not written"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert secret not in proc.stdout + proc.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_missing_model_folder_and_unwritable_results_dir(tiny_model, glue_dir, tmp_path):
    run_id, _ = RUNS["LoRA"]
    proc = run_cli(f"run={run_id}", "mode=trial", *tiny_args(tmp_path / "no-model", glue_dir, tmp_path / "r"))
    assert proc.returncode != 0 and "error: model folder" in proc.stderr and "without config.json" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli(f"run={run_id}", "mode=trial", *tiny_args(tiny_model, glue_dir, blocker / "results"))
    assert proc.returncode != 0 and "is not writable" in proc.stderr.splitlines()[0], proc.stderr


def test_online_wandb_without_network_fails_before_loading(tiny_model, glue_dir, tmp_path):
    run_id, _ = RUNS["LoRA"]
    proc = run_cli(f"run={run_id}", "mode=full", *tiny_args(tiny_model, glue_dir, tmp_path / "r"),
                   env_extra={"WANDB_API_KEY": "f" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert proc.returncode != 0
    assert "error: wandb.mode=online but the W&B server 127.0.0.1:9 is unreachable" in proc.stderr, proc.stderr
    assert "f" * 40 not in proc.stdout + proc.stderr and not (tmp_path / "r").exists()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_model, glue_dir, tmp_path):
    run_id, _ = RUNS["LoRA"]
    proc = run_cli(f"run={run_id}", "mode=full", "wandb.mode=disabled", "optuna.n_trials=0", "training.epochs=1",
                   "dataset.batch_size=4", "training.lr_warmup_steps=0", "training.checkpoint_every_steps=1",
                   "training.learning_rate=1e20", *tiny_args(tiny_model, glue_dir, tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: training loss became nan at optimizer step 2" in proc.stderr, proc.stderr
    run_dir = tmp_path / run_id
    assert [p.name for p in (run_dir / "checkpoint").glob("step-*")] == ["step-0000001"]
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow  # 10-17 s: the README's test command stays within 6 minutes
def test_resume_false_moves_the_old_run_aside(tiny_model, glue_dir, tmp_path):
    run_id, extra = RUNS["LoRA"]
    args = [f"run={run_id}", "mode=trial", *extra, *tiny_args(tiny_model, glue_dir, tmp_path)]
    assert run_cli(*args).returncode == 0
    first = (tmp_path / run_id / "summary.json").read_text()
    proc = run_cli(*args, "resume=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    aside = list(tmp_path.glob(f"{run_id}.old-*"))
    assert len(aside) == 1 and (aside[0] / "summary.json").read_text() == first
    assert "moved aside" in proc.stdout + proc.stderr and (tmp_path / run_id / "summary.json").exists()


@pytest.mark.slow  # two CLI runs: the README's test command stays within 6 minutes
def test_a_second_run_reads_the_tokenised_splits_the_first_wrote(tiny_model, glue_dir, tmp_path):
    run_id = "comparative-2-DeBERTa-v3-base-86M--GLUE-RTE"
    summaries = {}
    for name, extra in (("first", []), ("second", ["seed=7"]), ("uncached", ["seed=7", "dataset.tokenized_cache=false"])):
        proc = run_cli(f"run={run_id}", "mode=trial", f"model.backbone={tiny_model}", f"dataset.data_dir={glue_dir}",
                       f"results_dir={tmp_path / name}", f"dataset.cache_dir={tmp_path / 'cache'}", *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        folder = tmp_path / name / (run_id if not extra else f"{run_id}-seed7")
        summaries[name] = json.loads((folder / "summary.json").read_text())
    assert [summaries[n]["tokenized"]["source"] for n in summaries] == ["written", "read", "tokenized"]
    assert summaries["second"]["loss"] == summaries["uncached"]["loss"]
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1
