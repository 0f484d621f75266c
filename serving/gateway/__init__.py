"""The gateway clients talk to: OpenAI-compatible, in front of each version's replicas.

    POST /v1/completions, /v1/chat/completions   proxied to the live version (streams unbuffered)
    POST /v1/responses, /tokenize, /detokenize   the same way (no shadow copies of these)
    GET  /v1/models                              the models served, with their live version
    GET  /health                                 the gateway itself
    GET  /ready                                  200 when every live version has a running replica
    GET  /metrics                                Prometheus (tokens too: serving/observability.py)
    GET  /admin/routes, PUT /admin/routes/{model}  bearer token: what the rollout task drives
    GET  /admin/sd/engines                       bearer token: the engines, as Prometheus http_sd

A route sends a model's requests to its live version, or, during a canary step, a
percentage of them to the new version. Each request goes to the version's replica with the
fewest requests in flight from this gateway, on whatever node it runs: the fleet's directory
(serving/directory.py, on Ray) says where each replica's engine listens, and the gateway relays
the bytes to it directly. A replica that refuses the connection is counted as an error of its
version and the request goes to the next replica, then to the route's other version: a
replica that dies costs its clients only the requests it had in flight, and a canary that
dies rolls itself back by its error rate.

Ray checks each replica's health and replaces those that fail. A live version left with no
replica at all, for LLMSHIP_GATEWAY_DOWN_AFTER checks in a row (every
LLMSHIP_GATEWAY_HEALTH_INTERVAL_S), is declared down, once: its clients get OpenAI-style 503s,
/ready says which, and the Prefect event `llmship.serving.down` asks the automation
`llmship-restore-<model>` to roll the model back to its previous version.

Requests are checked here, so a bad one gets an OpenAI-style 400 without reaching a model
server. The gateway keeps no state of its own that matters: at start the routing is the S3
`live` aliases (the source of truth that rollouts move), and the replicas are the fleet's.
<state>/gateway/<port>/routes.json and endpoints.json, written on every change, are what it
serves from when S3 or the Ray cluster cannot be reached.

So it runs as several replicas (one per host, or behind a load balancer): each tells the
fleet's directory it is up and what it routes (the directory retires a kept-warm version none
routes to), a rollout moves the route on every one of them and judges a canary on the sum of
their metrics, and one that starts during a canary gets its route at the rollout's next check.

Those who watch it get, beside /metrics: the engines' scrape targets, written to
Settings.prometheus_sd_file whenever the replicas change; one line per request on the logger
llmship.gateway.access, and one per route change on llmship.gateway.routes (INFO; the
stack's command line sends them to the gateway's log: serving/gateway_logging.json).


Its rooms: schemas.py (the requests and errors), routes.py (what it routes), metrics.py and
state.py (what it holds), loops.py (its background work), reading.py and relay.py (a request
in, the engine's answer out), admin.py (the admin API), application.py (the app, create_app).

    uvicorn serving.gateway:app --host 127.0.0.1 --port 8000
"""

from llmship.ray_cluster import uses_ray
from llmship.serving_messages import Canary, Route
from serving.gateway.application import create_app
from serving.gateway.routes import route_change
from serving.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    RelayedRequest,
    openai_error,
)
from serving.gateway.state import GatewayState, gateway_state_dir

# What uvicorn runs (llmship/stack.py: gateway_argv): the settings are the environment's,
# read as the app starts.
app = create_app()

__all__ = [
    "Canary",
    "ChatCompletionRequest",
    "CompletionRequest",
    "GatewayState",
    "RelayedRequest",
    "Route",
    "app",
    "create_app",
    "gateway_state_dir",
    "openai_error",
    "route_change",
    "uses_ray",
]
