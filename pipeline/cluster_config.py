"""Offline checks of ``cluster.yaml``: Ray's own schema checks plus this project's rules.

Ray 2.60 has no ``ray up --dry-run``; its ``prepare_config`` fills defaults and ``validate_config``
runs the JSON schema (private APIs, hence pinned Ray and this thin wrapper).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

PUBLIC = ("0.0.0.0/0", "::/0")
RAY_PORTS = (6379, 8265, 10001, 52365)


def load(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found; pass the path of your cluster.yaml") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} does not hold a mapping; it must be a Ray cluster config")
    return cfg


def validate(path: Path) -> list[str]:
    """Run Ray's checks and ours; return the list of problems (empty when the file is good)."""
    from pipeline.ray_backend.adapter import ray_config_problem

    cfg = load(path)
    why = ray_config_problem(copy.deepcopy(cfg))
    if why:
        return [f"Ray rejects it: {why}"]
    problems = []
    types = cfg.get("available_node_types", {})
    if not any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values()):
        problems.append("no worker type declares resources: {GPU: >=1}")
    head = types.get(cfg.get("head_node_type", ""), {})
    if head.get("resources", {}).get("CPU", None) != 0:
        problems.append("the head node type should declare resources: {CPU: 0} so it runs no trials")
    setup = " ".join(cfg.get("setup_commands", []))
    for pin in ("ray[default]==2.60.0", "torch==2.14.1"):
        if pin not in setup:
            problems.append(f"setup_commands do not pin {pin}")
    for perm in cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", []):
        lo, hi = int(perm.get("FromPort", -1)), int(perm.get("ToPort", -1))
        opened = any(r.get("CidrIp") in PUBLIC for r in perm.get("IpRanges", [])) or any(r.get("CidrIpv6") in PUBLIC for r in perm.get("Ipv6Ranges", []))
        if opened and (lo == -1 or any(lo <= p <= hi for p in RAY_PORTS)):
            problems.append(f"security group opens ports {lo}-{hi} (Ray's dashboard/GCS) to the internet")
    starts = " ".join(cfg.get("head_start_ray_commands", []))
    m = re.search(r"--dashboard-host[= ](\S+)", starts)
    if m and m.group(1) not in ("127.0.0.1", "localhost"):
        problems.append(f"the dashboard listens on {m.group(1)}; use --dashboard-host=127.0.0.1 and `ray dashboard cluster.yaml`")
    return problems
