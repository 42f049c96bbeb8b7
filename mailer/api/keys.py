"""``/v1/keys``: list and revoke API keys (SPEC 7); creating one is ``mailer keys create``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from mailer.api.deps import runtime, scoped
from mailer.api.models import KeyList
from mailer.keys import ApiKey, list_keys, revoke_key
from mailer.runtime import Runtime

router = APIRouter(prefix="/v1/keys", tags=["keys"])

AdminKey = Annotated[ApiKey, Depends(scoped("admin"))]
Rt = Annotated[Runtime, Depends(runtime)]


@router.get("", response_model=KeyList)
def get_keys(key: AdminKey, rt: Rt) -> KeyList:
    """Every key with its scopes and times, revoked ones included; never a key itself."""
    with rt.engine.connect() as conn:
        records = list_keys(conn)
    used = rt.key_usage.last_used(r.id for r in records)
    return KeyList.model_validate(
        {"items": [r.as_json(used.get(r.id)) for r in records]})


@router.delete("/{key_id}", status_code=204)
def delete_key(key_id: Annotated[int, Path(ge=1, le=2**31 - 1)], key: AdminKey,
               rt: Rt) -> Response:
    """Revoke a key: every request with it answers 401 from now on (idempotent)."""
    with rt.engine.begin() as conn:
        revoke_key(conn, key_id, rt.clock())
    return Response(status_code=204)
