"""Serving: the continuous-batching engine, the stock-vs-PROBE serving worker, plots, wandb."""
