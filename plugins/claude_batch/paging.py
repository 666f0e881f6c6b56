"""Paging the batches ``list`` call: one helper for every caller, sync and async.

The API lists batches newest first, at most :data:`LIST_PAGE_LIMIT` a page; the next page is
asked for with the last batch's id as ``after_id``, and paging ends at a page without
``has_more`` or without data. Callers read pages in three shapes (the SDK's sync pages, its
async pages, and the poller's plain JSON), so the helpers take how to fetch a page and, for
JSON, how to find the next ``after_id``; the stop rule lives here once. Airflow-free.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterator
from datetime import datetime
from typing import Any, TypeVar

from anthropic.types.messages import MessageBatch

LIST_PAGE_LIMIT = 1000

Page = TypeVar("Page")


def list_params(after_id: str | None = None, limit: int = LIST_PAGE_LIMIT) -> dict[str, Any]:
    """The query of one ``list`` call: ``limit``, and ``after_id`` when paging on."""
    params: dict[str, Any] = {"limit": limit}
    if after_id:
        params["after_id"] = after_id
    return params


def next_after_id(page: Any) -> str | None:
    """The ``after_id`` of the page after an SDK page, or ``None`` when it is the last."""
    if not page.has_more or not page.data:
        return None
    return page.data[-1].id


def next_after_id_json(page: dict[str, Any]) -> str | None:
    """:func:`next_after_id` for a page read as plain JSON."""
    items = page["data"]
    if not page.get("has_more") or not items:
        return None
    return items[-1]["id"]


def iter_list_pages(
    fetch_page: Callable[[str | None], Page],
    max_pages: int,
    next_after: Callable[[Page], str | None] = next_after_id,
) -> Generator[Page, None, None]:
    """Pages newest first, at most ``max_pages`` of them.

    :param fetch_page: ``after_id -> page`` (``None`` for the first page).
    :param max_pages: a bound on the pages read.
    :param next_after: the next page's ``after_id``, ``None`` after the last page.
    """
    after_id: str | None = None
    for _ in range(max_pages):
        page = fetch_page(after_id)
        yield page
        after_id = next_after(page)
        if after_id is None:
            return


async def aiter_list_pages(
    fetch_page: Callable[[str | None], Awaitable[Page]],
    max_pages: int,
    next_after: Callable[[Page], str | None] = next_after_id,
) -> AsyncGenerator[Page, None]:
    """:func:`iter_list_pages` for an async ``fetch_page``."""
    after_id: str | None = None
    for _ in range(max_pages):
        page = await fetch_page(after_id)
        yield page
        after_id = next_after(page)
        if after_id is None:
            return


def iter_batches_since(
    fetch_page: Callable[[str | None], Any], created_after: datetime, max_pages: int = 50
) -> Iterator[MessageBatch]:
    """Yield batches newest first until one created before ``created_after``.

    :param fetch_page: ``after_id -> page`` (a SyncPage of MessageBatch, newest first).
    :param created_after: stop once batches are older than this (timezone-aware).
    :param max_pages: a bound on the pages read.
    """
    for page in iter_list_pages(fetch_page, max_pages):
        for batch in page.data:
            if batch.created_at < created_after:
                return
            yield batch
