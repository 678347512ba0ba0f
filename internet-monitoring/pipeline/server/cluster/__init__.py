"""Several server replicas on one PostgreSQL (docs/scaling.md).

Layout (sans-I/O decisions apart from the thin PostgreSQL transport)::

    identity.py    who this replica is (id carried in every bus message)
    messages.py    bus messages as dataclasses; JSON codec split under NOTIFY's 8000 bytes
    routing.py     where a commit's acks and completed events go (pure)
    ownership.py   which replica owns a sensor's session: claim, release, hand over (pure)
    pg_bus.py      LISTEN/NOTIFY and session advisory locks over psycopg (the transport)
    replica.py     the glue: feeds the pure parts from the server and the bus, runs actions
"""
