"""`python -m raypipe.viz --root DIR [--host H] [--port P]`: run the dashboard server."""

import sys

from raypipe.viz.server import main

sys.exit(main())
