"""Entry point `kfold`: K-fold cross-validation of a text classifier, resumable per fold and epoch."""

from pipelines.cli import main
from pipelines.config import KFoldConfig
from pipelines.stages import kfold

if __name__ == "__main__":
    main(KFoldConfig, kfold.run)
