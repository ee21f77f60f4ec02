"""The escaping round trip, under real systemd: the worker gets exactly what the user wrote.

Hypothesis writes --exec arguments and --env values full of what systemd would
otherwise interpret (%, $, quotes, backslashes, spaces, ';'); the generated
unit runs in a container and the worker prints the argv and environment it got.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterkit import render
from clusterkit.container import Container
from clusterkit.spec import build_spec

DUMP = Path(__file__).resolve().parent / "apps" / "dump_argv.py"

tricky = st.sampled_from(list("%$\\\"' ;{}=@:/") + ["$HOME", "${X}", "%i", "%%", "\\n", "é", "☃"])
text = st.lists(
    st.one_of(tricky, st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))), max_size=10
).map("".join)


def run_once(container: Container, argv: list[str], env: dict[str, str]) -> dict:
    # --exec as the user types it: a shell-quoted string, split like a POSIX shell.
    exec_string = shlex.join([sys.executable, str(DUMP), *argv])
    spec = build_spec(
        {},
        {
            "name": "argv",
            "exec": exec_string,
            "workers": "1",
            "type": "exec",
            "restart": "no",
            "env": [f"CKTEST_{k}={v}" for k, v in env.items()],
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name, content in render.render(spec).items():
            (Path(tmp) / name).write_text(content)
            files.append(Path(tmp) / name)
        container.install_units(files)
    container.systemctl("start", "argv@0.service")
    invocation = container.systemctl("show", "-p", "InvocationID", "--value", "argv@0.service")
    invocation_id = invocation.stdout.strip()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = container.run(
            "journalctl",
            "-o",
            "cat",
            f"_SYSTEMD_INVOCATION_ID={invocation_id}",
            "_TRANSPORT=stdout",
        ).stdout.splitlines()
        if lines:
            return json.loads(lines[0])
        time.sleep(0.05)
    raise AssertionError(container.run("journalctl", "-u", "argv@0.service").stdout)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    argv=st.lists(text, max_size=5),
    env=st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,5}", fullmatch=True), text, max_size=3),
)
def test_worker_gets_the_argv_and_env_the_user_wrote(
    container: Container, argv: list[str], env: dict[str, str]
) -> None:
    got = run_once(container, argv, env)
    assert got["argv"] == argv
    assert got["env"] == {f"CKTEST_{k}": v for k, v in env.items()}


def test_the_issues_example(container: Container) -> None:
    argv = ["100%", "$HOME", "two words", "a\\b", 'say "hi"', "%i", "${X}", ";"]
    assert run_once(container, argv, {"V": "%n $USER 'q' \"d\""}) == {
        "argv": argv,
        "env": {"CKTEST_V": "%n $USER 'q' \"d\""},
    }
