import pytest

from sweeps.selection import Fidelity, hypervolume, knee, pareto_front, screening_order, select_champion


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
    champion, rule = select_champion(rows, base, Fidelity("fid", 0.1))
    assert champion["name"] == "within 10%" and "highest held-out quality" in rule
    champion, _ = select_champion(rows, base, Fidelity("fid", 0.0))
    assert champion["name"] == "safe"


def test_knee_fallback_when_nothing_is_within_tolerance():
    base = row(10, 0.5)
    rows = [row(20, 0.51, "fidelity end"), row(22, 0.80, "knee"), row(40, 0.82, "quality end")]
    champion, rule = select_champion(rows, base, Fidelity("fid", 0.05))
    assert champion["name"] == "knee" and "knee" in rule
    # two points normalize to the two corners, equally far from the ideal: fidelity first
    assert knee([row(2, 0.9, "b"), row(1, 0.1, "a")])["name"] == "a"
    assert select_champion([], base, Fidelity()) == (None, "no finite results")


def kid_row(kid, quality, name="", fid=0.0):
    return {"kid": kid, "fid": fid, "heldout_quality": quality, "name": name}


def test_the_kid_axis_has_an_absolute_tolerance_and_its_own_front():
    """On the KID axis the front, the tolerance and the order read KID alone, and the tolerance is
    absolute: a base KID of -2 (KID is unbiased: a good model's can be below 0) with tolerance 5
    allows KID <= 3, where a relative 10% would allow nothing above -2.2. FID is ignored there
    (here it would order the rows the other way)."""
    base = kid_row(-2.0, 0.5, fid=50)
    rows = [kid_row(1.0, 0.60, "within", fid=90), kid_row(2.9, 0.65, "just within", fid=80), kid_row(8.0, 0.9, "too far", fid=10),
            kid_row(3.0, 0.55, "dominated", fid=5)]
    fidelity = Fidelity("kid", 5.0)
    assert names(pareto_front(rows, "kid")) == ["within", "just within", "too far"]
    champion, rule = select_champion(rows, base, fidelity)
    assert champion["name"] == "just within" and "KID <= 3" in rule, rule
    assert names(screening_order(pareto_front(rows, "kid"), base, fidelity)) == ["just within", "within", "too far"]
    assert fidelity.paired == "kid_diff" and fidelity.paired_limit == 5.0
    assert fidelity.paired_value(rows[0], base) == pytest.approx(3.0)
    assert Fidelity("fid", 0.1).paired_value({"fid": 55.0}, {"fid": 50.0}) == pytest.approx(1.1)
    assert hypervolume(rows, base, "kid") == 0.0  # nothing below the base's KID
    assert hypervolume([kid_row(-4.0, 0.6)], base, "kid") == pytest.approx(2.0 * 0.1)
    with pytest.raises(ValueError, match="fid, kid"):
        Fidelity("lpips", 0.1)
