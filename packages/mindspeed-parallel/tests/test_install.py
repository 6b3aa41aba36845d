"""The installed distribution is this tree's package, not a same-named one from an index."""

import importlib.metadata as md

import mindspeed_parallel


def test_installed_distribution_is_this_package():
    assert md.version("mindspeed-parallel") == mindspeed_parallel.__version__
