"""sd/components.py: every row of the component table, for training and eval, on real folders built from
sd/tiny_init's parts (symlinked) in tmp_path."""
import dataclasses
import json
import os
import shutil

import pytest

from helpers import TINY_INIT
from sd.components import RULES, Components, resolve_components

pytestmark = pytest.mark.unit

PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def make_root(path, parts=PARTS, unet_config=True, unet_folder=False):
    """An init folder (parts + unet_config.json) or, with unet_folder, a pipeline folder (parts + unet/)."""
    path.mkdir(parents=True)
    for part in parts:
        os.symlink(os.path.join(TINY_INIT, part), path / part)
    if unet_config:
        shutil.copy(os.path.join(TINY_INIT, "unet_config.json"), path / "unet_config.json")
    if unet_folder:
        make_unet(path / "unet")
    return path


def make_unet(path):
    """A UNet folder as a checkpoint holds it (config.json; weights are not read by the resolver)."""
    path.mkdir(parents=True)
    shutil.copy(os.path.join(TINY_INIT, "unet_config.json"), path / "config.json")
    return path


@pytest.fixture()
def init(tmp_path):
    return make_root(tmp_path / "init")


@pytest.fixture()
def ckpt(tmp_path):
    """A training checkpoint: unet/ and unet_ema/ (and, per test, scheduler/ or text_encoder/ beside them)."""
    c = tmp_path / "run" / "checkpoint-5"
    make_unet(c / "unet")
    make_unet(c / "unet_ema")
    return c


def test_the_table_names_every_component_once():
    fields = {f.name for f in dataclasses.fields(Components)} - {"unet_from_config"}
    assert sorted(row.component for row in RULES) == sorted(fields)
    assert RULES[0].component == "unet"  # siblings are looked up next to the resolved UNet


# ---- training ----

def test_train_init_folder_means_unet_from_its_config(init):
    c = resolve_components("train", str(init))
    assert c == Components(vae=str(init / "vae"), text_encoder=str(init / "text_encoder"),
                           tokenizer=str(init / "tokenizer"), scheduler=str(init / "scheduler"),
                           unet=str(init / "unet_config.json"), unet_from_config=True)
    with open(os.path.join(TINY_INIT, "unet_config.json"), encoding="utf-8") as f:
        assert c.unet_config() == json.load(f)
    with open(os.path.join(TINY_INIT, "vae", "config.json"), encoding="utf-8") as f:
        assert c.vae_config() == json.load(f)


def test_train_pipeline_folder_means_pretrained_unet(tmp_path):
    root = make_root(tmp_path / "pipe", unet_config=False, unet_folder=True)
    c = resolve_components("train", str(root))
    assert c.unet == str(root / "unet") and not c.unet_from_config
    with open(root / "unet" / "config.json", encoding="utf-8") as f:
        assert c.unet_config() == json.load(f)


def test_train_root_with_both_unet_forms_is_ambiguous(tmp_path):
    root = make_root(tmp_path / "both", unet_folder=True)
    with pytest.raises(ValueError, match="has both unet/ and unet_config.json: pass --unet_name_or_path"):
        resolve_components("train", str(root))
    assert not resolve_components("train", str(root), unet=str(root / "unet")).unet_from_config
    assert resolve_components("train", str(root), unet=str(root / "unet_config.json")).unet_from_config


def test_train_scheduler_is_optional_eval_needs_it(tmp_path, ckpt):
    root = make_root(tmp_path / "nosched", parts=PARTS[:3])
    assert resolve_components("train", str(root)).scheduler is None
    with pytest.raises(FileNotFoundError, match=r"--model_dir .*nosched has no scheduler/ folder"):
        resolve_components("eval", str(root), unet=str(ckpt / "unet"))


def test_train_overrides_win_and_need_no_root(tmp_path, init):
    other = make_root(tmp_path / "other")
    c = resolve_components("train", str(init), vae=str(other / "vae"), text_encoder=str(other / "text_encoder"),
                           tokenizer=str(other / "tokenizer"), unet=str(other / "unet_config.json"))
    assert (c.vae, c.text_encoder, c.tokenizer, c.unet) == tuple(
        str(other / p) for p in ("vae", "text_encoder", "tokenizer", "unet_config.json"))
    assert c.scheduler == str(init / "scheduler")  # no override exists: always the root's
    alone = resolve_components("train", None, vae=str(other / "vae"), text_encoder=str(other / "text_encoder"),
                               tokenizer=str(other / "tokenizer"), unet=str(other / "unet_config.json"))
    assert alone.scheduler is None and alone.unet_from_config


@pytest.mark.parametrize("row", RULES, ids=lambda r: r.component)
def test_each_required_row_missing_names_its_flag(tmp_path, ckpt, row):
    """Per row and purpose: a root without the component is an error naming the flag (or the root's flag when
    there is no override), or, where not required, gives None."""
    parts = tuple(p for p in PARTS if p != row.subfolder)
    root = make_root(tmp_path / "root", parts=parts, unet_config=row.component != "unet")
    train = row.train
    if train.required:
        with pytest.raises(FileNotFoundError, match=f"--pretrained_model_name_or_path .* has no {row.subfolder}/.*"
                                                    f"{train.flag}"):
            resolve_components("train", str(root))
        with pytest.raises(ValueError, match=f"{train.flag} is required"):
            resolve_components("train", None, **{k: str(root / k) for k in ("vae", "text_encoder", "tokenizer")
                                                 if k != row.component and k in PARTS},
                               **({} if row.component == "unet" else {"unet": str(ckpt / "unet")}))
    else:
        assert getattr(resolve_components("train", str(root)), row.component) is None
    unet = {} if row.component == "unet" else {"unet": str(root.parent / "run" / "checkpoint-5" / "unet")}
    assert row.eval.required
    with pytest.raises(FileNotFoundError, match=f"--model_dir .* has no {row.subfolder}/"
                                                + (f".*{row.eval.flag}" if row.eval.flag else " folder")):
        resolve_components("eval", str(root), **unet)


@pytest.mark.parametrize("purpose,kwargs,error,match", [
    ("train", {"unet": "sd/configs/unet_tinyy.json"}, FileNotFoundError, "--unet_name_or_path: no such config file"),
    ("train", {"unet": "runs/nowhere/unet"}, FileNotFoundError, r"no such folder \(and not a .json config\)"),
    ("train", {"vae": "nowhere/vae"}, FileNotFoundError, "--vae_name_or_path: no such folder"),
    ("train", {"text_encoder": "nowhere/te"}, FileNotFoundError, "--text_encoder_name_or_path: no such folder"),
    ("train", {"tokenizer": "nowhere/tok"}, FileNotFoundError, "--tokenizer_name: no such folder"),
    ("eval", {"unet": "runs/nowhere/unet"}, FileNotFoundError, "--unet_path: no such folder: runs/nowhere/unet"),
    ("eval", {"unet": os.path.join(TINY_INIT, "unet_config.json")}, FileNotFoundError, "--unet_path: no such folder"),
    ("eval", {"text_encoder": "nowhere/te"}, FileNotFoundError, "--text_encoder_path: no such folder"),
    ("eval", {"vae": os.path.join(TINY_INIT, "vae")}, ValueError, "eval takes no override for the VAE"),
    ("eval", {"tokenizer": os.path.join(TINY_INIT, "tokenizer")}, ValueError, "no override for the tokenizer"),
])
def test_mistyped_overrides_are_errors_never_random_init(init, ckpt, purpose, kwargs, error, match):
    if purpose == "eval":  # everything else is fine: a trained UNet
        kwargs = {"unet": str(ckpt / "unet"), **kwargs}
    with pytest.raises(error, match=match):
        resolve_components(purpose, str(init), **kwargs)


@pytest.mark.parametrize("purpose,flag", [("train", "--pretrained_model_name_or_path"), ("eval", "--model_dir")])
def test_missing_root_names_the_root_flag(tmp_path, purpose, flag):
    with pytest.raises(FileNotFoundError, match=f"{flag}: no such folder"):
        resolve_components(purpose, str(tmp_path / "CompVis-stable-diffusion-v1-4"))
    if purpose == "eval":
        with pytest.raises(ValueError, match="--model_dir is required"):
            resolve_components("eval", None, unet=str(tmp_path))


def test_train_ignores_checkpoint_siblings_and_has_no_ema(init, ckpt):
    make_root(ckpt / "x", parts=("scheduler", "text_encoder"), unet_config=False)
    for part in ("scheduler", "text_encoder"):
        os.rename(ckpt / "x" / part, ckpt / part)
    c = resolve_components("train", str(init), unet=str(ckpt / "unet"))
    assert (c.scheduler, c.text_encoder) == (str(init / "scheduler"), str(init / "text_encoder"))
    with pytest.raises(ValueError, match="use_ema .* eval only"):
        resolve_components("train", str(init), unet=str(ckpt / "unet"), use_ema=True)


# ---- eval ----

def test_eval_init_folder_needs_a_trained_unet(init):
    with pytest.raises(FileNotFoundError, match=r"has no unet/ \(an init folder holds only a config\).*--unet_path"):
        resolve_components("eval", str(init))


def test_eval_unet_folder_needs_config_json_with_a_hint(init, ckpt):
    with pytest.raises(FileNotFoundError, match=r"--unet_path .* is not a UNet folder: no config.json "
                                                r"\(did you mean .*checkpoint-5/unet\?\)"):
        resolve_components("eval", str(init), unet=str(ckpt))
    (ckpt / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config.json$"):
        resolve_components("eval", str(init), unet=str(ckpt / "empty"))
    c = resolve_components("eval", str(init), unet=str(ckpt / "unet") + "/")  # a trailing slash is harmless
    assert c == Components(vae=str(init / "vae"), text_encoder=str(init / "text_encoder"),
                           tokenizer=str(init / "tokenizer"), scheduler=str(init / "scheduler"),
                           unet=str(ckpt / "unet"), unet_from_config=False)


def test_eval_use_ema_takes_the_sibling_unet_ema(init, ckpt, tmp_path):
    assert resolve_components("eval", str(init), unet=str(ckpt / "unet"), use_ema=True).unet == str(ckpt / "unet_ema")
    lone = make_unet(tmp_path / "lone" / "unet")
    with pytest.raises(FileNotFoundError, match=r"--use_ema: no unet_ema/ next to .*lone/unet .*expected"):
        resolve_components("eval", str(init), unet=str(lone), use_ema=True)


def test_eval_checkpoint_scheduler_wins_over_the_roots(init, ckpt):
    assert resolve_components("eval", str(init), unet=str(ckpt / "unet")).scheduler == str(init / "scheduler")
    shutil.copytree(os.path.join(TINY_INIT, "scheduler"), ckpt / "scheduler")
    for ema in (False, True):
        c = resolve_components("eval", str(init), unet=str(ckpt / "unet"), use_ema=ema)
        assert c.scheduler == str(ckpt / "scheduler")


def test_eval_trained_text_encoder_must_be_chosen(init, ckpt):
    (ckpt / "text_encoder").mkdir()
    with pytest.raises(ValueError, match=r"holds a trained text_encoder/: pass --text_encoder_path .*checkpoint-5/"
                                         r"text_encoder \(or --text_encoder_path .*init/text_encoder to use"):
        resolve_components("eval", str(init), unet=str(ckpt / "unet"))
    for chosen in (ckpt / "text_encoder", init / "text_encoder"):
        assert resolve_components("eval", str(init), unet=str(ckpt / "unet"),
                                  text_encoder=str(chosen)).text_encoder == str(chosen)


def test_eval_pipeline_folder_alone(tmp_path):
    """A whole pipeline folder: its own unet/, and its text_encoder/ beside it is the root's, not a trained one."""
    root = make_root(tmp_path / "pipe", unet_config=False, unet_folder=True)
    c = resolve_components("eval", str(root))
    assert c.unet == str(root / "unet") and c.text_encoder == str(root / "text_encoder")
    assert c.scheduler == str(root / "scheduler")


def test_flag_names_of_the_caller_appear_in_messages(init):
    with pytest.raises(FileNotFoundError, match="--my_vae: no such folder"):
        resolve_components("train", str(init), vae="nowhere", flag_names={"vae": "--my_vae"})
    with pytest.raises(FileNotFoundError, match="--base: no such folder"):
        resolve_components("eval", str(init / "nowhere"), flag_names={"root": "--base"})
    with pytest.raises(ValueError, match="purpose must be one of"):
        resolve_components("infer", str(init))


def test_train_tokenizer_defaults_to_the_roots_then_beside_the_text_encoder(tmp_path, init):
    """The reference's 4.2 command names no tokenizer: the root's tokenizer/, else the one beside the text
    encoder (CompVis-stable-diffusion-v1-4/text_encoder -> .../tokenizer)."""
    sd14 = make_root(tmp_path / "CompVis-stable-diffusion-v1-4", unet_config=False)
    c = resolve_components("train", None, vae=str(sd14 / "vae"), text_encoder=str(sd14 / "text_encoder"),
                           unet=str(init / "unet_config.json"))
    assert c.tokenizer == str(sd14 / "tokenizer") and c.unet_from_config
    assert resolve_components("train", str(init), text_encoder=str(sd14 / "text_encoder")).tokenizer == str(
        init / "tokenizer")  # the root's comes first, as in the reference
    lone = make_root(tmp_path / "lone", parts=("text_encoder",), unet_config=False)
    with pytest.raises(ValueError, match=r"--tokenizer_name is required \(or a --pretrained_model_name_or_path "
                                         r"with tokenizer/, or a tokenizer/ beside the text encoder\)"):
        resolve_components("train", None, vae=str(sd14 / "vae"), text_encoder=str(lone / "text_encoder"),
                           unet=str(init / "unet_config.json"))


def test_eval_text_encoder_copy_beside_the_unet_is_the_roots_own(tmp_path, init):
    """A finished run's folder holds a byte-for-byte copy of the untrained text encoder beside unet/: the same
    encoder (sha256 of its weight files), not a trained one; one changed byte makes it a trained one."""
    run = tmp_path / "run"
    make_unet(run / "unet")
    shutil.copytree(os.path.join(TINY_INIT, "text_encoder"), run / "text_encoder")
    c = resolve_components("eval", str(init), unet=str(run / "unet"))
    assert c.text_encoder == str(init / "text_encoder")
    weights = run / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="holds a trained text_encoder/"):
        resolve_components("eval", str(init), unet=str(run / "unet"))
