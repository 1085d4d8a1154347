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


def test_use_none_selects_automatically_inside_an_explicit_choice(monkeypatch):
    x = torch.zeros(1)
    auto = backends.get_op("quantize", x)
    with backends.use("reference"):
        forced = backends.get_op("quantize", x)
    assert forced is not auto  # (automatic on the CPU: numpy)
    monkeypatch.setenv("GPUQUANT_BACKEND", "reference")
    with backends.use("numpy"):
        with backends.use(None):
            assert backends.current() is None
            assert backends.get_op("quantize", x) is auto
        assert backends.current() == "numpy"
    assert backends.current() == "reference"


def test_env_var(monkeypatch):
    monkeypatch.setenv("GPUQUANT_BACKEND", "reference")
    assert backends.current() == "reference"
    monkeypatch.setenv("GPUQUANT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GPUQUANT_BACKEND='bogus' names no backend"):
        backends.current()


def test_verify_refuses_qat_models():
    import gpuquant
    from gpuquant.quantization import ema_fakequant_qconfig, quantize_qat
    q = quantize_qat(gpuquant.models.digits_net(), ema_fakequant_qconfig)
    x = torch.randn(2, 1, 8, 8)
    q(x)
    with pytest.raises(ValueError, match="QAT modules.*quantize first"):
        backends.verify(q.eval(), x)


def test_explicit_backend_missing_op_raises():
    with backends.use("reference"):
        with pytest.raises(NotImplementedError, match="does not implement op 'no_such_op'"):
            backends.get_op("no_such_op", torch.zeros(1))


def test_negative_priority_backend_never_auto_chosen(monkeypatch):
    """The Triton interpreter (priority < 0 on CPU) runs only when chosen explicitly."""
    import types
    from gpuquant.backends import registry
    fake = types.SimpleNamespace(NAME="slowpoke", DEVICES=frozenset({"cpu"}), PRIORITY={"cpu": -5},
                                 OPS={"only_here": lambda: 1}, is_available=lambda: (True, ""))
    monkeypatch.setitem(registry._MODULES, "slowpoke", "unused")
    monkeypatch.setitem(registry._loaded, "slowpoke", fake)
    monkeypatch.setattr(registry, "_candidates", {})  # recomputed with slowpoke among them
    assert registry.find_op("only_here", torch.zeros(1)) is None
    with pytest.raises(NotImplementedError, match="only_here"):
        registry.get_op("only_here", torch.zeros(1))
    with backends.use("slowpoke"):
        assert registry.get_op("only_here", torch.zeros(1))() == 1


def test_try_op_runs_an_optional_op_or_gives_none(monkeypatch):
    """try_op: the op's result where a backend has it and takes the case; None where no
    backend has it or its op declines (returns None)."""
    import types
    from gpuquant.backends import registry
    fake = types.SimpleNamespace(
        NAME="opt", DEVICES=frozenset({"cpu"}), PRIORITY={"cpu": 50},
        OPS={"maybe": lambda v, scale=1: None if v < 0 else v * scale},
        is_available=lambda: (True, ""))
    monkeypatch.setitem(registry._MODULES, "opt", "unused")
    monkeypatch.setitem(registry._loaded, "opt", fake)
    monkeypatch.setattr(registry, "_candidates", {})
    x = torch.zeros(1)
    assert registry.try_op("maybe", x, 3, scale=2) == 6
    assert registry.try_op("maybe", x, -1) is None  # declined
    assert registry.try_op("no_such_op", x, 3) is None


def test_use_is_per_asyncio_task():
    """Two tasks of one event loop each inside their own use(): each sees its own choice
    (a thread-local stack was shared by the tasks)."""
    import asyncio
    from gpuquant.backends import registry

    async def task(name, gate_in, gate_out, seen):
        with backends.use(name):
            gate_in.set()
            await gate_out.wait()
            seen[name] = registry.current()
        seen[name + "-after"] = registry.current()

    async def main():
        seen = {}
        a_in, b_in, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
        t1 = asyncio.create_task(task("numpy", a_in, go, seen))
        t2 = asyncio.create_task(task("reference", b_in, go, seen))
        await a_in.wait()
        await b_in.wait()
        go.set()
        await asyncio.gather(t1, t2)
        return seen
    seen = asyncio.run(main())
    assert seen["numpy"] == "numpy" and seen["reference"] == "reference"
    assert seen["numpy-after"] is None and seen["reference-after"] is None


def test_verify_env_off_words(monkeypatch):
    from gpuquant.backends import registry
    for word in ("", "0", "false", "no", "off", "OFF"):
        monkeypatch.setenv("GPUQUANT_VERIFY", word)
        assert not registry.verifying()
    monkeypatch.setenv("GPUQUANT_VERIFY", "1")
    assert registry.verifying()


def test_one_use_instance_shared_by_threads():
    """use() keeps no per-entry state: one instance entered by two threads at once."""
    import threading
    from gpuquant.backends import registry
    u = backends.use("reference")
    seen, errors = [], []
    barrier = threading.Barrier(2)

    def work():
        try:
            with u:
                barrier.wait()
                seen.append(registry.current())
                barrier.wait()
            seen.append(registry.current())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    ts = [threading.Thread(target=work) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and sorted(seen, key=str) == [None, None, "reference", "reference"]


def test_device_arguments_are_read_or_refused():
    """A device string torch reads ("cpu:0") is its type; None, a number or a string that is
    no device is refused, naming it (no silent None, no 'no backend computes on 3')."""
    from gpuquant.backends import registry as r
    assert r.auto_backend("cpu:0") == r.auto_backend("cpu")
    assert r.get_op("add", "cpu:0") is r.get_op("add", "cpu")
    for bad, err in ((None, TypeError), (3, TypeError), ("gpu", ValueError)):
        with pytest.raises(err, match="device"):
            r.auto_backend(bad)
    with pytest.raises(TypeError):
        r.find_op("add", None)


def test_register_refuses_what_is_no_backend():
    from gpuquant.backends import registry as r
    with pytest.raises(TypeError, match="module path must be a non-empty string"):
        r.register("x", 5)
    r.register("not_a_backend", "json")
    try:
        assert "not_a_backend" not in r.available()  # one unavailable entry, not a crash
        assert "is not a gpuquant backend" in r._why_not("not_a_backend")
    finally:
        r.unregister("not_a_backend")
