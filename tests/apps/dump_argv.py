"""Prints its argv and the CKTEST_* environment as one JSON line, then exits."""

import json
import os
import sys

env = {k: v for k, v in os.environ.items() if k.startswith("CKTEST_")}
print(json.dumps({"argv": sys.argv[1:], "env": env}), flush=True)
