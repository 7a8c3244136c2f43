"""Hydra SearchPathPlugin that makes the plugin's config groups visible to upstream repos.

Hydra discovers plugins by walking the ``hydra_plugins`` namespace package (which is why
``hydra_plugins/`` itself must not contain an ``__init__.py``: several distributions share it).
Appending ``pkg://diff3r_plugin.configs`` lets an upstream ``config/main.yaml`` use
``- optimizer: diff3r`` in its defaults list (or the CLI ``+optimizer=diff3r``) without
editing the upstream ``hydra.searchpath``.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

#: Provider name shown by ``--info searchpath``.
PROVIDER: str = "diff3r-plugin"
#: Config package that holds ``optimizer/diff3r.yaml``.
SEARCH_PATH: str = "pkg://diff3r_plugin.configs"


class Diff3RSearchPathPlugin(SearchPathPlugin):
    """Appends the diff3r-plugin config package to Hydra's config search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        """Append ``pkg://diff3r_plugin.configs`` after the upstream entries.

        Appending (not prepending) keeps upstream configs authoritative: the plugin only
        adds groups that upstream does not have, it never shadows an upstream file.

        Args:
            search_path: The search path Hydra is building; modified in place.
        """
        search_path.append(provider=PROVIDER, path=SEARCH_PATH)
