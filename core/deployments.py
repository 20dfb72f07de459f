"""Deployments: a tenant's stable name (``blood-cells``) for the model that serves it, with every version it had.
Torch-free; the store half of ``api.routes.deployments``.

A deployment row holds its current ``version``; ``deployment_versions`` holds each version's model, when and by
whom (the tenant's key name), and is never rewritten. ``update`` adds version n+1 and makes it current;
``rollback`` makes the version before the current one current again (the later ones stay in the history, and
the next update is numbered after the highest). Both are conditional UPDATEs on the version the caller saw, so
of two racing switches one wins and the other is told (``Conflict``) instead of silently undoing it.

A deployment is addressed by its name within its tenant: names are the tenant's own, two tenants may both
have a ``blood-cells``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from core.catalogue import Catalogue
from core.db import new_id, plain, utcnow
from core.schema import deployment_versions, deployments


class Conflict(Exception):
    """The deployment exists already, has no earlier version, or changed under the caller."""


def incompatibility(current: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why model row ``new`` cannot replace ``current`` behind one name, or None: clients of the name read
    class names and send images sized for the model, so both must stay as they were."""
    a, b = current.get("meta") or {}, new.get("meta") or {}
    if list(a.get("classes") or []) != list(b.get("classes") or []):
        return f"classes differ: {current['id']} has {a.get('classes')}, {new['id']} has {b.get('classes')}"
    if list(a.get("input_size") or []) != list(b.get("input_size") or []):
        return f"input size differs: {current['id']} takes {a.get('input_size')}, {new['id']} {b.get('input_size')}"
    return None


def create(store: Catalogue, tenant: str, name: str, model_id: str, by: str) -> dict[str, Any]:
    """Deployment ``name`` of ``tenant`` at version 1 serving ``model_id``; ``Conflict`` if the name is taken."""
    now, dep_id = utcnow(), new_id("dep")
    try:
        with store._tx() as conn:
            conn.execute(insert(deployments).values(id=dep_id, name=name, version=1, created_at=now, updated_at=now,
                                                    updated_by=by, tenant=tenant))  # fmt: skip
            conn.execute(insert(deployment_versions).values(deployment_id=dep_id, version=1, model_id=model_id,
                                                            created_at=now, created_by=by))  # fmt: skip
    except IntegrityError as e:
        raise Conflict(f"deployment {name!r} exists already: PUT /v1/deployments/{name} gives it a new version") from e
    found = get(store, tenant, name)
    assert found is not None
    return found


def get(store: Catalogue, tenant: str, name: str) -> dict[str, Any] | None:
    """The deployment with its current ``model_id`` and its ``history`` (newest version first), or None."""
    with store._tx() as conn:
        row = conn.execute(select(deployments).where(_named(tenant, name))).first()
        if row is None:
            return None
        versions = conn.execute(
            select(deployment_versions).where(deployment_versions.c.deployment_id == row.id)
            .order_by(deployment_versions.c.version.desc())
        ).all()  # fmt: skip
    return _public(plain(row._mapping), [plain(v._mapping) for v in versions])


def list_all(store: Catalogue, tenant: str | None) -> list[dict[str, Any]]:
    """Every deployment of ``tenant`` (all tenants' for None), by name, each with its current model."""
    q = select(deployments, deployment_versions.c.model_id).join(
        deployment_versions,
        sa.and_(deployment_versions.c.deployment_id == deployments.c.id,
                deployment_versions.c.version == deployments.c.version),
    ).order_by(deployments.c.name, deployments.c.tenant)  # fmt: skip
    if tenant is not None:
        q = q.where(deployments.c.tenant == tenant)
    with store._tx() as conn:
        rows = conn.execute(q).all()
    return [{k: v for k, v in plain(r._mapping).items() if k != "id"} for r in rows]


def current_model(store: Catalogue, tenant: str, name: str) -> str | None:
    """The model that ``name`` serves now (one query: it is read for every request through the name)."""
    q = select(deployment_versions.c.model_id).join(
        deployments,
        sa.and_(deployment_versions.c.deployment_id == deployments.c.id,
                deployment_versions.c.version == deployments.c.version),
    ).where(_named(tenant, name))  # fmt: skip
    with store._tx() as conn:
        return conn.execute(q).scalar()


def update_to(store: Catalogue, tenant: str, name: str, model_id: str, by: str, seen: int) -> dict[str, Any]:
    """A new version serving ``model_id``, current at once, if the current version is still ``seen``."""
    with store._tx() as conn:
        dep = conn.execute(select(deployments).where(_named(tenant, name))).first()
        if dep is None:
            raise KeyError(name)
        highest = conn.execute(select(sa.func.max(deployment_versions.c.version))
                               .where(deployment_versions.c.deployment_id == dep.id)).scalar_one()  # fmt: skip
        _switch(conn, dep.id, name, seen, highest + 1, by)
        conn.execute(insert(deployment_versions).values(deployment_id=dep.id, version=highest + 1, model_id=model_id,
                                                        created_at=utcnow(), created_by=by))  # fmt: skip
    found = get(store, tenant, name)
    assert found is not None
    return found


def previous(deployment: dict[str, Any]) -> dict[str, Any] | None:
    """The version a rollback returns to: the highest one below the current one."""
    earlier = [v for v in deployment["history"] if v["version"] < deployment["version"]]
    return earlier[0] if earlier else None


def rollback_to(store: Catalogue, tenant: str, name: str, version: int, by: str, seen: int) -> dict[str, Any]:
    """Make ``version`` current again, if the current version is still ``seen``."""
    with store._tx() as conn:
        dep_id = conn.execute(select(deployments.c.id).where(_named(tenant, name))).scalar()
        if dep_id is None:
            raise KeyError(name)
        _switch(conn, dep_id, name, seen, version, by)
    found = get(store, tenant, name)
    assert found is not None
    return found


def _switch(conn: sa.Connection, dep_id: str, name: str, seen: int, version: int, by: str) -> None:
    n = conn.execute(
        update(deployments).where(deployments.c.id == dep_id, deployments.c.version == seen)
        .values(version=version, updated_at=utcnow(), updated_by=by)
    ).rowcount  # fmt: skip
    if n != 1:
        raise Conflict(f"deployment {name!r} changed meanwhile (it is no longer at version {seen}): read it again")


def remove(store: Catalogue, tenant: str, name: str) -> bool:
    """Delete the deployment and its history; False when there was none."""
    with store._tx() as conn:
        dep_id = conn.execute(select(deployments.c.id).where(_named(tenant, name))).scalar()
        if dep_id is None:
            return False
        conn.execute(delete(deployment_versions).where(deployment_versions.c.deployment_id == dep_id))
        conn.execute(delete(deployments).where(deployments.c.id == dep_id))
    return True


def serving(store: Catalogue, model_id: str) -> list[str]:
    """The deployments (``tenant/name``) whose current version serves ``model_id``: what holds it."""
    q = select(deployments.c.tenant, deployments.c.name).join(
        deployment_versions,
        sa.and_(deployment_versions.c.deployment_id == deployments.c.id,
                deployment_versions.c.version == deployments.c.version),
    ).where(deployment_versions.c.model_id == model_id)  # fmt: skip
    with store._tx() as conn:
        return [f"{r.tenant}/{r.name}" for r in conn.execute(q)]


def _named(tenant: str, name: str) -> sa.ColumnElement[bool]:
    return sa.and_(deployments.c.tenant == tenant, deployments.c.name == name)


def _public(dep: dict[str, Any], versions: list[dict[str, Any]]) -> dict[str, Any]:
    history = [{k: v[k] for k in ("version", "model_id", "created_at", "created_by")} for v in versions]
    current = next(v for v in history if v["version"] == dep["version"])
    return {
        "name": dep["name"], "tenant": dep["tenant"], "version": dep["version"], "model_id": current["model_id"],
        "created_at": dep["created_at"], "updated_at": dep["updated_at"], "updated_by": dep["updated_by"],
        "history": history,
    }  # fmt: skip
