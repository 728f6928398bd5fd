"""Server-side counters around a run: scrape Prometheus `/metrics` before and after, keep the deltas.

Only the engines' own families are kept (vLLM `vllm:`, SGLang `sglang:`, llama.cpp's server
`llamacpp:`, TensorRT-LLM `trtllm_`, `kvbench serve`'s extras `kvbench:`), summed over their label
sets: counters as deltas, gauges as the value after the run. Histograms are skipped (the client
measures latencies itself), and so are the `_created` timestamps that prometheus-client (vLLM's and
kvbench's exporter) writes beside each counter. A server
without the endpoint (llama-cpp-python, a llama-server started without --metrics) is recorded as
unavailable, not an error.
"""

from __future__ import annotations

import math

import httpx

ENGINE_PREFIXES = ("vllm:", "sglang:", "llamacpp:", "trtllm_", "kvbench:")
# (hits counter, queries counter) pairs whose ratio over the run is a prefix-cache hit rate
HIT_RATES = (
    ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
    ("vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_queries_total"),
)


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, str]]:
    """Samples summed per metric name, and each family's declared type (`# TYPE name counter`)."""
    values: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        name, rest = _split_sample(line)
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue  # not a sample line; the format allows nothing else, so skip rather than fail a run
        values[name] = values.get(name, 0.0) + value
    return values, types


def _split_sample(line: str) -> tuple[str, str]:
    """`name{labels} value ts` -> (name, "value ts"); label values may hold spaces, braces and quotes."""
    brace = line.find("{")
    space = line.find(" ")
    if brace == -1 or (space != -1 and space < brace):
        return line[:space], line[space + 1:]
    i, quoted = brace + 1, False
    while i < len(line):
        c = line[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "}" and not quoted:
            break
        i += 1
    return line[:brace], line[i + 1:]


def _family_type(name: str, types: dict[str, str]) -> str | None:
    for family in (name, name.removesuffix("_total"), name.rsplit("_", 1)[0]):
        if family in types:
            return types[family]
    return "counter" if name.endswith("_total") else None


def server_deltas(before: str | None, after: str | None) -> dict:
    """What changed on the server during the run, from two scrapes (None: the scrape failed)."""
    if before is None or after is None:
        return {"available": False}
    b, _ = parse_metrics(before)
    a, types = parse_metrics(after)
    counters, gauges = {}, {}
    for name, value in a.items():
        if not name.startswith(ENGINE_PREFIXES) or name.endswith("_created"):
            continue
        kind = _family_type(name, types)
        if kind == "counter":
            counters[name] = value - b.get(name, 0.0)
        elif kind == "gauge":
            gauges[name] = value
    out: dict = {"available": True, "counters": counters, "gauges": gauges}
    for hits, queries in HIT_RATES:
        if counters.get(queries):
            out["prefix_cache_hit_rate"] = counters[hits] / counters[queries] if hits in counters else math.nan
            break
    return out


async def scrape(client: httpx.AsyncClient, base_url: str) -> str | None:
    """The text of `/metrics` next to the API root (`http://host:port/v1` -> `http://host:port/metrics`)."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    try:
        response = await client.get(url)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None
