"""`python -m streamrec.clients.loadtest`: the load tester on its own (also `streamrec loadtest`)."""
import sys

from streamrec.clients.loadtest import main

sys.exit(main())
