# SPDX-License-Identifier: MIT
# `python -m donecache` for the installed package (see pyproject.toml): the
# wheel ships donecache.py as donecache/__init__.py, beside py.typed.
import sys

from donecache import main

sys.exit(main())
