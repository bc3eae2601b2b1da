"""What this process's cgroups (v2 or v1) let it use: memory room and CPU quota. No MPI here.

Under Slurm with --mem, in a container with a memory or CPU limit, or in a Kubernetes pod,
the cgroup, not the node, is what the kernel enforces. Every function takes the filesystem
root (a fake one in tests); unreadable or malformed files are skipped, never raised.
"""

from __future__ import annotations

from pathlib import Path

# A cgroup limit at or above this is no limit: cgroup v1 reports "unlimited" as PAGE_COUNTER_MAX
# in bytes, just under 2**63 (9223372036854771712 with 4 KiB pages, less with larger pages).
_NO_LIMIT = 2**62


def memory_room(root: Path = Path("/")) -> tuple[int, str] | None:
    """(limit - usage in bytes, "cgroup <path>") of the tightest memory-limited cgroup this
    process is in (its own or an ancestor's; v2 and v1 both counted), or None where none is
    limited or readable."""
    rooms = [room for room in (_cgroup_room(level, "memory.max", "memory.current", "inactive_file")
                               for level in _levels(root, "", "memory"))
             if room is not None]
    rooms += [room for room in (_cgroup_room(level, "memory.limit_in_bytes", "memory.usage_in_bytes",
                                             "total_inactive_file")
                                for level in _levels(root, "memory", "memory"))
              if room is not None]
    return min(rooms, key=lambda r: r[0]) if rooms else None


def cpu_quota(root: Path = Path("/")) -> tuple[float, str] | None:
    """(CPUs, "cgroup <path>") of the tightest CPU quota on this process's cgroup or an
    ancestor (v2 `cpu.max` "50000 100000" is 0.5 CPU; v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`), or None where no quota is set or readable. A quota caps the CPU
    time per period: a process over it is stopped until the next period, whatever cores
    are idle (Docker's --cpus, Kubernetes' CPU limits)."""
    quotas = []
    for directory, name in _levels(root, "", "cpu"):
        try:
            quota, period = (directory / "cpu.max").read_text().split()
        except (OSError, ValueError):
            continue
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            quotas.append((int(quota) / int(period), f"cgroup {name}"))
    for directory, name in _levels(root, "cpu", "cpu"):
        quota, period = _cgroup_value(directory / "cpu.cfs_quota_us"), _cgroup_value(directory / "cpu.cfs_period_us")
        if quota is not None and period:  # v1 says -1 for no quota, which _cgroup_value reads as None
            quotas.append((quota / period, f"cgroup {name}"))
    return min(quotas, key=lambda q: q[0]) if quotas else None


def _membership(root: Path) -> list[tuple[str, str]]:
    """(controllers, path) of each /proc/self/cgroup line: `0::/path` (v2, controllers "")
    and `N:memory:/path` or `N:cpu,cpuacct:/path` (v1)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except (OSError, ValueError):
        return []
    found = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) == 3 and fields[2].startswith("/") and (fields[0] == "0") == (fields[1] == ""):
            found.append((fields[1], fields[2]))
    return found


def _levels(root: Path, v1_controller: str, mount_name: str) -> list[tuple[Path, str]]:
    """(directory, path) of this process's cgroup and each ancestor up to the mount root, for
    v2 (v1_controller "") or the v1 hierarchy holding v1_controller (mounted at
    sys/fs/cgroup/<its controllers>, e.g. cpu,cpuacct, or at sys/fs/cgroup/<mount_name>).
    A path whose directory doesn't exist (a cgroup namespace or a container's bind mount
    shows the cgroup at the mount root) falls back to the mount root."""
    for controllers, path in _membership(root):
        if v1_controller == "" and controllers == "":
            mounts = [root / "sys/fs/cgroup"]
        elif v1_controller and v1_controller in controllers.split(","):
            mounts = [root / "sys/fs/cgroup" / controllers, root / "sys/fs/cgroup" / mount_name]
        else:
            continue
        mount = next((m for m in mounts if m.is_dir()), mounts[-1])
        parts = [p for p in path.split("/") if p]
        try:
            exists = ".." not in parts and mount.joinpath(*parts).is_dir()
        except (OSError, ValueError):
            exists = False
        if not exists:
            return [(mount, path)]
        return [(mount.joinpath(*parts[:n]), "/" + "/".join(parts[:n])) for n in range(len(parts), -1, -1)]
    return []


def _cgroup_room(level: tuple[Path, str], limit_file: str, usage_file: str, cache_key: str) -> tuple[int, str] | None:
    """(limit - usage, "cgroup <path>") of one limited cgroup, usage without the inactive
    page cache the kernel reclaims before it kills (memory.stat; as cAdvisor's working set:
    a model file read earlier in the job stays charged to its cgroup as cache), or None
    where it is not limited (or not readable)."""
    directory, name = level
    limit, usage = _cgroup_value(directory / limit_file), _cgroup_value(directory / usage_file)
    if limit is None or usage is None or limit >= _NO_LIMIT:
        return None
    return max(0, limit - max(0, usage - _stat_value(directory / "memory.stat", cache_key))), f"cgroup {name}"


def _stat_value(file: Path, key: str) -> int:
    """A memory.stat entry in bytes; 0 where missing or unreadable."""
    try:
        for line in file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_value(file: Path) -> int | None:
    """A cgroup file's number; None for "max", "-1", missing, unreadable or malformed."""
    try:
        text = file.read_text().strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isascii() and text.isdigit() else None
