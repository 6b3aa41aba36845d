"""The installed distribution is this tree's package, not a same-named one from an index."""

import importlib.metadata as md

import mindspeed_train


def test_installed_distribution_is_this_package():
    assert md.version("mindspeed-train") == mindspeed_train.__version__
