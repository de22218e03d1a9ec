"""GLoRA's invariants: exact budget, function-preserving rebuild, optimizer state surgery, stock-PEFT export."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from src import model as M

TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query_proj|key_proj|value_proj)|attention\.output\.dense|intermediate\.dense|output\.dense)"


# ---------------------------------------------------------------------------------------------------------------
# Allocation (pure).

@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=80), st.integers(1, 3),
       st.integers(0, 400), st.integers(2, 64), st.data())
def test_allocation_is_exact_and_within_bounds(scores, min_rank, extra, cap, data):
    names = [f"m{i}" for i in range(len(scores))]
    caps = {n: data.draw(st.integers(min_rank, min_rank + cap)) for n in names}
    total = min(len(names) * min_rank + extra, sum(caps.values()))
    ranks = M.allocate_ranks(dict(zip(names, scores)), total, min_rank, caps)
    assert sum(ranks.values()) == total
    assert all(min_rank <= ranks[n] <= caps[n] for n in names)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 100, allow_nan=False), min_size=2, max_size=60), st.integers(0, 500))
def test_unbounded_allocation_is_rounded_proportional(scores, extra):
    """Without binding bounds r_k is round(R s_k), corrected to the budget: within 1 of R s_k, monotone in score."""
    names = [f"m{i:02d}" for i in range(len(scores))]
    total = len(names) + extra
    ranks = M.allocate_ranks(dict(zip(names, scores)), total, min_rank=0)
    s = sum(scores)
    for n, g in zip(names, scores):
        assert abs(ranks[n] - total * g / s) < 1.0 + 1e-9
    order = sorted(zip(scores, names))
    for (g1, n1), (g2, n2) in zip(order, order[1:]):
        assert ranks[n1] <= ranks[n2] or g1 == g2


def test_allocation_examples():
    assert M.allocate_ranks({"a": 1, "b": 1, "c": 2}, 8) == {"a": 2, "b": 2, "c": 4}
    assert M.allocate_ranks({"a": 0, "b": 0}, 6) == {"a": 3, "b": 3}  # no signal: uniform
    # a bound binds: the excess goes to the others, the budget stays exact
    assert M.allocate_ranks({"a": 100, "b": 1, "c": 1}, 12, min_rank=1, max_rank=6) == {"a": 6, "b": 3, "c": 3}
    assert M.allocate_ranks({"a": 1, "b": 0}, 4, min_rank=1) == {"a": 3, "b": 1}


def test_infeasible_budget_raises():
    with pytest.raises(ValueError, match="infeasible"):
        M.allocate_ranks({"a": 1, "b": 1, "c": 1}, 2, min_rank=1)
    with pytest.raises(ValueError, match="infeasible"):
        M.allocate_ranks({"a": 1, "b": 1}, 10, min_rank=1, max_rank=4)


def _glora_cfg(tiny_model, **glo_ra):
    return OmegaConf.create({
        "model": {"backbone": str(tiny_model), "peft": {
            "type": "lora", "init_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False,
            "target_modules": TARGETS, "modules_to_save": ["classifier", "pooler"]}},
        "glo_ra": {"total_rank_budget": 48, "beta_ema": 0.9, "warmup_steps": 2, "score": "grad_norm",
                   "min_rank": 1, "max_rank": None, **glo_ra}})


def test_check_budget_errors_at_start_up(tiny_model):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    M.check_budget(_glora_cfg(tiny_model), base, total_steps=10)  # feasible: no error
    with pytest.raises(M.ModelError, match=r"total_rank_budget=8 is infeasible.*#matrices \(12\)"):
        M.check_budget(_glora_cfg(tiny_model, total_rank_budget=8), base, total_steps=10)
    with pytest.raises(M.ModelError, match="warmup_steps=10"):
        M.check_budget(_glora_cfg(tiny_model, warmup_steps=10), base, total_steps=10)
    costs = {f"m{i}": 64 + 32 * (i % 2) for i in range(12)}
    assert M.resolve_glora_budget(_glora_cfg(tiny_model, total_rank_budget="uniform").glo_ra, costs, 4) == 48
    params = _glora_cfg(tiny_model, total_rank_budget="uniform", budget_unit="params").glo_ra
    assert M.resolve_glora_budget(params, costs, 4) == 4 * sum(costs.values())


# ---------------------------------------------------------------------------------------------------------------
# Rebuild on the tiny DeBERTa.

def _peft_model(tiny_model, seed=0, rslora=False):
    torch.manual_seed(seed)
    cfg = _glora_cfg(tiny_model)
    cfg.model.peft.use_rslora = rslora
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model = M.build_adapter(cfg, base, total_steps=10)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would make every check trivial
        for layer in M.lora_layers(model).values():
            layer.lora_B[M.ADAPTER].weight.normal_(0, 0.5)
    model.eval()
    return model


def _batch(n=6, length=12, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def _grow_or_keep(model) -> dict[str, int]:
    ranks = {n: int(m.r[M.ADAPTER]) for n, m in M.lora_layers(model).items()}
    return {n: r + (i % 3) * 2 for i, (n, r) in enumerate(ranks.items())}  # +0, +2, +4: nothing dropped


@pytest.mark.parametrize("rslora", [False, True])
def test_rebuild_without_drops_preserves_outputs(tiny_model, rslora):
    model = _peft_model(tiny_model, rslora=rslora)
    batch = _batch()
    with torch.no_grad():
        before = model(**batch).logits
    scaling = {n: m.scaling[M.ADAPTER] for n, m in M.lora_layers(model).items()}
    new = _grow_or_keep(model)
    M.rebuild_lora_layers(model, new)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.allclose(before, after, atol=1e-6, rtol=0), (before - after).abs().max()
    assert {n: int(m.r[M.ADAPTER]) for n, m in M.lora_layers(model).items()} == new
    assert {n: m.scaling[M.ADAPTER] for n, m in M.lora_layers(model).items()} == pytest.approx(scaling)


def test_rebuild_keeps_the_most_important_components(tiny_model):
    model = _peft_model(tiny_model)
    name, layer = next(iter(M.lora_layers(model).items()))
    importance = M.component_importance(layer).detach().clone()
    a = layer.lora_A[M.ADAPTER].weight.detach().clone()
    top2 = torch.argsort(importance, descending=True)[:2].sort().values
    ranks = {n: int(m.r[M.ADAPTER]) for n, m in M.lora_layers(model).items()}
    ranks[name] = 2
    M.rebuild_lora_layers(model, ranks)
    assert torch.equal(layer.lora_A[M.ADAPTER].weight, a[top2])


def test_dropping_components_changes_outputs(tiny_model):
    """Control group for the identity test: the check can fail."""
    model = _peft_model(tiny_model)
    batch = _batch()
    with torch.no_grad():
        before = model(**batch).logits
    M.rebuild_lora_layers(model, {n: 1 for n in M.lora_layers(model)})
    with torch.no_grad():
        assert not torch.allclose(before, model(**batch).logits, atol=1e-6)


def _train_steps(model, optimizer, n, seed=0):
    model.train()
    for i in range(n):
        model(**_batch(seed=seed + i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_optimizer_moments_are_carried_by_value(tiny_model):
    model = _peft_model(tiny_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _train_steps(model, optimizer, 2)
    layers = M.lora_layers(model)
    names = list(layers)
    shrink, grow = names[0], names[1]
    old = {}
    for n in (shrink, grow):
        for part in ("lora_A", "lora_B"):
            p = getattr(layers[n], part)[M.ADAPTER].weight
            old[n, part] = {k: v.clone() for k, v in optimizer.state[p].items()}
    keep_shrink = torch.argsort(M.component_importance(layers[shrink]), descending=True)[:2].sort().values
    ranks = {n: int(m.r[M.ADAPTER]) for n, m in layers.items()}
    ranks[shrink], ranks[grow] = 2, 7
    M.rebuild_lora_layers(model, ranks, optimizer)

    a, b = layers[shrink].lora_A[M.ADAPTER].weight, layers[shrink].lora_B[M.ADAPTER].weight
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[a][key], old[shrink, "lora_A"][key][keep_shrink])
        assert torch.equal(optimizer.state[b][key], old[shrink, "lora_B"][key][:, keep_shrink])
    assert torch.equal(optimizer.state[a]["step"], old[shrink, "lora_A"]["step"])
    a, b = layers[grow].lora_A[M.ADAPTER].weight, layers[grow].lora_B[M.ADAPTER].weight
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[a][key][:4], old[grow, "lora_A"][key])
        assert torch.count_nonzero(optimizer.state[a][key][4:]) == 0
        assert torch.equal(optimizer.state[b][key][:, :4], old[grow, "lora_B"][key])
        assert torch.count_nonzero(optimizer.state[b][key][:, 4:]) == 0
    # nothing points at orphaned parameters
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == trainable
    assert {id(p) for p in optimizer.state} <= trainable


def test_step_after_rebuild_changes_exactly_what_it_should(tiny_model):
    model = _peft_model(tiny_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / 100)
    _train_steps(model, optimizer, 1)
    scheduler.step()
    new = _grow_or_keep(model)
    M.rebuild_lora_layers(model, new, optimizer)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train_steps(model, optimizer, 1, seed=5)
    scheduler.step()
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.98)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    for name, layer in M.lora_layers(model).items():
        r_old = 4
        a, b = layer.lora_A[M.ADAPTER].weight, layer.lora_B[M.ADAPTER].weight
        a0 = trainable[[n for n in trainable if n.endswith(f"{name}.lora_A.default.weight")][0]]
        b0 = trainable[[n for n in trainable if n.endswith(f"{name}.lora_B.default.weight")][0]]
        assert not torch.equal(a[:r_old], a0[:r_old]) and not torch.equal(b[:, :r_old], b0[:, :r_old])
        if new[name] > r_old:  # added: B columns learn, A rows get no gradient while their B columns are 0
            assert torch.equal(a[r_old:], a0[r_old:])
            assert (b[:, r_old:] != 0).any()


def test_export_is_a_stock_peft_adapter(tiny_model, tmp_path):
    model = _peft_model(tiny_model)
    ranks = {n: max(1, r - 3 + 2 * (i % 4)) for i, (n, r) in
             enumerate((n, int(m.r[M.ADAPTER])) for n, m in M.lora_layers(model).items())}
    M.rebuild_lora_layers(model, ranks)
    batch = _batch()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert M.current_ranks(reloaded) == ranks
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-6, rtol=0)
        merged = reloaded.merge_and_unload()
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Scores.

@pytest.mark.parametrize("score", sorted(s for s, spec in M.SCORES.items() if spec.adapter is not None))
def test_score_variants(tiny_model, score):
    model = _peft_model(tiny_model)
    layers = M.lora_layers(model)
    hook = M.GloraHook(model, torch.optim.SGD(model.parameters(), lr=0.1), 48, warmup_steps=3, beta_ema=0.0,
                       score=score)
    expected = []
    for i, layer in enumerate(layers.values()):
        a, b = layer.lora_A[M.ADAPTER].weight, layer.lora_B[M.ADAPTER].weight
        a.grad = torch.full_like(a, 0.1 * (i + 1))
        b.grad = torch.full_like(b, -0.2)
        if score in ("grad_norm", "shuffled"):  # shuffled scores like grad_norm; it permutes at the allocation
            va, vb = a.grad.norm(), b.grad.norm()
        elif score == "grad_norm_per_param":
            va, vb = a.grad.norm() / math.sqrt(a.numel()), b.grad.norm() / math.sqrt(b.numel())
        else:
            va, vb = (a * a.grad).norm(), (b * b.grad).norm()
        expected.append(math.sqrt(va.item() ** 2 + vb.item() ** 2))
    hook.on_gradients(1)
    assert hook.ema.tolist() == pytest.approx(expected, rel=1e-5)


def test_score_ema_skips_non_finite_steps_and_treats_missing_grads_as_zero(tiny_model):
    model = _peft_model(tiny_model)
    hook = M.GloraHook(model, torch.optim.SGD(model.parameters(), lr=0.1), 48, warmup_steps=3, beta_ema=0.5)
    layers = list(M.lora_layers(model).values())
    for layer in layers:
        layer.lora_A[M.ADAPTER].weight.grad = None
        layer.lora_B[M.ADAPTER].weight.grad = torch.ones_like(layer.lora_B[M.ADAPTER].weight)
    hook.on_gradients(1)
    first = hook.ema.clone()
    assert first.tolist() == pytest.approx([0.5 * math.sqrt(layer.lora_B[M.ADAPTER].weight.numel())
                                            for layer in layers])
    layers[0].lora_B[M.ADAPTER].weight.grad[0, 0] = float("inf")
    hook.on_gradients(2)
    assert torch.equal(hook.ema, first)


def test_hook_reallocates_once_at_the_end_of_warm_up(tiny_model):
    model = _peft_model(tiny_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    hook = M.GloraHook(model, optimizer, total_rank_budget=40, warmup_steps=2)
    model.train()
    events = []
    for step in (1, 2, 3):
        model(**_batch(seed=step)).loss.backward()
        hook.on_gradients(step)
        optimizer.step()
        events.append(hook.on_optimizer_step(step))
        optimizer.zero_grad()
    assert events[0] is None and events[2] is None
    assert sum(events[1]["new_ranks"].values()) == 40 == sum(M.current_ranks(model).values())
    assert hook.n_updates == 2


# ---------------------------------------------------------------------------------------------------------------
# The AdaLoRA baseline's validation loss is the task loss, comparable with the other methods.

def test_adalora_validation_loss_excludes_the_orthogonal_regulariser(tiny_model):
    from src import preprocess as P
    from src import train as T

    torch.manual_seed(0)
    cfg = _glora_cfg(tiny_model)
    del cfg["glo_ra"]
    cfg.model.peft.type = "adalora"
    cfg.adalora = {"total_rank_budget": 24, "init_rank": 4, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5,
                   "adaptation_start_step": 2, "final_steps": 2, "mask_interval": 1}
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model = M.build_adapter(cfg, base, total_steps=10)
    batch = _batch()
    loader = [{**batch, "idx": torch.arange(len(batch["labels"]))}]
    _, spec = P.task_spec("glue_sst2")
    _, _, loss = T.evaluate_split(model, loader, spec, torch.device("cpu"), T.nullcontext)
    model.eval()
    with torch.no_grad():
        out = model(**batch)  # PEFT's loss: cross-entropy + orth_reg_weight x regulariser
        task_loss = torch.nn.functional.cross_entropy(out.logits, batch["labels"]).item()
    assert loss == pytest.approx(task_loss, rel=1e-6)
    assert out.loss.item() > task_loss + 1e-3


def test_adalora_mask_interval_below_one_is_refused_at_start_up(tiny_model):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    cfg = _glora_cfg(tiny_model)
    cfg.model.peft.type = "adalora"
    cfg.adalora = {"init_rank": 4, "total_rank_budget": 24, "adaptation_start_step": 2, "final_steps": 2,
                   "mask_interval": 1}
    M.check_budget(cfg, base, total_steps=10)  # feasible
    cfg.adalora.mask_interval = 0
    with pytest.raises(M.ModelError, match="mask_interval=0"):  # PEFT would divide by zero mid-training
        M.check_budget(cfg, base, total_steps=10)
