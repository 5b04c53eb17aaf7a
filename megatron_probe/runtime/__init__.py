"""Runtime: what drives the PROBE layers of a model while it serves (lookahead forecasts, the
live pipeline that plans and prefetches replicas, and the model walks both need)."""
