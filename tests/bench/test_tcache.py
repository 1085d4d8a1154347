"""The prebuilt Triton cache for the GPU lease (gpuquant.bench.tcache): the cache key a
machine with another Triton wheel computes, packing and unpacking (group files rewritten
for the new place), and the lease runner unpacking the archive. The compiled round trip
(warm-up under another build's key, pack, unpack elsewhere, every kernel found) is in
tests/bench/test_warm.py."""
import json
import os
import zipfile

import pytest
import triton

from gpuquant.bench import lease, tcache


def _wheel(path, lib=b"another build of libtriton", edit=None):
    """A stand-in Triton wheel: the installed triton/__init__.py (or ``edit``ed) and a
    libtriton binary."""
    with open(triton.__file__, "rb") as f:
        init = f.read()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("triton/__init__.py", init if edit is None else edit(init))
        if lib is not None:
            z.writestr("triton/_C/libtriton.so", lib)
    return str(path)


def test_key_for_another_wheel_swaps_only_the_libtriton_hash(tmp_path):
    local = tcache.local_triton_key()
    key = tcache.triton_key_for_wheel(_wheel(tmp_path / "t.whl"))
    assert key != local and len(key) == len(local)
    diff = [(a, b) for a, b in zip(local.split("-"), key.split("-")) if a != b]
    assert len(diff) == 1  # one component: the binary's hash
    assert tcache.key_id(key) != tcache.key_id(local)
    # the same bytes as installed: the local key
    with open(tcache._libtriton_path(), "rb") as f:
        same = tcache.triton_key_for_wheel(_wheel(tmp_path / "s.whl", lib=f.read()))
    assert same == local


@pytest.mark.parametrize("case, msg", [
    ("edited", "differs from the installed Triton"),
    ("no lib", "no libtriton"),
    ("not a zip", "must be a Triton wheel file"),
    ("no init", "no triton/__init__.py"),
])
def test_key_for_wheel_refuses_what_it_cannot_vouch_for(tmp_path, case, msg):
    path = tmp_path / "w.whl"
    if case == "edited":
        _wheel(path, edit=lambda b: b + b"\n# another release\n")
    elif case == "no lib":
        _wheel(path, lib=None)
    elif case == "not a zip":
        path.write_text("hello")
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("triton/_C/libtriton.so", b"x")
    with pytest.raises(ValueError, match=msg):
        tcache.triton_key_for_wheel(str(path))


def _fake_cache(root, kernels=2):
    """Cache entries as Triton writes them: files plus a group naming them by absolute path."""
    for i in range(kernels):
        d = root / f"HASH{i}"
        d.mkdir(parents=True)
        files = {f"k{i}.{ext}": f"{ext} of {i}" for ext in ("json", "cubin", "ptx", "llir",
                                                             "ttgir", "source")}
        for name, text in files.items():
            (d / name).write_text(text)
        (d / f"__grp__k{i}.json").write_text(
            json.dumps({"child_paths": {n: str(d / n) for n in files}}))
    (root / "LAUNCHER").mkdir()
    (root / "LAUNCHER" / "__triton_launcher.so").write_bytes(b"\x7fELF")  # not a kernel


def test_pack_unpack_moves_kernels_and_rewrites_their_groups(tmp_path):
    """Metadata and cubin of every kernel travel (not the PTX or the IRs); the groups name
    what is there."""
    src, dst = tmp_path / "a", tmp_path / "b"
    _fake_cache(src)
    assert tcache.count_kernels(str(src)) == 2 and tcache.count_kernels(str(dst)) == 0
    key = "some-triton-key"
    archive = str(tmp_path / "c.tar.gz")
    m = tcache.pack(str(src), archive, key, note="test")
    assert m["kernels"] == 2 and m["key_id"] == tcache.key_id(key)
    assert tcache.read_manifest(archive) == m
    n, line = tcache.unpack(archive, str(dst), key=key)
    assert n == 2 and "2 kernels unpacked" in line
    for i in range(2):
        d = dst / f"HASH{i}"
        assert sorted(os.listdir(d)) == sorted([f"k{i}.json", f"k{i}.cubin",
                                                f"__grp__k{i}.json"])
        group = json.loads((d / f"__grp__k{i}.json").read_text())["child_paths"]
        assert group == {f"k{i}.{e}": str(d / f"k{i}.{e}") for e in ("json", "cubin")}
        assert (d / f"k{i}.cubin").read_text() == f"cubin of {i}"
    assert not (dst / "LAUNCHER").exists()
    # built for another Triton: nothing unpacked
    n, line = tcache.unpack(archive, str(tmp_path / "d"), key="another key")
    assert n == 0 and "built for another Triton build" in line
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="not a Triton cache archive"):
        tcache.read_manifest(str(tmp_path / "a" / "HASH0" / "k0.json"))


def test_lease_unpacks_a_fitting_archive_and_reports_a_foreign_one(tmp_path, capsys):
    src = tmp_path / "a"
    _fake_cache(src, kernels=3)
    fits, foreign = str(tmp_path / "fits.tar.gz"), str(tmp_path / "foreign.tar.gz")
    tcache.pack(str(src), fits, tcache.local_triton_key())
    tcache.pack(str(src), foreign, "another key")
    args = ["--budget", "60", "--stages", "tests", "--warm-jobs", "0",
            "--pytest-args", "-q tests/test_qparams.py -p no:cacheprovider -k dtype"]
    lease.main(["--out", str(tmp_path / "o1"), "--triton-cache", fits] + args)
    text = (tmp_path / "o1" / "summary.md").read_text()
    assert "prebuilt Triton cache: " in text and "3 kernels unpacked" in text
    assert "compiled on this machine during the run: 0" in text
    lease.main(["--out", str(tmp_path / "o2"), "--triton-cache", foreign] + args)
    assert "built for another Triton build" in (tmp_path / "o2" / "summary.md").read_text()
    lease.main(["--out", str(tmp_path / "o3"), "--triton-cache", "none"] + args)
    assert "prebuilt Triton cache: not asked for" in (tmp_path / "o3" / "summary.md").read_text()
    with pytest.raises(SystemExit) as e:
        lease.main(["--out", "x", "--triton-cache", str(tmp_path / "missing.tar.gz")])
    assert e.value.code == 2 and "no such archive" in capsys.readouterr().err


def test_cli_check_and_bad_arguments(tmp_path, capsys):
    src = tmp_path / "a"
    _fake_cache(src, kernels=1)
    archive = str(tmp_path / "c.tar.gz")
    tcache.pack(str(src), archive, tcache.local_triton_key())
    assert tcache.main(["check", archive]) == 0
    assert "fits this Triton" in capsys.readouterr().out
    assert tcache.main(["check", str(tmp_path / "a" / "HASH0" / "k0.json")]) == 2
    with pytest.raises(SystemExit) as e:
        tcache.main(["build", "--wheel", str(tmp_path / "nope.whl"), "--out", archive])
    assert e.value.code == 2 and "must be a Triton wheel file" in capsys.readouterr().err


def test_lease_starts_no_warm_up_when_the_archive_fits(tmp_path, monkeypatch):
    """The prebuilt kernels make the background compile redundant; its CPU load would only
    disturb the host-bound timings. Without an archive the default stays CPUs - 2."""
    src = tmp_path / "a"
    _fake_cache(src, kernels=1)
    fits = str(tmp_path / "fits.tar.gz")
    tcache.pack(str(src), fits, tcache.local_triton_key())
    monkeypatch.setattr(lease, "_default_warm_jobs", lambda: 6)
    seen = []
    monkeypatch.setattr(lease, "_start_warm", lambda args, log, env: seen.append(args.warm_jobs))
    args = ["--budget", "60", "--stages", "tests",
            "--pytest-args", "-q tests/test_qparams.py -p no:cacheprovider -k dtype"]
    lease.main(["--out", str(tmp_path / "o1"), "--triton-cache", fits] + args)
    lease.main(["--out", str(tmp_path / "o2"), "--triton-cache", "none"] + args)
    lease.main(["--out", str(tmp_path / "o3"), "--triton-cache", fits, "--warm-jobs", "2"] + args)
    assert seen == [0, 6, 2]
