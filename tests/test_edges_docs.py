"""Issue 19 item 22: the project documents its own architecture and cites nothing outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in names if name.endswith((".py", ".md", ".yaml", ".toml", ".sh")) or name == "MLproject"]


def test_architecture_document_is_in_the_repository_and_cited_instead_of_design_md():
    architecture = ROOT / "docs" / "architecture.md"
    assert architecture.is_file(), "docs/architecture.md is missing"
    text = architecture.read_text()
    for section in ("resume contract", "Leases", "Checkpoints", "shards", "Tasks", "Stores"):
        assert section.lower() in text.lower(), f"docs/architecture.md does not cover {section}"
    citing = [str(path.relative_to(ROOT)) for path in tracked_files()
              if path.name != Path(__file__).name and path.exists() and "DESIGN.md" in path.read_text()]
    assert citing == [], f"these files cite DESIGN.md, which is not in the repository: {citing}"


def test_readme_shows_no_machine_specific_path():
    readme = (ROOT / "README.md").read_text()
    assert not re.findall(r"/work/main|/root/", readme)
