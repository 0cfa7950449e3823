"""The one name a session goes by inside corral: its tenant and its id, as one key.

Session ids are per tenant: tenant B's ``s1`` is another session than tenant A's ``s1``, and B
can learn nothing about A's ids. The registry, the store's rows, the cluster directory, events
and agent output all go by the key ``tenant/id`` (neither may hold a ``/``, so no key is two
sessions'). The dev tenant's key is its bare id, so a single-tenant server's keys, rows and logs
read as its ids. Clients only ever see the id: ``id_of`` turns a key back into it.
"""

DEFAULT_TENANT = "default"  # dev mode's one tenant (web/auth.py)


def session_key(tenant: str, session_id: str) -> str:
    """The key of tenant's session ``session_id``."""
    return session_id if tenant == DEFAULT_TENANT else f"{tenant}/{session_id}"


def id_of(key: str) -> str:
    """The id a key's tenant knows its session by."""
    return key.rpartition("/")[2]
