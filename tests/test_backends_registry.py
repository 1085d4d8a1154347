import pytest
import torch

import gpuquant.backends as backends


def test_reference_always_available():
    assert "reference" in backends.available()


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match="unknown backend 'nope'.*available here"):
        with backends.use("nope"):
            pass


def test_use_and_current():
    assert backends.current() is None
    with backends.use("reference"):
        assert backends.current() == "reference"
    assert backends.current() is None


def test_env_var(monkeypatch):
    monkeypatch.setenv("GPUQUANT_BACKEND", "reference")
    assert backends.current() == "reference"
    monkeypatch.setenv("GPUQUANT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        backends.current()


def test_explicit_backend_missing_op_raises():
    with backends.use("reference"):
        with pytest.raises(NotImplementedError, match="does not implement op 'no_such_op'"):
            backends.get_op("no_such_op", torch.zeros(1))
