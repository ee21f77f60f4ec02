"""The Ansible role clusterkit ships (clusterkit/ansible/roles/clusterkit), as a playbook
of the user's own would run it, with its defaults."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = ROOT / "clusterkit" / "ansible" / "roles" / "clusterkit" / "defaults" / "main.yml"


def test_the_role_installs_this_project_from_the_package_index():
    """pip runs as root on every host: "clusterkit" on the package index is another
    project, which the role's default used to install (`clusterkit fleet` passed the
    right one, a playbook using the role alone did not)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    found = re.search(r"(?m)^clusterkit_package: *(\S+) *$", DEFAULTS.read_text())
    assert found and found[1] == project
