"""A training step (issue 11 item 4): no device-to-host synchronization outside the logging steps,
and activation checkpointing ("full", "selective", every k-th block) that changes nothing but memory."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from solar_kernels.model import CausalLM, preset
from tests.helpers import losses, run_pretrain
from training.config import load_config
from training.objectives import LanguageModeling
from training.trainer import Trainer, parallelize

aten = torch.ops.aten
# aten ops that copy a value to the host (on a GPU: wait for the device), and the Python methods
# that do (on the CPU they may not reach a syncing aten op, so they are counted where they are called).
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.equal.default}
SYNCING_METHODS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
}


ROOT = Path(__file__).resolve().parents[2]
# Host reads that happen on the CPU only: the fused loss checks its labels' range with
# `bool(bad.any())` where that costs no device sync, i.e. on CPU tensors; on a GPU it checks only
# with SOLAR_KERNELS_CHECK_LABELS=1 (tests/ops/test_linear_logprobs.py covers both).
ELSEWHERE = {("solar_kernels/ops/linear_logprobs.py", "_check_label_values")}


def _innermost_project_frame() -> tuple[str, str]:
    """(path, function) of the innermost frame in this repository's code (tests excluded)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if ROOT in path.parents and ".venv" not in path.parts and "tests" not in path.relative_to(ROOT).parts:
            return str(path.relative_to(ROOT)), frame.name
    return "?", "?"


class HostSyncProbe(TorchDispatchMode):
    """Records every host read of a tensor value and the project code that asked for it, except of
    the optimizer's step counters (torch's non-fused AdamW keeps them on the host by design) and
    while ``paused`` (the data pipeline, which builds batches on the host before they are moved)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.optimizer, self.calls, self.paused = optimizer, [], False
        probe = self

        class Methods(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                probe._check(func, func in SYNCING_METHODS, args)
                return func(*args, **(kwargs or {}))

        self.methods = Methods()

    def _check(self, func, syncing: bool, args) -> None:
        if not syncing or self.paused:
            return
        steps = {state["step"].data_ptr() for state in self.optimizer.state.values() if "step" in state}
        if not any(isinstance(a, torch.Tensor) and a.data_ptr() in steps for a in args):
            self.calls.append((str(func), _innermost_project_frame()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._check(func, func in SYNCING_OPS, args)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.methods.__exit__(*exc)


@pytest.mark.parametrize("stage_shape", ["unpacked", "packed"])
def test_a_non_logging_step_never_waits_for_the_device(workspace, tmp_path, monkeypatch, stage_shape):
    original, probes = Trainer._train_step, {}

    def probed(self, step, batches):
        if step % self.config.train.log_every == 0:  # a logging step may read values back
            return original(self, step, batches)
        probe = probes[step] = HostSyncProbe(self.optimizer)

        def host_batches():
            while True:
                probe.paused = True
                batch = next(batches)
                probe.paused = False
                yield batch

        with probe:
            return original(self, step, host_batches())

    monkeypatch.setattr(Trainer, "_train_step", probed)
    import training.stages as stages

    # pretraining rows are packed (position_ids, document masks); SFT rows by default are not
    monkeypatch.setattr(
        stages, "LanguageModeling", lambda model, packed: LanguageModeling(model, packed=stage_shape == "packed")
    )
    run_pretrain(workspace, tmp_path / "run", steps=6, log_every=3, export=False, grad_accum=2)
    assert sorted(probes) == [1, 2, 4, 5]
    for step, probe in probes.items():
        ours = sorted(
            {f"{func} in {path}:{name}" for func, (path, name) in probe.calls if (path, name) not in ELSEWHERE}
        )
        assert ours == [], f"step {step}: host syncs at " + "; ".join(ours)


def _objective(config, mode: str, every: int):
    torch.manual_seed(0)
    model = CausalLM.from_config(preset("tiny", backend="torch", vocab_size=320, max_position_embeddings=512))
    config.train.activation_checkpointing, config.train.ac_every = mode, every
    return parallelize(LanguageModeling(model, packed=False), model.model.layers, config, 1, torch.device("cpu"))


@pytest.mark.parametrize("mode, every", [("full", 1), ("selective", 1), ("full", 2), ("selective", 3)])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode, every):
    config = load_config(None, ["--model.preset=tiny", "--train.export=false", "--model.dtype=float32"])
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 320, (3, 37), generator=generator)
    labels = torch.where(torch.rand(3, 37, generator=generator) < 0.2, -100, input_ids)
    results = []
    for policy in (("none", 1), (mode, every)):
        objective = _objective(config, *policy)
        loss, _ = objective(input_ids, labels)
        loss.backward()
        # the wrapper renames parameters (..._checkpoint_wrapped_module...), their order stays
        names = [n.replace("._checkpoint_wrapped_module", "") for n, _ in objective.named_parameters()]
        results.append((loss.detach(), dict(zip(names, (p.grad for p in objective.parameters())))))
    (plain_loss, plain_grads), (loss, grads) = results
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert plain_grads.keys() == grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=0, atol=0, msg=name)
    wrapped = [type(block).__name__ for block in objective.model.model.layers]
    assert [w == "CheckpointWrapper" for w in wrapped] == [i % every == 0 for i in range(len(wrapped))]


def test_selective_checkpointing_in_a_run_matches_no_checkpointing(workspace, tmp_path):
    run_pretrain(workspace, tmp_path / "plain", steps=3, export=False)
    run_pretrain(
        workspace, tmp_path / "selective", steps=3, export=False, activation_checkpointing="selective", ac_every=2
    )
    assert losses(tmp_path / "selective") == losses(tmp_path / "plain")


@pytest.mark.parametrize(
    "value, message",
    [("some", "train.activation_checkpointing must be none, full, selective"), (0, "train.ac_every must be >= 1")],
)
def test_bad_activation_checkpointing_settings(value, message):
    key = "activation_checkpointing" if isinstance(value, str) else "ac_every"
    with pytest.raises(ValueError, match=message):
        load_config(None, ["--model.preset=tiny", "--train.export=false", f"--train.{key}={value}"])


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (aten.mm.default, aten.addmm.default, aten.bmm.default)
        return func(*args, **(kwargs or {}))


def test_selective_keeps_the_matmul_outputs_and_full_recomputes_them():
    config = load_config(None, ["--model.preset=tiny", "--train.export=false", "--model.dtype=float32"])
    input_ids = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(2))
    backward_matmuls = {}
    for mode in ("none", "full", "selective"):
        loss, _ = _objective(config, mode, 1)(input_ids, input_ids)
        with _CountMatmuls() as counter:
            loss.backward()
        backward_matmuls[mode] = counter.count
    # "full" recomputes every block's projections in backward; "selective" recomputes only cheap ops
    assert backward_matmuls["full"] >= backward_matmuls["none"] + 4 * 4, backward_matmuls
    assert backward_matmuls["selective"] == backward_matmuls["none"], backward_matmuls
