"""Entry point `tapt`: masked-LM continued pretraining on unlabelled text, resumable per epoch."""

from pipelines.cli import main
from pipelines.config import TaptConfig

if __name__ == "__main__":
    main(TaptConfig, "pipelines.stages.tapt")
