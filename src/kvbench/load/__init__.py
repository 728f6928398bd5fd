"""Drive OpenAI-compatible servers over HTTP: workload -> arrivals -> streaming client -> records -> aggregates."""
