"""The installed distribution is this tree's package, not a same-named one from an index."""

import importlib.metadata as md

import mindspeed_kernels


def test_installed_distribution_is_this_package():
    assert md.version("mindspeed-kernels") == mindspeed_kernels.__version__
