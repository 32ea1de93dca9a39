"""Entry point `retrain`: one model on all the data with the parameters of an optuna or kfold run."""

from pipelines.cli import main
from pipelines.config import RetrainConfig

if __name__ == "__main__":
    main(RetrainConfig, "pipelines.stages.retrain")
