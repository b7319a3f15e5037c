"""A study's rounds, in parts with one job each:

- ``machine``: the round state machine (phases, stages, transitions, timeouts), pure;
- ``checks``: every check on a join, an update or a report, and every refusal reason;
- ``admission``: room for the updates arriving (staging, spooling, upload reservations);
- ``store``: the global model, and the updates received, examined and handed to the strategy;
- ``persistence``: checkpoint and resume, and the halt when a write fails;
- ``record``: what the study remembers of sites and rounds, and what it shows (summary,
  outputs, ``/status``, Prometheus);
- ``coordinator``: the parts put together behind one lock, one method per RPC.

The gRPC servicer (``..service``) translates messages to the coordinator's calls and back.
"""

from .coordinator import Coordinator, DownloadRefused
from .persistence import DiskFailure

__all__ = ["Coordinator", "DiskFailure", "DownloadRefused"]
