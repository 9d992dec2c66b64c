"""``python -m harness.prepare.systemgen``."""
from harness.prepare.systemgen.command import main

raise SystemExit(main())
