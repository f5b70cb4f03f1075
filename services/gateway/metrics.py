"""`GET /metrics`: Prometheus text.

The gateway's own requests (by route, status and outcome), their latency, tokens per tenant and
cloud spend are counted as they happen; the fleet (every agent's status and load, every
orchestrator's outcomes and spend, per-agent inference metrics) is read from the CMS view at
scrape time, so it covers the queries of every client, not only this gateway's.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas import Outcome
from services.core.cms import CmsView
from services.gateway.service import Gateway

disable_created_metrics()  # no *_created series: they double the output

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """The registry behind /metrics."""

    def __init__(self, gateway: Gateway, view: CmsView) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "edgecollab_gateway_requests",
            "HTTP API requests by route, status code and outcome",
            ["route", "status", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgecollab_gateway_request_duration_seconds",
            "HTTP API request latency (to the last byte of the answer)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "edgecollab_gateway_tokens",
            "tokens of answered requests, by tenant and kind (prompt, completion)",
            ["tenant", "kind"],
            registry=self.registry,
        )
        self.cloud_spend = Counter(
            "edgecollab_gateway_cloud_spend_usd",
            "cloud cost of the requests answered through this gateway",
            registry=self.registry,
        )
        self.registry.register(_Fleet(gateway, view))


class _Fleet(Collector):
    """Agents and orchestrators as the CMS says now."""

    def __init__(self, gateway: Gateway, view: CmsView) -> None:
        self.gateway = gateway
        self.view = view

    def collect(self) -> Iterator[Metric]:
        labels = ["agent", "kind"]
        online = GaugeMetricFamily("edgecollab_agent_online", "1 when online", labels=labels)
        active = GaugeMetricFamily("edgecollab_agent_active", "requests in progress", labels=labels)
        queued = GaugeMetricFamily("edgecollab_agent_queued", "requests waiting", labels=labels)
        limit = GaugeMetricFamily(
            "edgecollab_agent_concurrency", "requests served at once", labels=labels
        )
        rate = GaugeMetricFamily(
            "edgecollab_agent_tokens_per_second", "recent decode rate", labels=labels
        )
        for agent in self.view.agents():
            card, status = agent.card, agent.status
            key = [card.agent, card.kind]
            online.add_metric(key, 1.0 if agent.online else 0.0)
            active.add_metric(key, status.active if status and agent.online else 0)
            queued.add_metric(key, status.queued if status and agent.online else 0)
            rate.add_metric(key, status.tokens_per_s if status and agent.online else 0.0)
            if card.concurrency:
                limit.add_metric(key, card.concurrency)
        yield from (online, active, queued, limit, rate)
        yield from self._orchestrators()
        yield from self._per_agent()

    def _orchestrators(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "edgecollab_orchestrator_requests",
            "queries by outcome, every client's (cms/metrics/<orchestrator>/requests)",
            labels=["orchestrator", "outcome"],
        )
        spend = CounterMetricFamily(
            "edgecollab_orchestrator_cloud_spend_usd",
            "cloud cost spent by the orchestrator",
            labels=["orchestrator"],
        )
        p95 = GaugeMetricFamily(
            "edgecollab_orchestrator_latency_p95_seconds",
            "95th percentile of the latency of answered queries",
            labels=["orchestrator"],
        )
        for scope, summary in sorted(self.gateway.orchestrator_metrics().items()):
            outcomes = summary.get("outcomes") or {}
            for outcome in Outcome:
                requests.add_metric([scope, outcome.value], float(outcomes.get(outcome.value, 0)))
            spend.add_metric([scope], float(summary.get("cloud_cost_usd") or 0.0))
            if summary.get("latency_p95_s") is not None:
                p95.add_metric([scope], float(summary["latency_p95_s"]))
        yield from (requests, spend, p95)

    def _per_agent(self) -> Iterator[Metric]:
        avg = GaugeMetricFamily(
            "edgecollab_agent_inference_time_avg_seconds",
            "mean inference time (cms/metrics/<agent>/inference_time_avg)",
            labels=["agent"],
        )
        tokens = CounterMetricFamily(
            "edgecollab_agent_tokens_used",
            "tokens generated (cms/metrics/<agent>/tokens_used_total)",
            labels=["agent"],
        )
        for agent, values in sorted(self.gateway.agent_metrics().items()):
            if isinstance(values.get("inference_time_avg"), int | float):
                avg.add_metric([agent], float(values["inference_time_avg"]))
            if isinstance(values.get("tokens_used_total"), int | float):
                tokens.add_metric([agent], float(values["tokens_used_total"]))
        yield from (avg, tokens)
