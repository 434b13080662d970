"""recsys: session-based next-item recommendation (GRU4Rec, baselines, evaluation, serving).

Importing the package has no side effects: no MLflow run is started, no file is written.
"""

__version__ = "0.1.0"
