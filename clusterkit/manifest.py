"""The spec a cluster was rendered from, saved beside its units as ``NAME.clusterkit.json``.

``install`` does not trust unit text: anyone can recompute a checksum header.
It reads this manifest (from a directory only root can write), validates it
again through :func:`clusterkit.spec.build_spec` and renders the units itself.
The manifest holds the spec in ``[tool.clusterkit]`` form, so it goes through
exactly the checks a config file does.
"""

from __future__ import annotations

import json
from typing import Any

from clusterkit import spec as specs

SUFFIX = ".clusterkit.json"
FORMAT = 1


def file_name(name: str) -> str:
    return f"{name}{SUFFIX}"


def to_config(spec: specs.Spec) -> dict[str, Any]:
    """``spec`` as a [tool.clusterkit] table that build_spec turns back into the same Spec."""
    config: dict[str, Any] = {}
    for key, (attr, _parse) in specs._fields().items():
        value = getattr(spec, attr)
        if value is None:
            value = "auto" if key == "workers" else None
        if key == "listen":
            value = [listen.address for listen in value]
        elif key == "env":
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        if value is not None:
            config[key] = value
    return config


def dumps(spec: specs.Spec) -> str:
    """The manifest body (without clusterkit's header)."""
    document = {"format": FORMAT, "tool.clusterkit": to_config(spec)}
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def loads(text: str, where: str) -> specs.Spec:
    """The validated Spec of a manifest's text; SpecError names ``where`` on any problem."""
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    try:
        document = json.loads(body)
    except json.JSONDecodeError as e:
        raise specs.SpecError(f"{where}: not a clusterkit manifest ({e})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise specs.SpecError(f"{where}: unknown manifest format; regenerate with this clusterkit")
    config = document.get("tool.clusterkit")
    if not isinstance(config, dict):
        raise specs.SpecError(f"{where}: no spec in the manifest; regenerate it")
    try:
        return specs.build_spec(config, {})
    except specs.SpecError as e:
        raise specs.SpecError(f"{where}: {e}") from None
