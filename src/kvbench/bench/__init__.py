"""Benchmark harness: workloads, suite specs, the runner, metrics, records and reports."""
