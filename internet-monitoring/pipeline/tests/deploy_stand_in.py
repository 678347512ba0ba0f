"""Stand-in for ``docker`` and ``systemctl`` in test_deploy_docs.py: no daemon and no
systemd PID 1 on a test machine, so it checks what a documented command names (compose
file, service, container, unit) exists, and fails loudly otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

PROJECT_SERVICES = ("pipeline-agent", "pipeline-server")


def docker(root: Path, args: list[str]) -> str | None:
    if args[0] == "logs":
        wanted = {f"internet-monitoring-{service}-1" for service in PROJECT_SERVICES}
        return None if args[1] in wanted else f"no container {args[1]}"
    if args[0] != "compose":
        return f"unexpected docker command {args}"
    files = [args[i + 1] for i, arg in enumerate(args) if arg == "--file"]
    services: set[str] = set()
    for name in files:
        path = Path(name)
        if not path.is_file():
            return f"no compose file {name}"
        services |= set(yaml.safe_load(path.read_text()).get("services", {}))
    named = [arg for arg in args if arg in PROJECT_SERVICES or arg.startswith("pipeline-")]
    if not named or any(name not in services for name in named):
        return f"service {named} not in {files}"
    return None


def systemctl(root: Path, args: list[str]) -> str | None:
    units = [arg for arg in args if arg.endswith(".service")]
    if args[0] == "daemon-reload":
        return None
    missing = [unit for unit in units if not (root / "systemd" / unit).is_file()]
    return f"unit not installed: {missing}" if missing or not units else None


def main() -> int:
    tool, root, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    problem = docker(root, args) if tool == "docker" else systemctl(root, args)
    if problem:
        sys.stderr.write(f"{tool} stand-in: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
