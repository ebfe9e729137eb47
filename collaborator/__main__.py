"""Run the collaborator command line as ``python -m foedus.collaborator``."""

from foedus.collaborator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
