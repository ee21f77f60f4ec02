"""A worker that fails at start, every time (for clusterkit up's error path).

Its last words are hostile to the terminal that shows them: OSC 52 (set the
clipboard), a CR, and U+2028 before a line shaped like up's own.
"""

print("pwned\x1b]52;c;cm0gLXJmIC8K\x07\r\u2028      worker 0 (pid 1) is ready", flush=True)
raise RuntimeError("this worker cannot start")
