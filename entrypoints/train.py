"""Entry point `train`: fine-tune a text classifier on a train/validation split, resumable per epoch."""

from pipelines.cli import main
from pipelines.config import TrainConfig
from pipelines.stages import train

if __name__ == "__main__":
    main(TrainConfig, train.run)
