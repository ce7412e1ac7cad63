import pytest

from lightning_halfprune import Cubic, Linear, OneShot, Schedule


def test_mapping_is_sorted_cumulative_and_string_keys_from_yaml_work():
    s = Schedule({"6": 0.5, 3: 0.25})
    assert s.points == {3: 0.25, 6: 0.5}
    assert s.ratio_at(3) == 0.25 and s.ratio_at(4) is None and max(s.points.values()) == 0.5


def test_constructors():
    assert OneShot(at=5, ratio=0.5).points == {5: 0.5}
    assert Linear(start=2, end=8, ratio=0.5, every=2).points == {2: 0.125, 4: 0.25, 6: 0.375, 8: 0.5}
    cubic = Cubic(start=0, end=4, ratio=0.5)
    assert list(cubic.points) == [1, 2, 3, 4] and max(cubic.points.values()) == 0.5
    steps = list(cubic.points.values())
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False))
    assert steps[0] - 0 > steps[-1] - steps[-2]  # cubic: big cuts first, small cuts last
    assert isinstance(cubic, Cubic)
    assert OneShot(at=10, ratio=0.5, interval="step").interval == "step"


@pytest.mark.parametrize(
    ("points", "match"),
    [
        ({1: 1.0}, r"ratio at epoch 1 must be in \[0, 1\), got 1.0"),
        ({1: -0.1}, r"got -0.1"),
        ({1: 0.5, 2: 0.25}, "may not decrease: epoch 2 asks for 0.25"),
        ({-1: 0.5}, "integers >= 0"),
        ({}, "at least one prune point"),
        ({1: "half"}, "must be a number"),
    ],
)
def test_bad_schedules_name_the_value(points, match):
    with pytest.raises(ValueError, match=match):
        Schedule(points)


def test_bad_interval_and_span():
    with pytest.raises(ValueError, match="`interval` must be"):
        Schedule({1: 0.5}, interval="batch")
    with pytest.raises(ValueError, match="start=5, end=2"):
        Linear(start=5, end=2, ratio=0.5)
    with pytest.raises(ValueError, match="step points .* >= 1"):
        Schedule({0: 0.5}, interval="step")


def test_points_past_the_trainer_warn():
    with pytest.warns(UserWarning, match=r"prune points \[12\] .* max_epochs=10"):
        Schedule({3: 0.25, 12: 0.5}).check_fits(max_epochs=10, max_steps=-1)
    with pytest.warns(UserWarning, match="no training to recover"):
        Schedule({9: 0.5}).check_fits(max_epochs=10, max_steps=-1)
