"""Kubeconfigs for the client's credential tests: a copy of a sim's kubeconfig whose user runs an exec plugin."""

from __future__ import annotations

import json
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from simstack.stack import SimStack


def exec_kubeconfig(tmp_path: Path, sim: SimStack, expires_in: timedelta) -> tuple[Path, Path]:
    """A copy of the sim's kubeconfig whose user gets its token from an exec plugin (as GKE/EKS/AKS do).
    The plugin counts its runs in a file and returns token-<n>, expiring ``expires_in`` from now."""
    import yaml

    counter = tmp_path / "runs"
    counter.write_text("0")
    plugin = tmp_path / "plugin.py"
    expiry = (datetime.now(UTC) + expires_in).strftime("%Y-%m-%dT%H:%M:%SZ")
    plugin.write_text(
        "import json, pathlib\n"
        f"p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1; p.write_text(str(n))\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1beta1', 'kind': 'ExecCredential',\n"
        f"  'status': {{'token': f'token-{{n}}', 'expirationTimestamp': {expiry!r}}}}}))\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IEXEC)
    doc = yaml.safe_load(sim.kubeconfig_path.read_text())
    for user in doc["users"]:
        user["user"] = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1",
                "command": sys.executable,
                "args": [str(plugin)],
                "interactiveMode": "Never",
            }
        }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(doc))
    return path, counter
