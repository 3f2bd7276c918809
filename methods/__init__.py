"""L2D methods. Importing this package registers every method module below."""

from benchmark.registry import Registry

METHODS: Registry = Registry("method")


def load_all() -> None:
    """Import every method module so that each registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in {"nets", "losses", "estep", "template", "common"}:
            importlib.import_module(f"{__name__}.{info.name}")


def get_method_class(name: str):
    """The registered method class for ``name`` ("did you mean" on typos)."""
    load_all()
    return METHODS.get(name)
