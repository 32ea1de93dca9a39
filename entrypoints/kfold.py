"""Entry point `kfold`: K-fold cross-validation of a text classifier, resumable per fold and epoch."""

from pipelines.cli import main
from pipelines.config import KFoldConfig

if __name__ == "__main__":
    main(KFoldConfig, "pipelines.stages.kfold")
