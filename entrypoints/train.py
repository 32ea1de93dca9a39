"""Entry point `train`: fine-tune a text classifier on a train/validation split, resumable per epoch."""

from pipelines.cli import main
from pipelines.config import TrainConfig

if __name__ == "__main__":
    main(TrainConfig, "pipelines.stages.train")
