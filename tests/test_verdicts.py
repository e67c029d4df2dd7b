"""dictlearn.analysis.statistics and .verdicts: interpolation at matched L0 against a closed form, the
paired t-test and Holm against hand-worked float64 numbers, A/A simulations of the family-wise
false-positive rate through `build_verdicts`, A/B with a true gap, and bad input that must be
named, not crash."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from dictlearn.analysis.statistics import (
    ALPHA, common_l0, holm, interpolate_at_l0, off_target, paired_test,
)  # fmt: skip
from dictlearn.analysis.verdicts import DIRECTIONS, build_verdicts, sentence
from dictlearn.metrics.bootstrap import ratio_se
from dictlearn.errors import ConfigError

TARGETS = (8.0, 16.0, 32.0)


# --- L0 matched in fact -------------------------------------------------------------------------


def test_interpolation_is_exact_for_a_curve_linear_in_log_l0_and_never_extrapolates():
    a, b = 0.4, -0.07
    l0s = np.array([30.0, 7.0, 15.0])  # any order
    at = np.array([7.0, 10.0, 20.0, 30.0, 6.9, 31.0])
    got = interpolate_at_l0(l0s, a + b * np.log(l0s), at)
    np.testing.assert_allclose(got[:4], a + b * np.log(at[:4]), rtol=0, atol=1e-15)
    assert np.isnan(got[4:]).all()  # below the lowest and above the highest measured L0: not reached
    # Linear in L0 itself would give a different number between the points (catches a missing log).
    assert abs(got[1] - np.interp(10.0, [7.0, 15.0], a + b * np.log([7.0, 15.0]))) > 1e-3


def test_interpolation_drops_bad_points_and_averages_repeated_l0s():
    l0s = [8.0, 8.0, 16.0, np.nan, -1.0, 32.0]
    values = [1.0, 3.0, 4.0, 9.0, 9.0, np.nan]
    got = interpolate_at_l0(l0s, values, [8.0, math.sqrt(8 * 16), 16.0, 20.0])
    np.testing.assert_allclose(got[:3], [2.0, 3.0, 4.0])  # 16 is the highest usable point (32 has NaN)
    assert np.isnan(got[3])
    assert np.isnan(interpolate_at_l0([], [], 8.0)).all()
    single = interpolate_at_l0([8.0], [0.5], [8.0, 8.1])
    assert single[0] == 0.5 and np.isnan(single[1])


def test_common_l0_hand_worked():
    # JumpReLU's default-run shape: short at both ends; TopK exactly on its targets.
    a, b = [[7.7, 15.5, 26.6]], [[8.0, 16.0, 32.0]]
    np.testing.assert_allclose(common_l0(a, b, TARGETS), [8.0, math.sqrt(15.5 * 16.0), 26.6], rtol=1e-12)
    # Two seeds: the range every seed reaches is the intersection (8.2 .. 30).
    got = common_l0([[7.7, 15.5, 30.0], [8.2, 16.4, 33.0]], [[8.0, 16.0, 32.0], [8.0, 16.0, 32.0]], TARGETS)
    np.testing.assert_allclose(got, [8.2, math.exp(np.mean(np.log([15.5, 16.4, 16.0, 16.0]))), 30.0])
    # a stops at 17: target 32's nearest shared L0 is 17, nearer target 16 (edge 22.6): not reached.
    got = common_l0([[8.0, 17.0, np.nan]], [[8.0, 16.0, 32.0]], TARGETS)
    assert got[1] == pytest.approx(math.sqrt(17.0 * 16.0)) and np.isnan(got[2])
    # Single points that differ share no L0; equal single points do.
    assert np.isnan(common_l0([[8.0]], [[8.4]], [8.0])).all()
    assert common_l0([[8.0]], [[8.0]], [8.0])[0] == 8.0


def test_off_target_flags_misses_beyond_five_percent():
    np.testing.assert_array_equal(off_target([8.3, 8.5, 7.7, 7.5, 26.6], [8, 8, 8, 8, 32]),
                                  [False, True, False, True, True])


# --- The paired test and Holm -------------------------------------------------------------------


def _t2_p(t: float) -> float:
    """Two-sided p of Student's t with 2 degrees of freedom, closed form: 1 − |t| / sqrt(2 + t²)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def _t2_quantile(q: float) -> float:
    """Inverse CDF of t with 2 degrees of freedom: (2q − 1)·sqrt(2 / (1 − (2q − 1)²))."""
    c = 2 * q - 1
    return c * math.sqrt(2 / (1 - c * c))


def test_paired_t_against_closed_forms():
    d = np.array([[1.0, 2.0, 3.0]])  # mean 2, sample variance 1, n 3
    got = paired_test(d)
    t = 2 / math.sqrt(1 / 3)
    assert got["t"][0] == pytest.approx(t, rel=1e-12) and got["df"][0] == 2
    assert got["p"][0] == pytest.approx(_t2_p(t), rel=1e-10)
    half = _t2_quantile(0.975) * math.sqrt(1 / 3)
    assert [got["low"][0], got["high"][0]] == pytest.approx([2 - half, 2 + half], rel=1e-10)
    # Evaluation errors 0.3, 0.4, 0.5 add mean(e²) = 0.5/3: SE² = 1/3 + 0.5/3 = 0.5.
    got = paired_test(d, [[0.3, 0.4, 0.5]])
    assert got["t"][0] == pytest.approx(2 / math.sqrt(0.5), rel=1e-12)
    assert got["p"][0] == pytest.approx(_t2_p(2 / math.sqrt(0.5)), rel=1e-10)
    assert got["high"][0] - got["mean"][0] == pytest.approx(_t2_quantile(0.975) * math.sqrt(0.5), rel=1e-10)
    # Two seeds: t with 1 degree of freedom is Cauchy, p = 1 − (2/π)·atan|t|.
    got = paired_test([[0.5, 1.5]])
    assert got["p"][0] == pytest.approx(1 - 2 / math.pi * math.atan(1.0 / 0.5), rel=1e-10)


def test_paired_t_rows_match_scipy_ttest_rel_with_padding():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    sizes = [5, 4, 3, 2, 5, 3]
    d = np.full((6, 5), np.nan)
    for i, n in enumerate(sizes):
        d[i, :n] = a[i, :n] - b[i, :n]
    got = paired_test(d)
    for i, n in enumerate(sizes):
        reference = stats.ttest_rel(a[i, :n], b[i, :n])
        assert got["t"][i] == pytest.approx(reference.statistic, rel=1e-10)
        assert got["p"][i] == pytest.approx(reference.pvalue, rel=1e-9)
        assert got["n"][i] == n


def test_paired_t_cannot_test_one_seed_or_no_spread():
    got = paired_test([[0.3, np.nan, np.nan], [0.2, 0.2, 0.2], [np.nan] * 3])
    assert np.isnan(got["p"]).all() and np.isnan(got["low"]).all()
    assert got["mean"][0] == 0.3 and got["n"].tolist() == [1, 3, 0] and np.isnan(got["mean"][2])


def test_holm_hand_worked():
    # Sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max.
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    got = holm([0.01, np.nan, 0.04])  # NaN (untested) is not counted: m = 2
    np.testing.assert_allclose(got[[0, 2]], [0.02, 0.04]) and np.isnan(got[1])
    np.testing.assert_allclose(holm([0.3, 0.6]), [0.6, 0.6])  # capped at 1 only above 1
    assert holm([0.7, 0.9]).tolist() == [1.0, 1.0] and holm([]).size == 0


# --- Evaluation noise ---------------------------------------------------------------------------


def test_bootstrap_se_matches_the_plug_in_standard_error():
    """The document bootstrap whose errors the verdicts add (dictlearn.metrics.bootstrap.ratio_se)."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=400)
    ones = np.ones(400)
    expected = values.std(ddof=0) / math.sqrt(values.size)  # the bootstrap's target: plug-in SD / sqrt(n)
    got = ratio_se(values, ones, n_boot=5000, seed=1)
    assert got == pytest.approx(expected, rel=0.05)
    # Weighted (a ratio of sums, as FVU is): the linearisation sqrt(Σ w²(v − v̄)²) / Σ w.
    weights = rng.uniform(1, 10, size=400)
    mean = (weights * values).sum() / weights.sum()
    expected = math.sqrt(((weights * (values - mean)) ** 2).sum()) / weights.sum()
    assert ratio_se(weights * values, weights, n_boot=5000, seed=2) == pytest.approx(expected, rel=0.05)
    two = ratio_se(np.stack([values, 3 * values], axis=1), np.ones((400, 2)), n_boot=2000, seed=3)
    assert two.shape == (2,) and two[1] == pytest.approx(3 * two[0], rel=1e-12)
    assert np.isnan(ratio_se([1.0], [1.0])) and ratio_se(values, ones, seed=5) == ratio_se(values, ones, seed=5)


# --- Through build_verdicts: A/A, A/B ----------------------------------------------------------


def _lines(rng, gaps: dict[str, float], seeds=3, document_sd=0.0, se=None, l0_scale=None) -> list[dict]:
    """Results lines of architectures whose FVU follows one power law in L0 (plus `gaps`), and
    whose CE loss recovered and KL are linear in log L0. Seed s shares its batches (one effect)
    across architectures; `document_sd` is an evaluation error shared by every seed (the same
    held-out documents), recorded as `<metric>_se` = `se`."""
    names, targets = list(gaps), np.array(TARGETS)
    shape = (len(names), seeds, len(targets))
    scale = np.array([(l0_scale or {}).get(n, 1.0) for n in names])[:, None, None]
    l0 = targets * scale * np.exp(rng.normal(0, 0.04, shape))
    gap = np.array([gaps[n] for n in names])[:, None, None]
    curves = {"fvu": 0.6 * l0**-0.5, "ce_loss_recovered": 0.7 + 0.05 * np.log(l0), "kl_div": 0.5 - 0.1 * np.log(l0)}
    sign = {"fvu": 1, "ce_loss_recovered": -1, "kl_div": 1}
    values = {}
    for metric, curve in curves.items():
        effect = (rng.normal(0, 0.02, (1, seeds, 1)) + rng.normal(0, 0.004, (len(names), seeds, 1))
                  + rng.normal(0, 0.002, shape) + rng.normal(0, 1, (len(names), 1, len(targets))) * document_sd)
        values[metric] = curve + sign[metric] * gap + effect
    lines = []
    for i, j, k in np.ndindex(shape):
        line = {"architecture": names[i], "seed": j, "l0_target": targets[k], "l0": l0[i, j, k]}
        for metric in curves:
            line[metric] = values[metric][i, j, k]
            if se is not None:
                line[metric + "_se"] = se
        lines.append(line)
    return lines


def _family_wise_rate(rng, draws: int, **kwargs) -> tuple[float, float]:
    """(share of reports with any claim, share of tested cells with raw p <= 0.05) over A/A draws:
    two names for one architecture, 3 seeds x 3 L0s x 3 metrics, through `build_verdicts`."""
    any_claim, raw, cells = 0, 0, 0
    for _ in range(draws):
        out = build_verdicts(_lines(rng, {"a": 0.0, "b": 0.0}, **kwargs), ["fvu", "ce_loss_recovered", "kl_div"])
        tested = [r for r in out["records"] if r["p"] is not None]
        assert len(tested) == out["family_size"] == 9  # every cell reached and tested
        any_claim += any(r["claim"] != "not distinguishable" for r in out["records"])
        raw += sum(r["p"] <= ALPHA for r in tested)
        cells += len(tested)
    return any_claim / draws, raw / cells


def _slack(draws: int) -> float:
    return ALPHA + 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / draws)  # binomial: 2.5 standard errors


def test_aa_family_wise_false_positive_rate_stays_at_alpha():
    draws = 2000
    family, per_cell = _family_wise_rate(np.random.default_rng(11), draws)
    assert family <= _slack(draws)
    # The test is not merely timid: each cell alone rejects at its nominal 5 % (so without Holm
    # the 9 cells would claim something in about a third of the reports).
    assert 0.04 <= per_cell <= 0.06


def test_aa_with_shared_evaluation_documents_needs_the_evaluation_error():
    """Every seed scored on the same documents: their error does not show in the seed spread. A
    plain paired t over seeds then claims differences between identical architectures; the
    recorded evaluation standard error brings the rate back under alpha."""
    draws = 300
    plain, _ = _family_wise_rate(np.random.default_rng(12), draws, document_sd=0.01)
    widened, _ = _family_wise_rate(np.random.default_rng(12), draws, document_sd=0.01, se=0.01)
    assert plain > 0.3
    assert widened <= _slack(draws)
    # A small evaluation error next to the seed spread: Welch–Satterthwaite degrees of freedom
    # would reject ~17 % of these reports (its df grows when s² comes out small); n − 1 does not.
    small, _ = _family_wise_rate(np.random.default_rng(13), draws, document_sd=0.001, se=0.001)
    assert small <= _slack(draws)


def test_ab_true_gap_is_claimed_with_the_right_sign():
    lines = _lines(np.random.default_rng(5), {"topk": -0.05, "relu_l1": 0.0}, se=0.002)
    for pair, word in ((("topk", "relu_l1"), "better"), (("relu_l1", "topk"), "worse")):
        out = build_verdicts(lines, ["fvu", "ce_loss_recovered"], pairs=[pair])
        assert len(out["records"]) == 6 and out["family_size"] == 6
        for r in out["records"]:
            assert r["claim"] == word, sentence(r)
            sign = (1 if pair[0] == "topk" else -1) * (1 if r["metric"] == "ce_loss_recovered" else -1)
            assert sign * r["mean_difference"] == pytest.approx(0.05, abs=0.02)
            assert r["interval"][0] <= r["mean_difference"] <= r["interval"][1]


def test_ab_is_compared_at_equal_measured_l0_not_the_nominal_target():
    """Noise-free curves linear in log L0 with relu_l1 landing 10 % above every target: the
    difference at the common L0 is the true gap exactly; at the nominal target it would be
    0.08·log(1.1) = 0.0076 off."""
    rng = np.random.default_rng(2)
    lines = []
    for name, gap, scale in (("topk", -0.05, 1.0), ("relu_l1", 0.0, 1.1)):
        for seed in range(3):
            for target in TARGETS:
                l0 = target * scale * math.exp(rng.normal(0, 0.01))
                lines.append({"architecture": name, "seed": seed, "l0_target": target, "l0": l0,
                              "fvu": 0.4 - 0.08 * math.log(l0) + gap, "fvu_se": 0.001})
    out = build_verdicts(lines, ["fvu"], pairs=[("topk", "relu_l1")])
    for r in out["records"]:
        np.testing.assert_allclose(r["differences"], -0.05, atol=1e-12)
        assert r["claim"] == "better" and r["off_target"] == ["relu_l1"]
    assert out["records"][0]["l0"] >= max(r for r in out["records"][0]["measured_l0"]["topk"])  # inside both


def test_groups_are_compared_apart_and_corrected_together():
    rng = np.random.default_rng(4)
    lines = [{**line, "hook_name": hook} for hook in ("h0", "h1") for line in _lines(rng, {"a": 0.0, "b": 0.0})]
    out = build_verdicts(lines, ["fvu"], group=lambda line: line["hook_name"])
    assert out["family_size"] == 6 and {r["group"] for r in out["records"]} == {"h0", "h1"}
    assert all(len(r["seeds"]) == 3 for r in out["records"])  # no group's seeds mixed into another's


# --- Bad input ----------------------------------------------------------------------------------


def _check_document(out: dict) -> None:
    json.dumps(out, allow_nan=False)  # the verdicts.json is strict JSON
    for r in out["records"]:
        assert r["claim"] in ("better", "worse", "not distinguishable")
        sentence(r)


def test_one_seed_says_it_cannot_conclude():
    out = build_verdicts(_lines(np.random.default_rng(0), {"a": -0.3, "b": 0.0}, seeds=1), ["fvu"])
    _check_document(out)
    assert out["family_size"] == 0 and len(out["records"]) == 3
    for r in out["records"]:
        assert r["claim"] == "not distinguishable" and r["p"] is None and "needs at least 2" in r["reason"]
        assert r["mean_difference"] == pytest.approx(-0.3, abs=0.05)  # shown, not tested
        assert sentence(r).endswith("needs at least 2): not distinguishable with 1 seed")


def test_single_l0_point_per_architecture():
    lines = [{"architecture": name, "seed": s, "l0_target": 8, "l0": l0, "fvu": 0.1 + 0.01 * s}
             for name, l0 in (("topk", 8.0), ("relu_l1", 8.4)) for s in range(3)]
    out = build_verdicts(lines, ["fvu"])
    _check_document(out)
    (r,) = out["records"]
    assert r["claim"] == "not distinguishable" and "share no L0 near target 8" in r["reason"]
    assert "relu_l1 8.4–8.4" in r["reason"] and "not compared" in sentence(r)
    # Both exactly at 8 (TopK and a TopK variant): compared there.
    same = [{**line, "l0": 8.0, "fvu": line["fvu"] + 0.001 * (line["architecture"] == "topk") * line["seed"]}
            for line in lines]
    (r,) = build_verdicts(same, ["fvu"])["records"]
    assert r["l0"] == 8.0 and r["p"] is not None


def test_nans_missing_keys_and_unpaired_seeds_are_named():
    lines = _lines(np.random.default_rng(1), {"a": 0.0, "b": 0.0})
    lines[0]["fvu"] = float("nan")  # a, seed 0, target 8
    lines[1].pop("seed")
    lines[2]["seed"] = [0]  # unhashable: not a seed
    lines[3]["l0"] = None
    lines.append({"seed": 0, "l0_target": 8.0, "l0": 8.0, "fvu": 0.2})  # no architecture
    lines += [{"architecture": "b", "seed": 7, "l0_target": t, "l0": t, "fvu": 0.2} for t in TARGETS]
    out = build_verdicts(lines, ["fvu"])
    _check_document(out)
    notes = " ".join(out["notes"])
    for word in ("usable fvu", "usable seed", "usable l0", "usable series"):
        assert word in notes, notes
    # a's seed 0 lost all three points (NaN, no seed, unhashable seed); b's seed 7 has no partner.
    assert all(r["seeds"] == [1, 2] and r["unpaired_seeds"] == [0, 7] for r in out["records"])
    at_8, at_16, at_32 = out["records"]
    # a's seed 1 lost its L0 8 point (no l0), so not every paired seed reaches down to target 8.
    assert at_8["p"] is None and "share no L0 near target 8 (every paired seed reaches a 16.6–32.5" in at_8["reason"]
    assert sentence(at_8).startswith("a − b fvu at target 8: not compared: the curves share no L0")
    assert at_16["n_seeds"] == at_32["n_seeds"] == 2 and at_16["p"] is not None and at_32["df"] == 1


def test_empty_and_absent_series_and_unknown_direction():
    out = build_verdicts([], "fvu")
    _check_document(out)
    assert out["records"] == [] and out["notes"] == ["no pair of series to compare (0 usable line(s); series: none)"]
    out = build_verdicts([None, {"architecture": "a", "seed": 0, "l0_target": 8, "l0": 0.0, "fvu": 1.0}], ["fvu"])
    assert out["records"] == [] and "usable results object" in out["notes"][0] and "usable l0" in out["notes"][1]
    out = build_verdicts(_lines(np.random.default_rng(0), {"a": 0.0}), ["fvu"], pairs=[("a", "gated")])
    _check_document(out)
    assert "no usable line of gated" in out["records"][0]["reason"]
    with pytest.raises(ConfigError, match="'l2_ratio' has no direction"):
        build_verdicts([], ["l2_ratio"])
    assert build_verdicts([], {"l2_ratio": "lower"})["records"] == []
    assert DIRECTIONS["fvu"] == "lower" and DIRECTIONS["ce_loss_recovered"] == "higher"


def test_two_runs_under_one_series_are_named():
    lines = _lines(np.random.default_rng(0), {"a": 0.0, "b": 0.0})
    out = build_verdicts(lines + lines[:3], ["fvu"])
    _check_document(out)
    assert out["notes"] == ["a seed 0 has several lines at one L0 target: all are points of its curve "
                            "(give each run its own series to compare them apart)"]


def test_sentence_reads_the_record():
    record = {"a": "topk", "b": "relu_l1", "metric": "fvu", "l0_target": 16.0, "l0": 15.74, "seeds": [0, 1, 2],
              "n_seeds": 3, "mean_difference": -0.2114, "interval": [-0.2531, -0.1702], "p_holm": 0.00412, "claim": "better",
              "off_target": []}
    assert sentence(record) == ("topk − relu_l1 fvu at L0 15.7 (target 16): −0.211 [−0.253, −0.17], "
                                "paired t over 3 seeds, Holm p = 0.0041: topk better")
    assert sentence(record, "FVU").startswith("topk − relu_l1 FVU at L0 15.7")
    record |= {"claim": "not distinguishable", "p_holm": 0.31, "off_target": ["relu_l1"]}
    assert sentence(record).endswith("Holm p = 0.31: not distinguishable with 3 seeds "
                                     "(measured L0 more than 5% off target: relu_l1)")
