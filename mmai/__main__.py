"""``python -m mmai ...`` is the ``mmai`` command (and ``torchrun ... -m mmai train ...``)."""

from mmai.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
