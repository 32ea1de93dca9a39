"""Entry point `predict`: batch predictions of a model for a data file, resumable per shard."""

from pipelines.cli import main
from pipelines.config import PredictConfig

if __name__ == "__main__":
    main(PredictConfig, "pipelines.stages.predict")
