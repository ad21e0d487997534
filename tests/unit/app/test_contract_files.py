"""Published artefacts stay in step with the code: schema files, the error-code list."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from app.errors import CODES
from app.models import SCHEMA_FILES, json_schema

ROOT = Path(__file__).resolve().parents[3]


def test_schema_files_are_generated_from_the_current_models() -> None:
    for name, model in SCHEMA_FILES.items():
        published = orjson.loads((ROOT / "app" / "schemas" / name).read_bytes())
        assert published == json_schema(model), f"{name} is stale: run `wal schemas`"


def test_readme_lists_every_error_code_once_and_no_other() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.M)
    assert sorted(listed) == sorted(CODES)
    assert len(listed) == len(set(listed))


def test_every_code_raised_in_the_code_is_documented() -> None:
    used = set()
    for path in [*ROOT.glob("app/*.py"), *ROOT.glob("agents/*.py"), *ROOT.glob("targets/*.py")]:
        used |= set(re.findall(r"""code=["']([A-Z_]+)["']""", path.read_text()))
        used |= set(
            re.findall(r"""(?:permanent|retryable)\(\s*["']([A-Z_]+)["']""", path.read_text())
        )
    assert used, "found no codes: the pattern is broken"
    assert used <= set(CODES), used - set(CODES)
