"""Metric arithmetic on hand-made answer records (Spec-Bench's layout plus verispec's details)."""
from __future__ import annotations

import pytest

from verispec.bench import metrics


def rec(qid, category, new_tokens, wall, accept_lengths=None, token_ids=None, turns=None, time_s=None,
        drafted=None, accepted=None, repeats=None, measured=True, foreign=False):
    n_turns = len(new_tokens)
    choice = {"index": 0, "turns": turns or [f"answer {qid} {t}" for t in range(n_turns)],
              "decoding_steps": [1] * n_turns, "new_tokens": new_tokens, "wall_time": wall,
              "accept_lengths": accept_lengths if accept_lengths is not None else [1] * sum(new_tokens)}
    record = {"question_id": qid, "category": category, "answer_id": "x", "model_id": "m", "choices": [choice],
              "tstamp": 0.0}
    if foreign:  # a Spec-Bench file from elsewhere: no verispec details
        return record
    record["verispec"] = {
        "task": metrics.task_of(category),
        "token_ids": token_ids or [list(range(n)) for n in new_tokens],
        "accept_measured": measured,
        "drafted_per_position": drafted if drafted is not None else [[] for _ in new_tokens],
        "accepted_per_position": accepted if accepted is not None else [[] for _ in new_tokens],
        "drafted_tokens": [sum(d) for d in drafted] if drafted else [0] * n_turns,
        "accepted_tokens": [sum(a) for a in accepted] if accepted else [0] * n_turns,
        "time_s": time_s or [{"prefill": 0.0, "draft": 0.0, "target": w, "accept": 0.0} for w in wall],
        "wall_time_repeats": repeats or [[w] for w in wall],
    }
    return record


def test_question_speed_is_total_tokens_over_total_time():
    r = rec(81, "writing", [12, 30], [1.0, 2.0])
    assert metrics.question_speed(r) == pytest.approx(42 / 3)  # not the mean of per-turn rates (13.5)


def test_speedup_is_ratio_of_mean_tokens_per_second():
    base = [rec(1, "qa", [10], [2.0]), rec(2, "qa", [20], [1.0])]  # 5 and 20 tok/s: mean 12.5
    fast = [rec(1, "qa", [10], [1.0]), rec(2, "qa", [20], [0.5])]  # 10 and 40 tok/s: mean 25
    s = metrics.speedup(fast, base)
    assert s["speedup"] == pytest.approx(2.0)
    assert s["baseline_tokens_per_s"] == pytest.approx(12.5) and s["common_questions"] == 2
    # only common questions count: a question the baseline lacks is left out of both means
    s = metrics.speedup(fast + [rec(3, "qa", [100], [0.01])], base)
    assert s["speedup"] == pytest.approx(2.0) and s["common_questions"] == 2


def test_speedup_spread_over_repeats():
    base = [rec(1, "qa", [10], [1.0], repeats=[[1.0, 1.0, 1.0]])]
    fast = [rec(1, "qa", [10], [0.5], repeats=[[0.5, 0.25, 1.0]])]
    s = metrics.speedup(fast, base)
    assert s["speedup_repeats"] == pytest.approx([2.0, 4.0, 1.0])
    assert metrics.spread(s["speedup_repeats"]) == pytest.approx((2.0, 1.0, 4.0))


def test_mean_accepted_tokens_pools_all_target_passes():
    recs = [rec(1, "qa", [6], [1.0], accept_lengths=[1, 3, 2]), rec(2, "qa", [4], [1.0], accept_lengths=[4])]
    assert metrics.mean_accepted_tokens(recs) == pytest.approx(10 / 4)  # not (2 + 4) / 2
    assert metrics.accept_length_counts(recs) == {1: 1, 2: 1, 3: 1, 4: 1}
    unmeasured = rec(3, "qa", [5], [1.0], accept_lengths=[], measured=False)
    assert metrics.mean_accepted_tokens(recs + [unmeasured]) is None  # n/a, not a made-up number
    assert metrics.accept_length_counts(recs + [unmeasured]) is None


def test_acceptance_rate_per_position():
    recs = [rec(1, "qa", [6, 2], [1.0, 1.0], drafted=[[3, 2, 1], [1]], accepted=[[2, 1, 0], [1]]),
            rec(2, "qa", [3], [1.0], drafted=[[2, 2]], accepted=[[1, 0]])]
    acc = metrics.acceptance_per_position(recs)
    assert acc["drafted"] == [6, 4, 1] and acc["accepted"] == [4, 1, 0]
    assert acc["rates"] == pytest.approx([4 / 6, 1 / 4, 0.0])
    assert acc["acceptance_rate"] == pytest.approx(5 / 11)


def test_time_split_shares_and_unmeasured_phases():
    t = [{"prefill": 0.5, "draft": 1.0, "target": 2.5, "accept": 0.5}]
    split = metrics.time_split([rec(1, "qa", [10], [5.0], time_s=t)])
    assert split["draft"] == pytest.approx(0.2) and split["target"] == pytest.approx(0.6)  # prefill included
    assert split["accept"] == pytest.approx(0.1) and split["other"] == pytest.approx(0.1)
    assert split["unmeasured"] == []
    peer = [{"prefill": None, "draft": None, "target": 3.0, "accept": None}]
    split = metrics.time_split([rec(1, "qa", [10], [4.0], time_s=peer)])
    assert split["draft"] is None and split["accept"] is None and split["target"] == pytest.approx(0.75)
    assert split["other"] == pytest.approx(0.25) and set(split["unmeasured"]) == {"draft", "accept"}


def test_losslessness_finds_a_planted_difference():
    base = [rec(1, "qa", [5], [1.0], token_ids=[[7, 8, 9, 10, 11]], turns=["the cat sat"]),
            rec(2, "writing", [4, 4], [1.0, 1.0], token_ids=[[1, 2, 3, 4], [5, 6, 7, 8]], turns=["a", "xyz"])]
    same = [rec(1, "qa", [5], [0.5], token_ids=[[7, 8, 9, 10, 11]], turns=["the cat sat"]),
            rec(2, "writing", [4, 4], [1.0, 1.0], token_ids=[[1, 2, 3, 4], [5, 6, 99, 8]], turns=["a", "xyw"])]
    loss = metrics.losslessness(same, base)
    assert loss["compared"] == 2 and loss["identical"] == 1 and loss["share"] == 0.5
    (d,) = loss["differences"]
    assert (d["question_id"], d["turn"], d["position"], d["unit"]) == (2, 2, 2, "token")
    assert (d["token"], d["baseline_token"]) == (99, 7)
    assert d["snippet"] == "xyw" and d["baseline_snippet"] == "xyz"
    # a shorter output (stopped early) differs where it ends
    short = [rec(1, "qa", [3], [1.0], token_ids=[[7, 8, 9]])]
    assert metrics.losslessness(short, base)["differences"][0]["position"] == 3


def test_losslessness_falls_back_to_text_for_foreign_files():
    base = [rec(1, "qa", [3], [1.0], turns=["hello world"], foreign=True)]
    other = [rec(1, "qa", [3], [1.0], turns=["hello there"], foreign=True)]
    (d,) = metrics.losslessness(other, base)["differences"]
    assert d["unit"] == "char" and d["position"] == 6


def test_summary_groups_tasks_like_spec_bench():
    ar = [rec(81, "writing", [10, 10], [1.0, 1.0]), rec(131, "coding", [10, 10], [1.0, 1.0]),
          rec(161, "translation", [10], [1.0])]
    pl = [rec(81, "writing", [10, 10], [0.5, 0.5], accept_lengths=[2] * 10),
          rec(131, "coding", [10, 10], [1.0, 1.0]), rec(161, "translation", [10], [0.25], accept_lengths=[5, 5])]
    s = metrics.summarize({"ar": ar, "prompt-lookup": pl})
    assert s["tasks"] == ["mt_bench", "translation"]  # the eight MT-bench categories are one task
    mt = s["methods"]["prompt-lookup"]["mt_bench"]
    assert mt["questions"] == 2 and mt["speedup"] == pytest.approx((20 + 10) / 2 / 10)
    assert s["methods"]["prompt-lookup"]["translation"]["speedup"] == pytest.approx(4.0)
    overall = s["methods"]["prompt-lookup"]["overall"]
    assert overall["speedup"] == pytest.approx(((20 + 10 + 40) / 3) / 10)
    assert overall["mean_accepted_tokens"] == pytest.approx(50 / (10 + 20 + 2))
    assert s["methods"]["ar"]["overall"]["speedup"] == pytest.approx(1.0)
    assert overall["lossless"]["share"] == 1.0
    # sampled runs: losslessness is not applicable
    assert metrics.summarize({"ar": ar, "prompt-lookup": pl}, greedy=False)["methods"]["prompt-lookup"]["overall"][
        "lossless"] is None


def test_lossy_rule_is_flagged_in_reports():
    from verispec.bench.report import lossy_methods

    run = {"options": {"draft-model@typ": {"rule": "typical"}, "prompt-lookup": {"k": 5}, "ar": {}}}
    assert lossy_methods(run) == {"draft-model@typ"}


def test_target_pass_cost_excludes_the_prefill_pass():
    # turn 1: 3 passes (prefill + 2) over 6 tokens; turn 2: 2 passes (prefill + 1)
    a = rec(1, "writing", [6, 2], [1.0, 1.0], time_s=[{"prefill": 0.5, "draft": 0.0, "target": 0.08, "accept": 0.0},
                                                     {"prefill": 0.5, "draft": 0.0, "target": 0.04, "accept": 0.0}])
    a["verispec"]["kinds"] = [["bonus", "accepted", "accepted", "recovered", "accepted", "bonus"], ["target", "bonus"]]
    assert metrics.target_pass_ms([a]) == pytest.approx(1000 * 0.12 / 3)
    del a["verispec"]["kinds"]  # a record without per-token kinds cannot say
    assert metrics.target_pass_ms([a]) is None
