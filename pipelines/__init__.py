"""Batch steps (prepare, train, evaluate, register) and the ``recsys`` command line."""
