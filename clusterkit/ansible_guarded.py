"""``ansible-playbook`` and ``ansible-inventory``, run behind clusterkit's import guard.

    python -I -m clusterkit.ansible_guarded playbook|inventory [ARGS...]

Ansible runs as root in a process of its own and imports its dependencies there
(PyYAML, jinja2, cryptography, resolvelib): as root, this first checks the code it
starts from, as root's ``clusterkit`` does (:func:`clusterkit.trust.why_code_untrusted`),
then guards every import after (:func:`clusterkit.trust.guard_imports`), and runs
ansible's own entry point. What ansible reads as data rather than imports (the
modules it ships to hosts) :func:`clusterkit.fleet.ansible_command` checks beforehand.
"""

from __future__ import annotations

import importlib
import sys

from clusterkit import trust

ENTRY_POINTS = {"playbook": "ansible.cli.playbook", "inventory": "ansible.cli.inventory"}


def main(argv: list[str] | None = None) -> int:
    tool, *args = sys.argv[1:] if argv is None else argv
    if trust.as_root():
        reason = trust.why_code_untrusted()
        if reason is not None:
            print(
                f"ansible-{tool}: not running as root from code another user can change: {reason}",
                file=sys.stderr,
            )
            return 2
        trust.guard_imports()
    sys.argv = [f"ansible-{tool}", *args]
    try:
        return importlib.import_module(ENTRY_POINTS[tool]).main()
    except trust.UntrustedCode as e:
        print(f"ansible-{tool}: not running as root: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
