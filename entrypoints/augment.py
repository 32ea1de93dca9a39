"""Entry point `augment`: new training rows from existing ones (EDA, back-translation, paraphrase), resumable."""

from pipelines.cli import main
from pipelines.config import AugmentConfig

if __name__ == "__main__":
    main(AugmentConfig, "pipelines.stages.augment")
