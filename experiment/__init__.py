"""The `experiment` command: a person's client of the director (submit, watch, download, ...)."""
