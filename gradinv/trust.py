"""Which model code may be imported: a `package.module:callable` spec runs code when built, so an
artifact's metadata may name one only if the user named the same spec (params.yaml's victim.arch,
or import-gradient's --arch). An artifact folder may come from anyone."""

from __future__ import annotations

from gradinv.errors import UserError

_USER_NAMED_CODE: set[str] = set()


def trust_model_code(spec: str | None) -> None:
    """Record a model spec the user named."""
    if isinstance(spec, str) and ":" in spec:
        _USER_NAMED_CODE.add(spec)


def check_named_code(arch: str, named_by: str) -> None:
    """Refuse, before any import, a code spec that the file `named_by` names and the user did not."""
    if ":" in arch and arch not in _USER_NAMED_CODE:
        raise UserError(f"{named_by} names the model '{arch}', which would import and run code; gradinv imports "
                        f"code named by an artifact only when params.yaml's victim.arch names it too, so set "
                        f"victim.arch: '{arch}' if you trust it.")
