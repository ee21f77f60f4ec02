"""Prints, as one JSON object, every D-Bus property systemd holds for each unit named.

Run inside a container: ``python3 unit_properties.py app@0.service app.socket``.
busctl's JSON keeps every string exact (no quoting to undo), so these are the
values systemd's own parser produced from the unit files.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def bus_path(unit: str) -> str:
    # sd-bus's label escaping; reading the object loads the unit.
    escaped = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in unit)
    return "/org/freedesktop/systemd1/unit/" + escaped


def properties(unit: str) -> dict:
    argv = ["busctl", "--json=short", "call", "org.freedesktop.systemd1", bus_path(unit)]
    argv += ["org.freedesktop.DBus.Properties", "GetAll", "s", ""]  # "": every interface
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    return {key: value["data"] for key, value in json.loads(result.stdout)["data"][0].items()}


with ThreadPoolExecutor(8) as pool:
    print(json.dumps(dict(zip(sys.argv[1:], pool.map(properties, sys.argv[1:]), strict=True))))
