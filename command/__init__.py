"""What every foedus command-line process does alike, whatever it runs.

The aggregator, collaborator, director, envoy, experiment and pki commands answer a person the
same way (exit codes, usage errors in one line, `PROG: error: ...`) and the long-running ones
log and stop on signals the same way; that is written once here, each command's own checks and
messages stay in its `cli` module.
"""
