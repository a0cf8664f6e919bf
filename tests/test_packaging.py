"""Install metadata and CI: the test extras accept whatever transformers 5.x a user has (no downgrade), and CI
runs the README's test command on the newest 5.x, then the suite again on 5.17.0."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _extra(name: str) -> dict[str, Requirement]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {r.name: r for r in map(Requirement, extras[name])}


def test_test_extras_accept_every_transformers_5_from_5_17() -> None:
    for extra in ("test", "hf"):
        spec = _extra(extra)["transformers"].specifier
        assert all(spec.contains(version) for version in ("5.17.0", "5.24.0", "5.99")), extra
        assert not spec.contains("5.16.1") and not spec.contains("6.0.0"), extra


def test_ci_runs_the_readme_test_command_on_newest_5x_then_on_5_17() -> None:
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci/run").read_text()
    quickstart = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(quickstart) == 2
    test_command = quickstart[1]
    assert "pytest" in test_command and test_command in ci
    lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    upgrade = next(i for i, line in enumerate(lines) if 'pip install --upgrade "transformers>=5.17,<6"' in line)
    first = next(i for i, line in enumerate(lines) if test_command in line)
    pin = next(i for i, line in enumerate(lines) if 'pip install "transformers==5.17.0"' in line)
    second = next(i for i, line in enumerate(lines[pin:]) if line.endswith("python -m pytest -q tests")) + pin
    assert upgrade < first < pin < second
