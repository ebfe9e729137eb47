"""Run the pki command line as ``python -m foedus.pki``."""

from foedus.pki.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
