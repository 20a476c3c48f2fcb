"""The tick engine, one module per job:

- ``tick.py``: ``Engine``, the schedule and one tick in a straight line (read ->
  observe processes -> attribute -> book -> feed sinks -> store -> publish);
- ``reader.py``: the source reader (a thread per source, the read deadline, late
  reads merged into the next tick);
- ``book.py``: the job book (job lifecycle, energy and CO2e per job and bucket,
  device totals, restore, settlement; builds the tick record and the snapshot);
- ``store.py``: the store writer (the backlog kept while the store fails, retention).

``from wattprint.daemon.engine import Engine`` (and the names below) is the public
import; each guarantee is stated in the module that implements it.
"""

from .book import BookedTick, JobBook, Settlement
from .reader import READ_DEADLINE_FRACTION, SourceReader
from .store import CLOCK_STEP_PAUSES_PRUNE_S, PRUNE_EVERY_S, STORE_BACKLOG_CHUNK, STORE_BACKLOG_MAX_TICKS, StoreWriter
from .tick import CounterFeed, Engine, SettleSink, TickSink, feed

__all__ = [
    "BookedTick", "CLOCK_STEP_PAUSES_PRUNE_S", "CounterFeed", "Engine", "JobBook", "PRUNE_EVERY_S",
    "READ_DEADLINE_FRACTION", "STORE_BACKLOG_CHUNK", "STORE_BACKLOG_MAX_TICKS", "Settlement", "SettleSink",
    "SourceReader", "StoreWriter", "TickSink", "feed",
]
