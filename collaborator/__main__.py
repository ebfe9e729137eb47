"""Run the collaborator command line as ``python -m collaborator``."""

from collaborator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
