"""python3 -m kvserve_client: the kvserve-client command line."""

import sys

from kvserve_client.cli import main

sys.exit(main())
