"""The Grafana dashboard queries only metrics that exist: the gateway's own, as its /metrics
exports them, and vLLM's, as the installed vLLM defines them."""

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana" / "llmship-gateway.json"
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def queried_metrics() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\b((?:llmship_|vllm:)[a-z_:]+)", e)}


def base_name(metric: str) -> str:
    for suffix in SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def test_gateway_metrics_in_the_dashboard_are_exported(monkeypatch, tmp_path):
    from llmship.settings import get_settings

    monkeypatch.setenv("LLMSHIP_STATE_DIR", str(tmp_path))
    get_settings.cache_clear()
    from serving.gateway import app

    with TestClient(app) as c:
        exported = {
            base_name(n) for n in re.findall(r"^# TYPE (\S+) ", c.get("/metrics").text, re.M)
        }
    get_settings.cache_clear()
    wanted = {base_name(m) for m in queried_metrics() if m.startswith("llmship_")}
    assert wanted and wanted <= exported, wanted - exported


def test_vllm_metrics_in_the_dashboard_exist_in_the_installed_vllm():
    sources = list(
        (REPO / ".venv" / "serve" / "lib").glob("python3*/site-packages/vllm/v1/metrics/loggers.py")
    )
    assert sources, "the serve environment is not set up: make setup"
    defined = set(re.findall(r'"(vllm:[a-z_:]+)"', sources[0].read_text()))
    wanted = {base_name(m) for m in queried_metrics() if m.startswith("vllm:")}
    assert wanted and wanted <= defined, wanted - defined
