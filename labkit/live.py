"""What this kernel started and has not stopped yet (engines, baselines, servers), by name, so that
re-running the cell that made one replaces it instead of doubling the GPU memory it holds."""
from __future__ import annotations

from typing import Any


def replace_earlier(live: dict[str, Any], name: str, what: str) -> bool:
    """Stop the live `what` (engine, baseline, server) called `name`, if any; True if one was stopped."""
    obj = live.get(name)
    if obj is None:
        return False
    print(f"{'stopping' if hasattr(obj, 'stop') else 'closing'} the earlier {what} {name!r} ({obj!r}) first")
    (obj.stop if hasattr(obj, "stop") else obj.close)()
    return True
