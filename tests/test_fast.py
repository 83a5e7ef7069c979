"""The fast network and the presets: shapes, whitening, optimiser groups, TTA, resolution."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import call, train_tiny_run

from cifar_lightning import cli, models, recipes, training
from cifar_lightning.checkpoint import load_checkpoint
from cifar_lightning.module import ImageClassifier


@pytest.mark.parametrize("widths", [(64, 256, 256), (32, 128, 128), (8, 16, 16)])
def test_fast_network_maps_images_to_logits(widths: tuple[int, int, int]) -> None:
    net = models.build("fast", widths=list(widths)).eval()
    assert net(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert models.build("fast", num_classes=3, widths=list(widths))(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_whitening_layer_decorrelates_training_patches() -> None:
    torch.manual_seed(0)
    # Strongly correlated inputs: smooth images, every channel a scaled copy of one field.
    field = torch.nn.functional.avg_pool2d(torch.randn(400, 1, 36, 36), 5, 1)
    images = torch.cat([field, 0.5 * field, -field], 1) + 0.2 * torch.randn(400, 3, 32, 32)
    net = models.build("fast")
    assert not net.whitening_ready
    net.init_whitening(images)
    assert net.whitening_ready and not net.whiten.weight.requires_grad
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, net.whiten.weight[:12])  # the +eigenvector half
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    # Unit variance along every direction, no correlation between the outputs.
    assert torch.allclose(cov.diag(), torch.ones(12), atol=0.05)
    off = cov - torch.diag(cov.diag())
    assert off.abs().max() < 0.05


def test_tta_averages_the_mirror_and_shifted_views() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    plain = ImageClassifier(model="fast", tta=0).eval()
    with torch.no_grad():
        assert torch.equal(plain.tta_logits(x), plain(x))
        mirror = ImageClassifier(model="fast", tta=1).eval()
        mirror.load_state_dict(plain.state_dict())
        expected = 0.5 * plain(x) + 0.5 * plain(x.flip(-1))
        assert torch.allclose(mirror.tta_logits(x), expected, atol=1e-6)
        # Level 3: half the mirror pair, a quarter each for the pair shifted by one pixel
        # towards the top-left and towards the bottom-right (borders reflected).
        full = ImageClassifier(model="fast", tta=3).eval()
        full.load_state_dict(plain.state_dict())
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        views = [x, padded[..., 0:32, 0:32], padded[..., 2:34, 2:34]]
        pairs = [0.5 * plain(v) + 0.5 * plain(v.flip(-1)) for v in views]
        six = 0.5 * pairs[0] + 0.25 * pairs[1] + 0.25 * pairs[2]
        assert torch.allclose(full.tta_logits(x), six, atol=1e-6)
        assert not torch.allclose(full.tta_logits(x), mirror.tta_logits(x), atol=1e-6)
    with pytest.raises(ValueError, match="--tta"):
        ImageClassifier(model="fast", tta=4)


def test_tta_2_runs_the_shifted_views_only_where_the_model_is_unsure() -> None:
    torch.manual_seed(0)
    net = models.build("fast", widths=[8, 16, 16]).eval()
    x = torch.randn(6, 3, 32, 32)
    calls: list[int] = []

    def counted(v: torch.Tensor) -> torch.Tensor:
        calls.append(len(v))
        return net(v)

    with torch.no_grad():
        two, six = models.tta_logits(net, x, 1), models.tta_logits(net, x, 3)
        # From every image sure (a sharp temperature) to none (a flat one), through mixes.
        mixes = 0
        for temperature in torch.logspace(-3, 3, 25).tolist():
            calls.clear()
            got = models.tta_logits(counted, x, 2, temperature)
            unsure = (two / temperature).softmax(-1).amax(-1) < models.UNSURE_BELOW
            assert torch.allclose(got, torch.where(unsure[:, None], six, two), atol=1e-5)
            mixes += 0 < int(unsure.sum()) < len(x)
            # The shifted views run on the unsure images only, and an image alone scores as in its batch.
            assert sum(calls) == 2 * len(x) + 4 * int(unsure.sum())
            for i in range(len(x)):
                assert torch.allclose(models.tta_logits(net, x[i : i + 1], 2, temperature), got[i : i + 1], atol=1e-5)
        assert mixes > 0
        assert torch.equal(models.tta_logits(net, x, 2, 1e-3), two)  # all sure: the mirror views alone
    # An exported graph computes every view and picks: the same scores.
    graph = torch.export.export(models.with_tta(net, 2, 0.05), (x,)).module()
    with torch.no_grad():
        assert torch.allclose(graph(x), models.tta_logits(net, x, 2, 0.05), atol=1e-5)


def test_batchnorm_shifts_get_their_own_learning_rate_and_decay() -> None:
    module = ImageClassifier(model="fast", optimizer="sgd", lr=2.0, weight_decay=1e-3, norm_bias_lr_scale=64.0)
    opt = module.configure_optimizers()["optimizer"]
    rest, norm = opt.param_groups
    assert rest["lr"] == 2.0 and rest["weight_decay"] == 1e-3
    assert norm["lr"] == 128.0 and norm["weight_decay"] == pytest.approx(1e-3 / 64)
    norm_ids = {id(p) for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in norm["params"]} == norm_ids


@pytest.mark.parametrize("preset", ["seed", "90", "93", "94", "95", "96", "photo"])
def test_each_preset_resolves_to_a_complete_valid_configuration(preset: str) -> None:
    cfg = cli.resolve_train_config(["--preset", preset])
    assert cfg.preset == preset
    for key, value in recipes.preset(preset).items():
        assert getattr(cfg, key) == value
    training.check_before_start(cfg)  # raises on an unknown network
    module = ImageClassifier(
        model=cfg.model, lr=cfg.lr, optimizer=cfg.optimizer, schedule=cfg.schedule, tta=cfg.tta,
        model_args=cfg.model_args(),
    )  # fmt: skip
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert training.resolve_precision(cfg.precision, "cpu") in recipes.PRECISIONS


def test_default_is_the_fast_preset_and_flags_override_it() -> None:
    assert cli.resolve_train_config([]).preset == recipes.DEFAULT_PRESET
    assert cli.resolve_train_config([]).model == "fast"
    seed = cli.resolve_train_config(["--model", "seed"])  # the notebook's recipe, not fast's SGD at lr 1.5
    assert seed.preset == "seed" and seed.optimizer == "adam" and seed.lr == 1e-3
    cfg = cli.resolve_train_config(["--preset", "94", "--epochs", "3", "--tta", "0", "--widths", "16,32,64"])
    assert (cfg.epochs, cfg.tta, cfg.widths, cfg.model) == (3, 0, [16, 32, 64], "fast")


@pytest.mark.parametrize("bad", [["--preset", "99"], ["--widths", "64,256"], ["--widths", "a,b,c"], ["--tta", "5"]])
def test_bad_preset_flags_exit_2_with_one_line(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert call(cli.train_main, bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.train
def test_fast_run_whitens_once_and_a_resume_keeps_it(tmp_path: Path) -> None:
    tree, run = train_tiny_run(tmp_path, "--preset", "94", "--epochs", "1", "--val-size", "20", "--widths", "8,16,16")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["preset"] == "94" and cfg["model"] == "fast" and cfg["widths"] == [8, 16, 16]
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    sd = ckpt["state_dict"]
    assert bool(sd["net.whitening_ready"]) and sd["net.whiten.weight"].abs().sum() > 0
    assert ckpt["hyper_parameters"]["tta"] == 2 and ckpt["hyper_parameters"]["model_args"] == {"widths": [8, 16, 16]}
    code = call(cli.train_main, ["--resume", str(run / "checkpoints" / "last.ckpt"), "--epochs", "2", "--accelerator", "cpu",
                                 "--no-progress-bar", "--data-dir", str(tree)])  # fmt: skip
    assert code == 0
    resumed = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert torch.equal(resumed["net.whiten.weight"], sd["net.whiten.weight"])  # not re-whitened, not trained


def test_a_refit_or_resume_keeps_the_recipe_of_the_run_it_starts_from(tmp_path: Path) -> None:
    run = tmp_path / "logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "seed", "epochs": 20, "data_dir": "somewhere"}))  # pre-preset run
    ckpt = str(run / "checkpoints" / "last.ckpt")
    refit = cli.resolve_train_config(["--init-from", ckpt, "--augment", "seed", "--epochs", "10"])
    assert (refit.preset, refit.model, refit.optimizer, refit.epochs) == ("seed", "seed", "adam", 10)
    resumed = cli.resolve_train_config(["--resume", ckpt])
    assert (resumed.preset, resumed.model, resumed.data_dir) == ("seed", "seed", os.path.abspath("somewhere"))  # paths: absolute
    (run / "config.yaml").write_text(yaml.safe_dump({"preset": "90", "model": "fast", "widths": [32, 128, 128]}))
    assert cli.resolve_train_config(["--init-from", ckpt]).widths == [32, 128, 128]


@pytest.mark.train
def test_lookahead_ends_on_its_slow_copy_and_saves_it_for_a_resume(tmp_path: Path) -> None:
    _, run = train_tiny_run(tmp_path, "--preset", "94", "--widths", "8,16,16", "--lookahead", "--epochs", "2")
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("Lookahead"))
    assert state["slow"], "the slow weights travel in the checkpoint"
    # At the last step the decay is 1: the network is exactly its slow copy.
    for key, slow in state["slow"].items():
        assert torch.equal(ckpt["state_dict"][key], slow), key


def test_the_94_and_95_presets_use_the_alternating_flip_and_lookahead_and_drop_the_flip_with_their_augmentation() -> None:
    for name in ("94", "95"):
        cfg = cli.resolve_train_config(["--preset", name])
        assert (cfg.alternate_flip, cfg.lookahead, cfg.augment, cfg.model) == (True, True, "standard", "fast")
    assert recipes.preset("95")["widths"] == [128, 384, 384] and recipes.preset("95")["epochs"] > recipes.preset("94")["epochs"]
    assert cli.resolve_train_config(["--preset", "94", "--augment", "none"]).alternate_flip is False
    assert cli.resolve_train_config(["--preset", "94", "--augment", "robust"]).alternate_flip is True
    explicit = cli.resolve_train_config(["--preset", "94", "--augment", "none", "--alternate-flip"])
    with pytest.raises(recipes.ConfigError, match="--no-alternate-flip"):
        training.check_before_start(explicit)


def test_the_96_preset_is_airbench96s_network_and_augmentation() -> None:
    cfg = cli.resolve_train_config(["--preset", "96"])
    assert cfg.model_args() == {"widths": [128, 512, 512], "depth": 3}
    assert (cfg.crop_padding, cfg.cutout, cfg.alternate_flip, cfg.lookahead, cfg.epochs) == (4, 12, True, True, 40)
    assert cfg.augment_options() == {"crop_padding": 4, "cutout": 12, "flip": 0.0}
    # The 2-conv presets keep the hyper-parameters their checkpoints were saved with: no depth key.
    assert cli.resolve_train_config(["--preset", "94"]).model_args() == {"widths": [64, 256, 256]}
    assert cli.resolve_train_config(["--preset", "94", "--depth", "3"]).model_args() == {"widths": [64, 256, 256], "depth": 3}
    assert cli.resolve_train_config(["--preset", "seed", "--depth", "3"]).model_args() is None


def test_a_depth_3_group_adds_its_residual_pair_to_the_pooled_activation() -> None:
    torch.manual_seed(0)
    group = models.ConvGroup(4, 8, 0.4, depth=3).eval()
    x = torch.randn(2, 4, 8, 8)
    pooled = group.act(group.norm1(group.pool(group.conv1(x))))
    branch = group.act(group.norm3(group.conv3(group.act(group.norm2(group.conv2(pooled))))))
    assert torch.allclose(group(x), pooled + branch)
    net = models.build("fast", widths=[8, 16, 16], depth=3)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert {k for k in net.state_dict() if "conv3" in k} == {f"layers.{i}.conv3.weight" for i in (1, 2, 3)}
    assert not any("conv3" in k for k in models.build("fast", widths=[8, 16, 16]).state_dict())
    with pytest.raises(ValueError, match="2 or 3"):
        models.build("fast", depth=4)


@pytest.mark.train
def test_a_96_run_trains_and_its_checkpoint_loads_back_as_the_same_network(tmp_path: Path) -> None:
    from cifar_lightning.inference import load_classifier

    _, run = train_tiny_run(tmp_path, "--preset", "96", "--widths", "8,16,16", "--epochs", "1")
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["model_args"] == {"widths": [8, 16, 16], "depth": 3}
    assert "net.layers.3.conv3.weight" in ckpt["state_dict"]
    clf = load_classifier(run / "checkpoints" / "last.ckpt")
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    probs = clf.probabilities(x)
    assert probs.shape == (3, 10) and torch.allclose(probs.sum(1), torch.ones(3))


@pytest.mark.parametrize("bad", [["--depth", "4"], ["--cutout", "-1"], ["--cutout", "40"], ["--preset", "96", "--augment", "seed"]])
def test_bad_depth_and_cutout_flags_exit_2_with_one_line(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert call(cli.train_main, [*bad, "--data-dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.train
def test_the_schedule_counts_the_steps_lightning_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The triangle schedule's length is counted without trainer.estimated_stepping_batches (which
    would lose a resumed run's loader position); it must still be the number of steps trained."""
    import lightning as L
    from conftest import tiny_train_argv, write_imagefolder

    seen = {}

    class Count(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen["ours"] = pl_module.total_steps()

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen["ran"], seen["lightning"] = trainer.global_step, int(trainer.estimated_stepping_batches)

    tree = write_imagefolder(tmp_path / "tree", n_train=9)  # 90 images: a last batch of 10 at batch 16
    monkeypatch.setenv("CIFAR_LIGHTNING_CACHE", str(tmp_path / "cache"))
    argv = ["--preset", "94", "--widths", "8,16,16", "--batch-size", "16", "--tta", "0", "--log-images-every", "0"]
    cfg = cli.resolve_train_config(tiny_train_argv(tree, tmp_path / "logs", *argv, epochs=2))
    training.run_training(cfg, callbacks=[Count()])
    assert seen["ours"] == seen["ran"] == seen["lightning"] > 0
