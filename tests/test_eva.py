"""EVA (PEFT's explained-variance adaptation) as the fourth method: its data pass redistributes uniform LoRA's total
rank, is timed as training, and the run ends with a stock PEFT adapter."""

from __future__ import annotations

import json
from collections import Counter

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
    # the adapter really is EVA's: A rows start from the inputs' singular vectors, then train; B trained from 0
    assert all(torch.isfinite(v).all() for v in trained.values())


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


def test_an_unconverged_eva_pass_stops_with_a_clear_error(tiny_deberta12, glue_dir, tmp_path):
    # PEFT compares each pass's components with the previous pass's, so one pass can never converge (3 passes did on
    # some random tiny models: a flaky test)
    proc = run_cli(f"run={RUN}", "mode=trial", "eva.batch_size=32", "eva.max_passes=1", f"model.backbone={tiny_deberta12}",
                   f"dataset.data_dir={glue_dir}", f"results_dir={tmp_path}", env_extra=ONE_THREAD)
    assert proc.returncode == 2 and "did not converge within eva.max_passes=1" in proc.stderr, proc.stderr[-2000:]
