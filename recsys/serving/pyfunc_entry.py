"""Models-from-code entry point for MLflow: importing it registers the pyfunc instance.

Only MLflow imports this file (``python_model=`` path); the library never does.
"""

import mlflow

from recsys.serving.pyfunc import GRU4RecPyfunc

mlflow.models.set_model(GRU4RecPyfunc())
