"""EVA (PEFT's explained-variance adaptation) as the fourth method: its data pass redistributes uniform LoRA's total
rank, is timed as training, and the run ends with a stock PEFT adapter."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from src import model as M
from tests.conftest import run_cli
from tests.test_config import compose_run

RUN = "comparative-3-DeBERTa-v3-base-86M--GLUE-SST-2"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: spinning OpenMP threads only fight a busy machine's other jobs


def test_eva_run_keeps_lora_budget_counts_its_pass_and_reloads_in_stock_peft(tiny_deberta12, glue_dir, tmp_path):
    proc = run_cli(f"run={RUN}", "mode=trial", f"model.backbone={tiny_deberta12}", f"dataset.data_dir={glue_dir}",
                   f"results_dir={tmp_path}", env_extra=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / RUN
    s = json.loads((run / "summary.json").read_text())
    ranks = s["eva_ranks"]  # every adapted matrix, 0 included (such a layer loses its adapter)
    assert len(ranks) == 72 and sum(ranks.values()) == 72 * 8 == s["rank_budget_total"]
    assert max(ranks.values()) <= 2 * 8 and Counter(ranks.values()) != Counter({8: 72})  # rho = 2: redistributed
    assert {n: r for n, r in ranks.items() if r} == s["final_ranks"]
    assert s["method"] == "comparative-3" and s["method_name"] == "EVA"
    assert 0 < s["eva_init_s"] <= s["train_time_s"] and s["eva_forward_passes"] >= 2
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert s["adapter_params"] == sum(v.numel() for k, v in saved.items() if ".lora_" in k) \
        == s["adapter_params_effective"]
    # the saved data pass fixes the ranks for a resume
    init = load_file(run / "eva_init.safetensors")
    assert {M._base_name(k): v.shape[0] for k, v in init.items()} == ranks

    tokenizer = AutoTokenizer.from_pretrained(tiny_deberta12)
    batch = tokenizer(["good movie", "a dull and boring plot"], padding=True, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_deberta12, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    assert M.current_ranks(reloaded) == s["final_ranks"]
    trained = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in trained)
    with torch.no_grad():
        logits = reloaded(**batch).logits
        merged = reloaded.merge_and_unload()
        assert torch.allclose(merged(**batch).logits, logits, atol=1e-5, rtol=0)
    assert all(torch.isfinite(v).all() for v in trained.values())
    # that the reload is the trained model itself (ranks and per-layer scaling): test_eva_adapter_reloads_...


def test_eva_pass_draws_its_own_batches_and_no_global_rng(tiny_deberta12):
    """The pass gets a loader of its own (training's loader and its generator are never touched) and the global RNG
    is forked around it, so the dropout masks of training are what they would be without the pass."""
    cfg = compose_run(RUN, "mode=full", f"model.backbone={tiny_deberta12}")
    tokenizer, base = M.load_backbone(str(tiny_deberta12), 2, ".cache/models")
    model = M.build_adapter(cfg, base, 10)
    words = "good bad great awful fine movie film plot actor story boring fun dull bright dark".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5)) for i in range(64)]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch["labels"], batch["idx"] = torch.arange(64) % 2, torch.arange(64)
    sizes = []

    def make_loader(size):
        sizes.append(size)
        return [batch]

    before = torch.get_rng_state()
    tensors, info = M.prepare_adapter(cfg, model, make_loader, torch.device("cpu"), progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert sizes == [cfg.dataset.batch_size]  # eva.batch_size null: the training batch size
    assert sum(info["eva_ranks"].values()) == 72 * 8 and set(tensors) and info["eva_forward_passes"] >= 2
    # resuming: the saved pass rebuilds the same ranks on a fresh adapter, with no data
    _, fresh = M.load_backbone(str(tiny_deberta12), 2, ".cache/models")
    again = M.build_adapter(cfg, fresh, 10)
    M.prepare_adapter(cfg, again, None, torch.device("cpu"), saved=tensors)
    assert M.current_ranks(again) == M.current_ranks(model)


def _eva_batch(tokenizer, n: int = 64) -> dict:
    words = "good bad great awful fine movie film plot actor story boring fun dull bright dark".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5)) for i in range(n)]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch["labels"], batch["idx"] = torch.arange(n) % 2, torch.arange(n)
    return batch


def test_eva_adapter_reloads_in_stock_peft_with_its_ranks_and_scaling(tiny_deberta12, tmp_path):
    """The saved adapter, loaded by stock PEFT into a fresh backbone, computes what the model in training computes:
    B set to random values (after training it is not 0), so a wrong rank or alpha_pattern would show in the logits."""
    cfg = compose_run(RUN, "mode=full", f"model.backbone={tiny_deberta12}")
    tokenizer, base = M.load_backbone(str(tiny_deberta12), 2, ".cache/models")
    model = M.build_adapter(cfg, base, 10)
    batch = _eva_batch(tokenizer)
    M.prepare_adapter(cfg, model, lambda size: [batch], torch.device("cpu"), progress=False)
    ranks = M.current_ranks(model)
    assert len(set(ranks.values())) > 1  # redistributed, so per-layer alpha differs from the config's
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.eval()
    inputs = {k: v[:8] for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():
            assert not torch.allclose(model(**inputs).logits, expected, atol=1e-3)  # the adapters move the logits
    model.save_pretrained(tmp_path / "adapter")
    _, fresh = M.load_backbone(str(tiny_deberta12), 2, ".cache/models")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert M.current_ranks(reloaded) == ranks
    with torch.no_grad():
        got = reloaded(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_an_unconverged_eva_pass_stops_with_a_clear_error(tiny_deberta12, glue_dir, tmp_path):
    # PEFT compares each pass's components with the previous pass's, so one pass can never converge (3 passes did on
    # some random tiny models: a flaky test)
    proc = run_cli(f"run={RUN}", "mode=trial", "eva.batch_size=32", "eva.max_passes=1", f"model.backbone={tiny_deberta12}",
                   f"dataset.data_dir={glue_dir}", f"results_dir={tmp_path}", env_extra=ONE_THREAD)
    assert proc.returncode == 2 and "did not converge within eva.max_passes=1" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("override, message", [
    ("eva.rho=abc", "eva.rho='abc': a number >= 1"),
    ("eva.rho=0.5", "eva.rho=0.5: a number >= 1"),
    ("eva.tau=1.5", "eva.tau=1.5: a number in [0, 1]"),
    ("eva.whiten=maybe", "eva.whiten='maybe': expected true or false"),
    ("eva.batch_size=0", "eva.batch_size=0: an integer >= 1"),
    ("eva.max_passes=2.5", "eva.max_passes=2.5: an integer >= 1"),
])
def test_eva_keys_are_checked_before_the_data_pass(override, message):
    """The EVA keys' defaults live in the EVA run configs, out of main's type check: model.check_eva checks them."""
    cfg = compose_run(RUN, "mode=full", override)
    with pytest.raises(M.ModelError, match=re.escape(message)):
        M.check_eva(cfg.eva)
    M.check_eva(compose_run(RUN, "mode=full").eva)  # the shipped values pass


def test_a_bad_eva_key_stops_the_run_with_one_line(tiny_deberta12, glue_dir, tmp_path):
    proc = run_cli(f"run={RUN}", "mode=trial", f"model.backbone={tiny_deberta12}", f"dataset.data_dir={glue_dir}",
                   f"results_dir={tmp_path}", "eva.rho=abc", env_extra=ONE_THREAD)
    assert proc.returncode != 0 and "eva.rho='abc': a number >= 1" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
