"""Entry point `validate`: scores a model, or another run's predictions, against references, shard by shard."""

from pipelines.cli import main
from pipelines.config import ValidateConfig

if __name__ == "__main__":
    main(ValidateConfig, "pipelines.stages.validate")
