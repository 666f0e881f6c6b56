"""An emulator of the Claude Message Batches API (plus Messages and token counting), over HTTP.

The official ``anthropic`` SDK talks to it as to the real API (``base_url=emu.base_url``).
Batches progress in emulated time, answers are deterministic and schema-aware, usage and
prompt caching behave like the real ones, and faults can be injected. See ``app.py`` for the
endpoints, ``faults.py`` for the fault configuration, ``responder.py`` for the responder
protocol, and ``server.py`` / ``cli.py`` for running it.
"""

from .config import EmulatorConfig
from .faults import FaultConfig
from .responder import DefaultResponder, Responder, ResponderError, ResponseContext
from .server import EmulatorServer

__all__ = [
    "DefaultResponder",
    "EmulatorConfig",
    "EmulatorServer",
    "FaultConfig",
    "Responder",
    "ResponderError",
    "ResponseContext",
]
