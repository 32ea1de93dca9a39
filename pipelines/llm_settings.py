"""The settings of the stages that call an LLM: the endpoint (``LLMSettings``) and prompt templates given as a
setting (inline text or a file, with ``{column}`` fields). A leaf: pipelines/config.py and pipelines/llm.py both
read it."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import ConfigError
from pipelines.settings import Settings, setting


def load_template(value: str) -> str:
    """``prompt_template`` (or ``system_prompt``): the text of a file when it names one, else the value itself."""
    if value and "\n" not in value and len(value) < 1024 and Path(value).is_file():
        return Path(value).read_text(encoding="utf-8")
    return value


def template_fields(template: str, setting: str = "prompt_template") -> list[str]:
    """The ``{name}`` fields of a template; positional ``{}`` fields are refused."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"{setting} is not a valid template ({exc}); write fields as {{column}}, braces as "
                          "{{ and }}") from None
    if any(not name or name.isdigit() for name in names):
        raise ConfigError(f"{setting} has a positional field {{}}; name the column, e.g. {{text}}")
    return sorted(set(names))


@dataclass
class LLMSettings(Settings):
    """How to call an OpenAI-compatible chat-completions endpoint (pipelines/llm.py)."""

    base_url: str = setting("", "OpenAI-compatible endpoint, e.g. https://api.upstage.ai/v1 (Upstage Solar), "
                            "https://api.openai.com/v1 or a local vLLM server's http://host:8000/v1.")
    llm_model: str = setting("", "Model name at that endpoint, e.g. solar-pro2.")
    system_prompt: str = setting("", "System message sent before each prompt (inline, or a file); empty: none.")
    temperature: float = setting(0.0, "Sampling temperature (0: the most deterministic answers).")
    max_tokens: int = setting(256, "Most tokens per answer.")
    concurrency: int = setting(4, "Requests in flight at once.", result=False)
    requests_per_minute: int = setting(0, "Most requests started in any minute; 0: no limit.", result=False)
    tokens_per_minute: int = setting(0, "Most tokens (prompt + answer) in any minute; 0: no limit.", result=False)
    max_retries: int = setting(5, "Retries of a request after 429, 5xx, timeouts and dropped connections, with "
                               "exponential back-off (or the server's retry-after).", result=False)
    request_timeout: float = setting(60.0, "Seconds before one attempt of a request times out.", result=False)
    flush_seconds: float = setting(10.0, "Finished requests are written to the ledger (the state database) at least "
                                   "this often; 0: each at once.", result=False)
    api_key_env: str = setting("OPENAI_API_KEY", "Name of the environment variable holding the API key (the key "
                               "itself is never a setting, and is never logged or recorded).", result=False)
    price_per_1k_input: float = setting(0.0, "Price per 1,000 prompt tokens, for the `cost` metric.", result=False)
    price_per_1k_output: float = setting(0.0, "Price per 1,000 answer tokens, for the `cost` metric.",
                                         result=False)
    retry_failed: bool = setting(False, "On resume, send the requests that finally failed again (only them).",
                                 result=False)

    def check_llm(self) -> None:
        """Called by the stages that do send requests."""
        if not self.base_url or not self.llm_model:
            raise ConfigError("base_url and llm_model are required: e.g. base_url=https://api.upstage.ai/v1 "
                              "llm_model=solar-pro2")
        if not os.environ.get(self.api_key_env):
            raise ConfigError(f"the environment variable {self.api_key_env} (api_key_env) is not set: export "
                              f"{self.api_key_env}=<your API key>, or pass api_key_env=<the variable that holds it>")
        for name in ("max_tokens", "concurrency", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        for name in ("requests_per_minute", "tokens_per_minute", "max_retries", "flush_seconds", "temperature",
                     "price_per_1k_input", "price_per_1k_output"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be zero or positive")
