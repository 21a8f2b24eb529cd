"""Bad input to @opmap: clear errors naming the option, at decoration time where possible."""

from __future__ import annotations

import sys

import pytest

import opmap_helpers as h
from opero import ConfigurationError, opmap


def test_unknown_mode_lists_the_modes():
    """An unknown mode is a ConfigurationError listing every mode."""
    with pytest.raises(ConfigurationError, match=r"mode='threads'.*'thread', 'process', 'async'"):
        opmap(mode="threads")


@pytest.mark.parametrize("workers", [0, -2, 1.5, True, "4"])
def test_bad_workers(workers):
    """Workers must be an int >= 1 (or None)."""
    with pytest.raises(ConfigurationError, match="workers="):
        opmap(workers=workers)


@pytest.mark.parametrize(
    ("option", "value"),
    [("chunksize", 0), ("ordered", "yes"), ("strict", None), ("progress", "always")],
)
def test_bad_own_options(option, value):
    """Each of @opmap's own options names itself when its value is wrong."""
    with pytest.raises(ConfigurationError, match=f"{option}="):
        opmap(**{option: value})


def test_executor_must_be_an_executor():
    """executor= must be a concurrent.futures.Executor."""
    with pytest.raises(ConfigurationError, match="executor="):
        opmap(executor=object())


def test_client_only_with_dask():
    """client= with another mode is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="client="):
        opmap(mode="thread", client=object())


def test_non_iterable_argument_is_a_type_error():
    """Calling the map with a non-iterable is a TypeError naming the function and the fix."""

    @opmap(progress=False)
    def inc(x):
        return x + 1

    with pytest.raises(TypeError, match=r"inc\(\) takes an iterable.*got int"):
        inc(5)


def test_unknown_opero_option_is_a_type_error_at_decoration():
    """An unknown @opero option fails when the function is decorated."""
    decorator = opmap(retrys=3)
    with pytest.raises(TypeError, match="retrys"):
        decorator(h.trivial)


def test_bad_opero_value_is_a_configuration_error_at_decoration():
    """A bad @opero value fails when the function is decorated."""
    with pytest.raises(ConfigurationError, match="retries"):
        opmap(retries=-1)(h.trivial)


def test_async_process_needs_async_def():
    """mode='async_process' with a plain def is a ConfigurationError at decoration."""
    with pytest.raises(ConfigurationError, match=r"async_process.*async def"):
        opmap(mode="async_process")(h.trivial)


def test_async_process_without_aiomultiprocess(monkeypatch):
    """Without aiomultiprocess, async_process names the extra to install."""
    monkeypatch.setitem(sys.modules, "aiomultiprocess", None)

    async def job(x):
        return x

    with pytest.raises(ConfigurationError, match=r'pip install "opero\[aiomultiprocess\]"'):
        opmap(mode="async_process")(job)


@pytest.mark.parametrize("mode", ["thread", "process", "dask"])
def test_async_def_in_sync_modes(mode):
    """An async def in a mode that runs plain functions points to the async modes."""

    async def job(x):
        return x

    with pytest.raises(ConfigurationError, match="mode='async'"):
        opmap(mode=mode)(job)


def test_dask_without_distributed(monkeypatch):
    """Without distributed, mode='dask' names the extra to install."""
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ConfigurationError, match=r'pip install "opero\[dask\]"'):
        opmap(mode="dask")(h.trivial)


def test_dask_without_client_names_the_option():
    """With no client given and none current, the first call names client=."""
    distributed = pytest.importorskip("distributed")
    lonely = opmap(mode="dask", retries=0, progress=False)(h.trivial)
    try:
        distributed.get_client()
    except ValueError:
        pass
    else:  # pragma: no cover - only when another test leaked a client
        pytest.skip("a Dask client is current in this process")
    with pytest.raises(ConfigurationError, match="client="):
        lonely([1, 2])
