"""``python -m pipeline.server``: same as ``pipeline-server``."""

import sys

from pipeline.server.main import main

sys.exit(main())
