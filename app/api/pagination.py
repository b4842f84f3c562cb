"""`?limit=&offset=` on every list, newest first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Query
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session


@dataclass
class PageParams:
    limit: int
    offset: int


# Databases take 64-bit offsets at most (found by fuzzing: a larger one was a 500); no list is this long.
MAX_OFFSET = 2**31 - 1


def page_params(limit: Annotated[int, Query(ge=1, le=200)] = 50,
                offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> PageParams:
    return PageParams(limit, offset)


PageDep = Annotated[PageParams, Depends(page_params)]


def newest_first(session: Session, model: type, tenant_id: str, page: PageParams, *where: Any) -> dict[str, Any]:
    """One page of a tenant's rows of `model` (that also meet `where`), newest first, ties by id."""
    query = select(model).where(model.tenant_id == tenant_id, *where)
    return paginate(session, query, page, (model.created_at.desc(), model.id))


def paginate(session: Session, query: Select, page: PageParams, order_by: Any) -> dict[str, Any]:
    """One page of the query's rows, ordered, with the total: what every list route answers."""
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(*order_by).limit(page.limit).offset(page.offset)).all()
    return {"items": list(rows), "total": total, "limit": page.limit, "offset": page.offset}
