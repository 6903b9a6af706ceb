"""AdaptiveSteps with the clients users run: PyTorch Lightning, HF accelerate, deepcopy and pickle (CPU, small)."""
import copy
import csv
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from adaptive_depth import AdaptiveSteps, LeakyMLP, step_sizes

pl = pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.usefixtures("torch_one_thread")

X = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))


def make_model(seed=0):
    torch.manual_seed(seed)
    return LeakyMLP(4, 3, width=8, depth=4, effective_depth=2.0, scheme="exponential")


def make_opt(model, **kw):
    kw = {"every": 2, "fast_start": 2, "weight_decay": 1e-3, **kw}
    return AdaptiveSteps(torch.optim.Adam(model.parameters(), lr=1e-2), model, **kw)


def loader(batch_size=8):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=batch_size, shuffle=False)


def train(model, opt, steps):
    for i in range(steps):
        x, y = X[8 * (i % 5):8 * (i % 5 + 1)], Y[8 * (i % 5):8 * (i % 5 + 1)]
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


def assert_same(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


# --------------------------------------------------------------------------------- Lightning
class Module(pl.LightningModule):
    def __init__(self, manual=False, seed=0):
        super().__init__()
        self.net = make_model(seed)
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            return (self.net(x) - y).pow(2).mean()
        opt = self.optimizers()
        with opt.toggle_model():
            loss = (self.net(x) - y).pow(2).mean()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        opt = make_opt(self.net)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(tmp_path, steps, **kw):
    kw = {"accelerator": "cpu", "devices": 1, "max_steps": steps, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
          "default_root_dir": str(tmp_path), **kw}
    return pl.Trainer(**kw)


def fit(module, tmp_path, steps, ckpt_path=None, batch_size=8, **kw):
    t = trainer(tmp_path, steps, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|log_every_n).*")
        t.fit(module, loader(batch_size), ckpt_path=ckpt_path)
    return t


def test_lightning_automatic_with_scheduler_clipping_bf16_and_one_lr_log(tmp_path):
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger
    module = Module()
    before = step_sizes(module.net)[0]
    t = fit(module, tmp_path, 6, precision="bf16-mixed", gradient_clip_val=0.5,
            logger=CSVLogger(str(tmp_path)), log_every_n_steps=1,
            callbacks=[LearningRateMonitor(logging_interval="step")])
    opt = t.optimizers[0]
    assert isinstance(opt, AdaptiveSteps) and opt.steps_done == 6
    assert not torch.equal(step_sizes(module.net)[0], before)  # adapted (fast start at steps 1, 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)  # the scheduler drove the inner rate
    with open(t.logger.log_dir + "/metrics.csv") as f:
        columns = next(csv.reader(f))
    assert [c for c in columns if c.startswith("lr")] == ["lr-AdaptiveSteps"]  # once, not per wrapper level


def test_lightning_manual_optimization_toggle_model_and_manual_backward(tmp_path):
    module = Module(manual=True)
    weights = [p.detach().clone() for p in module.net.parameters()]
    before = step_sizes(module.net)[0]
    t = fit(module, tmp_path, 4)
    opt = t.optimizers[0]
    assert opt.steps_done == 4
    assert all(not torch.equal(p, w) for p, w in zip(module.net.parameters(), weights))
    assert not torch.equal(step_sizes(module.net)[0], before)
    assert all(p.requires_grad for p in module.net.parameters())  # untoggled


def test_lightning_checkpoint_resume_is_bit_exact(tmp_path):
    # one batch per epoch: Lightning 2.6 replays the first batch of the epoch after a resume from a plain
    # DataLoader (a plain Adam run differs too otherwise), which is not what this test is about
    whole = Module()
    fit(whole, tmp_path / "a", 10, batch_size=40)
    half = Module()
    t = fit(half, tmp_path / "b", 5, batch_size=40)
    path = str(tmp_path / "half.ckpt")
    t.save_checkpoint(path)
    resumed = Module(seed=123)  # a different init: everything must come from the checkpoint
    t2 = fit(resumed, tmp_path / "c", 10, ckpt_path=path, batch_size=40)
    assert t2.optimizers[0].steps_done == 10
    assert_same(whole, resumed)


# --------------------------------------------------------------------------------- accelerate
def test_accelerate_prepare_save_state_load_state_is_bit_exact(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    model = make_model()
    model, opt = acc.prepare(model, make_opt(model))
    train(model, opt, 4)
    acc.save_state(str(tmp_path / "state"))
    train(model, opt, 6)

    acc2 = accelerate.Accelerator(cpu=True)
    other = make_model(seed=5)
    other, opt2 = acc2.prepare(other, make_opt(other))
    acc2.load_state(str(tmp_path / "state"))
    assert opt2.optimizer.steps_done == 4  # accelerate's wrapper holds the plugin as .optimizer
    train(other, opt2, 6)
    assert_same(model, other)


# --------------------------------------------------------------------------------- deepcopy and pickle
def _pickle_copy(obj):
    return pickle.loads(pickle.dumps(obj))


def _torch_copy(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=False)


@pytest.mark.parametrize("duplicate", [copy.deepcopy, _pickle_copy, _torch_copy])
@pytest.mark.parametrize("rule", ["equal_distance", "learned"])
def test_copy_of_model_and_optimizer_steps_in_lockstep(duplicate, rule):
    model = make_model()
    opt = make_opt(model, rule=rule)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)  # it patches opt.step: the copy must not share it
    train(model, opt, 3)
    both = duplicate({"model": model, "opt": opt, "sched": sched})
    assert both["opt"].model is both["model"] and both["opt"].steps_done == 3
    train(both["model"], both["opt"], 7)
    assert opt.steps_done == 3  # the copy stepped itself, not the original
    train(model, opt, 7)
    assert_same(model, both["model"])
    assert both["opt"].steps_done == opt.steps_done == 10
    assert torch.equal(step_sizes(model)[0], step_sizes(both["model"])[0])


@pytest.mark.parametrize("duplicate", [copy.deepcopy, _pickle_copy])
def test_copy_of_the_optimizer_alone_brings_its_model(duplicate):
    model = make_model()
    opt = make_opt(model)
    train(model, opt, 3)
    twin = duplicate(opt)
    assert twin.model is not model and twin.param_groups is twin.base_optimizer.param_groups
    assert twin.state is twin.base_optimizer.state and len(twin.state) == len(opt.state)
    train(model, opt, 5)
    train(twin.model, twin, 5)
    assert_same(model, twin.model)
    assert twin.steps_done == opt.steps_done == 8
