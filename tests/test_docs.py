"""The documentation: docs/configuration.md's table of settings matches server/config.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.markdown import DOCS, ROOT
from tests.test_scripts import load_script


def test_the_configuration_reference_is_current() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_config_docs.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_configuration_check_finds_a_stale_page_and_the_generator_mends_it(tmp_path: Path) -> None:
    gen = load_script("gen_config_docs")
    from stylize_service.server.config import _SETTINGS

    current = (DOCS / "configuration.md").read_text()
    for flag, env, _, _ in _SETTINGS:
        assert f"`{flag} " in current and f"`{env}`" in current, flag
    page = tmp_path / "configuration.md"
    page.write_text(current.replace("`STYLIZE_PORT`", "`STYLIZE_PORT_WAS_RENAMED`"))
    assert gen.main(["--check", "--page", str(page)]) == 1
    assert gen.main(["--page", str(page)]) == 0
    assert page.read_text() == current
    assert gen.main(["--check", "--page", str(page)]) == 0
    page.write_text("# No markers\n")
    assert gen.main(["--check", "--page", str(page)]) == 1
