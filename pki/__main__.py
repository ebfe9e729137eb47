"""Run the pki command line as ``python -m pki``."""

from pki.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
