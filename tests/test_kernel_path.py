"""train.py's choice of kernel path (CPU; the CUDA device check stubbed): what runs by default and with
each flag, the line that says so, the `kernels` field of the run, and resume under another setting."""
import json

import pytest

import train
from tinygrad3 import kernels


@pytest.fixture
def gpu_present(monkeypatch):
    """parse_args as on a CUDA machine (no GPU is used: only the choice is tested)."""
    monkeypatch.setattr(train.backend, "cuda_available", lambda: True)
    monkeypatch.delenv("TINYGRAD3_FAST", raising=False)


def _args(*flags):
    return train.parse_args(["--preset", "tiny", "--device", "cuda", *flags])


def test_cuda_fp16_defaults_to_every_kernel_and_cuda_graphs(gpu_present):
    args = _args()
    assert args.dtype == "float16"
    assert args.kernels == {"families": list(kernels.FAMILIES), "cuda_graphs": True}
    assert args.path == "fast path + CUDA graphs"
    assert _args("--cuda-graphs").kernels == args.kernels  # insisting on what the default gives


@pytest.mark.parametrize("flags, families, graphs, path", [
    (("--reference",), [], False, "reference path (--reference)"),
    (("--no-cuda-graphs",), list(kernels.FAMILIES), False, "fast path (no graphs: --no-cuda-graphs)"),
    (("--dtype", "float32"), [], False, "reference path (the fused kernels take float16, not --dtype float32)"),
    (("--distributed",), list(kernels.FAMILIES), True, "fast path + CUDA graphs"),
])
def test_flags_and_unsupported_combinations(gpu_present, flags, families, graphs, path):
    args = _args(*flags)
    assert args.kernels == {"families": families, "cuda_graphs": graphs} and args.path == path


def test_the_environment_variable_overrides_the_default_only(gpu_present, monkeypatch):
    monkeypatch.setenv("TINYGRAD3_FAST", "0")
    assert _args().path == "reference path (TINYGRAD3_FAST=0)"
    monkeypatch.setenv("TINYGRAD3_FAST", "gemm,rmsnorm")
    args = _args()
    assert args.kernels == {"families": ["rmsnorm", "gemm"], "cuda_graphs": False}
    assert "only some kernel families" in args.path
    monkeypatch.setenv("TINYGRAD3_FAST", "1")
    assert _args("--reference").kernels["families"] == []  # a flag wins over the variable


@pytest.mark.parametrize("flags, message", [
    (("--reference", "--no-cuda-graphs"), "--reference runs no kernels"),
    (("--cuda-graphs", "--no-cuda-graphs"), "exclude each other"),
    (("--cuda-graphs", "--dtype", "float32"), "--cuda-graphs: this configuration runs the reference path (the fused"),
])
def test_contradictory_flags_are_one_line(gpu_present, capsys, flags, message):
    with pytest.raises(SystemExit):
        _args(*flags)
    assert message in capsys.readouterr().err


def test_an_unknown_family_in_the_variable_is_one_line(gpu_present, monkeypatch, capsys):
    monkeypatch.setenv("TINYGRAD3_FAST", "rmsnrom")
    with pytest.raises(SystemExit):
        _args()
    assert "TINYGRAD3_FAST names unknown kernel families ['rmsnrom']" in capsys.readouterr().err


def test_the_cpu_runs_the_reference_path_and_records_it(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--device", "cpu", "--data", synthetic_dir, "--out", str(out), "--batch-size", "2",
            "--block-size", "16", "--grad-accum", "1", "--warmup", "0", "--max-updates", "2", "--eval-every", "2",
            "--eval-batches", "1", "--no-progress"]
    assert train.main(argv) == 0
    assert "kernels: reference path (cpu)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    state = json.loads((out / "last" / "state.json").read_text())
    assert config["kernels"] == state["kernels"] == {"families": [], "cuda_graphs": False}

    # A checkpoint saved on the fast path does not silently continue on another one.
    state["kernels"] = {"families": list(kernels.FAMILIES), "cuda_graphs": True}
    (out / "last" / "state.json").write_text(json.dumps(state))
    assert train.main(argv[:-5] + ["--max-updates", "3", "--resume", "--eval-every", "2", "--eval-batches", "1",
                                   "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trained on the fast path + CUDA graphs" in err and "--allow-kernel-change" in err
    assert train.main(argv[:-5] + ["--max-updates", "3", "--resume", "--allow-kernel-change", "--eval-every",
                                   "2", "--eval-batches", "1", "--no-progress"]) == 0
    assert "note: the kernel path changes" in capsys.readouterr().out
    assert json.loads((out / "last" / "state.json").read_text())["kernels"]["families"] == []
