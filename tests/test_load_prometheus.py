from kvbench.load.prometheus import parse_metrics, server_deltas

BEFORE = """# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 50.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 10.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.1
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 3.0
# TYPE process_cpu_seconds counter
process_cpu_seconds_total 12.5
"""
AFTER = BEFORE.replace("} 100.0", "} 400.0").replace("} 10.0", "} 160.0").replace("} 0.1", "} 0.35") + \
    '# TYPE sglang:num_used_tokens gauge\nsglang:num_used_tokens{name="a b}c \\"q\\""} 7 1712000000\n'


def test_parse_sums_series_and_reads_types():
    values, types = parse_metrics(AFTER)
    assert values["vllm:prefix_cache_queries_total"] == 450.0
    assert values["sglang:num_used_tokens"] == 7.0  # a label value with a space, a brace and quotes
    assert types["vllm:prefix_cache_hits"] == "counter" and types["vllm:kv_cache_usage_perc"] == "gauge"


def test_deltas_of_engine_counters_and_gauges_after():
    d = server_deltas(BEFORE, AFTER)
    assert d["available"]
    assert d["counters"] == {"vllm:prefix_cache_queries_total": 300.0, "vllm:prefix_cache_hits_total": 150.0}
    assert d["gauges"] == {"vllm:kv_cache_usage_perc": 0.35, "sglang:num_used_tokens": 7.0}
    assert d["prefix_cache_hit_rate"] == 0.5
    assert "process_cpu_seconds_total" not in d["counters"]  # not an engine metric
    assert not any("bucket" in k for k in d["counters"])  # histograms are skipped


def test_missing_endpoint_is_unavailable_not_an_error():
    assert server_deltas(None, None) == {"available": False}
    assert server_deltas(BEFORE, None) == {"available": False}


def test_hit_rate_needs_queries():
    assert "prefix_cache_hit_rate" not in server_deltas(BEFORE, BEFORE)
