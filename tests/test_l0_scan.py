"""`--l0 scan` and the indicated L0 (dictlearn/compare/scan.py, analysis/indicated_l0.py, l0_scan.py,
l0_scan_text.py) on hand-made results lines whose proxy is an exact parabola in log L0, so the
indicated L0 is known in closed form: the seed-mean of (log l0 − log c_s)² has its vertex at the
geometric mean of the c_s."""

from __future__ import annotations

import json
import math

import pytest

from dictlearn.analysis import l0_scan, l0_scan_text
from dictlearn.analysis.indicated_l0 import agreement, indicated, left_out, minimum, position
from dictlearn.analysis.results import from_records
from dictlearn.cli.compare import config_from_args
from dictlearn.compare.plan import CompareConfig
from dictlearn.compare.scan import SCAN_ARCHITECTURES, SCAN_L0, write_l0_scan
from dictlearn.errors import ConfigError

TARGETS = (4, 6, 8, 11, 16, 23, 32)
CENTRES = {0: 9.0, 1: 10.0, 2: 11.0}


def _line(architecture: str, target: float, seed: int, proxy: float, **extra) -> dict:
    return {"architecture": architecture, "d_sae": 512, "l0_target": target, "seed": seed, "l0": float(target),
            "nth_decoder_projection": proxy, "nth_decoder_projection_n": 192, "name": f"{architecture}_{target}_{seed}",
            **extra}


def _bowl(target: float, centre: float, scale: float = 1.0) -> float:
    return scale * (math.log(target) - math.log(centre)) ** 2


def _lines() -> list[dict]:
    """topk: the same vertices at n = d_sae/8, /4, /2 (scaled curves); relu_l1: at d_sae/2 the
    vertices twice as far (18, 20, 22: seed range disjoint from 9-11); batchtopk: results from
    before the d_sae/8 and d_sae/2 keys."""
    lines = []
    for seed, centre in CENTRES.items():
        for t in TARGETS:
            lines.append(_line("topk", t, seed, _bowl(t, centre), probe_auc_k16=0.9 - abs(t - 11) / 100,
                               nth_decoder_projection_eighth=_bowl(t, centre, 3.0) + 1.0,
                               nth_decoder_projection_half=_bowl(t, centre, 0.5) - 1.0))
            lines.append(_line("batchtopk", t, seed, 1.0 / t + seed * 0.01))  # still falling at the largest
            lines.append(_line("relu_l1", t, seed, _bowl(t, centre), nth_decoder_projection_eighth=_bowl(t, centre),
                               nth_decoder_projection_half=_bowl(t, 2 * centre)))
    return lines


def test_minimum_is_the_parabola_vertex_in_log_l0():
    l0s = [4.0, 8.0, 16.0]
    value, edge = minimum(l0s, [(math.log(v) - math.log(7.0)) ** 2 for v in l0s])
    assert edge is None and value == pytest.approx(7.0, rel=1e-9)
    assert minimum([4.0, 8.0, 16.0], [3.0, 2.0, 1.0]) == (None, "largest")
    assert minimum([4.0, 8.0, 16.0], [1.0, 2.0, 3.0]) == (None, "smallest")
    assert minimum([4.0, 8.0], [1.0, 2.0]) == (None, "too few")


def test_minimum_orders_the_points_by_measured_l0_not_by_target():
    """A calibrated JumpReLU measured L0s out of its targets' order on ground truth (targets 20, 25
    at 15.6, 12.5; docs/metrics.md): the parabola's neighbours are the point's neighbours in L0.
    In target order the neighbours of 16 would be 10 and 12, and the vertex clamped onto 12."""
    l0s = [8.0, 10.0, 16.0, 12.0, 20.0]  # in target order
    value, edge = minimum(l0s, [(math.log(v) - math.log(14.0)) ** 2 for v in l0s])
    assert edge is None and value == pytest.approx(14.0, rel=1e-9)
    assert minimum([8.0, 20.0, 12.0], [3.0, 1.0, 2.0]) == (None, "largest")  # lowest at the largest L0, not target
    assert left_out({"n": 16, "indicated_l0": None, "proxy_lowest_at": "largest"}, [8.0, 20.0, 12.0]) == (
        "n = 16 is not above the largest target's L0 (20)")


def test_indicated_l0_its_seed_interval_and_the_targets_positions(tmp_path):
    found = {r["architecture"]: r for r in indicated(_lines())}
    topk = found["topk"]
    geometric = math.exp(sum(math.log(c) for c in CENTRES.values()) / 3)
    assert topk["indicated_l0"] == pytest.approx(geometric, rel=1e-9) and topk["bracketed"]
    assert topk["interval"] == pytest.approx([9.0, 11.0], rel=1e-9)
    assert topk["scanned_l0"] == list(TARGETS) and topk["probe_auc_k16_peak_l0"] == 11
    assert [position(t, topk) for t in (8, 9.5, 11, 16)] == ["below", "around", "around", "above"]
    batchtopk = found["batchtopk"]
    assert batchtopk["indicated_l0"] is None and batchtopk["proxy_lowest_at"] == "largest"
    assert position(8, batchtopk) is None
    path = write_l0_scan(tmp_path, [line for line in _lines() if line["architecture"] != "relu_l1"])
    document = json.loads(path.read_text())
    assert {r["architecture"] for r in document["records"]} == {"topk", "batchtopk"}
    assert {"architecture", "indicated_l0", "interval", "scanned_l0", "by_n", "n_agreement"} <= set(document["records"][0])


def test_the_readings_at_three_n_and_whether_they_agree():
    found = {r["architecture"]: r for r in indicated(_lines())}
    geometric = math.exp(sum(math.log(c) for c in CENTRES.values()) / 3)
    topk = found["topk"]
    assert [(r["n_of_d_sae"], r["n"]) for r in topk["by_n"]] == [("d_sae/8", 64), ("d_sae/4", 192), ("d_sae/2", 256)]
    for reading in topk["by_n"]:
        assert reading["indicated_l0"] == pytest.approx(geometric, rel=1e-9)
        assert reading["interval"] == pytest.approx([9.0, 11.0], rel=1e-9)
    assert topk["n_agreement"] == "agree"
    relu = found["relu_l1"]
    half = relu["by_n"][2]
    assert half["key"] == "nth_decoder_projection_half" and half["interval"] == pytest.approx([18.0, 22.0], rel=1e-9)
    assert half["indicated_l0"] == pytest.approx(2 * geometric, rel=1e-9)
    assert relu["n_agreement"] == "disagree" and relu["indicated_l0"] == pytest.approx(geometric, rel=1e-9)
    old = found["batchtopk"]  # older results: the d_sae/4 reading alone, no verdict
    assert [r["key"] for r in old["by_n"]] == ["nth_decoder_projection"] and old["n_agreement"] is None
    one_seed = {r["architecture"]: r for r in indicated([line for line in _lines() if line["seed"] == 0])}
    assert one_seed["topk"]["n_agreement"] == "one seed"
    assert l0_scan_text._agreement_clause(one_seed["topk"]).endswith(
        "respectively: one seed gives no seed range to judge whether they agree.")
    shifted = [dict(line, nth_decoder_projection_eighth=1.0 / line["l0_target"]) if line["architecture"] == "topk"
               else line for line in _lines()]  # at d_sae/8 still falling at the largest target
    assert {r["architecture"]: r for r in indicated(shifted)}["topk"]["n_agreement"] == "unbracketed"


def test_report_sentences_and_figure(tmp_path):
    lines = from_records(_lines(), str(tmp_path / "results.jsonl"))
    sentences = {r["architecture"]: l0_scan_text.sentence(r) for r in l0_scan_text.records(lines)}
    assert "do not bracket" in sentences["batchtopk"] and "largest" in sentences["batchtopk"]
    assert "targets past 32: your own `--l0` list" in sentences["batchtopk"]
    assert "dead" not in sentences["topk"]  # no dead_fraction in these lines: no caution
    assert "L0 ≈ 9.97" in sentences["topk"] and "4, 6, 8 lie below it" in sentences["topk"]
    assert "16, 23, 32 lie above it" in sentences["topk"] and "highest at target 11" in sentences["topk"]
    assert "TopK itself mixes least" in sentences["topk"]  # a TopK reading is not the data's mean L0
    topk = next(r for r in l0_scan_text.records(lines) if r["architecture"] == "topk")
    (best, at), (second, next_at) = sorted(zip(topk["probe_auc_k16"], topk["scanned_l0"]), reverse=True)[:2]
    assert at == 11 and f"highest at target 11 (seed mean {best:.3f}; next {second:.3f} at {next_at:g})" in sentences["topk"]
    assert "n = d_sae/8 = 64, d_sae/4 = 192, d_sae/2 = 256" in sentences["topk"]
    assert "at L0 ≈ 9.97, L0 ≈ 9.97 and L0 ≈ 9.97 respectively: the three readings agree" in sentences["topk"]
    assert "L0 ≈ 9.97 and L0 ≈ 19.9 respectively; their seed ranges do not overlap" in sentences["relu_l1"]
    assert "not confirmed across n" in sentences["relu_l1"] and "Read at n" not in sentences["batchtopk"]
    assert l0_scan.sentence is l0_scan_text.sentence  # the figure's module still offers the words (before the split)
    drawn = l0_scan.draw(lines, tmp_path, [])
    assert [d.stem for d in drawn] == ["l0_scan"] and drawn[0].png.is_file()
    found = l0_scan_text.records(lines)
    panels = [ax.get_ylabel() for ax in l0_scan.plot(lines, found).axes]  # three n and the probes
    assert len(panels) == 4 and "d_sae/8 = 64" in panels[0] and "d_sae/2 = 256" in panels[2]
    older = [line for line in lines if line["architecture"] == "batchtopk"]  # one n: one proxy panel
    assert len(l0_scan.plot(older, l0_scan_text.records(older)).axes) == 1


def test_a_tight_seed_range_prints_with_the_digits_that_tell_its_ends_apart(tmp_path):
    """136.5 and 136.9 both print as 137 at 3 significant figures: "137–137" would say the seeds
    agree exactly. (The embedded model's d_sae 2048 scan read a range this tight, docs/compare.md.)"""
    assert l0_scan_text.interval_text(136.6, 136.9) == "136.6–136.9"  # at 3 figures: "137–137"
    assert l0_scan_text.interval_text(136.5, 136.9) == "136.5–136.9"  # at 3 figures: "136–137" (136.5 rounds to even)
    assert l0_scan_text.interval_text(136.52, 136.58) == "136.52–136.58"
    assert l0_scan_text.interval_text(9.0, 11.0) == "9–11" and l0_scan_text.interval_text(5.4, 5.6) == "5.4–5.6"
    assert l0_scan_text.interval_text(136.7, 136.7) == "137"  # one seed, or seeds alike: one value
    assert l0_scan_text.interval_text(None, 11.0) == "≤–11" and l0_scan_text.interval_text(9.0, None) == "9–≥"
    tight = [_line("batchtopk", t, seed, _bowl(t, centre)) for seed, centre in enumerate((136.5, 136.7, 136.9))
             for t in (64, 91, 128, 181, 256)]  # exact parabolas: each seed's vertex at its centre
    record, = l0_scan_text.records(from_records(tight, str(tmp_path / "results.jsonl")))
    assert record["interval"] == pytest.approx([136.5, 136.9], rel=1e-9)
    assert "L0 ≈ 137 (seeds' range 136.5–136.9, 3 seeds)" in l0_scan_text.sentence(record)


def test_targets_the_measured_l0_did_not_follow_are_named(tmp_path):
    """JumpReLU on ground truth: targets above the true L0 landed at it or trained dense (measured
    L0 15.6 for 20, 63.9 for 32 at true L0 16; docs/metrics.md). Off by more than 25 %: named."""
    measured = {8: 8.1, 10: 10.1, 13: 12.8, 16: 15.2, 20: 15.6, 25: 12.5, 32: 63.9}  # seed 0 there
    lines = [dict(_line("jumprelu", t, 0, _bowl(l0, 15.0)), l0=l0, d_sae=64) for t, l0 in measured.items()]
    record, = l0_scan_text.records(from_records(lines, str(tmp_path / "results.jsonl")))
    assert "more than 25% off target at 12.5 for 25, 63.9 for 32;" in l0_scan_text.sentence(record)
    topk = [r for r in l0_scan_text.records(from_records(_lines(), str(tmp_path / "all.jsonl")))]
    assert not any("off target" in l0_scan_text.sentence(r) for r in topk)


def test_many_dead_latents_are_named_beside_the_reading(tmp_path):
    # dead latents' decoder rows enter s_n^dec like live ones: the sentence gives the seed-mean
    # dead fraction where it is largest and smallest once any target is above 10 %
    lines = [dict(line, dead_fraction=0.6 / line["l0_target"] + 0.01 * line["seed"]) for line in _lines()]
    found = {r["architecture"]: r for r in l0_scan_text.records(from_records(lines, str(tmp_path / "results.jsonl")))}
    assert found["topk"]["dead_fraction"][0] == pytest.approx(0.6 / 4 + 0.01)  # seed mean at target 4
    text = l0_scan_text.sentence(found["topk"])
    assert "Caution: 16% of its latents are dead at target 4 and 3% at 32 (seed means)" in text
    quiet = [dict(line, dead_fraction=0.05) for line in _lines()]
    assert "dead" not in l0_scan_text.sentence(l0_scan_text.records(from_records(quiet, str(tmp_path / "q.jsonl")))[0])


def test_an_indicated_l0_above_d_in_is_named_as_no_sparse_code(tmp_path):
    # the bowl's vertex lies at ~9.97; with d_in 8 that is above the input's width
    wide = [dict(line, d_in=8) for line in _lines() if line["architecture"] == "topk"]
    record = l0_scan_text.records(from_records(wide, str(tmp_path / "results.jsonl")))[0]
    assert record["d_in"] == 8 and "at or above the input's width (d_in = 8)" in l0_scan_text.sentence(record)
    narrow = [dict(line, d_in=128) for line in _lines() if line["architecture"] == "topk"]
    assert "d_in" not in l0_scan_text.sentence(l0_scan_text.records(from_records(narrow, str(tmp_path / "n.jsonl")))[0])


def test_scan_flag_and_yaml_key(tmp_path):
    config = config_from_args(["--l0", "scan", "--device", "cpu"]).resolved()
    assert config.l0 == list(SCAN_L0["cpu"]) and config.l0_scan
    assert config.architectures == list(SCAN_ARCHITECTURES)
    (tmp_path / "scan.yaml").write_text("l0: scan\narchitectures: [relu_l1]\ndevice: cpu\n")
    chosen = CompareConfig(**CompareConfig.from_yaml(tmp_path / "scan.yaml")).resolved()
    assert chosen.architectures == ["relu_l1"] and chosen.l0 == list(SCAN_L0["cpu"]) and chosen.l0_scan
    (tmp_path / "compare.yaml").write_text(chosen.to_yaml())  # the run's resolved file reruns the same scan
    assert CompareConfig(**CompareConfig.from_yaml(tmp_path / "compare.yaml")).resolved() == chosen
    with pytest.raises(ConfigError, match="--l0 scan"):
        CompareConfig(l0="every", device="cpu").resolved()
    with pytest.raises(ConfigError, match="or 'scan'"):
        config_from_args(["--l0", "4,x"])


def test_an_unbracketed_d_sae_quarter_adds_only_what_the_other_n_say():
    """When n = d_sae/4 already does not bracket, the sentence says so once; the other n are not
    said to make 'the reading depend on n' when they fall the same way."""
    def reading(fraction, n, at=None, edge="largest"):
        return {"n_of_d_sae": fraction, "n": n, "indicated_l0": at, "proxy_lowest_at": None if at else edge}

    base = {"scanned_l0": [8, 16, 32], "indicated_l0": None, "proxy_lowest_at": "largest", "n_agreement": "unbracketed"}
    same = {**base, "by_n": [reading("d_sae/8", 64), reading("d_sae/4", 128), reading("d_sae/2", 256)]}
    assert l0_scan_text._agreement_clause(same) == " The same at n = d_sae/8 and d_sae/2."
    mixed = {**base, "by_n": [reading("d_sae/8", 64, at=16.6), reading("d_sae/4", 128),
                              reading("d_sae/2", 256, edge="smallest")]}
    assert l0_scan_text._agreement_clause(mixed) == (" At n = d_sae/8 it is lowest at L0 ≈ 16.6, at n = d_sae/2 at "
                                                "the smallest target (8).")


def _reading(fraction, n, at=None, edge=None, interval=(None, None), **extra):
    return {"n_of_d_sae": fraction, "n": n, "indicated_l0": at, "proxy_lowest_at": None if at else edge,
            "bracketed": at is not None, "interval": list(interval), **extra}


def test_a_reading_whose_n_is_not_above_the_l0_it_points_at_is_left_out():
    """The n-th largest projection reads silent latents only when n exceeds the L0: a reading at
    n <= its indicated L0, or lowest at an end target whose measured L0 is >= n, is left out."""
    l0 = [4.0, 8.0, 16.0, 32.0]
    assert left_out(_reading("d_sae/8", 16, edge="largest"), l0) == "n = 16 is not above the largest target's L0 (32)"
    assert left_out(_reading("d_sae/8", 64, edge="largest"), l0) is None  # the scan just ends too early
    assert left_out(_reading("d_sae/8", 4, edge="smallest"), l0) == "n = 4 is not above the smallest target's L0 (4)"
    assert left_out(_reading("d_sae/2", 5, edge="smallest"), l0) is None
    assert left_out(_reading("d_sae/4", 12, at=12.0), l0) == "n = 12 is not above its indicated L0 (12)"
    assert left_out(_reading("d_sae/4", 13, at=12.0), l0) is None
    assert left_out(_reading("d_sae/4", None, at=12.0), l0) is None  # n unknown: it takes part
    assert left_out(_reading("d_sae/4", 8, edge="too few"), l0) is None


def test_the_agreement_leaves_those_readings_out():
    eighth = _reading("d_sae/8", 4, edge="largest", left_out="n = 4 is not above the largest target's L0 (12)")
    quarter = _reading("d_sae/4", 8, at=5.5, interval=(5.4, 5.6), left_out=None)
    half = _reading("d_sae/2", 16, at=6.0, interval=(5.5, 7.0), left_out=None)
    assert agreement([eighth, quarter, half], seeds=3) == "agree"
    assert agreement([dict(eighth, left_out=None), quarter, half], seeds=3) == "unbracketed"
    far = dict(half, indicated_l0=9.0, interval=[8.0, 10.0])
    assert agreement([eighth, quarter, far], seeds=3) == "disagree"
    assert agreement([eighth, quarter, dict(half, left_out="n = 16 ...")], seeds=3) == "one n"
    older = [{k: v for k, v in r.items() if k != "left_out"} for r in (quarter, half, dict(half, n_of_d_sae="x"))]
    assert agreement(older, seeds=3) == "agree"  # records from before `left_out`: every n takes part
    assert agreement([eighth, quarter, half], seeds=1) == "one seed"
    record = {"n_agreement": "unbracketed", "indicated_l0": 5.5, "scanned_l0": [3, 6, 12],
              "by_n": [eighth, quarter, dict(half, indicated_l0=None, bracketed=False, proxy_lowest_at="smallest")]}
    assert l0_scan_text._agreement_clause(record) == (
        " Read at n = d_sae/8 = 4, d_sae/4 = 8, d_sae/2 = 16, the proxy is lowest at the largest target (12), "
        "L0 ≈ 5.5 and the smallest target (3) respectively; leaving out n = d_sae/8 (n not above the L0 it points "
        "at, where the n-th projection is an active latent's), not every n left brackets it, so **the reading is "
        "not confirmed across n** (on synthetic ground truth this also happened where n = d_sae/4 read the true "
        "L0; docs/metrics.md, \"At three n\").")


def test_a_narrow_dictionary_leaves_d_sae_eighth_out_of_the_check(tmp_path):
    """d_sae 128 (n = 16, 32, 64) scanned to L0 32: at d_sae/8 the proxy still falls at the largest
    target, whose L0 (32) is not below n = 16, so it is left out and the other two agree."""
    lines = [dict(line, d_sae=128, nth_decoder_projection_n=32, nth_decoder_projection_eighth=1.0 / line["l0_target"])
             for line in _lines() if line["architecture"] == "topk"]
    (record,) = indicated(lines)
    assert [(r["n"], bool(r["left_out"])) for r in record["by_n"]] == [(16, True), (32, False), (64, False)]
    assert record["n_left_out"] == ["d_sae/8"] and record["n_agreement"] == "agree"
    text = l0_scan_text.sentence(record)
    assert ("leaving out n = d_sae/8 (n not above the L0 it points at, where the n-th projection is an active "
            "latent's), the other two readings agree within the seeds' ranges.") in text
    path = write_l0_scan(tmp_path, lines)
    (written,) = json.loads(path.read_text())["records"]
    assert written["n_left_out"] == ["d_sae/8"] and written["by_n"][0]["left_out"].startswith("n = 16 is not above")
    drawn = from_records(lines, str(tmp_path / "results.jsonl"))
    panels = [ax.get_ylabel() for ax in l0_scan.plot(drawn, l0_scan_text.records(drawn)).axes]
    assert panels[0].endswith("n = d_sae/8 = 16 (left out)") and not panels[1].endswith("(left out)")


def test_targets_are_placed_by_what_they_measured_not_by_their_names(tmp_path):
    """A calibrated JumpReLU on ground truth: target 25 measured 12.5, below a reading of ~15
    (docs/metrics.md). By its name it would lie above the indicated L0; the report places what was
    measured, and names both where they differ by more than 25 %. Three seeds, exact parabolas in
    log L0 centred at 14, 15, 16: each seed's vertex is its centre (its neighbours in measured L0
    are 12.8, 15.2, 15.6), so the seeds' range is 14-16."""
    measured = {8: 8.1, 10: 10.1, 13: 12.8, 16: 15.2, 20: 15.6, 25: 12.5, 32: 63.9}
    auc = {25: 0.9, 32: 0.89}  # the probes peak at 25, next at 32
    lines = [dict(_line("jumprelu", t, seed, _bowl(l0, centre)), l0=l0, d_sae=64, probe_auc_k16=auc.get(t, 0.8))
             for seed, centre in enumerate((14.0, 15.0, 16.0)) for t, l0 in measured.items()]
    record, = l0_scan_text.records(from_records(lines, str(tmp_path / "results.jsonl")))
    assert record["interval"] == pytest.approx([14.0, 16.0], rel=1e-9)
    assert position(25, record) == "below" and position(20, record) == "around" and position(32, record) == "above"
    assert position(15.0, record) == "around"  # a value that is no scanned target is placed as it is
    text = l0_scan_text.sentence(record)
    assert ("of the targets, 8, 10, 13, 25 (measured 12.5) lie below it; 16, 20 lie around it; 32 (measured 63.9) "
            "lies above it.") in text
    assert "highest at target 25 (measured 12.5) (seed mean" in text and "next 0.890 at 32, measured 63.9)" in text
    summary = l0_scan_text.summary_blocks(from_records(lines, str(tmp_path / "results.jsonl")))
    assert "25 (measured 12.5) lie below it" in summary[1].items[0]  # the compare report's summary says the same
    # unbracketed: the end target named with what it measured; n placed against the largest measured L0
    falling = [dict(line, nth_decoder_projection=1.0 / line["l0"], nth_decoder_projection_n=40) for line in lines]
    record, = l0_scan_text.records(from_records(falling, str(tmp_path / "falling.jsonl")))
    text = l0_scan_text.sentence(record)
    assert "lowest at the largest L0 target (32, measured 63.9)" in text
    assert "Caution: n = 40 is not above the largest measured L0 (63.9)" in text


def test_probe_means_that_round_alike_print_with_the_digits_that_tell_them_apart():
    # 0.9131 and 0.9126 both round to 0.913: the sentence must not read as a tie
    assert l0_scan_text._apart(0.9131, 0.9126) == ("0.9131", "0.9126")
    assert l0_scan_text._apart(0.916, 0.914) == ("0.916", "0.914")
    assert l0_scan_text._apart(0.5, 0.5) == ("0.500", "0.500")
