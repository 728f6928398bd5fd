"""Before a run: is the server there, does it serve the model, does it stream? Clear errors if not."""

from __future__ import annotations

import time

import httpx

from kvbench.load.stream import Endpoint, Trace, stream_request
from kvbench.workloads import Request
from kvbench.errors import KvbenchError


async def served_models(client: httpx.AsyncClient, base_url: str) -> list[str] | None:
    """Model ids from GET /models; None when the server has no such route."""
    url = f"{base_url.rstrip('/')}/models"
    try:
        response = await client.get(url)
    except httpx.ConnectError as exc:
        raise KvbenchError(f"cannot reach {base_url}: {str(exc) or 'connection refused'}; is the server up and "
                           "is --url its OpenAI API root (e.g. http://127.0.0.1:8000/v1)?") from None
    except httpx.HTTPError as exc:
        raise KvbenchError(f"cannot reach {base_url}: {type(exc).__name__} {exc}") from None
    if response.status_code != 200:
        return None
    try:
        return [m["id"] for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        return None


async def check_server(endpoint: Endpoint, models: list[str] | None) -> None:
    """One streamed 1-token request (not recorded): the model exists and the answer is SSE."""
    if models is not None and endpoint.model not in models:
        raise KvbenchError(f"the server at {endpoint.base_url} does not serve model {endpoint.model!r}; "
                           f"it serves: {', '.join(models) or 'nothing'}")
    trace = Trace(Request(-1, ({"role": "user", "content": "Hello"},), max_tokens=1), 0.0, time.perf_counter())
    async with httpx.AsyncClient(timeout=httpx.Timeout(endpoint.timeout_s)) as client:
        await stream_request(client, endpoint, trace)
    if trace.status == "not_streaming":
        raise KvbenchError(f"{endpoint.url} answered a streaming request without streaming ({trace.error}); "
                           "kvbench measures TTFT and ITL from server-sent events")
    if trace.status == "http_404":
        served = f"; it serves: {', '.join(models)}" if models else ""
        raise KvbenchError(f"{endpoint.url} answered 404 for model {endpoint.model!r}{served} ({trace.error[:200]})")
    if trace.status not in ("ok", "no_output"):  # a 1-token answer may be an immediate EOS
        raise KvbenchError(f"a probe request to {endpoint.url} failed: {trace.status}: {trace.error}")
