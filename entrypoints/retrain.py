"""Entry point `retrain`: one model on all the data with the parameters of an optuna or kfold run."""

from pipelines.cli import main
from pipelines.config import RetrainConfig
from pipelines.stages import retrain

if __name__ == "__main__":
    main(RetrainConfig, retrain.run)
