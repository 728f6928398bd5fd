"""The dependency versions kvbench was tested with, and a one-line warning when it runs on others.

The tested ranges are kvbench's own requirements (pyproject.toml: lower bounds from constraints/lowest.txt,
upper bounds from constraints/highest.txt), read back from the installed package's metadata, so the
warning and the install can never name different ranges.
"""

from __future__ import annotations

import warnings
from functools import cache
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

# The packages whose version changes what kvbench measures; recorded in every run.json.
KEY_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "safetensors", "numpy")


class UntestedVersionWarning(UserWarning):
    """kvbench runs on a dependency version outside the range it was tested with."""


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@cache
def tested_ranges() -> dict[str, str]:
    """Package -> tested specifier (e.g. 'transformers' -> '>=5.23,<=5.24.0') of kvbench's requirements, its
    extras' included (torch and transformers are in the `engine` extra; the base install is the load client's)."""
    ranges = {}
    try:
        requirements = metadata.requires("kvbench") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed: nothing to compare
        return ranges
    for line in requirements:
        requirement = Requirement(line)
        if str(requirement.specifier) and (requirement.marker is None or "extra" in str(requirement.marker)):
            ranges[requirement.name] = _readable(str(requirement.specifier))
    return ranges


def untested() -> list[str]:
    """One line per installed core dependency outside its tested range."""
    lines = []
    for package, specifier in tested_ranges().items():
        version = installed(package)
        if version is None:
            continue
        requirement = Requirement(f"{package}{specifier}")
        if not requirement.specifier.contains(Version(version).base_version, prereleases=True):
            lines.append(
                f"{package} {version} is untested by kvbench (tested: {package}{specifier}); results may "
                "be wrong: install the tested versions with pip install -c constraints/highest.txt"
            )
    return lines


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that change what kvbench measures."""
    return {package: installed(package) for package in KEY_PACKAGES}


@cache
def warn_untested() -> None:
    """Warn (once per process) for each dependency outside its tested range."""
    for line in untested():
        warnings.warn(line, UntestedVersionWarning, stacklevel=3)


def _readable(specifier: str) -> str:
    """'<=5.24.0,>=5.23' as '>=5.23,<=5.24.0' (lower bound first)."""
    return ",".join(sorted(specifier.split(","), key=lambda part: not part.startswith(">")))
