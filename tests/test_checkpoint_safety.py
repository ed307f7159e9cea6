"""Hostile checkpoints (trainer/checkpoint.py): a resume never reads a file other than the one that was saved,
never mixes two runs, and never executes a pickle planted in a checkpoint or a model folder.

The attacker (or the unlucky disk) can write into the output folder: truncate or zero files, add, drop or
symlink them, rewrite the marker to match, plant pickles under every name the Trainer used to unpickle, or drop
a whole fake checkpoint-99/. Each case must end at start with one line naming the file, and the planted
payload (a pickle whose loading creates a file) must never run."""
import json
import os
import pickle
import random
import shutil
import subprocess

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file, save_file

from helpers import PY, ROOT, TINY_INIT
from sd.args import parse_train_args
from sd.vae_model import VAEArguments
from trainer import checkpoint as ckpt
from trainer.entry import resolve_checkpoint
from trainer.loader.loader_state import load_state_file


class Payload:
    """Unpickling this creates `path`: the proof that a file was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path, proof) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(Payload(proof), f)


def forge_marker(folder, step) -> None:
    """What an attacker with write access does: a marker that matches whatever the folder now holds."""
    marker = {"format": ckpt.MARKER_FORMAT, "version": 1, "step": step, "files": ckpt.file_table(str(folder))}
    (folder / ckpt.COMPLETE_MARKER).write_text(json.dumps(marker))


def fake_checkpoint(out, step=7):
    """A small sealed checkpoint folder with the recipe's file kinds (no training needed)."""
    folder = out / f"checkpoint-{step}"
    (folder / "unet").mkdir(parents=True)
    save_file({"w": np.arange(4096, dtype=np.float32)}, str(folder / "unet" / "diffusion_paddle_model.safetensors"))
    (folder / "unet" / "config.json").write_text("{}")
    (folder / ckpt.TRAINER_STATE_FILE).write_text(json.dumps({"global_step": step}))
    (folder / "loader_state_rank0.json").write_text("{}")
    ckpt.write_marker(str(folder), step)
    return folder


def args_for(out, file_list, *extra):
    return parse_train_args(["--do_train", "--output_dir", str(out), "--file_list", file_list, "--max_steps", "3",
                             "--pretrained_model_name_or_path", TINY_INIT, *extra])[2]


# ------------------------------------------------------------------------------------------ the marker
@pytest.mark.unit
@pytest.mark.parametrize("damage, message", [
    ("truncate", "has 8192 bytes, its marker says"),
    ("zero_half", "differs from the file that was saved"),
    ("drop", "is missing: its .complete marker lists it"),
    ("add", "is not listed in its .complete marker"),
    ("symlink_file", "is a symlink"),
    ("symlink_dir", "is a symlink"),
    ("marker_symlink", "no .complete marker"),
    ("marker_garbage", "not valid JSON"),
    ("marker_other", "is not a checkpoint marker of this recipe"),
    ("marker_empty", "lists no files"),
    ("renamed", "was written for step 7, not 99"),
])
def test_a_checkpoint_that_differs_from_its_marker_is_refused(tmp_path, damage, message):
    folder = fake_checkpoint(tmp_path / "run")
    weights = folder / "unet" / "diffusion_paddle_model.safetensors"
    size = weights.stat().st_size
    (elsewhere := tmp_path / "elsewhere").mkdir()
    if damage == "truncate":
        os.truncate(weights, 8192)
    elif damage == "zero_half":  # same size: only the sha256 sees it
        data = weights.read_bytes()
        weights.write_bytes(data[:size // 2] + bytes(size - size // 2))
    elif damage == "drop":
        (folder / "loader_state_rank0.json").unlink()
    elif damage == "add":
        (folder / "unet" / "extra.safetensors").write_bytes(b"x")
    elif damage == "symlink_file":  # identical bytes, but through a link that can change under the resume
        shutil.copy(weights, elsewhere / "w.safetensors")
        weights.unlink()
        weights.symlink_to(elsewhere / "w.safetensors")
    elif damage == "symlink_dir":
        shutil.move(str(folder / "unet"), str(elsewhere / "unet"))
        (folder / "unet").symlink_to(elsewhere / "unet")
    elif damage == "marker_symlink":
        shutil.move(str(folder / ".complete"), str(elsewhere / "m"))
        (folder / ".complete").symlink_to(elsewhere / "m")
    elif damage == "marker_garbage":
        (folder / ".complete").write_bytes(b"\xff{not json")
    elif damage == "marker_other":
        (folder / ".complete").write_text(json.dumps({"format": "x", "files": []}))
    elif damage == "marker_empty":  # what older versions wrote, and what a planted checkpoint can have
        (folder / ".complete").write_text("")
    elif damage == "renamed":  # an old checkpoint copied over to a higher number
        folder = folder.rename(folder.parent / "checkpoint-99")
    with pytest.raises(ckpt.CheckpointError, match=message) as err:
        ckpt.verify_checkpoint(str(folder), trust=False)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


@pytest.mark.unit
def test_an_intact_checkpoint_verifies_and_its_marker_lists_every_file(tmp_path):
    folder = fake_checkpoint(tmp_path / "run")
    ckpt.verify_checkpoint(str(folder), trust=False)
    marker = json.loads((folder / ".complete").read_text())
    assert sorted(marker["files"]) == ["loader_state_rank0.json", "trainer_state.json", "unet/config.json",
                                       "unet/diffusion_paddle_model.safetensors"]


@pytest.mark.unit
def test_a_killed_save_is_never_resumed_and_a_rewrite_is_all_or_nothing(tmp_path):
    out = tmp_path / "run"
    old = fake_checkpoint(out, step=7)
    # Killed while writing checkpoint-9 (and while rewriting checkpoint-7): only .tmp- folders, never resumed.
    for step in (7, 9):
        half = out / f"checkpoint-{step}.tmp-4242"
        (half / "unet").mkdir(parents=True)
        (half / "unet" / "diffusion_paddle_model.safetensors").write_bytes(b"half")
    assert ckpt.last_complete_checkpoint(str(out)) == str(old)
    ckpt.verify_checkpoint(str(old), trust=False)  # the complete one is untouched
    assert [os.path.basename(p) for p in ckpt.leftovers(str(out))] == ["checkpoint-7.tmp-4242",
                                                                      "checkpoint-9.tmp-4242"]
    # A save that replaces checkpoint-7: the new folder appears whole, the old one is gone.
    tmp = ckpt.begin(str(old))
    (out / os.path.basename(tmp) / ckpt.TRAINER_STATE_FILE).write_text(json.dumps({"global_step": 7, "new": 1}))
    ckpt.publish(tmp, str(old), 7)
    assert sorted(os.listdir(old)) == [".complete", "trainer_state.json"] and not os.path.exists(tmp)
    assert not [p for p in ckpt.leftovers(str(out)) if ".old-" in p]
    ckpt.verify_checkpoint(str(old), trust=False)


@pytest.mark.unit
def test_a_save_that_wrote_a_pickle_is_refused_at_save(tmp_path):
    folder = tmp_path / "checkpoint-1.tmp-1"
    folder.mkdir()
    (folder / "optimizer.pdopt").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match="pickled files"):
        ckpt.write_marker(str(folder), 1)


# ------------------------------------------------------------------------------------------ output_dir
@pytest.mark.unit
def test_output_dir_entries_and_resume_points_are_checked_at_start(tmp_path, demo_file_list):
    out = tmp_path / "run"
    good = fake_checkpoint(out, step=7)
    assert resolve_checkpoint(args_for(out, demo_file_list)) == str(good)
    # A checkpoint-N that is a file, or a symlink to a real checkpoint elsewhere: refused, never followed.
    (out / "checkpoint-99").write_text("not a folder")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-99 is not a folder"):
        resolve_checkpoint(args_for(out, demo_file_list))
    (out / "checkpoint-99").unlink()
    (out / "checkpoint-99").symlink_to(fake_checkpoint(tmp_path / "other", step=99))
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-99 is a symlink"):
        resolve_checkpoint(args_for(out, demo_file_list))
    (out / "checkpoint-99").unlink()
    # --resume_from_checkpoint at something that is not a checkpoint: one line, naming it.
    for target in (out, good / "unet", good / ckpt.TRAINER_STATE_FILE):
        with pytest.raises((ckpt.CheckpointError, FileNotFoundError), match="--resume_from_checkpoint") as err:
            resolve_checkpoint(args_for(out, demo_file_list, "--resume_from_checkpoint", str(target)))
        assert str(target) in str(err.value) and "\n" not in str(err.value)
    # Resuming an older checkpoint while a later one of the same folder exists mixes two futures of the run.
    older = fake_checkpoint(out, step=3)
    with pytest.raises(ValueError, match="also holds checkpoint-7.*--overwrite_output_dir"):
        resolve_checkpoint(args_for(out, demo_file_list, "--resume_from_checkpoint", str(older)))
    assert resolve_checkpoint(args_for(out, demo_file_list, "--resume_from_checkpoint", str(older),
                                       "--overwrite_output_dir")) == str(older)
    assert ckpt.checkpoints_not_continued(str(out), str(older)) == [str(good)]
    # --overwrite_output_dir starts over: nothing is resumed, and every checkpoint is to be removed.
    assert resolve_checkpoint(args_for(out, demo_file_list, "--overwrite_output_dir")) is None
    assert ckpt.checkpoints_not_continued(str(out), None) == [str(older), str(good)]


# ------------------------------------------------------------------------------------------ no code from data
OLD_PICKLED_NAMES = ["rng_state.pth", "rng_state_2.pth", "optimizer.pdopt", "scheduler.pdparams",
                     "ema_state.pdparams", "scaler.pdparams", "unet/model_state.pdparams",
                     "unet/diffusion_paddle_model.pdparams.index.json", "text_encoder/pytorch_model.bin"]


@pytest.mark.unit
@pytest.mark.parametrize("name", OLD_PICKLED_NAMES)
def test_a_pickle_planted_under_a_trainer_name_is_refused_even_with_a_forged_marker(tmp_path, name):
    folder, proof = fake_checkpoint(tmp_path / "run"), tmp_path / "EXECUTED"
    plant(str(folder / name), proof)
    forge_marker(folder, 7)
    with pytest.raises(ckpt.CheckpointError, match=f"{name} is a pickled file.*--trust_pickled_checkpoint"):
        ckpt.verify_checkpoint(str(folder), trust=False)
    if name.startswith(("unet/", "text_encoder/")):
        with pytest.raises(ckpt.CheckpointError, match="holds pickled weights"):
            ckpt.refuse_pickled_weights(os.path.dirname(folder / name), "the UNet", trust=False)
    assert not proof.exists()


@pytest.mark.unit
@pytest.mark.parametrize("name", [ckpt.RNG_FILE, ckpt.LR_SCHEDULER_FILE, ckpt.OPTIMIZER_FILE, ckpt.EMA_FILE,
                                  "loader_state_rank0.json", ckpt.TRAINER_STATE_FILE])
def test_a_pickle_in_place_of_a_state_file_is_an_error_naming_it_and_never_runs(tmp_path, name):
    """Even when the attacker reseals the marker, every state reader parses data only."""
    folder, proof = fake_checkpoint(tmp_path / "run"), tmp_path / "EXECUTED"
    path = str(folder / name)
    plant(path, proof)
    forge_marker(folder, 7)
    ckpt.verify_checkpoint(str(folder), trust=False)  # the forged marker matches: the readers must hold
    readers = {ckpt.RNG_FILE: ckpt.read_json, ckpt.TRAINER_STATE_FILE: ckpt.read_json,
               ckpt.LR_SCHEDULER_FILE: lambda p: ckpt.read_state_json(p, "lr_scheduler"),
               ckpt.OPTIMIZER_FILE: ckpt.optimizer_from_file, ckpt.EMA_FILE: ckpt.load_tensors,
               "loader_state_rank0.json": load_state_file}
    with pytest.raises(ValueError, match=f"{path}: not (valid JSON|a readable)") as err:
        readers[name](path)
    assert "\n" not in str(err.value) and not proof.exists()


@pytest.mark.unit
def test_pickled_model_weights_are_refused_for_a_pretrained_vae(tmp_path):
    vae_dir, proof = tmp_path / "vae", tmp_path / "EXECUTED"
    shutil.copytree(os.path.join(TINY_INIT, "vae"), vae_dir)
    plant(str(vae_dir / "model_state.pdparams"), proof)  # ppdiffusers would take it if safetensors were absent
    with pytest.raises(ckpt.CheckpointError, match=f"--vae_name_or_path {vae_dir} holds pickled weights "
                                                   r"\(model_state.pdparams\)"):
        VAEArguments(vae_name_or_path=str(vae_dir)).build()
    assert not proof.exists()


# ------------------------------------------------------------------------------------------ state as data
@pytest.mark.unit
def test_rng_state_round_trips_through_json_exactly(tmp_path):
    paddle.seed(11)
    random.seed(3)
    np.random.seed(5)
    np.random.normal()  # a cached gaussian is part of numpy's state
    path = str(tmp_path / ckpt.RNG_FILE)
    with open(path, "w") as f:
        json.dump(ckpt.rng_state_now(), f)
    first = (random.random(), np.random.normal(), paddle.rand([3]).numpy().tolist())
    random.seed(0)
    np.random.seed(0)
    paddle.seed(0)
    ckpt.set_rng_state(ckpt.read_json(path), path)
    assert (random.random(), np.random.normal(), paddle.rand([3]).numpy().tolist()) == first
    with pytest.raises(ckpt.CheckpointError, match=f"{path}: not an RNG state"):
        ckpt.set_rng_state({"python": [3, [1, 2], None]}, path)


@pytest.mark.unit
def test_optimizer_and_scheduler_state_round_trip_bitwise(tmp_path):
    def build():
        paddle.seed(1)
        layer = paddle.nn.Linear(3, 4)
        sched = paddle.optimizer.lr.LinearWarmup(1e-2, 10, 0.0, 1e-2)
        return layer, sched, paddle.optimizer.AdamW(learning_rate=sched, parameters=layer.parameters())

    def step(layer, sched, opt):
        layer(paddle.ones([2, 3])).square().sum().backward()
        opt.step()
        opt.clear_grad()
        sched.step()

    # Each phase names its parameters and accumulators afresh, as a new process does (the optimizer's keys).
    with paddle.utils.unique_name.guard():
        layer, sched, opt = build()
        for _ in range(3):
            step(layer, sched, opt)
        ckpt.optimizer_to_file(opt.state_dict(), str(tmp_path / ckpt.OPTIMIZER_FILE), {"nonfinite_skipped": 2})
        ckpt.write_state_json(str(tmp_path / ckpt.LR_SCHEDULER_FILE), sched.state_dict(), "lr_scheduler")
        saved_weights = {k: v.numpy().copy() for k, v in layer.state_dict().items()}
        step(layer, sched, opt)
        straight = layer.weight.numpy().copy()

    with paddle.utils.unique_name.guard():
        layer2, sched2, opt2 = build()
        layer2.set_state_dict(saved_weights)
        state, extra = ckpt.optimizer_from_file(str(tmp_path / ckpt.OPTIMIZER_FILE))
        opt2.set_state_dict(state)
        sched2.set_state_dict(ckpt.read_state_json(str(tmp_path / ckpt.LR_SCHEDULER_FILE), "lr_scheduler"))
        step(layer2, sched2, opt2)
    assert extra == {"nonfinite_skipped": 2} and np.array_equal(layer2.weight.numpy(), straight)


# ------------------------------------------------------------------------------------------ real runs
def train(out, file_list, *extra):
    cmd = [PY, os.path.join(ROOT, "train.py"), "--do_train", "--pretrained_model_name_or_path", TINY_INIT,
           "--file_list", file_list, "--output_dir", str(out), "--resolution", "32",
           "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "23",
           "--disable_tqdm", "True", "--image_logging_steps", "0", "--report_to", "none", "--use_ema", "True",
           "--save_steps", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, demo_file_list):
    out = tmp_path_factory.mktemp("saved") / "run"
    proc = train(out, demo_file_list, "--max_steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def last_line(proc) -> str:
    return [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]


@pytest.mark.smoke
@pytest.mark.parametrize("attack", ["zero_half_unet", "payload_as_optimizer", "corrupt_loader_state",
                                    "fake_checkpoint_99"])
def test_a_resume_from_a_hostile_checkpoint_stops_at_start_naming_the_file(tmp_path, saved_run, demo_file_list,
                                                                            attack):
    out, proof = tmp_path / "run", tmp_path / "EXECUTED"
    shutil.copytree(saved_run, out)
    ck = out / "checkpoint-2"
    if attack == "zero_half_unet":  # same size, weights off by up to their full value: only sha256 sees it
        target = ck / "unet" / "diffusion_paddle_model.safetensors"
        data = target.read_bytes()
        target.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))
        expected = f"{target} differs from the file that was saved"
    elif attack == "payload_as_optimizer":  # a pickle under the new name, marker resealed to match
        target = ck / ckpt.OPTIMIZER_FILE
        plant(str(target), proof)
        forge_marker(ck, 2)
        expected = f"{target}: not a readable safetensors file"
    elif attack == "corrupt_loader_state":
        target = ck / "loader_state_rank0.json"
        target.write_text('{"format": "text_image_loader_state", "workers": [')
        forge_marker(ck, 2)
        expected = f"{target}: not a readable loader state"
    else:  # a whole fake checkpoint-99/ with an old-style empty marker and pickles under every old name
        fake = out / "checkpoint-99"
        shutil.copytree(ck, fake)
        for name in ("rng_state.pth", "optimizer.pdopt", "scheduler.pdparams", "ema_state.pdparams",
                     "unet/model_state.pdparams"):
            plant(str(fake / name), proof)
        (fake / ".complete").write_text("")
        expected = f"{fake}/.complete lists no files"
    proc = train(out, demo_file_list, "--max_steps", "4")
    assert proc.returncode != 0 and expected in last_line(proc), proc.stderr[-3000:]
    assert not proof.exists() and not (out / "checkpoint-4").exists()


@pytest.mark.smoke
def test_overwrite_output_dir_removes_the_earlier_runs_checkpoints_before_training(tmp_path, saved_run,
                                                                                   demo_file_list):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    (out / "checkpoint-6.tmp-999").mkdir()  # a killed save of the earlier run
    proc = train(out, demo_file_list, "--max_steps", "1", "--save_steps", "1", "--overwrite_output_dir")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--overwrite_output_dir: training starts over" in proc.stderr and f"removing {out}/checkpoint-2" in \
        proc.stderr
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1"]
    ckpt.verify_checkpoint(str(out / "checkpoint-1"), trust=False)


def make_legacy(folder) -> None:
    """Turn a checkpoint into what older versions of the recipe wrote: the Trainer's pickles, an empty marker."""
    state, _ = ckpt.optimizer_from_file(str(folder / ckpt.OPTIMIZER_FILE))
    paddle.save(state, str(folder / "optimizer.pdopt"))
    paddle.save(ckpt.read_state_json(str(folder / ckpt.LR_SCHEDULER_FILE), "lr_scheduler"),
                str(folder / "scheduler.pdparams"))
    saved = json.loads((folder / ckpt.RNG_FILE).read_text())["ranks"][0]
    ckpt.set_rng_state(saved, "rng")  # the live generators now hold the saved state: pickle them as paddlenlp did
    paddle.save({"python": random.getstate(), "numpy": np.random.get_state(), "cuda": paddle.get_rng_state(),
                 "cpu": paddle.base.core.default_cpu_generator().get_state()}, str(folder / "rng_state.pth"))
    buffers, meta = ckpt.load_tensors(str(folder / ckpt.EMA_FILE))
    paddle.save({"buffers": buffers, "num_updates": meta["num_updates"]}, str(folder / "ema_state.pdparams"))
    for name in (ckpt.OPTIMIZER_FILE, ckpt.LR_SCHEDULER_FILE, ckpt.RNG_FILE, ckpt.EMA_FILE):
        (folder / name).unlink()
    (folder / ".complete").write_text("")


@pytest.mark.smoke
def test_an_older_pickled_checkpoint_resumes_only_with_the_trust_flag_and_exactly(tmp_path, saved_run,
                                                                                  demo_file_list):
    new, old = tmp_path / "new", tmp_path / "old"
    shutil.copytree(saved_run, new)
    shutil.copytree(saved_run, old)
    make_legacy(old / "checkpoint-2")
    refused = train(old, demo_file_list, "--max_steps", "3")
    assert refused.returncode != 0 and "lists no files" in last_line(refused) and "--trust_pickled_checkpoint" in \
        last_line(refused)
    trusted = train(old, demo_file_list, "--max_steps", "3", "--trust_pickled_checkpoint")
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert "--trust_pickled_checkpoint: loading the pickled optimizer.pdopt" in trusted.stderr
    assert train(new, demo_file_list, "--max_steps", "3").returncode == 0
    a, b = (load_file(str(run / "unet" / "diffusion_paddle_model.safetensors")) for run in (new, old))
    assert all(np.array_equal(a[k], b[k]) for k in a)
