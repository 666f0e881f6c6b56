"""``EmulatorServer``: the emulator on a background thread, for tests and in-process use.

with EmulatorServer(api_key="sk-test", time_scale=60.0, processing_seconds=30.0, port=0, seed=0) as emu:
    client = anthropic.Anthropic(api_key="sk-test", base_url=emu.base_url)
    emu.stats(); emu.configure(cache_hit_rate=0.5); emu.advance(86_400); emu.reset()
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from .app import create_app
from .config import EmulatorConfig
from .responder import Responder
from .store import BatchStore


class _DropIntentionalCuts(logging.Filter):
    """Uvicorn logs an error when a response ends unfinished; for a results cut that is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


def quiet_intentional_cuts() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropIntentionalCuts) for f in logger.filters):
        logger.addFilter(_DropIntentionalCuts())


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening socket; port 0 picks a free port (read it back from getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def build_store(
    *,
    time_scale: float,
    processing_seconds: float,
    seed: int,
    responder: Responder | None,
    faults: dict | None,
    config: dict[str, Any],
) -> BatchStore:
    emulator_config = EmulatorConfig().updated(
        time_scale=time_scale, processing_seconds=processing_seconds, faults=faults or {}, **config
    )
    return BatchStore(emulator_config, seed=seed, responder=responder)


class EmulatorServer:
    """The emulator served by uvicorn on a daemon thread. Use as a context manager or start()/stop().

    Extra keyword arguments are EmulatorConfig fields (cache_hit_rate, max_requests_per_batch,
    max_body_bytes, cancel_seconds, ...); ``faults`` takes the JSON form documented in faults.py.
    """

    def __init__(
        self,
        api_key: str = "sk-emulator",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        time_scale: float = 1.0,
        processing_seconds: float = 60.0,
        seed: int = 0,
        responder: Responder | None = None,
        faults: dict | None = None,
        log_level: str = "warning",
        **config: Any,
    ) -> None:
        self.api_key = api_key
        self.host = host
        self.port = port
        self.log_level = log_level
        self.store = build_store(
            time_scale=time_scale,
            processing_seconds=processing_seconds,
            seed=seed,
            responder=responder,
            faults=faults,
            config=config,
        )
        self.app = create_app(self.store, api_key)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> EmulatorServer:
        if self._thread is not None:
            return self
        quiet_intentional_cuts()
        self.store.open()
        self._socket = bind_listening_socket(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="claude-batch-emulator",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the claude-batch emulator did not start")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self.store.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- in-process control (same as the admin endpoints) -----------------------------------
    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stats(self) -> dict:
        """Same as GET /_emulator/stats."""
        return self.store.stats()

    def configure(self, **changes: Any) -> dict:
        """Same as POST /_emulator/config; returns the whole configuration."""
        self.store.configure(**changes)
        return self.config()

    def config(self) -> dict:
        """Same as GET /_emulator/config."""
        return self.store.config.to_dict() | {"seed": self.store.seed}

    def advance(self, seconds: float) -> float:
        """Jump emulated time forward; returns the new emulated time (epoch seconds)."""
        return self.store.advance(seconds)

    def now(self) -> float:
        """The emulated time (epoch seconds)."""
        return self.store.now()

    def reset(self) -> None:
        """Same as POST /_emulator/reset: no batches, zero counters, start configuration without faults."""
        self.store.reset()
