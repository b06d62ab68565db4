"""The execution policy: defaults per device, frozen backbone stages, and when compile runs."""
from __future__ import annotations

import pytest
import torch
import yaml

import test_checkpoint  # noqa: F401  registers the tiny test models
from test_train import TINY_RECIPE, _recipe, data_root  # noqa: F401  (fixture)

from fashion_retrieval.config import ConfigError, config_from_dict
from fashion_retrieval.engine import execution
from fashion_retrieval.engine.execution import CompileGate, freeze_backbone_stages, plan_execution
from fashion_retrieval.engine.train import train
from fashion_retrieval.models.global_net import GlobalNet


def _config(**train_keys):
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["train"].update(train_keys)
    recipe["data"]["num_workers"] = "auto"
    return config_from_dict(recipe)


def test_auto_policy_per_device(monkeypatch):
    monkeypatch.setattr(execution, "available_cores", lambda: 2)
    cpu = plan_execution(_config(), torch.device("cpu"))
    # compile: auto stays eager on the CPU (slower compiled in the real loop there), gated on CUDA
    assert (cpu.channels_last, cpu.amp, cpu.compile, cpu.threads, cpu.num_workers) == (True, False, "off", 2, 1)
    gpu = plan_execution(_config(), torch.device("cuda"))
    assert gpu.amp and gpu.channels_last and gpu.pin_memory and gpu.num_workers == 2 and gpu.compile == "auto"
    forced = plan_execution(_config(amp=True, channels_last=False, compile=False, threads=1), torch.device("cpu"))
    assert (forced.amp, forced.channels_last, forced.compile, forced.threads) == (True, False, "off", 1)
    two_ranks = plan_execution(_config(), torch.device("cpu"), world_size=2)
    assert two_ranks.threads == 1 and two_ranks.compile == "off"  # each rank gets its share of the cores


@pytest.mark.parametrize("backbone,stages", [("resnet18", 2), ("efficientnet_lite0", 3)])
def test_frozen_stages_keep_weights_and_batchnorm_statistics(backbone, stages):
    torch.manual_seed(0)
    model = GlobalNet(num_items=5, backbone=backbone, embedding_dim=16)
    frozen = freeze_backbone_stages(model, stages)
    assert len(frozen) == stages + 1  # the stem and N stages
    before = {name: t.clone() for name, t in model.state_dict().items()}
    frozen_names = {name for name, _ in model.named_parameters() if not _.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        output = model(torch.rand(4, 3, 64, 48))
        logits = output["logits"] if isinstance(output, dict) else output
        optimizer.zero_grad()
        logits.float().pow(2).mean().backward()
        optimizer.step()
        model.eval()
        model.train()  # what evaluation during training does: it must not thaw the frozen stages
    after = model.state_dict()
    stem_prefix = "backbone.stem" if backbone == "resnet18" else "backbone._bn0"
    frozen_buffers = [n for n in after if n.startswith(stem_prefix) and "running_mean" in n]
    assert frozen_buffers and all(torch.equal(before[n], after[n]) for n in frozen_buffers)
    assert frozen_names and all(torch.equal(before[n], after[n]) for n in frozen_names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone")]
    assert any(not torch.equal(before[n], after[n]) for n in trainable)  # the rest still learns
    model(torch.rand(2, 3, 64, 48))  # in train mode, the frozen stages run as in evaluation
    assert model.training and all(m.training is False for m in frozen[0].modules())


def test_freezing_more_stages_than_the_backbone_has_is_refused():
    model = GlobalNet(num_items=5, backbone="resnet18", embedding_dim=16)
    with pytest.raises(ConfigError, match="resnet|ResNet.*4 stages"):
        freeze_backbone_stages(model, 5)


class _Clock:
    def __init__(self, step_s):
        self.now, self.step_s = 0.0, step_s

    def __call__(self):
        self.now += self.step_s
        return self.now


@pytest.mark.parametrize("step_s,steps,expected", [(1.0, 100, False), (1.0, 10_000, True), (0.01, 10_000, False)])
def test_auto_compile_only_when_the_rest_of_the_run_pays_it_back(monkeypatch, step_s, steps, expected):
    monkeypatch.setattr(execution.time, "perf_counter", _Clock(step_s))
    gate = CompileGate("auto", steps, log=lambda _: None)
    decisions = [gate.wants_compile_now() for _ in range(min(steps, 50))]
    assert any(decisions) is expected and sum(decisions) <= 1
    assert CompileGate("off", steps, log=print).wants_compile_now() is False
    on = CompileGate("on", steps, log=print)
    assert on.wants_compile_now() is True and on.wants_compile_now() is False


def test_a_compile_that_fails_falls_back_to_eager(data_root, tmp_path, monkeypatch):  # noqa: F811
    """torch.compile is an optimisation: a toolchain that cannot compile leaves the run eager, same result."""
    class Broken(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("no C++ compiler")

    logs: list[str] = []
    monkeypatch.setattr(execution.torch, "compile", lambda module: Broken())
    recipe = _recipe(tmp_path, train__compile=True, train__epochs=1)
    compiled = train(config_from_dict(yaml.safe_load(recipe.read_text())), data_root, tmp_path / "a", log=logs.append)
    eager_recipe = _recipe(tmp_path, train__compile=False, train__epochs=1)
    eager = train(config_from_dict(yaml.safe_load(eager_recipe.read_text())), data_root, tmp_path / "b",
                  log=lambda _: None)
    assert any("training stays eager" in line for line in logs)
    for (name, a), b in zip(compiled.model.state_dict().items(), eager.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_logs_its_execution_plan_and_freezes(data_root, tmp_path):  # noqa: F811
    logs: list[str] = []
    recipe = _recipe(tmp_path, train__epochs=1)
    train(config_from_dict(yaml.safe_load(recipe.read_text())), data_root, tmp_path / "run", log=logs.append)
    assert any(line.startswith("execution on cpu: channels_last=on, bf16 autocast=off") for line in logs)


def test_decoded_cache_off_as_yaml_writes_it():
    """`data.decoded_cache: off` is a boolean to YAML; it must still mean off."""
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["data"]["decoded_cache"] = yaml.safe_load("off")
    assert config_from_dict(recipe).data.decoded_cache == "off"
    recipe["data"]["decoded_cache"] = yaml.safe_load("on")
    assert config_from_dict(recipe).data.decoded_cache == "run"


def test_embedding_runs_channels_last_on_the_cpu_and_gives_the_weights_their_format_back(tmp_path):
    from PIL import Image

    from fashion_retrieval.data.table import Sample, SampleTable
    from fashion_retrieval.engine.embed import embed_table

    torch.manual_seed(0)
    model = GlobalNet(num_items=5, backbone="resnet18", embedding_dim=16).eval()
    for i in range(6):
        Image.new("RGB", (40, 56), (40 * i, 255 - 30 * i, 90)).save(tmp_path / f"{i}.jpg")
    table = SampleTable([Sample(path=f"{i}.jpg", item_id=str(i)) for i in range(6)], tmp_path)
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last) and model.backbone_weights_channels_last()))
    model.backbone_weights_channels_last = lambda: all(
        p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)

    fast = embed_table(model, table, (32, 24), batch_size=4, progress=False, fold_norms=False)
    assert seen and all(seen)  # weights and inputs channels_last during the forward
    assert all(p.is_contiguous() for p in model.parameters())  # ... and contiguous again after
    seen.clear()
    plain = embed_table(model, table, (32, 24), batch_size=4, progress=False, channels_last=False, fold_norms=False)
    assert seen and not any(seen)
    assert torch.allclose(torch.from_numpy(fast.embeddings), torch.from_numpy(plain.embeddings), atol=1e-5)
    folded = embed_table(model, table, (32, 24), batch_size=4, progress=False)  # the default: folded too
    assert torch.allclose(torch.from_numpy(folded.embeddings), torch.from_numpy(plain.embeddings), atol=1e-5)

    model.to(memory_format=torch.channels_last)  # a channels_last training model stays as it is
    embed_table(model, table, (32, 24), batch_size=4, progress=False)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
