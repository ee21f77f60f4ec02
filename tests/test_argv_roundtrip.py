"""The escaping round trip, under real systemd: the worker gets exactly what the user wrote.

Hypothesis writes --exec arguments and --env values full of what systemd would
otherwise interpret (%, $, quotes, backslashes, spaces, ';'); the generated
unit runs in a container and the worker prints the argv and environment it got.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from specinput import generate

from clusterkit import render
from clusterkit.container import Container
from clusterkit.spec import build_spec

DUMP = Path(__file__).resolve().parent / "apps" / "dump_argv.py"

tricky = st.sampled_from(list("%$\\\"' ;{}=@:/") + ["$HOME", "${X}", "%i", "%%", "\\n", "é", "☃"])
# What the validator lets through: no control, format, separator, private-use
# or unassigned characters (test_spec_validation.py checks those are refused).
accepted_chars = st.characters(
    codec="utf-8", exclude_categories=("Cs", "Cc", "Cf", "Zl", "Zp", "Co", "Cn")
)
text = st.lists(st.one_of(tricky, accepted_chars), max_size=10).map("".join)


def run_once(
    container: Container, argv: list[str], env: dict[str, str], program: str = sys.executable
) -> dict:
    # --exec as the user types it: a shell-quoted string, split like a POSIX shell.
    exec_string = shlex.join([program, str(DUMP), *argv])
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
            "PRIORITY=6",  # the worker's output, not the unit's own pid line (PRIORITY=5)
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


def test_percent_dollar_quotes_and_backslashes_reach_the_worker_verbatim(
    container: Container,
) -> None:
    """The example from the issue: %, $, spaces, quotes and backslashes in argv and env."""
    argv = ["100%", "$HOME", "two words", "a\\b", 'say "hi"', "%i", "${X}", ";"]
    assert run_once(container, argv, {"V": "%n $USER 'q' \"d\""}) == {
        "argv": argv,
        "env": {"CKTEST_V": "%n $USER 'q' \"d\""},
    }


def test_a_program_path_with_dollar_quotes_and_backslash_runs(container: Container) -> None:
    """The program is an argument of the unit's start shell (exec "$@"), quoted like one."""
    program = "/opt/ck/a$HOME \"b' %i\\c/python"
    container.run("mkdir", "-p", program.rsplit("/", 1)[0], check=True)
    container.run("ln", "-s", sys.executable, program, check=True)
    assert run_once(container, ["x"], {}, program=program) == {"argv": ["x"], "env": {}}


# ---- systemd as the oracle: what the validator accepts comes back byte for byte ----
#
# Each example is a batch of settings (one daemon-reload per batch keeps this
# fast). Every setting is given to `clusterkit generate` as flags or as
# [tool.clusterkit]; a refused one must exit 2 with one line and write nothing.
# Each accepted one is installed next to its twin: the same settings with every
# free-text value replaced by a placeholder. systemd's parsed view of the two
# (every D-Bus property of every unit) may differ only where the placeholders
# were, and there it must hold exactly the user's value: nothing added, nothing
# swallowed, nothing changed.

PROPERTIES = Path(__file__).resolve().parent / "apps" / "unit_properties.py"
BATCH = 24

# Text that systemd would interpret if it were not escaped, and letters of every script.
clean_tricky = st.sampled_from(
    [*"%$\\\"' ;{}=@:/. ", "$HOME", "${X}", "%i", "%%", "é", "日本", "Ω", "\u00a0", "\u3000"]
)
clean = st.lists(st.one_of(clean_tricky, clean_tricky, accepted_chars), max_size=6).map("".join)
# Inside quotes (arguments, environment) anything clean goes, a trailing backslash too.
quoted_text = st.one_of(clean, clean.map(lambda w: w + "\\"))
# Written bare after "Key=": no spaces at the ends, no trailing backslash, and
# no whitespace at all in a unix socket path.
bare_text = clean.map(lambda w: w.lstrip(" ").rstrip("\\ "))
path_text = clean.map(lambda w: "".join(c for c in w if not c.isspace()).rstrip("\\"))
# A program path: an argument of the start shell, so quotes, backslashes and "$" too.
program_text = st.tuples(
    clean, st.sampled_from(["", " ", "%", "%i", "日 本", "$HOME", '"', "'", "\\"]), clean
).map(lambda t: re.sub(r"\.\.", "_", "".join(t)) + "x")

# Text at the edge: what systemd would mangle (a line end, a trailing backslash,
# spaces at the ends, characters the program path cannot hold) and what Python
# would take for a number.
refused_chars = st.sampled_from(
    [*"\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\u200e\ufeff\x7f\t", "²", "٣"]
)
edgy_text = st.one_of(
    st.tuples(clean, refused_chars, clean).map("".join),
    clean.map(lambda w: w + "\\"),
    clean.map(lambda w: f" {w} "),
    st.tuples(clean, st.sampled_from(["$", '"', "'", "\\", "/..", "/"]), clean).map("".join),
)
ENV_KEY = st.from_regex(r"[A-Z][A-Z0-9_]{0,4}", fullmatch=True)

clean_settings = st.fixed_dictionaries(
    {
        "exec": st.tuples(
            st.one_of(st.just(sys.executable), program_text.map(lambda w: "/opt/ck/" + w)),
            st.lists(quoted_text, max_size=3),
        ).map(lambda t: [t[0], *t[1]]),
    },
    optional={
        "description": bare_text,
        "env": st.dictionaries(ENV_KEY, quoted_text, max_size=3),
        "working-directory": bare_text.map(lambda w: "/srv/" + w),
        "listen": st.lists(
            st.one_of(
                st.sampled_from(["3000", "127.0.0.1:81", "[::1]:8080"]),
                path_text.map(lambda w: f"/run/ck/{w}.sock"),
            ),
            min_size=1,
            max_size=2,
        ),
        "workers": st.sampled_from(["1", "2"]),
        "scheduling": st.sampled_from(["shared", "reuseport"]),
        "run-as": st.sampled_from(["www-data", "1000"]),
        "restart-sec": st.sampled_from(["0", "0.5", "3"]),
        "watchdog-sec": st.sampled_from(["0", "2", "0.5"]),
        "memory-max": st.sampled_from(["512M", "50%", "1G"]),
        "hardening": st.sampled_from(["default", "none"]),
    },
)

# One edgy value for one field; the validator refuses most of them.
one_edgy_value = st.one_of(
    st.tuples(st.just("description"), edgy_text),
    st.tuples(st.just("working-directory"), edgy_text.map(lambda w: "/srv/" + w)),
    st.tuples(st.just("listen"), edgy_text.map(lambda w: ["/run/ck/" + w])),
    st.tuples(st.just("env"), st.dictionaries(ENV_KEY, edgy_text, min_size=1, max_size=2)),
    st.tuples(st.just("exec"), edgy_text.map(lambda w: ["/opt/ck/" + w, "x"])),
    st.tuples(st.just("exec"), edgy_text.map(lambda w: [sys.executable, w])),
    st.tuples(st.just("workers"), st.sampled_from(["²", "٣", "１"])),
    st.tuples(st.just("run-as"), st.sampled_from(["root", "0", "١٢", "00"])),
    st.tuples(st.just("restart-sec"), st.sampled_from(["0.0004", "٣"])),
    st.tuples(st.just("watchdog-sec"), st.sampled_from(["0.0004"])),
    st.tuples(st.just("memory-max"), st.sampled_from(["0", "٣G"])),
    st.tuples(st.just("listen"), st.sampled_from([["[fe80::1%lo]:80"], ["٣٠٠٠"]])),
)
edgy_settings = st.tuples(clean_settings, one_edgy_value).map(lambda t: {**t[0], t[1][0]: t[1][1]})

# Half the specs are clean (they must come back exactly), half have one edgy value.
settings_batches = st.lists(
    st.one_of(clean_settings, edgy_settings), min_size=BATCH, max_size=BATCH
)

PLACEHOLDER = re.compile(r"/?@[A-Z][0-9]?@")
# Where placeholders may sit. Mount dependencies follow from the paths (checked
# as values), so they are left out of the comparison.
VALUE_PROPERTIES = {"Description", "Environment", "WorkingDirectory", "RequiresMountsFor"}
# The user's command, whose words follow clusterkit's own fixed shell script in
# ExecStart= (its %-specifiers systemd expands on purpose): compared with the twin's.
EXEC_PROPERTIES = {"ExecStart", "ExecStartEx"}


def twin_of(settings: dict) -> tuple[dict, dict[str, str]]:
    """The settings with placeholders for free text, and placeholder -> the user's value."""
    twin, values = dict(settings), {}

    def hold(placeholder: str, value: str) -> str:
        values[placeholder] = value
        return placeholder

    twin["exec"] = [hold("/@P@", settings["exec"][0])] + [
        hold(f"@A{i}@", a) for i, a in enumerate(settings["exec"][1:])
    ]
    if settings.get("description"):  # "" means the default description
        twin["description"] = hold("@D@", settings["description"])
    if "env" in settings:
        twin["env"] = {k: hold(f"@E{i}@", v) for i, (k, v) in enumerate(settings["env"].items())}
    if "working-directory" in settings:
        spec_value = build_spec({"name": "x", **settings}, {}).working_directory
        twin["working-directory"] = hold("/@W@", spec_value)
    if "listen" in settings:
        listen = enumerate(settings["listen"])
        twin["listen"] = [hold(f"/@U{i}@", a) if a.startswith("/") else a for i, a in listen]
    return twin, values


def c_escaped(text: str) -> str:
    """systemd's cescape(): quotes and backslash escaped, other bytes >= 127 in octal."""
    return "".join(
        "\\" + chr(b) if b in b"\\\"'" else f"\\{b:03o}" if b >= 127 else chr(b)
        for b in text.encode()
    )


def substitute(value: object, values: dict[str, str]) -> object:
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: values[m.group()], value)
    if isinstance(value, list):
        return [substitute(v, values) for v in value]
    return value


def simplified(path: str) -> str:
    # systemd keeps a path with "//" and "/./" folded.
    return "/" + "/".join(p for p in path.split("/") if p not in ("", "."))


def worker_sees(word: str) -> str:
    """An argv word as the worker gets it: systemd turns "$$" into "$" when it
    executes; any other "$" would be expanded, which must never be needed."""
    parts = word.split("$$")
    assert not any("$" in p for p in parts), f"{word!r} would be expanded"
    return "$".join(parts)


def assert_same_command(got: list, twin: list, values: dict[str, str]) -> None:
    assert len(got) == len(twin), (got, twin)
    for (path, argv, *rest), (twin_path, twin_argv, *twin_rest) in zip(got, twin, strict=True):
        assert path == twin_path  # clusterkit's /bin/sh: the user's program is an argument
        # both as executed: clusterkit's own script has "$$" in the twin too
        want = substitute([worker_sees(a) for a in twin_argv], values)
        assert [worker_sees(a) for a in argv] == want
        assert rest == twin_rest


def without_mounts(value: object) -> object:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(v for v in value if not v.endswith(".mount"))
    return value


def assert_parsed_as_written(got: dict, twin: dict, values: dict[str, str]) -> None:
    assert got["LoadState"] == "loaded" and got.keys() == twin.keys()
    for key in got:
        if key in EXEC_PROPERTIES:
            assert_same_command(got[key], twin[key], values)
        elif key == "Listen":
            # D-Bus shows a unix socket's path C-escaped (systemd's sockaddr_pretty);
            # the socket file itself has the path as written.
            escaped = {k: c_escaped(v) for k, v in values.items()}
            assert got[key] == substitute(twin[key], escaped), key
        elif key == "RequiresMountsFor":  # a set of simplified paths
            want = sorted(map(simplified, substitute(twin[key], values)))  # type: ignore[arg-type]
            assert sorted(map(simplified, got[key])) == want, key
        elif key in VALUE_PROPERTIES:
            assert got[key] == substitute(twin[key], values), key
        else:
            assert without_mounts(got[key]) == without_mounts(twin[key]), key


UNIT_SUFFIXES = (".service", ".socket", ".target")


def unit_names(out: Path) -> list[str]:
    # Instance 0 of each template: what systemd actually loads and runs.
    return sorted(p.name.replace("@.", "@0.") for p in out.iterdir() if p.suffix in UNIT_SUFFIXES)


def install_and_read(container: Container, dirs: list[Path]) -> dict[str, dict]:
    files = [p for d in dirs for p in d.iterdir() if p.suffix in UNIT_SUFFIXES]
    container.install_units(files)
    units = [u for d in dirs for u in unit_names(d)]
    result = container.run("python3", str(PROPERTIES), *units, check=True)
    return json.loads(result.stdout)


def config_warnings(container: Container, prefix: str) -> list[str]:
    container.run("journalctl", "--sync")
    entries = container.journal("_PID=1", "--priority=warning")
    return [str(e["MESSAGE"]) for e in entries if str(e.get("CONFIG_FILE", "")).startswith(prefix)]


_batches = iter(range(10**6))


@settings(
    max_examples=4,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # shrinking a batch costs minutes
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=settings_batches)
def test_systemd_parses_every_accepted_spec_back_exactly(
    container: Container, batch: list[dict]
) -> None:
    prefix = f"o{next(_batches)}x"
    with tempfile.TemporaryDirectory() as tmp:
        accepted: list[tuple[Path, Path, dict[str, str]]] = []
        for i, given_settings in enumerate(batch):
            name = f"{prefix}{i}"
            out, twin_out = Path(tmp) / name, Path(tmp) / f"{name}-twin"
            via = "flags" if i % 2 else "config"
            status, stderr = generate(out, {"name": name, **given_settings}, via=via)
            if status != 0:
                assert status == 2 and len(stderr.splitlines()) == 1, repr(stderr)
                assert stderr.startswith("clusterkit generate: --"), stderr
                assert not out.exists()
                event("refused: " + stderr.split(":")[1].strip())
                continue
            event("accepted")
            twin, values = twin_of(given_settings)
            twin_status, twin_err = generate(twin_out, {"name": name, **twin}, via="flags")
            assert twin_status == 0, twin_err
            accepted.append((out, twin_out, values))
        if not accepted:
            return
        got = install_and_read(container, [out for out, _, _ in accepted])
        assert config_warnings(container, f"/run/systemd/system/{prefix}") == []
        twins = install_and_read(container, [t for _, t, _ in accepted])
        for out, _, values in accepted:
            for unit in unit_names(out):
                assert_parsed_as_written(got[unit], twins[unit], values)
