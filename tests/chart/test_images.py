"""The Dockerfiles in images/: what they copy exists, they run as uid 10001, their entry point
is a real ``fedstudy`` command, and they install with constraints.txt.

No image can be built in CI (no Docker engine, no base image to pull); scripts/build-image.sh
builds one with buildah where root and the network are at hand.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
EXPECTED = {
    "operator.Dockerfile": "operator",
    "aggregator.Dockerfile": "aggregator",
    "trainer.Dockerfile": "trainer",
    "trainer-cpu.Dockerfile": "trainer",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def exec_form(value: str) -> list[str]:
    if value.startswith("["):
        parsed = json.loads(value)
        assert isinstance(parsed, list)
        return [str(x) for x in parsed]
    return shlex.split(value)


def fedstudy_commands() -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "fedstudy", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    # The subcommands sit between braces in argparse's usage, or one per line under COMMAND.
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(line) - len(line.lstrip()) == 4 and parts:
            names.add(parts[0])
    return names


def test_every_image_has_a_dockerfile() -> None:
    assert {p.name for p in IMAGES.glob("*.Dockerfile")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dockerfile(name: str) -> None:
    steps = instructions(IMAGES / name)
    commands = fedstudy_commands()
    assert {"operator", "aggregator", "trainer", "certs"} <= commands, commands

    # COPY sources (from the build context, the repository root) exist.
    for word, args in steps:
        if word == "COPY" and "--from=" not in args:
            *sources, _dest = exec_form(args)
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path"

    # Runs as the pods' user.
    users = [args for word, args in steps if word == "USER"]
    assert users, f"{name}: no USER"
    assert users[-1].split(":")[0] == "10001", f"{name}: USER {users[-1]}"

    # The entry point is `fedstudy <command>` with a command fedstudy has.
    (entry,) = [exec_form(args) for word, args in steps if word == "ENTRYPOINT"]
    cmd = [exec_form(args) for word, args in steps if word == "CMD"]
    argv = entry + (cmd[-1] if cmd else [])
    assert argv[0] == "fedstudy", f"{name}: entry point {argv}"
    assert argv[1] == EXPECTED[name], f"{name}: runs {argv[1]}, want {EXPECTED[name]}"
    assert argv[1] in commands

    # Every pip install is pinned by constraints.txt.
    runs = " ".join(args for word, args in steps if word == "RUN")
    installs = runs.count("pip install")
    assert installs, f"{name}: installs nothing"
    assert runs.count("pip install -c constraints.txt") == installs, f"{name}: unpinned install"
    assert any(word == "COPY" and "constraints.txt" in args for word, args in steps)

    # Two stages: the build tools stay out of the final image.
    assert sum(word == "FROM" for word, _ in steps) == 2


def test_the_trainer_variants() -> None:
    cuda = (IMAGES / "trainer.Dockerfile").read_text()
    cpu = (IMAGES / "trainer-cpu.Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in cpu
    assert "download.pytorch.org/whl/cpu" not in cuda
    assert "NVIDIA_VISIBLE_DEVICES" in cuda


def test_the_chart_default_images_match_the_operator() -> None:
    import yaml
    from fedstudy_operator.options import DEFAULT_AGGREGATOR_IMAGE, DEFAULT_TRAINER_IMAGE

    values = yaml.safe_load((ROOT / "charts" / "fedstudy" / "values.yaml").read_text())
    assert values["studyImages"] == {
        "aggregator": DEFAULT_AGGREGATOR_IMAGE,
        "trainer": DEFAULT_TRAINER_IMAGE,
    }
