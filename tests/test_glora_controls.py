"""GLoRA made attributable: a fresh parameter's AdamW for added components, the parameter budget, the controls."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForSequenceClassification

from src import model as M
from tests.test_glora import _batch, _glora_cfg, _peft_model

# ---------------------------------------------------------------------------------------------------------------
# 1. Added components get the AdamW updates of a parameter created at the rebuild.


def _mlp_lora(seed=0):
    torch.manual_seed(seed)
    mlp = nn.Sequential()
    mlp.add_module("up", nn.Linear(16, 32))
    mlp.add_module("act", nn.Tanh())
    mlp.add_module("down", nn.Linear(32, 4))
    return get_peft_model(mlp, LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"]))


def _mlp_step(model, optimizer, scheduler, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


_TRAINED = {}


def _late_rebuild(exact_added: bool, steps_before: int = 1000, grow_to: int = 5):
    """A LoRA MLP trained `steps_before` AdamW steps (computed once per length), then grown to rank `grow_to`."""
    if steps_before not in _TRAINED:
        model = _mlp_lora()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 3000)
        for step in range(1, steps_before + 1):
            _mlp_step(model, optimizer, scheduler, step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        _TRAINED[steps_before] = (model, optimizer, scheduler)
    model, optimizer, scheduler = copy.deepcopy(_TRAINED[steps_before])
    M.rebuild_lora_layers(model, {n: grow_to for n in M.lora_layers(model)}, optimizer, exact_added=exact_added)
    return model, optimizer, scheduler


def _added_slices(model):
    out = {}
    for n, layer in M.lora_layers(model).items():
        out[n, "A"] = (layer.lora_A[M.ADAPTER].weight, 0)
        out[n, "B"] = (layer.lora_B[M.ADAPTER].weight, 1)
    return out


def _update_ratios(exact_added: bool, after: int = 100) -> dict[int, float]:
    """||update of the added slices|| / ||update a fresh torch AdamW parameter gets from the same gradients||."""
    model, optimizer, scheduler = _late_rebuild(exact_added)
    slices = _added_slices(model)
    fresh = {k: nn.Parameter(p.detach().narrow(d, 2, 3).clone()) for k, (p, d) in slices.items()}
    group = optimizer.param_groups[0]
    reference = torch.optim.AdamW(list(fresh.values()), lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                  weight_decay=group["weight_decay"])
    ratios = {}
    for k in range(1, after + 1):
        _mlp_step(model, optimizer, scheduler, 10_000 + k)
        before = {key: p.detach().narrow(d, 2, 3).clone() for key, (p, d) in slices.items()}
        for key, (p, d) in slices.items():
            fresh[key].grad = p.grad.narrow(d, 2, 3).clone()
            fresh[key].data.copy_(before[key])  # the same starting point each step: compare one update
        reference.param_groups[0]["lr"] = group["lr"]
        optimizer.step()
        reference.step()
        scheduler.step()
        optimizer.zero_grad()
        num = math.sqrt(sum((p.detach().narrow(d, 2, 3) - before[key]).square().sum().item()
                            for key, (p, d) in slices.items()))
        den = math.sqrt(sum((fresh[key].detach() - before[key]).square().sum().item() for key in slices))
        ratios[k] = num / den
    return ratios


def test_added_components_update_like_a_fresh_adamw_parameter_after_a_late_rebuild():
    ratios = _update_ratios(exact_added=True)
    assert all(r == pytest.approx(1.0, rel=1e-3) for r in ratios.values()), ratios


def test_without_the_correction_added_components_overshoot():
    """Control: the comparison above can fail; this was the behaviour before the correction."""
    ratios = _update_ratios(exact_added=False, after=20)
    assert ratios[10] > 2.0 and ratios[20] > 2.0, ratios


def test_kept_components_update_exactly_as_adamw_with_the_tensor_step():
    model, optimizer, scheduler = _late_rebuild(exact_added=True)
    _mlp_step(model, optimizer, scheduler, 20_000)
    group = optimizer.param_groups[0]
    before = {key: p.detach().narrow(d, 0, 2).clone() for key, (p, d) in _added_slices(model).items()}
    optimizer.step()
    beta1, beta2 = group["betas"]
    for key, (p, d) in _added_slices(model).items():
        state = optimizer.state[p]
        t = int(state["step"])
        m, v = state["exp_avg"].narrow(d, 0, 2), state["exp_avg_sq"].narrow(d, 0, 2)
        expected = before[key] * (1 - group["lr"] * group["weight_decay"]) - group["lr"] / (1 - beta1 ** t) * m / (
            v.sqrt() / math.sqrt(1 - beta2 ** t) + group["eps"])
        assert torch.allclose(p.detach().narrow(d, 0, 2), expected, rtol=1e-5, atol=1e-8)


def test_added_marks_survive_the_optimizer_state_dict_and_retire(tmp_path):
    model, optimizer, _ = _late_rebuild(exact_added=True, steps_before=20)
    marked = [p for p in optimizer.state if M.ADDED in optimizer.state[p]]
    assert len(marked) == 4  # A and B of both layers
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert sum(M.ADDED in s for s in loaded["state"].values()) == 4
    p = marked[0]
    optimizer.state[p][M.ADDED]["birth_step"] = int(optimizer.state[p]["step"]) - 100_000  # long ago
    p.grad = torch.zeros_like(p)
    optimizer.step()
    assert M.ADDED not in optimizer.state[p]


# ---------------------------------------------------------------------------------------------------------------
# 2. A parameter budget.

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e3, allow_nan=False), st.integers(2, 400)), min_size=1, max_size=60),
       st.integers(1, 2), st.floats(0, 1), st.data())
def test_parameter_budget_is_met_from_below_within_the_cheapest_rank(items, min_rank, fill, data):
    names = [f"m{i:02d}" for i in range(len(items))]
    scores = {n: g for n, (g, _) in zip(names, items)}
    costs = {n: c for n, (_, c) in zip(names, items)}
    caps = {n: data.draw(st.integers(min_rank, min_rank + 40)) for n in names}
    low, high = sum(min_rank * c for c in costs.values()), sum(caps[n] * costs[n] for n in names)
    total = int(low + fill * (high - low))
    ranks = M.allocate_ranks(scores, total, min_rank, caps, costs)
    spent = sum(ranks[n] * costs[n] for n in names)
    assert all(min_rank <= ranks[n] <= caps[n] for n in names)
    assert spent <= total
    growable = [costs[n] for n in names if ranks[n] < caps[n]]
    assert not growable or total - spent < min(growable)


def test_parameter_budget_keeps_ranks_proportional_to_scores():
    scores = {"attn": 1.0, "ffn": 2.0, "other": 4.0}
    costs = {"attn": 768, "ffn": 1920, "other": 768}
    budget = 8 * sum(costs.values())
    ranks = M.allocate_ranks(scores, budget, 1, None, costs)
    lam = budget / sum(scores[n] * costs[n] for n in scores)  # r_k = lam * g_k before rounding (no bound binds)
    assert all(abs(ranks[n] - lam * scores[n]) < 1 for n in scores), (ranks, lam)
    assert budget - min(costs.values()) < sum(ranks[n] * costs[n] for n in costs) <= budget


def test_parameter_budget_infeasible_is_an_error():
    costs = {"a": 10, "b": 20}
    with pytest.raises(ValueError, match="parameter budget 29 is infeasible"):
        M.allocate_ranks({"a": 1, "b": 1}, 29, 1, None, costs)  # min_rank 1 costs 30
    with pytest.raises(ValueError, match="infeasible"):
        M.allocate_ranks({"a": 1, "b": 1}, 1000, 1, 4, costs)  # max 4 ranks each: 120


def test_check_budget_params_unit(tiny_model):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    M.check_budget(_glora_cfg(tiny_model, budget_unit="params", total_rank_budget="uniform"), base, total_steps=10)
    with pytest.raises(M.ModelError, match=r"total_rank_budget=100 adapter parameters \(budget_unit=params\) is "
                                           r"infeasible: it must lie in \[min_rank \(1\)"):
        M.check_budget(_glora_cfg(tiny_model, budget_unit="params", total_rank_budget=100), base, total_steps=10)
    with pytest.raises(M.ModelError, match="budget_unit='layers'"):
        M.check_budget(_glora_cfg(tiny_model, budget_unit="layers"), base, total_steps=10)


def _warm_up_and_reallocate(tiny_model, score="grad_norm", seed=0, steps=3, **hook_kwargs):
    model = _peft_model(tiny_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    budget = hook_kwargs.pop("total_rank_budget", 48)
    hook = M.GloraHook(model, optimizer, budget, warmup_steps=steps, score=score, seed=seed, **hook_kwargs)
    model.train()
    for step in range(1, steps + 1):
        model(**_batch(seed=step)).loss.backward()
        hook.on_gradients(step)
        optimizer.step()
        event = hook.on_optimizer_step(step)
        optimizer.zero_grad()
    return model, hook, event


def test_equal_parameter_glora_spends_uniform_loras_parameters(tiny_model):
    uniform = M.parameter_counts(_peft_model(tiny_model))["adapter_params"]
    costs = M.rank_costs(_peft_model(tiny_model).base_model.model, list(M.lora_layers(_peft_model(tiny_model))))
    model, hook, event = _warm_up_and_reallocate(tiny_model, budget_unit="params", total_rank_budget=uniform)
    after = M.parameter_counts(model)["adapter_params"]
    assert uniform - min(costs.values()) < after <= uniform
    assert event["budget_unit"] == "params" and event["adapter_params_after"] == after


# ---------------------------------------------------------------------------------------------------------------
# 3. Controls.

def test_shuffled_has_grad_norms_rank_histogram_at_other_places(tiny_model):
    _, _, real = _warm_up_and_reallocate(tiny_model, "grad_norm", seed=3)
    _, _, shuffled = _warm_up_and_reallocate(tiny_model, "shuffled", seed=3)
    assert shuffled["scores"] == pytest.approx(real["scores"])  # the run's real EMA scores...
    assert sorted(shuffled["new_ranks"].values()) == sorted(real["new_ranks"].values())  # ...the same histogram
    assert shuffled["new_ranks"] != real["new_ranks"]  # ...placed differently
    assert sorted(shuffled["permutation"]) == sorted(real["new_ranks"])
    _, _, again = _warm_up_and_reallocate(tiny_model, "shuffled", seed=3)
    _, _, other = _warm_up_and_reallocate(tiny_model, "shuffled", seed=4)
    assert again["new_ranks"] == shuffled["new_ranks"]  # the permutation comes from the run's seed
    assert other["permutation"] != shuffled["permutation"]


def _full_weight_gradient_norms(model, batches) -> list[float]:
    """Reference: autograd's gradient of each adapted matrix's frozen weight, summed over the micro-batches."""
    model = copy.deepcopy(model)
    layers = M.lora_layers(model)
    for layer in layers.values():
        layer.get_base_layer().weight.requires_grad_(True)
    model.train()
    for i, batch in enumerate(batches):
        torch.manual_seed(i)  # the same dropout masks as the run under test
        model(**batch).loss.backward()
    return [layer.get_base_layer().weight.grad.norm().item() for layer in layers.values()]


def test_delta_grad_is_the_norm_of_the_full_weight_gradient(tiny_model):
    model = _peft_model(tiny_model)
    batches = [_batch(seed=1), _batch(seed=2)]  # two micro-batches of one optimizer step
    expected = _full_weight_gradient_norms(model, batches)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    hook = M.GloraHook(model, optimizer, 48, warmup_steps=2, beta_ema=0.0, score="delta_grad", micro_batches=2)
    model.train()
    for i, batch in enumerate(batches):
        torch.manual_seed(i)
        model(**batch).loss.backward()
    hook.on_gradients(1)
    assert hook.ema.tolist() == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():  # evaluation leaves nothing behind
        model.eval()
        model(**_batch(seed=3))
    assert hook._weights.sums == {}


def _delta_grad_setup(tiny_model, batch):
    """The full-weight gradient norms of `batch`, and a fresh adapted model with a delta_grad hook (one micro-batch
    per step), in training mode and seeded."""
    expected = _full_weight_gradient_norms(_peft_model(tiny_model), [batch])
    model = _peft_model(tiny_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    hook = M.GloraHook(model, optimizer, 48, warmup_steps=2, beta_ema=0.0, score="delta_grad")
    model.train()
    torch.manual_seed(0)
    return expected, model, hook


def test_delta_grad_with_one_micro_batch_holds_norms_not_weight_sized_sums(tiny_model):
    """One micro-batch per step: the norm is taken in the backward hook, the same value as from a held sum."""
    batch = _batch(seed=1)
    expected, model, hook = _delta_grad_setup(tiny_model, batch)
    model(**batch).loss.backward()
    assert hook._weights.sums and all(t.shape == () for t in hook._weights.sums.values())
    hook.on_gradients(1)
    assert hook.ema.tolist() == pytest.approx(expected, rel=1e-4)
    model(**batch).loss.backward()
    with pytest.raises(AssertionError, match="second micro-batch"):  # two micro-batches need micro_batches=2
        model(**batch).loss.backward()


def test_delta_grad_under_bf16_autocast_multiplies_in_bf16(tiny_model):
    """Under bf16 autocast the extra product runs in bfloat16 (float32 accumulation): norms within bf16 rounding."""
    batch = _batch(seed=1)
    expected, model, hook = _delta_grad_setup(tiny_model, batch)
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append((a.dtype, b.dtype))
        return real_matmul(a, b)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "__matmul__", spy)
        loss.backward()
    hook.on_gradients(1)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert hook.ema.dtype == torch.float32
    assert hook.ema.tolist() == pytest.approx(expected, rel=0.05)


def test_delta_grad_stops_after_warm_up(tiny_model):
    model, hook, event = _warm_up_and_reallocate(tiny_model, "delta_grad", steps=2)
    assert event is not None and hook._weights.handles == []
    layers = M.lora_layers(model)
    assert all(not layer._forward_hooks for layer in layers.values())


def test_delta_grad_refuses_gradient_checkpointing(tiny_model):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    cfg = _glora_cfg(tiny_model, score="delta_grad")
    cfg.training = {"gradient_checkpointing": True}
    with pytest.raises(M.ModelError, match="gradient_checkpointing"):
        M.check_budget(cfg, base, total_steps=10)
