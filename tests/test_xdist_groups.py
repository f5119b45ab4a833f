"""``make test`` runs on every core (pytest-xdist, ``--dist loadgroup``): tests sharing a module- or session-scoped
fixture of a test file are grouped by tests/conftest.py, so that one worker runs them all and the fixture is built
once. Checked here on this file's own module fixture."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def built_once() -> int:
    return os.getpid()


@pytest.mark.parametrize("i", range(3))
def test_tests_sharing_a_module_fixture_are_one_group(built_once, i, request):
    assert [m.args for m in request.node.iter_markers("xdist_group")] == [("test_xdist_groups",)]
    if getattr(request.config.option, "loadgroup", False):  # a worker of --dist loadgroup: scheduled as a group
        assert request.node.nodeid.endswith(f"[{i}]@test_xdist_groups"), request.node.nodeid


def test_a_test_without_a_shared_fixture_is_not_grouped(request):
    assert request.node.get_closest_marker("xdist_group") is None and "@" not in request.node.nodeid
