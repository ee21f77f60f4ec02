"""clusterkit: Node's cluster module for Python, with systemd as the primary.

Importing this package is cheap on purpose: every worker imports it on every
start, so nothing here pulls in Jinja2, the CLI or the generator.
"""

__version__ = "0.1.0"
