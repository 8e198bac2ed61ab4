"""`python -m streamrec.cli` = the `streamrec` command (cli/process.py starts servers this way)."""
import sys

from streamrec.cli import main

sys.exit(main())
