"""The sequential design of bench/study.py --until-decided: the spending function, one look's verdicts, and by
simulation on known truth that its looks keep the error of a wrong verdict at or below alpha (and that the fixed
design read at every look does not)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from src import evaluate as E
from tests.test_evaluate import study, t_interval, verdicts

ALPHA = 0.05
SIMS = 20_000  # simulated studies; Monte-Carlo sd of a rate near alpha: sqrt(0.05 * 0.95 / 20000) = 0.0015
TOLERANCE = 3 * np.sqrt(ALPHA * (1 - ALPHA) / SIMS)


@pytest.mark.parametrize("spending", list(E.SPENDING_NAMES))
def test_spending_function_spends_nothing_at_zero_alpha_at_one_and_grows(spending):
    t = np.linspace(0, 1, 101)
    spent = E.alpha_spent(t, ALPHA, spending)
    assert spent[0] == 0.0 and E.alpha_spent(0.0, ALPHA, spending) == 0.0
    assert E.alpha_spent(1.0, ALPHA, spending) == pytest.approx(ALPHA, rel=1e-12)
    assert np.all(np.diff(spent) > 0) and np.all(spent <= ALPHA + 1e-15)
    looks = E.look_alphas(5, 10, ALPHA, spending)
    assert list(looks) == [5, 6, 7, 8, 9, 10]
    assert sum(v["alpha_this_look"] for v in looks.values()) == pytest.approx(ALPHA, rel=1e-12)
    assert looks[5]["alpha_this_look"] == looks[5]["alpha_spent"] == pytest.approx(E.alpha_spent(0.5, ALPHA, spending))
    assert E.look_alphas(10, 10, ALPHA, spending)[10]["alpha_this_look"] == pytest.approx(ALPHA)  # one look: fixed


def test_obrien_fleming_spends_little_early_pocock_evenly():
    """Lan & DeMets 1983: the O'Brien-Fleming-type function at t = 0.5 is 2 - 2Φ(z_0.975 √2) ≈ 0.0056; Pocock's
    α·ln(1 + (e - 1)/2) ≈ 0.0310."""
    assert E.alpha_spent(0.5, ALPHA) == pytest.approx(2 * stats.norm.sf(stats.norm.isf(ALPHA / 2) * np.sqrt(2)))
    assert E.alpha_spent(0.5, ALPHA) == pytest.approx(0.00557, abs=1e-5)
    assert E.alpha_spent(0.5, ALPHA, "pocock") == pytest.approx(0.03101, abs=1e-5)
    with pytest.raises(ValueError, match="spending='nope'"):
        E.alpha_spent(0.5, ALPHA, "nope")


@pytest.mark.parametrize("sequential, message", [
    ({"look_n": 4, "first_look": 5, "max_seeds": 10}, "2 <= first_look <= look_n <= max_seeds"),
    ({"look_n": 6, "max_seeds": 10}, "must be null or"),
    ({"look_n": 6, "first_look": 5, "max_seeds": 10, "seeds": 3}, "must be null or"),
    ({"look_n": 6.0, "first_look": 5, "max_seeds": 10}, "integers"),
    ({"look_n": 6, "first_look": 5, "max_seeds": 10, "spending": "linear"}, "spending='linear'"),
])
def test_sequential_settings_are_checked(sequential, message):
    with pytest.raises(E.EvaluationError, match=message):
        E.load_settings({"statistics": {"sequential": sequential}})


def test_a_look_reads_its_verdicts_at_the_spent_increment_and_records_it():
    """Look 2 of 6 (6 seeds of at most 10, first look at 5): H1's interval is the t-interval at 1 - (α(0.6) - α(0.5));
    +0.95 points with sd 0.1 is supported at 95% and still at that level; every entry records the look."""
    records = study(0.0095, 0.001)
    fixed = verdicts(E.aggregate(records), "H1")["sst2"]
    assert fixed["sequential"] is None and fixed["confidence"] == 0.95
    settings = E.load_settings({"statistics": {"sequential": {"look_n": 6, "first_look": 5, "max_seeds": 10}}})
    agg = E.aggregate(records, settings)
    level = E.look_alphas(5, 10, ALPHA)[6]
    h1 = verdicts(agg, "H1")["sst2"]
    assert h1["confidence"] == pytest.approx(1 - level["alpha_this_look"]) and h1["status"] == "supported"
    assert h1["ci"] == pytest.approx(t_interval(0.0095, 0.001, 6, 1 - level["alpha_this_look"]), abs=1e-12)
    assert h1["ci"][0] < fixed["ci"][0] and h1["ci"][1] > fixed["ci"][1]
    assert all(e["sequential"] == {**h1["sequential"]} for e in agg["hypotheses"])
    seq = h1["sequential"]
    assert (seq["look"], seq["looks_planned"], seq["n"], seq["max_seeds"], seq["spending"]) == (2, 6, 6, 10,
                                                                                                 "obrien-fleming")
    assert seq["alpha_this_look"] == level["alpha_this_look"] and seq["alpha_spent"] == level["alpha_spent"]
    report = E.report_markdown(agg)
    assert "Sequential design, look 2 of at most 6: n = 6 seeds" in report and "Lan & DeMets 1983" in report
    assert "Sequential design" not in E.report_markdown(E.aggregate(records))


def looks_verdicts(diffs: np.ndarray, first_look: int, margin: float, levels: dict[int, float]) -> tuple:
    """Vectorised H1 rule over simulated studies: (supported, contradicted), each (studies, looks) booleans, from the
    paired t-interval of the first n seeds' differences at confidence levels[n] (judge_h1's interval and status)."""
    n = np.arange(first_look, diffs.shape[1] + 1)
    cum, cum2 = np.cumsum(diffs, axis=1), np.cumsum(diffs ** 2, axis=1)
    s1, s2 = cum[:, n - 1], cum2[:, n - 1]
    mean = s1 / n
    sd = np.sqrt((s2 - n * mean ** 2) / (n - 1))
    half = stats.t.ppf((1 + np.array([levels[k] for k in n])) / 2, n - 1) * sd / np.sqrt(n)
    return mean - half >= margin, mean + half < margin


def test_vectorised_rule_is_judge_h1():
    """The simulation below reads exactly the intervals and statuses judge_h1 gives, look by look."""
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.005, 0.004, size=(3, 10))
    levels = {n: 1 - a["alpha_this_look"] for n, a in E.look_alphas(5, 10, ALPHA).items()}
    supported, contradicted = looks_verdicts(diffs, 5, 0.005, levels)
    for i in range(3):
        for j, n in enumerate(range(5, 11)):
            judged = E.judge_h1({s: (d, 0.0) for s, d in enumerate(diffs[i, :n])}, 0.005, levels[n])
            assert judged["status"] == ("supported" if supported[i, j] else "contradicted" if contradicted[i, j]
                                        else "undecided")


@pytest.mark.parametrize("spending", list(E.SPENDING_NAMES))
def test_sequential_looks_keep_wrong_verdicts_at_or_below_alpha(spending):
    """20,000 studies of 5 to 10 seeds, the per-seed difference normal with its true mean exactly at the margin, half
    an sd below it and half an sd above. A wrong verdict at any look (so whatever rule stops the study): at the margin
    either status (each end's test has its null true), below it "supported", above it "contradicted". The spent
    increments keep each at or below alpha (α/2 at each end); the fixed 95% interval read at every look exceeds it."""
    rng = np.random.default_rng(2024)
    first, most, margin, sd = 5, 10, 0.005, 0.004
    sequential = {n: 1 - a["alpha_this_look"] for n, a in E.look_alphas(first, most, ALPHA, spending).items()}
    fixed = {n: 1 - ALPHA for n in sequential}
    noise = rng.standard_normal((SIMS, most)) * sd

    supported, contradicted = looks_verdicts(margin + noise, first, margin, sequential)
    wrong = (supported | contradicted).any(axis=1).mean()
    assert wrong <= ALPHA + TOLERANCE, wrong
    assert supported.any(axis=1).mean() <= ALPHA / 2 + TOLERANCE and contradicted.any(axis=1).mean() <= ALPHA / 2 \
        + TOLERANCE
    below, _ = looks_verdicts(margin - sd / 2 + noise, first, margin, sequential)
    _, above = looks_verdicts(margin + sd / 2 + noise, first, margin, sequential)
    assert below.any(axis=1).mean() <= ALPHA / 2 + TOLERANCE and above.any(axis=1).mean() <= ALPHA / 2 + TOLERANCE

    naive_s, naive_c = looks_verdicts(margin + noise, first, margin, fixed)
    naive = (naive_s | naive_c).any(axis=1).mean()
    assert naive > ALPHA + TOLERANCE, naive  # the test can fail: looking six times at 95% errs more than 5%

    # and the design still decides: a true gain 1.5 sd above the margin is supported by 10 seeds in most studies,
    # many of them before the last look
    big, _ = looks_verdicts(margin + 1.5 * sd + noise, first, margin, sequential)
    assert big.any(axis=1).mean() > 0.8 and big[:, :-1].any(axis=1).mean() > 0.4


def test_one_look_through_evaluates_command_line_reads_only_its_seeds(tmp_path):
    """bench/study.py's arguments for look 1 (seeds 0..4 of at most 8): src.evaluate's command line takes only those
    seeds' runs, even with a later seed finished (5) and one still training (6: no summary.json), and records the
    look."""
    from tests.test_bench import load_study_bench
    from tests.test_evaluate import METHODS, run_id

    for rec in study(0.0095, 0.001):  # seeds 0..5, the folders holding just what evaluate needs: summary.json
        rid = run_id(rec.summary["method_name"])
        (tmp_path / f"{rid}-seed{rec.summary['seed']}").mkdir()
        (tmp_path / f"{rid}-seed{rec.summary['seed']}" / "summary.json").write_text(
            json.dumps({**rec.summary, "run_id": rid, "status": "finished"}))
    (tmp_path / f"{run_id('GLoRA')}-seed6").mkdir()
    (tmp_path / f"{run_id('GLoRA')}-seed6" / "config.yaml").write_text(f"run_id: {run_id('GLoRA')}\n")
    bench = load_study_bench()
    args = bench.parse_args(["--seeds", "0", "1", "2", "3", "4", "--until-decided", "--max-seeds", "8"])
    look = bench.look_overrides([0, 1, 2, 3, 4], args)
    ids = f"run_ids={json.dumps([run_id(m) for m in METHODS])}"
    results_dir, run_ids, skip_bad, settings, seeds = E.parse_args([f"results_dir={tmp_path}", ids, *look])
    assert seeds == [0, 1, 2, 3, 4] and not skip_bad
    assert E.resolve_run_names(tmp_path, run_ids, E.WandbSource())[1]  # every seed: seed 6's run is still training
    records = E.load_runs(results_dir, run_ids, skip_bad, E.WandbSource(), seeds)
    agg = E.aggregate(records, settings)
    assert sorted({r["seed"] for r in agg["runs"]}) == [0, 1, 2, 3, 4]
    h1 = verdicts(agg, "H1")["sst2"]
    level = E.look_alphas(5, 8, ALPHA)[5]
    assert h1["n"] == 5 and h1["confidence"] == pytest.approx(1 - level["alpha_this_look"])
    assert h1["sequential"]["look"] == 1 and h1["sequential"]["max_seeds"] == 8
    assert agg["settings"]["statistics"]["sequential"] == {"look_n": 5, "first_look": 5, "max_seeds": 8,
                                                           "spending": "obrien-fleming"}
    with pytest.raises(E.EvaluationError, match="seeds must be a non-empty list of integers"):
        E.parse_args([f"results_dir={tmp_path}", ids, "seeds=42"])


def test_a_verdict_decided_at_an_earlier_look_is_kept_and_recomputed_from_the_runs():
    """GLoRA − LoRA: +1.5 points on seeds 0–2 (sd 0.01), then −3 points on seed 3. Look 1 (n = 3 of at most 6)
    supports H1; look 2 alone reads undecided, and evaluate, recomputing look 1 from the same runs, keeps the
    decision (status supported, decided at look 1, this look's reading recorded); the fixed design reads undecided."""
    from tests.test_evaluate import score_record

    diffs = [0.0150, 0.0151, 0.0149, -0.0300]
    records = [rec for s, d in enumerate(diffs) for rec in (
        score_record("LoRA", "sst2", s, 0.80), score_record("GLoRA", "sst2", s, 0.80 + d),
        score_record("AdaLoRA", "sst2", s, 0.81))]

    def look(n: int) -> dict:
        settings = E.load_settings({"statistics": {"sequential": {"look_n": n, "first_look": 3, "max_seeds": 6}}})
        return verdicts(E.aggregate([r for r in records if r.summary["seed"] < n], settings), "H1")["sst2"]

    first, second = look(3), look(4)
    assert first["status"] == "supported" and "status_this_look" not in first
    assert first["sequential_decision"] == {"status": "supported", "look": 1, "n": 3}
    assert second["status"] == "supported" and second["status_this_look"] == "undecided"
    assert second["sequential_decision"] == {"status": "supported", "look": 1, "n": 3}
    assert second["ci"][0] < 0.005 < second["ci"][1]  # the look's own interval, as computed
    assert verdicts(E.aggregate(records), "H1")["sst2"]["status"] == "undecided"
    assert "sequential_decision" not in verdicts(E.aggregate(records), "H1")["sst2"]
    line = E.verdict_line(second)
    assert "→ **supported**" in line and "decided at look 1 (n = 3), kept: this look alone reads undecided" in line


def test_seeds_needed_in_a_sequential_design_is_the_first_look_that_decides_at_its_own_level():
    """At look n the interval is read at 1 - alpha_this_look(n) (÷ the family per task): the answer is the first
    look whose own interval excludes the margin with the power, and past the design's last look none does."""
    from statsmodels.stats.power import TTestPower

    looks = {n: 1 - a["alpha_this_look"] for n, a in E.look_alphas(5, 12, ALPHA).items()}

    def chance(n: int, effect: float) -> float:
        return TTestPower().power(effect_size=effect, nobs=n, alpha=(1 - looks[n]) / 2, alternative="larger")

    got = E.seeds_to_decide([{"estimate": 0.015, "sd": 0.006, "bounds": [0.005]}], looks, 0.8)
    n = got["n"]
    assert chance(n, 0.01 / 0.006) >= 0.8 and all(chance(k, 0.01 / 0.006) < 0.8 for k in looks if k < n)
    assert got["level"] == looks[n] and got["looks"] == {"first": 5, "max_seeds": 12}
    assert n > E.seeds_needed(0.015, 0.006, [0.005], 0.95, 0.8)["n"]  # each look's level is above 95%
    far = E.seeds_to_decide([{"estimate": 0.012, "sd": 0.006, "bounds": [0.005]}], looks, 0.8)  # 0.79 at 12
    assert far["n"] is None and far["reason"].startswith("not decidable within the design: no look up to its 12")
    # an entry of a sequential look carries it, per task at its family's share
    settings = E.load_settings({"statistics": {"sequential": {"look_n": 6, "first_look": 5, "max_seeds": 12}}})
    records = study(0.015, 0.006, n=6, tasks=("sst2", "cola"))  # +1.5 points, sd 0.6: undecided at look 2
    e = verdicts(E.aggregate(records, settings), "H1")["sst2"]
    per_task = {n: 1 - a["alpha_this_look"] / 2 for n, a in E.look_alphas(5, 12, ALPHA).items()}
    want = E.seeds_to_decide(e["scales"], per_task, 0.8)
    assert e["status"] == "undecided" and e["seeds_needed"]["n"] == want["n"] == 10
    assert e["seeds_needed"]["level"] == per_task[10] and e["seeds_needed"]["looks"]["max_seeds"] == 12
    assert "seeds to decide at a look of this design, at its level (prospective" in E.verdict_line(e)
    # only the looks still to come: at the design's last look there is none
    last = E.load_settings({"statistics": {"sequential": {"look_n": 6, "first_look": 5, "max_seeds": 6}}})
    e = verdicts(E.aggregate(records, last), "H1")["sst2"]
    assert e["status"] == "undecided" and e["seeds_needed"]["n"] is None
    assert e["seeds_needed"]["reason"] == "not decidable within the design: this was its last look"


def test_a_look_whose_runs_lack_a_seed_is_an_error():
    """A look's earlier looks are its first seeds: with a seed's runs missing (skip_bad) they would shift."""
    settings = E.load_settings({"statistics": {"sequential": {"look_n": 6, "first_look": 5, "max_seeds": 8}}})
    records = [r for r in study(0.0095, 0.001) if r.summary["seed"] != 2]
    with pytest.raises(E.EvaluationError, match=r"look_n=6 but the runs have 5 seeds"):
        E.aggregate(records, settings)


def test_seeds_needed_for_two_conditions_holds_the_power_jointly():
    """H2 needs two intervals to exclude their bounds at once: P(both) >= P1 + P2 - 1, so the answer is at least
    the larger single answer and, by simulation of two independent conditions, reaches the power jointly."""
    a = {"estimate": 0.008, "sd": 0.010, "bounds": [0.0]}  # each 0.8 sd above its bound
    b = {"estimate": 0.12, "sd": 0.15, "bounds": [0.0]}
    both = E.seeds_to_decide([a, b], 0.95, 0.8)
    single = max(E.seeds_needed(c["estimate"], c["sd"], c["bounds"], 0.95, 0.8)["n"] for c in (a, b))
    assert both["n"] > single
    rng = np.random.default_rng(3)

    def excludes(c: dict, n: int, draws: int = 20000) -> np.ndarray:
        x = rng.normal(c["estimate"], c["sd"], (draws, n))
        half = stats.t.ppf(0.975, n - 1) * x.std(axis=1, ddof=1) / np.sqrt(n)
        return x.mean(axis=1) - half > c["bounds"][0]

    assert (excludes(a, both["n"]) & excludes(b, both["n"])).mean() >= 0.8
    assert (excludes(a, single) & excludes(b, single)).mean() < 0.8  # the larger single answer falls short
