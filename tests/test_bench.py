"""The benchmark commands run and report what they say (tiny settings; timing targets live in BENCHMARKS.md)."""

import pytest
import torch

from sparse import bench
from sparse.depthwise import CONV_METHODS, WEIGHT_GRAD_METHODS

@pytest.fixture(autouse=True)
def keep_thread_count():
    """The commands set torch's thread count for the process: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SMALL = ["--size", "atto", "--batch", "2", "--img-size", "64", "--threads", "1", "--iters", "1", "--warmup", "0"]


def test_step_mode_times_each_backend_and_its_phases(capsys):
    best = bench.main(["--mode", "step", *SMALL])
    assert set(best) == {"torch", "dense-masked"} and all(seconds > 0 for seconds in best.values())
    out = capsys.readouterr().out
    assert "dense-masked" in out and "x dense-masked" in out
    for phase in ("encoder forward", "decoder+loss forward", "decoder+loss backward", "encoder backward",
                  "optimizer"):
        assert out.count(phase) == 2, phase  # once per backend


def test_dwconv_mode_times_every_method_at_every_stage(capsys):
    results = bench.main(["--mode", "dwconv", *SMALL])
    assert [p for p, _ in results] == [8, 4, 2, 1]
    for timings in results.values():
        assert set(timings) == {f"conv:{m}" for m in CONV_METHODS} | {f"wgrad:{m}" for m in WEIGHT_GRAD_METHODS}
    assert "fastest" in capsys.readouterr().out


def test_cpu_clock_is_refused_on_other_devices(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--mode", "step", "--device", "cuda", "--clock", "cpu", *SMALL])
    assert "--clock cpu times CPU work only" in capsys.readouterr().err
