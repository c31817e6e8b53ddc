"""orchestrator: submit Lightning jobs to Ray Train from one YAML spec; every run recorded in MLflow."""

__version__ = "0.1.0"
