"""``python -m shardckpt.cli``: the same as the ``shardckpt`` command."""

import sys

from shardckpt.cli.app import main

sys.exit(main())
