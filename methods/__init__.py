"""L2D methods. ``load_all`` imports every method module below (each registers itself),
plus the modules named in the environment variable ``L2D_METHODS`` (comma-separated
importable module names: methods kept outside this repository)."""

import os

from core.registry import Registry

METHODS: Registry = Registry("method", name_attribute="name")  # sets each class's ``name``
HELPER_MODULES = {"nets", "surrogates", "missing_policy", "estep", "projection", "template", "common"}


def load_all() -> None:
    """Import every method module so that each registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in HELPER_MODULES:
            importlib.import_module(f"{__name__}.{info.name}")
    for module in filter(None, (m.strip() for m in os.environ.get("L2D_METHODS", "").split(","))):
        importlib.import_module(module)


def get_method_class(name: str):
    """The registered method class for ``name`` ("did you mean" on typos)."""
    load_all()
    return METHODS.get(name)
