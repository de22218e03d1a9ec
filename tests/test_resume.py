"""Kill-and-resume: a run SIGKILLed mid-training and re-run with the same command ends exactly as an uninterrupted
run (same final metrics, same adapter weights to 1e-6), for every method, also across GLoRA's reallocation."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

CASES = {  # name: (run id, extra overrides, kill once a checkpoint at or after this optimizer step exists)
    "LoRA": ("comparative-2-DeBERTa-v3-base-86M--GLUE-SST-2", [], 9),
    "AdaLoRA-budgeting": ("comparative-1-DeBERTa-v3-base-86M--GLUE-RTE",
                          ["adalora.total_rank_budget=40", "adalora.adaptation_start_step=4",
                           "adalora.final_steps=8", "adalora.mask_interval=2"], 9),
    "GLoRA-after-realloc": ("proposed-DeBERTa-v3-base-86M--GLUE-RTE",
                            ["glo_ra.total_rank_budget=60", "glo_ra.warmup_steps=6"], 10),
    # 64 examples / batch 4: the epoch ends exactly on a full batch; resumed from the epoch-end checkpoint
    "LoRA-epoch-end": ("comparative-2-DeBERTa-v3-base-86M--GLUE-RTE", ["training.checkpoint_every_steps=null"], 16),
    "GLoRA-before-realloc": ("proposed-DeBERTa-v3-base-86M--GLUE-RTE",
                             ["glo_ra.total_rank_budget=60", "glo_ra.warmup_steps=12"], 5),
    # the resumed run rebuilds EVA's ranks from its saved data pass, with no second pass
    "EVA": ("comparative-3-DeBERTa-v3-base-86M--GLUE-RTE", ["eva.batch_size=64"], 9),
}
COMMON = ["mode=full", "wandb.mode=disabled", "optuna.n_trials=0", "training.epochs=2", "dataset.batch_size=4",
          "training.lr_warmup_steps=0", "training.checkpoint_every_steps=1", "training.eval_every_steps=8",
          "hardware.device=cpu"]
ENV = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def command(run_id, extra, tiny_model, glue_dir, results):
    return [sys.executable, "-u", "-m", "src.main", f"run={run_id}", *COMMON, *extra,
            f"model.backbone={tiny_model}", f"dataset.data_dir={glue_dir}", f"results_dir={results}"]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in (run_dir / "checkpoint").glob("step-*")] \
        if (run_dir / "checkpoint").exists() else []


# -m slow; the suite keeps GLoRA's (a rebuild of the ranks and the optimizer state on resume)
SLOW_CASES = {"LoRA-epoch-end", "GLoRA-before-realloc", "LoRA", "AdaLoRA-budgeting", "EVA"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c
                                  for c in sorted(CASES)])
def test_killed_run_resumes_to_the_same_result(tiny_model, glue_dir, tmp_path, case):
    run_id, extra, kill_at = CASES[case]
    ref = subprocess.run(command(run_id, extra, tiny_model, glue_dir, tmp_path / "ref"), cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    cmd = command(run_id, extra, tiny_model, glue_dir, tmp_path / "killed")
    run_dir = tmp_path / "killed" / run_id
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and max(checkpoint_steps(run_dir), default=0) < kill_at:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "summary.json").exists()
    resume_started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    resumed = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    want = json.loads((tmp_path / "ref" / run_id / "summary.json").read_text())
    got = json.loads((run_dir / "summary.json").read_text())
    for key in ("accuracy", "mcc", "glue_score", "best_step", "rank_budget_total", "final_ranks",
                "trainable_params", "realloc_step"):
        assert got.get(key) == pytest.approx(want.get(key), abs=1e-6), key
    assert got["resumes"] == 1 and want["resumes"] == 0
    # timed_from is the first start, kept across the kill; timed_to the end of the resumed segment
    start, end = (datetime.datetime.fromisoformat(got[k]) for k in ("timed_from", "timed_to"))
    assert start <= resume_started <= end
    if "eva_ranks" in want:  # the killed run's own pass, read back: its time is counted once
        assert got["eva_ranks"] == want["eva_ranks"] and 0 < got["eva_init_s"] <= got["train_time_s"]
    w_ref = load_file(tmp_path / "ref" / run_id / "adapter" / "adapter_model.safetensors")
    w_got = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert set(w_ref) == set(w_got)
    for k in w_ref:
        assert w_ref[k].shape == w_got[k].shape and torch.allclose(w_ref[k], w_got[k], atol=1e-6, rtol=0), k
    rows = lambda d: [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]  # noqa: E731
    losses = lambda d: [(r["step"], round(r["train_loss"], 6)) for r in rows(d) if "train_loss" in r]  # noqa: E731
    assert losses(run_dir) == losses(tmp_path / "ref" / run_id)


@pytest.mark.slow  # about 25-35 s: the README's test command stays within 6 minutes
def test_checkpoint_of_another_config_is_refused_and_a_corrupt_one_skipped(tiny_model, glue_dir, tmp_path):
    run_id, extra, _ = CASES["LoRA"]
    cmd = command(run_id, extra, tiny_model, glue_dir, tmp_path)
    run_dir = tmp_path / run_id
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and max(checkpoint_steps(run_dir), default=0) < 6:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    other = subprocess.run([*cmd, "training.learning_rate=1e-3"], cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert other.returncode != 0
    assert "checkpoint of a different config (training.learning_rate: 0.0002 -> 0.001)" in other.stderr
    newest = max((run_dir / "checkpoint").glob("step-*"))
    (newest / "state.safetensors").write_bytes(b"not a safetensors file")
    resumed = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = resumed.stdout + resumed.stderr
    assert f"checkpoint {newest} is unreadable" in out and "resuming from" in out
    assert (newest.parent / f"corrupt-{newest.name}" / "state.json").exists()  # set aside, not deleted


def test_wandb_id_is_kept_on_resume_and_fresh_after_a_restart(tmp_path):
    from src import train as T

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert T.wandb_run_id(run_dir, "run", resuming=False) == "run"
    assert T.wandb_run_id(run_dir, "run", resuming=True) == "run"
    (tmp_path / "run.old-20260101-000000").mkdir()  # resume=false moved an earlier attempt aside
    fresh = T.wandb_run_id(run_dir, "run", resuming=False)
    assert fresh.startswith("run-") and fresh != "run"
    assert T.wandb_run_id(run_dir, "run", resuming=True) == fresh


@pytest.mark.slow  # about 25-35 s: the README's test command stays within 6 minutes
def test_evaluating_during_training_does_not_change_training(tiny_model, glue_dir, tmp_path):
    """Evaluation must not draw from the RNG that drives dropout: the same run with and without evaluations in
    between ends with the same weights (a loader without its own generator draws a seed from the global RNG)."""
    finals = []
    for every in ("2", "null"):
        extra = ["training.checkpoint_every_steps=null", f"training.eval_every_steps={every}", "training.epochs=1"]
        results = tmp_path / every
        done = subprocess.run(command("comparative-2-DeBERTa-v3-base-86M--GLUE-RTE", extra, tiny_model, glue_dir,
                                      results), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        summary = json.loads((results / "comparative-2-DeBERTa-v3-base-86M--GLUE-RTE" / "summary.json").read_text())
        assert summary["evaluations"] >= (2 if every == "2" else 1)
        finals.append(summary["loss"])
    assert finals[0] == finals[1]


def test_a_setting_added_later_at_its_default_does_not_block_a_resume(tmp_path):
    """A checkpoint written before config.yaml gained a key (e.g. hardware.compile) resumes when the key is at its
    default; set to anything else, it is a different config."""
    from omegaconf import OmegaConf

    from src import train as T

    now = OmegaConf.create({"training": {"learning_rate": 1e-3}, "hardware": {"compile": False},
                            "dataset": {"group_by_length": False, "tokenized_cache": True}})
    OmegaConf.save(OmegaConf.create({"training": {"learning_rate": 1e-3}}), tmp_path / "config.yaml")
    T.check_same_config(now, tmp_path / "config.yaml")
    now.hardware.compile = True
    with pytest.raises(T.CheckpointError, match=r"hardware.compile: None -> True"):
        T.check_same_config(now, tmp_path / "config.yaml")
