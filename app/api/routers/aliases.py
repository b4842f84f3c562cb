"""Aliases: a tenant's names for its classifiers (`production`), usable in place of a classifier id
for get, predict, prediction jobs and export; moved to a new classifier atomically."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from app.api.deps import SessionDep, TenantDep
from app.api.schemas import AliasOut, AliasSet
from app.core import crud
from app.core.models import ClassifierAlias

router = APIRouter(prefix="/v1/aliases", tags=["aliases"])
AliasName = Annotated[str, Path(pattern=crud.ALIAS_PATTERN, description="lower case, digits, `.`, `_`, `-`; "
                                                                         "not starting with `clf_`")]


@router.get("", response_model=list[AliasOut])
def list_aliases(session: SessionDep, tenant: TenantDep) -> list[ClassifierAlias]:
    return crud.list_aliases(session, tenant.id)


@router.put("/{alias_name}", response_model=AliasOut, responses={404: {"description": "classifier not found"}})
def set_alias(alias_name: AliasName, body: AliasSet, session: SessionDep, tenant: TenantDep) -> ClassifierAlias:
    """Create the alias, or move it: requests that use it see the old classifier or the new one, never
    a mix (one row update; each request resolves the alias once)."""
    return crud.set_alias(session, tenant.id, alias_name, body.classifier_id)


@router.get("/{alias_name}", response_model=AliasOut)
def get_alias(alias_name: AliasName, session: SessionDep, tenant: TenantDep) -> ClassifierAlias:
    return crud.get_alias(session, tenant.id, alias_name)


@router.delete("/{alias_name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_alias(alias_name: AliasName, session: SessionDep, tenant: TenantDep) -> None:
    crud.delete_alias(session, tenant.id, alias_name)
