"""The recipes live in configs/ at the top of the repository (where the docs and scripts name
them) and ship inside the package as ``fashion_retrieval.configs``: setuptools maps that one
package to the folder; everything else is declared in pyproject.toml."""
from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages("src"), "fashion_retrieval.configs"],
    package_dir={"": "src", "fashion_retrieval.configs": "configs"},
)
