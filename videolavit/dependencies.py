"""Installed dependency versions checked against the package's own requirements.

An older transformers or diffusers does not fail loudly: packed documents can silently attend to each
other, or a private hook is missing deep inside a training step. So the entry point compares what is
installed with the ranges ``pyproject.toml`` declares (read back from the installed package's metadata,
the one place they are written) and names each mismatch with the command that fixes it.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

DISTRIBUTION = "videolavit"


class DependencyError(RuntimeError):
    """An installed dependency is missing or outside the range the project declares."""


def declared_requirements(distribution: str = DISTRIBUTION) -> list[Requirement]:
    """The runtime requirements (no extras) the installed distribution declares."""
    try:
        lines = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return []
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def version_problems(requirements: list[Requirement], installed=None) -> list[str]:
    """One message per requirement the environment does not meet; ``installed`` maps name -> version."""
    lookup = installed if installed is not None else _installed_version
    problems = []
    for requirement in requirements:
        found = lookup(requirement.name)
        wanted = f"{requirement.name}{requirement.specifier}"
        if found is None:
            problems.append(f"{requirement.name} is not installed: pip install '{wanted}'")
            continue
        try:
            version = Version(found)
        except InvalidVersion:
            continue
        # A local CPU build such as 2.13.0+cpu satisfies <2.14 and ==2.13.0 alike.
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name} {found} is installed but videolavit needs {wanted}: "
                            f"pip install '{wanted}'")
    return problems


def check_dependencies(distribution: str = DISTRIBUTION) -> None:
    """Raise ``DependencyError`` naming every unmet requirement; silent when all are met."""
    problems = version_problems(declared_requirements(distribution))
    if problems:
        raise DependencyError("; ".join(problems))


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
