"""A plain `pip install` (a wheel, not this checkout) carries the templates and renders."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_templates_and_renders_from_them(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("clusterkit_systemd-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    templates = {p.name for p in (ROOT / "templates").iterdir()}
    assert {f"clusterkit/templates/{t}" for t in templates} <= names
    # clusterkit fleet's playbooks and roles
    ansible = {str(p.relative_to(ROOT)) for p in (ROOT / "clusterkit/ansible").rglob("*.yml")}
    assert ansible and ansible <= names
    # Run the unpacked wheel, with the checkout out of reach (cwd and sys.path).
    code = (
        "import sys, clusterkit.render as r;"
        f"assert r.__file__.startswith({str(site)!r}), r.__file__;"
        "from clusterkit.spec import build_spec;"
        "units = r.render(build_spec({}, {'name': 'w', 'exec': '/bin/true', 'workers': '2'}));"
        "print(sorted(units))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['w-backoff@.service', 'w.socket', 'w.target', 'w@.service']"
