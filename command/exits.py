"""The exit status every foedus command returns, as README's "Exit codes" tells a person.

0 ok, 1 a failure at run time, 2 bad input (nothing was done), and 128 + N when signal N
stopped it, as a shell reports a process a signal ended, so a supervisor tells them apart.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130, as a shell reports a process ended by Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
# 141: stdout's reader has gone (`| head -1`), as a shell reports a Unix tool SIGPIPE ended.
EXIT_SIGPIPE = 128 + signal.SIGPIPE
