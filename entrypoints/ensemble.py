"""Entry point `ensemble`: weighted soft voting over kfold/train runs, registered and servable."""

from pipelines.cli import main
from pipelines.config import EnsembleConfig

if __name__ == "__main__":
    main(EnsembleConfig, "pipelines.stages.ensemble")
