"""mindspeed_cli: the ``mindspeed`` command. Subcommands are entry points in the group
``mindspeed.commands`` that installed packages register; each is imported only when it runs."""

from mindspeed_cli._version import __version__

__all__ = ["__version__"]
