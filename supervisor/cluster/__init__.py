"""Many corral nodes on one PostgreSQL: membership, single activation, fencing (docs/cluster.md).

A session is a virtual actor (Orleans): any node may activate it, the directory makes sure at most
one does at a time, and the epoch of its claim fences out a node that lost it without knowing.
"""

from corral.supervisor.cluster.directory import Directory
from corral.supervisor.cluster.membership import Membership, new_node_id

__all__ = ["Directory", "Membership", "new_node_id"]
