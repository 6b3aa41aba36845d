"""The installed distribution is this tree's package, not a same-named one from an index."""

import importlib.metadata as md

import mindspeed_rl


def test_installed_distribution_is_this_package():
    assert md.version("mindspeed-rl") == mindspeed_rl.__version__
