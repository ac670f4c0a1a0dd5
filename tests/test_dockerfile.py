"""Static checks of the Dockerfile and .dockerignore (Docker itself is not needed to run them)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stylize_service.server.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PORT = "50051"


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions grouped by stage, with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)

    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def split_args(args: str) -> tuple[list[str], list[str]]:
    """(flags, operands) of a COPY/ADD, in shell form or JSON form."""
    words = shlex.split(args)
    flags = [w for w in words if w.startswith("--")]
    rest = args
    for flag in flags:
        rest = rest.replace(flag, "", 1)
    rest = rest.strip()
    operands = json.loads(rest) if rest.startswith("[") else [w for w in words if not w.startswith("--")]
    return flags, operands


def ignore_patterns(path: Path, gitignore: bool = False) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line of an ignore file, in order; the last matching line decides.

    .dockerignore patterns are anchored at the context root; in a .gitignore a pattern without an inner
    slash matches at any depth.
    """
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        if gitignore and "/" not in pattern.strip("/"):
            pattern = "**/" + pattern
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves out `path` (relative, with /), itself or through a parent folder."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = not negated
    return ignored


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    return ignore_patterns(DOCKERIGNORE)


def tracked_files(source: str) -> list[str]:
    """Files under `source` that a clean clone has: git's list, else the files on disk not gitignored."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = []
    if out:
        return out
    base = ROOT / source
    if base.is_file():
        return [source]
    gitignore = ROOT / ".gitignore"
    rules = ignore_patterns(gitignore, gitignore=True) if gitignore.is_file() else []
    files = (p.relative_to(ROOT).as_posix() for p in base.rglob("*") if p.is_file())
    return [f for f in files if not is_ignored(f, rules)]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    assert DOCKERFILE.is_file(), "no Dockerfile at the repository root"
    parsed = parse_dockerfile(DOCKERFILE.read_text())
    assert parsed, "the Dockerfile has no FROM"
    return parsed


def context_copies(stages: list[Stage]) -> list[str]:
    """Every source path that a COPY/ADD takes from the build context (not from another stage)."""
    sources = []
    for stage in stages:
        for ins in stage.instructions:
            if ins.keyword not in ("COPY", "ADD"):
                continue
            flags, operands = split_args(ins.args)
            if any(f.startswith("--from") for f in flags):
                continue
            sources.extend(operands[:-1])
    return sources


def test_parser_reads_continuations_and_stages() -> None:
    text = "FROM a AS one\nRUN x \\\n  # note\n  && y\nFROM b\nUSER 1000\n"
    parsed = parse_dockerfile(text)
    assert [(s.base, s.name) for s in parsed] == [("a", "one"), ("b", None)]
    assert parsed[0].instructions[0].args.split() == ["x", "&&", "y"]
    assert parsed[1].all("USER")[0].args == "1000"


def test_dockerignore_matcher() -> None:
    rules = [(False, re.compile(r"models/build\Z")), (False, re.compile(r"(?:.*/)?__pycache__\Z"))]
    assert is_ignored("models/build/x.onnx", rules)
    assert is_ignored("server/engine/__pycache__/a.pyc", rules)
    assert not is_ignored("models/build.py", rules)


def test_builder_runs_setup_script(stages: list[Stage]) -> None:
    runs = [i.args for s in stages for i in s.all("RUN")]
    assert any(re.search(r"(^|[\s/])scripts/setup\.sh\b", r) for r in runs), (
        "the image must be built with scripts/setup.sh, the script CI runs"
    )
    assert (ROOT / "scripts" / "setup.sh").is_file()


def test_multi_stage(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    final = stages[-1]
    assert any("--from" in i.args for i in final.all("COPY")), "the runtime stage copies from the builder"


def test_copied_paths_exist(stages: list[Stage]) -> None:
    sources = context_copies(stages)
    assert sources, "the Dockerfile copies nothing from the build context"
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"COPY sources missing from the repository: {missing}"


def test_dockerignore_keeps_what_is_copied(stages: list[Stage]) -> None:
    assert DOCKERIGNORE.is_file(), "no .dockerignore"
    rules = dockerignore_patterns()
    excluded = []
    for source in context_copies(stages):
        if is_ignored(source, rules):
            excluded.append(source)
            continue
        excluded.extend(f for f in tracked_files(source) if is_ignored(f, rules))
    assert not excluded, f".dockerignore leaves out files the Dockerfile copies: {excluded}"


def test_dockerignore_keeps_build_outputs_out() -> None:
    rules = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", "models/build/vgg16_features.onnx", "out/demo/result.png"):
        assert is_ignored(path, rules), f"{path} should not be sent to the build context"


def test_runs_as_non_root(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "the runtime stage sets no USER, so it runs as root"
    user = users[-1].args.split(":")[0].strip()
    assert user not in ("root", "0"), f"USER {user} is root"


def test_exposes_port_and_listens_on_all_interfaces(stages: list[Stage]) -> None:
    final = stages[-1]
    exposed = " ".join(i.args for i in final.all("EXPOSE")).split()
    assert any(p.split("/")[0] == PORT for p in exposed), f"EXPOSE {PORT} missing"
    env = " ".join(i.args for i in final.all("ENV"))
    assert re.search(r"STYLIZE_HOST[= ]0\.0\.0\.0", env), "STYLIZE_HOST=0.0.0.0 missing"


def test_healthcheck_uses_grpc_health(stages: list[Stage]) -> None:
    checks = stages[-1].all("HEALTHCHECK")
    assert checks, "no HEALTHCHECK in the runtime stage"
    args = checks[-1].args
    assert not args.upper().startswith("NONE")
    assert "healthcheck.py" in args or "grpc_health" in args
    if "healthcheck.py" in args:
        assert (ROOT / "scripts" / "healthcheck.py").is_file()


def test_healthcheck_follows_the_servers_tls_settings(stages: list[Stage]) -> None:
    """The HEALTHCHECK pins neither plaintext nor an address, so that scripts/healthcheck.py goes by the
    server's own variables (tests/test_security.py runs it against TLS and mutual TLS servers)."""
    args = stages[-1].all("HEALTHCHECK")[-1].args
    assert "healthcheck.py" in args
    for pinned in ("--plaintext", "--address", "--tls-ca", "--tls-cert", "--tls-key", "--tls-server-name"):
        assert pinned not in args, f"the HEALTHCHECK's {pinned} overrides the server's settings"
    source = (ROOT / "scripts" / "healthcheck.py").read_text()
    server_variables = {
        "STYLIZE_PORT": "port",
        "STYLIZE_TLS_CERT": "tls_cert",
        "STYLIZE_TLS_KEY": "tls_key",
        "STYLIZE_TLS_CLIENT_CA": "tls_client_ca",
    }
    environ = {
        "STYLIZE_PORT": "6000",
        "STYLIZE_TLS_CERT": "c",
        "STYLIZE_TLS_KEY": "k",
        "STYLIZE_TLS_CLIENT_CA": "a",
    }
    config = load_config([], environ=environ)
    for variable, field_name in server_variables.items():
        assert str(getattr(config, field_name)) == environ[variable], f"the server does not read {variable}"
        assert f"{variable}" in source, f"scripts/healthcheck.py ignores the server's {variable}"


def test_runs_the_server(stages: list[Stage]) -> None:
    cmds = stages[-1].all("CMD") + stages[-1].all("ENTRYPOINT")
    assert any("stylize-server" in c.args for c in cmds), "the image should start stylize-server"


# The GPU image: `docker build --build-arg STYLIZE_EXTRAS=gpu -t stylize:gpu .` (docs/gpu.md)


def declared_args(stage: Stage) -> dict[str, str | None]:
    """ARG NAME[=DEFAULT] of a stage, defaults unquoted."""
    args: dict[str, str | None] = {}
    for ins in stage.all("ARG"):
        for word in shlex.split(ins.args):
            name, has_default, default = word.partition("=")
            args[name] = default if has_default else None
    return args


def env_values(stage: Stage) -> dict[str, str]:
    values: dict[str, str] = {}
    for ins in stage.all("ENV"):
        for word in shlex.split(ins.args):
            name, _, value = word.partition("=")
            values[name] = value
    return values


def setup_run(stages: list[Stage]) -> tuple[Stage, str]:
    for stage in stages:
        for ins in stage.all("RUN"):
            if "scripts/setup.sh" in ins.args:
                return stage, ins.args
    raise AssertionError("no RUN of scripts/setup.sh")


def test_extras_are_a_build_argument_passed_to_setup(stages: list[Stage]) -> None:
    """Empty by default, so that the plain build stays the CPU runtime without dev tools; whatever is
    given reaches scripts/setup.sh, which swaps onnxruntime for onnxruntime-gpu (test_gpu_install.py)."""
    stage, run = setup_run(stages)
    assert declared_args(stage).get("STYLIZE_EXTRAS") == ""
    assert re.search(r"STYLIZE_EXTRAS=\"\$\{?STYLIZE_EXTRAS\}?\"\s+bash\s+scripts/setup\.sh", run), run
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "gpu" in project["optional-dependencies"]


def test_gpu_build_fails_without_the_cuda_provider(stages: list[Stage]) -> None:
    """With gpu among the extras the build asks the installed onnxruntime for CUDAExecutionProvider, so
    that an image whose swap left the CPU package behind is never built; other builds skip the check."""
    _, run = setup_run(stages)
    match = re.search(r'case ",\$STYLIZE_EXTRAS," in \*,gpu,\*\)(.*?);; esac', run)
    assert match, f"no check for the gpu extra in {run}"
    assert "CUDAExecutionProvider" in match.group(1) and "get_available_providers" in match.group(1)


def test_containers_given_a_gpu_get_the_cuda_driver(stages: list[Stage]) -> None:
    # The NVIDIA container toolkit mounts only the `utility` part of the driver unless told otherwise.
    capabilities = env_values(stages[-1]).get("NVIDIA_DRIVER_CAPABILITIES", "")
    assert "compute" in capabilities.split(",") or capabilities == "all"
    assert "NVIDIA_VISIBLE_DEVICES" not in env_values(stages[-1]), (
        "the image must not expose every GPU by itself: --gpus or the device plugin choose"
    )


def test_docs_document_the_gpu_build() -> None:
    page = (ROOT / "docs" / "gpu.md").read_text()
    assert "docker build --build-arg STYLIZE_EXTRAS=gpu" in page
    assert "docker build --build-arg STYLIZE_EXTRAS=gpu" in DOCKERFILE.read_text()
