"""Offline checks of the AWS node types made for multi-node training: EFA, placement, security group.

Without EFA interfaces a p4d/p5 node still trains, but NCCL finds no faster network than its one
ENA interface and moves every collective over TCP sockets (~5 GB/s a node where EFA gives 40-320:
plan/comm.py). So for an instance type of EFA_INTERFACES a node type must have, in `node_config`:

- `NetworkInterfaces`: one EFA interface per network card (4 on p4d, 32 on p5), NetworkCardIndex
  0..n-1, the primary (card 0, device 0) `efa` (an `efa-only` interface cannot be primary), the
  others device index 1 (AWS EC2 user guide, "Maximize network bandwidth on Amazon EC2 instances
  with multiple network cards");
- every interface in one subnet and one security group, each given on the interface and not on the
  node_config (Ray's bootstrap refuses it otherwise, ray/autoscaler/_private/aws/config.py
  `_configure_subnets_and_groups_from_network_interfaces`): EFA's OS-bypass traffic does not cross
  subnets, and it needs a group that allows all traffic to and from itself, which a group's own
  rule covers only between members of that same group;
- `Placement.GroupName` (or GroupId): a cluster placement group, so that the nodes sit on one
  network spine (EFA's bandwidth and latency assume it).

botocore's model gives the shape (validate_aws.py checks it) but not how many network cards an
instance type has (that is DescribeInstanceTypes' runtime data): EFA_INTERFACES holds that.
The group's rules themselves live in AWS, not in the file: cluster/README.md creates the group with
its self-referencing rule, and `e2e-dist cluster check` measures the wire before a long run.
"""

from __future__ import annotations

from typing import Any

from e2e_dist.cluster.validate_aws import node_types

EFA_INTERFACES: dict[str, int] = {
    # Network cards = EFA interfaces to use (AWS EC2 user guide: p4d/p4de 4 x 100 Gbit/s; p5/p5e 32
    # network cards, 3200 Gbit/s). Types not listed are not checked.
    "p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32,
}
EFA_TYPES = ("efa", "efa-only")
INTERFACE_TYPES = ("interface", *EFA_TYPES)
"""What EC2 documents for InterfaceType (botocore's model has no enum for it)."""
HINT = "cluster/README.md, Multi-node GPUs"


def efa_errors(raw: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, spec in node_types(raw).items():
        node_config = spec.get("node_config")
        if not isinstance(node_config, dict):
            continue
        itype = str(node_config.get("InstanceType", "")).strip().lower()
        at = f"available_node_types.{name}.node_config"
        interfaces = node_config.get("NetworkInterfaces")
        if isinstance(interfaces, list):
            out += _interface_types(interfaces, at) + _ray_rules(node_config, interfaces, at)
        if itype not in EFA_INTERFACES:
            continue
        out += _efa_interfaces(itype, interfaces if isinstance(interfaces, list) else [], at)
        placement = node_config.get("Placement") or {}
        if not (isinstance(placement, dict) and (placement.get("GroupName") or placement.get("GroupId"))):
            out.append(f"{at}.Placement.GroupName: missing: {itype} nodes need a cluster placement group for EFA's "
                       f"bandwidth and latency ({HINT})")
    return out


def _interface_types(interfaces: list, at: str) -> list[str]:
    return [f"{at}.NetworkInterfaces[{i}].InterfaceType: {ni['InterfaceType']!r} is not one of "
            f"{', '.join(INTERFACE_TYPES)}"
            for i, ni in enumerate(interfaces) if isinstance(ni, dict) and "InterfaceType" in ni
            and ni["InterfaceType"] not in INTERFACE_TYPES]


def _ray_rules(node_config: dict, interfaces: list, at: str) -> list[str]:
    """What Ray's AWS bootstrap refuses at `ray up` about NetworkInterfaces, said before it."""
    out = [f"{at}.{key}: not with NetworkInterfaces (Ray takes subnets and security groups from each interface)"
           for key in ("SubnetId", "SubnetIds", "SecurityGroupIds") if key in node_config]
    for i, ni in enumerate(interfaces):
        if not isinstance(ni, dict):
            continue
        for key in ("SubnetId", "Groups"):
            if not ni.get(key):
                out.append(f"{at}.NetworkInterfaces[{i}].{key}: missing (Ray needs it on every interface)")
    return out


def _efa_interfaces(itype: str, interfaces: list, at: str) -> list[str]:
    want = EFA_INTERFACES[itype]
    efa = [(i, ni) for i, ni in enumerate(interfaces) if isinstance(ni, dict) and ni.get("InterfaceType") in EFA_TYPES]
    where = f"{at}.NetworkInterfaces"
    if not efa:
        return [(f"{where}: no EFA interface: {itype} has {want} EFA network cards, and without them NCCL moves "
                 f"every collective over TCP on one interface; add {want} with InterfaceType: efa ({HINT})")]
    out = []
    # a non-integer index is the shape check's finding (validate_aws.py); here it counts as no card
    cards = sorted(c if isinstance(c := ni.get("NetworkCardIndex", 0), int) else -1 for _, ni in efa)
    if cards != list(range(want)):
        out.append(f"{where}: EFA interfaces on network cards {_ranges(cards)} but {itype} has {want} "
                   f"(one EFA interface on each of cards 0-{want - 1})")
    primary = next(((i, ni) for i, ni in efa if ni.get("NetworkCardIndex", 0) == 0 and ni.get("DeviceIndex", 0) == 0),
                   None)
    if primary is not None and primary[1].get("InterfaceType") == "efa-only":
        out.append(f"{where}[{primary[0]}].InterfaceType: the primary interface (card 0, device 0) cannot be "
                   f"efa-only; make it efa")
    out += _one_of(efa, "SubnetId", where, "in another subnet than the first; EFA traffic stays within one subnet")
    out += _one_of(efa, "Groups", where, f"another security group than the first; EFA needs all its interfaces "
                                         f"in one group that allows all traffic to and from itself ({HINT})")
    return out


def _one_of(efa: list, key: str, where: str, why: str) -> list[str]:
    """The first EFA interface whose `key` differs from the first one's (missing ones are said elsewhere)."""
    given = [(i, ni[key]) for i, ni in efa if ni.get(key)]
    first = given[0][1] if given else None
    odd = next((i for i, v in given if sorted(map(str, v if isinstance(v, list) else [v])) !=
                sorted(map(str, first if isinstance(first, list) else [first]))), None)
    return [] if odd is None else [f"{where}[{odd}].{key}: {why}"]


def _ranges(cards: list[int]) -> str:
    return ", ".join(map(str, cards)) if len(cards) <= 6 else f"{cards[0]}-{cards[-1]} ({len(cards)} interfaces)"
