"""``python -m distq``: the ``distq`` command line (see :mod:`distq.cli`)."""

from distq.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
