import pytest

from sweeps.selection import hypervolume, knee, pareto_front, select_champion


def row(fid, quality, name=""):
    return {"fid": fid, "heldout_quality": quality, "name": name}


def names(rows):
    return [r["name"] for r in rows]


def test_dominated_points_are_excluded():
    rows = [row(10, 0.5, "a"), row(12, 0.7, "b"), row(11, 0.4, "dominated by a"), row(13, 0.6, "dominated by b"), row(9, 0.3, "c")]
    assert names(pareto_front(rows)) == ["c", "a", "b"]


def test_ties_and_a_single_point():
    assert names(pareto_front([row(10, 0.5, "x"), row(10, 0.5, "y")])) == ["x", "y"]  # neither dominates
    assert names(pareto_front([row(10, 0.5, "only")])) == ["only"]
    assert pareto_front([row(float("nan"), 0.5)]) == []


def test_hypervolume_against_a_known_value():
    base = row(20, 0.5)
    front = [row(10, 0.6), row(15, 0.8)]
    # (20-10)*(0.6-0.5) + (20-15)*(0.8-0.6) = 1.0 + 1.0
    assert hypervolume(front, base) == pytest.approx(2.0)
    assert hypervolume([row(25, 0.9)], base) == 0.0  # worse FID than the base: adds nothing
    assert hypervolume(front + [row(12, 0.55)], base) == pytest.approx(2.0)  # a dominated point adds nothing


def test_tolerance_rule_picks_the_best_aesthetic_within_it():
    base = row(50, 0.5)
    rows = [row(48, 0.55, "safe"), row(54, 0.62, "within 10%"), row(70, 0.9, "too far")]
    champion, rule = select_champion(rows, base, fid_tolerance=0.1)
    assert champion["name"] == "within 10%" and "highest held-out quality" in rule
    champion, _ = select_champion(rows, base, fid_tolerance=0.0)
    assert champion["name"] == "safe"


def test_knee_fallback_when_nothing_is_within_tolerance():
    base = row(10, 0.5)
    rows = [row(20, 0.51, "fidelity end"), row(22, 0.80, "knee"), row(40, 0.82, "quality end")]
    champion, rule = select_champion(rows, base, fid_tolerance=0.05)
    assert champion["name"] == "knee" and "knee" in rule
    # two points normalize to the two corners, equally far from the ideal: fidelity first
    assert knee([row(2, 0.9, "b"), row(1, 0.1, "a")])["name"] == "a"
    assert select_champion([], base, 0.1) == (None, "no finite results")
