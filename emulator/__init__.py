"""A faithful, in-process emulator of the HipChat REST API v2 (see docs/emulator.md).

::

    from emulator import EmulatorServer
    srv = EmulatorServer(port=0).start()
    srv.state.post_message("General", "AliceA", "hello @bobb")
    ...  # point a client at srv.base_url with srv.admin_token
    srv.stop()
"""

from emulator.calllog import CallRecord
from emulator.errors import ApiError, BadRequestError, NotFoundError
from emulator.server import EmulatorServer
from emulator.state import EmulatorState
from emulator.testing import ManualClock, running_emulator

__all__ = [
    "ApiError",
    "BadRequestError",
    "CallRecord",
    "EmulatorServer",
    "EmulatorState",
    "ManualClock",
    "NotFoundError",
    "running_emulator",
]
