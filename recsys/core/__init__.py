"""Utilities every layer may use: the user-facing error, atomic writes, progress lines, plots,
metric names. Nothing here knows about clicks, models or MLflow.
"""
