"""What the built sdist and wheel hold, checked before anyone uploads them.

    python .ci/check_dist.py DIST_DIR

DIST_DIR holds exactly one sdist and one wheel of the version pyproject.toml states. Checks:
the metadata's name, version, license expression and license file; every classifier is one
PyPI accepts (the ``trove-classifiers`` package, when importable); the wheel ships the package
with ``py.typed`` and nothing else at its top level; the sdist holds the files a rebuild and a
reader need (LICENSE, README.md, CHANGELOG.md, pyproject.toml, py.typed). ``twine check`` is
run separately (it renders the README as PyPI would).
"""

from __future__ import annotations

import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(dist: Path) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    (wheel,) = dist.glob(f"{name}-{version}-*.whl")
    (sdist,) = dist.glob(f"{name}-{version}.tar.gz")
    problems = []

    info = f"{name}-{version}.dist-info"
    license_file = f"{info}/licenses/LICENSE"
    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
        meta = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        shipped_license = zf.read(license_file) if license_file in files else None
    for want in (f"{name}/__init__.py", f"{name}/py.typed", f"{name}/cli.py",
                 license_file, f"{info}/entry_points.txt"):  # fmt: skip
        if want not in files:
            problems.append(f"{wheel.name}: no {want}")
    if shipped_license not in (None, (ROOT / "LICENSE").read_bytes()):
        problems.append(f"{wheel.name}: its LICENSE differs from the repository's")
    extra = {f.split("/", 1)[0] for f in files} - {name, info}
    if extra:
        problems.append(f"{wheel.name}: unexpected top-level entries {sorted(extra)}")

    expected = {"Name": name, "Version": version, "License-Expression": project["license"]}
    for field, value in expected.items():
        if meta.get(field) != value:
            problems.append(f"METADATA {field}: {meta.get(field)!r}, expected {value!r}")
    if meta.get_all("License-File") != ["LICENSE"]:
        problems.append(f"METADATA License-File: {meta.get_all('License-File')}")
    content_type = meta.get("Description-Content-Type")
    if content_type != "text/markdown":
        problems.append(f"METADATA Description-Content-Type: {content_type!r}")
    classifiers = meta.get_all("Classifier") or []
    if classifiers != project["classifiers"]:
        problems.append("METADATA classifiers differ from pyproject.toml's")
    try:
        from trove_classifiers import classifiers as known
    except ImportError:
        print("check_dist: trove-classifiers not installed; classifiers not validated")
    else:
        problems += [f"unknown classifier {c!r}" for c in classifiers if c not in known]
    urls = meta.get_all("Project-URL") or []
    if len(urls) != len(project["urls"]):
        problems.append(f"METADATA Project-URL: {urls}")

    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    for want in ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", f"{name}/py.typed"):
        if want not in members:
            problems.append(f"{sdist.name}: no {want}")
    return problems


if __name__ == "__main__":
    found = main(Path(sys.argv[1]))
    for problem in found:
        print(f"check_dist: {problem}", file=sys.stderr)
    if found:
        sys.exit(1)
    print(f"check_dist: sdist and wheel ok ({sys.argv[1]})")
