"""The benchmark scripts run at toy size, so they cannot rot."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_overhead_bench_runs_at_toy_size(tiny_model):
    proc = subprocess.run([sys.executable, "bench/overhead.py", "--model", str(tiny_model), "--steps", "2",
                           "--warmup", "1", "--batch-size", "2", "--seq-len", "16"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("glora/lora", "glora-warmup/lora", "delta_grad-warmup/lora", "adalora/lora", "harness/bare"):
        assert re.search(rf"^{name} step-time ratio: \d+\.\d+$", proc.stdout, re.M), proc.stdout
    assert "GLoRA rebuild pause" in proc.stdout and "bare PEFT loop" in proc.stdout


@pytest.mark.slow  # 6 CLI runs; -m slow
def test_accuracy_bench_runs_at_toy_size(tiny_model, glue_dir, tmp_path):
    """The real CLI per method and task, then src.evaluate; the table names every method and its test."""
    targets = (REPO / "config" / "config.yaml").read_text().split("target_modules: ")[1].splitlines()[0].strip()
    proc = subprocess.run(
        [sys.executable, "bench/study.py", "--results-dir", str(tmp_path), "--tasks", "SST-2", "RTE", "--seeds",
         "42", "--model", str(tiny_model), "--data-dir", str(glue_dir), "--set", f"model.peft.target_modules={targets}",
         "adalora.total_rank_budget=96", "adalora.adaptation_start_step=0", "adalora.final_steps=0",
         "adalora.mask_interval=1", "glo_ra.warmup_steps=1", "training.max_train_batches=2",
         "dataset.max_eval_samples=32"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in ("sst2", "rte"):
        for method in ("LoRA", "AdaLoRA", "GLoRA"):
            assert re.search(rf"^{task} +{method} +1 +\d+\.\d\d ", proc.stdout, re.M), proc.stdout
        assert (tmp_path / f"proposed-MiniLM-L6-22M--GLUE-{task.upper().replace('SST2', 'SST-2')}" / "summary.json"
                ).exists()
    assert "McNemar p =" in proc.stdout and (tmp_path / "comparison" / "report.md").exists()


def load_study_bench():
    spec = importlib.util.spec_from_file_location("bench_study", REPO / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_accuracy_bench_reads_each_runs_kind_from_its_run_config(tmp_path):
    """--set adalora.*/glo_ra.* follow the run config (model.peft.type, its sections), not the prefix string."""
    bench = load_study_bench()
    assert bench.check_methods(bench.METHODS) == {"comparative-2": "lora", "comparative-1": "adalora",
                                                  "proposed": "glora"}
    shutil.copy(REPO / "config" / "run" / f"proposed-{bench.DEMO}.yaml", tmp_path)
    (tmp_path / f"zz-{bench.DEMO}.yaml").write_text(  # a variant written as a delta, under an uninformative prefix
        f"# @package _global_\ndefaults:\n  - proposed-{bench.DEMO}\n  - _self_\nmethod_name: GLoRA (x)\nvariant: x\n")
    assert bench.check_methods(["zz"], tmp_path) == {"zz": "glora"}
    assert bench.applies("adalora.final_steps=0", "adalora") and not bench.applies("adalora.final_steps=0", "glora")
    assert bench.applies("glo_ra.warmup_steps=1", "glora") and not bench.applies("glo_ra.warmup_steps=1", "lora")
    assert bench.applies("training.max_train_batches=2", "lora")
    assert bench.applies("eva.rho=1.5", "eva") and not bench.applies("eva.rho=1.5", "lora")
    assert bench.check_methods(["comparative-3"]) == {"comparative-3": "eva"}
    with pytest.raises(SystemExit, match=r"no run config nope-.*--methods with configs for MiniLM-L6-22M: .*comparative-2.*proposed"):
        bench.check_methods(["nope"])


def test_tuning_bench_writes_the_studys_best_values_as_a_tuned_delta(tmp_path):
    """bench/tuning.py: optuna.best_params of a study's final run land at their config paths in a `tuned` variant."""
    spec = importlib.util.spec_from_file_location("bench_tuning", REPO / "bench" / "tuning.py")
    tuning = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tuning)
    demo = tuning.A.DEMO
    study = tmp_path / "study" / f"proposed-{demo}"
    study.mkdir(parents=True)
    best = {"learning_rate": 0.0012345678901, "beta_ema": 0.91, "warmup_steps": "30%"}
    (study / "config.yaml").write_text(f"optuna:\n  n_trials: 8\n  pruner:\n    type: median\n  best_params: {best}\n")
    (study / "summary.json").write_text('{"best_trial_value": 0.875}')
    values = tuning.best_values(study, "glora")
    assert values == {"training.learning_rate": 0.0012345678901, "glo_ra.beta_ema": 0.91, "glo_ra.warmup_steps": "30%"}
    configs = tmp_path / "run"
    configs.mkdir()
    shutil.copy(REPO / "config" / "run" / f"proposed-{demo}.yaml", configs)
    (configs / f"proposed-tuned-{demo}.yaml").write_text(tuning.tuned_config("proposed", {"best_trial_value": 0.875}, values, 8))
    cfg = tuning.A.run_config("proposed-tuned", configs)
    assert cfg.run_id == f"proposed-tuned-{demo}" and cfg.variant == "tuned" and cfg.method_name == "GLoRA (tuned)"
    assert cfg.training.learning_rate == 0.0012345678901  # the study's value, not a rounded one
    assert cfg.glo_ra.beta_ema == 0.91 and cfg.glo_ra.warmup_steps == "30%" and cfg.optuna.n_trials == 0
    assert cfg.glo_ra.score == "grad_norm" and cfg.optuna.search_space.beta_ema.high == 0.99  # the rest: the demo's
    (study / "summary.json").write_text('{"n_trials_complete": 3, "n_trials_pruned": 1}')
    args = tuning.parse_args(["--results-dir", str(tmp_path), "--trials", "8"])
    with pytest.raises(SystemExit, match="pruner 'median', not --pruner none"):  # nor one protocol
        tuning.study("proposed", args)
    args = tuning.parse_args(["--results-dir", str(tmp_path), "--trials", "8", "--pruner", "median"])
    with pytest.raises(SystemExit, match="4 finished trials, not 8"):  # the methods must share one budget
        tuning.study("proposed", args)
    (study / "summary.json").write_text('{"n_trials_complete": 5, "n_trials_pruned": 3}')
    assert tuning.study("proposed", args) == (study, {"n_trials_complete": 5, "n_trials_pruned": 3})
    seeds = tmp_path / "seeds" / f"proposed-tuned-{demo}-seed43"  # trained with other values than the config's
    seeds.mkdir(parents=True)
    (seeds / "config.yaml").write_text("training:\n  learning_rate: 0.001\nglo_ra:\n  beta_ema: 0.91\n"
                                       "  warmup_steps: 30%\n")
    tuning.check_seed_runs("proposed", values, tuning.parse_args(["--results-dir", str(tmp_path), "--seeds", "42"]))
    with pytest.raises(SystemExit, match="was trained with"):
        tuning.check_seed_runs("proposed", values, tuning.parse_args(["--results-dir", str(tmp_path), "--seeds", "43"]))
    with pytest.raises(SystemExit, match="main configs only"):
        tuning.main(["--methods", "proposed-params"])
    reuse = tmp_path / "elsewhere"  # --seeds-dir: a study's folder, whose finished untuned seeds are reused
    (reuse / f"proposed-tuned-{demo}-seed43").mkdir(parents=True)
    (reuse / f"proposed-tuned-{demo}-seed43" / "config.yaml").write_text((seeds / "config.yaml").read_text())
    with pytest.raises(SystemExit, match=f"{reuse}.*was trained with"):
        tuning.check_seed_runs("proposed", values, tuning.parse_args(
            ["--results-dir", str(tmp_path / "other"), "--seeds-dir", str(reuse), "--seeds", "43"]))
    assert "comparative-3" in tuning.parse_args([]).methods  # EVA is tuned with the rest by default


def test_tuning_bench_tunes_eva_learning_rate_and_rho(tmp_path):
    """EVA's demo config tunes the learning rate over LoRA's range and its own rho; the tuned delta composes."""
    spec = importlib.util.spec_from_file_location("bench_tuning", REPO / "bench" / "tuning.py")
    tuning = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tuning)
    demo = tuning.A.DEMO
    assert tuning.A.check_methods(["comparative-3"]) == {"comparative-3": "eva"}
    eva, lora = tuning.A.run_config("comparative-3"), tuning.A.run_config("comparative-2")
    assert eva.optuna.search_space.learning_rate == lora.optuna.search_space.learning_rate
    assert (eva.optuna.search_space.rho.low, eva.optuna.search_space.rho.high) == (1.0, 3.0)
    study = tmp_path / f"comparative-3-{demo}"
    study.mkdir()
    (study / "config.yaml").write_text("optuna:\n  best_params: {learning_rate: 0.003, rho: 1.5}\n")
    values = tuning.best_values(study, "eva")
    assert values == {"training.learning_rate": 0.003, "eva.rho": 1.5}
    for name in (f"comparative-2-{demo}.yaml", f"comparative-3-{demo}.yaml"):
        shutil.copy(REPO / "config" / "run" / name, tmp_path)
    (tmp_path / f"comparative-3-tuned-{demo}.yaml").write_text(
        tuning.tuned_config("comparative-3", {"best_trial_value": 0.86}, values, 8))
    cfg = tuning.A.run_config("comparative-3-tuned", tmp_path)
    assert cfg.method_name == "EVA (tuned)" and cfg.variant == "tuned" and cfg.method == "comparative-3"
    assert cfg.training.learning_rate == 0.003 and cfg.eva.rho == 1.5 and cfg.eva.tau == 0.99


def test_adalora_deficit_schedule_reads_the_tuned_configs_runs_and_pairs_gaps_by_seed(tmp_path, capsys):
    """--variant tuned: the tuned configs' runs in tuned{N}/, no evaluation during training; gaps paired by seed."""
    spec = importlib.util.spec_from_file_location("bench_deficit", REPO / "bench" / "adalora_deficit.py")
    deficit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deficit)
    folder, config, overrides = deficit.schedule_run(1000, "comparative-1", "tuned")
    assert (folder, config) == ("tuned1000", "comparative-1-tuned")
    assert overrides == ["dataset.max_train_samples=32000", "training.eval_every_steps=null"]
    assert (REPO / "config" / "run" / f"{config}-{deficit.DEMO}.yaml").exists()
    assert deficit.schedule_run(500, "proposed", "untuned")[2][1] == "training.eval_every_steps=100"
    accuracy = {("comparative-2", 42): 0.80, ("comparative-2", 43): 0.82, ("comparative-1", 42): 0.81,
                ("comparative-1", 43): 0.80}
    for (method, seed), acc in accuracy.items():  # finished runs: the script reads them, trains nothing
        run = deficit.run_folder(tmp_path / "tuned1000", f"{method}-tuned-{deficit.DEMO}", seed)
        run.mkdir(parents=True)
        (run / "summary.json").write_text(f'{{"accuracy": {acc}}}')
    args = ["--results-dir", str(tmp_path), "--part", "schedule", "--variant", "tuned", "--methods", "comparative-2",
            "comparative-1", "--no-train"]
    with pytest.raises(SystemExit, match=r"comparative-2-tuned-\S+-seed44 has not finished \(--no-train"):
        deficit.main([*args, "--steps", "1000", "--seeds", "42", "43", "44"])
    deficit.main([*args, "--steps", "1000", "--seeds", "42", "43"])
    out = capsys.readouterr().out
    assert re.search(r"^ +1000 +32000 +81\.00 ± 1\.41 +80\.50 ± 0\.71  AdaLoRA-LoRA -0\.50 \(\+1\.00 / -2\.00; "
                     r"t p = 0\.80\)$", out, re.M), out


def _study(tmp_path, tiny_model, glue_dir, *extra: str):
    """bench/study.py on the tiny model: LoRA on CoLA (its own MiniLM run config), seeds 42 and 43."""
    targets = (REPO / "config" / "config.yaml").read_text().split("target_modules: ")[1].splitlines()[0].strip()
    return subprocess.run(
        [sys.executable, "bench/study.py", "--results-dir", str(tmp_path), "--tasks", "CoLA", "--methods",
         "comparative-2", "--seeds", "42", "43", "--model", str(tiny_model), "--data-dir", str(glue_dir), "--set",
         f"model.peft.target_modules={targets}", "training.max_train_batches=2", "dataset.max_eval_samples=16",
         "training.eval_every_steps=null", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.mark.slow  # 5 CLI runs and 2 evaluations (about 40 s idle); -m slow
def test_study_plans_skips_resumes_and_writes_the_per_run_csv(tiny_model, glue_dir, tmp_path):
    rid = "comparative-2-MiniLM-L6-22M--GLUE-CoLA"
    plan = _study(tmp_path, tiny_model, glue_dir, "--plan")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert re.search(rf"^{rid} +42 todo +\S+", plan.stdout, re.M) and "2 runs: 0 done, 2 left" in plan.stdout
    assert not (tmp_path / rid).exists()  # --plan trains nothing; its trial run lives in .plan/
    assert json.loads((tmp_path / ".plan" / rid / "summary.json").read_text())["forecast_full_run_s"] > 0

    first = _study(tmp_path, tiny_model, glue_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2/2 done, 0 left" in first.stdout
    rows = list(csv.DictReader((tmp_path / "study-MiniLM-L6-22M.csv").open()))
    assert [r["seed"] for r in rows] == ["42", "43"] and list(rows[0])[:11] == [
        "task", "method", "method_name", "seed", "metric", "value", "train_time_s", "step_time_median_s",
        "trainable_params", "adapter_params", "rank_total"]
    summary = json.loads((tmp_path / f"{rid}-seed43" / "summary.json").read_text())
    assert rows[1]["task"] == "CoLA" and rows[1]["method"] == "comparative-2" and rows[1]["metric"] == "mcc"
    assert float(rows[1]["value"]) == summary["mcc"] and int(rows[1]["rank_total"]) == summary["rank_budget_total"]
    assert (tmp_path / "comparison" / "report.md").exists()

    # an interrupted run: its checkpoint is there, its summary is not; the study resumes it and skips the other
    (tmp_path / f"{rid}-seed43" / "summary.json").unlink()
    replan = _study(tmp_path, tiny_model, glue_dir, "--plan")
    assert re.search(rf"^{rid} +43 partial @\d+", replan.stdout, re.M), replan.stdout
    second = _study(tmp_path, tiny_model, glue_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{rid}: finished earlier, skipped" in second.stdout and "resuming from" in second.stdout + second.stderr
    again = json.loads((tmp_path / f"{rid}-seed43" / "summary.json").read_text())
    assert again["mcc"] == summary["mcc"] and again["resumes"] == 1

    # --no-train on fewer seeds: the evaluation reads those seeds' runs only, as the CSV does
    only = _study(tmp_path, tiny_model, glue_dir, "--no-train", "--seeds", "42")
    assert only.returncode == 0, only.stderr[-3000:]
    agg = json.loads((tmp_path / "comparison" / "aggregated_metrics.json").read_text())
    assert [r["seed"] for r in agg["runs"]] == [42]
    assert [r["seed"] for r in csv.DictReader((tmp_path / "study-MiniLM-L6-22M.csv").open())] == ["42"]


def test_study_refuses_a_missing_task_config_before_training(tmp_path):
    bench = load_study_bench()
    with pytest.raises(SystemExit, match=r"no run config proposed-shuffled-MiniLM-L6-22M--GLUE-CoLA\.yaml"):
        bench.main(["--results-dir", str(tmp_path), "--tasks", "SST-2", "CoLA", "--methods", "proposed",
                    "proposed-shuffled", "--plan"])
    assert not (tmp_path / ".plan").exists()
    runs = bench.matrix(bench.parse_args(["--tasks", "SST-2", "CoLA", "--methods", "comparative-2", "proposed-params",
                                          "--seeds", "1", "2"]))
    assert [(r.seed, r.task, r.method) for r in runs[:4]] == [(1, "SST-2", "comparative-2"),
                                                              (1, "SST-2", "proposed-params"),
                                                              (1, "CoLA", "comparative-2"), (1, "CoLA", "proposed-params")]
    assert {r.kind for r in runs if r.method == "proposed-params"} == {"glora"}


def test_study_runs_one_run_per_gpu(tmp_path, monkeypatch):
    """--gpus 2: two workers, each run pinned to one GPU by CUDA_VISIBLE_DEVICES, every run trained once."""
    bench = load_study_bench()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen = []

    def fake_run(cmd, cwd=None, env=None, stdout=None, stderr=None, **kw):
        folder = Path(next(a for a in cmd if a.startswith("results_dir=")).split("=", 1)[1])
        seed = int(next(a for a in cmd if a.startswith("seed=")).split("=", 1)[1])
        rid = next(a for a in cmd if a.startswith("run=")).split("=", 1)[1]
        out = bench.run_folder(folder, rid, seed)
        out.mkdir(parents=True)
        (out / "summary.json").write_text("{}")
        seen.append((rid, seed, env["CUDA_VISIBLE_DEVICES"]))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = bench.parse_args(["--results-dir", str(tmp_path), "--tasks", "SST-2", "--methods", "comparative-2",
                             "proposed", "--seeds", "1", "2", "3", "--gpus", "2", "--set", "hardware.device=cuda"])
    assert bench.train(bench.matrix(args), args) == []
    assert len(seen) == 6 and len({(r, s) for r, s, _ in seen}) == 6 and {g for *_, g in seen} <= {"0", "1"}
    assert (tmp_path / ".logs").is_dir()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    assert bench.visible_gpus(2) == ["4", "6"]


def test_study_packs_runs_per_gpu(tmp_path, monkeypatch):
    """--gpus 2 --runs-per-gpu 3: six runs at once, three on each GPU, every run trained once."""
    import threading

    bench = load_study_bench()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lock, barrier, seen = threading.Lock(), threading.Barrier(6, timeout=30), []

    def fake_run(cmd, cwd=None, env=None, stdout=None, stderr=None, **kw):
        folder = Path(next(a for a in cmd if a.startswith("results_dir=")).split("=", 1)[1])
        seed = int(next(a for a in cmd if a.startswith("seed=")).split("=", 1)[1])
        rid = next(a for a in cmd if a.startswith("run=")).split("=", 1)[1]
        with lock:
            seen.append(env["CUDA_VISIBLE_DEVICES"])
        barrier.wait()  # the six first runs are all running at once, else this times out
        out = bench.run_folder(folder, rid, seed)
        out.mkdir(parents=True)
        (out / "summary.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = bench.parse_args(["--results-dir", str(tmp_path), "--tasks", "SST-2", "--methods", "comparative-2",
                             "proposed", "--seeds", "1", "2", "3", "--gpus", "2", "--runs-per-gpu", "3",
                             "--set", "hardware.device=cuda"])
    assert bench.train(bench.matrix(args), args) == []
    assert sorted(seen) == ["0", "0", "0", "1", "1", "1"]



def decision(status: str, n: int) -> dict:
    """src.evaluate's `sequential_decision` on a decided primary entry (here: as if decided at this look)."""
    return {"sequential_decision": {"status": status, "n": n}} if status in ("supported", "contradicted") else {}


def fake_study(bench, monkeypatch, decided_at: int | None, fail_seed: int | None = None,
               h4: str = "contradicted"):
    """train: writes each run's summary.json (seed `fail_seed`'s runs fail); evaluate: every primary verdict
    undecided before n = decided_at seeds, then decided. Returns (seeds trained, looks evaluated: their arguments)."""
    trained, looks = [], []

    def train(runs, args):
        failed = [r.folder.name for r in runs if r.seed == fail_seed]
        for r in runs:
            if r.state()[0] != "done" and r.seed != fail_seed:
                r.folder.mkdir(parents=True)
                (r.folder / "summary.json").write_text("{}")
                trained.append(r.seed)
        return failed

    def evaluate(runs, args, extra=()):
        looks.append(extra)
        n = len(json.loads(extra[0].split("=", 1)[1]))
        status = "supported" if decided_at and n >= decided_at else "undecided"
        seq = {"alpha_this_look": 0.01, "alpha_spent": 0.02, "alpha": 0.05}
        return runs, {"hypotheses": [{"id": h, "task": "GLUE average", "status": s, "primary": True,
                                      "sequential": seq, **decision(s, n)} for h, s in (("H1", status), ("H4", h4))]
                                    + [{"id": "H1", "task": "sst2", "status": "undecided", "primary": False}]}

    monkeypatch.setattr(bench, "train", train)
    monkeypatch.setattr(bench, "evaluate", evaluate)
    return trained, looks


def test_until_decided_adds_seeds_until_every_primary_verdict_is_decided_and_resumes(tmp_path, monkeypatch, capsys):
    bench = load_study_bench()
    argv = ["--results-dir", str(tmp_path), "--tasks", "SST-2", "CoLA", "--methods", "comparative-2", "proposed",
            "--seeds", "42", "43", "44", "45", "46", "--until-decided", "--max-seeds", "10"]
    trained, looks = fake_study(bench, monkeypatch, decided_at=7)
    runs, failed, agg = bench.until_decided(bench.parse_args(argv))
    assert failed == [] and sorted(set(trained)) == list(range(42, 49)) and len(trained) == 7 * 4
    assert sorted({r.seed for r in runs}) == list(range(42, 49)) and len(runs) == 28
    assert [look[0] for look in looks] == [f"seeds={json.dumps(list(range(42, 42 + n)))}" for n in (5, 6, 7)]
    assert looks[-1][1:] == ("statistics.sequential.look_n=7", "statistics.sequential.first_look=5",
                             "statistics.sequential.max_seeds=10", "statistics.sequential.spending=obrien-fleming")
    out = capsys.readouterr().out
    assert "[study] look 1 of at most 6: n = 5 seeds (42..46), intervals at 99% (α this look 0.01, spent 0.02 of " \
           "0.05): H1 undecided, H4 contradicted" in out
    assert "look 3 of at most 6: n = 7 seeds (42..48)" in out and "H1 supported, H4 contradicted" in out
    assert "the looks stop at n = 7: every primary verdict is decided or not testable" in out

    trained.clear(), looks.clear()  # re-run: nothing to train, the three looks recomputed from the finished seeds
    assert len(bench.until_decided(bench.parse_args(argv))[0]) == 28
    assert trained == [] and [len(json.loads(look[0].split("=", 1)[1])) for look in looks] == [5, 6, 7]

    trained, looks = fake_study(bench, monkeypatch, decided_at=None)  # never decided: the looks stop at --max-seeds
    runs, _, _ = bench.until_decided(bench.parse_args([*argv[:-1], "8"]))
    assert len(looks) == 4 and sorted(set(trained)) == [49] and "--max-seeds 8 reached" in capsys.readouterr().out

    trained, looks = fake_study(bench, monkeypatch, decided_at=None, fail_seed=51)  # a failed run ends the looks
    runs, failed, agg = bench.until_decided(bench.parse_args(argv))
    assert {r.seed for r in runs} == set(range(42, 51)) and len(failed) == 4 and all("seed51" in f for f in failed)
    assert "look at n = 10: 4 runs not finished" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --max-seeds below the seeds given
        bench.parse_args([*argv[:-1], "4"])


def test_plan_prints_the_looks_and_the_seeds_each_primary_verdict_needs(tmp_path, capsys):
    bench = load_study_bench()
    args = bench.parse_args(["--results-dir", str(tmp_path), "--seeds", "42", "43", "44", "--until-decided",
                             "--max-seeds", "6", "--spending", "pocock"])
    bench.print_sequential_plan(args)
    out = capsys.readouterr().out
    assert "looks at n = 3..6 seeds (at most 3 more seeds" in out and "Pocock-type" in out
    assert re.search(r"n = 3: 9\d\.\d+%, n = 4: 9\d\.\d+%, n = 5: 9\d\.\d+%, n = 6: 9\d\.\d+%", out), out
    bench.print_seeds_needed(args)  # no evaluation yet: nothing to say
    assert capsys.readouterr().out == ""
    agg = {"runs": [{"seed": s} for s in (42, 43, 44)], "hypotheses": [
        {"id": "H1", "task": "GLUE average", "status": "undecided", "primary": True,
         "seeds_needed": {"n": 14, "reason": "for the margin at power 0.8"}},
        {"id": "H2", "task": "GLUE average", "status": "not testable", "primary": True},
        {"id": "H1", "task": "sst2", "status": "undecided", "primary": False, "seeds_needed": {"n": 30}}]}
    (tmp_path / "comparison").mkdir()
    (tmp_path / "comparison" / "aggregated_metrics.json").write_text(json.dumps(agg))
    bench.print_seeds_needed(args)
    out = capsys.readouterr().out
    assert "3 seeds evaluated" in out and re.search(r"H1 +GLUE average +undecided +14 \(for the margin", out), out
    assert re.search(r"H2 +GLUE average +not testable +not computed", out) and "sst2" not in out
    agg["runs"] = agg["runs"][:2]  # fewer than 3 seeds: not yet
    (tmp_path / "comparison" / "aggregated_metrics.json").write_text(json.dumps(agg))
    bench.print_seeds_needed(args)
    assert capsys.readouterr().out == ""

def test_progress_scales_unmeasured_runs_forecasts_by_the_measured_overrun(tmp_path):
    study = load_study_bench()
    run = {rid: study.Run("m", "t", 42, rid, "demo", tmp_path / rid) for rid in "ABD"}
    progress = study.Progress(list(run.values()), {"A": 100.0, "B": 200.0}, workers=1)
    assert progress.expected(run["B"]) == 200.0 and progress.expected(run["D"]) is None
    progress.finished(run["A"], 125.0)  # A ran 25% over its forecast
    assert progress.expected(run["A"]) == 125.0
    assert progress.expected(run["B"]) == pytest.approx(250.0)
    assert progress.expected(run["D"]) == 125.0  # no forecast: the measured walls' median


def test_progress_scales_by_the_runs_own_tasks_overrun_once_it_has_one(tmp_path):
    study = load_study_bench()
    run = {rid: study.Run("m", task, 42, rid, "demo", tmp_path / rid)
           for rid, task in (("A", "short"), ("B", "short"), ("C", "long"), ("E", "long"))}
    progress = study.Progress(list(run.values()), {rid: 100.0 for rid in run}, workers=1)
    progress.finished(run["A"], 110.0)
    assert progress.expected(run["C"]) == pytest.approx(110.0)  # no "long" run measured yet: every task's ratio
    progress.finished(run["C"], 150.0)
    assert progress.expected(run["B"]) == pytest.approx(110.0)  # its own task's 1.1, not the median of 1.1 and 1.5
    assert progress.expected(run["E"]) == pytest.approx(150.0)


def test_plan_counts_a_partial_runs_share_left_and_the_finished_runs_overrun(tmp_path):
    study = load_study_bench()
    args = study.argparse.Namespace(results_dir=str(tmp_path))
    half, done = (study.Run("m", "t", 42, rid, "demo", tmp_path / rid) for rid in ("half", "done"))
    (tmp_path / ".plan" / "half").mkdir(parents=True)
    (tmp_path / ".plan" / "half" / "summary.json").write_text(json.dumps(
        {"forecast_full_run_s": 200.0, "forecast_full_run_shape": {"total_steps": 100}}))
    (tmp_path / "half" / "checkpoint" / "step-25").mkdir(parents=True)
    assert half.state() == ("partial", 25)
    assert study.remaining_share(half, 200.0, 25, args) == 0.75
    assert study.overrun([half, done], {"half": 200.0, "done": 100.0}) == {}  # nothing finished yet
    done.folder.mkdir()
    (done.folder / "summary.json").write_text(json.dumps({"train_time_s": 110.0, "eval_time_s": 20.0}))
    assert study.overrun([half, done], {"half": 200.0, "done": 100.0}) == {"t": [pytest.approx(1.3)]}


@pytest.mark.slow
def test_committed_reports_rederive_from_their_records_with_the_current_evaluate():
    """Every committed report.md and aggregated_metrics.json is what src.evaluate writes today for its committed
    runs (bench/reports.py --check): a change to the statistics or the report's text comes with re-derived reports."""
    spec = importlib.util.spec_from_file_location("bench_reports", REPO / "bench" / "reports.py")
    reports = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reports)
    names = [n for n in reports.REPORTS if reports.paths(n)[1].exists()]
    assert {"sst2-demo", "study-MiniLM-L6-22M"} <= set(names)
    for name in names:
        report, metrics = reports.rederive(name)
        md, js = reports.paths(name)
        assert report == md.read_text(), f"{md.name}: re-derive with `uv run python bench/reports.py {name}`"
        assert metrics == js.read_text(), f"{js.name}: re-derive with `uv run python bench/reports.py {name}`"


@pytest.mark.parametrize("study", ["study-MiniLM-L6-22M", "study-MiniLM-L6-22M-long"])
def test_committed_study_record_matches_its_run_records(study):
    """Each study's committed CSV (README, BENCHMARKS) is in the repository, has the issue's columns, and every row
    is re-derivable from the run record committed beside it (summary.json: metric value, train time, params)."""
    table = REPO / "bench" / "results" / f"{study}.csv"
    records = REPO / "bench" / "results" / study
    rows = list(csv.DictReader(table.open()))
    assert rows and list(rows[0])[:11] == ["task", "method", "method_name", "seed", "metric", "value", "train_time_s",
                                           "step_time_median_s", "trainable_params", "adapter_params", "rank_total"]
    for row in rows:
        summary = json.loads((records / row["run"] / "summary.json").read_text())
        assert (summary["method_name"], summary["seed"]) == (row["method_name"], int(row["seed"]))
        assert float(row["value"]) == pytest.approx(summary[row["metric"]], abs=1e-12)
        assert float(row["train_time_s"]) == pytest.approx(summary["train_time_s"])
        assert int(row["trainable_params"]) == summary["trainable_params"]
        assert int(row["steps"]) == summary["total_steps"]  # schedules differ between studies (the one-epoch arm)
        assert (records / row["run"] / "predictions.csv").exists()


def test_plan_forecasts_the_tune_phase_once_per_config(tmp_path):
    """--plan's tune phase: a config that tunes has its shared study's finished trials counted and only the rest
    forecast (trial forecast from its .plan trial run); a config with no trials has no tune row."""
    import argparse

    import optuna

    bench = load_study_bench()
    rid, other = "proposed-long-MiniLM-L6-22M--GLUE-SST-2", "comparative-2-MiniLM-L6-22M--GLUE-SST-2"
    for name, n in ((rid, 3), (other, 0)):
        (tmp_path / ".plan" / name).mkdir(parents=True)
        (tmp_path / ".plan" / name / "summary.json").write_text(json.dumps(
            {"forecast_full_run_s": 100.0, "forecast_n_trials": n, "forecast_trial_s": 60.0 if n else None}))
    (tmp_path / "optuna" / rid).mkdir(parents=True)
    study = optuna.create_study(study_name=rid, storage=f"sqlite:///{tmp_path / 'optuna' / rid / 'study.db'}")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    args = argparse.Namespace(results_dir=str(tmp_path), set=[], backbone="MiniLM-L6-22M")
    runs = [bench.Run("proposed-long", "SST-2", s, rid, "glora", tmp_path / f"{rid}-seed{s}") for s in (42, 43)]
    runs.append(bench.Run("comparative-2", "SST-2", 42, other, "lora", tmp_path / other))
    assert bench.tune_phase(runs, args) == {rid: (1, 2, 60.0)}  # the config's n_trials: 2, not a trial run's
    assert bench.study_trials(tmp_path, other) == 0
    # --set reaches every config (no trial run needed to know it): the demo config then tunes too, unforecast
    args.set = ["optuna.n_trials=3"]
    assert bench.tune_phase(runs, args) == {rid: (1, 3, 60.0), other: (0, 3, None)}


def test_until_decided_counts_a_not_testable_verdict_as_settled(tmp_path, monkeypatch, capsys):
    """A primary verdict that is not testable (e.g. AdaLoRA's gain shown <= 0) does not keep the study adding
    seeds to --max-seeds: the looks stop once the others are decided; while one is undecided they go on."""
    bench = load_study_bench()
    argv = ["--results-dir", str(tmp_path), "--tasks", "SST-2", "--methods", "comparative-2", "proposed",
            "--seeds", "42", "43", "44", "--until-decided", "--max-seeds", "8"]
    trained, looks = fake_study(bench, monkeypatch, decided_at=4, h4="not testable")
    bench.until_decided(bench.parse_args(argv))
    assert len(looks) == 2  # n = 3 (H1 undecided), n = 4 (H1 supported, H4 not testable): stop
    assert "the looks stop at n = 4: every primary verdict is decided or not testable" in capsys.readouterr().out


def test_until_decided_keeps_a_verdict_from_the_look_that_decided_it(tmp_path, monkeypatch, capsys):
    """H1 supported at n = 4, undecided again at n = 5; H4 decided only at n = 5: the looks stop at n = 5 (both have
    been decided), H1's decision is the n = 4 one (src.evaluate keeps it: test_sequential) and the study says so."""
    bench = load_study_bench()
    status = {3: ("undecided", "undecided"), 4: ("supported", "undecided"), 5: ("undecided", "contradicted")}
    looks = []

    def entry(h: str, s: str, n: int) -> dict:  # what src.evaluate writes at look n with H1 decided at n = 4
        if h == "H1" and n > 4:
            return {"status": "supported", "status_this_look": s, **decision("supported", 4)}
        return {"status": s, **decision(s, n)}

    def train(runs, args):
        for r in runs:
            if r.state()[0] != "done":
                r.folder.mkdir(parents=True)
                (r.folder / "summary.json").write_text("{}")
        return []

    def evaluate(runs, args, extra=()):
        n = len(json.loads(extra[0].split("=", 1)[1]))
        looks.append(n)
        return runs, {"hypotheses": [{"id": h, "task": "GLUE average", "primary": True, **entry(h, s, n)}
                                     for h, s in zip(("H1", "H4"), status[n])]}

    monkeypatch.setattr(bench, "train", train)
    monkeypatch.setattr(bench, "evaluate", evaluate)
    _, _, agg = bench.until_decided(bench.parse_args(
        ["--results-dir", str(tmp_path), "--tasks", "SST-2", "--methods", "comparative-2", "proposed", "--seeds",
         "42", "43", "44", "--until-decided", "--max-seeds", "8"]))
    out = capsys.readouterr().out
    assert looks == [3, 4, 5] and "the looks stop at n = 5: every primary verdict is decided" in out
    assert [e["status"] for e in agg["hypotheses"]] == ["supported", "contradicted"]
    assert "kept from the look that decided them: H1 supported at n = 4 (undecided at n = 5)" in out


def deberta_rates(length: int = 100) -> dict:
    """gpu_check rates built by hand: every token length `length` (so a batch pads to it), known per-token costs."""
    tasks = {name: {"source": "files", "sizes": dict(sizes), "train_lengths": [length] * 50,
                    "eval_lengths": [length] * 50, "tokenize_s_per_example": 1e-4}
             for name, sizes in (("MNLI", {"train": 392702, "validation": 9815, "validation_mm": 9832}),
                                 ("SST-2", {"train": 67349, "validation": 872}),
                                 ("RTE", {"train": 2490, "validation": 277}))}

    def method(phases, **extra):
        return {"precision": "bf16", "phases": {p: {"step_s_per_token": r} for p, r in phases.items()},
                "eval_s_per_token": 1e-7, "init_s": 0.0, "reallocation_s": None, **extra}

    return {"environment": {"device": "cuda", "device_name": "GPU X", "torch": "2"}, "backbone": "deberta",
            "load_s": 10.0,
            "checked_task": "MNLI", "tasks": tasks,
            "methods": {"lora": method({"train": 1e-6}), "adalora": method({"budgeting": 3e-6, "final": 1.5e-6}),
                        "glora": method({"warm-up": 2e-6, "after": 1e-6}, reallocation_s=5.0),
                        "eva": method({"train": 1e-6}, init_s=30.0)}}


def test_gpu_forecast_of_a_run_on_known_rates():
    """Seconds = set-up + steps x padded tokens x the phase-weighted rate + evaluations x eval tokens x rate, with
    the MNLI configs' own schedule: 3 epochs of ceil(392,702 / 32) = 12,272 steps, one evaluation an epoch, GLoRA's
    warm-up and AdaLoRA's final phase one epoch each (a third of the steps); tokenising once per task, apart."""
    bench = load_study_bench()
    args = bench.parse_args(["--backbone", "DeBERTa-v3-base-86M", "--tasks", "MNLI", "--seeds", "1",
                             "--methods", "comparative-2", "comparative-1", "proposed", "comparative-3"])
    runs = {r.kind: r for r in bench.matrix(args)}
    rates = deberta_rates()
    tokens, evals = 392702 + 9815 + 9832, 3 * (9815 + 9832) * 100 * 1e-7
    steps = 36816 * 32 * 100
    want = {"lora": 10 + steps * 1e-6 + evals,
            "adalora": 10 + steps * (2 / 3 * 3e-6 + 1 / 3 * 1.5e-6) + evals,
            "glora": 10 + 5 + steps * (1 / 3 * 2e-6 + 2 / 3 * 1e-6) + evals,
            "eva": 10 + 30 + steps * 1e-6 + evals}
    assert bench.gpu_tokenize_seconds("MNLI", rates) == pytest.approx(tokens * 1e-4)
    for kind, run in runs.items():
        seconds, shape = bench.gpu_run_seconds(run, args, rates, tuning=False)
        assert seconds == pytest.approx(want[kind], rel=1e-12), kind
        assert (shape["steps"], shape["evaluations"], shape["step_tokens"]) == (36816, 3, 3200)
    # a trial: a quarter of the run on the training split less its 10% held out (353,431 examples, 11,045 steps an
    # epoch), its evaluations on the held-out split, at the same phase-weighted rate
    seconds, shape = bench.gpu_run_seconds(runs["lora"], args, rates, tuning=True)
    from src import train as T
    from fractions import Fraction

    assert shape["steps"] == T.trial_steps(3 * 11045, Fraction(1, 4))
    held = 392702 - 353431
    trial_evals = shape["evaluations"] * held * 100 * 1e-7
    assert seconds == pytest.approx(10 + shape["steps"] * 3200 * 1e-6 + trial_evals, rel=1e-12)
    missing = {**rates, "methods": {k: v for k, v in rates["methods"].items() if k != "eva"}}
    assert bench.gpu_run_seconds(runs["eva"], args, missing, tuning=False)[0] is None


def test_set_values_reach_the_forecast_typed():
    """--set values are YAML (as Hydra's): a number is a number, null is None, in the config the forecast reads."""
    bench = load_study_bench()
    args = bench.parse_args(["--backbone", "DeBERTa-v3-base-86M", "--tasks", "RTE", "--seeds", "1", "--methods",
                             "comparative-2", "--set", "dataset.batch_size=16", "training.max_steps=null",
                             "training.epochs=1"])
    run = bench.matrix(args)[0]
    cfg = bench.config_of(run, args)
    assert (cfg.dataset.batch_size, cfg.training.max_steps, cfg.training.epochs) == (16, None, 1)
    seconds, shape = bench.gpu_run_seconds(run, args, deberta_rates(), tuning=False)
    assert shape["steps"] == -(-2490 // 16) and seconds > 0  # one epoch of ceil(2,490 / 16) steps


def test_the_node_schedule_runs_a_configs_study_on_its_seeds_as_workers_then_trains_them():
    """Jobs in queue order on the first free GPU; while a config's study has trials left each of its seeds' jobs takes
    one at a time (Optuna workers); a job that finds none left waits for the running ones, then trains."""
    bench = load_study_bench()
    Job = bench.Job
    plain = [Job("b", "B", "t", 3.0), Job("c", "C", "t", 4.0), Job("d", "D", "t", 5.0)]
    # no study: b [0, 3] | c [0, 4]; d on GPU 1 at 3 -> 8
    assert bench.schedule_node(plain, 2) == 8.0 and bench.schedule_node(plain, 1) == 12.0
    seeds = [Job("a1", "A", "t", 5.0), Job("a2", "A", "t", 5.0)]
    # A's study: 3 trials of 2 s. 2 GPUs: a1 trials [0, 2], [2, 4]; a2 trial [0, 2], then none left but a1's running:
    # waits to 4; both train [4, 9]
    assert bench.schedule_node(seeds, 2, {"A": (3, 2.0)}) == 9.0
    # 1 GPU: a1 runs the 3 trials [0, 6], trains [6, 11]; a2 finds the study done and trains [11, 16]
    assert bench.schedule_node(seeds, 1, {"A": (3, 2.0)}) == 16.0
    # 8 GPUs, 4 trials, 2 seeds: 2 workers, 2 trials each [0, 4], then both train: 9
    assert bench.schedule_node(seeds, 8, {"A": (4, 2.0)}) == 9.0
    # a finished study (0 trials left): the seeds just train
    assert bench.schedule_node(seeds, 2, {"A": (0, 2.0)}) == 5.0


def test_plan_with_a_gpu_check_prints_the_tune_and_seed_phases_in_gpu_hours(tmp_path, capsys):
    """The issue's command with --gpu-check: no trial run here, one tune row per config (25 trials each), every
    seed's run, and the total in GPU-hours."""
    bench = load_study_bench()
    (tmp_path / "rates.json").write_text(json.dumps(deberta_rates()))
    code = bench.main(["--plan", "--backbone", "DeBERTa-v3-base-86M", "--tasks", "MNLI", "SST-2", "RTE",
                       "--methods", "comparative-2", "comparative-1", "proposed", "comparative-3",
                       "--seeds", "1", "2", "3", "4", "5", "--gpu-check", str(tmp_path / "rates.json"),
                       "--gpus", "8", "--results-dir", str(tmp_path / "study")])
    out = capsys.readouterr().out
    assert code == 0 and "[study] forecasting" not in out and not (tmp_path / "study" / ".plan").exists()
    tune_rows = re.findall(r"^(\S+--GLUE-\S+)\s+0/25\s+(\d+)\s+([\d.]+)$", out, re.M)
    run_rows = re.findall(r"^(\S+--GLUE-\S+)\s+(\d) todo\s+(\d+)\s+([\d.]+)$", out, re.M)
    assert len(tune_rows) == 12 and len(run_rows) == 60
    total = float(re.search(r"what is left: 300 tuning trials and 60 runs; the 300 trials and 60 runs with rates: "
                            r"([\d.]+) GPU-hours, on 8 GPUs", out)[1])
    assert total == pytest.approx(sum(float(r[2]) for r in tune_rows) + sum(float(r[3]) for r in run_rows),
                                  abs=0.1)
    assert "tokenising, once per task (the token cache serves every later trial, seed and method): MNLI " in out


def test_gpu_plan_counts_a_partial_run_from_its_checkpoint_and_tokenising_once_per_task(tmp_path, capsys):
    """A run with a checkpoint at half its steps adds half its forecast; each task's tokenising is charged once,
    to its first job, whatever the number of methods and seeds, and not at all once the task has begun (its token
    cache exists)."""
    bench = load_study_bench()
    (tmp_path / "rates.json").write_text(json.dumps(deberta_rates()))
    argv = ["--plan", "--backbone", "DeBERTa-v3-base-86M", "--tasks", "MNLI", "RTE", "--methods", "comparative-2",
            "proposed", "--seeds", "1", "2", "--gpu-check", str(tmp_path / "rates.json"), "--set",
            "optuna.n_trials=0", "--results-dir", str(tmp_path / "study")]
    args = bench.parse_args(argv)
    rates, runs = deberta_rates(), bench.matrix(args)
    whole = bench.plan(runs, args)
    per_run = {r.rid: bench.gpu_run_seconds(r, args, rates, tuning=False)[0] for r in runs}
    tokenize = bench.gpu_tokenize_seconds("MNLI", rates) + bench.gpu_tokenize_seconds("RTE", rates)
    assert whole == pytest.approx(2 * sum(per_run.values()) + tokenize, rel=1e-12)
    partial = next(r for r in runs if r.kind == "lora" and r.task == "MNLI" and r.seed == 2)
    (partial.folder / "checkpoint" / "step-18408").mkdir(parents=True)  # half of 36,816 steps
    capsys.readouterr()
    assert bench.plan(runs, args) == pytest.approx(
        whole - per_run[partial.rid] / 2 - bench.gpu_tokenize_seconds("MNLI", rates), rel=1e-12)
    assert re.search(r"comparative-2-DeBERTa-v3-base-86M--GLUE-MNLI\s+2 partial @18408\s+36816", capsys.readouterr().out)


def test_plan_tries_one_trial_run_per_task_when_they_fail_and_says_there_is_no_forecast(tmp_path, monkeypatch,
                                                                                         capsys):
    """Without the data or backbone (e.g. DeBERTa configs on a machine without the hub), a task's first failed
    trial run stands for its other configs, and the total says "no forecast", not 0 minutes."""
    bench = load_study_bench()
    tried = []
    monkeypatch.setattr(bench, "forecast", lambda run, args: tried.append(run.rid))  # every trial run fails
    bench.main(["--plan", "--backbone", "DeBERTa-v3-base-86M", "--tasks", "MNLI", "RTE", "--methods",
                "comparative-2", "proposed", "--seeds", "1", "2", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert tried == ["comparative-2-DeBERTa-v3-base-86M--GLUE-MNLI", "comparative-2-DeBERTa-v3-base-86M--GLUE-RTE"]
    assert "8 runs: 0 done, 8 left, and 100 tuning trials; no forecast on this device" in out
    assert len(re.findall(r"^\S+--GLUE-\S+\s+0/25\s+-$", out, re.M)) == 4
