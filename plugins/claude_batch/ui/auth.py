"""Who may see and act on the Claude Batches page: Airflow's own token, the auth manager's DAG permissions.

Airflow mounts a plugin's FastAPI app as it is, with no authentication. Every route of the page
therefore depends on :func:`reader`, which is built on Airflow's own ``get_user`` dependency
(``airflow.api_fastapi.core_api.security``): the JWT from an ``Authorization: Bearer`` header or
the UI's ``_token`` cookie, checked by the auth manager's JWT validator (signature, audience,
expiry, revocation). No token, or an expired one: 401; a token that does not validate: 403.

What a user may do is the configured auth manager's answer, asked per DAG as Airflow's own
routes ask it (``is_authorized_dag``):

- reaching the page at all needs read access to some DAG (else 403, before any warehouse is opened);
- a workload is shown to a user who may read (``GET``) *every* DAG the ledger says ran it (its
  items, costs and failure reasons belong to those DAGs); a workload whose ledger names no DAG
  needs read access to DAGs in general;
- a requeue needs edit access (``PUT``, as clearing or marking a DAG's runs does) on every one
  of those DAGs: the requeued items go out with the next run of any of them.

A requeue form also carries :func:`form_token`, an HMAC of the user, connection and workload
under the API server's secret key, so that only a page served to that user can post it (the
session cookie is already ``SameSite=Lax``; this is the second lock).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any, Literal

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import HTTPException, status

Method = Literal["GET", "PUT"]


def may_read_any_dag(user: Any) -> bool:
    """Whether the user may read some DAG: all DAGs, or at least one the metadata database knows."""
    manager = get_auth_manager()
    if manager.is_authorized_dag(method="GET", user=user):
        return True
    return bool(manager.get_authorized_dag_ids(user=user, method="GET"))


def reader(user: GetUserDep) -> Any:
    """Every route's gate: an authenticated user (Airflow's ``get_user``) who may read some DAG (else 403).

    A plain function: FastAPI runs it in its thread pool, so the auth manager's database look-ups
    never block the server's event loop.
    """
    if not may_read_any_dag(user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "You may not read any DAG, so no workload either.")
    return user


def may_access_dags(user: Any, dag_ids: Iterable[str], method: Method) -> bool:
    """Whether the auth manager lets ``user`` do ``method`` on every DAG in ``dag_ids``.

    :param dag_ids: the workload's DAGs; none: asked of DAGs in general.
    """
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    manager = get_auth_manager()
    wanted = sorted(set(dag_ids))
    if not wanted:
        return bool(manager.is_authorized_dag(method=method, user=user))
    teams = _team_names(wanted)
    return all(
        manager.is_authorized_dag(
            method=method, user=user, details=DagDetails(id=dag_id, team_name=teams.get(dag_id))
        )
        for dag_id in wanted
    )


def _team_names(dag_ids: list[str]) -> dict[str, str | None]:
    """Each DAG's team (only in multi-team mode; otherwise no DAG has one and nothing is looked up)."""
    from airflow.configuration import conf

    if not conf.getboolean("core", "multi_team", fallback=False):
        return {}
    from airflow.models.dag import DagModel

    return DagModel.get_dag_id_to_team_name_mapping(dag_ids)


def login_url(next_url: str) -> str:
    """The auth manager's login page, coming back to ``next_url``."""
    return get_auth_manager().get_url_login(next_url=next_url)


def user_name(user: Any) -> str:
    """The name Airflow shows for the user (recorded in the ledger as who requeued)."""
    return str(user.get_name())


def form_token(user: Any, conn_id: str, workload: str) -> str:
    """The requeue form's token: only a page served to this user for this workload carries it."""
    message = "\x1f".join((user_name(user), conn_id, workload)).encode()
    return hmac.new(_secret_key(), message, hashlib.sha256).hexdigest()


def check_form_token(user: Any, conn_id: str, workload: str, token: str | None) -> None:
    """403 unless ``token`` is :func:`form_token` of this user, connection and workload."""
    if not token or not hmac.compare_digest(token, form_token(user, conn_id, workload)):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "The requeue form has expired or is not yours: reload the page."
        )


def _secret_key() -> bytes:
    from airflow.configuration import conf

    key = conf.get("api", "secret_key", fallback="") or conf.get("api_auth", "jwt_secret", fallback="")
    if not key:
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, "The API server has no [api] secret_key.")
    return key.encode()
