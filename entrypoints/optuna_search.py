"""Entry point `optuna`: hyperparameter search on an Optuna RDB storage, resumable per trial, fold and epoch.

(Not named optuna.py: run as a script it would shadow the optuna package.)
"""

from pipelines.cli import main
from pipelines.config import OptunaConfig

if __name__ == "__main__":
    main(OptunaConfig, "pipelines.stages.search")
