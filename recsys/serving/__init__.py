"""Serving a trained model: original ids in and out, live sessions, batch files, the MLflow pyfunc
and the MLflow store it is registered in and loaded from.
"""
