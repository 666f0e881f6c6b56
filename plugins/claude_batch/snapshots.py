"""The typed batch snapshot: a batch's status in primitives, Airflow-free.

A :class:`BatchSnapshot` is what the poller learns, what a trigger event and XCom carry (as
:meth:`~BatchSnapshot.to_dict`), and what the waiting policy judges. It is built from an SDK
``MessageBatch`` or, on the poller's hot path, from the API's plain JSON, and both give the same
snapshot. ``outcome`` names canceled and expired batches as such, never as success.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from anthropic.types.messages import MessageBatch


@dataclass(frozen=True)
class BatchSnapshot:
    """A batch's status in primitives, so it can travel in a TriggerEvent and XCom."""

    id: str
    processing_status: str
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int
    created_at: str
    expires_at: str
    ended_at: str | None = None
    cancel_initiated_at: str | None = None

    @classmethod
    def from_batch(cls, batch: MessageBatch) -> BatchSnapshot:
        counts = batch.request_counts
        return cls(
            id=batch.id,
            processing_status=batch.processing_status,
            processing=counts.processing,
            succeeded=counts.succeeded,
            errored=counts.errored,
            canceled=counts.canceled,
            expired=counts.expired,
            created_at=batch.created_at.isoformat(),
            expires_at=batch.expires_at.isoformat(),
            ended_at=batch.ended_at.isoformat() if batch.ended_at else None,
            cancel_initiated_at=batch.cancel_initiated_at.isoformat() if batch.cancel_initiated_at else None,
        )

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> BatchSnapshot:
        """From the API's JSON (a ``list`` page item), without building SDK models."""
        counts = data["request_counts"]
        return cls(
            id=data["id"],
            processing_status=data["processing_status"],
            processing=counts["processing"],
            succeeded=counts["succeeded"],
            errored=counts["errored"],
            canceled=counts["canceled"],
            expired=counts["expired"],
            created_at=data["created_at"],
            expires_at=data["expires_at"],
            ended_at=data.get("ended_at"),
            cancel_initiated_at=data.get("cancel_initiated_at"),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchSnapshot:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ended(self) -> bool:
        return self.processing_status == "ended"

    @property
    def total(self) -> int:
        return self.processing + self.succeeded + self.errored + self.canceled + self.expired

    @property
    def outcome(self) -> str:
        """``in_progress``, ``succeeded`` (all), ``canceled`` or ``expired`` (none ran), or ``partial``."""
        if not self.ended:
            return "in_progress"
        if self.succeeded == self.total:
            return "succeeded"
        if self.canceled == self.total:
            return "canceled"
        if self.expired == self.total:
            return "expired"
        return "partial"

    def progress_line(self, now: datetime) -> str:
        """One log line: status, counts, age and time left before expiry."""
        created = datetime.fromisoformat(self.created_at)
        expires = datetime.fromisoformat(self.expires_at)
        return (
            f"batch {self.id}: {self.processing_status} ({self.outcome}); processing={self.processing:,} "
            f"succeeded={self.succeeded:,} errored={self.errored:,} canceled={self.canceled:,} "
            f"expired={self.expired:,}; age {human_duration(now - created)}, "
            f"expires in {human_duration(expires - now)}"
        )


def human_duration(delta: timedelta) -> str:
    """A duration for log lines: ``3h07m``, or ``4m09s`` under an hour (negative counts as 0)."""
    seconds = int(max(delta.total_seconds(), 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
