"""``python -m pipeline.sensor``: same as the ``pipeline-sensor`` command."""

import sys

from pipeline.sensor.main import main

sys.exit(main())
