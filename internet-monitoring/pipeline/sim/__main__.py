"""``python -m pipeline.sim``: the same as ``pipeline-sim``."""

from pipeline.sim.main import main

raise SystemExit(main())
