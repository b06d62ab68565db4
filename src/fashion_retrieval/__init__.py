from importlib.metadata import version as _v
__version__ = "0.1.0"

# The Python API (api.py), imported on first use: `fashion-retrieval --help` and every import of
# a submodule stay as fast as before, and numpy/torch load only when the API is touched.
_API = ("Hit", "Index", "Model", "SearchFilter", "FilterError", "build_index", "load_model", "open_index",
        "query_files")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fashion_retrieval' has no attribute {name!r}")
