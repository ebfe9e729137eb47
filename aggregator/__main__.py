"""Run the aggregator command line as ``python -m foedus.aggregator``."""

from foedus.aggregator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
