"""MLflow "models from code" entry point: mlflow executes this file when it loads a tdm model."""
import mlflow

from tdm.pyfunc import TDMPyfuncModel

mlflow.models.set_model(TDMPyfuncModel())
