"""The documentation: README.md stays a newcomer's page, every relative link and anchor in it and in
docs/*.md resolves, and docs/configuration.md's table of settings matches server/config.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.markdown import DOCS, README, ROOT, anchors, links, pages, prose_lines, section, slug
from tests.test_scripts import load_script

README_MAX_LINES = 300
# How the software was developed is no part of its documentation.
DIARY = ("this round", "an earlier session", "the sessions of", "not lent", "no device was available")


def test_the_readme_is_short_and_keeps_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text


def test_the_readmes_flags_are_the_servers() -> None:
    from stylize_service.server.config import _SETTINGS

    table = section(README, "## Running the server")
    flags = set(re.findall(r"^\| `(--[a-z-]+)`", table, re.M))
    flags |= set(re.findall(r"^\| `--[a-z-]+`, `(--[a-z-]+)`", table, re.M))
    assert flags, "README.md's Running the server section has no table of flags"
    assert flags <= {flag for flag, _, _, _ in _SETTINGS}, flags - {flag for flag, _, _, _ in _SETTINGS}
    for flag, env, _, _ in _SETTINGS:
        if flag in flags:
            assert f"`{env}`" in table, f"README.md names {flag} without its variable {env}"


def test_the_readme_links_every_docs_page() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for _, target in links(README)}
    unlinked = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        (
            "Autoscaling: CPU now, queue depth with the metrics",
            "autoscaling-cpu-now-queue-depth-with-the-metrics",
        ),
        ("What each replica gets, and why", "what-each-replica-gets-and-why"),
        (
            "Single scale against multiscale (coarse-to-fine)",
            "single-scale-against-multiscale-coarse-to-fine",
        ),
        ("The L-BFGS-B history length", "the-l-bfgs-b-history-length"),
        ("Other languages: the proto", "other-languages-the-proto"),
        ("`--provider` and **CUDA**", "--provider-and-cuda"),
        ("A short job's fixed costs", "a-short-jobs-fixed-costs"),
        ("Größe & Ökonomie", "größe--ökonomie"),
    ],
)
def test_slugs_follow_githubs_rules(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A\n\n## Notes\n\n```bash\n# Notes\n```\n\n## Notes\n")
    assert anchors(page) == {"a", "notes", "notes-1"}


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for line, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"line {line}: {target} (no such file)")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"line {line}: {target} (no such heading in {file.relative_to(ROOT)})")
        elif ROOT not in file.parents and file != ROOT:
            broken.append(f"line {line}: {target} (outside the repository)")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_docs_speak_of_the_software_not_of_its_development(page: Path) -> None:
    found = [
        f"line {n}: {phrase!r}"
        for n, line in prose_lines(page.read_text())
        for phrase in DIARY
        if phrase in line.lower()
    ]
    assert not found, f"{page.relative_to(ROOT)}: {found}"


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
