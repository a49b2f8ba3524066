"""The CLI's process-wide set-up: DeepSpeed's JIT-built CPU op is cached inside the checkout,
and a machine without a C++ compiler gets one line saying what to install, not a traceback."""

import os
import subprocess
import sys

from conftest import ROOT, last_line, run_tfx, tiny_run_config


def test_the_op_cache_lives_in_the_checkout():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    code = "import os; from tfx.cli import _cpu_env_defaults as d; d(); " \
           "print(os.environ['TORCH_EXTENSIONS_DIR'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert out.stdout.strip() == str(ROOT / "build" / "torch_extensions"), out.stderr


def test_no_compiler_is_one_line(synth_dir, tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with `timeout` and nothing else: no c++, no g++
    bin_dir.mkdir()
    os.symlink("/usr/bin/timeout", bin_dir / "timeout")
    cfg, _ = tiny_run_config(synth_dir, tmp_path, max_steps=1)
    result = run_tfx("train", str(cfg), timeout=120,
                     env={"PATH": str(bin_dir), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert last_line(result) == (
        "SetupError: DeepSpeed compiles a C++ comm op on the first CPU launch, and no C++ "
        "compiler was found: install one (apt-get install g++; `make install` does it) or "
        "set CXX")
