"""The model wrapper on the tiny init: from-scratch init, frozen parts, EMA swap, the non-finite step guard, what
a checkpoint saves and the pipeline folder a finished run leaves."""
import os

import numpy as np
import paddle
import pytest
from ppdiffusers.models.resnet import ResnetBlock2D
from ppdiffusers.models.transformer_2d import Transformer2DModel

from helpers import TINY_INIT
from sd.args import ModelArguments
from sd.components import resolve_components, same_weights
from sd.model import EMA_VARIANT, LatentDiffusionModel, save_pipeline_folder
from trainer.streaming_trainer import GuardedAdamW

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model():
    paddle.seed(0)
    return LatentDiffusionModel.from_components(ModelArguments(use_ema=True, ema_decay=0.9),
                                                resolve_components("train", TINY_INIT))


def batch(n=2):
    return {"input_ids": paddle.randint(0, 49407, [n, 77]), "pixel_values": paddle.rand([n, 3, 32, 32]) * 2 - 1}


def test_from_scratch_init_zeroes_output_paths(model):
    unet = model.unet
    assert not unet.conv_out.weight.numpy().any()
    zeroed = [m.conv2.weight for _, m in unet.named_sublayers() if isinstance(m, ResnetBlock2D)]
    zeroed += [m.proj_out.weight for _, m in unet.named_sublayers() if isinstance(m, Transformer2DModel)]
    assert zeroed and all(not w.numpy().any() for w in zeroed)
    assert unet.conv_in.weight.numpy().std() > 0  # the rest keeps its random init


def test_frozen_parts_and_train_mode(model):
    assert all(p.stop_gradient for p in model.vae.parameters())
    assert all(p.stop_gradient for p in model.text_encoder.parameters())
    model.train()
    assert model.unet.training and not model.vae.training and not model.text_encoder.training


def test_ema_moves_and_training_weights_return(model):
    opt = GuardedAdamW(learning_rate=1e-2, parameters=model.param_groups())
    for _ in range(3):
        model(**batch()).backward()
        opt.step()
        opt.clear_grad()
        model.on_train_batch_end()
    trained = model.unet.conv_out.weight.numpy().copy()
    with model.ema_scope():
        ema = model.unet.conv_out.weight.numpy().copy()
    assert not np.array_equal(ema, trained) and np.abs(ema).sum() > 0  # EMA moved, and separately
    assert np.array_equal(model.unet.conv_out.weight.numpy(), trained)  # training weights are back


def test_nonfinite_steps_are_skipped_counted_then_stop(model):
    opt = GuardedAdamW(learning_rate=1e-2, parameters=model.param_groups(), max_nonfinite_steps=2)
    before = model.unet.conv_in.weight.numpy().copy()
    (model(**batch()) * float("nan")).backward()
    opt.step()
    opt.clear_grad()
    assert opt.nonfinite_skipped == 1 and np.array_equal(model.unet.conv_in.weight.numpy(), before)
    (model(**batch()) * float("inf")).backward()
    with pytest.raises(FloatingPointError, match="2 consecutive steps"):
        opt.step()
    opt.clear_grad()
    model(**batch()).backward()
    opt.nonfinite_in_a_row = 0
    opt.step()  # a finite step applies again
    opt.clear_grad()
    assert not np.array_equal(model.unet.conv_in.weight.numpy(), before)


def test_sample_keys_make_the_loss_reproducible(model):
    b = batch()
    keys = [(1, 0, 0), (1, 0, 1)]
    assert float(model(**b, sample_keys=keys)) == float(model(**b, sample_keys=keys))
    assert float(model(**b, sample_keys=keys)) != float(model(**b, sample_keys=[(1, 1, 0), (1, 1, 1)]))


def test_fused_linear_keeps_layers_and_parameters():
    """The switch itself (the fused kernel needs CUDA, so no forward here): every linear layer of the UNet gains
    the fused forward, keeping its parameters, so the optimizer and checkpoints see no difference."""
    from paddle import nn

    from sd.model import FusedLinearForward

    m = LatentDiffusionModel.from_components(ModelArguments(), resolve_components("train", TINY_INIT))
    linears = [n for n, l in m.unet.named_sublayers() if isinstance(l, nn.Linear)]
    before = dict(m.unet.named_parameters())
    assert m.enable_fused_linear() == len(linears) > 0
    after = dict(m.unet.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    layers = dict(m.unet.named_sublayers())
    assert all(isinstance(layers[n], FusedLinearForward) and isinstance(layers[n], nn.Linear) for n in linears)
    assert m.enable_fused_linear() == 0  # idempotent


def test_checkpoint_layout_and_finished_run_is_a_pipeline_folder(model, tmp_path):
    """save_trained writes the trained parts (EMA as unet/'s "ema" variant, the reference's way, and as
    unet_ema/); save_pipeline_folder adds the untouched parts byte for byte and model_index.json."""
    from ppdiffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "run"
    model.save_trained(str(out), only_updated=True)
    assert sorted(os.listdir(out)) == ["scheduler", "unet", "unet_ema"]  # only what training changed
    assert sorted(os.listdir(out / "unet")) == ["config.json", f"diffusion_paddle_model.{EMA_VARIANT}.safetensors",
                                                "diffusion_paddle_model.safetensors"]
    key = "conv_out.weight"
    with model.ema_scope():
        ema = model.unet.state_dict()[key].numpy()
    trained = model.unet.state_dict()[key].numpy()
    assert not np.array_equal(ema, trained)
    loaded = UNet2DConditionModel.from_pretrained(str(out / "unet"), variant=EMA_VARIANT).state_dict()[key].numpy()
    np.testing.assert_array_equal(loaded, ema)
    np.testing.assert_array_equal(
        UNet2DConditionModel.from_pretrained(str(out / "unet_ema")).state_dict()[key].numpy(), ema)
    np.testing.assert_array_equal(UNet2DConditionModel.from_pretrained(str(out / "unet")).state_dict()[key].numpy(),
                                  trained)

    parts = resolve_components("train", TINY_INIT)
    save_pipeline_folder(model, parts, str(out))
    save_pipeline_folder(model, parts, str(out))  # a second finish (a resumed run) replaces, never nests
    for name in ("vae", "text_encoder", "tokenizer"):
        assert sorted(os.listdir(out / name)) == sorted(os.listdir(os.path.join(TINY_INIT, name))), name
    assert same_weights(str(out / "text_encoder"), os.path.join(TINY_INIT, "text_encoder"))
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert pipe.scheduler.config.prediction_type == model.prediction_type
    assert DDIMScheduler.from_config(pipe.scheduler.config).config.prediction_type == model.prediction_type
    np.testing.assert_array_equal(pipe.unet.state_dict()[key].numpy(), trained)
