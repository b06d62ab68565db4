from fashion_retrieval.engine.stopping import available_metrics, metric_value, should_stop


def test_stops_when_the_last_evaluations_gain_less_than_min_delta() -> None:
    # points = fraction x 100: 0.300 -> 0.304 is +0.4 points
    assert not should_stop([0.20, 0.30, 0.302], patience=3, min_delta_points=0.5).stop  # too few evaluations
    assert should_stop([0.20, 0.30, 0.302, 0.301, 0.304], patience=3, min_delta_points=0.5).stop
    assert not should_stop([0.20, 0.30, 0.302, 0.301, 0.306], patience=3, min_delta_points=0.5).stop
    # a late recovery above the old best by enough points keeps the run going
    assert not should_stop([0.30, 0.25, 0.26, 0.31], patience=2, min_delta_points=0.5).stop
    decision = should_stop([0.40, 0.39, 0.38], patience=2, min_delta_points=0.5)
    assert decision.stop and "-1.00 points" in decision.reason and "(40.00)" in decision.reason


def test_metric_paths() -> None:
    metrics = {"overall": {"top1": 0.5, "queries": 10}, "per_attribute": {"colour": {"MAP@all": 0.25}}}
    assert metric_value(metrics, "overall/top1") == 0.5
    assert metric_value(metrics, "per_attribute/colour/MAP@all") == 0.25
    assert metric_value(metrics, "overall/top5") is None and metric_value(metrics, "overall") is None
    assert available_metrics(metrics) == ["overall/top1", "overall/queries", "per_attribute/colour/MAP@all"]


def test_an_evaluation_that_measured_nothing_neither_stops_nor_extends_the_run() -> None:
    from types import SimpleNamespace

    from fashion_retrieval.engine.train import _stopping_decision

    rule = SimpleNamespace(metric="overall/mAP", patience=2, min_delta=0.5)
    entry = lambda value: {"split": "val", "metrics": {"overall": {"mAP": value}}}  # noqa: E731
    nan = float("nan")
    # counted as an evaluation, the NaN would make this a plateau; it is not one of the last two
    decision = _stopping_decision([entry(0.30), entry(0.302), entry(nan)], "val", rule)
    assert not decision.stop and "2 of 3 evaluations needed" in decision.reason
    assert _stopping_decision([entry(0.30), entry(0.302), entry(nan), entry(0.301)], "val", rule).stop
    assert not _stopping_decision([entry(nan), entry(0.30), entry(0.31), entry(0.40)], "val", rule).stop
