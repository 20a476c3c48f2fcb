"""Test-only launcher: the daemon's own CLI (``python tests/sink_launcher.py run
--config ...``) with the test sink (tests/sink_jsonl.py) added to the sink list in one
line, as a new sink is added to exporters/sinks.py. tests/daemon_harness.py runs it
with ``DaemonProcess(..., launcher=...)``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sink_jsonl import JSONL_SINK_TYPE

from wattprint.daemon.cli import main
from wattprint.exporters.sinks import SINK_TYPES

SINK_TYPES.append(JSONL_SINK_TYPE)  # the one line a new sink adds

sys.exit(main())
