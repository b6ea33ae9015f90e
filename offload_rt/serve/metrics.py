"""``/metrics``: the backend's counters and gauges as Prometheus text (exposition format 0.0.4).

The backend's ``metrics()`` dict is keyed by the metric's name without the ``offload_rt_`` prefix
(:data:`METRICS` lists the known ones, their type and help). A known key the backend does not report is
left out rather than shown as 0; unknown numeric keys are exported as gauges, so a new figure needs no
change here.
"""

from __future__ import annotations

import math
import re

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "offload_rt_"

# key in Backend.metrics() → (Prometheus type, help)
METRICS: dict[str, tuple[str, str]] = {
    "requests_total": ("counter", "Generation requests accepted."),
    "requests_cancelled_total": ("counter", "Requests cancelled before their end (clients that went away)."),
    "requests_rejected_total": ("counter", "Requests refused because the queue was full (HTTP 503)."),
    "requests_active": ("gauge", "Requests holding a batch slot."),
    "queue_depth": ("gauge", "Requests waiting for a batch slot."),
    "batch_size": ("gauge", "Rows decoded together in the last step."),
    "prompt_tokens_total": ("counter", "Prompt tokens of accepted requests."),
    "completion_tokens_total": ("counter", "Tokens generated."),
    "prefix_cache_hits_total": ("counter", "Requests whose prompt began with a cached prefix."),
    "cached_tokens_total": ("counter", "Prompt tokens whose KV came from the prefix cache."),
    "step_seconds_total": ("counter", "Seconds the batch loop spent in model steps (the rest: scheduling, "
                           "sampling, text)."),
    "tokens_per_second": ("gauge", "Generated tokens per second, recent rate over all sequences."),
}

_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _value(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render(values: dict) -> str:
    """The Prometheus text of ``values`` (non-numeric entries skipped), one HELP/TYPE block per metric."""
    lines = []
    known = [k for k in METRICS if k in values]
    extra = sorted(k for k in values if k not in METRICS)
    for key in known + extra:
        v = values[key]
        if not isinstance(v, (int, float)):
            continue
        kind, text = METRICS.get(key, ("gauge", f"Backend figure {key}."))
        name = PREFIX + _NAME.sub("_", str(key))
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {_value(v)}"]
    return "\n".join(lines) + "\n"
