"""Cost records: schedules resolved against the run's length, per-step times and their load signature, run shapes."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from src import main
from src import preprocess as P
from src import train as T


@pytest.mark.parametrize("value,steps", [(12000, 12000), ("1 epoch", 400), ("0.5 epochs", 200), ("20%", 200),
                                         ("12.5%", 125), ("2 epochs", 800), (None, None)])
def test_schedule_values_resolve_to_steps(value, steps):
    assert T.schedule_steps("glo_ra.warmup_steps", value, total_steps=1000, steps_per_epoch=400) == steps


@pytest.mark.parametrize("key,value,total,per_epoch,steps", [
    ("glo_ra.warmup_steps", "35%", 90, 90, 32),  # exactly 31.5: half up (float arithmetic gives 31.499...)
    ("glo_ra.warmup_steps", "29%", 50, 50, 15),  # 14.5
    ("glo_ra.warmup_steps", "0.7 epochs", 90, 45, 32),  # 31.5
    ("glo_ra.warmup_steps", "1%", 40, 40, 0),  # a warm-up may round to nothing...
    ("adalora.mask_interval", "1%", 40, 40, 1),  # ...an interval may not: 0 would mean never (or divide by zero)
    ("training.eval_every_steps", "0.01 epochs", 40, 40, 1),
    ("training.eval_every_steps", 0, 40, 40, 0),  # steps as given
])
def test_schedule_rounding_is_exact_and_intervals_are_at_least_one_step(key, value, total, per_epoch, steps):
    assert T.schedule_steps(key, value, total_steps=total, steps_per_epoch=per_epoch) == steps


@pytest.mark.parametrize("value", ["1 epoc", "abc", "150%", -1, 2.5, True])
def test_malformed_schedule_values_name_the_key(value):
    with pytest.raises(ValueError, match=r"glo_ra\.warmup_steps="):
        T.parse_schedule("glo_ra.warmup_steps", value)


def test_the_schedule_keys_agree_between_the_cli_and_the_loop():
    assert main.SCHEDULE_KEYS == T.SCHEDULE_KEYS


def test_resolve_schedules_keeps_the_given_config_and_records_both():
    cfg = OmegaConf.create({"training": {"lr_warmup_steps": "10%", "eval_every_steps": None,
                                         "checkpoint_every_steps": 500},
                            "glo_ra": {"warmup_steps": "1 epoch"}})
    resolved, record = T.resolve_schedules(cfg, total_steps=300, steps_per_epoch=100)
    assert cfg.glo_ra.warmup_steps == "1 epoch"  # the given config is left as written (config.yaml, resume check)
    assert (resolved.training.lr_warmup_steps, resolved.glo_ra.warmup_steps) == (30, 100)
    assert record["glo_ra.warmup_steps"] == {"given": "1 epoch", "steps": 100}
    assert "adalora.final_steps" not in record  # a method section the run does not have


def _times(tokens, rng, load=0.0):
    tokens = np.asarray(tokens, dtype=float)
    base = 0.05 + 2e-4 * tokens  # a step's time follows its padded tokens
    noise = rng.normal(0, 0.004, len(tokens))
    stolen = load * rng.exponential(1.0, len(tokens)) * (rng.random(len(tokens)) < 0.5)  # another process, on and off
    return list(base + noise + stolen)


def test_unexplained_step_time_spread_separates_load_from_padding():
    rng = np.random.default_rng(0)
    tokens = list(rng.integers(400, 2000, 200))  # dynamic padding: batches of very different lengths
    idle = T.step_time_stats(_times(tokens, rng), tokens)
    loaded = T.step_time_stats(_times(tokens, rng, load=0.2), tokens)
    assert idle["iqr"] / idle["median"] > 0.3  # the raw spread is large even when idle...
    assert idle["unexplained_iqr"] < 0.05  # ...but the lengths explain it
    assert loaded["unexplained_iqr"] > 0.3
    assert idle["unexplained_jitter"] < 0.05 and loaded["unexplained_jitter"] > 0.2
    assert idle["seconds_per_1k_tokens"] == pytest.approx(0.2, rel=0.05)
    assert idle["n"] == 199  # the first step (one-off set-up) is left out


def test_run_shape_counts_steps_and_evaluations():
    cfg = OmegaConf.create({
        "dataset": {"max_train_samples": 8000, "max_eval_samples": None, "batch_size": 32, "eval_batch_size": 128},
        "training": {"epochs": 2, "max_steps": None, "max_train_batches": None, "gradient_accumulation_steps": 1,
                     "eval_every_steps": "20%"},
        "optuna": {"holdout_fraction": 0.1, "trial_epochs": 1, "trial_max_steps": 100}})
    full = T.run_shape(cfg, 67349, {"validation": 872})
    assert (full.train_examples, full.eval_examples, full.total_steps) == (8000, 872, 500)
    assert full.evaluations == 6  # every 100 steps (20%), and the end of epoch 1 (step 250)
    trial = T.run_shape(cfg, 67349, {"validation": 872}, tuning=True)
    assert (trial.train_examples, trial.eval_examples, trial.total_steps) == (7200, 800, 100)
    lengths = np.array([10] * 31 + [50])
    assert T.run_shape(cfg, 67349, {"validation": 872}, train_lengths=lengths).step_tokens == pytest.approx(
        32 * 50)  # every batch of 32 from these 32 lengths holds the longest


def test_length_grouped_batches_pad_to_about_their_own_length():
    """Half the examples 10 tokens, half 100, batches of 2: random batches pad to 100 unless both are short
    (E = 0.75 x 100 + 0.25 x 10 = 77.5); grouped ones (sorted mega-batches) hold two alike, so half pad to 100 and half
    to 10 (E = 55); the forecast of a run with dataset.group_by_length uses the grouped value."""
    lengths = np.array([10, 100] * 500)
    assert T.expected_batch_max(lengths, 2, draws=4000) == pytest.approx(77.5, abs=1.5)
    assert T.expected_batch_max(lengths, 2, draws=4000, grouped=True) == pytest.approx(55, abs=2)
    assert T.expected_batch_max(np.array([7] * 64), 8, grouped=True) == 7.0
    cfg = OmegaConf.create({
        "dataset": {"max_train_samples": None, "max_eval_samples": None, "batch_size": 2, "eval_batch_size": 2,
                    "group_by_length": True},
        "training": {"epochs": 1, "max_steps": None, "max_train_batches": None, "gradient_accumulation_steps": 1,
                     "eval_every_steps": None},
        "optuna": {"holdout_fraction": 0.1, "trial_epochs": None, "trial_max_steps": None}})
    assert T.run_shape(cfg, 1000, {"validation": 10}, train_lengths=lengths).step_tokens == pytest.approx(
        2 * T.expected_batch_max(lengths, 2, grouped=True))
    # the eval splits are read longest first: 500 examples of 100 tokens then 500 of 10 pad to themselves, per split
    # (two splits of 1000), against 77.5 a batch in file order
    grouped = T.run_shape(cfg, 1000, {"validation": 1000, "validation_mm": 1000}, eval_lengths=lengths)
    assert grouped.eval_tokens == 2 * (500 * 100 + 500 * 10)
    cfg.dataset.group_by_length = False
    plain = T.run_shape(cfg, 1000, {"validation": 1000, "validation_mm": 1000}, eval_lengths=lengths)
    assert plain.eval_tokens == pytest.approx(2000 * 77.5, rel=0.03)


def test_padded_tokens_pad_each_batch_to_its_longest():
    assert P.padded_tokens([3, 5, 2, 7, 1], 2) == 2 * 5 + 2 * 7 + 1 * 1


def test_a_costlier_phase_is_not_read_as_load():
    """GLoRA's delta_grad warm-up (or AdaLoRA's budgeting) costs more per step for a share of the run: a level shift
    that widens the residual IQR of an idle run, but not the step-to-step jitter that outside load brings."""
    rng = np.random.default_rng(1)
    tokens = list(rng.integers(400, 2000, 250))
    times = np.asarray(_times(tokens, rng))
    times[:75] *= 1.3  # 30% of the run at 1.3x the cost
    stats = T.step_time_stats(list(times), tokens)
    assert stats["unexplained_iqr"] > 0.1  # the level shift shows in the residuals...
    assert stats["unexplained_jitter"] < 0.05  # ...not in the jitter
    loaded = T.step_time_stats(_times(tokens, rng, load=0.2), tokens)
    assert loaded["unexplained_jitter"] > 0.2
