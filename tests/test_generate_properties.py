"""Property-based: every spec the validator accepts renders units systemd accepts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from unitcheck import verify

from clusterkit import render
from clusterkit.spec import SpecError, build_spec

# Printable text, with the characters systemd treats specially over-represented,
# and now and then one that must be refused: a line end for systemd or for
# str.splitlines(), a format character, a non-ASCII digit; values end in "\\".
special = st.sampled_from(list("%$\\\"' ;{}=@:/") + ["\\", "²", "٣", "é"])
refused = st.sampled_from(list("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\u200e\ufeff"))
clean = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))
words = st.lists(st.one_of(special, clean), max_size=12).map("".join)
# Mostly clean, sometimes with control characters (which must be rejected).
any_words = st.one_of(
    words,
    words,
    words.map(lambda w: w + "\\"),
    st.lists(st.one_of(clean, refused), max_size=12).map("".join),
    st.lists(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12).map("".join),
)
valid_name = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)

flags = st.fixed_dictionaries(
    {
        "name": st.one_of(valid_name, st.tuples(valid_name, any_words).map("".join)),
        "exec": st.lists(any_words, max_size=5).map(lambda args: ["/usr/bin/python3", *args]),
    },
    optional={
        "listen": st.lists(
            st.one_of(
                st.integers(-5, 70000).map(str),
                st.tuples(
                    st.sampled_from(["127.0.0.1", "[::1]", "0.0.0.0", "[::]", "x"]),
                    st.integers(0, 66000),
                ).map(lambda t: f"{t[0]}:{t[1]}"),
                st.from_regex(r"/run/[a-z%$ ]{1,10}\.sock", fullmatch=True),
            ),
            min_size=1,
            max_size=3,
        ),
        "workers": st.one_of(
            st.just("auto"), st.integers(-2, 2000).map(str), st.sampled_from(["²", "٣", "１"])
        ),
        "scheduling": st.sampled_from(["shared", "reuseport", "rr"]),
        "env": st.lists(
            st.tuples(st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True), words).map(
                lambda kv: f"{kv[0]}={kv[1]}"
            ),
            max_size=3,
        ),
        "working-directory": any_words.map(lambda w: "/srv/" + w),
        "description": any_words,
        "run-as": st.sampled_from(["www-data", "1000", "root", "0", "00", "١٢"]),
        "watchdog-sec": st.sampled_from(["0", "1", "2.5", "0.0004", "٣"]),
        "restart-sec": st.sampled_from(["0", "0.1", "3", "²"]),
        "cpu-affinity": st.booleans(),
        "memory-max": st.sampled_from(["512M", "1G", "50%", "lots", "0", "0%", "٣G"]),
        "type": st.sampled_from(["notify", "exec", "simple"]),
        "hardening": st.sampled_from(["strict", "default", "none"]),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags)
def test_accepted_specs_render_units_that_verify(given_flags: dict) -> None:
    try:
        spec = build_spec({}, given_flags)
    except SpecError as e:
        message = str(e)
        assert "\n" not in message
        assert message.startswith(("--", "[tool.clusterkit]"))
        event("rejected: " + message.split(":")[0])
        return
    event("accepted")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, text in render.render(spec).items():
            # Lines end only at "\n", for systemd and for str.splitlines() alike,
            # and none ends in a backslash (which would continue it).
            assert text.splitlines() == text.split("\n")[:-1], name
            assert not any(line.endswith("\\") for line in text.split("\n")), name
            (out / name).write_text(text)
        result = verify(out, spec.name)
        assert (result.returncode, result.stderr) == (0, ""), render.render(spec)
