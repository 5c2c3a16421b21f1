"""Exit 0 when this interpreter's environment holds exactly a lock file's packages.

    python scripts/venv_matches_lock.py [--explain] requirements/test.txt

Every `name==version` line of the lock must be installed at that version, and no
other distribution may be installed, except pip itself (the venv's own installer,
which the lock cannot pin without pinning itself) and this project. With
--explain, the differences are printed.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)(?: ; ([^\\]+))?")
_UNPINNED = {"pip", "imagegen"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def differences(lock: Path) -> list[str]:
    wanted: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        match = _PIN.match(line)
        # A line for another platform (`; sys_platform == 'win32'`) is not wanted here.
        if match and (match[3] is None or Marker(match[3].strip()).evaluate()):
            wanted[_norm(match[1])] = match[2]
    installed = {_norm(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    found = []
    for name, version in sorted(wanted.items()):
        have = installed.get(name)
        if have != version:
            found.append(f"{name}: lock {version}, installed {have or 'nothing'}")
    for name in sorted(set(installed) - set(wanted) - _UNPINNED):
        found.append(f"{name}: installed {installed[name]}, not in the lock")
    return found


def main(argv: list[str]) -> int:
    explain = "--explain" in argv
    paths = [a for a in argv if a != "--explain"]
    if len(paths) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    found = differences(Path(paths[0]))
    if explain:
        for line in found:
            print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
