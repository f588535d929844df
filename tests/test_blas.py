"""The system BLAS: loaded on Linux with the kernel that suits the CPU, reported, results
unchanged.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import aimv2_mlx
from aimv2_mlx.cpu import blas
from aimv2_mlx.cpu.blas import Isa

import mlx.core as mx
import numpy as np
import pytest

linux_with_openblas = pytest.mark.skipif(
    sys.platform != "linux" or not blas.candidate_paths(),
    reason="needs Linux with a system OpenBLAS (apt-get install libopenblas0-pthread)",
)

AVX512_BF16 = Isa("x86_64", "avx512", ("avx512_bf16", "amx"))
AVX512 = Isa("x86_64", "avx512")
AVX2 = Isa("x86_64", "avx2")
AVX = Isa("x86_64", "avx")
SSE = Isa("x86_64", "sse")
NEON_DP = Isa("aarch64", "neon", ("asimddp",), "0xd0c")
NEON = Isa("aarch64", "neon", (), "0xd07")
SVE2 = Isa("aarch64", "sve2", ("asimddp",), "0xd4f")
POWER = Isa("ppc64le", "unknown")

_SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
flags\t\t: sse2 avx fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 amx_tile

processor\t: 1
flags\t\t: fpu sse sse2
"""
_KNIGHTS_LANDING = "processor\t: 0\nflags\t\t: sse sse2 avx fma avx2 avx512f avx512cd avx512pf\n"
_GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp sve\nCPU part\t: 0xd40\n"


def _loaded_kernel_script() -> str:
    return (
        "import aimv2_mlx, json; from aimv2_mlx.cpu import blas; "
        "print(json.dumps({'kernel': blas.kernel_in_use(), **blas.kernel_choice()}))"
    )


def _env(tmp_path, **changes) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (blas.CORETYPE_ENV, blas.CHOSEN_ENV, blas.DISABLE_ENV)
    }
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env.update(changes)
    return env


def _python(code: str, env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True
    )


# -- the ISA, from /proc/cpuinfo text --


@pytest.mark.parametrize(
    "cpuinfo, machine, expected",
    [
        (_SAPPHIRE_RAPIDS, "x86_64", Isa("x86_64", "avx512", ("avx512_bf16", "amx"))),
        (_KNIGHTS_LANDING, "x86_64", Isa("x86_64", "avx2")),
        ("flags\t: sse sse2 avx avx2 fma\n", "x86_64", Isa("x86_64", "avx2")),
        ("flags\t: sse sse2 avx avx2\n", "x86_64", Isa("x86_64", "avx")),
        ("flags\t: sse sse2 sse3\n", "x86_64", Isa("x86_64", "sse")),
        (_GRAVITON3, "aarch64", Isa("aarch64", "sve", ("asimddp",), "0xd40")),
        (
            "Features\t: fp asimd\nCPU part\t: 0xd07\n",
            "aarch64",
            Isa("aarch64", "neon", (), "0xd07"),
        ),
        ("", "ppc64le", Isa("ppc64le", "unknown")),
    ],
)
def test_the_vector_isa_is_read_from_the_first_processor_block(cpuinfo, machine, expected):
    assert blas.parse_isa(cpuinfo, machine) == expected


def test_this_hosts_isa_matches_its_cpu_flags():
    isa = blas.cpu_isa()
    assert isa.arch == ("x86_64" if platform.machine() in ("x86_64", "AMD64") else isa.arch)
    if platform.machine() == "x86_64":
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
        assert (isa.level == "avx512") == all(
            f"avx512{x}" in flags for x in ("f", "bw", "dq", "vl", "cd")
        )


# -- the choice: a pure function of (ISA, the library's kernel, the environment) --


@pytest.mark.parametrize(
    "isa, library_kernel, expected",
    [
        (AVX512_BF16, "Prescott", "SkylakeX"),
        (AVX512, "Prescott", "SkylakeX"),
        (AVX512, "Nehalem", "SkylakeX"),
        (AVX512, "Sandybridge", "SkylakeX"),
        (AVX512, "Haswell", None),
        (AVX512, "Zen", None),
        (AVX512_BF16, "Cooperlake", None),
        (AVX512, "SapphireRapids", None),
        (AVX512, "SomeFutureLake", None),
        (AVX512, None, None),
        (AVX2, "Prescott", "Haswell"),
        (AVX2, "Core2", "Haswell"),
        (AVX2, "Barcelona", "Haswell"),
        (AVX2, "Bulldozer", "Haswell"),
        (AVX2, "Haswell", None),
        (AVX2, "Zen", None),
        (AVX, "Sandybridge", None),
        (AVX, "Prescott", None),
        (SSE, "Prescott", None),
        (NEON_DP, "armv8", "NEOVERSEN1"),
        (NEON, "ARMV8", "CORTEXA57"),
        (SVE2, "armv8", "NEOVERSEN1"),
        (NEON_DP, "neoversen1", None),
        (SVE2, "neoversev1", None),
        (POWER, "POWER8", None),
    ],
)
def test_a_generic_kernel_is_replaced_and_a_good_one_left_alone(isa, library_kernel, expected):
    choice = blas.choose_coretype(isa, library_kernel, {})
    assert choice.coretype == expected
    assert choice.reason.startswith(
        "chosen by aimv2-mlx" if expected else "the library's own choice"
    )


@pytest.mark.parametrize("value", ["Prescott", "Haswell", "", "nonsense"])
@pytest.mark.parametrize(
    "isa, library_kernel", [(AVX512_BF16, "Prescott"), (AVX2, "Core2"), (NEON, "armv8")]
)
def test_a_coretype_the_user_set_is_never_overridden(isa, library_kernel, value):
    choice = blas.choose_coretype(isa, library_kernel, {blas.CORETYPE_ENV: value, "HOME": "/x"})
    assert choice.coretype is None
    assert "set by the user" in choice.reason and repr(value) in choice.reason


def test_a_coretype_inherited_from_our_own_choice_says_so():
    env = {blas.CORETYPE_ENV: "SkylakeX", blas.CHOSEN_ENV: "SkylakeX"}
    choice = blas.choose_coretype(AVX512, "Prescott", env)
    assert choice.coretype is None and "parent process" in choice.reason


def test_the_loader_leaves_a_user_coretype_in_place_without_probing(monkeypatch):
    monkeypatch.setenv(blas.CORETYPE_ENV, "")
    monkeypatch.delenv(blas.CHOSEN_ENV, raising=False)
    monkeypatch.setattr(blas, "_state", blas._fresh_state())
    monkeypatch.setattr(blas, "cpu_isa", lambda: AVX512)
    monkeypatch.setattr(blas, "probe_library_kernel", lambda path: pytest.fail("probed"))
    blas._decide("/usr/lib/libopenblas.so.0")
    assert os.environ[blas.CORETYPE_ENV] == ""
    assert (
        blas.kernel_choice()["chosen"] is None and "set by the user" in blas.kernel_choice()["why"]
    )


def test_the_loader_sets_the_chosen_coretype_before_loading(monkeypatch):
    monkeypatch.delenv(blas.CORETYPE_ENV, raising=False)
    monkeypatch.delenv(blas.CHOSEN_ENV, raising=False)
    monkeypatch.setattr(blas, "_state", blas._fresh_state())
    monkeypatch.setattr(blas, "cpu_isa", lambda: AVX512)
    monkeypatch.setattr(blas, "probe_library_kernel", lambda path: "Prescott")
    blas._decide("/usr/lib/libopenblas.so.0")
    assert os.environ[blas.CORETYPE_ENV] == "SkylakeX" == os.environ[blas.CHOSEN_ENV]
    assert blas.kernel_choice() == {
        "library_kernel": "Prescott",
        "chosen": "SkylakeX",
        "why": blas.choose_coretype(AVX512, "Prescott", {}).reason,
    }


def test_no_library_means_no_change(monkeypatch):
    monkeypatch.delenv(blas.CORETYPE_ENV, raising=False)
    monkeypatch.delenv(blas.DISABLE_ENV, raising=False)
    monkeypatch.setattr(blas, "_state", blas._fresh_state())
    monkeypatch.setattr(blas, "candidate_paths", lambda: [])
    monkeypatch.setattr(blas, "_preloaded_blas", lambda: None)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delitem(sys.modules, "mlx.core")
    assert blas.load_openblas() is None
    assert blas.CORETYPE_ENV not in os.environ and "no system OpenBLAS" in blas.load_reason()
    assert blas.probe_library_kernel("/nonexistent/libopenblas.so.0") is None


# -- the probe and its cache --


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return blas.probe_cache_path()


def _count_probes(monkeypatch) -> list:
    calls = []
    real = subprocess.run

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(blas.subprocess, "run", counting)
    return calls


@linux_with_openblas
def test_the_probe_names_the_librarys_own_kernel_and_is_cached(cache_home, monkeypatch):
    path = blas.candidate_paths()[0]
    calls = _count_probes(monkeypatch)
    first = blas.probe_library_kernel(path)
    second = blas.probe_library_kernel(path)
    assert isinstance(first, str) and first == second and len(calls) == 1
    reference = subprocess.run(
        [sys.executable, "-c", blas._PROBE, path],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != blas.CORETYPE_ENV},
    )
    assert json.loads(reference.stdout)["kernel"] == first
    assert next(iter(json.loads(cache_home.read_text()).values()))["kernel"] == first


@linux_with_openblas
@pytest.mark.parametrize("garbage", [b"\x00\xffnot json", b"[1, 2]", b'{"k": 3'])
def test_a_corrupt_cache_is_probed_again_and_rewritten(cache_home, monkeypatch, garbage):
    path = blas.candidate_paths()[0]
    cache_home.parent.mkdir(parents=True)
    cache_home.write_bytes(garbage)
    calls = _count_probes(monkeypatch)
    assert isinstance(blas.probe_library_kernel(path), str) and len(calls) == 1
    assert isinstance(json.loads(cache_home.read_text()), dict)


@linux_with_openblas
def test_a_cache_that_cannot_be_written_still_gives_the_kernel(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert isinstance(blas.probe_library_kernel(blas.candidate_paths()[0]), str)
    assert blocker.read_text() == "a file where the cache folder would go"


def test_a_failed_probe_changes_nothing_and_is_not_cached(cache_home, monkeypatch, tmp_path):
    fake = tmp_path / "libopenblas.so.0"
    fake.write_bytes(b"not a shared library")
    assert blas.probe_library_kernel(str(fake)) is None
    assert not cache_home.exists()
    monkeypatch.setattr(
        blas.subprocess,
        "run",
        lambda *a, **k: (_ for _ in ()).throw(
            subprocess.TimeoutExpired("probe", blas.PROBE_TIMEOUT_S)
        ),
    )
    assert blas.probe_library_kernel(str(fake)) is None


@pytest.mark.skipif(sys.platform != "linux", reason="probes a Linux shared library")
def test_a_library_that_is_not_openblas_has_no_kernel(cache_home):
    import ctypes.util

    libm = ctypes.util.find_library("m")
    assert blas.probe_library_kernel(libm) is None
    assert blas.choose_coretype(AVX512, None, {}).coretype is None


def test_the_cache_key_follows_the_library_file(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"x")
    before = blas._cache_key(str(lib))
    os.utime(lib, ns=(1, 1))
    assert before and blas._cache_key(str(lib)) not in (None, before)


# -- loading for real, in fresh processes --


@linux_with_openblas
def test_without_a_user_coretype_the_kernel_the_rules_choose_is_loaded(tmp_path):
    report = json.loads(_python(_loaded_kernel_script(), _env(tmp_path)).stdout)
    library_kernel = report["library_kernel"]
    assert library_kernel, "the probe found no kernel for the system OpenBLAS"
    expected = blas.choose_coretype(blas.cpu_isa(), library_kernel, {}).coretype or library_kernel
    assert report["kernel"].lower() == expected.lower()


@linux_with_openblas
def test_a_library_that_would_run_prescott_gets_this_cpus_kernel(tmp_path):
    target = blas.best_coretype(blas.cpu_isa())
    if target is None or blas.cpu_isa().arch != "x86_64":
        pytest.skip("no x86 kernel to choose on this CPU")
    env = _env(tmp_path)
    _python(_loaded_kernel_script(), env)  # fills the cache with the real probe
    cache = tmp_path / "cache" / "aimv2-mlx" / "blas-kernels.json"
    entries = json.loads(cache.read_text())
    for entry in entries.values():
        entry["kernel"] = "Prescott"
    cache.write_text(json.dumps(entries))
    report = json.loads(_python(_loaded_kernel_script(), env).stdout)
    assert report["library_kernel"] == "Prescott" and report["chosen"] == target
    assert report["kernel"].lower() == target.lower()


_LOAD_AS_IF = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("blas_alone", sys.argv[1])
blas = sys.modules["blas_alone"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blas)
blas.cpu_isa = lambda: blas.Isa("x86_64", "avx2")
blas.probe_library_kernel = lambda path: "Prescott"
blas.load_openblas()
print(json.dumps({"kernel": blas.kernel_in_use(), **blas.kernel_choice()}))
"""


@linux_with_openblas
def test_the_chosen_coretype_takes_effect_in_the_library(tmp_path):
    if blas.cpu_isa().level not in ("avx2", "avx512"):
        pytest.skip("needs an x86 CPU with AVX2 + FMA")
    # blas.py alone (no MLX, no package import): an AVX2 CPU whose library would run Prescott.
    # Haswell is not what the library picks by itself on an AVX-512 host, so this shows the
    # choice reaching OpenBLAS through the environment before the dlopen.
    report = json.loads(_python(_LOAD_AS_IF, _env(tmp_path), blas.__file__).stdout)
    assert report["chosen"] == "Haswell" and report["kernel"] == "Haswell"


@linux_with_openblas
def test_a_user_coretype_is_loaded_as_set(tmp_path):
    report = json.loads(
        _python(_loaded_kernel_script(), _env(tmp_path, OPENBLAS_CORETYPE="Prescott")).stdout
    )
    assert report["kernel"] == "Prescott" and report["chosen"] is None
    assert not (tmp_path / "cache").exists()


@linux_with_openblas
def test_importing_mlx_first_warns_exactly_once(tmp_path):
    late = _python(
        "import mlx.core, aimv2_mlx\nfrom aimv2_mlx.cpu import blas\nblas.load_openblas()\n"
        "import aimv2_mlx.cpu\nprint(blas.library_path())",
        _env(tmp_path),
    )
    assert late.stderr.count("imported before aimv2_mlx") == 1
    assert len(late.stderr.strip().splitlines()) == 1 and late.stdout.strip() == "None"
    first = _python("import aimv2_mlx, mlx.core", _env(tmp_path))
    assert "imported before" not in first.stderr


@linux_with_openblas
def test_a_blas_preloaded_before_mlx_is_used_without_a_warning(tmp_path):
    path = blas.candidate_paths()[0]
    done = _python(
        "import numpy, mlx.core, aimv2_mlx\nfrom aimv2_mlx.cpu import blas\n"
        "print(blas.library_path(), blas.kernel_in_use())",
        _env(tmp_path, LD_PRELOAD=path),
    )
    preloaded, kernel = done.stdout.split()
    assert "imported before" not in done.stderr
    assert os.path.realpath(preloaded) == os.path.realpath(path) and kernel != "None"


# -- after loading: threads, reports --


@linux_with_openblas
def test_blas_threads_can_be_read_set_and_restored():
    before = blas.get_blas_threads()
    assert isinstance(before, int) and before >= 1
    try:
        assert blas.set_blas_threads(1) and blas.get_blas_threads() == 1
    finally:
        assert blas.set_blas_threads(before)
    assert blas.get_blas_threads() == before


@pytest.mark.skipif(sys.platform != "linux", reason="loads a Linux shared library")
def test_a_blas_that_is_not_openblas_reports_no_kernel(monkeypatch):
    import ctypes.util

    monkeypatch.setattr(
        blas,
        "_state",
        {**blas._fresh_state(), "openblas": ctypes.util.find_library("m"), "reason": "loaded"},
    )
    monkeypatch.setattr(blas, "compare_gemm", lambda size: (100.0, 100.0))
    assert blas.kernel_in_use() is None and blas.library_config() is None
    assert blas.get_blas_threads() is None and blas.set_blas_threads(1) is False
    report = blas.describe()
    assert report["blas_kernel"] == "n/a" and report["blas"].startswith("BLAS (")


@linux_with_openblas
@pytest.mark.parametrize("mlx_gflops, warns", [(60.0, True), (250.0, False)])
def test_info_warns_with_the_fix_when_mlx_gemm_trails_numpy(monkeypatch, mlx_gflops, warns):
    if mx.default_device() != mx.cpu or not blas.library_path():
        pytest.skip("needs MLX on the CPU with the system OpenBLAS loaded")
    monkeypatch.setattr(blas, "compare_gemm", lambda size: (mlx_gflops, 300.0))
    report = blas.describe()
    assert report["mlx_vs_numpy"] == round(mlx_gflops / 300.0, 2)
    assert ("warning" in report) == warns
    if warns:
        target = blas.best_coretype(blas.cpu_isa())
        assert blas.PATH_ENV in report["warning"] and "\n" not in report["warning"]
        if target and target.lower() != blas.kernel_in_use().lower():
            assert f"{blas.CORETYPE_ENV}={target}" in report["warning"]


@linux_with_openblas
def test_info_says_when_the_library_ignored_the_chosen_coretype(monkeypatch):
    if mx.default_device() != mx.cpu or not blas.library_path():
        pytest.skip("needs MLX on the CPU with the system OpenBLAS loaded")
    asked = "Prescott" if blas.kernel_in_use().lower() != "prescott" else "Haswell"
    monkeypatch.setitem(blas._state, "chosen", asked)
    monkeypatch.setitem(blas._state, "why", "chosen by aimv2-mlx: test")
    monkeypatch.setattr(blas, "compare_gemm", lambda size: (100.0, 100.0))
    source = blas.describe()["blas_kernel_source"]
    assert f"the library runs {blas.kernel_in_use()} instead of {asked}" in source


@linux_with_openblas
def test_info_json_reports_isa_kernel_and_both_gemms(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "aimv2_mlx.cli", "info", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, blas.DISABLE_ENV: "0"},
    )
    report = json.loads(done.stdout)["backend"]
    assert report["isa"] == str(blas.cpu_isa())
    assert report["blas"].startswith("OpenBLAS") and report["blas_kernel"] == blas.kernel_in_use()
    assert report["mlx_gemm_gflops"] > blas.SLOW_GFLOPS and report["numpy_gemm_gflops"] > 1
    assert report["mlx_vs_numpy"] == pytest.approx(
        report["mlx_gemm_gflops"] / report["numpy_gemm_gflops"], abs=0.01
    )
    assert ("warning" in report) == (report["mlx_vs_numpy"] < blas.SLOW_RATIO)
    assert report["mlx_bfs_max_width"] == os.environ.get("MLX_BFS_MAX_WIDTH")


@linux_with_openblas
def test_info_warns_when_the_reference_blas_is_live():
    slow = subprocess.run(
        [sys.executable, "-m", "aimv2_mlx.cli", "info"],
        capture_output=True,
        text=True,
        env={**os.environ, blas.DISABLE_ENV: "1"},
    )
    assert slow.returncode == 0
    assert "bundled reference BLAS" in slow.stdout and "blas_kernel: n/a" in slow.stdout
    assert "warning" in slow.stderr and "slow reference BLAS" in slow.stderr


# -- results do not depend on the BLAS --

_ENCODE = """
import sys, numpy as np
import aimv2_mlx, mlx.core as mx
from aimv2_mlx.cpu import blas
model = aimv2_mlx.load("bundled")
size = model.config.vision.image_size
x = np.random.default_rng(0).standard_normal((8, size, size, 3)).astype(np.float32)
np.save(sys.argv[1], np.array(model(mx.array(x))))
print(blas.library_path() or "none")
"""


def _run(code: str, *args, disable: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(blas.DISABLE_ENV, None)
    if disable:
        env[blas.DISABLE_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True
    )


@linux_with_openblas
def test_openblas_changes_speed_not_results(tmp_path):
    fast = _run(_ENCODE, str(tmp_path / "fast.npy"), disable=False)
    slow = _run(_ENCODE, str(tmp_path / "slow.npy"), disable=True)
    assert "openblas" in fast.stdout.lower()
    assert slow.stdout.strip() == "none"
    a, b = np.load(tmp_path / "fast.npy"), np.load(tmp_path / "slow.npy")
    assert np.abs(a - b).max() <= 1e-5


def test_late_import_is_reported_and_warned_not_attempted(monkeypatch, capsys):
    monkeypatch.setattr(blas, "_state", blas._fresh_state())
    monkeypatch.setattr(blas, "_preloaded_blas", lambda: None)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv(blas.DISABLE_ENV, raising=False)
    assert "mlx.core" in sys.modules
    assert blas.load_openblas() is None
    assert "imported before" in blas.load_reason()
    assert capsys.readouterr().err.count("imported before aimv2_mlx") == 1
    assert blas.load_openblas() is None and capsys.readouterr().err == ""


def test_disable_env(monkeypatch):
    monkeypatch.setattr(blas, "_state", blas._fresh_state())
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv(blas.DISABLE_ENV, "1")
    assert blas.load_openblas() is None
    assert blas.DISABLE_ENV in blas.load_reason()


def test_gemm_measurements_are_positive():
    assert blas.measure_gemm_gflops(128, repeats=1) > 0
    assert blas.measure_numpy_gemm_gflops(128, repeats=1) > 0
    assert aimv2_mlx.cpu.on_cpu() == (mx.default_device() == mx.cpu)


def test_info_measures_the_gemm_at_the_blas_threads_the_process_started_with(monkeypatch):
    """A loaded model tunes the BLAS to one thread per stream; the GEMM comparison must not."""
    from aimv2_mlx.cpu import settings

    started = blas.get_blas_threads()
    seen = []
    monkeypatch.setattr(
        blas, "compare_gemm", lambda size: (seen.append(blas.get_blas_threads()), (1.0, 1.0))[1]
    )
    settings.tune()
    tuned = blas.get_blas_threads()
    blas.describe()
    assert seen == [started]
    assert blas.get_blas_threads() == tuned
