"""How a canary step is judged: the new version's requests, errors and latency in the
gateway's own /metrics, over the step's window."""

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError

from llmship.pipeline_config import RolloutConfig
from tasks.canary_rule import Traffic, judge, parse_traffic, quantile, traffic_since

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Gateway:
    """The gateway's metric families, written the way serving/gateway/metrics.py writes them."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmship_gateway_requests",
            "",
            ["model", "version", "endpoint", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "llmship_gateway_errors", "", ["model", "version", "endpoint"], registry=self.registry
        )
        self.latency = Histogram(
            "llmship_gateway_request_seconds",
            "",
            ["model", "version", "endpoint"],
            registry=self.registry,
            buckets=BUCKETS,
        )

    def serve(self, version, seconds, status=200, endpoint="/v1/completions", n=1):
        for _ in range(n):
            self.requests.labels("m", version, endpoint, str(status)).inc()
            self.latency.labels("m", version, endpoint).observe(seconds)
            if status >= 500:
                self.errors.labels("m", version, endpoint).inc()

    def traffic(self, version):
        return parse_traffic(generate_latest(self.registry).decode(), "m", version)


def test_a_window_counts_only_the_new_versions_requests_since_the_step_began():
    gw = Gateway()
    gw.serve("old", 0.1, n=50)
    gw.serve("new", 0.1, n=3)
    before = gw.traffic("new")
    gw.serve("new", 0.2, n=7, endpoint="/v1/chat/completions")
    gw.serve("new", 0.2, status=503, n=1)
    gw.serve("old", 9.0, status=500, n=5)  # the old version's trouble is not the canary's
    window = gw.traffic("new").minus(before)
    assert (window.requests, window.errors) == (8, 1)
    assert window.buckets[float("inf")] == 8


def test_a_window_sums_every_gateway_including_one_that_started_or_restarted_meanwhile():
    """Behind a load balancer the canary's requests are spread over several gateways: the
    step is judged on all of them. One that restarted during the step starts its counters
    again from zero; one that joined has only the window's."""
    steady, restarted, joined = Gateway(), Gateway(), Gateway()
    steady.serve("new", 0.1, n=10)
    restarted.serve("new", 0.1, n=40)
    before = {"a": steady.traffic("new"), "b": restarted.traffic("new")}
    steady.serve("new", 0.1, n=5)
    restarted = Gateway()  # the process restarted: its counters are new
    restarted.serve("new", 0.1, n=3)
    restarted.serve("new", 0.1, status=503, n=2)
    joined.serve("new", 0.1, n=4)
    window = traffic_since(
        before,
        {"a": steady.traffic("new"), "b": restarted.traffic("new"), "c": joined.traffic("new")},
    )
    assert (window.requests, window.errors) == (5 + 5 + 4, 2)
    assert window.buckets[float("inf")] == 14
    assert (
        judge(window, RolloutConfig(max_error_rate=0.1), finished=False)
        == "error rate 14.3% (2 of 14 requests) > 10.0%"
    )


def test_p99_follows_prometheus_histogram_quantile():
    gw = Gateway()
    gw.serve("v", 0.07, n=99)  # in (0.05, 0.1]
    gw.serve("v", 3.0, n=1)  # in (2.5, 5]
    buckets = gw.traffic("v").buckets
    # rank 99 of 100 is the last of the 99 in (0.05, 0.1]: its upper bound.
    assert quantile(0.99, buckets) == pytest.approx(0.1)
    assert quantile(0.5, buckets) == pytest.approx(0.05 + 0.05 * (50 / 99))
    assert quantile(0.995, buckets) == pytest.approx(2.5 + 2.5 * 0.5)
    assert quantile(0.99, {}) is None
    gw.serve("slow", 100.0, n=10)  # past the last finite bound: that bound
    assert quantile(0.99, gw.traffic("slow").buckets) == 60


def test_error_rate_over_the_limit_is_a_breach_at_once():
    cfg = RolloutConfig(max_error_rate=0.01)
    gw = Gateway()
    gw.serve("v", 0.1, n=99)
    gw.serve("v", 0.1, status=502, n=1)
    assert judge(gw.traffic("v"), cfg, finished=False) is None  # 1.0 % is not over 1 %
    gw.serve("v", 0.1, status=500, n=1)
    breach = judge(gw.traffic("v"), cfg, finished=False)
    assert breach == "error rate 2.0% (2 of 101 requests) > 1.0%"


def test_client_errors_are_not_the_versions_fault():
    gw = Gateway()
    gw.serve("v", 0.1, status=400, n=20)
    assert judge(gw.traffic("v"), RolloutConfig(max_error_rate=0.0), finished=True) is None


def test_slow_p99_is_a_breach_only_when_a_limit_is_set():
    gw = Gateway()
    gw.serve("v", 0.1, n=90)
    gw.serve("v", 7.0, n=10)
    assert judge(gw.traffic("v"), RolloutConfig(), finished=True) is None
    breach = judge(gw.traffic("v"), RolloutConfig(max_p99_seconds=5), finished=True)
    assert breach.startswith("p99 latency 9.") and "> 5.00 s over 100 requests" in breach


def test_too_little_traffic_is_a_breach_only_when_the_step_ends():
    cfg = RolloutConfig(min_requests=20, bake_seconds=30)
    gw = Gateway()
    gw.serve("v", 0.1, n=5)
    assert judge(gw.traffic("v"), cfg, finished=False) is None
    assert "only 5 requests in 30 s, fewer than min_requests 20" in judge(
        gw.traffic("v"), cfg, finished=True
    )
    assert judge(Traffic(), RolloutConfig(), finished=True) is None  # the default asks none


@pytest.mark.parametrize("steps", [[50, 10], [0, 50], [10, 100], [10, 10]])
def test_canary_steps_must_rise_between_0_and_100(steps):
    with pytest.raises(ValidationError, match="must rise strictly"):
        RolloutConfig(canary_steps=steps)


def test_rollout_config_refuses_unknown_fields():
    with pytest.raises(ValidationError, match="canary_step"):
        RolloutConfig.model_validate({"canary_step": [10]})
