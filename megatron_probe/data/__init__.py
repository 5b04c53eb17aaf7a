"""Data: the on-disk text corpus, workloads, routing-trace formats and their loaders.

Plain Python and tensors; no process groups, no Megatron imports.
"""
