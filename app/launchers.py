"""Setup for ``hydra/launcher=ray`` (hydra-ray-launcher): a Ray instance the run starts on
127.0.0.1, or the existing cluster that ``RAY_ADDRESS`` names."""

from __future__ import annotations

import os
from typing import Any


def register_ray_launcher_config() -> None:
    """Replace the plugin's ``hydra/launcher=ray`` defaults in Hydra's ConfigStore: join the
    cluster of ``RAY_ADDRESS`` if set, else start a new local instance (never attach to another
    by chance); leave the object store at Ray's size (the plugin's 75 MiB is refused when
    joining a cluster); no dashboard. Nothing happens when the plugin is not installed."""
    try:  # the plugin's module stores its config on import: import it first, then replace it
        from hydra_plugins.hydra_ray_launcher._config import RayConf, RayLauncherConf
    except ImportError:
        return
    from hydra.core.config_store import ConfigStore

    init = {"address": os.environ.get("RAY_ADDRESS") or "local", "object_store_memory": None,
            "include_dashboard": False}
    ConfigStore.instance().store(group="hydra/launcher", name="ray", provider="l2d-bench",
                                 node=RayLauncherConf(ray=RayConf(init=init)))


def keep_local_ray_on_loopback(launcher: Any) -> None:
    """When the sweep's launcher is about to start its own Ray instance (``address: local``),
    make the instance listen on 127.0.0.1: on Linux Ray binds the machine's outward address
    unless this switch marks it as a one-machine instance. Must run before Ray is imported
    (the launcher imports it when it launches); Ray's processes inherit it."""
    if "hydra_ray_launcher" in str(launcher.get("_target_", "")) \
            and launcher.ray.init.get("address") == "local":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
