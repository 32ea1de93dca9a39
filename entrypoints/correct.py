"""Entry point `correct`: post-correction of a run's generated summaries (candidates, vote or LLM), resumable."""

from pipelines.cli import main
from pipelines.config import CorrectConfig

if __name__ == "__main__":
    main(CorrectConfig, "pipelines.stages.correct")
