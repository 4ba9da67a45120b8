"""train.precision / train.compile: resolution per machine, clear errors, and the RNG-state round trip."""
import pytest
import torch
from torch import nn

from gmmcond.modeling import precision as P
from gmmcond.engine.trainer import rng_state, set_rng_state, train
from gmmcond.errors import PrecisionError, RunError
from gmmcond.io import load_checkpoint


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU does (True) or does not (False) compute bf16 natively."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)

    def set(native: bool):
        monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: native)

    return set


def test_auto_picks_bf16_only_where_native(cpu_bf16):
    cpu_bf16(True)
    assert P.resolve_precision("auto", "cpu").name == "bf16"
    cpu_bf16(False)
    chosen = P.resolve_precision("auto", "cpu")
    assert chosen.name == "fp32" and chosen.accelerate == "no" and "no native bf16" in chosen.reason


def test_unsupported_precisions_are_clear_errors(cpu_bf16):
    cpu_bf16(False)
    with pytest.raises(PrecisionError, match="train.precision: bf16 is not native on this cpu"):
        P.resolve_precision("bf16", "cpu")
    with pytest.raises(PrecisionError, match="train.precision: fp16 autocast needs a CUDA GPU"):
        P.resolve_precision("fp16", "cpu")
    with pytest.raises(PrecisionError, match="not one of auto, fp32, bf16, fp16"):
        P.resolve_precision("int8", "cpu")


def test_the_launcher_flag_wins_over_the_config(cpu_bf16, monkeypatch):
    cpu_bf16(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    chosen = P.resolve_precision("fp32", "cpu")
    assert chosen.name == "bf16" and "accelerate launch --mixed_precision" in chosen.reason
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate's default: the config decides
    assert P.resolve_precision("fp32", "cpu").name == "fp32"


def test_bf16_training_keeps_fp32_weights_and_records_the_choice(tiny_cfg, tmp_path, cpu_bf16):
    cpu_bf16(True)
    run = tmp_path / "run"
    train(tiny_cfg("train.precision=bf16"), run)
    state = load_checkpoint(run / "checkpoints" / "step_0000003.pt")
    dtypes = {v.dtype for v in state["model"].values() if v.is_floating_point()} | {
        v.dtype for v in state["ema"].values() if v.is_floating_point()}
    assert dtypes == {torch.float32}
    assert "precision: bf16" in (run / "config.yaml").read_text()


def test_rng_state_round_trip_and_old_format():
    saved = rng_state()
    a = torch.rand(5)
    set_rng_state(saved)
    assert torch.equal(torch.rand(5), a)
    set_rng_state(saved["cpu"])  # checkpoints written before CUDA states were kept
    assert torch.equal(torch.rand(5), a)
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="RNG states of 1 CUDA devices, but this machine has 0"):
            set_rng_state({"cpu": saved["cpu"], "cuda": [torch.zeros(16, dtype=torch.uint8)]})


def test_compile_failure_is_a_clear_error():
    class BackendCompilerFailed(Exception):
        pass

    BackendCompilerFailed.__module__ = "torch._dynamo.exc"
    with pytest.raises(PrecisionError, match="train.compile: torch.compile failed on this platform .*set train.compile=false"):
        with P.first_compiled_call(lambda s: None):
            raise BackendCompilerFailed("no C compiler")
    with pytest.raises(KeyError):  # anything else is a bug and surfaces as itself
        with P.first_compiled_call(lambda s: None):
            raise KeyError("x")


def test_a_model_compiled_after_another_of_its_class_runs_its_own_forward_hooks():
    # an experiment trains its arms in one process: "no head" then "head ngmg surplus" compiled the same U-Net
    # class, and dynamo (which does not guard on hooks) reused the graph traced without the head's hook
    class Block(nn.Module):
        def forward(self, x):
            return x * 2

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x) + 1

    def denoiser():
        wrapper = nn.Module()
        wrapper.inner_model = Inner()
        return wrapper

    x = torch.ones(3)
    plain = denoiser()
    P.compile_model(plain, lambda s: None, backend="eager")  # tracing alone: no C compiler needed
    plain.inner_model(x)
    hooked, seen = denoiser(), []
    hooked.inner_model.block.register_forward_hook(lambda module, args, out: seen.append(out))
    P.compile_model(hooked, lambda s: None, backend="eager")
    assert torch.equal(hooked.inner_model(x), torch.full((3,), 3.0))
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((3,), 2.0))


def test_two_trainings_in_one_process_may_use_different_precisions(tiny_cfg, tmp_path, cpu_bf16):
    cpu_bf16(True)  # bf16 autocast runs on any CPU; only its speed needs native support
    train(tiny_cfg("train.precision=fp32"), tmp_path / "fp32")
    train(tiny_cfg("train.precision=bf16"), tmp_path / "bf16")  # accelerate's state from the first run is not reused
    assert "precision: bf16" in (tmp_path / "bf16" / "config.yaml").read_text()


@pytest.mark.parametrize("flags, words, native", [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AMX", True),
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16", True),
    ({"avx2", "avx512f"}, "AVX512 (no native bf16)", False),
    ({"avx2"}, "AVX2 (no native bf16)", False),
])
def test_a_benchmark_names_its_host_by_cores_and_the_widest_feature_that_sets_its_speed(monkeypatch, flags, words, native):
    from gmmcond import utils

    monkeypatch.setattr(utils, "cpu_flags", lambda: flags)
    described = utils.host_description()
    assert described.endswith(f", {utils.usable_cores()} cores, {words}") and utils.cpu_has_native_bf16() is native
