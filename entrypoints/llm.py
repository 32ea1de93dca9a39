"""Entry point `llm`: one chat completion per row through an OpenAI-compatible endpoint, never paid twice."""

from pipelines.cli import main
from pipelines.config import LlmConfig

if __name__ == "__main__":
    main(LlmConfig, "pipelines.stages.llm")
