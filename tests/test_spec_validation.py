"""Every value written into a unit comes back from systemd's parser byte for byte.

Fast checks, one per class of input the spec refuses (given as flags and as
[tool.clusterkit]), and of the escaping that lets the rest through unchanged.
tests/test_argv_roundtrip.py asks systemd itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from specinput import as_toml, generate

from clusterkit import render
from clusterkit.spec import VALUE_MAX_CHARS, Spec, SpecError, build_spec

PYTHON = "/usr/bin/python3"
BASE: dict[str, Any] = {"name": "app", "exec": [PYTHON, "-m", "http.server"]}

# Characters that end a line for systemd or for Python's str.splitlines(), and
# invisible format characters.
LINE_ENDS = {
    "lf": "\n",
    "cr": "\r",
    "vt": "\v",
    "ff": "\f",
    "fs": "\x1c",
    "gs": "\x1d",
    "rs": "\x1e",
    "nel": "\x85",
    "line-separator": "\u2028",
    "paragraph-separator": "\u2029",
}
FORMAT_CHARS = {"lrm": "\u200e", "bom": "\ufeff", "rlo": "\u202e", "private-use": "\ue000"}


def _free_text_cases() -> dict[str, tuple[dict[str, Any], str]]:
    """Each bad character in each field that carries free text."""
    cases = {}
    for label, c in {**LINE_ENDS, **FORMAT_CHARS}.items():
        cases[f"description-{label}"] = ({"description": f"a{c}b"}, "--description")
        cases[f"exec-arg-{label}"] = ({"exec": [PYTHON, f"a{c}ExecStartPre=+/bin/sh"]}, "--exec")
        cases[f"env-{label}"] = ({"env": {"A": f"x{c}y"}}, "--env")
    for label, c in LINE_ENDS.items():
        cases[f"working-directory-{label}"] = ({"working-directory": f"/srv/a{c}b"}, "--working")
        cases[f"program-{label}"] = ({"exec": [f"/opt/a{c}b"]}, "--exec")
        cases[f"unix-listen-{label}"] = ({"listen": [f"/run/a{c}.sock"]}, "--listen")
    return cases


BAD = {
    **_free_text_cases(),
    # systemd continues a line that ends in "\": the next directive would vanish.
    "description-trailing-backslash": ({"description": "web\\"}, "--description"),
    "working-directory-trailing-backslash": ({"working-directory": "/srv/a\\"}, "--working"),
    # ... also when normalizing the path leaves it at the end (found by the systemd oracle).
    "working-directory-backslash-slash": ({"working-directory": "/srv/a\\/"}, "--working"),
    "unix-listen-trailing-backslash": ({"listen": ["/run/a\\"]}, "--listen"),
    # systemd strips spaces around an unquoted value.
    "description-leading-space": ({"description": " web"}, "--description"),
    "working-directory-trailing-space": ({"working-directory": "/srv/a "}, "--working"),
    "unix-listen-trailing-space": ({"listen": ["/run/a.sock "]}, "--listen"),
    # Non-ASCII digits are never numbers.
    "workers-superscript": ({"workers": "²"}, "--workers"),
    "workers-arabic-indic": ({"workers": "٣"}, "--workers"),
    "workers-fullwidth": ({"workers": "４"}, "--workers"),
    "port-arabic-indic": ({"listen": ["٣٠٠٠"]}, "--listen"),
    "port-superscript": ({"listen": ["127.0.0.1:8²"]}, "--listen"),
    "user-arabic-indic": ({"run-as": "١٢"}, "--run-as"),
    "restart-sec-arabic-indic": ({"restart-sec": "٣"}, "--restart-sec"),
    "drain-timeout-superscript": ({"drain-timeout": "³"}, "--drain-timeout"),
    "memory-max-arabic-indic": ({"memory-max": "٣G"}, "--memory-max"),
    "tasks-max-arabic-indic": ({"tasks-max": "٣"}, "--tasks-max"),
    # systemd 252 refuses every IPv6 zone id in ListenStream=.
    "zone-id": ({"listen": ["[fe80::1%eth0]:80"]}, "--listen"),
    "zone-id-numeric": ({"listen": ["[fe80::1%2]:80"]}, "--listen"),
    "zone-id-separator": ({"listen": ["[fe80::1%e\u2028x]:80"]}, "--listen"),
    "zone-id-slash": ({"listen": ["[fe80::1%../x]:80"]}, "--listen"),
    # Values that would silently switch a feature off.
    "watchdog-under-1ms": ({"watchdog-sec": "0.0004"}, "--watchdog-sec"),
    "restart-sec-under-1ms": ({"restart-sec": "0.0004"}, "--restart-sec"),
    "memory-max-zero": ({"memory-max": "0"}, "--memory-max"),
    "memory-max-zero-unit": ({"memory-max": "0M"}, "--memory-max"),
    "memory-max-zero-percent": ({"memory-max": "0%"}, "--memory-max"),
    "tasks-max-zero": ({"tasks-max": 0}, "--tasks-max"),
    # systemd's own form for DefaultTasksMax=, but a share of the host, not a bound per worker
    "tasks-max-percent": ({"tasks-max": "15%"}, "--tasks-max"),
    # past the most pids a host has: a bound that bounds nothing
    "tasks-max-past-pid-max-limit": ({"tasks-max": "4194305"}, "--tasks-max"),
    # Workers never run as root.
    "user-root": ({"run-as": "root"}, "--run-as"),
    "user-uid-0": ({"run-as": "0"}, "--run-as"),
    "user-uid-00": ({"run-as": "00"}, "--run-as"),
    "group-root": ({"run-as": "1000", "group": "root"}, "--group"),
    "group-gid-0": ({"run-as": "1000", "group": "0"}, "--group"),
    # nor as the overflow id other services share (systemd-analyze: "not safe")
    "user-nobody": ({"run-as": "nobody"}, "--run-as"),
    "user-uid-65534": ({"run-as": "65534"}, "--run-as"),
    "group-nogroup": ({"run-as": "1000", "group": "nogroup"}, "--group"),
    # NAME-backoff@.service is cluster NAME's back-off unit
    "name-backoff": ({"name": "web-backoff"}, "--name"),
    # systemd hands these to the workers: only the cluster's own (here "app"), never
    # another program's (dpkg's maintainer scripts run as root) nor clusterkit's /run tree
    "state-directory-not-own": ({"state-directory": "dpkg"}, "--state-directory"),
    "cache-directory-not-own": ({"cache-directory": "apt"}, "--cache-directory"),
    "runtime-directory-not-own": ({"runtime-directory": "systemd/system"}, "--runtime-directory"),
    "runtime-directory-clusterkit": (
        {"runtime-directory": "clusterkit/starts"},
        "--runtime-directory",
    ),
}

# Wrong TOML types: only a config file can spell them.
BAD_TOML_ONLY = {
    "env-bool": ({"env": {"DEBUG": True}}, "--env"),
    "env-float": ({"env": {"RATE": 1.5}}, "--env"),
    "env-list": ({"env": {"HOSTS": ["a", "b"]}}, "--env"),
    "workers-bool": ({"workers": True}, "--workers"),
    "workers-float": ({"workers": 2.0}, "--workers"),
    "restart-sec-bool": ({"restart-sec": True}, "--restart-sec"),
    "memory-max-bool": ({"memory-max": True}, "--memory-max"),
    "tasks-max-bool": ({"tasks-max": True}, "--tasks-max"),
    "listen-bool": ({"listen": [True]}, "--listen"),
    "user-int-0": ({"run-as": 0}, "--run-as"),
    "description-int": ({"description": 7}, "--description"),
    # systemd reads a unit line of at most 1 MiB: past it the unit does not load at all
    "env-too-long": ({"env": {"A": "x" * 70_000}}, "--env"),
    "description-too-long": ({"description": "d" * 70_000}, "--description"),
    "exec-too-long": ({"exec": [PYTHON, *["y" * 60_000] * 3]}, "--exec"),
}


def assert_refused(out: Path, settings: dict[str, Any], field: str, via: str) -> None:
    status, stderr = generate(out, {**BASE, **settings}, via=via)
    assert status == 2, stderr
    # One line: Python's splitlines() sees every line end there is.
    assert len(stderr.splitlines()) == 1 and stderr.endswith("\n"), repr(stderr)
    assert stderr.startswith(f"clusterkit generate: {field}"), stderr
    assert not out.exists()


@pytest.mark.parametrize("via", ["flags", "config"])
@pytest.mark.parametrize("settings,field", BAD.values(), ids=BAD.keys())
def test_refused_with_one_line_naming_the_field(
    tmp_path: Path, settings: dict[str, Any], field: str, via: str
) -> None:
    assert_refused(tmp_path / "units", settings, field, via)


@pytest.mark.parametrize("settings,field", BAD_TOML_ONLY.values(), ids=BAD_TOML_ONLY.keys())
def test_wrong_toml_types_are_refused(tmp_path: Path, settings: dict[str, Any], field: str) -> None:
    assert_refused(tmp_path / "units", settings, field, "config")


def test_a_config_file_that_is_no_config_is_refused_in_one_line(tmp_path: Path) -> None:
    """A config named with --config may be the app's, and swapped after the operator read
    it: a FIFO (which would block the root command for ever), a device that never ends, a
    huge file, arrays nested thousands deep (a RecursionError in tomllib). Each is refused
    with one line naming the problem, exit 2, nothing written."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    deep = tmp_path / "deep.toml"
    deep.write_text(as_toml(BASE) + "env = " + "[" * 5000 + "]" * 5000 + "\n")
    huge = tmp_path / "huge.toml"
    huge.write_text(as_toml(BASE) + f"# {'x' * (1 << 20)}\n")
    cases = {
        fifo: "is not a regular file",
        Path("/dev/zero"): "is not a regular file",
        deep: "nests its values too deeply",
        huge: "is larger than 1 MiB",
    }
    for path, problem in cases.items():
        out = tmp_path / "units"
        argv = [sys.executable, "-m", "clusterkit.cli", "generate", "--config", str(path)]
        r = subprocess.run(
            [*argv, "--output", str(out)], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2, (path, r.stderr)
        assert r.stderr.strip().splitlines()[-1] == (
            f"clusterkit generate: --config: {path} {problem}"
        ), r.stderr
        assert not out.exists()


def test_the_longest_values_make_units_that_load(tmp_path: Path) -> None:
    """Values at the limits: every unit still passes systemd-analyze verify (a line past
    1 MiB failed to load: "No buffer space available")."""
    settings = {
        **BASE,
        "env": {"A": "%$\\" * (VALUE_MAX_CHARS // 3)},
        "description": "d" * VALUE_MAX_CHARS,
    }
    out = tmp_path / "units"
    status, stderr = generate(out, settings, via="config")
    assert status == 0, stderr
    r = subprocess.run(
        ["systemd-analyze", "verify", str(out / "app@.service")], capture_output=True, text=True
    )
    assert (r.returncode, r.stderr) == (0, ""), r.stderr[-500:]


def test_a_refused_spec_leaves_the_previous_units_alone(tmp_path: Path) -> None:
    out = tmp_path / "units"
    assert generate(out, BASE, via="flags")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status, _ = generate(out, {**BASE, "description": "a\u2028b"}, via="flags")
    assert status == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("user", ["root", "0"])
def test_generate_refuses_root_workers_and_says_why(tmp_path: Path, user: str) -> None:
    status, stderr = generate(tmp_path / "units", {**BASE, "run-as": user}, via="flags")
    assert status == 2 and "never run as root" in stderr


@pytest.mark.parametrize(
    "settings",
    [
        {"description": "Café frontend"},
        {"description": "日本語のサービス"},
        {"description": "naïve – “quoted” 100% $HOME \\ back"},
        {"run-as": "app", "group": "app"},
        {"run-as": "1000"},
        {"restart-sec": "0"},
        {"watchdog-sec": "0.001"},
        {"memory-max": "1"},
        {"listen": ["[fe80::1]:80", "/run/a\\b%c$d.sock"]},
        {"exec": ["/opt/my app/100%/python", "end\\", "\\"]},
        {"env": {"A": "ends in \\", "B": " spaced "}},
    ],
    ids=str,
)
def test_plain_values_are_accepted(tmp_path: Path, settings: dict[str, Any]) -> None:
    for via in ("flags", "config"):
        status, stderr = generate(tmp_path / via, {**BASE, **settings}, via=via)
        assert status == 0, stderr


def test_toml_integers_in_env_are_their_decimal_text() -> None:
    assert build_spec({**BASE, "env": {"N": 3, "S": "true"}}, {}).env == (("N", "3"), ("S", "true"))


# ---- the exact text written: each would be a different value if the escaping went ----


def service(**values: Any) -> str:
    spec = build_spec({}, {"name": "app", "exec": f"{PYTHON} -c pass", **values})
    return render.render(spec)["app@.service"]


def test_exec_start_quotes_every_word_and_escapes_percent_and_dollar() -> None:
    text = service(exec=["/opt/my app/100%", "$HOME", "%i", 'say "hi"', "a\\b", "end\\"])
    line = next(x for x in text.split("\n") if x.startswith("ExecStart="))
    # the user's words follow clusterkit's start shell and its name for $0
    assert line.startswith("ExecStart=/bin/sh -c '")
    assert line.endswith(
        '\' clusterkit "/opt/my app/100%%" "$$HOME" "%%i" "say \\"hi\\"" "a\\\\b" "end\\\\"'
    )


def test_environment_escapes_percent_and_quotes_but_keeps_dollar() -> None:
    text = service(env=['V=%n $USER "d" \\'])
    assert 'Environment="V=%%n $USER \\"d\\" \\\\"\n' in text


def test_unquoted_values_escape_percent() -> None:
    text = service(description="100% up", **{"working-directory": "/srv/100%"})
    assert "Description=100%% up worker %i\n" in text
    assert "WorkingDirectory=/srv/100%%\n" in text


@pytest.mark.parametrize(
    ("scheduling", "listen", "workers"),
    [("shared", "/run/100%.sock", "2"), ("shared", "8080", "auto"), ("reuseport", "8080", "2")],
)
def test_every_unit_of_the_set_escapes_percent(scheduling: str, listen: str, workers: str) -> None:
    # Each file and each template line that writes a value (the socket's, the
    # target's and the service's Description=, ListenStream=, EnvironmentFile=):
    # a lone "%" would be read as a specifier.
    spec = build_spec(
        {},
        {
            "name": "app",
            "exec": f"{PYTHON} -c pass",
            "description": "100% up",
            "env-file": "/etc/ck/100%.env",
            "listen": [listen],
            "scheduling": scheduling,
            "workers": workers,
        },
    )
    units = {
        k: v
        for k, v in render.render(spec).items()
        if k.endswith((".service", ".socket", ".target"))
    }
    assert len(units) == 4, sorted(units)
    for name, text in units.items():
        assert not re.search(r"100%(?!%)", text), (name, text)
        assert re.search(r"^Description=(Crash-loop back-off of )?100%% up ", text, re.M), text
    assert "EnvironmentFile=/etc/ck/100%%.env\n" in units["app@.service"]
    if listen.startswith("/"):
        assert "ListenStream=/run/100%%.sock\n" in units["app.socket"]


@pytest.mark.parametrize("field", ["description", "working-directory", "env"])
@pytest.mark.parametrize("char", ["\n", "\r"], ids=["lf", "cr"])
def test_carriage_return_and_newline_are_refused(field: str, char: str) -> None:
    value = f"A=x{char}ExecStartPre=+/bin/sh" if field == "env" else f"/x{char}ExecStartPre=+/x"
    with pytest.raises(SpecError, match=f"^--{field}: contains U\\+000[AD]"):
        build_spec({}, {"name": "app", "exec": PYTHON, field: value})


def test_rendering_splits_lines_at_newline_only() -> None:
    # Past the validator (a Spec built directly): a separator inside a value
    # stays inside its line instead of starting a directive.
    spec = Spec(name="app", exec=(PYTHON,), description="a\u2028ExecStartPre=+/bin/sh\x85b")
    text = render.render(spec)["app@.service"]
    assert "Description=a\u2028ExecStartPre=+/bin/sh\x85b worker %i\n" in text
